"""``yikatong terminal ...``: run a terminal on a PC/SC reader or a PN532 board, do one tap for scripts, drain or
inspect a terminal's outbox."""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cardsim.issue_options import DEFAULT_MAX_BALANCE
from terminals.kinds import TerminalKind
from terminals.limits import MAX_FEN
from yikatong.argtypes import (
    Subcommands,
    broker_options,
    city_code,
    command_group,
    fen,
    fen_amount,
    file_path,
    hex_number,
    load_keys,
    positive,
    seconds,
)
from yikatong.devices import Pn532Board, pn532_with_card
from yikatong.errors import CliError
from yikatong.process import setup_logging, stop_on_sigterm

# each command imports the terminal, card, MQTT and PC/SC layers when it runs: --help starts without them
if TYPE_CHECKING:
    from terminals.mqtt import BrokerUrl
    from terminals.outbox import Outbox
    from terminals.pcsc import PcscReader
    from terminals.terminal import TapResult, Terminal

log = logging.getLogger("yikatong.terminal")


def register(groups: Subcommands) -> None:
    """Add the ``terminal`` command group."""
    sub = command_group(
        groups,
        "terminal",
        help_text="run a terminal (bus, metro gate, top-up) on a PC/SC reader or a PN532 board, or tap once",
        description="A terminal charges (or tops up) the cards presented to it, keeps every record in a durable "
        "outbox and publishes it to the clearing over MQTT until the clearing acks it.",
    )

    run = sub.add_parser(
        "run",
        help="wait for cards on a PC/SC reader or a PN532 board and charge each one; one line per card",
        description="Run a terminal until Ctrl-C on a PC/SC reader (--reader: a CPU card, or an M1 card on a "
        "contactless PC/SC Part 3 reader such as an ACR122U, told apart by the ATR) or on a PN532 board on a serial "
        "port (--pn532, M1 cards): wait for a card, do the transaction, print one line, wait for the card to leave "
        "the field. Records go to the outbox first and then to the broker.",
        epilog='Example: yikatong terminal run --reader "Virtual PCD 00 00" --city 4560 --kind bus --fare 200 '
        "--broker mqtt://127.0.0.1:1883",
    )
    station = run.add_mutually_exclusive_group(required=True)
    station.add_argument("--reader", help="PC/SC reader name, or a unique prefix of it (CPU cards; M1 on Part 3)")
    station.add_argument("--pn532", metavar="DEVICE", help="serial device of a PN532 board, e.g. /dev/ttyUSB0")
    _terminal_options(run)
    run.add_argument("--count", type=positive, help="stop after this many cards (default: run until Ctrl-C)")
    run.set_defaults(run=_run)

    tap = sub.add_parser(
        "tap",
        help="do one transaction and exit (0 done, 1 refused or failed)",
        description="Do one transaction with the card on a PC/SC reader (--reader: a CPU card, or an M1 card on a "
        "contactless PC/SC Part 3 reader), on a PN532 board on a serial port (--pn532, M1 cards), or with a card "
        "image file (--card, CPU or M1, updated in place), print one line "
        "and exit: 0 when the card was charged or loaded, "
        "1 when it was refused or the tap failed. With --broker every issuer's retained hotlist is taken first "
        "(at most --hotlist-wait seconds) and the outbox is published before exiting.",
        epilog="Example: yikatong terminal tap --card card.json --city 4510 --kind bus --fare 200",
    )
    source = tap.add_mutually_exclusive_group(required=True)
    source.add_argument("--reader", help="PC/SC reader name, or a unique prefix of it (CPU cards; M1 on Part 3)")
    source.add_argument("--card", type=file_path, help="card image file (yikatong card issue)")
    source.add_argument("--pn532", metavar="DEVICE", help="serial device of a PN532 board, e.g. /dev/ttyUSB0")
    _terminal_options(tap)
    tap.add_argument(
        "--card-wait", type=seconds, default=10.0, help="seconds to wait for a card on the reader or board (default 10)"
    )
    tap.add_argument(
        "--ack-wait",
        type=seconds,
        default=0.0,
        help="with --broker: also wait this long for the clearing's ack (default 0: the broker's PUBACK)",
    )
    tap.add_argument(
        "--hotlist-wait",
        type=seconds,
        default=3.0,
        help="with --broker: wait at most this long for the issuers' hotlists before tapping (default 3; 0: do not)",
    )
    tap.set_defaults(run=_tap)

    sync = sub.add_parser(
        "sync",
        help="publish a terminal's outbox and wait until the clearing has acked it",
        description="Publish every record left in a terminal's outbox (e.g. after it ran offline) and wait for "
        "the clearing's acks. Records the broker refused (MQTT 5 PUBACK reason code, e.g. 135 not authorized) stay "
        "in the outbox unsent until --retry-refused. Exit 0 when the outbox is empty, 1 if records remain after "
        "--timeout or the broker refused some.",
    )
    sync.add_argument("--state", type=file_path, required=True, help="the terminal's state file")
    sync.add_argument(
        "--retry-refused",
        action="store_true",
        help="send the records the broker refused again (once its ACL or the terminal's certificate is fixed)",
    )
    broker_options(sync, required=True)
    sync.add_argument("--timeout", type=seconds, default=60.0, help="give up after this many seconds (default 60)")
    sync.add_argument("--keys", type=file_path, help="issuer key file (default: the published TEST keys)")
    sync.set_defaults(run=_sync)

    status = sub.add_parser(
        "status",
        help="show what a terminal's state file holds (outbox, interrupted payments, rejects, hotlist)",
        description="Show a terminal's identity and what waits in its state file.",
    )
    status.add_argument("--state", type=file_path, required=True, help="the terminal's state file")
    status.set_defaults(run=_status)


