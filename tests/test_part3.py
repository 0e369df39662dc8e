"""An M1 card behind a virtual ACR122U-like reader: the PC/SC Part 3 pseudo-APDUs (``cardsim.part3``), in process
and through pcscd + vpcd with pcsc_scan and scriptor; the terminal side (``terminals.part3``): M1 purse taps through
the reader, in process and with ``yikatong terminal tap --reader`` publishing to Mosquitto."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from hotlist_support import delta
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_support import mosquitto_sub, private_mosquitto, terminal_purchase, unique_terminal
from support import ServedCard
from terminal_support import m1_card, make_terminal

from cardsim.image import load_card, save_card
from cardsim.m1_issue import KeyScheme, issue_m1_card
from cardsim.mifare import M1State, Profile, parse_value_block, value_block
from cardsim.part3 import PART3_ATR, Part3Reader
from terminals.flows import TransactionError
from terminals.m1 import M1Error
from terminals.messages import TxnRecord, parse_record
from terminals.part3 import Part3Slot, storage_card_name
from terminals.pcsc import PcscReader, list_readers
from terminals.reader import CardGone, InProcessReader
from terminals.terminal import TapOutcome, Terminal
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
        # ATR_analysis reads ~/.cache/smartcard_list.txt before the system list, and leaves it empty when it fails
        # to download one for an unknown ATR (no network here): a cache of its own keeps both out of the test
        cache = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
        scan = subprocess.run(["timeout", "8", "pcsc_scan"], capture_output=True, text=True, timeout=60, env=cache)
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


# --- the terminal side: M1 purse taps through a Part 3 reader (terminals.part3) -------------------------------


def part3_atr(card_name: int) -> bytes:
    """The Part 3 ATR of a storage card named ``card_name``, with its TCK."""
    body = PART3_ATR[:13] + card_name.to_bytes(2) + bytes(4)
    tck = 0
    for b in body[1:]:
        tck ^= b
    return body + bytes([tck])


def records(term: Terminal) -> list[TxnRecord]:
    return [parse_record(json.loads(raw)) for _, raw in term.outbox.unacked(0, 1000)]


class ScriptedReader:
    """A Part 3 reader's firmware with a chosen ATR, and with FF D7 answered by ``d7`` when given (a reader
    without the ACS value command)."""

    def __init__(self, state: M1State, atr: bytes = PART3_ATR, d7: bytes | None = None) -> None:
        self.firmware = part3_reader(state)
        self.atr, self.d7 = atr, d7
        self.sent = 0

    def power_on(self) -> bytes:
        self.firmware.power_on()
        return self.atr

    def transmit(self, apdu: bytes) -> bytes:
        self.sent += 1
        if self.d7 is not None and apdu[:2] == b"\xff\xd7":
            return self.d7
        return self.firmware.transmit(apdu)


class DroppingReader(InProcessReader):
    """The card leaves the Part 3 reader before APDU number ``before_apdu`` (it never arrives)."""

    def __init__(self, state: M1State, before_apdu: int | None) -> None:
        super().__init__(part3_reader(state), "dropping")
        self.sent, self.before_apdu = 0, before_apdu

    def transmit(self, apdu: bytes) -> bytes:
        if self.sent == self.before_apdu:
            raise CardGone("card pulled from the reader")
        self.sent += 1
        return super().transmit(apdu)


def test_storage_card_atrs_are_told_from_cpu_card_atrs() -> None:
    assert storage_card_name(PART3_ATR) == "MIFARE Classic 1K"
    assert storage_card_name(part3_atr(0x0002)) == "MIFARE Classic 4K"
    assert storage_card_name(part3_atr(0x0026)) == "MIFARE Mini"
    assert storage_card_name(part3_atr(0x00FF)) == "storage card 00FF"
    assert storage_card_name(bytes.fromhex("3B888001") + b"YIKATONG" + b"\x00") is None  # our CPU card
    with pytest.raises(TransactionError, match="wrong TCK 6B"):
        storage_card_name(PART3_ATR[:-1] + b"\x6b")
    with pytest.raises(TransactionError, match="19 bytes"):
        storage_card_name(PART3_ATR[:-1])


@pytest.mark.parametrize("scheme", list(KeyScheme))
def test_m1_purchase_through_a_part3_reader_charges_the_card(tmp_path: Path, scheme: KeyScheme) -> None:
    """Terminal.tap tells the M1 card by its Part 3 ATR and charges it: value blocks 4/5, record block 6."""
    term = make_terminal(tmp_path / "t.sqlite", city="4560", amount=150)
    state = m1_card(scheme, 3000, city="4530").state
    uid = state.blocks[0][0:4]
    reader = ScriptedReader(state)
    first, second = term.tap(InProcessReader(reader)), term.tap(InProcessReader(reader))
    assert first.ok and second.ok, (first.message, second.message)
    assert "(4530, m1 sm4) -1.50 -> 28.50 yuan" in first.message
    r1, r2 = records(term)
    assert (r1.tech, r1.card.issuer, r1.card.uid, r1.card_counter, r2.card_counter) == (
        "m1",
        "4530",
        uid.hex().upper(),
        0,
        1,
    )
    assert (r2.balance_before, r2.balance_after) == (2850, 2700)
    assert parse_value_block(state.blocks[4]) == (2700, 4) == parse_value_block(state.blocks[5])
    record = state.blocks[6]
    assert (record[0:2], record[8:14], record[14:16]) == (b"\x00\x02", bytes.fromhex("456000000001"), (150).to_bytes(2))


def test_m1_hotlisted_on_a_part3_reader_is_refused_and_not_charged(tmp_path: Path) -> None:
    state = m1_card().state
    uid = state.blocks[0][0:4].hex().upper()
    term = make_terminal(tmp_path / "t.sqlite")
    term.offer_hotlist(*delta("4530", 0, [uid]))
    refused = term.tap(InProcessReader(part3_reader(state)))
    assert refused.status is TapOutcome.REFUSED
    assert refused.message == f"REFUSED  M1 card {uid} is hotlisted by 4530 (list version 1)"
    assert parse_value_block(state.blocks[4]) == (3000, 4) and records(term) == []


def test_other_storage_cards_and_bad_part3_atrs_are_refused(tmp_path: Path) -> None:
    term = make_terminal(tmp_path / "t.sqlite")
    state = m1_card().state
    four_k = term.tap(InProcessReader(ScriptedReader(state, part3_atr(0x0002))))
    assert four_k.status is TapOutcome.REFUSED
    assert four_k.message == "REFUSED  MIFARE Classic 4K card: only MIFARE Classic 1K purse cards are taken here"
    bad = term.tap(InProcessReader(ScriptedReader(state, PART3_ATR[:-1] + b"\x00")))
    assert bad.status is TapOutcome.ERROR and "wrong TCK 00 (expected 6A)" in bad.message
    assert parse_value_block(state.blocks[4]) == (3000, 4) and records(term) == []


@pytest.mark.parametrize("answer", ["6D00", "6A81", "6E00"])
def test_a_reader_without_the_acs_value_command_refuses_before_writing(tmp_path: Path, answer: str) -> None:
    term = make_terminal(tmp_path / "t.sqlite")
    state = m1_card().state
    before = list(state.blocks)
    result = term.tap(InProcessReader(ScriptedReader(state, d7=bytes.fromhex(answer))))
    assert result.status is TapOutcome.REFUSED
    assert "no MIFARE value-block command FF D7" in result.message and answer[:2] in result.message
    assert state.blocks == before and records(term) == [] and term.outbox.counts().pending == 0


def test_only_a_purchase_slot_checks_for_ff_d7() -> None:
    """The terminal's slot (purchase=True) asks for FF D7 right after the UID; any other slot (the audit's) sends
    no value command at all."""
    state = m1_card().state
    uid = state.blocks[0][0:4]
    no_d7 = ScriptedReader(state, d7=bytes.fromhex("6D00"))
    assert Part3Slot(InProcessReader(no_d7)).uid() == uid and no_d7.sent == 1
    with pytest.raises(M1Error, match=r"no MIFARE value-block command FF D7 .* 6D 00"):
        Part3Slot(InProcessReader(no_d7), purchase=True).uid()
    acs = ScriptedReader(state)
    assert Part3Slot(InProcessReader(acs), purchase=True).uid() == uid and acs.sent == 2


def test_a_reader_failing_the_decrement_leaves_a_torn_tap_naming_the_step(tmp_path: Path) -> None:
    """63 00 to FF D7 passes the check (ACS readers refuse it so unauthenticated) but fails the DECREMENT after the
    record was written: the tap is torn, and the next tap on a working reader charges once."""
    term = make_terminal(tmp_path / "t.sqlite", amount=100)
    state = m1_card(KeyScheme.SHARED, 1000).state
    torn = term.tap(InProcessReader(ScriptedReader(state, d7=b"\x63\x00")))
    assert torn.status is TapOutcome.TORN and "DECREMENT block 4 (FF D7): failed (63 00)" in torn.message
    again = term.tap(InProcessReader(part3_reader(state)))
    assert again.ok, again.message
    assert parse_value_block(state.blocks[4]) == (900, 4) and len(records(term)) == 1


# UID, FF D7 check, four key candidates (load + authenticate each), then the purchase: authenticate, read 4 and 6,
# write 6, decrement 4, write 5
CLEAN_TAP_APDUS = 17


def test_a_clean_part3_tap_takes_the_apdus_the_torn_test_cuts(tmp_path: Path) -> None:
    reader = DroppingReader(m1_card(KeyScheme.SHARED, 1000).state, None)
    assert make_terminal(tmp_path / "t.sqlite", amount=100).tap(reader).ok
    assert reader.sent == CLEAN_TAP_APDUS


@pytest.mark.parametrize("before_apdu", range(CLEAN_TAP_APDUS + 1))
def test_m1_torn_on_a_part3_reader_is_charged_and_recorded_once(tmp_path: Path, before_apdu: int) -> None:
    term = make_terminal(tmp_path / "t.sqlite", amount=100)
    state = m1_card(KeyScheme.SHARED, 1000).state
    first = term.tap(DroppingReader(state, before_apdu))
    assert first.ok == (before_apdu == CLEAN_TAP_APDUS), first.message
    second = term.tap(DroppingReader(state, None))
    assert second.ok, (first.message, second.message)
    recs = records(term)
    charged = 1000 - parse_value_block(state.blocks[4])[0]  # type: ignore[index]
    assert charged == 100 * len(recs)
    assert len({r.identity for r in recs}) == len(recs) and term.outbox.counts().pending == 0
    assert parse_value_block(state.blocks[5]) == parse_value_block(state.blocks[4])


class RandomReader:
    """A Part 3 reader that answers each APDU with the firmware's answer, drawn bytes, or not at all."""

    def __init__(self, state: M1State, data: st.DataObject) -> None:
        self.firmware = part3_reader(state)
        self.data = data

    def power_on(self) -> bytes:
        self.firmware.power_on()
        return self.data.draw(st.sampled_from([PART3_ATR, part3_atr(0x0003), PART3_ATR[:-1], b"\x3b\x00"]))

    def transmit(self, apdu: bytes) -> bytes:
        answer = self.firmware.transmit(apdu)
        choice = self.data.draw(st.integers(0, 5))
        if choice == 0:
            return self.data.draw(st.binary(max_size=24) | st.sampled_from([b"\x90\x00", b"\x63\x00", answer[:-1]]))
        if choice == 1:
            raise CardGone("drawn: the card left")
        return answer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_part3_tap_never_raises_whatever_the_reader_answers(tmp_path: Path, data: st.DataObject) -> None:
    term = make_terminal(tmp_path / f"{uuid.uuid4().hex}.sqlite", amount=100)  # a fresh terminal per example
    state = m1_card(KeyScheme.SHARED, 1000).state
    result = term.tap(InProcessReader(RandomReader(state, data)))
    assert result.status in list(TapOutcome) and result.message
    assert result.record is None or result.status is TapOutcome.OK
    settle = term.tap(InProcessReader(part3_reader(state)))  # an honest retap settles whatever happened
    assert settle.ok, (result.message, settle.message)
    charged = 1000 - parse_value_block(state.blocks[4])[0]  # type: ignore[index]
    assert charged == 100 * len(records(term)) and term.outbox.counts().pending == 0


