"""The PN532 host driver (terminals/pn532.py): against the emulated chip in memory and on a pty served by
`yikatong card serve --pn532`, against broken ports, and `yikatong terminal tap|run --pn532`."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import subprocess
import sys
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mqtt_support import mosquitto_sub, private_mosquitto, terminal_purchase, unique_terminal
from test_pn532 import serve_image

from audit.m1_attacks import PrngClass, classify_prng, collect_nonces, has_gen1a_backdoor, nested_attack
from cardsim.crypto1 import decrypt_bytes, encrypt_bytes, odd_parity
from cardsim.image import load_card
from cardsim.m1_issue import KeyScheme, issue_m1_card, sector_keys
from cardsim.mifare import Frame, M1Card, M1State, Profile, crc_a, parse_value_block, value_block
from cardsim.pn532 import Pn532 as EmulatedPn532
from cardsim.pn532 import wrap_bits
from cardsim.pn532_frames import (
    ACK_FRAME,
    CHIP_TFI,
    ERROR_FRAME,
    HOST_TFI,
    NACK_FRAME,
    FrameDecoder,
    Information,
    encode,
)
from terminals.m1 import FrameSlot, M1Error, M1Gone, M1Reader, m1_purchase, with_crc
from terminals.pn532 import REMOVAL_POLLS, Pn532, Pn532Error, Pn532Link, open_pn532
from yikatong import audit_cli, devices, terminal_cli
from yikatong.cli import main

UID = bytes.fromhex("9C599B32")
WHEN = dt.datetime(2026, 12, 1, 8, 30, tzinfo=dt.timezone(dt.timedelta(hours=8)))


def key(scheme: KeyScheme, sector: int, key_type: int) -> int:
    return int.from_bytes(sector_keys(scheme, bytes(16), UID, sector)[key_type - 0x60])


class FakeClock:
    """Time that passes only when the port has nothing to read, so silence costs no real time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class MemoryPort:
    """An in-memory serial port; ``answer`` says what the device sends back to each write."""

    def __init__(self) -> None:
        self.clock = FakeClock()
        self.inbox = bytearray()
        self.written: list[bytes] = []

    def answer(self, data: bytes) -> bytes:
        return b""

    def write(self, data: bytes, /) -> int:
        self.written.append(data)
        self.inbox += self.answer(data)
        return len(data)

    def read(self, size: int = 1, /) -> bytes:
        if not self.inbox:
            self.clock.now += 0.5
        out = bytes(self.inbox[:size])
        del self.inbox[:size]
        return out

    def flush(self) -> None:
        pass

    def reset_input_buffer(self) -> None:
        self.inbox.clear()


class EmulatorPort(MemoryPort):
    """The emulated PN532 behind the port."""

    def __init__(self, chip: EmulatedPn532) -> None:
        super().__init__()
        self.chip = chip

    def answer(self, data: bytes) -> bytes:
        return self.chip.receive(data)


class ScriptedPort(MemoryPort):
    """A device that answers each write with the next scripted bytes, then nothing."""

    def __init__(self, replies: list[bytes]) -> None:
        super().__init__()
        self.replies = list(replies)

    def answer(self, data: bytes) -> bytes:
        return self.replies.pop(0) if self.replies else b""


def emulated(profile: Profile = Profile.GENUINE, scheme: KeyScheme = KeyScheme.SHARED) -> tuple[Pn532Link, M1Card]:
    card = M1Card(issue_m1_card(UID, profile, scheme, 2500, bytes(16)), os.urandom)
    port = EmulatorPort(EmulatedPn532(card, M1Reader))
    return Pn532Link(Pn532(port, clock=port.clock)), card


# --- the driver against the emulated chip, in memory ---------------------------------------------


def test_the_link_selects_the_card_and_carries_a_purchase() -> None:
    link, card = emulated()
    assert link.host_crc
    assert link.wait_for_card(0) and link.anticollision() == (UID, 0x08, bytes.fromhex("0400"))
    txn = m1_purchase(FrameSlot(link).session(), key(KeyScheme.SHARED, 1, 0x61), bytes(6), 300, WHEN)
    assert (txn.balance_before, txn.balance_after) == (2500, 2200)
    assert parse_value_block(card.state.blocks[4]) == (2200, 4) and card.state.blocks[5] == value_block(2200, 4)


