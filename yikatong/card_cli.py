"""``yikatong card ...``: issue card images, show them like a reader app, serve them to pcscd via vpcd."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from cardsim import vpcd
from cardsim.crypto import Algorithm
from cardsim.issue_options import CARD_CLASSES, CPU_CHIP_MAKERS, DEFAULT_MAX_BALANCE, M1_CHIP_MAKERS
from cardsim.m1_issue import KeyScheme
from cardsim.mifare import M1State, Profile, parse_value_block
from yikatong.argtypes import Subcommands, city_code, command_group, fen, file_path, hex_number, load_keys
from yikatong.errors import CliError
from yikatong.process import stop_on_sigterm

# each command imports the card and reader layers it uses beyond what its options list
if TYPE_CHECKING:
    from cardsim.keys import IssuerKeyStore
    from cardsim.part3 import Part3Reader
    from cardsim.purse import PurseState

CITY_NAMES = {"4510": "Jinan 济南", "4560": "Yantai 烟台", "4530": "Zibo 淄博"}


def register(groups: Subcommands) -> None:
    """Add the ``card`` command group."""
    sub = command_group(
        groups,
        "card",
        help_text="issue, show and serve simulated cards",
        description="Issue, show and serve simulated cards.",
    )

    issue = sub.add_parser(
        "issue",
        help="personalise a new CPU purse card and save its image",
        description="Personalise a CPU purse card: lay out its files and diversify its keys from the issuer "
        "master keys, then save the whole card state as a JSON image.",
        epilog="Example: yikatong card issue --city 4510 --alg sm4 --balance 5000 --out card.json",
    )
    issue.add_argument(
        "--city", type=city_code, required=True, help="issuer city code (4510 Jinan, 4560 Yantai, 4530 Zibo)"
    )
    issue.add_argument(
        "--tech",
        choices=["cpu", "m1"],
        default="cpu",
        help="cpu: CPU purse (default); m1: legacy MIFARE Classic 1K with Crypto-1",
    )
    issue.add_argument("--alg", choices=[a.value for a in Algorithm], help="purse algorithm (CPU cards; required)")
    issue.add_argument(
        "--profile",
        choices=[p.value for p in Profile],
        default=Profile.GENUINE.value,
        help="M1 chip: genuine (weak PRNG), hardened, static-nonce, gen1a (magic), fm11rf08s "
        "(backdoor key); default %(default)s",
    )
    issue.add_argument(
        "--m1-keys",
        choices=[k.value for k in KeyScheme],
        default=KeyScheme.DIVERSIFIED.value,
        help="M1 sector keys: default (FFFFFFFFFFFF), shared by the fleet, or diversified per UID "
        "(default %(default)s)",
    )
    issue.add_argument(
        "--chip-maker",
        choices=[*CPU_CHIP_MAKERS, *M1_CHIP_MAKERS],
        help="chip maker, as the card shows it to a reader. CPU cards (its ATR's historical bytes): "
        + ", ".join(f"{k} {v}" for k, v in CPU_CHIP_MAKERS.items())
        + " (default: the simulator's own, YIKATONG). M1 cards (block 0): "
        + ", ".join(f"{k} {v}" for k, v in M1_CHIP_MAKERS.items())
        + " (default: the manufacturer data 62..69 of older images)",
    )
    issue.add_argument("--uid", type=_uid, help="M1 UID, 8 hex digits (default: random)")
    issue.add_argument("--balance", required=True, type=fen, help="opening balance in fen (分)")
    issue.add_argument("--out", required=True, type=file_path, help="card image file to write")
    issue.add_argument("--sequence", type=_sequence, help="12-digit card number within the city (default: random)")
    issue.add_argument(
        "--keys", type=file_path, help="issuer master key file (default: the published TEST keys in fixtures)"
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
        type=fen,
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
    show.add_argument("image", type=file_path, help="card image file")
    show.set_defaults(run=_show)

    serve = sub.add_parser(
        "serve",
        help="serve a card image to pcscd through the vpcd virtual reader",
        description="Insert the card into the vsmartcard vpcd virtual reader ('Virtual PCD 00 00'), so any "
        "PC/SC software sees it. Keeps serving across power cycles and pcscd restarts, saves the image after "
        "every change the card commits, and stops cleanly on Ctrl-C.",
    )
    serve.add_argument("image", type=file_path, help="card image file (updated in place)")
    serve.add_argument("--host", default=vpcd.DEFAULT_HOST, help="vpcd host (default %(default)s)")
    serve.add_argument(
        "--port",
        type=int,
        default=vpcd.DEFAULT_PORT,
        help="vpcd port (default %(default)s = 'Virtual PCD 00 00'; 35964 is slot 01)",
    )
    serve.add_argument("-v", "--verbose", action="store_true", help="print every APDU exchanged")
    serve.add_argument(
        "--pn532",
        action="store_true",
        help="M1 cards: serve through an emulated NXP PN532 on a pseudo-terminal instead of vpcd, for libnfc's "
        "tools (prints the LIBNFC_DEFAULT_DEVICE=pn532_uart:/dev/pts/N line to use)",
    )
    serve.set_defaults(run=_serve)


# --- argument types ------------------------------------------------------------------------------


def _sequence(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,12}", text):
        raise argparse.ArgumentTypeError("must be at most 12 decimal digits")
    return int(text)


def _uid(text: str) -> bytes:
    return hex_number(8)(text).to_bytes(4)


def _date(text: str) -> dt.date:
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date YYYY-MM-DD") from None
    if day.year < 1000:  # the card keeps dates as 4 BCD bytes YYYYMMDD: a four-digit year
        raise argparse.ArgumentTypeError(f"{text!r}: a card holds dates from 1000-01-01 to 9999-12-31")
    return day


def _ten_years_after(start: dt.date) -> dt.date:
    """The default expiry: the same day ten years on (28 February for a start on 29 February)."""
    if start.year + 10 > dt.MAXYEAR:
        raise CliError(
            f"--start {start}: ten years later is past 9999-12-31, the last date a card holds; give --expiry"
        )
    return start.replace(year=start.year + 10, day=28 if (start.month, start.day) == (2, 29) else start.day)


# --- commands ------------------------------------------------------------------------------------


def _issue(args: argparse.Namespace) -> int:
    from cardsim.personalise import CardRequest, IssueError, issue_cpu_card
    from terminals.inspect import yuan

    out: Path = args.out
    if out.is_dir():
        raise CliError(f"{out} is a folder; --out names the image file to write")
    if out.exists() and not args.force:
        raise CliError(f"{out} exists; use --force to overwrite it")
    if not out.parent.is_dir():
        raise CliError(f"{out.parent} is not a directory")
    keys = load_keys(args.keys)
    if args.tech == "m1":
        return _issue_m1(args, keys)
    if args.chip_maker is not None and args.chip_maker not in CPU_CHIP_MAKERS:
        raise CliError(
            f"--chip-maker {args.chip_maker} makes M1 chips; a CPU card's is one of {', '.join(CPU_CHIP_MAKERS)}"
        )
    if args.alg is None:
        raise CliError("--alg is required for a CPU card (3des or sm4)")
    start = args.start or dt.date.today()
    expiry = args.expiry or _ten_years_after(start)
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
        chip_maker=args.chip_maker,
    )
    try:
        state = issue_cpu_card(keys, req)
    except IssueError as err:
        raise CliError(str(err)) from err
    _save(out, state)
    note = " with the published TEST keys" if keys.test_keys else ""
    print(
        f"issued {args.alg.upper()} card {state.public.application_serial.hex().upper()} "
        f"({CITY_NAMES.get(args.city, args.city)}), balance {yuan(args.balance)} yuan{note} -> {out}"
    )
    return 0


def _issue_m1(args: argparse.Namespace, keys: IssuerKeyStore) -> int:
    from cardsim.m1_issue import issue_m1_card
    from terminals.inspect import yuan

    if args.chip_maker is not None and args.chip_maker not in M1_CHIP_MAKERS:
        raise CliError(
            f"--chip-maker {args.chip_maker} makes CPU chips; an M1 card's is one of {', '.join(M1_CHIP_MAKERS)}"
        )
    key_set = keys.get(args.city, args.key_version)
    if key_set is None:
        raise CliError(f"no issuer keys for city {args.city} version {args.key_version}")
    uid = args.uid or secrets.token_bytes(4)
    if args.balance >= 2**31:
        raise CliError("an M1 purse holds at most 2147483647 fen")
    state = issue_m1_card(
        uid, Profile(args.profile), KeyScheme(args.m1_keys), args.balance, key_set.purchase, args.city, args.chip_maker
    )
    _save(args.out, state)
    maker = f", {M1_CHIP_MAKERS[args.chip_maker]}" if args.chip_maker else ""
    print(
        f"issued M1 card {uid.hex().upper()} ({args.profile}{maker}, {args.m1_keys} keys), "
        f"balance {yuan(args.balance)} yuan -> {args.out}"
    )
    return 0


def _save(path: Path, state: PurseState | M1State) -> None:
    from cardsim.image import save_card

    try:
        save_card(path, state)
    except OSError as err:
        raise CliError(f"cannot write {path}: {err.strerror}") from err


def load_image(path: Path) -> PurseState | M1State:
    """A CPU or M1 card image; CliError (exit 2) naming the file and field when it is unusable."""
    from cardsim.image import CardImageError, load_card

    try:
        return load_card(path)
    except CardImageError as err:
        raise CliError(str(err)) from err


def part3_reader(state: M1State) -> Part3Reader:
    """An ACR122U-like contactless reader (PC/SC Part 3 pseudo-APDUs) holding the M1 card ``state``."""
    from cardsim.mifare import M1Card
    from cardsim.part3 import Part3Reader
    from terminals.m1 import M1Error, M1Reader

    return Part3Reader(M1Card(state, os.urandom), lambda c: M1Reader(c, int.from_bytes(c.anticollision()[0])), M1Error)


def _serve_pn532(path: Path, state: object) -> int:
    """Serve an M1 image through the emulated PN532 on a pty until Ctrl-C."""
    from yikatong.pn532_serve import serve_pn532

    if not isinstance(state, M1State):
        raise CliError(f"{path} is a CPU card: the PN532 emulator carries M1 cards only (serve it without --pn532)")
    stop_on_sigterm()
    try:
        serve_pn532(path, say=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        print(f"stopped; card image saved to {path}")
    return 0


def _serve_m1(args: argparse.Namespace, state: M1State) -> int:
    """Serve an M1 image behind a virtual contactless reader; save the image whenever a block changes."""
    path: Path = args.image
    reader = part3_reader(state)
    saved = list(state.blocks)

    def after_exchange(c_apdu: bytes, r_apdu: bytes) -> None:
        if args.verbose:
            print(f"  > {c_apdu.hex().upper()}\n  < {r_apdu.hex().upper()}")
        if state.blocks != saved:
            changed = [i for i in range(len(saved)) if state.blocks[i] != saved[i]]
            _save(path, state)
            saved[:] = state.blocks
            print(f"saved {path}: block(s) {', '.join(map(str, changed))} written")
        sys.stdout.flush()

    print(f"serving M1 card {state.blocks[0][0:4].hex().upper()} ({state.profile.value}) from {path}; Ctrl-C stops")
    sys.stdout.flush()
    stop_on_sigterm()
    try:
        vpcd.serve(reader, args.host, args.port, after_exchange, say=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        _save(path, state)
        print(f"stopped; card image saved to {path}")
    return 0


def _show_m1(path: Path, state: M1State) -> int:
    from audit.chip_makers import m1_maker
    from terminals.inspect import yuan

    uid, sak, atqa = state.blocks[0][0:4], state.blocks[0][5], state.blocks[0][6:8]
    print(f"Card      M1 (MIFARE Classic 1K) UID {uid.hex().upper()}, SAK {sak:02X}, ATQA {atqa.hex().upper()}")
    print(f"Chip      {state.profile.value}")
    maker = m1_maker(state.blocks[0], sak, atqa)
    print(f"Maker     {maker.label}{f' ({maker.country})' if maker.known else ''}: {maker.evidence}")
    purse = parse_value_block(state.blocks[4])
    print(f"Balance   {yuan(purse[0]) + ' yuan' if purse else 'value block corrupted'}")
    record = state.blocks[6]
    if any(record):
        stamp = "20" + record[2:8].hex()
        when = f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]} {stamp[8:10]}:{stamp[10:12]}:{stamp[12:14]}"
        print(
            f"Last      #{int.from_bytes(record[0:2])} {when} terminal {record[8:14].hex().upper()} "
            f"amount {yuan(int.from_bytes(record[14:16]))} yuan"
        )
    return 0


def _show(args: argparse.Namespace) -> int:
    from cardsim.purse import PurseCard
    from terminals.flows import TransactionError
    from terminals.inspect import TXN_TYPES, read_card_info, yuan
    from terminals.reader import InProcessReader

    state = load_image(args.image)
    if isinstance(state, M1State):
        return _show_m1(args.image, state)
    card = PurseCard(state, os.urandom)
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
    from cardsim.apdu import split_response
    from cardsim.image import save_purse
    from cardsim.purse import PurseCard
    from terminals.inspect import yuan

    path: Path = args.image
    state = load_image(path)
    if args.pn532:
        return _serve_pn532(path, state)
    if isinstance(state, M1State):
        return _serve_m1(args, state)
    card = PurseCard(state, os.urandom)
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
    stop_on_sigterm()
    try:
        vpcd.serve(card, args.host, args.port, after_exchange, say=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        save_purse(path, card.state)
        print(f"stopped; card image saved to {path}")
    return 0
