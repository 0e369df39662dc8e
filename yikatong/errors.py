"""Errors the command line reports as one clear line with exit code 2 (bad input, never a traceback)."""


class CliError(Exception):
    """Bad input from the user (a file, an argument): printed as ``yikatong: error: ...``, exit code 2."""