def test_host_crc_frames_are_exact_on_air() -> None:
    """With the chip's CRC off the host sends CRC_A inside the encryption, and READ comes back as 16 + CRC_A,
    encrypted in one keystream, with its encrypted parity bits."""
    link, card = emulated()
    reader = FrameSlot(link).session()
    reader.authenticate(4, key(KeyScheme.SHARED, 1, 0x60))
    assert reader.cipher is not None
    encrypted, parity = encrypt_bytes(reader.cipher, with_crc(link, b"\x30\x04"))
    answer = link.transceive(Frame(encrypted, tuple(parity)))
    assert answer is not None and len(answer.data) == 18
    plain, parity_ok = decrypt_bytes(reader.cipher, answer.data, list(answer.parity))
    assert parity_ok and plain == card.state.blocks[4] + crc_a(card.state.blocks[4])
    # a frame whose CRC_A is wrong is no command: the card NAKs and the session ends
    encrypted, parity = encrypt_bytes(reader.cipher, b"\x30\x04\x00\x00")
    nak = link.transceive(Frame(encrypted, tuple(parity)))
    assert nak is not None and nak.bits == 4
    with pytest.raises(M1Error):
        reader.read_block(4)


def test_short_frames_and_the_prng_through_the_link() -> None:
    link, _ = emulated(Profile.GEN1A)
    assert has_gen1a_backdoor(link)
    link, _ = emulated()
    assert not has_gen1a_backdoor(link)
    assert classify_prng(collect_nonces(link, 5)) is PrngClass.WEAK
    link, _ = emulated(Profile.HARDENED)
    assert classify_prng(collect_nonces(link, 5)) is PrngClass.HARDENED


def test_the_gen1a_probe_sends_what_libnfc_sends() -> None:
    """HLTA with its CRC_A, 40 as a 7-bit short frame, then 43 as a whole byte with its parity bit: in raw mode
    (host parity) 36, 7 and 9 bits on air."""
    link, _ = emulated(Profile.GEN1A)
    port = link.chip.port
    assert isinstance(port, MemoryPort)
    start = len(port.written)
    assert has_gen1a_backdoor(link)
    commands = [f.data for f in FrameDecoder().feed(b"".join(port.written[start:])) if isinstance(f, Information)]
    hlta = wrap_bits(bytes.fromhex("50 00 57 CD"), tuple(odd_parity(b) for b in bytes.fromhex("50 00 57 CD")))
    unlock = wrap_bits(b"\x43", (odd_parity(0x43),))
    assert (hlta[1], unlock[1]) == (4, 1)
    sent = [c[1:] for c in commands if c[0] == 0x42 or c[:3] == bytes.fromhex("08 63 3D")]
    assert sent[:6] == [
        bytes.fromhex("63 3D 04"),
        hlta[0],
        bytes.fromhex("63 3D 07"),
        b"\x40",
        b"\x63\x3d\x01",
        unlock[0],
    ]


def test_an_empty_field_and_a_card_that_leaves() -> None:
    def replies(*codes: str) -> list[bytes]:
        return [ACK_FRAME + encode(CHIP_TFI, bytes.fromhex(code)) for code in codes]

    nothing = replies("33", "33", "09", "4B 00")
    port = ScriptedPort(_wake_replies() + nothing * 2)
    link = Pn532Link(Pn532(port, clock=port.clock))
    assert not link.wait_for_card(0)
    with pytest.raises(M1Gone, match="no card in the field"):
        link.power_on()
    card = replies("33", "33", "09", "4B 01 01 00 04 08 04" + UID.hex(), "09")
    port = ScriptedPort(_wake_replies() + card * 2 + nothing * REMOVAL_POLLS)
    link = Pn532Link(Pn532(port, clock=port.clock))
    assert link.wait_for_card(0) and link.anticollision() == (UID, 0x08, bytes.fromhex("0400"))
    assert not link.wait_for_removal(0)  # still there
    assert link.wait_for_removal(0)  # gone: the empty polls begun before the time ran out are finished
    assert not port.replies


