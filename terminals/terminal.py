"""A terminal: one kind of transaction (bus fare, metro entry or exit gate, top-up), its PSAM, its state file,
and every issuer's hotlist. ``tap`` runs one card presentation to the end and returns one line for the rider.

A tap never raises for anything a card can do (answer garbage, leave, be hotlisted); it returns a
``TapResult``. A payment interrupted after DEBIT (or the first M1 write) is journalled and finished on the
card's next tap here: recorded once if the card shows it, forgotten (and charged afresh) if not.
"""

from __future__ import annotations

import datetime as dt
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from pydantic import BaseModel, ConfigDict

from cardsim.apdu import SW
from cardsim.bcd import bcd_date, bcd_time
from cardsim.commands import M1RecordMac, M1SectorKeys, SectorKeys, SequencedMac
from cardsim.crypto import Algorithm
from cardsim.issuer import HostRefusal, IssuerHost
from cardsim.keys import IssuerKeyStore
from cardsim.m1_issue import ISSUER_BLOCK, PURSE_SECTOR, KeyScheme
from cardsim.psam import Psam, PsamState
from cardsim.purse import SFI_TRIPS, TYPE_LOAD, PublicData
from terminals.flows import (
    Mac2NotVerified,
    PurseTransaction,
    TransactionError,
    Unsettled,
    block_card,
    exchange,
    load,
    load_outcome,
    purchase,
    purchase_outcome,
    read_records,
    select_purse,
)
from terminals.hotlist import HotlistBook, HotlistNews
from terminals.inspect import yuan
from terminals.kinds import TerminalKind
from terminals.m1 import (
    FrameSlot,
    M1Chip,
    M1Error,
    M1Gone,
    M1Slot,
    M1Transaction,
    M1Unsettled,
    m1_outcome,
    m1_purchase,
)
from terminals.messages import CHINA, CardRef, TxnAlg, TxnFields, TxnRecord
from terminals.metro import TRIP_ENTRY, TRIP_EXIT, CityFares, FareTable, Station, exit_fare, parse_trip, trip_record
from terminals.outbox import Outbox
from terminals.part3 import CLASSIC_1K, Part3Slot, storage_card_name
from terminals.reader import CardGone, Reader

log = logging.getLogger(__name__)

DEFAULT_KEY = 0xFFFFFFFFFFFF
_COMMIT_STEPS = ("DEBIT FOR PURCHASE", "CREDIT FOR LOAD")


_WIRE_ALG: Final[dict[Algorithm, TxnAlg]] = {Algorithm.DES3: "3des", Algorithm.SM4: "sm4", Algorithm.DES: "des"}


@dataclass(frozen=True)
class TerminalConfig:
    """How a terminal is set up. ``amount`` is the bus fare or the top-up amount (fen)."""

    city: str
    kind: TerminalKind
    terminal: bytes
    amount: int = 0
    line: str | None = None
    station: str | None = None
    key_version: int = 1


class TapOutcome(enum.StrEnum):
    """How a tap ended: ``value`` is the word the demo counts and tests compare."""

    OK = "ok"
    REFUSED = "refused"
    TORN = "torn"  # the card left after the payment was journalled: the next tap here finishes it
    ERROR = "error"


@dataclass(frozen=True)
class TapResult:
    """The outcome of one tap: its ``status``, a one-line ``message``, the record."""

    status: TapOutcome
    message: str
    record: TxnRecord | None = None

    @property
    def ok(self) -> bool:
        """The rider may go through (or the top-up is done)."""
        return self.status is TapOutcome.OK