def _terminal_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--city", type=city_code, required=True, help="city of the terminal (4510, 4560, 4530)")
    parser.add_argument(
        "--kind",
        type=TerminalKind,
        required=True,
        choices=list(TerminalKind),
        metavar="{bus,metro-entry,metro-exit,topup}",
    )
    parser.add_argument("--fare", type=fen_amount, help=f"bus fare in fen, 1 to {MAX_FEN} (bus terminals)")
    parser.add_argument("--amount", type=fen_amount, help=f"top-up amount in fen, 1 to {MAX_FEN} (topup terminals)")
    parser.add_argument(
        "--max-balance",
        type=fen,
        help=f"the issuer's maximum balance in fen: the issuer host authorises no load past it, whatever the card "
        f"would take (default {DEFAULT_MAX_BALANCE}; topup terminals)",
    )
    parser.add_argument("--line", help="metro line of the gate, e.g. M1 (metro gates)")
    parser.add_argument("--station", help="metro station of the gate, e.g. A03 (metro gates)")
    parser.add_argument(
        "--terminal",
        type=hex_number(12),
        help="12-hex-digit terminal number (default: the one in the state file, else new: city + random)",
    )
    parser.add_argument(
        "--state", type=file_path, help="terminal state file (outbox; default terminal-CITY-KIND.sqlite in this folder)"
    )
    broker_options(parser, default_help=" (default: offline)")
    parser.add_argument("--fares", type=file_path, help="metro fare table (default: the one in fixtures)")
    parser.add_argument(
        "--keys", type=file_path, help="issuer key file for the PSAM (default: the published TEST keys)"
    )


def _open_outbox(path: Path) -> Outbox:
    from terminals.outbox import Outbox, OutboxError

    try:
        return Outbox(path)
    except OutboxError as err:
        raise CliError(str(err)) from err


def _build_terminal(args: argparse.Namespace) -> Terminal:
    """A terminal from the command line; CliError for every missing or contradictory option."""
    from cardsim.issuer import IssuerHost
    from terminals.metro import FareTable, FareTableError
    from terminals.outbox import OutboxError
    from terminals.terminal import Terminal, TerminalConfig

    kind: TerminalKind = args.kind
    if kind is TerminalKind.BUS and args.fare is None:
        raise CliError("a bus terminal needs --fare (fen)")
    if kind is TerminalKind.TOPUP and args.amount is None:
        raise CliError("a topup terminal needs --amount (fen)")
    if kind in (TerminalKind.METRO_ENTRY, TerminalKind.METRO_EXIT) and not (args.line and args.station):
        raise CliError(f"a {kind.value} gate needs --line and --station (the fare comes from the fare table)")
    if args.fare is not None and kind is not TerminalKind.BUS:
        raise CliError(f"--fare is for bus terminals; a {kind.value} terminal does not take it")
    for given, option in ((args.amount, "--amount"), (args.max_balance, "--max-balance")):
        if given is not None and kind is not TerminalKind.TOPUP:
            raise CliError(f"{option} is for topup terminals; a {kind.value} terminal does not take it")
    state: Path = args.state or Path(f"terminal-{args.city}-{kind.value}.sqlite")
    outbox = _open_outbox(state)
    stored = outbox.get_meta("terminal")
    if args.terminal is not None:
        number = f"{args.terminal:012X}"
    elif stored is not None:
        number = stored
    else:
        number = args.city + secrets.token_hex(4).upper()
    amount = args.fare if kind is TerminalKind.BUS else (args.amount or 0)
    config = TerminalConfig(args.city, kind, bytes.fromhex(number), amount, args.line, args.station)
    keys = load_keys(args.keys)
    try:
        fares = FareTable.load(args.fares)
        host = IssuerHost(keys, DEFAULT_MAX_BALANCE if args.max_balance is None else args.max_balance)
        return Terminal(config, outbox, keys, fares=fares, host=host)
    except (FareTableError, OutboxError) as err:
        raise CliError(str(err)) from err
    except (KeyError, ValueError) as err:
        raise CliError(str(err).strip("'\"")) from err