def _polls(port: MemoryPort) -> int:
    return sum(1 for data in port.written if data[5:7] == bytes.fromhex("D4 4A"))


def test_a_card_at_the_edge_of_the_field_is_not_taken_for_gone() -> None:
    """One empty poll between two that find the card is no removal (terminal run would charge it again): only
    REMOVAL_POLLS empty polls in a row are, or another card."""

    def replies(*codes: str) -> list[bytes]:
        return [ACK_FRAME + encode(CHIP_TFI, bytes.fromhex(code)) for code in codes]

    card = replies("33", "33", "09", "4B 01 01 00 04 08 04" + UID.hex(), "09")
    other = replies("33", "33", "09", "4B 01 01 00 04 08 04 11223344", "09")
    nothing = replies("33", "33", "09", "4B 00")
    flicker = card + nothing + card + nothing * (REMOVAL_POLLS - 1) + card
    port = ScriptedPort(_wake_replies() + flicker + nothing * REMOVAL_POLLS + card + nothing + other)
    link = Pn532Link(Pn532(port, clock=port.clock))
    assert link.wait_for_card(0) and _polls(port) == 1
    assert not link.wait_for_removal(0) and _polls(port) == 1 + 2  # empty once, then the card again
    assert not link.wait_for_removal(0) and _polls(port) == 3 + REMOVAL_POLLS  # one empty poll short
    assert link.wait_for_removal(0) and _polls(port) == 3 + 2 * REMOVAL_POLLS  # gone
    assert link.wait_for_card(0)
    assert link.wait_for_removal(60) and not port.replies  # after one empty poll another card answers


# --- broken ports ---------------------------------------------------------------------------------

FIRMWARE = ACK_FRAME + encode(CHIP_TFI, bytes.fromhex("03 32 01 06 07"))


def _wake_replies() -> list[bytes]:
    return [ACK_FRAME + encode(CHIP_TFI, b"\x15"), FIRMWARE, ACK_FRAME + encode(CHIP_TFI, b"\x33")]


def _broken(frame: bytes) -> bytes:
    bad = bytearray(frame)
    bad[-2] ^= 0xFF
    return bytes(bad)


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"", "no answer from the PN532"),
        (ACK_FRAME, "no answer from the PN532"),
        (FIRMWARE[len(ACK_FRAME) :], "instead of the ACK"),
        (ACK_FRAME + ERROR_FRAME, "error frame"),
        (ACK_FRAME + encode(HOST_TFI, bytes.fromhex("03 32 01 06 07")), "unexpected reply d4 03"),
        (ACK_FRAME + encode(CHIP_TFI, bytes.fromhex("05 32 01 06 07")), "unexpected reply d5 05"),
        (ACK_FRAME + _broken(FIRMWARE[len(ACK_FRAME) :]), "broken frame \\(data checksum\\)"),
        (ACK_FRAME + encode(CHIP_TFI, bytes.fromhex("03 33 01 06 07")), "not a PN532"),
    ],
)
def test_broken_replies_are_clear_errors(reply: bytes, message: str) -> None:
    port = ScriptedPort([ACK_FRAME + encode(CHIP_TFI, b"\x15"), reply])
    with pytest.raises(Pn532Error, match=message):
        Pn532(port, clock=port.clock).wake_up()


def test_a_broken_reply_is_asked_for_again_with_a_nack() -> None:
    port = ScriptedPort([ACK_FRAME + _broken(FIRMWARE[len(ACK_FRAME) :]), FIRMWARE[len(ACK_FRAME) :]])
    assert Pn532(port, clock=port.clock).command(0x02) == bytes.fromhex("32 01 06 07")
    assert port.written[-1] == NACK_FRAME