@pytest.mark.pcsc
@pytest.mark.parametrize("command", ["tap", "run"])
def test_terminal_on_the_reader_charges_a_served_m1_card_and_publishes(tmp_path: Path, command: str) -> None:
    """card serve (Part 3 on vpcd) + `yikatong terminal tap|run --reader`: the saved image's balance drops by the fare
    and an outside client (mosquitto_sub on a private broker) receives the m1 record with the card's UID."""
    assert READER in list_readers(), "run scripts/services.sh to start pcscd with vpcd"
    image, state = tmp_path / "m1.json", tmp_path / "terminal.sqlite"
    issue = ["card", "issue", "--city", "4510", "--tech", "m1", "--uid", UID.hex(), "--balance", "3000"]
    subprocess.run([sys.executable, "-m", "yikatong.cli", *issue, "--out", str(image)], check=True, capture_output=True)
    number = unique_terminal("4560")
    reader = PcscReader(READER)
    with (
        private_mosquitto(tmp_path) as broker,
        mosquitto_sub(broker.port, f"yikatong/4560/txn/{number}") as sub,
        ServedCard(image) as serve,
    ):
        reader.wait_for_card(timeout=20)
        reader.disconnect()
        terminal_purchase(command, ["--reader", READER], number, state, broker.port)
        payloads = sub.payloads()
    # the next test's card must not meet this one's ATR, which pcscd keeps until vpcd reports the card gone
    assert reader.wait_for_removal(timeout=30), "pcscd still sees the M1 card after card serve stopped"
    assert serve.returncode == 0, serve.output
    assert len(payloads) == 1, sub.output
    payload = payloads[0]
    record = parse_record(json.loads(payload))
    assert (record.tech, record.card.uid, record.card.issuer, record.terminal) == (
        "m1",
        UID.hex().upper(),
        "4510",
        number,
    )
    assert (record.amount, record.balance_before, record.balance_after) == (200, 3000, 2800)
    saved = load_card(image)
    assert isinstance(saved, M1State) and parse_value_block(saved.blocks[4]) == (2800, 4)