def _pcsc(name: str) -> PcscReader:
    from terminals.pcsc import PcscReader, ReaderNotFound  # pyscard: only the commands on a reader

    try:
        return PcscReader(name)
    except ReaderNotFound as err:
        raise CliError(f"{err} (is pcscd running? scripts/services.sh starts it)") from err


def _print(result: TapResult) -> None:
    print(result.message, flush=True)


# --- tap ------------------------------------------------------------------------------------------------


def _tap(args: argparse.Namespace) -> int:
    import asyncio

    setup_logging(logging.WARNING)
    terminal = _build_terminal(args)
    if args.broker is not None and args.hotlist_wait > 0:
        asyncio.run(_take_hotlists(terminal, args.broker, args.hotlist_wait))
    if args.card is not None:
        result = _tap_image(terminal, args.card)
    elif args.pn532 is not None:
        with pn532_with_card(args.pn532, args.card_wait) as link:
            result = terminal.tap_m1(link)
    else:
        reader = _pcsc(args.reader)
        try:
            reader.wait_for_card(args.card_wait)
        except TimeoutError as err:
            raise CliError(str(err)) from err
        result = terminal.tap(reader)
    _print(result)
    if args.broker is not None:
        asyncio.run(_publish(terminal, args.broker, args.ack_wait))
    return 0 if result.ok else 1


def _tap_image(terminal: Terminal, path: Path) -> TapResult:
    from cardsim.image import CardImageError, load_card, save_card
    from cardsim.mifare import M1Card, M1State
    from cardsim.purse import PurseCard, PurseState
    from terminals.reader import InProcessReader

    try:
        state = load_card(path)
    except CardImageError as err:
        raise CliError(str(err)) from err
    if isinstance(state, PurseState) and state.balance > MAX_FEN:
        # the image format lets a purse hold up to 2^32-1 fen; a record carries at most MAX_FEN: such an image is a
        # bad input here, named by its path (a card on a reader holding that much is refused by the tap itself)
        raise CliError(f"{path}: balance {state.balance} fen is more than a transaction record carries ({MAX_FEN})")
    if isinstance(state, M1State):
        chip = M1Card(state, os.urandom)
        chip.power_on()
        result = terminal.tap_m1(chip)
    else:
        result = terminal.tap(InProcessReader(PurseCard(state, os.urandom), str(path)))
    try:
        save_card(path, state)
    except OSError as err:
        kept = "; the terminal's outbox keeps its record" if result.ok else ""
        raise CliError(
            f"{path}: the card image could not be saved after the tap ({err.strerror}): {result.message}{kept}"
        ) from err
    return result


async def _take_hotlists(terminal: Terminal, broker: BrokerUrl, wait: float) -> None:
    """Take every issuer's retained hotlist before the tap: until each list is whole and none has come for a
    moment, at most ``wait`` s; when that runs out, say so in one line and go on with the lists held."""
    from terminals.uplink import Uplink

    uplink = Uplink(broker, terminal)
    book = terminal.hotlists
    if await uplink.run_until(lambda: book.settled() and uplink.hotlists_quiet(), wait):
        return
    held = ", ".join(f"{issuer} v{version}" for issuer, version in book.versions().items()) or "none"
    if uplink.stats.connections == 0:
        why = f"broker {broker} unreachable"
    elif book.incomplete():
        why = f"incomplete: {', '.join(book.incomplete())}"
    else:
        why = "still arriving"
    print(f"hotlists not all taken within {wait:g} s ({why}): tapping with the lists held ({held})", file=sys.stderr)


