"""The ``yikatong`` console command: one entry point, one subcommand group per part of the product."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from yikatong import __version__, audit_cli, card_cli, clearing_cli, demo, load_cli, terminal_cli
from yikatong.errors import CliError


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used by tests and --help)."""
    parser = argparse.ArgumentParser(
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit code (0 ok, 1 findings/failure, 2 bad usage)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except CliError as err:
        print(f"yikatong: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
