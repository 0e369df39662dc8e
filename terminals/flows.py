"""Purse transactions as sequences of APDU steps over a card reader and a PSAM (spec card.md A and B)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cardsim.apdu import SW, split_response
from cardsim.bcd import bcd_date, bcd_time
from cardsim.crypto import Algorithm
from cardsim.issuer import IssuerHost, LoadRequest
from cardsim.keys import city_of_serial
from cardsim.purse import AID, TYPE_COMPOUND, TYPE_LOAD, TYPE_PURCHASE, PublicData
from terminals.reader import Reader


class TransactionError(Exception):
    """A step did not succeed; ``sw`` is the status word when the card or PSAM answered one."""

    def __init__(self, step: str, message: str, sw: int | None = None) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.sw = sw


def exchange(reader: Reader, step: str, apdu: bytes, response_len: int | None) -> bytes:
    """Send one APDU, require 9000 and (when given) exactly ``response_len`` data bytes."""
    raw = reader.transmit(apdu)
    try:
        data, sw = split_response(raw)
    except ValueError as err:
        raise TransactionError(step, str(err)) from err
    if sw != SW.OK:
        name = SW(sw).describe() if sw in SW._value2member_map_ else f"{sw:04X}"
        raise TransactionError(step, f"answered {name}", sw)
    if response_len is not None and len(data) != response_len:
        raise TransactionError(step, f"answered {len(data)} bytes, expected {response_len}")
    return data


def select_purse(card: Reader) -> PublicData:
    """SELECT the purse application and decode the FCI (tag 9F0C carries SFI 0x15)."""
    fci = exchange(card, "SELECT", bytes.fromhex("00A40400") + bytes([len(AID)]) + AID, None)
    marker = fci.find(b"\x9f\x0c\x1e")
    if not fci.startswith(b"\x6f") or marker < 0 or len(fci) < marker + 3 + 30:
        raise TransactionError("SELECT", "FCI does not carry the 30-byte public data (9F0C)")
    public = fci[marker + 3 : marker + 33]
    try:
        city_of_serial(public[12:20])
    except ValueError as err:
        raise TransactionError("SELECT", str(err)) from err
    return PublicData(public)


def psam_terminal_number(sam: Reader) -> bytes:
    """The 6-byte terminal number held by the PSAM (its SFI 0x16)."""
    return exchange(sam, "PSAM READ BINARY", bytes.fromhex("00B0960006"), 6)


@dataclass(frozen=True)
class PurseTransaction:
    """A completed purse transaction as the terminal saw it: enough for a clearing record."""

    application_serial: bytes
    city: str
    algorithm: Algorithm
    key_version: int
    txn_type: int
    amount: int
    balance_before: int
    balance_after: int
    card_counter: int
    terminal: bytes
    terminal_seq: int
    when: dt.datetime
    tac: bytes
    mac2: bytes = b""


def purchase(
    card: Reader,
    sam: Reader,
    terminal: bytes,
    amount: int,
    when: dt.datetime,
    trip_record: bytes | None = None,
) -> PurseTransaction:
    """SELECT, INITIALIZE, (UPDATE CAPP DATA CACHE,) PSAM MAC1, DEBIT, PSAM checks MAC2.

    With ``trip_record`` it is a compound purchase (metro) that also writes the 0x1E trip log.
    CardGone from the DEBIT step means the outcome is unknown: recover with GET TRANSACTION PROVE.
    """
    app = select_purse(card)
    compound = trip_record is not None
    txn_type = TYPE_COMPOUND if compound else TYPE_PURCHASE
    init = bytes([0x80, 0x50, 0x03 if compound else 0x01, 0x02, 0x0B, 0x01]) + amount.to_bytes(4) + terminal
    r = exchange(card, "INITIALIZE FOR PURCHASE", init + b"\x0f", 15)
    balance, counter, key_version, algorithm_id, random = (
        int.from_bytes(r[0:4]),
        int.from_bytes(r[4:6]),
        r[9],
        r[10],
        r[11:15],
    )
    try:
        algorithm = Algorithm.from_id(algorithm_id)
    except ValueError as err:
        raise TransactionError("INITIALIZE FOR PURCHASE", str(err)) from err
    if trip_record is not None:
        exchange(card, "UPDATE CAPP DATA CACHE", bytes.fromhex("80DC00F030") + trip_record, 0)
    date, time = bcd_date(when), bcd_time(when)
    sam_init = (
        bytes.fromhex("807000001C")
        + random
        + counter.to_bytes(2)
        + amount.to_bytes(4)
        + bytes([txn_type])
        + date
        + time
        + bytes([key_version, algorithm_id])
        + app.card_serial
    )
    s = exchange(sam, "INIT SAM FOR PURCHASE", sam_init + b"\x08", 8)
    terminal_seq, mac1 = int.from_bytes(s[0:4]), s[4:8]
    d = exchange(card, "DEBIT FOR PURCHASE", bytes.fromhex("805401000F") + s[0:4] + date + time + mac1 + b"\x08", 8)
    tac, mac2 = d[0:4], d[4:8]
    exchange(sam, "CREDIT SAM FOR PURCHASE", bytes.fromhex("8072000004") + mac2, 0)
    return PurseTransaction(
        app.application_serial,
        app.city,
        algorithm,
        key_version,
        txn_type,
        amount,
        balance,
        balance - amount,
        counter,
        terminal,
        terminal_seq,
        when,
        tac,
        mac2,
    )


def load(card: Reader, host: IssuerHost, terminal: bytes, amount: int, when: dt.datetime) -> PurseTransaction:
    """SELECT, INITIALIZE FOR LOAD, host checks MAC1 and returns MAC2, CREDIT FOR LOAD."""
    app = select_purse(card)
    init = bytes.fromhex("805000020B01") + amount.to_bytes(4) + terminal + b"\x10"
    r = exchange(card, "INITIALIZE FOR LOAD", init, 16)
    balance, counter, key_version, algorithm_id, random, mac1 = (
        int.from_bytes(r[0:4]),
        int.from_bytes(r[4:6]),
        r[6],
        r[7],
        r[8:12],
        r[12:16],
    )
    date, time = bcd_date(when), bcd_time(when)
    try:
        algorithm = Algorithm.from_id(algorithm_id)
    except ValueError as err:
        raise TransactionError("INITIALIZE FOR LOAD", str(err)) from err
    mac2 = host.authorize_load(
        LoadRequest(
            app.card_serial, key_version, algorithm_id, random, counter, balance, amount, terminal, mac1, date, time
        )
    )
    tac = exchange(card, "CREDIT FOR LOAD", bytes.fromhex("805200000B") + date + time + mac2 + b"\x04", 4)
    return PurseTransaction(
        app.application_serial,
        app.city,
        algorithm,
        key_version,
        TYPE_LOAD,
        amount,
        balance,
        balance + amount,
        counter,
        terminal,
        0,
        when,
        tac,
    )
