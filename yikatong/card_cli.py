"""``yikatong card ...``: issue card images, show them like a reader app, serve them to pcscd via vpcd."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

from cardsim import vpcd
from cardsim.apdu import split_response
from cardsim.crypto import Algorithm
from cardsim.image import CardImageError, load_purse, save_purse
from cardsim.keys import IssuerKeyStore, KeyFileError
from cardsim.personalise import CARD_CLASSES, DEFAULT_MAX_BALANCE, CardRequest, IssueError, issue_cpu_card
from cardsim.purse import PurseCard
from terminals.flows import TransactionError
from terminals.inspect import TXN_TYPES, read_card_info, yuan
from terminals.reader import InProcessReader
from yikatong.errors import CliError

CITY_NAMES = {"4510": "Jinan 济南", "4560": "Yantai 烟台", "4530": "Zibo 淄博"}


def register(groups: Any) -> None:
    """Add the ``card`` command group."""
    card = groups.add_parser(
        "card", help="issue, show and serve simulated cards", description="Issue, show and serve simulated cards."
    )
    sub = card.add_subparsers(dest="card_command", metavar="SUBCOMMAND", required=True)

    issue = sub.add_parser(
        "issue",
        help="personalise a new CPU purse card and save its image",
        description="Personalise a CPU purse card: lay out its files and diversify its keys from the issuer "
        "master keys, then save the whole card state as a JSON image.",
        epilog="Example: yikatong card issue --city 4510 --alg sm4 --balance 5000 --out card.json",
    )
    issue.add_argument("--city", required=True, help="issuer city code (4510 Jinan, 4560 Yantai, 4530 Zibo)")
    issue.add_argument("--alg", required=True, choices=[a.value for a in Algorithm], help="purse algorithm")
    issue.add_argument("--balance", required=True, type=_fen, help="opening balance in fen (分)")
    issue.add_argument("--out", required=True, type=Path, help="card image file to write")
    issue.add_argument("--sequence", type=_sequence, help="12-digit card number within the city (default: random)")
    issue.add_argument(
        "--keys", type=Path, help="issuer master key file (default: the published TEST keys in fixtures)"
    )
    issue.add_argument("--key-version", type=int, default=1, help="master key version (default 1)")
    issue.add_argument(
        "--class",
        dest="card_class",
        type=int,
        default=1,
        choices=sorted(CARD_CLASSES),
        help="card class: " + ", ".join(f"{k} {v}" for k, v in CARD_CLASSES.items()),
    )
    issue.add_argument("--holder", default="", help="holder name (stored in SFI 0x16)")
    issue.add_argument("--start", type=_date, help="start date YYYY-MM-DD (default: today)")
    issue.add_argument("--expiry", type=_date, help="expiry date YYYY-MM-DD (default: start + 10 years)")
    issue.add_argument(
        "--max-balance",
        type=_fen,
        default=DEFAULT_MAX_BALANCE,
        help=f"purse limit in fen (default {DEFAULT_MAX_BALANCE})",
    )
    issue.add_argument("--local-only", action="store_true", help="not interoperable across cities")
    issue.add_argument("--force", action="store_true", help="overwrite an existing image")
    issue.set_defaults(run=_issue)

    show = sub.add_parser(
        "show",
        help="read a card image like a reader app (balance, serial, last transactions)",
        description="Read a card image over APDUs, as a reader app would, and print it.",
    )
    show.add_argument("image", type=Path, help="card image file")
    show.set_defaults(run=_show)

    serve = sub.add_parser(
        "serve",
        help="serve a card image to pcscd through the vpcd virtual reader",
        description="Insert the card into the vsmartcard vpcd virtual reader ('Virtual PCD 00 00'), so any "
        "PC/SC software sees it. Keeps serving across power cycles and pcscd restarts, saves the image after "
        "every change the card commits, and stops cleanly on Ctrl-C.",
    )
    serve.add_argument("image", type=Path, help="card image file (updated in place)")
    serve.add_argument("--host", default=vpcd.DEFAULT_HOST, help="vpcd host (default %(default)s)")
    serve.add_argument(
        "--port",
        type=int,
        default=vpcd.DEFAULT_PORT,
        help="vpcd port (default %(default)s = 'Virtual PCD 00 00'; 35964 is slot 01)",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="print every APDU exchanged")
    serve.set_defaults(run=_serve)


# --- argument types ------------------------------------------------------------------------------


def _fen(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of fen") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _sequence(text: str) -> int:
    if not (text.isdigit() and len(text) <= 12):
        raise argparse.ArgumentTypeError("must be at most 12 decimal digits")
    return int(text)


def _date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None


# --- commands ------------------------------------------------------------------------------------


def _load_keys(path: Path | None) -> IssuerKeyStore:
    try:
        return IssuerKeyStore.load(path) if path else IssuerKeyStore.test_set()
    except KeyFileError as err:
        raise CliError(str(err)) from err


def _issue(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; use --force to overwrite it")
    if not out.parent.is_dir():
        raise CliError(f"{out.parent} is not a directory")
    keys = _load_keys(args.keys)
    start = args.start or dt.date.today()
    expiry = args.expiry or start.replace(year=start.year + 10)
    sequence = args.sequence if args.sequence is not None else secrets.randbelow(10**12)
    req = CardRequest(
        city=args.city,
        algorithm=Algorithm(args.alg),
        balance=args.balance,
        sequence=sequence,
        start=start,
        expiry=expiry,
        key_version=args.key_version,
        card_class=args.card_class,
        holder=args.holder,
        interoperable=not args.local_only,
        max_balance=args.max_balance,
    )
    try:
        state = issue_cpu_card(keys, req)
    except IssueError as err:
        raise CliError(str(err)) from err
    save_purse(out, state)
    note = " with the published TEST keys" if keys.test_keys else ""
    print(
        f"issued {args.alg.upper()} card {state.public.application_serial.hex().upper()} "
        f"({CITY_NAMES.get(args.city, args.city)}), balance {yuan(args.balance)} yuan{note} -> {out}"
    )
    return 0


def _open_card(path: Path) -> PurseCard:
    try:
        return PurseCard(load_purse(path), os.urandom)
    except CardImageError as err:
        raise CliError(str(err)) from err


def _show(args: argparse.Namespace) -> int:
    card = _open_card(args.image)
    reader = InProcessReader(card, str(args.image))
    reader.connect()
    try:
        info = read_card_info(reader)
    except TransactionError as err:
        raise CliError(f"{args.image}: the card does not read as a purse ({err})") from err
    if info.status != "active":
        print(f"{args.image}: application {info.status}; a reader app can read nothing more")
        return 0
    serial = " ".join(info.application_serial[i : i + 4] for i in range(0, 20, 4))
    print(f"Card      {serial}")
    print(f"Issuer    {info.city} {CITY_NAMES.get(info.city, '')}".rstrip())
    print(f"Purse     CPU electronic purse, {card.state.algorithm.value.upper()}")
    print(f"Valid     {info.start} to {info.expiry}")
    print(
        f"Class     {CARD_CLASSES.get(info.card_class, info.card_class)}, "
        f"{'interoperable' if info.interoperable else 'local only'}"
    )
    print(f"Balance   {yuan(info.balance)} yuan ({info.balance} fen)")
    print(f"Trips     {info.trips} in the trip log")
    if not info.log:
        print("No transactions yet.")
        return 0
    print("Last transactions, newest first:")
    print(f"  {'counter':>7}  {'type':<9} {'amount':>9}  {'terminal':<12}  time")
    for e in info.log:
        when = e.when.isoformat(sep=" ") if e.when else "?"
        kind = TXN_TYPES.get(e.txn_type, f"{e.txn_type:02X}")
        sign = "+" if e.txn_type == 0x02 else "-"
        print(f"  {e.counter:>7}  {kind:<9} {sign}{yuan(e.amount):>8}  {e.terminal:<12}  {when}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    path: Path = args.image
    card = _open_card(path)
    saved_at = [card.eeprom.writes]  # every non-volatile change goes through the card's Eeprom

    def after_exchange(c_apdu: bytes, r_apdu: bytes) -> None:
        if args.verbose:
            print(f"  > {c_apdu.hex().upper()}\n  < {r_apdu.hex().upper()}")
        if card.eeprom.writes != saved_at[0]:
            save_purse(path, card.state)
            saved_at[0] = card.eeprom.writes
            _, sw = split_response(r_apdu)
            print(
                f"saved {path}: balance {yuan(card.state.balance)} yuan, "
                f"counters {card.state.offline_counter}/{card.state.online_counter} (SW {sw:04X})"
            )
        sys.stdout.flush()

    print(
        f"serving {card.state.algorithm.value.upper()} card {card.state.public.application_serial.hex().upper()} "
        f"from {path}; Ctrl-C stops"
    )
    sys.stdout.flush()
    # A shell that starts us in the background ignores SIGINT for us; Ctrl-C and kill -INT must still stop.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        vpcd.serve(card, args.host, args.port, after_exchange, say=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        save_purse(path, card.state)
        print(f"stopped; card image saved to {path}")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM stops `card serve` as cleanly as Ctrl-C does."""
    raise KeyboardInterrupt
