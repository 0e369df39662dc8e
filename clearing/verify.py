"""Checking a record's TAC (CPU cards) or terminal MAC (M1 cards) with the issuer's keys."""

from __future__ import annotations

from collections.abc import Sequence

from cardsim import crypto
from cardsim.bcd import bcd_date, bcd_time
from cardsim.crypto import Algorithm
from cardsim.issuer import HostRefusal, IssuerHost
from cardsim.purse import TYPE_COMPOUND, TYPE_LOAD, TYPE_PURCHASE
from terminals.messages import TxnRecord

_TXN_TYPE = {"purchase": TYPE_PURCHASE, "metro_entry": TYPE_COMPOUND, "metro_exit": TYPE_COMPOUND, "load": TYPE_LOAD}


def expected_tac(host: IssuerHost, record: TxnRecord) -> bytes:
    """The TAC (CPU) or M1 record MAC the record must carry; HostRefusal when the keys are missing."""
    when = record.moment
    date, time = bcd_date(when), bcd_time(when)
    terminal = bytes.fromhex(record.terminal)
    if record.tech == "m1":
        uid = bytes.fromhex(str(record.card.uid))
        data = crypto.m1_record_data(
            uid,
            record.card_counter,
            record.amount,
            record.balance_before,
            record.balance_after,
            terminal,
            record.terminal_seq,
            date,
            time,
        )
        return host.m1_record_key(record.card.issuer, record.key_version, uid).mac(data)
    serial = bytes.fromhex(str(record.card.serial))[2:]
    if serial[:2].hex() != record.card.issuer:
        raise HostRefusal(f"card serial does not belong to issuer {record.card.issuer}")
    key = host.tac_key(serial, record.key_version, Algorithm(record.alg))
    txn_type = _TXN_TYPE[record.kind]
    if txn_type == TYPE_LOAD:
        data = crypto.load_tac_data(
            record.balance_after, record.card_counter, record.amount, txn_type, terminal, date, time
        )
    else:
        data = crypto.purchase_tac_data(record.amount, txn_type, terminal, record.terminal_seq, date, time)
    return key.mac(data)


def tac_problem(host: IssuerHost, record: TxnRecord) -> str | None:
    """None when the record's TAC (or M1 record MAC) verifies with the issuer keys, else the reason."""
    try:
        expected = expected_tac(host, record)
    except HostRefusal as err:
        return str(err)
    if expected.hex().upper() != record.tac:
        return "TAC does not verify" if record.tech == "cpu" else "M1 record MAC does not verify"
    return None


def tac_problems(host: IssuerHost, records: Sequence[TxnRecord]) -> list[str | None]:
    """``tac_problem`` for many records at once, verdict for verdict in the same order."""
    return [tac_problem(host, record) for record in records]
