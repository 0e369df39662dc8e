"""Reading a purse card the way a reader app does: files, balance and logs over APDUs only."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from cardsim import commands
from cardsim.apdu import SW
from cardsim.bcd import parse_bcd_date, parse_bcd_datetime
from cardsim.log_record import LogRecord
from cardsim.purse import LOG_RECORDS, SFI_HOLDER, SFI_INTEROP, SFI_LOG, SFI_TRIPS, TRIP_RECORDS
from terminals.flows import TransactionError, exchange, read_records, select_purse
from terminals.reader import Reader

TXN_TYPES = {0x02: "load", 0x06: "purchase", 0x09: "compound"}


def yuan(fen: int) -> str:
    """Integer fen as a yuan amount with two decimals, without floats."""
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100}.{abs(fen) % 100:02d}"


@dataclass(frozen=True)
class LogEntry:
    """One record of the SFI 0x18 transaction log."""

    counter: int
    amount: int
    txn_type: int
    terminal: str
    when: dt.datetime | None


@dataclass
class CardInfo:
    """What a reader app shows of a purse card. ``status`` is 'active' or why the app refused SELECT."""

    status: str
    application_serial: str = ""
    city: str = ""
    start: dt.date | None = None
    expiry: dt.date | None = None
    card_class: int = 0
    interoperable: bool = False
    balance: int = 0
    log: list[LogEntry] = field(default_factory=list)
    trips: int = 0


def _log_entry(raw: bytes) -> LogEntry:
    """A log record as shown; its time is None when the card stored no valid BCD date and time."""
    try:
        record = LogRecord.from_bytes(raw)
    except ValueError as err:
        raise TransactionError("READ RECORD", str(err)) from err
    try:
        when: dt.datetime | None = parse_bcd_datetime(record.date, record.time)
    except ValueError:
        when = None
    return LogEntry(record.counter, record.amount, record.txn_type, record.terminal.hex().upper(), when)


def read_card_info(card: Reader) -> CardInfo:
    """SELECT, READ BINARY 0x15-0x17, GET BALANCE, READ RECORD of the logs."""
    try:
        app = select_purse(card)
    except TransactionError as err:
        if err.sw in (SW.APPLICATION_LOCKED, SW.APPLICATION_BLOCKED):
            return CardInfo(status=SW(err.sw).name.lower().replace("_", " "))
        raise
    pub = app.raw
    holder = exchange(card, "READ BINARY 16", commands.read_binary(SFI_HOLDER), None)
    interop = exchange(card, "READ BINARY 17", commands.read_binary(SFI_INTEROP), None)
    balance = int.from_bytes(exchange(card, "GET BALANCE", commands.get_balance(), 4))
    log = [_log_entry(raw) for raw in read_records(card, SFI_LOG, LOG_RECORDS)]
    start: dt.date | None
    expiry: dt.date | None
    try:
        start, expiry = parse_bcd_date(pub[20:24]), parse_bcd_date(pub[24:28])
    except ValueError:
        start = expiry = None
    return CardInfo(
        status="active",
        application_serial=app.application_serial.hex().upper(),
        city=app.city,
        start=start,
        expiry=expiry,
        card_class=holder[0] if holder else 0,
        interoperable=interop[8:10] == b"\x00\x01",
        balance=balance,
        log=log,
        trips=len(read_records(card, SFI_TRIPS, TRIP_RECORDS)),
    )
