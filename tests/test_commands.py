"""The typed command layer encodes the exact bytes the spec (card.md) lays down, and decodes them back."""

from __future__ import annotations

import dataclasses

import pytest

from cardsim import commands
from cardsim.apdu import parse_command
from cardsim.commands import (
    ComputeBlockMac,
    Credit,
    Debit,
    InitSamForPurchase,
    M1RecordMac,
    M1SectorKeys,
    PurchaseProof,
    SectorKeys,
    SequencedMac,
)
from cardsim.crypto import Algorithm
from cardsim.eeprom import Eeprom
from cardsim.log_record import LogRecord
from cardsim.m1_issue import KeyScheme
from cardsim.purse import PurseKeys, PurseState, PurseUpdate, TransactionProof

TERMINAL = bytes.fromhex("001122334455")
PURCHASE, COMPOUND = commands.InitKind.PURCHASE, commands.InitKind.COMPOUND
SERIAL = bytes.fromhex("4510000000000001")
DATE, TIME = bytes.fromhex("20261124"), bytes.fromhex("081502")


@pytest.mark.parametrize(
    ("apdu", "expected"),
    [
        (commands.select(bytes.fromhex("A000000632010105")), "00A4040008A000000632010105"),
        (commands.read_binary(0x16), "00B0960000"),
        (commands.read_binary(0x16, 6), "00B0960006"),
        (commands.read_record(0x18, 3), "00B203C400"),
        (commands.get_balance(), "805C000204"),
        (commands.get_challenge(8), "0084000008"),
        (commands.update_capp_data_cache(0x1E, bytes(48))[:5], "80DC00F030"),
        (commands.get_transaction_prove(0x09, 0x0102), "805A0009020102" + "08"),
        (commands.application_block(bytes.fromhex("0A0B0C0D")), "841E0000040A0B0C0D"),
        (commands.credit_sam_for_purchase(bytes.fromhex("01020304")), "807200000401020304"),
        (
            commands.Initialize(PURCHASE, 300, TERMINAL).to_apdu(),
            "805001020B010000012C0011223344550F",
        ),
        (
            commands.Initialize(COMPOUND, 300, TERMINAL).to_apdu(),
            "805003020B010000012C0011223344550F",
        ),
        (commands.Initialize(commands.InitKind.LOAD, 700, TERMINAL).to_apdu(), "805000020B01000002BC00112233445510"),
        (Debit(7, DATE, TIME, bytes(4)).to_apdu(), "805401000F00000007" + "20261124081502" + "00000000" + "08"),
        (Credit(DATE, TIME, bytes(4)).to_apdu(), "805200000B" + "20261124081502" + "00000000" + "04"),
        (
            InitSamForPurchase(bytes(4), 5, 300, 0x06, DATE, TIME, 1, 2, SERIAL).to_apdu(),
            "807000001C" + "00000000" + "0005" + "0000012C" + "06" + "20261124081502" + "0102" + SERIAL.hex() + "08",
        ),
        (ComputeBlockMac(SERIAL, bytes(4), 1, 2).to_apdu(), "80FA00000E" + SERIAL.hex() + "00000000" + "0102" + "04"),
        (
            M1SectorKeys(1, "4510", 2, KeyScheme.DIVERSIFIED, bytes.fromhex("01020304")).to_apdu(),
            "80FB010008" + "4510" + "02" + "02" + "01020304" + "0C",
        ),
        (
            M1RecordMac("4510", 2, bytes.fromhex("01020304"), 9, 300, 1000, 700, DATE, TIME).to_apdu(),
            "80FC00001C4510020102030400090000012C000003E8000002BC" + "20261124081502" + "08",
        ),
    ],
)
def test_encoders_send_the_spec_bytes(apdu: bytes, expected: str) -> None:
    assert apdu.hex().upper() == expected.upper()