class PurseIntent(TxnFields):
    """A CPU payment journalled just before DEBIT or CREDIT, as the pending table keeps it: the record to be
    (``tac`` still empty) and the card's transaction type."""

    txn_type: int

    def transaction(self) -> PurseTransaction:
        """The journalled payment, rebuilt for ``purchase_outcome`` or ``load_outcome``."""
        return PurseTransaction(
            application_serial=bytes.fromhex(self.card.id),
            city=self.card.issuer,
            algorithm=Algorithm(self.alg),
            key_version=self.key_version,
            txn_type=self.txn_type,
            amount=self.amount,
            balance_before=self.balance_before,
            balance_after=self.balance_after,
            card_counter=self.card_counter,
            terminal=bytes.fromhex(self.terminal),
            terminal_seq=self.terminal_seq,
            when=dt.datetime.fromisoformat(self.time),
            tac=b"",
        )

    def completed(self, tac: bytes) -> TxnFields:
        """The record's fields once the card has shown the payment and its TAC (the outbox takes the
        ``TxnFields`` part and leaves ``txn_type``)."""
        return self.model_copy(update={"tac": tac.hex().upper()})


class M1Intent(BaseModel):
    """An M1 payment journalled just before the first write, as the pending table keeps it."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    uid: int
    counter: int
    amount: int
    balance_before: int
    terminal: str  # lower-case hex, as journalled since the first version
    time: str

    @classmethod
    def of(cls, txn: M1Transaction) -> M1Intent:
        """The journal entry of a purchase about to be written."""
        return cls(
            uid=txn.uid,
            counter=txn.counter,
            amount=txn.amount,
            balance_before=txn.balance_before,
            terminal=txn.terminal.hex(),
            time=txn.when.isoformat(),
        )

    def transaction(self) -> M1Transaction:
        """The journalled purchase, rebuilt for ``m1_outcome``."""
        return M1Transaction(
            uid=self.uid,
            counter=self.counter,
            amount=self.amount,
            balance_before=self.balance_before,
            balance_after=self.balance_before - self.amount,
            terminal=bytes.fromhex(self.terminal),
            when=dt.datetime.fromisoformat(self.time),
        )


@dataclass
class _Journal:
    """What one tap has journalled: ``key`` names the card's pending payment once the tap is about to send it
    (before DEBIT, CREDIT or the first M1 write). From then on a failure leaves the payment torn, not undone."""

    outbox: Outbox
    key: str | None = None

    def write(self, key: str, intent: PurseIntent | M1Intent) -> None:
        """Journal ``intent`` durably under the card's ``key``."""
        self.outbox.set_pending(key, intent)
        self.key = key


@dataclass(frozen=True)
class _Gate:
    """A metro gate's fare tables and station."""

    fares: FareTable
    city_fares: CityFares
    station: Station


def _gate(config: TerminalConfig, fares: FareTable | None) -> _Gate | None:
    """The gate of a metro terminal (ValueError when it lacks a part); None for other kinds."""
    if config.kind not in (TerminalKind.METRO_ENTRY, TerminalKind.METRO_EXIT):
        return None
    if fares is None or config.line is None or config.station is None:
        raise ValueError("a metro gate needs the fare table, its line and its station")
    city_fares = fares.city(config.city)
    return _Gate(fares, city_fares, city_fares.station(config.line, config.station))


def check_atr(atr: bytes) -> None:
    """An ISO 7816-3 ATR starts with TS 3B or 3F and is 2..33 bytes; anything else is not a card we can use."""
    if not 2 <= len(atr) <= 33 or atr[0] not in (0x3B, 0x3F):
        raise TransactionError("ATR", f"not a valid ATR ({atr.hex().upper() or 'empty'})")


class PsamSlot:
    """The terminal's PSAM (simulated in process); its TTC is saved in the state file whenever it moves,
    so a restarted terminal never reuses a terminal transaction sequence."""

    name = "psam"

    def __init__(self, psam: Psam, outbox: Outbox) -> None:
        self.psam = psam
        self.outbox = outbox

    def connect(self) -> bytes:
        """Power the PSAM up."""
        return self.psam.power_on()

    def transmit(self, apdu: bytes) -> bytes:
        """Exchange one APDU with the PSAM, saving its TTC if the command moved it."""
        before = self.psam.state.ttc
        answer = self.psam.transmit(apdu)
        if self.psam.state.ttc != before:
            self.outbox.set_meta("psam_ttc", str(self.psam.state.ttc))
        return answer

    def disconnect(self) -> None:
        """Nothing to release."""


