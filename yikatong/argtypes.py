"""Argument types shared by the subcommands (argparse turns their ArgumentTypeError into exit code 2), and the
key-file loader they share."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from cardsim.keys import IssuerKeyStore, KeyFileError
from terminals.mqtt import BrokerUrl
from yikatong.errors import CliError

_HEX = set("0123456789abcdefABCDEF")


def hex_number(digits: int) -> Callable[[str], int]:
    """An argument of exactly ``digits`` hex digits (an optional 0x prefix allowed), as an integer."""

    def parse(text: str) -> int:
        cleaned = text.strip().removeprefix("0x").removeprefix("0X")
        if len(cleaned) != digits or not set(cleaned) <= _HEX:
            raise argparse.ArgumentTypeError(f"{text!r} is not {digits} hex digits ({digits * 4} bits)")
        return int(cleaned, 16)

    return parse


def fen(text: str) -> int:
    """A non-negative whole number of fen."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of fen") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def positive(text: str) -> int:
    """A whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("must be a whole number of at least 1")
    return int(text)


def city_code(text: str) -> str:
    """A 4-digit city code (GB/T 13497), e.g. 4510."""
    if len(text) != 4 or not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a 4-digit city code such as 4510")
    return text


def broker_url(text: str) -> BrokerUrl:
    """``mqtt://[user:password@]host[:port]``."""
    try:
        return BrokerUrl.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def load_keys(path: Path | None) -> IssuerKeyStore:
    """The issuer key file, or the published test keys; CliError naming the file when it is unusable."""
    try:
        return IssuerKeyStore.load(path) if path else IssuerKeyStore.test_set()
    except KeyFileError as err:
        raise CliError(str(err)) from err
