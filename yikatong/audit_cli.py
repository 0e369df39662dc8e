"""``yikatong audit ...``: the chip audit of a fleet (``chips``), the reconciliation of the cities' ledgers
(``reconcile``), and the Crypto-1 key recovery tools (proxmark-style names)."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from cardsim.issue_options import DEFAULT_MAX_BALANCE
from yikatong import autopwn_cli, reconcile_cli
from yikatong.argtypes import Subcommands, command_group, fen, file_path, hex_number, positive, seconds
from yikatong.audit_output import add_report_options, finish
from yikatong.errors import CliError

# each command imports the audit, card and terminal layers it uses: --help and mfkey32 start without them
if TYPE_CHECKING:
    from audit.chips import ChipAudit
    from audit.cpu_audit import KeySource
    from audit.fleet import Fleet
    from audit.m1_audit import KeyRecovery

_hex32 = hex_number(8)


def _words(parser: argparse.ArgumentParser, *words: tuple[str, str]) -> None:
    """Positional 32-bit words of a sniffed authentication, in the order the attack takes them."""
    for name, what in words:
        parser.add_argument(name.lower(), metavar=name, type=_hex32, help=f"{what}, 8 hex digits")


_hex48 = hex_number(12)


def register(groups: Subcommands) -> None:
    """Add the ``audit`` command group."""
    sub = command_group(
        groups,
        "audit",
        help_text="chip audit of a card fleet, reconciliation of the cities' ledgers, Crypto-1 key recovery",
        description="Security review tools. 'chips' and 'reconcile' write a JSON and an HTML report and exit 1 "
        "when a finding at or above --fail-on exists (0 otherwise, 2 on bad usage).",
    )
    _register_chips(sub)
    reconcile_cli.register(sub)
    autopwn_cli.register(sub)

    m64 = sub.add_parser(
        "mfkey64",
        help="recover a MIFARE Classic key from one sniffed authentication",
        description="Recover the sector key from one complete authentication sniffed between reader and tag: "
        "the tag nonce and the encrypted reader nonce, reader answer and tag answer. Prints the 12-hex-digit key.",
        epilog="Example: yikatong audit mfkey64 9C599B32 82A4166C A1E458CE 6EEA41E0 5CADF439",
    )
    _words(
        m64,
        ("UID", "card UID"),
        ("NT", "tag nonce nT"),
        ("NR", "encrypted reader nonce {nR}"),
        ("AR", "encrypted reader answer {aR}"),
        ("AT", "encrypted tag answer {aT}"),
    )
    m64.set_defaults(run=_mfkey64)

    m32 = sub.add_parser(
        "mfkey32",
        help="recover a MIFARE Classic key from two reader authentication attempts",
        description="Recover the key a reader used from two of its authentication attempts against an "
        "emulated tag (same or different tag nonces): nT, {nR}, {aR} of each. Prints the 12-hex-digit key.",
    )
    _words(
        m32,
        ("UID", "card UID"),
        ("NT0", "first tag nonce"),
        ("NR0", "first encrypted {nR}"),
        ("AR0", "first encrypted {aR}"),
        ("NT1", "second tag nonce"),
        ("NR1", "second encrypted {nR}"),
        ("AR1", "second encrypted {aR}"),
    )
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


def _register_nested(sub: Subcommands) -> None:
    nested = sub.add_parser(
        "nested",
        help="recover other sector keys of an M1 card (an image, or a card on a PN532) from one known key",
        description="Nested attack through the card's radio interface: authenticate with a known sector key, "
        "request a nested authentication to the target sector, predict its nonce (weak PRNG), filter by the "
        "leaked parity bits and invert Crypto-1. Prints the 12-hex-digit target key. It needs raw frames: a "
        "simulated card (IMAGE) or a PN532 board (--pn532); a PC/SC Part 3 reader cannot do it.",
        epilog="Examples:\n  yikatong audit nested m1.json --known-block 3 --known-key FFFFFFFFFFFF --target-block 7\n"
        "  yikatong audit nested --pn532 /dev/ttyUSB0 --known-block 3 --known-key FFFFFFFFFFFF --target-block 7",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    nested.add_argument("image", nargs="?", type=file_path, help="M1 card image (or --pn532)")
    nested.add_argument("--pn532", metavar="DEVICE", help="attack the card on a PN532 board (serial device)")
    nested.add_argument(
        "--card-wait", type=seconds, default=10.0, help="--pn532: seconds to wait for a card on the board (default 10)"
    )
    nested.add_argument("--known-block", type=_block, required=True, help="a block of the sector with the known key")
    nested.add_argument("--known-key", type=_hex48, required=True, help="that sector's key, 12 hex digits")
    nested.add_argument("--known-type", type=_key_type, default=0x60, help="A or B (default A)")
    nested.add_argument("--target-block", type=_block, required=True, help="a block of the target sector")
    nested.add_argument("--target-type", type=_key_type, default=0x60, help="A or B (default A)")
    nested.set_defaults(run=_nested)


def _nested(args: argparse.Namespace) -> int:
    from audit.m1_attacks import AttackFailed, nested_attack
    from cardsim.mifare import M1Card, M1State
    from terminals.m1 import M1Error, M1Gone
    from yikatong.card_cli import load_image
    from yikatong.devices import pn532_with_card

    if (args.image is None) == (args.pn532 is None):
        raise CliError("give the card: an M1 image, or --pn532 DEVICE (not both)")
    known, target = (args.known_block, args.known_key, args.known_type), (args.target_block, args.target_type)
    failures = (AttackFailed, M1Error, M1Gone)
    if args.pn532 is not None:
        with pn532_with_card(args.pn532, args.card_wait) as link:
            uid = int.from_bytes(link.anticollision()[0])
            return _report(lambda: nested_attack(link, uid, known, target), failures, "nested attack failed")
    state = load_image(args.image)
    if not isinstance(state, M1State):
        raise CliError(f"{args.image} is a CPU card; the nested attack is for MIFARE Classic")
    card = M1Card(state, os.urandom)
    return _report(lambda: nested_attack(card, state.uid, known, target), failures, "nested attack failed")


def _chips_on_pn532(args: argparse.Namespace) -> int:
    """M1 cards on a PN532 board, one by one, with every M1 check (raw frames)."""
    from audit.m1_attacks import AttackFailed
    from audit.m1_audit import audit_m1
    from terminals.m1 import M1Error, M1Gone
    from yikatong.devices import Pn532Board

    def audit_card(name: str, audit: ChipAudit) -> None:
        try:
            result = audit_m1(
                board.link,
                recover_all=args.recover == "all",
                recovery=_recovery(args, audit.recovered_keys()),
                progress=_progress,
            )
            audit.add_m1(name, result)
        except (M1Error, M1Gone, AttackFailed) as err:
            audit.failed.append(f"{name}: not audited: {err}")

    with Pn532Board(args.pn532) as board:
        return _chips_at(args, board, f"PN532 board {args.pn532} (raw frames)", audit_card)


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
    from audit.mfkey import NoKeyFound, mfkey64

    return _report(lambda: mfkey64(args.uid, args.nt, args.nr, args.ar, args.at), (NoKeyFound,), _NOT_ONE_KEY)


def _mfkey32(args: argparse.Namespace) -> int:
    from audit.mfkey import NoKeyFound, mfkey32

    values = (args.uid, args.nt0, args.nr0, args.ar0, args.nt1, args.nr1, args.ar1)
    return _report(lambda: mfkey32(*values), (NoKeyFound,), _NOT_ONE_KEY)


def _register_chips(sub: Subcommands) -> None:
    chips = sub.add_parser(
        "chips",
        help="audit a fleet of cards (images, a generated fleet, or cards on a PC/SC reader)",
        description=textwrap.fill(
            "Run every applicable check of the audit catalogue (spec audit.md) through each card's own "
            "interface: APDUs for CPU purse cards, radio frames and Crypto-1 authentications for MIFARE Classic "
            "cards. Without --active only probes that change nothing on the card run (among them INITIALIZE FOR LOAD "
            "past --max-balance and past the 4-byte balance, with no CREDIT after it). With --active the audit also "
            "sends a DEBIT with a wrong MAC1, rewrites the card class and expiry without a MAC (and puts them back), "
            "replays a DEBIT, makes small purchases to watch the counter, loads with a wrong MAC2, replays a CREDIT, "
            "tries an overdraft, fuzzes the card with malformed APDUs and finally sends wrong MACs until the card "
            "locks: each card that refuses the overdraft moves a few fen and ends LOCKED. A card with the overdraft "
            "flaw takes the overdraft DEBIT of balance + 1 fen and is left holding a wrapped balance of about 4.29 "
            "billion fen: on a card image that is the audit's copy; through --reader it is the card itself (locked "
            "afterwards, if its lockout works). Cutting power mid-DEBIT and judging the whole state (tearing) also "
            "needs a reader that can cut power: simulated cards (--cards, --fleet) have one; --reader has not, so that "
            "probe is skipped there. Card images are audited on a copy; files are never changed.",
            width=100,
        ),
        epilog="Examples:\n  yikatong audit chips --fleet fixtures/fleets/planted.json --active\n"
        "  yikatong audit chips --cards cards/ --keys issuer-keys.json --fail-on critical\n"
        "  yikatong audit chips --reader 'Virtual PCD 00 00' --count 1\n"
        "  yikatong audit chips --pn532 /dev/ttyUSB0 --count 1 --recover all",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = chips.add_mutually_exclusive_group(required=True)
    source.add_argument("--cards", type=file_path, metavar="DIR", help="folder of card images (*.json)")
    source.add_argument(
        "--fleet",
        type=file_path,
        metavar="FILE",
        help="fleet file (yikatong.fleet/1) describing a mixed fleet to generate",
    )
    source.add_argument(
        "--reader",
        metavar="NAME",
        help="PC/SC reader: audit cards one by one as they are presented (CPU cards; M1 cards through a Part 3 "
        "reader get the checks it permits: no raw frames, so no PRNG, backdoor or nested checks)",
    )
    source.add_argument(
        "--pn532",
        metavar="DEVICE",
        help="PN532 board on a serial port: audit M1 cards one by one as they are presented, with every M1 check "
        "(raw frames: PRNG class, backdoors, nested key recovery)",
    )
    chips.add_argument(
        "--active", action="store_true", help="also run probes that spend money and lock the card (see above)"
    )
    chips.add_argument(
        "--max-balance",
        type=fen,
        default=DEFAULT_MAX_BALANCE,
        metavar="FEN",
        help="the issuer's published maximum balance of its CPU cards (a card does not tell its own); a card that "
        "accepts a load past it is CPU-LOAD-ABOVE-MAX (default %(default)s)",
    )
    chips.add_argument(
        "--keys",
        type=file_path,
        help="the issuer's master key file, to tell diversified keys from master keys and to make the purchases "
        "of the active probes (default: the key file a --fleet names; the published test keys are always tried)",
    )
    chips.add_argument(
        "--recover",
        choices=["purse", "all"],
        default="purse",
        help="M1 nested attack targets: the purse sector's keys (default) or every sector (about 0.3 s a key)",
    )
    chips.add_argument(
        "--recover-keys",
        action="store_true",
        help="run the whole M1 key-recovery chain on each M1 card (as 'audit autopwn': dictionary, backdoor, "
        "darkside, nested, static nested, hardnested; keys broken on one card are tried on the next); the report "
        "shows the keys recovered per card, the attack that got them and the time",
    )
    chips.add_argument(
        "--max-seconds",
        type=seconds,
        help="--recover-keys: time budget per M1 card; keys found before it runs out are kept (default: none)",
    )
    chips.add_argument(
        "--count", type=positive, help="--reader/--pn532: stop after this many cards (default: until Ctrl-C)"
    )
    chips.add_argument(
        "--wait",
        type=positive,
        default=60,
        help="--reader/--pn532: seconds to wait for each card (default %(default)s)",
    )
    add_report_options(chips, "chips")
    chips.set_defaults(run=_chips)


def _recovery(args: argparse.Namespace, fleet_keys: tuple[int, ...]) -> KeyRecovery | None:
    """--recover-keys: the chain's settings (None without it)."""
    from audit.m1_audit import KeyRecovery

    if not args.recover_keys:
        if args.max_seconds is not None:
            raise CliError("--max-seconds is the budget of --recover-keys: give both")
        return None
    return KeyRecovery(max_seconds=args.max_seconds, fleet_keys=fleet_keys)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _key_sources(args: argparse.Namespace, fleet: Fleet | None) -> list[KeySource]:
    from audit.cpu_audit import KeySource
    from cardsim.keys import IssuerKeyStore, KeyFileError

    sources = [KeySource("published test keys", IssuerKeyStore.test_set(), True)]
    issuer = fleet.issuer_keys if fleet is not None else None
    if args.keys is not None:
        try:
            issuer = IssuerKeyStore.load(args.keys)
        except KeyFileError as err:
            raise CliError(str(err)) from err
    if issuer is not None:
        sources.append(KeySource("issuer keys", issuer, issuer.test_keys))
    return sources