@pytest.mark.parametrize(
    "message",
    [
        Debit(7, DATE, TIME, bytes.fromhex("0A0B0C0D")),
        Credit(DATE, TIME, bytes.fromhex("0A0B0C0D")),
        InitSamForPurchase(bytes(4), 5, 300, 0x06, DATE, TIME, 1, 2, SERIAL),
        ComputeBlockMac(SERIAL, bytes.fromhex("01020304"), 1, 2),
        M1RecordMac("4510", 2, bytes.fromhex("01020304"), 9, 300, 1000, 700, DATE, TIME),
    ],
)
def test_the_card_side_decodes_what_the_terminal_encodes(
    message: Debit | Credit | InitSamForPurchase | ComputeBlockMac | M1RecordMac,
) -> None:
    cmd = parse_command(message.to_apdu())
    assert type(message).from_bytes(cmd.data) == message
    assert cmd.le == message.LE


def test_answers_round_trip() -> None:
    purchase = commands.InitializeAnswer(1000, 4, 1, 2, bytes.fromhex("01020304"))
    load = commands.InitializeAnswer(1000, 4, 1, 2, bytes.fromhex("01020304"), bytes.fromhex("0A0B0C0D"))
    assert purchase.to_bytes().hex().upper() == "000003E80004" + "000000" + "0102" + "01020304"
    assert commands.InitializeAnswer.from_bytes(purchase.to_bytes(), load=False) == purchase
    assert commands.InitializeAnswer.from_bytes(load.to_bytes(), load=True) == load
    proof = PurchaseProof(tac=bytes.fromhex("01020304"), mac2=bytes.fromhex("0A0B0C0D"))
    assert proof.debit_answer().hex() == "010203040a0b0c0d" and proof.prove_answer().hex() == "0a0b0c0d01020304"
    assert PurchaseProof.from_debit_answer(proof.debit_answer()) == proof
    assert PurchaseProof.from_prove_answer(proof.prove_answer()) == proof
    assert SequencedMac.from_bytes(bytes.fromhex("000000070A0B0C0D")) == SequencedMac(7, bytes.fromhex("0A0B0C0D"))
    assert SectorKeys.from_bytes(bytes(range(12))) == SectorKeys(bytes(range(6)), bytes(range(6, 12)))
    with pytest.raises(ValueError):
        SequencedMac.from_bytes(bytes(7))


def test_log_record_layout() -> None:
    record = LogRecord(0x0102, 300, 0x06, TERMINAL, DATE, TIME)
    raw = record.to_bytes()
    assert raw.hex().upper() == "0102" + "000000" + "0000012C" + "06" + "001122334455" + "20261124081502"
    assert LogRecord.from_bytes(raw) == record
    with pytest.raises(ValueError):
        LogRecord.from_bytes(raw[:-1])


def _state() -> PurseState:
    keys = PurseKeys(bytes(16), bytes(16), bytes(16), bytes(16))
    return PurseState(Algorithm.SM4, 1, keys, bytes(30), b"", b"", balance=0, max_balance=100_000)


def test_a_commit_writes_every_field_of_the_update_and_only_those() -> None:
    state = _state()
    update = PurseUpdate(
        balance=1,
        offline_counter=2,
        online_counter=3,
        log=[b"log"],
        proof=TransactionProof(1, 6, bytes(4), bytes(4)),
        mac_failures=0,
        trips=[b"trip"],
    )
    eeprom = Eeprom()
    eeprom.commit(state, update)
    assert eeprom.writes == 3 + 7  # journal, valid flag, one write per field, journal cleared
    for name, value in update.writes():
        assert getattr(state, name) == value
    assert state.journal is None and state.max_balance == 100_000


def test_a_purse_update_field_the_state_lacks_fails() -> None:
    class Misspelt:
        def writes(self) -> list[tuple[str, object]]:
            return [("balanse", 1)]

    state = _state()
    with pytest.raises(AttributeError):  # slots: a misspelt field cannot become a new attribute
        Eeprom().write_in_place(state, Misspelt())
    assert {f.name for f in dataclasses.fields(PurseUpdate)} <= {f.name for f in dataclasses.fields(PurseState)}
