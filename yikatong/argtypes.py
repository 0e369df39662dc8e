"""Argument types shared by the subcommands: argparse turns their ArgumentTypeError into exit code 2."""

from __future__ import annotations

import argparse
from collections.abc import Callable

_HEX = set("0123456789abcdefABCDEF")


def hex_number(digits: int) -> Callable[[str], int]:
    """An argument of exactly ``digits`` hex digits (an optional 0x prefix allowed), as an integer."""

    def parse(text: str) -> int:
        cleaned = text.strip().removeprefix("0x").removeprefix("0X")
        if len(cleaned) != digits or not set(cleaned) <= _HEX:
            raise argparse.ArgumentTypeError(f"{text!r} is not {digits} hex digits ({digits * 4} bits)")
        return int(cleaned, 16)

    return parse
