"""A terminal: one kind of transaction (bus fare, metro entry or exit gate, top-up), its PSAM, its state file,
and the hotlist. ``tap`` runs one card presentation to the end and returns one line for the rider.

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
from typing import Any, Protocol

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
from terminals.inspect import yuan
from terminals.m1 import M1Error, M1Link, M1Reader, M1Transaction, M1Unsettled, m1_outcome, m1_purchase
from terminals.messages import CHINA, HOTLIST_SCHEMA, Hotlist, MessageError, TxnRecord, parse_hotlist
from terminals.metro import TRIP_ENTRY, TRIP_EXIT, FareTable, exit_fare, parse_trip, trip_record
from terminals.outbox import Outbox
from terminals.reader import CardGone, Reader

log = logging.getLogger(__name__)

DEFAULT_KEY = 0xFFFFFFFFFFFF
_COMMIT_STEPS = ("DEBIT FOR PURCHASE", "CREDIT FOR LOAD")


class Kind(enum.Enum):
    """What the terminal does with each card; ``value`` is the command-line name."""

    BUS = "bus"
    METRO_ENTRY = "metro-entry"
    METRO_EXIT = "metro-exit"
    TOPUP = "topup"

    @property
    def wire(self) -> str:
        """The record ``kind`` on the wire."""
        return {"bus": "purchase", "metro-entry": "metro_entry", "metro-exit": "metro_exit", "topup": "load"}[
            self.value
        ]


@dataclass(frozen=True)
class TerminalConfig:
    """How a terminal is set up. ``amount`` is the bus fare or the top-up amount (fen)."""

    city: str
    kind: Kind
    terminal: bytes
    amount: int = 0
    line: str | None = None
    station: str | None = None
    key_version: int = 1


@dataclass(frozen=True)
class TapResult:
    """The outcome of one tap: ``status`` ok / refused / torn / error, a one-line ``message``, the record."""

    status: str
    message: str
    record: TxnRecord | None = None

    @property
    def ok(self) -> bool:
        """The rider may go through (or the top-up is done)."""
        return self.status == "ok"


class M1Chip(M1Link, Protocol):
    """An M1 card in the field: frames, plus the anticollision answer (UID, SAK, ATQA)."""

    def anticollision(self) -> tuple[bytes, int, bytes]: ...


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
        if config.kind in (Kind.METRO_ENTRY, Kind.METRO_EXIT):
            if fares is None or config.line is None or config.station is None:
                raise ValueError("a metro gate needs the fare table, its line and its station")
            self.city_fares = fares.city(config.city)
            self.station = self.city_fares.station(config.line, config.station)
        if config.kind is Kind.TOPUP and host is None:
            raise ValueError("a top-up machine needs the issuer host")
        self.config = config
        self.outbox = outbox
        self.fares = fares
        self.host = host
        self.clock = clock
        self.terminal_hex = config.terminal.hex().upper()
        outbox.bind_terminal(self.terminal_hex, config.city)
        ttc = int(outbox.get_meta("psam_ttc") or 1)
        self.psam_serial = bytes(2) + bytes.fromhex(config.city) + config.terminal
        self.sam = PsamSlot(Psam(PsamState(self.psam_serial, config.terminal, keys.for_psam(), ttc)), outbox)
        self.sam.connect()
        self.accepted_cities = [config.city, *sorted({s.city for s in keys} - {config.city})]
        stored = outbox.hotlist()
        self.hotlist: Hotlist = stored or Hotlist(schema=HOTLIST_SCHEMA, version=0, cards=[])
        self._hot = frozenset(self.hotlist.cards)

    @property
    def city(self) -> str:
        """The terminal's city code."""
        return self.config.city

    # --- hotlist ----------------------------------------------------------------------------------------

    def offer_hotlist(self, payload: bytes | str) -> bool:
        """Take a hotlist payload from the broker: kept when valid and not older than ours; a malformed one is
        logged and ignored (the old list stays). Returns whether it was taken."""
        try:
            hotlist = parse_hotlist(payload)
        except MessageError as err:
            log.warning("hotlist ignored, keeping version %d: %s", self.hotlist.version, err)
            return False
        if hotlist.version < self.hotlist.version:
            log.warning("hotlist version %d ignored: older than %d", hotlist.version, self.hotlist.version)
            return False
        self.outbox.save_hotlist(hotlist)
        self.hotlist, self._hot = hotlist, frozenset(hotlist.cards)
        log.info("hotlist version %d: %d cards", hotlist.version, len(hotlist.cards))
        return True

    # --- taps ---------------------------------------------------------------------------------------------

    def tap(self, card: Reader) -> TapResult:
        """One CPU card presentation on a reader, start to end."""
        journalled: list[str] = []
        try:
            check_atr(card.connect())
            app = select_purse(card)
            return self._cpu(card, app, journalled)
        except Mac2NotVerified as err:
            record = self._store_cpu(err.transaction, journalled[0] if journalled else None)
            return TapResult("ok", f"{self._ok_line(record)}  (warning: PSAM refused the card's MAC2)", record)
        except CardGone as err:
            if journalled:
                return TapResult("torn", f"TORN     card left during payment, tap again to finish ({err})")
            return TapResult("error", f"ERROR    card left, nothing charged ({err})")
        except TransactionError as err:
            if journalled and err.step in _COMMIT_STEPS and SW.known(err.sw) is not None:
                self.outbox.drop_pending(journalled[0])  # a spec refusal of DEBIT/CREDIT: nothing changed
            elif journalled:
                return TapResult("torn", f"TORN     {err}; tap again to finish")
            return TapResult("refused" if err.sw is not None else "error", f"REFUSED  {err}")
        finally:
            card.disconnect()

    def _cpu(self, card: Reader, app: PublicData, journalled: list[str]) -> TapResult:
        serial = app.application_serial.hex()
        if serial in self._hot:
            block_card(card, self.sam, app)
            return TapResult("refused", f"REFUSED  card {serial} is hotlisted: application blocked")
        key = f"cpu:{serial}"
        intent = self.outbox.pending(key)
        if intent is not None:
            interrupted = _intent_transaction(intent)
            try:
                if interrupted.txn_type == TYPE_LOAD:
                    assert self.host is not None
                    done = load_outcome(card, self.host, interrupted)
                else:
                    done = purchase_outcome(card, interrupted)
            except Unsettled as err:
                self.outbox.set_aside(key)
                log.warning("card %s: %s; set aside, charging afresh", serial, err)
                done = None
            else:
                if done is not None:
                    record = self.outbox.append(_completed(intent, done.tac), key)
                    return TapResult("ok", f"{self._ok_line(record)}  (finished the interrupted payment)", record)
                self.outbox.drop_pending(key)
                log.info("card %s: interrupted payment did not happen; charging afresh", serial)

        def journal(txn: PurseTransaction) -> None:
            self.outbox.set_pending(key, self._fields(txn) | {"txn_type": txn.txn_type})
            journalled.append(key)

        if self.config.kind is Kind.TOPUP:
            assert self.host is not None
            try:
                txn = load(
                    card,
                    self.host,
                    self.config.terminal,
                    self.config.amount,
                    self.clock(),
                    app=app,
                    before_credit=journal,
                )
            except HostRefusal as err:
                return TapResult("refused", f"REFUSED  issuer host: {err}")
            record = self._store_cpu(txn, key)
            return TapResult("ok", self._ok_line(record), record)

        now = self.clock()
        amount, trip = self.config.amount, None
        if self.config.kind in (Kind.METRO_ENTRY, Kind.METRO_EXIT):
            amount, trip = self._metro(card, now)
        txn = purchase(card, self.sam, self.config.terminal, amount, now, trip, app=app, before_debit=journal)
        record = self._store_cpu(txn, key if journalled else None)
        return TapResult("ok", self._ok_line(record), record)

    def _metro(self, card: Reader, now: dt.datetime) -> tuple[int, Callable[[int], bytes]]:
        """Fare and trip record of a gate: entry pays 0; exit pays by distance from the entry on the card."""
        entry = self.config.kind is Kind.METRO_ENTRY
        amount = 0
        if not entry:
            trips = read_records(card, SFI_TRIPS, 1)
            last = parse_trip(trips[0]) if trips else None
            assert self.fares is not None
            amount = exit_fare(self.city_fares, self.fares, self.config.city, last, self.station, now)
        station = self.station

        def record(balance_after: int) -> bytes:
            return trip_record(
                TRIP_ENTRY if entry else TRIP_EXIT,
                self.config.terminal,
                station.line,
                station.code,
                amount,
                balance_after,
                now,
                self.config.city,
                self.psam_serial,
            )

        return amount, record

    def _fields(self, txn: PurseTransaction) -> dict[str, Any]:
        metro = self.config.kind in (Kind.METRO_ENTRY, Kind.METRO_EXIT)
        fields: dict[str, Any] = {
            "kind": self.config.kind.wire,
            "tech": "cpu",
            "card": {"issuer": txn.city, "serial": txn.application_serial.hex()},
            "card_counter": txn.card_counter,
            "amount": txn.amount,
            "balance_before": txn.balance_before,
            "balance_after": txn.balance_after,
            "terminal": txn.terminal.hex().upper(),
            "terminal_seq": txn.terminal_seq,
            "psam": self.psam_serial.hex().upper(),
            "acquirer": self.config.city,
            "time": txn.when.isoformat(timespec="seconds"),
            "tac": txn.tac.hex().upper(),
            "key_version": txn.key_version,
            "alg": txn.algorithm.value,
        }
        if metro:
            fields |= {"line": self.config.line, "station": self.config.station}
        return fields

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
        """One M1 card presentation (buses only: M1 cards carry no trip log)."""
        journalled: list[str] = []
        try:
            return self._m1(chip, journalled)
        except TransactionError as err:
            return TapResult("error", f"ERROR    {err}")
        except M1Error as err:
            if journalled:
                return TapResult("torn", f"TORN     {err}; tap again to finish")
            return TapResult("refused", f"REFUSED  {err}")

    def _m1(self, chip: M1Chip, journalled: list[str]) -> TapResult:
        uid_bytes, _, _ = chip.anticollision()
        uid = uid_bytes.hex().upper()
        if self.config.kind is not Kind.BUS:
            return TapResult("refused", f"REFUSED  M1 card {uid}: only bus terminals take M1 cards")
        if uid in self._hot:
            return TapResult("refused", f"REFUSED  M1 card {uid} is hotlisted")
        issuer, key_b = self._m1_purse_key(chip, uid_bytes)
        key = f"m1:{uid}"
        intent = self.outbox.pending(key)
        if intent is not None:
            chip.power_on()
            txn = _m1_intent(intent)
            try:
                finished = m1_outcome(M1Reader(chip, txn.uid), key_b, txn)
            except M1Unsettled as err:
                self.outbox.set_aside(key)
                log.warning("M1 card %s: %s; set aside, charging afresh", uid, err)
                finished = False
            else:
                if not finished:
                    self.outbox.drop_pending(key)
            if finished:
                record = self._store_m1(txn, issuer, key)
                return TapResult("ok", f"{self._ok_line(record)}  (finished the interrupted payment)", record)

        def journal(txn: M1Transaction) -> None:
            self.outbox.set_pending(key, _m1_fields(txn))
            journalled.append(key)

        chip.power_on()
        txn = m1_purchase(
            M1Reader(chip, int.from_bytes(uid_bytes)),
            key_b,
            self.config.terminal,
            self.config.amount,
            self.clock(),
            before_write=journal,
        )
        record = self._store_m1(txn, issuer, key)
        return TapResult("ok", self._ok_line(record), record)

    def _m1_purse_key(self, chip: M1Chip, uid: bytes) -> tuple[str, int]:
        """Find the card's issuer and purse key B: the PSAM derives the candidates of each accepted city
        (diversified, then shared); a card on factory keys names its issuer in block 1."""
        uid_int = int.from_bytes(uid)
        for city in self.accepted_cities:
            for scheme in (KeyScheme.DIVERSIFIED, KeyScheme.SHARED):
                apdu = M1SectorKeys(PURSE_SECTOR, city, self.config.key_version, scheme, uid).to_apdu()
                keys = SectorKeys.from_bytes(exchange(self.sam, "PSAM M1 SECTOR KEYS", apdu, SectorKeys.size()))
                if _authenticates(chip, uid_int, int.from_bytes(keys.key_b)):
                    return city, int.from_bytes(keys.key_b)
        if _authenticates(chip, uid_int, DEFAULT_KEY):
            chip.power_on()
            reader = M1Reader(chip, uid_int)
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
        fields = {
            "kind": "purchase",
            "tech": "m1",
            "card": {"issuer": issuer, "uid": uid.hex().upper()},
            "card_counter": txn.counter,
            "amount": txn.amount,
            "balance_before": txn.balance_before,
            "balance_after": txn.balance_after,
            "terminal": self.terminal_hex,
            "terminal_seq": answer.seq,
            "psam": self.psam_serial.hex().upper(),
            "acquirer": self.config.city,
            "time": txn.when.isoformat(timespec="seconds"),
            "tac": answer.mac.hex().upper(),
            "key_version": self.config.key_version,
            "alg": Algorithm.SM4.value,
        }
        return self.outbox.append(fields, pending)