async def _publish(terminal: Terminal, broker: BrokerUrl, ack_wait: float) -> None:
    """Publish the outbox (until PUBACK), then wait up to ``ack_wait`` s for the clearing's ack."""
    from terminals.uplink import Uplink

    uplink = Uplink(broker, terminal)
    queued = terminal.outbox.counts().queued
    if not queued:
        return
    if not await uplink.run_until(uplink.all_published, 10.0):
        error = uplink.stats.last_error if uplink.stats.connections == 0 else None
        why = f" ({error})" if error else ""
        print(f"broker {broker} unreachable{why}: {queued} record(s) kept in the outbox", file=sys.stderr)
        return
    if uplink.stats.refused:
        print(_refused_line(terminal.outbox, uplink.stats.refused), file=sys.stderr)
    if ack_wait > 0 and not await uplink.run_until(uplink.all_acked, ack_wait):
        left = terminal.outbox.counts().queued
        print(f"published; {left} record(s) stay in the outbox until the clearing acks them", file=sys.stderr)


# --- run ------------------------------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from terminals.m1 import M1Gone

    setup_logging(logging.INFO)
    terminal = _build_terminal(args)
    reader: _Station = _PcscStation(_pcsc(args.reader)) if args.reader is not None else _Pn532Station(args.pn532)
    # A shell that starts us in the background ignores SIGINT for us; Ctrl-C and kill -INT must still stop.
    stop_on_sigterm()
    cfg = terminal.config
    print(
        f"terminal {terminal.terminal_hex} ({cfg.city}, {cfg.kind.value}) on {reader.name}; "
        f"state {terminal.outbox.path}; broker {args.broker or 'none (offline)'}; Ctrl-C stops",
        flush=True,
    )
    try:
        asyncio.run(_run_loop(terminal, reader, args.broker, args.count))
    except KeyboardInterrupt:
        pass
    except M1Gone as err:  # the board failed while polling: stop with a clear line, the outbox keeps its records
        raise CliError(f"{reader.name}: {err}") from err
    except UplinkDied as died:  # never a half-alive terminal that taps on without delivering
        log.critical("terminal %s: its uplink died", terminal.terminal_hex, exc_info=died.__cause__)
        log.critical(
            "terminal %s stopped: the uplink task died (%s: %s); exiting 1 so that a supervisor restarts it "
            "(the records stay in the outbox)",
            terminal.terminal_hex,
            type(died.__cause__).__name__,
            died.__cause__,
        )
        return 1
    finally:
        reader.close()
    counts = terminal.outbox.counts()
    refused = f", {counts.refused} refused by the broker (terminal status)" if counts.refused else ""
    print(
        f"stopped; {counts.queued} record(s) in the outbox{refused}, {counts.pending} interrupted payment(s)",
        flush=True,
    )
    return 0


class UplinkDied(Exception):
    """The uplink task of ``terminal run`` ended with an error (its cause)."""


class _Station(Protocol):
    """Where ``terminal run`` meets its cards: a PC/SC reader or a PN532 board."""

    name: str

    def card_present(self) -> bool:
        """Whether a card is in the field now."""
        ...

    def tap(self, terminal: Terminal) -> TapResult:
        """One transaction with the card present."""
        ...

    def wait_for_removal(self, timeout: float) -> bool:
        """True once the card has left (within ``timeout`` s)."""
        ...

    def close(self) -> None:
        """Let the device go."""
        ...


class _PcscStation:
    def __init__(self, reader: PcscReader) -> None:
        self.reader = reader
        self.name = reader.name

    def card_present(self) -> bool:
        return self.reader.card_present()

    def tap(self, terminal: Terminal) -> TapResult:
        return terminal.tap(self.reader)

    def wait_for_removal(self, timeout: float) -> bool:
        return self.reader.wait_for_removal(timeout)

    def close(self) -> None:
        pass  # each tap connects and disconnects by itself


class _Pn532Station(Pn532Board):
    """A PN532 board under ``terminal run``: M1 cards, over raw frames."""

    def tap(self, terminal: Terminal) -> TapResult:
        return terminal.tap_m1(self.link)