class Terminal:
    """One terminal over its state file. ``clock`` gives the local time (aware, +08:00)."""

    def __init__(
        self,
        config: TerminalConfig,
        outbox: Outbox,
        keys: IssuerKeyStore,
        *,
        fares: FareTable | None = None,
        host: IssuerHost | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(CHINA),
    ) -> None:
        self.gate = _gate(config, fares)
        if config.kind is TerminalKind.TOPUP and host is None:
            raise ValueError("a top-up machine needs the issuer host")
        self.config, self.outbox, self.host, self.clock = config, outbox, host, clock
        self.terminal_hex = config.terminal.hex().upper()
        outbox.bind_terminal(self.terminal_hex, config.city)
        ttc = int(outbox.get_meta("psam_ttc") or 1)
        self.psam_serial = bytes(2) + bytes.fromhex(config.city) + config.terminal
        self.sam = PsamSlot(Psam(PsamState(self.psam_serial, config.terminal, keys.for_psam(), ttc)), outbox)
        self.sam.connect()
        self.accepted_cities = [config.city, *sorted({s.city for s in keys} - {config.city})]
        self.hotlists = HotlistBook(outbox.hotlists())

    @property
    def city(self) -> str:
        """The terminal's city code."""
        return self.config.city

    # --- hotlist ----------------------------------------------------------------------------------------

    def offer_hotlist(self, topic: str, payload: bytes | str) -> HotlistNews:
        """Take a message of an issuer's hotlist topics from the broker (``HotlistBook.offer``); a list it makes
        newer is saved in the state file before this returns. Invalid messages are logged and ignored (the old
        list stays)."""
        news = self.hotlists.offer(topic, payload)
        if news.issuer is not None and news.version is not None:
            self.outbox.save_hotlist(self.hotlists.held(news.issuer))
        log.log(logging.WARNING if news.refused else logging.INFO, "%s", news.note)
        return news

    # --- taps ---------------------------------------------------------------------------------------------

    def tap(self, card: Reader) -> TapResult:
        """One card presentation on a reader, start to end: a CPU card, or (told by its PC/SC Part 3 ATR) a storage
        card behind a contactless reader, of which an M1 card goes to ``tap_m1_slot``."""
        journal = _Journal(self.outbox)
        try:
            atr = card.connect()
            check_atr(atr)
            storage = storage_card_name(atr)
            if storage == CLASSIC_1K:
                return self.tap_m1_slot(Part3Slot(card, purchase=True))
            if storage is not None:
                return TapResult(
                    TapOutcome.REFUSED, f"REFUSED  {storage} card: only {CLASSIC_1K} purse cards are taken here"
                )
            app = select_purse(card)
            return self._cpu(card, app, journal)
        except Mac2NotVerified as err:
            record = self._store_cpu(err.transaction, journal.key)
            line = f"{self._ok_line(record)}  (warning: PSAM refused the card's MAC2)"
            return TapResult(TapOutcome.OK, line, record)
        except CardGone as err:
            if journal.key is not None:
                return TapResult(TapOutcome.TORN, f"TORN     card left during payment, tap again to finish ({err})")
            return TapResult(TapOutcome.ERROR, f"ERROR    card left, nothing charged ({err})")
        except TransactionError as err:
            if journal.key is not None and err.step in _COMMIT_STEPS and SW.known(err.sw) is not None:
                return self._refused_commit(card, journal.key, err)
            if journal.key is not None:
                return TapResult(TapOutcome.TORN, f"TORN     {err}; tap again to finish")
            if err.sw is None:
                return TapResult(TapOutcome.ERROR, f"ERROR    {err}")
            return TapResult(TapOutcome.REFUSED, f"REFUSED  {err}")
        finally:
            card.disconnect()

    def _cpu(self, card: Reader, app: PublicData, journal: _Journal) -> TapResult:
        serial = app.application_serial.hex()
        listing = self.hotlists.blocking(serial, app.city)
        if listing is not None:
            block_card(card, self.sam, app)
            return TapResult(
                TapOutcome.REFUSED,
                f"REFUSED  card {serial} is hotlisted by {listing.issuer} (list version {listing.version}): "
                "application blocked",
            )
        key = f"cpu:{serial}"
        finished = self._finish_cpu(card, key, serial)
        if finished is not None:
            return finished

        def before_commit(txn: PurseTransaction) -> None:
            journal.write(key, PurseIntent(txn_type=txn.txn_type, **dict(self._fields(txn))))

        if self.config.kind is TerminalKind.TOPUP:
            return self._top_up(card, app, key, before_commit)
        now = self.clock()
        amount, trip = self.config.amount, None
        if self.gate is not None:
            amount, trip = self._metro(card, now, self.gate)
        txn = purchase(card, self.sam, self.config.terminal, amount, now, trip, app=app, before_debit=before_commit)
        record = self._store_cpu(txn, journal.key)
        return TapResult(TapOutcome.OK, self._ok_line(record), record)

    def _refused_commit(self, card: Reader, key: str, refusal: TransactionError) -> TapResult:
        """A spec refusal of DEBIT/CREDIT means nothing changed; the card's log is asked to show it before the
        journal is dropped, so a card that answers a refusal after committing still gets its record."""
        try:
            finished = self._finish_cpu(card, key, key.removeprefix("cpu:"))
        except (TransactionError, CardGone, HostRefusal) as err:
            line = f"TORN     {refusal}, and the card could not show its log ({err}); tap again to finish"
            return TapResult(TapOutcome.TORN, line)
        if finished is not None:
            return finished
        return TapResult(TapOutcome.REFUSED, f"REFUSED  {refusal}")

    def _finish_cpu(self, card: Reader, key: str, serial: str) -> TapResult | None:
        """Settle the card's interrupted payment, if one is journalled: recorded when the card shows it (the tap
        ends there); forgotten, or set aside when the card cannot tell, and None (the tap charges afresh)."""
        intent = self.outbox.pending(key, PurseIntent)
        if intent is None:
            return None
        interrupted = intent.transaction()
        try:
            if interrupted.txn_type == TYPE_LOAD:
                done = load_outcome(card, self._issuer_host(), interrupted)
            else:
                done = purchase_outcome(card, interrupted)
        except Unsettled as err:
            self.outbox.set_aside(key)
            log.warning("card %s: %s; set aside, charging afresh", serial, err)
            return None
        if done is None:
            self.outbox.drop_pending(key)
            log.info("card %s: interrupted payment did not happen; charging afresh", serial)
            return None
        record = self.outbox.append(intent.completed(done.tac), key)
        return TapResult(TapOutcome.OK, f"{self._ok_line(record)}  (finished the interrupted payment)", record)

    def _top_up(
        self, card: Reader, app: PublicData, key: str, before_credit: Callable[[PurseTransaction], None]
    ) -> TapResult:
        host = self._issuer_host()
        try:
            txn = load(
                card, host, self.config.terminal, self.config.amount, self.clock(), app=app, before_credit=before_credit
            )
        except HostRefusal as err:
            return TapResult(TapOutcome.REFUSED, f"REFUSED  issuer host: {err}")
        record = self._store_cpu(txn, key)
        return TapResult(TapOutcome.OK, self._ok_line(record), record)

    def _issuer_host(self) -> IssuerHost:
        """The issuer host a load needs (a top-up machine always has one; another kind of terminal meets a load
        only in a state file it shares with an earlier top-up machine)."""
        if self.host is None:
            raise TransactionError("ISSUER HOST", "this terminal has no issuer host to settle a load with")
        return self.host

    def _metro(self, card: Reader, now: dt.datetime, gate: _Gate) -> tuple[int, Callable[[int], bytes]]:
        """Fare and trip record of a gate: entry pays 0; exit pays by distance from the entry on the card."""
        entry = self.config.kind is TerminalKind.METRO_ENTRY
        amount = 0
        if not entry:
            trips = read_records(card, SFI_TRIPS, 1)
            last = parse_trip(trips[0]) if trips else None
            amount = exit_fare(gate.city_fares, gate.fares, self.config.city, last, gate.station, now)

        def record(balance_after: int) -> bytes:
            return trip_record(
                TRIP_ENTRY if entry else TRIP_EXIT,
                self.config.terminal,
                gate.station.line,
                gate.station.code,
                amount,
                balance_after,
                now,
                self.config.city,
                self.psam_serial,
            )

        return amount, record

    def _fields(self, txn: PurseTransaction) -> TxnFields:
        return TxnFields(
            kind=self.config.kind.wire,
            tech="cpu",
            card=CardRef(issuer=txn.city, serial=txn.application_serial.hex()),
            card_counter=txn.card_counter,
            amount=txn.amount,
            balance_before=txn.balance_before,
            balance_after=txn.balance_after,
            terminal=txn.terminal.hex().upper(),
            terminal_seq=txn.terminal_seq,
            psam=self.psam_serial.hex().upper(),
            acquirer=self.config.city,
            time=txn.when.isoformat(timespec="seconds"),
            tac=txn.tac.hex().upper(),
            key_version=txn.key_version,
            alg=_WIRE_ALG[txn.algorithm],
            line=self.config.line if self.gate is not None else None,
            station=self.config.station if self.gate is not None else None,
        )

    def _store_cpu(self, txn: PurseTransaction, pending: str | None) -> TxnRecord:
        return self.outbox.append(self._fields(txn), pending)

    def _ok_line(self, record: TxnRecord) -> str:
        sign = "+" if record.kind == "load" else "-"
        where = f" {record.line}/{record.station}" if record.station else ""
        return (
            f"OK       {record.kind}{where} card {record.card.id} ({record.card.issuer}, {record.tech} {record.alg}) "
            f"{sign}{yuan(record.amount)} -> {yuan(record.balance_after)} yuan, record {record.seq}"
        )

    # --- M1 -----------------------------------------------------------------------------------------------

    def tap_m1(self, chip: M1Chip) -> TapResult:
        """One M1 card presentation over raw frames (buses only: M1 cards carry no trip log)."""
        return self.tap_m1_slot(FrameSlot(chip))

    def tap_m1_slot(self, slot: M1Slot) -> TapResult:
        """One M1 card presentation on any reader (``tap`` routes a PC/SC Part 3 card here)."""
        journal = _Journal(self.outbox)
        try:
            return self._m1(slot, journal)
        except TransactionError as err:
            return TapResult(TapOutcome.ERROR, f"ERROR    {err}")
        except M1Gone as err:
            if journal.key is not None:
                return TapResult(TapOutcome.TORN, f"TORN     {err}; tap again to finish")
            return TapResult(TapOutcome.ERROR, f"ERROR    {err}; nothing charged")
        except M1Error as err:
            if journal.key is not None:
                return TapResult(TapOutcome.TORN, f"TORN     {err}; tap again to finish")
            return TapResult(TapOutcome.REFUSED, f"REFUSED  {err}")

    def _m1(self, slot: M1Slot, journal: _Journal) -> TapResult:
        uid_bytes = slot.uid()
        uid = uid_bytes.hex().upper()
        if self.config.kind is not TerminalKind.BUS:
            return TapResult(TapOutcome.REFUSED, f"REFUSED  M1 card {uid}: only bus terminals take M1 cards")
        listing = self.hotlists.blocking(uid)  # its issuer shows only after the key search
        if listing is not None:
            return TapResult(
                TapOutcome.REFUSED,
                f"REFUSED  M1 card {uid} is hotlisted by {listing.issuer} (list version {listing.version})",
            )
        issuer, key_b = self._m1_purse_key(slot, uid_bytes)
        key = f"m1:{uid}"
        finished = self._finish_m1(slot, key, issuer, key_b)
        if finished is not None:
            return finished
        txn = m1_purchase(
            slot.session(),
            key_b,
            self.config.terminal,
            self.config.amount,
            self.clock(),
            before_write=lambda txn: journal.write(key, M1Intent.of(txn)),
        )
        record = self._store_m1(txn, issuer, key)
        return TapResult(TapOutcome.OK, self._ok_line(record), record)

    def _finish_m1(self, slot: M1Slot, key: str, issuer: str, key_b: int) -> TapResult | None:
        """Settle the card's interrupted purchase, if one is journalled: recorded when the card took the money
        (the tap ends there); forgotten, or set aside when the card cannot tell, and None (charge afresh)."""
        intent = self.outbox.pending(key, M1Intent)
        if intent is None:
            return None
        txn = intent.transaction()
        try:
            finished = m1_outcome(slot.session(), key_b, txn)
        except M1Unsettled as err:
            self.outbox.set_aside(key)
            log.warning("M1 card %s: %s; set aside, charging afresh", key.removeprefix("m1:"), err)
            return None
        if not finished:
            self.outbox.drop_pending(key)
            return None
        record = self._store_m1(txn, issuer, key)
        return TapResult(TapOutcome.OK, f"{self._ok_line(record)}  (finished the interrupted payment)", record)

    def _m1_purse_key(self, slot: M1Slot, uid: bytes) -> tuple[str, int]:
        """Find the card's issuer and purse key B: the PSAM derives the candidates of each accepted city
        (diversified, then shared); a card on factory keys names its issuer in block 1."""
        for city in self.accepted_cities:
            for scheme in (KeyScheme.DIVERSIFIED, KeyScheme.SHARED):
                apdu = M1SectorKeys(PURSE_SECTOR, city, self.config.key_version, scheme, uid).to_apdu()
                keys = SectorKeys.from_bytes(exchange(self.sam, "PSAM M1 SECTOR KEYS", apdu, SectorKeys.size()))
                if _authenticates(slot, int.from_bytes(keys.key_b)):
                    return city, int.from_bytes(keys.key_b)
        if _authenticates(slot, DEFAULT_KEY):
            reader = slot.session()
            reader.authenticate(ISSUER_BLOCK, DEFAULT_KEY, 0x60)
            city = reader.read_block(ISSUER_BLOCK)[0:2].hex()
            if city in self.accepted_cities:
                return city, DEFAULT_KEY
            raise M1Error(f"M1 card {uid.hex().upper()} names no issuer this terminal accepts ({city})")
        raise M1Error(f"M1 card {uid.hex().upper()}: no key of an accepted issuer opens its purse")

    def _store_m1(self, txn: M1Transaction, issuer: str, pending: str) -> TxnRecord:
        uid = txn.uid.to_bytes(4)
        command = M1RecordMac(
            issuer,
            self.config.key_version,
            uid,
            txn.counter,
            txn.amount,
            txn.balance_before,
            txn.balance_after,
            bcd_date(txn.when),
            bcd_time(txn.when),
        )
        answer = SequencedMac.from_bytes(
            exchange(self.sam, "PSAM M1 RECORD MAC", command.to_apdu(), SequencedMac.size())
        )
        fields = TxnFields(
            kind="purchase",
            tech="m1",
            card=CardRef(issuer=issuer, uid=uid.hex().upper()),
            card_counter=txn.counter,
            amount=txn.amount,
            balance_before=txn.balance_before,
            balance_after=txn.balance_after,
            terminal=self.terminal_hex,
            terminal_seq=answer.seq,
            psam=self.psam_serial.hex().upper(),
            acquirer=self.config.city,
            time=txn.when.isoformat(timespec="seconds"),
            tac=answer.mac.hex().upper(),
            key_version=self.config.key_version,
            alg="sm4",
        )
        return self.outbox.append(fields, pending)


def _authenticates(slot: M1Slot, key_b: int) -> bool:
    try:
        slot.session().authenticate(4 * PURSE_SECTOR, key_b, 0x61)
    except M1Error:
        return False
    return True