def _authenticates(chip: M1Chip, uid: int, key_b: int) -> bool:
    chip.power_on()
    try:
        M1Reader(chip, uid).authenticate(4 * PURSE_SECTOR, key_b, 0x61)
    except M1Error:
        return False
    return True


def _intent_transaction(intent: dict[str, Any]) -> PurseTransaction:
    """The journalled purchase, rebuilt for ``purchase_outcome``."""
    return PurseTransaction(
        bytes.fromhex(intent["card"]["serial"]),
        intent["card"]["issuer"],
        Algorithm(intent["alg"]),
        intent["key_version"],
        int(intent["txn_type"]),
        intent["amount"],
        intent["balance_before"],
        intent["balance_after"],
        intent["card_counter"],
        bytes.fromhex(intent["terminal"]),
        intent["terminal_seq"],
        dt.datetime.fromisoformat(intent["time"]),
        b"",
    )


def _completed(intent: dict[str, Any], tac: bytes) -> dict[str, Any]:
    fields = {k: v for k, v in intent.items() if k != "txn_type"}
    return fields | {"tac": tac.hex().upper()}


def _m1_fields(txn: M1Transaction) -> dict[str, Any]:
    return {
        "uid": txn.uid,
        "counter": txn.counter,
        "amount": txn.amount,
        "balance_before": txn.balance_before,
        "terminal": txn.terminal.hex(),
        "time": txn.when.isoformat(),
    }


def _m1_intent(intent: dict[str, Any]) -> M1Transaction:
    amount, before = int(intent["amount"]), int(intent["balance_before"])
    return M1Transaction(
        int(intent["uid"]),
        int(intent["counter"]),
        amount,
        before,
        before - amount,
        bytes.fromhex(intent["terminal"]),
        dt.datetime.fromisoformat(intent["time"]),
    )