@given(st.lists(st.binary(max_size=40), max_size=12), st.lists(st.binary(max_size=30), max_size=6))
def test_any_port_bytes_give_a_result_or_a_pn532_error(replies: list[bytes], frames: list[bytes]) -> None:
    """Whatever the port returns, the driver answers, raises Pn532Error or says the card is gone (M1Gone)."""
    port = ScriptedPort(_wake_replies() + replies)
    try:
        link = Pn532Link(Pn532(port, clock=port.clock))
        link.power_on()
        for data in frames:
            link.transceive(Frame(data))
    except M1Gone:
        pass


@given(st.binary(max_size=300))
def test_any_reply_to_one_command_gives_data_or_a_pn532_error(noise: bytes) -> None:
    port = ScriptedPort([noise, noise])
    with contextlib.suppress(Pn532Error):
        Pn532(port, clock=port.clock).command(0x42, b"\x26")


# --- a board that fails in the middle of a command ------------------------------------------------


class DyingPort(EmulatorPort):
    """The emulated board until ``die``, then silence (a board that lost power or its cable); ``closed`` says
    whether the command closed it."""

    def __init__(self, chip: EmulatedPn532) -> None:
        super().__init__(chip)
        self.alive, self.closed, self.die_when_opened = True, False, False

    def die(self) -> None:
        self.alive = False

    def answer(self, data: bytes) -> bytes:
        return super().answer(data) if self.alive else b""

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def board(monkeypatch: pytest.MonkeyPatch) -> DyingPort:
    """The board every --pn532 command opens (in process): the emulated chip with a default-key card."""
    card = M1Card(issue_m1_card(UID, Profile.GENUINE, KeyScheme.DEFAULT, 2500, bytes(16), city="4560"), os.urandom)
    port = DyingPort(EmulatedPn532(card, M1Reader))

    def open_board(device: str) -> Pn532Link:
        link = Pn532Link(Pn532(port, clock=port.clock), port.close)
        if port.die_when_opened:
            port.die()
        return link

    monkeypatch.setattr(devices, "open_pn532_board", open_board)
    # terminal run in process: no signal handlers or logging set up for the whole test session
    monkeypatch.setattr(terminal_cli, "stop_on_sigterm", lambda: None)
    monkeypatch.setattr(terminal_cli, "setup_logging", lambda level: None)
    return port


TERMINAL = ["--pn532", "/dev/fake", "--city", "4560", "--kind", "bus", "--fare", "200"]


@pytest.mark.parametrize(
    "command",
    [
        ["terminal", "tap", *TERMINAL],
        ["terminal", "run", *TERMINAL, "--count", "1"],
        ["audit", "nested", "--pn532", "/dev/fake", "--known-block", "3", "--known-key", "FFFFFFFFFFFF",
         "--target-block", "7"],
        ["audit", "chips", "--pn532", "/dev/fake", "--count", "1"],
    ],
)  # fmt: skip
def test_a_board_that_goes_silent_is_a_clear_error_and_its_port_is_closed(
    board: DyingPort, command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    board.die_when_opened = True
    files = ["--state", str(tmp_path / "t.sqlite")] if command[0] == "terminal" else []
    if command[1] == "chips":
        files = ["--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")]
    assert main([*command, *files]) == 2
    err = capsys.readouterr().err
    assert "yikatong: error: the PN532 at /dev/fake: command 32: no answer from the PN532" in err, err
    assert board.closed


