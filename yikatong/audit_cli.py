"""``yikatong audit ...``: security-review tools. Today: Crypto-1 key recovery (proxmark-style names)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from audit.mfkey import NoKeyFound, mfkey32, mfkey64
from yikatong.errors import CliError


def _hex32(text: str) -> int:
    cleaned = text.strip().removeprefix("0x").removeprefix("0X")
    if len(cleaned) != 8 or any(c not in "0123456789abcdefABCDEF" for c in cleaned):
        raise argparse.ArgumentTypeError(f"{text!r} is not 8 hex digits (32 bits)")
    return int(cleaned, 16)


def register(groups: Any) -> None:
    """Add the ``audit`` command group."""
    audit = groups.add_parser(
        "audit", help="security review tools (Crypto-1 key recovery, ...)", description="Security review tools."
    )
    sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    m64 = sub.add_parser(
        "mfkey64",
        help="recover a MIFARE Classic key from one sniffed authentication",
        description="Recover the sector key from one complete authentication sniffed between reader and tag: "
        "the tag nonce and the encrypted reader nonce, reader answer and tag answer. Prints the 12-hex-digit key.",
        epilog="Example: yikatong audit mfkey64 9C599B32 82A4166C A1E458CE 6EEA41E0 5CADF439",
    )
    for name, what in (
        ("UID", "card UID"),
        ("NT", "tag nonce nT"),
        ("NR", "encrypted reader nonce {nR}"),
        ("AR", "encrypted reader answer {aR}"),
        ("AT", "encrypted tag answer {aT}"),
    ):
        m64.add_argument(name.lower(), metavar=name, type=_hex32, help=f"{what}, 8 hex digits")
    m64.set_defaults(run=_mfkey64)

    m32 = sub.add_parser(
        "mfkey32",
        help="recover a MIFARE Classic key from two reader authentication attempts",
        description="Recover the key a reader used from two of its authentication attempts against an "
        "emulated tag (same or different tag nonces): nT, {nR}, {aR} of each. Prints the 12-hex-digit key.",
    )
    for name, what in (
        ("UID", "card UID"),
        ("NT0", "first tag nonce"),
        ("NR0", "first encrypted {nR}"),
        ("AR0", "first encrypted {aR}"),
        ("NT1", "second tag nonce"),
        ("NR1", "second encrypted {nR}"),
        ("AR1", "second encrypted {aR}"),
    ):
        m32.add_argument(name.lower(), metavar=name, type=_hex32, help=f"{what}, 8 hex digits")
    m32.set_defaults(run=_mfkey32)


def _report(key_fn: Any, *values: int) -> int:
    start = time.perf_counter()
    try:
        key = key_fn(*values)
    except NoKeyFound as err:
        raise CliError(f"{err}: these values do not come from one key's authentications") from err
    print(f"{key:012X}")
    print(f"recovered in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


def _mfkey64(args: argparse.Namespace) -> int:
    return _report(mfkey64, args.uid, args.nt, args.nr, args.ar, args.at)


def _mfkey32(args: argparse.Namespace) -> int:
    return _report(mfkey32, args.uid, args.nt0, args.nr0, args.ar0, args.nt1, args.nr1, args.ar1)
