"""Errors the command line reports as one clear line with exit code 2 (bad input, never a traceback), and the
escaping that keeps every such message on one line."""


class CliError(Exception):
    """Bad input from the user (a file, an argument): printed as ``yikatong: error: ...``, exit code 2."""


def one_line(text: str) -> str:
    """``text`` with every character a terminal would not print as itself escaped (line breaks, control and
    bidi-override characters, undecodable bytes of a file name), so a message is exactly one line."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii") for c in text
    )