def test_a_board_that_dies_mid_audit_leaves_the_report_of_the_cards_audited(
    board: DyingPort, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    said: list[str] = []

    def progress(message: str) -> None:
        said.append(message)
        if message == "remove the card":
            board.die()

    monkeypatch.setattr(audit_cli, "_progress", progress)
    report = tmp_path / "r.json"
    done = main(
        [
            "audit",
            "chips",
            "--pn532",
            "/dev/fake",
            "--count",
            "3",
            "--json",
            str(report),
            "--html",
            str(tmp_path / "r.html"),
        ]
    )
    assert done == 1  # the card's findings (a default-key card) are in the report
    assert [line for line in said if line.startswith("stopped: the PN532 at /dev/fake failed (command 32: no answer")]
    written = json.loads(report.read_text())
    assert [subject["subject"] for subject in written["subjects"]] == [UID.hex().upper()]
    assert "M1-DEFAULT-KEY" in {finding["id"] for finding in written["findings"]}
    assert [line for line in written["skipped"] if "the PN532 at /dev/fake failed after 1 card(s)" in line]
    assert board.closed


# --- on a pty, served by `yikatong card serve --pn532` ---------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A genuine card with shared keys served on a pty."""
    yield from serve_image(tmp_path, issue_m1_card(UID, Profile.GENUINE, KeyScheme.SHARED, 2500, bytes(16)))


def test_a_purchase_through_the_pty_charges_the_served_card(tmp_path: Path) -> None:
    state = issue_m1_card(UID, Profile.GENUINE, KeyScheme.SHARED, 2500, bytes(16))
    with contextlib.closing(serve_image(tmp_path, state)) as served:
        image, pty = next(served)
        with open_pn532(pty) as link:
            assert link.wait_for_card(5) and link.anticollision()[0] == UID
            m1_purchase(FrameSlot(link).session(), key(KeyScheme.SHARED, 1, 0x61), bytes(6), 150, WHEN)
    # the server has stopped: the image it saved holds the new balance
    saved = load_card(image)
    assert isinstance(saved, M1State) and parse_value_block(saved.blocks[4]) == (2350, 4)


def test_nested_attack_through_the_pty_recovers_a_sector_key(served: tuple[Path, str]) -> None:
    _, pty = served
    with open_pn532(pty) as link:
        uid = int.from_bytes(link.anticollision()[0])
        known = (3, key(KeyScheme.SHARED, 0, 0x60), 0x60)
        assert nested_attack(link, uid, known, (11, 0x61)) == key(KeyScheme.SHARED, 2, 0x61)


def test_a_pty_with_no_pn532_behind_it_is_a_clear_error(tmp_path: Path) -> None:
    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        name = os.ttyname(slave)
        with pytest.raises(Pn532Error, match="no answer from the PN532"):
            open_pn532(name, timeout=0.2)
        tap = ["terminal", "tap", "--pn532", name, "--city", "4560", "--kind", "bus", "--fare", "200"]
        for device in (name, str(tmp_path / "no-such-device")):
            tap[3] = device
            done = subprocess.run(
                [sys.executable, "-m", "yikatong.cli", *tap, "--state", str(tmp_path / "t.sqlite")],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
            assert device in done.stderr
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.parametrize("command", ["tap", "run"])
def test_terminal_on_the_pn532_charges_the_served_card_and_publishes(tmp_path: Path, command: str) -> None:
    """`yikatong terminal tap|run --pn532 /dev/pts/N` against `card serve --pn532`: the image's balance drops by
    the fare and mosquitto_sub on a private broker receives the m1 record with the card's UID."""
    image, state = tmp_path / "m1.json", tmp_path / "terminal.sqlite"
    issue = ["card", "issue", "--city", "4510", "--tech", "m1", "--uid", UID.hex(), "--balance", "3000"]
    subprocess.run([sys.executable, "-m", "yikatong.cli", *issue, "--out", str(image)], check=True, capture_output=True)
    issued = load_card(image)
    assert isinstance(issued, M1State)
    number = unique_terminal("4560")
    with (
        private_mosquitto(tmp_path) as broker,
        mosquitto_sub(broker.port, f"yikatong/4560/txn/{number}") as sub,
    ):
        with contextlib.closing(serve_image(tmp_path, issued)) as served:  # serves it from the same file
            _, pty = next(served)
            terminal_purchase(command, ["--pn532", pty], number, state, broker.port)
        payloads = sub.payloads()
    assert len(payloads) == 1, sub.output
    record = json.loads(payloads[0])
    assert (record["tech"], record["card"]["uid"], record["amount"], record["balance_after"]) == (
        "m1",
        UID.hex().upper(),
        200,
        2800,
    )
    saved = load_card(image)
    assert isinstance(saved, M1State) and parse_value_block(saved.blocks[4]) == (2800, 4)
