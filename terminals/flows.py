"""Purse transactions as sequences of APDU steps over a card reader and a PSAM (spec card.md A and B)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, replace

from cardsim import commands, crypto
from cardsim.apdu import SW, split_response
from cardsim.bcd import bcd_date, bcd_time
from cardsim.commands import (
    ComputeBlockMac,
    Credit,
    Debit,
    Initialize,
    InitializeAnswer,
    InitKind,
    InitSamForPurchase,
    PurchaseProof,
    SequencedMac,
)
from cardsim.crypto import Algorithm
from cardsim.issuer import IssuerHost, LoadRequest
from cardsim.keys import city_of_serial
from cardsim.log_record import LogRecord
from cardsim.purse import AID, LOG_RECORDS, SFI_LOG, SFI_TRIPS, TYPE_COMPOUND, TYPE_LOAD, TYPE_PURCHASE, PublicData
from terminals.limits import MAX_FEN
from terminals.reader import CardGone, Reader


class TransactionError(Exception):
    """A step did not succeed; ``sw`` is the status word when the card or PSAM answered one, or the refusal a
    genuine card would have answered where the terminal refuses for a card outside the spec (so a tap reads
    REFUSED, not ERROR)."""

    def __init__(self, step: str, message: str, sw: int | None = None) -> None:
        super().__init__(f"{step}: {message}")
        self.step = step
        self.sw = sw


class Unsettled(TransactionError):
    """An interrupted payment the card shows but can no longer prove: the terminal cannot finish it."""


class Mac2NotVerified(TransactionError):
    """The card committed the purchase (it gave a TAC) but the PSAM did not accept its MAC2: the money is taken,
    so the transaction must be recorded; the clearing judges the TAC."""

    def __init__(self, transaction: PurseTransaction, message: str) -> None:
        super().__init__("CREDIT SAM FOR PURCHASE", message)
        self.transaction = transaction


def exchange(reader: Reader, step: str, apdu: bytes, response_len: int | None) -> bytes:
    """Send one APDU, require 9000 and (when given) exactly ``response_len`` data bytes."""
    raw = reader.transmit(apdu)
    try:
        data, sw = split_response(raw)
    except ValueError as err:
        raise TransactionError(step, str(err)) from err
    if sw != SW.OK:
        raise TransactionError(step, f"answered {SW.wording(sw)}", sw)
    if response_len is not None and len(data) != response_len:
        raise TransactionError(step, f"answered {len(data)} bytes, expected {response_len}")
    return data


def select_purse(card: Reader) -> PublicData:
    """SELECT the purse application and decode the FCI (tag 9F0C carries SFI 0x15)."""
    fci = exchange(card, "SELECT", commands.select(AID), None)
    marker = fci.find(b"\x9f\x0c\x1e")
    if not fci.startswith(b"\x6f") or marker < 0 or len(fci) < marker + 3 + 30:
        raise TransactionError("SELECT", "FCI does not carry the 30-byte public data (9F0C)")
    public = fci[marker + 3 : marker + 33]
    try:
        city_of_serial(public[12:20])
    except ValueError as err:
        raise TransactionError("SELECT", str(err)) from err
    return PublicData(public)


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
    trip_record: bytes | Callable[[int], bytes] | None = None,
    *,
    app: PublicData | None = None,
    before_debit: Callable[[PurseTransaction], None] | None = None,
) -> PurseTransaction:
    """(SELECT,) INITIALIZE, (UPDATE CAPP DATA CACHE,) PSAM MAC1, DEBIT, PSAM checks MAC2.

    With ``trip_record`` (bytes, or a function of the balance after) it is a compound purchase (metro) that also
    writes the 0x1E trip log. ``app`` skips
    the SELECT when the caller has just done it. ``before_debit`` gets the transaction (without TAC) before
    DEBIT is sent, so a terminal can journal it: if the card answers nothing to DEBIT the outcome is unknown
    until ``purchase_outcome`` asks the card on its next tap.
    """
    app = app or select_purse(card)
    compound = trip_record is not None
    txn_type = TYPE_COMPOUND if compound else TYPE_PURCHASE
    init = _initialize(card, Initialize(InitKind.COMPOUND if compound else InitKind.PURCHASE, amount, terminal))
    algorithm = _algorithm("INITIALIZE FOR PURCHASE", init)
    balance, counter = init.balance, init.counter
    if balance > MAX_FEN:  # a card that wrapped or ignored its maximum: no record could carry the purchase
        raise TransactionError(
            "INITIALIZE FOR PURCHASE",
            f"the card holds {balance} fen, past what a transaction record carries ({MAX_FEN}); not charged",
            SW.CONDITIONS_NOT_SATISFIED,
        )
    if amount > balance:  # a card that lets a purse go below zero: not charged, whatever it would do
        raise TransactionError(
            "INITIALIZE FOR PURCHASE",
            f"the card accepted {amount} fen on a balance of {balance} fen; not charged",
            SW.INSUFFICIENT_BALANCE,
        )
    if trip_record is not None:
        trip = trip_record(balance - amount) if callable(trip_record) else trip_record
        exchange(card, "UPDATE CAPP DATA CACHE", commands.update_capp_data_cache(SFI_TRIPS, trip), 0)
    date, time = bcd_date(when), bcd_time(when)
    sam_init = InitSamForPurchase(
        init.random, counter, amount, txn_type, date, time, init.key_version, init.algorithm_id, app.card_serial
    )
    mac1 = SequencedMac.from_bytes(exchange(sam, "INIT SAM FOR PURCHASE", sam_init.to_apdu(), SequencedMac.size()))
    intent = PurseTransaction(
        app.application_serial,
        app.city,
        algorithm,
        init.key_version,
        txn_type,
        amount,
        balance,
        balance - amount,
        counter,
        terminal,
        mac1.seq,
        when,
        b"",
    )
    if before_debit is not None:
        before_debit(intent)
    debit = Debit(mac1.seq, date, time, mac1.mac)
    proof = PurchaseProof.from_debit_answer(exchange(card, "DEBIT FOR PURCHASE", debit.to_apdu(), Debit.LE))
    done = replace(intent, tac=proof.tac, mac2=proof.mac2)
    try:
        exchange(sam, "CREDIT SAM FOR PURCHASE", commands.credit_sam_for_purchase(done.mac2), 0)
    except (TransactionError, CardGone) as err:
        raise Mac2NotVerified(done, str(err)) from err
    return done


def _initialize(card: Reader, command: Initialize) -> InitializeAnswer:
    step = "INITIALIZE FOR LOAD" if command.kind == InitKind.LOAD else "INITIALIZE FOR PURCHASE"
    answer = exchange(card, step, command.to_apdu(), command.kind.answer_length)
    return InitializeAnswer.from_bytes(answer, load=command.kind == InitKind.LOAD)


def _algorithm(step: str, init: InitializeAnswer) -> Algorithm:
    try:
        return Algorithm.from_id(init.algorithm_id)
    except ValueError as err:
        raise TransactionError(step, str(err)) from err


def read_records(card: Reader, sfi: int, most: int) -> list[bytes]:
    """READ RECORD 1, 2, ... of a cyclic file until the card has no more (6A83, or 6A82: no such file) or
    ``most`` are read; TransactionError for any other answer."""
    records = []
    for number in range(1, most + 1):
        raw = card.transmit(commands.read_record(sfi, number))
        try:
            data, sw = split_response(raw)
        except ValueError as err:
            raise TransactionError("READ RECORD", str(err)) from err
        if sw in (SW.RECORD_NOT_FOUND, SW.FILE_NOT_FOUND):
            break
        if sw != SW.OK:
            raise TransactionError("READ RECORD", f"answered {sw:04X}", sw)
        records.append(data)
    return records


def _log_entry(txn: PurseTransaction) -> bytes:
    """The SFI 0x18 record the card writes for ``txn``."""
    return LogRecord(
        txn.card_counter, txn.amount, txn.txn_type, txn.terminal, bcd_date(txn.when), bcd_time(txn.when)
    ).to_bytes()


def purchase_outcome(card: Reader, intent: PurseTransaction) -> PurseTransaction | None:
    """Whether an interrupted purchase was committed, asked of the card (selected, same serial).

    The card's transaction log tells whether a purchase with that counter, amount, terminal and time exists;
    if so GET TRANSACTION PROVE gives its TAC (and MAC2) and the completed transaction is returned; if the log
    has no such entry the purchase did not happen (None). ``Unsettled`` when the card shows the purchase but
    can no longer prove it (used elsewhere since).
    """
    if _log_entry(intent) not in read_records(card, SFI_LOG, LOG_RECORDS):
        return None
    apdu = commands.get_transaction_prove(intent.txn_type, intent.card_counter)
    try:
        proof = PurchaseProof.from_prove_answer(exchange(card, "GET TRANSACTION PROVE", apdu, 8))
    except TransactionError as err:
        if err.sw == SW.RECORD_NOT_FOUND:
            raise Unsettled(
                err.step, "the card made the payment but no longer proves it (used elsewhere since)"
            ) from err
        raise
    return replace(intent, mac2=proof.mac2, tac=proof.tac)


def block_card(card: Reader, sam: Reader, app: PublicData) -> None:
    """APPLICATION BLOCK a (selected) hotlisted card: INITIALIZE (for the key version and algorithm, nothing is
    committed), GET CHALLENGE, PSAM COMPUTE BLOCK MAC, APPLICATION BLOCK."""
    init = _initialize(card, Initialize(InitKind.PURCHASE, 0, bytes(6)))
    challenge = exchange(card, "GET CHALLENGE", commands.get_challenge(4), 4)
    block_mac = ComputeBlockMac(app.card_serial, challenge, init.key_version, init.algorithm_id)
    mac = exchange(sam, "PSAM COMPUTE BLOCK MAC", block_mac.to_apdu(), ComputeBlockMac.LE)
    exchange(card, "APPLICATION BLOCK", commands.application_block(mac), 0)


_LOAD_REFUSED = "the load would take the balance above the card's maximum (or its load counter is used up)"


def load(
    card: Reader,
    host: IssuerHost,
    terminal: bytes,
    amount: int,
    when: dt.datetime,
    *,
    app: PublicData | None = None,
    before_credit: Callable[[PurseTransaction], None] | None = None,
) -> PurseTransaction:
    """(SELECT,) INITIALIZE FOR LOAD, host checks MAC1 and returns MAC2, CREDIT FOR LOAD.

    ``before_credit`` gets the transaction (without TAC) before CREDIT is sent, for a terminal's journal;
    ``load_outcome`` settles an interrupted one on the card's next tap.
    """
    app = app or select_purse(card)
    try:
        init = _initialize(card, Initialize(InitKind.LOAD, amount, terminal))
    except TransactionError as err:
        if err.sw != SW.CONDITIONS_NOT_SATISFIED:
            raise
        raise TransactionError(err.step, f"answered {SW.wording(err.sw)}: {_LOAD_REFUSED}", err.sw) from err
    if init.balance + amount > MAX_FEN:
        # only a card that ignores its maximum balance gets here: refused before the issuer authorises anything
        raise TransactionError(
            "INITIALIZE FOR LOAD",
            f"balance {init.balance} + {amount} fen is past what any purse may hold; not loaded",
            SW.CONDITIONS_NOT_SATISFIED,
        )
    date, time = bcd_date(when), bcd_time(when)
    algorithm = _algorithm("INITIALIZE FOR LOAD", init)
    mac2 = host.authorize_load(
        LoadRequest(
            app.card_serial,
            init.key_version,
            init.algorithm_id,
            init.random,
            init.counter,
            init.balance,
            amount,
            terminal,
            init.mac1,
            date,
            time,
        )
    )
    intent = PurseTransaction(
        app.application_serial,
        app.city,
        algorithm,
        init.key_version,
        TYPE_LOAD,
        amount,
        init.balance,
        init.balance + amount,
        init.counter,
        terminal,
        0,
        when,
        b"",
    )
    if before_credit is not None:
        before_credit(intent)
    tac = exchange(card, "CREDIT FOR LOAD", Credit(date, time, mac2).to_apdu(), Credit.LE)
    return replace(intent, tac=tac)


def load_outcome(card: Reader, host: IssuerHost, intent: PurseTransaction) -> PurseTransaction | None:
    """Whether an interrupted load was credited, from the card's transaction log. The card keeps no proof of
    loads, so the issuer host (which authorised it and holds the TAC keys) computes the TAC of a load the log
    shows; None when the log has no such load."""
    if _log_entry(intent) not in read_records(card, SFI_LOG, LOG_RECORDS):
        return None
    date, time = bcd_date(intent.when), bcd_time(intent.when)
    card_serial = intent.application_serial[2:]
    data = crypto.load_tac_data(
        intent.balance_after, intent.card_counter, intent.amount, TYPE_LOAD, intent.terminal, date, time
    )
    return replace(intent, tac=host.tac_key(card_serial, intent.key_version, intent.algorithm).mac(data))
