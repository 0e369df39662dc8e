"""``yikatong audit autopwn``: the whole M1 key-recovery chain on one card (an image, a PN532, or a PC/SC Part 3
reader, which permits the dictionary only), one table, a dump and a keys file."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from yikatong.argtypes import Subcommands, file_path, seconds
from yikatong.errors import CliError

if TYPE_CHECKING:
    from audit.autopwn import Autopwn


def register(sub: Subcommands) -> None:
    """Add ``audit autopwn``."""
    autopwn = sub.add_parser(
        "autopwn",
        help="recover every sector key of an M1 card (dictionary, backdoor, darkside, nested, hardnested, ...)",
        description="The whole MIFARE Classic key-recovery chain, as Proxmark3's 'hf mf autopwn' runs it: the "
        "default-key dictionary, the FM11RF08S vendor backdoor, darkside when no key is known, then for each "
        "missing key the attack the chip's nonces allow (nested: weak PRNG; static nested: static nonce; "
        "hardnested: hardened) from a known key, every new key tried on the other sectors, and every block "
        "read. Each stage runs only where it applies; the output says which could not and why. Prints one "
        "table (sector, key A, key B, how found, seconds) and writes the dump (m1-UID.mfd, the format "
        "nfc-mfclassic and Proxmark3 take, and m1-UID.json) and the keys (m1-UID-keys.dic, one per line). "
        "Exit 0 when all 32 keys fell, 1 when some did not, 2 on bad usage. A card image is never changed.",
        epilog="Examples:\n  yikatong audit autopwn m1.json\n  yikatong audit autopwn --pn532 /dev/ttyUSB0 "
        "--max-seconds 600\n  yikatong audit autopwn --reader 'ACS ACR122U' (dictionary and dump only)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    autopwn.add_argument("image", nargs="?", type=file_path, help="M1 card image (or --pn532 / --reader)")
    autopwn.add_argument("--pn532", metavar="DEVICE", help="the card on a PN532 board (raw frames: every stage)")
    autopwn.add_argument(
        "--reader", metavar="NAME", help="the card on a PC/SC Part 3 reader (no raw frames: dictionary and dump only)"
    )
    autopwn.add_argument(
        "--max-seconds",
        type=seconds,
        help="time budget for the whole chain; keys found before it runs out are kept (default: none)",
    )
    autopwn.add_argument(
        "--keys",
        type=file_path,
        metavar="FILE",
        help="keys found elsewhere (one 12-hex-digit key a line, '#' comments; e.g. another card's m1-UID-keys.dic), "
        "tried after the public dictionary and before any attack",
    )
    autopwn.add_argument("--out", type=file_path, default=Path("."), help="folder for the dump and keys (default .)")
    autopwn.add_argument(
        "--card-wait", type=seconds, default=10.0, help="--pn532/--reader: seconds to wait for a card (default 10)"
    )
    autopwn.set_defaults(run=_autopwn)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _autopwn(args: argparse.Namespace) -> int:
    sources = [args.image is not None, args.pn532 is not None, args.reader is not None]
    if sum(sources) != 1:
        raise CliError("give one card: an M1 image, --pn532 DEVICE or --reader NAME")
    args.fleet_keys = _read_keys(args.keys) if args.keys is not None else ()
    from audit.m1_attacks import AttackFailed
    from terminals.m1 import M1Gone

    try:
        if args.pn532 is not None:
            result = _on_pn532(args)
        elif args.reader is not None:
            result = _on_reader(args)
        else:
            result = _on_image(args)
    except (M1Gone, AttackFailed) as err:  # the card left, or does not answer authentication requests at all
        raise CliError(f"autopwn stopped: {err}") from err
    return _finish(result, args.out)


def _on_image(args: argparse.Namespace) -> Autopwn:
    from audit.autopwn import autopwn
    from cardsim.mifare import M1Card, M1State
    from yikatong.card_cli import load_image

    state = load_image(args.image)
    if not isinstance(state, M1State):
        raise CliError(f"{args.image} is a CPU card; autopwn is for MIFARE Classic")
    card = M1Card(state, os.urandom)
    return autopwn(card, max_seconds=args.max_seconds, fleet_keys=args.fleet_keys, progress=_progress)


def _on_pn532(args: argparse.Namespace) -> Autopwn:
    from audit.autopwn import autopwn
    from yikatong.devices import pn532_with_card

    with pn532_with_card(args.pn532, args.card_wait) as link:
        return autopwn(link, max_seconds=args.max_seconds, fleet_keys=args.fleet_keys, progress=_progress)


def _on_reader(args: argparse.Namespace) -> Autopwn:
    from audit.autopwn import autopwn_blocks
    from terminals.flows import TransactionError
    from terminals.part3 import CLASSIC_1K, Part3Slot, storage_card_name
    from terminals.pcsc import PcscReader, ReaderNotFound

    try:
        reader = PcscReader(args.reader)
        atr = reader.wait_for_card(args.card_wait)
    except (ReaderNotFound, TimeoutError) as err:
        raise CliError(str(err)) from err
    try:
        name = storage_card_name(atr)
        if name != CLASSIC_1K:
            raise CliError(f"the card on {reader.name} is {'a CPU card' if name is None else name}: not a Classic 1K")
        where = f"PC/SC reader {reader.name}"
        return autopwn_blocks(Part3Slot(reader), where, fleet_keys=args.fleet_keys, progress=_progress)
    except TransactionError as err:
        raise CliError(str(err)) from err
    finally:
        reader.disconnect()


def _read_keys(path: Path) -> tuple[int, ...]:
    """A keys file: one 12-hex-digit key a line; blank lines and '#' comments ignored. CliError names a bad line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"{path}: cannot read the keys file ({err})") from err
    keys = []
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        if len(text) != 12 or any(c not in "0123456789abcdefABCDEF" for c in text):
            raise CliError(f"{path}:{number}: a key is 12 hex digits, not {text[:40]!r}")
        keys.append(int(text, 16))
    return tuple(keys)


def _finish(result: Autopwn, out: Path) -> int:
    """Print the table and the stages; write the dump and the keys; exit 0 when every key fell."""
    print(result.table())
    for stage in result.stages:
        print(f"  {stage.name}: {stage.outcome} ({stage.seconds:.1f} s): {stage.why}")
    name = f"m1-{result.uid.hex().upper()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.mfd").write_bytes(result.dump())
        (out / f"{name}.json").write_text(json.dumps(result.to_json(), indent=1) + "\n")
        (out / f"{name}-keys.dic").write_text(result.key_file())
    except OSError as err:
        raise CliError(f"{out}: cannot write the dump ({err.strerror})") from err
    print(f"dump {out / name}.mfd, {out / name}.json; keys {out / name}-keys.dic")
    return 0 if not result.missing else 1
