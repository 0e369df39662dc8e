"""The ``yikatong`` console command: one entry point, one subcommand group per part of the product.

Exit codes, for every subcommand:

- 0: done;
- 1: the command ran to its end and the answer is negative (findings at or above ``--fail-on``, a tap refused,
  records left unacked, a settlement that does not balance); what it writes is complete;
- 2: the command could not do its job: bad usage or input (argparse, ``CliError``), or an internal error. An
  internal error (an exception nothing expected: a bug) prints one line, ``yikatong: internal error: TYPE: message
  (please report ...)``, with the traceback only when ``YIKATONG_DEBUG=1`` is set. It exits 2, not 1, so that a
  bug is never read as a finding or a refusal by a script: 2 already means "no result, nothing to act on";
- 130: interrupted (Ctrl-C), quietly.

Every message is one line (``errors.one_line``): a file name with a line break or a control character in it is
escaped, not printed raw.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from yikatong import __version__, audit_cli, card_cli, clearing_cli, demo, load_cli, pki_cli, terminal_cli
from yikatong.argtypes import resolve_broker
from yikatong.errors import CliError, one_line

DEBUG_VARIABLE = "YIKATONG_DEBUG"


class _Parser(argparse.ArgumentParser):
    """argparse with its error line escaped like every other message (it quotes unknown arguments raw);
    the subcommand parsers are of this class too (add_subparsers makes parsers of the parent's class)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")

    def _get_values(self, action: argparse.Action, arg_strings: list[str]) -> Any:
        # Python 3.11's argparse drops a '--' given as an option's value ('--out=--') and hands the command an
        # empty list, past the option's type
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            self.error(f"argument {'/'.join(action.option_strings)}: expected a value, not '--'")
        return super()._get_values(action, arg_strings)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by tests and --help)."""
    parser: argparse.ArgumentParser = _Parser(  # typed as its base: the commands register on plain parsers
        prog="yikatong",
        description="City one-card (一卡通) smart-card simulator and audit service.",
        epilog="Run 'yikatong COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"yikatong {__version__}")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    demo.register(groups)
    card_cli.register(groups)
    terminal_cli.register(groups)
    clearing_cli.register(groups)
    audit_cli.register(groups)
    load_cli.register(groups)
    pki_cli.register(groups)
    return parser


def _never_fail_to_print() -> None:
    """Output that the terminal's encoding cannot show (a non-UTF-8 file name, Chinese on an ASCII pipe) is
    escaped rather than raising UnicodeEncodeError halfway through a command; stderr already does this."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and getattr(sys.stdout, "errors", None) == "strict":
        reconfigure(errors="backslashreplace")


def _internal_error(err: Exception) -> int:
    message = one_line(" ".join(str(err).split()))[:300]
    what = f"{type(err).__name__}: {message}" if message else type(err).__name__
    print(f"yikatong: internal error: {what} (please report; {DEBUG_VARIABLE}=1 shows the traceback)", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (see the module docstring)."""
    _never_fail_to_print()
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help, --version, usage errors (printed): the code, returned like the rest
            return done.code if isinstance(done.code, int) else 0 if done.code is None else 2
        resolve_broker(args)  # an mqtts:// broker gets its TLS files, checked, before any command runs
        code: int = args.run(args)
    except CliError as err:
        print(f"yikatong: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # the last resort: one line, never a traceback (YIKATONG_DEBUG=1 shows it)
        if os.environ.get(DEBUG_VARIABLE, "0") not in ("", "0"):
            raise
        return _internal_error(err)
    return code


if __name__ == "__main__":
    sys.exit(main())