async def _run_loop(terminal: Terminal, reader: _Station, broker: BrokerUrl | None, count: int | None) -> None:
    import asyncio

    from terminals.uplink import Uplink

    uplink = Uplink(broker, terminal) if broker is not None else None
    task = asyncio.create_task(uplink.run()) if uplink is not None else None
    taps = 0
    try:
        while count is None or taps < count:
            if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
                raise UplinkDied from task.exception()
            if not await asyncio.to_thread(reader.card_present):
                await asyncio.sleep(0.1)
                continue
            result = await asyncio.to_thread(reader.tap, terminal)
            _print(result)
            taps += 1
            if uplink is not None:
                uplink.notify()
            if count is not None and taps >= count:
                break
            while not await asyncio.to_thread(reader.wait_for_removal, 0.5):
                pass
        if uplink is not None:  # let the last records reach the broker before stopping
            await asyncio.sleep(0)
            deadline = asyncio.get_running_loop().time() + 5
            while not uplink.all_published() and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


# --- sync and status ------------------------------------------------------------------------------------


def _existing_terminal(args: argparse.Namespace) -> Terminal:
    from terminals.terminal import Terminal, TerminalConfig

    if not args.state.is_file():
        raise CliError(f"{args.state}: no such terminal state file")
    outbox = _open_outbox(args.state)
    number, city = outbox.get_meta("terminal"), outbox.get_meta("city")
    if number is None or city is None:
        raise CliError(f"{args.state}: not a terminal state file (no terminal number)")
    config = TerminalConfig(city, TerminalKind.BUS, bytes.fromhex(number))
    return Terminal(config, outbox, load_keys(getattr(args, "keys", None)))


def _sync(args: argparse.Namespace) -> int:
    import asyncio

    from terminals.uplink import Uplink

    setup_logging(logging.INFO)
    terminal = _existing_terminal(args)
    if args.retry_refused:
        print(f"{terminal.outbox.retry_refused()} refused record(s) to send again", flush=True)
    queued = terminal.outbox.counts().queued
    print(f"terminal {terminal.terminal_hex}: {queued} record(s) to deliver to {args.broker}", flush=True)
    uplink = Uplink(args.broker, terminal)
    done = asyncio.run(uplink.run_until(uplink.all_acked, args.timeout))
    counts = terminal.outbox.counts()
    print(
        f"{'done' if done else 'timed out'}: {uplink.stats.acked} acked, {uplink.stats.rejected} rejected, "
        f"{counts.queued} left in the outbox",
        flush=True,
    )
    if counts.refused:
        print(_refused_line(terminal.outbox, counts.refused), flush=True)
    return 0 if done and not counts.refused else 1


def _utc(moment: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _refused_line(outbox: Outbox, count: int) -> str:
    """One line for records the broker refused, with the newest reason."""
    refused = outbox.refused()
    reason = refused[-1].reason if refused else "see terminal status"
    return (
        f"{count} record(s) refused by the broker ({reason}): kept in the outbox; "
        "terminal sync --retry-refused sends them again"
    )


def _status(args: argparse.Namespace) -> int:
    terminal = _existing_terminal(args)
    counts = terminal.outbox.counts()
    print(f"terminal   {terminal.terminal_hex} (city {terminal.config.city})")
    print(f"outbox     {counts.queued} record(s) not yet acked; next record seq {counts.next_seq}")
    print(f"journal    {counts.pending} interrupted payment(s) waiting for their card")
    print(f"rejected   {counts.rejected} record(s) the clearing refused")
    for seq, reason, _ in terminal.outbox.rejected()[-10:]:
        print(f"  seq {seq}: {reason}")
    refused = terminal.outbox.refused()
    print(f"refused    {counts.refused} record(s) the broker refused, kept unsent (terminal sync --retry-refused)")
    for record in refused[-10:]:
        print(f"  seq {record.seq} at {_utc(record.at)}: {record.reason}")
    link = terminal.outbox.link_error()
    if link is not None:
        error, at = link
        print(f"broker     last connection failed at {_utc(at)}: {error}")
    lists = terminal.hotlists.lists()
    if not lists:
        print("hotlist    none received yet")
    for n, held in enumerate(lists):
        label = "hotlist" if n == 0 else ""
        cards = len(held.cards)
        print(f"{label:<10} {held.issuer} version {held.version}, {cards} card(s), published {held.published}")
    return 0
