"""An M1 card behind a virtual ACR122U-like reader: the PC/SC Part 3 pseudo-APDUs (``cardsim.part3``), in process
and through pcscd + vpcd with pcsc_scan and scriptor."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import ServedCard

from cardsim.image import load_card, save_card
from cardsim.m1_issue import KeyScheme, issue_m1_card
from cardsim.mifare import M1State, Profile, value_block
from cardsim.part3 import PART3_ATR, Part3Reader
from terminals.pcsc import PcscReader, list_readers
from yikatong.card_cli import part3_reader

READER = "Virtual PCD 00 00"

UID = bytes.fromhex("A1B2C3D4")
KEY_A = "FFFFFFFFFFFF"  # default keys: A and B both FF..FF


def card(balance: int = 1234) -> M1State:
    """A default-key M1 purse card (sector 1: value blocks 4/5 writable with key B only)."""
    return issue_m1_card(UID, Profile.GENUINE, KeyScheme.DEFAULT, balance, bytes(16))


def send(reader: Part3Reader, apdu: str) -> str:
    """Hex in, hex out (upper case, no spaces)."""
    return reader.transmit(bytes.fromhex(apdu)).hex().upper()


def powered(state: M1State) -> Part3Reader:
    reader = part3_reader(state)
    assert reader.power_on() == PART3_ATR
    return reader


def test_atr_is_the_part3_mifare_classic_1k_atr_with_a_correct_tck() -> None:
    tck = 0
    for b in PART3_ATR[1:-1]:
        tck ^= b
    assert PART3_ATR[-1] == tck and PART3_ATR[13:15] == b"\x00\x01"


def test_uid() -> None:
    reader = powered(card())
    assert send(reader, "FFCA000000") == "A1B2C3D49000"
    assert send(reader, "FFCA010000") == "6A81"


def test_auth_with_right_and_wrong_key() -> None:
    state = card()
    reader = powered(state)
    assert send(reader, "FF860000050100046000") == "6300"  # no key in slot 00 yet
    assert send(reader, "FF82000006" + KEY_A) == "9000"
    assert send(reader, "FF82000106A0A1A2A3A4A5") == "9000"
    assert send(reader, "FF860000050100046001") == "6300"  # wrong key
    assert send(reader, "FFB0000410") == "6300"  # a failed authentication leaves none
    assert send(reader, "FF860000050100046000") == "9000"
    assert send(reader, "FFB0000410") == state.blocks[4].hex().upper() + "9000"


def test_read_without_auth_and_outside_the_sector() -> None:
    reader = powered(card())
    assert send(reader, "FFB0000410") == "6300"
    send(reader, "FF82000006FFFFFFFFFFFF")
    assert send(reader, "FF860000050100046000") == "9000"
    assert send(reader, "FFB0000810") == "6300"  # sector 2 needs its own authentication
    assert send(reader, "FFB0000410") == "6300"  # the card's NAK ended the session


def test_update_then_read_back_and_access_conditions() -> None:
    state = card()
    reader = powered(state)
    send(reader, "FF82000006FFFFFFFFFFFF")
    data = bytes(range(16)).hex().upper()
    assert send(reader, "FF860000050100046000") == "9000"
    assert send(reader, "FFD6000610" + data) == "6300"  # block 6 (100): write with key B only
    assert send(reader, "FF860000050100046100") == "9000"
    assert send(reader, "FFD6000610" + data) == "9000"
    assert send(reader, "FFB0000610") == data + "9000"
    assert state.blocks[6].hex().upper() == data
    assert send(reader, "FFD6000010" + data) == "6300"  # block 0 is read-only
    assert send(reader, "FFB0004010") == "6300"  # no block 64


def test_value_operations() -> None:
    state = card(100)
    reader = powered(state)
    send(reader, "FF82000006FFFFFFFFFFFF")
    assert send(reader, "FF860000050100046100") == "9000"
    assert send(reader, "FFB1000404") == "000000649000"
    assert send(reader, "FFD700040501000000FF") == "9000"  # +255
    assert send(reader, "FFD7000405020000000A") == "9000"  # -10
    assert send(reader, "FFB1000404") == (345).to_bytes(4).hex().upper() + "9000"
    assert send(reader, "FFD700050500FFFFFFFF") == "9000"  # store -1
    assert state.blocks[5] == value_block(-1, 5)
    assert send(reader, "FFD70004020305") == "9000"  # restore 4 into 5
    assert state.blocks[5][0:4] == (345).to_bytes(4, "little")
    assert send(reader, "FFB1000604") == "6300"  # not a value block


def test_keys_are_volatile_and_bad_apdus_get_status_words() -> None:
    reader = powered(card())
    send(reader, "FF82000006FFFFFFFFFFFF")
    reader.power_on()
    assert send(reader, "FF860000050100046000") == "6300"
    assert send(reader, "FF82000206FFFFFFFFFFFF") == "6300"  # slots 00 and 01 only
    assert send(reader, "FF82000005FFFFFFFFFF") == "6700"
    assert send(reader, "FFB0000400") == "6700"
    assert send(reader, "FF8600000401000460") == "6700"
    assert send(reader, "FF00000000") == "6D00"
    assert send(reader, "00A4040000") == "6E00"
    assert send(reader, "FF") == "6700"


@given(st.binary(max_size=40), st.booleans())
def test_any_bytes_get_a_status_word(apdu: bytes, authenticated: bool) -> None:
    reader = powered(card())
    if authenticated:
        send(reader, "FF82000006FFFFFFFFFFFF")
        send(reader, "FF860000050100046100")
    answer = reader.transmit(apdu)
    assert len(answer) >= 2 and answer[-2] in (0x90, 0x63, 0x67, 0x6A, 0x6D, 0x6E)


@pytest.mark.pcsc
def test_pcsc_scan_names_it_and_scriptor_reads_and_writes(tmp_path: Path) -> None:
    """The outside clients: pcsc_scan names the card from its ATR; scriptor loads a key, authenticates, reads the
    purse value block and writes block 6, which lands in the saved image."""
    assert READER in list_readers(), "run scripts/services.sh to start pcscd with vpcd"
    image = tmp_path / "m1.json"
    save_card(image, card())
    data = bytes(range(16))
    script = tmp_path / "script.txt"
    script.write_text(
        "FF 82 00 00 06 FF FF FF FF FF FF\nFF 86 00 00 05 01 00 04 61 00\nFF B0 00 04 10\n"
        f"FF D6 00 06 10 {data.hex(' ').upper()}\n"
    )
    reader = PcscReader(READER)
    with ServedCard(image) as serve:
        reader.wait_for_card(timeout=20)
        # pcsc_scan runs until stopped; by 8 s it has printed the card and its ATR analysis
        scan = subprocess.run(["timeout", "8", "pcsc_scan"], capture_output=True, text=True, timeout=60)
        assert "3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 6A" in scan.stdout, scan.stdout
        assert "mifare classic 1k" in scan.stdout.lower(), scan.stdout
        done = subprocess.run(["scriptor", "-r", READER, str(script)], capture_output=True, text=True, timeout=60)
        answers = [line for line in done.stdout.splitlines() if line.startswith("<")]
        # scriptor prints a data answer's status word on a line of its own
        assert len(answers) == 4 and done.stdout.count("90 00 : Normal processing.") == 4, done.stdout + done.stderr
        assert answers[2].startswith("< " + card().blocks[4].hex(" ").upper()), done.stdout
    # the next test's card must not meet this one's ATR, which pcscd keeps until vpcd reports the card gone
    assert reader.wait_for_removal(timeout=30), "pcscd still sees the M1 card after card serve stopped"
    assert serve.returncode == 0, serve.output
    assert load_card(image).blocks[6] == data  # type: ignore[union-attr]