def _chips(args: argparse.Namespace) -> int:
    from audit.chips import audit_fleet
    from audit.fleet import FleetError, generate_fleet, load_image_folder

    _recovery(args, ())  # a misused --max-seconds is refused before any card is touched

    if args.reader is not None:
        return _chips_on_reader(args)
    if args.pn532 is not None:
        return _chips_on_pn532(args)
    try:
        fleet = load_image_folder(args.cards) if args.cards is not None else generate_fleet(args.fleet)
    except FleetError as err:
        raise CliError(str(err)) from err
    sources = _key_sources(args, fleet)
    print(f"auditing {len(fleet.cards)} cards from {fleet.source}", file=sys.stderr)
    report = audit_fleet(
        fleet.cards,
        sources,
        [fleet.source],
        active=args.active,
        recover_all=args.recover == "all",
        recovery=_recovery(args, ()),
        progress=_progress,
        issuer_max=args.max_balance,
    )
    return finish(report, args)


class _Station(Protocol):
    """A reader the audit takes cards from, one at a time."""

    name: str

    def wait_for_card(self, timeout: float) -> object:
        """Until a card is in the field; TimeoutError after ``timeout`` s."""
        ...

    def wait_for_removal(self, timeout: float) -> bool:
        """Until the card has left the field (False after ``timeout`` s)."""
        ...


