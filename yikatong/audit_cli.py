"""``yikatong audit ...``: security-review tools. Today: Crypto-1 key recovery (proxmark-style names)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from audit.m1_attacks import AttackFailed, nested_attack
from audit.mfkey import NoKeyFound, mfkey32, mfkey64
from cardsim.mifare import M1Card, M1State
from terminals.m1 import M1Error
from yikatong.argtypes import hex_number
from yikatong.card_cli import load_image
from yikatong.errors import CliError

_hex32 = hex_number(8)
_hex48 = hex_number(12)


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
    _register_nested(sub)


def _block(text: str) -> int:
    if not text.isdigit() or int(text) > 63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a block number 0..63")
    return int(text)


def _key_type(text: str) -> int:
    types = {"A": 0x60, "B": 0x61}
    if text.upper() not in types:
        raise argparse.ArgumentTypeError("key type is A or B")
    return types[text.upper()]


def _register_nested(sub: Any) -> None:
    nested = sub.add_parser(
        "nested",
        help="recover other sector keys of a (simulated) M1 card from one known key",
        description="Nested attack through the card's radio interface: authenticate with a known sector key, "
        "request a nested authentication to the target sector, predict its nonce (weak PRNG), filter by the "
        "leaked parity bits and invert Crypto-1. Prints the 12-hex-digit target key.",
        epilog="Example: yikatong audit nested m1.json --known-block 3 --known-key FFFFFFFFFFFF --target-block 7",
    )
    nested.add_argument("image", type=Path, help="M1 card image")
    nested.add_argument("--known-block", type=_block, required=True, help="a block of the sector with the known key")
    nested.add_argument("--known-key", type=_hex48, required=True, help="that sector's key, 12 hex digits")
    nested.add_argument("--known-type", type=_key_type, default=0x60, help="A or B (default A)")
    nested.add_argument("--target-block", type=_block, required=True, help="a block of the target sector")
    nested.add_argument("--target-type", type=_key_type, default=0x60, help="A or B (default A)")
    nested.set_defaults(run=_nested)


def _nested(args: argparse.Namespace) -> int:
    state = load_image(args.image)
    if not isinstance(state, M1State):
        raise CliError(f"{args.image} is a CPU card; the nested attack is for MIFARE Classic")
    card = M1Card(state, os.urandom)
    known, target = (args.known_block, args.known_key, args.known_type), (args.target_block, args.target_type)
    return _report(
        lambda: nested_attack(card, state.uid, known, target), (AttackFailed, M1Error), "nested attack failed"
    )


def _report(find: Callable[[], int], failures: tuple[type[Exception], ...], what: str) -> int:
    """Run a key recovery; print the key (stdout) and its time (stderr), or fail with exit code 2."""
    start = time.perf_counter()
    try:
        key = find()
    except failures as err:
        raise CliError(f"{err}; {what}") from err
    print(f"{key:012X}")
    print(f"recovered in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


_NOT_ONE_KEY = "these values do not come from one key's authentications"


def _mfkey64(args: argparse.Namespace) -> int:
    return _report(lambda: mfkey64(args.uid, args.nt, args.nr, args.ar, args.at), (NoKeyFound,), _NOT_ONE_KEY)


def _mfkey32(args: argparse.Namespace) -> int:
    values = (args.uid, args.nt0, args.nr0, args.ar0, args.nt1, args.nr1, args.ar1)
    return _report(lambda: mfkey32(*values), (NoKeyFound,), _NOT_ONE_KEY)