def _chips_at(
    args: argparse.Namespace, station: _Station, where: str, audit_card: Callable[[str, ChipAudit], None]
) -> int:
    """Audit the cards presented at ``station`` one by one (``audit_card`` audits the one in the field), until
    --count cards, a --wait with no card, Ctrl-C or a failure of the station (M1Gone: a PN532 board that stops
    answering); then write the report (input ``where``) of the cards audited so far."""
    from audit.chips import ChipAudit, build_report
    from terminals.m1 import M1Gone

    audit = ChipAudit()
    audited = 0
    try:
        while args.count is None or audited < args.count:
            _progress(f"present card {audited + 1} on {station.name} (Ctrl-C to finish and write the report)")
            try:
                station.wait_for_card(args.wait)
            except TimeoutError as err:
                if audited == 0:
                    raise CliError(str(err)) from err
                break
            audited += 1
            audit_card(f"card {audited} on {station.name}", audit)
            if args.count is None or audited < args.count:
                _progress("remove the card")
                station.wait_for_removal(args.wait)
    except KeyboardInterrupt:
        _progress("stopped: writing the report of the cards audited so far")
    except M1Gone as err:
        if audited == 0:
            raise CliError(f"{station.name}: {err}") from err
        audit.failed.append(f"{station.name} failed after {audited} card(s), the audit stopped there: {err}")
        _progress(f"stopped: {station.name} failed ({err}); writing the report of the cards audited so far")
    report = build_report(audit, [where], active=args.active, progress=_progress)
    return finish(report, args)


def _chips_on_reader(args: argparse.Namespace) -> int:
    """CPU purse cards, and M1 cards through a PC/SC Part 3 reader (the checks it permits), one by one."""
    from audit.cpu_audit import audit_cpu
    from audit.m1_audit import audit_m1_blocks
    from terminals.flows import TransactionError
    from terminals.m1 import M1Error, M1Gone
    from terminals.part3 import CLASSIC_1K, Part3Slot, storage_card_name
    from terminals.pcsc import PcscReader, ReaderNotFound  # pyscard needs pcscd; only this path uses it
    from terminals.reader import CardGone

    try:
        reader = PcscReader(args.reader)
    except ReaderNotFound as err:
        raise CliError(str(err)) from err
    sources = _key_sources(args, None)
    where = f"PC/SC reader {reader.name}"

    def audit_card(name: str, audit: ChipAudit) -> None:
        try:
            atr = reader.connect()
            card_name = storage_card_name(atr)
            if card_name is None:
                result = audit_cpu(reader, sources, active=args.active, issuer_max=args.max_balance, progress=_progress)
                audit.add_cpu(name, result)
            elif card_name == CLASSIC_1K:
                identity = f"ATR {atr.hex().upper()}: PC/SC Part 3, {card_name}"
                audit.add_m1(name, audit_m1_blocks(Part3Slot(reader), where, identity, progress=_progress))
            else:
                audit.failed.append(f"{name}: not audited: a {card_name} (only CPU purse cards and MIFARE Classic 1K)")
        except (TransactionError, CardGone, M1Error, M1Gone) as err:
            audit.failed.append(f"{name}: not audited: {err}")
        finally:
            reader.disconnect()

    return _chips_at(args, reader, where, audit_card)
