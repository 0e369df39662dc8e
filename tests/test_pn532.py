"""The emulated PN532: its UART frame codec, the chip state machine, and libnfc's tools against it on a pty."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import new_state

from cardsim.crypto1 import encrypt_bytes, odd_parity
from cardsim.image import load_card, save_card
from cardsim.m1_issue import KeyScheme, issue_m1_card, sector_keys
from cardsim.mifare import Frame, M1Card, M1State, Profile, crc_a, value_block
from cardsim.pn532 import Pn532, unwrap_bits, wrap_bits
from cardsim.pn532_frames import (
    ACK_FRAME,
    CHIP_TFI,
    ERROR_FRAME,
    HOST_TFI,
    NACK_FRAME,
    Control,
    FrameDecoder,
    FrameError,
    Information,
    encode,
)
from terminals.m1 import M1Reader

WAKE_UP = bytes.fromhex("5555") + bytes(14)
SAM_CONFIGURATION = bytes.fromhex("0000FF03FDD414011700")
FIRMWARE_REPLY = bytes.fromhex("0000FF06FAD50332010607E800")


# --- frame codec ---------------------------------------------------------------------------------


def test_encode_matches_the_captured_frames() -> None:
    assert encode(HOST_TFI, bytes.fromhex("1401")) == SAM_CONFIGURATION
    assert encode(CHIP_TFI, bytes.fromhex("0332010607")) == FIRMWARE_REPLY


def test_the_wake_up_preamble_is_skipped() -> None:
    assert FrameDecoder().feed(WAKE_UP + SAM_CONFIGURATION) == [Information(HOST_TFI, bytes.fromhex("1401"))]


def test_split_reads_join_up() -> None:
    decoder = FrameDecoder()
    stream = b"\x13\x00" + ACK_FRAME + FIRMWARE_REPLY + NACK_FRAME + ERROR_FRAME
    out = [item for byte in stream for item in decoder.feed(bytes([byte]))]
    assert out == [Control.ACK, Information(CHIP_TFI, bytes.fromhex("0332010607")), Control.NACK, Control.ERROR]


def test_extended_frames_round_trip() -> None:
    data = bytes(range(256)) + bytes(8)
    frame = encode(HOST_TFI, data)
    assert frame[3:5] == b"\xff\xff" and frame[5:7] == (len(data) + 1).to_bytes(2)
    assert FrameDecoder().feed(frame) == [Information(HOST_TFI, data)]


def test_broken_frames_are_typed_errors() -> None:
    bad_data = bytearray(FIRMWARE_REPLY)
    bad_data[-2] ^= 1
    bad_length = bytearray(FIRMWARE_REPLY)
    bad_length[4] ^= 1
    decoder = FrameDecoder()
    out = decoder.feed(bytes(bad_data) + bytes(bad_length) + FIRMWARE_REPLY)
    assert [item.reason for item in out if isinstance(item, FrameError)] == ["data checksum", "length checksum"]
    assert out[-1] == Information(CHIP_TFI, bytes.fromhex("0332010607"))
    assert decoder.feed(FIRMWARE_REPLY[:7]) == []
    truncated = decoder.abandon()
    assert truncated is not None and truncated.reason == "truncated" and decoder.abandon() is None
    assert decoder.feed(FIRMWARE_REPLY) == [Information(CHIP_TFI, bytes.fromhex("0332010607"))]


@given(st.lists(st.binary(max_size=40), max_size=20))
def test_any_byte_stream_decodes_without_raising(chunks: list[bytes]) -> None:
    decoder = FrameDecoder()
    for chunk in chunks:
        for item in decoder.feed(chunk):
            assert isinstance(item, (Information, Control, FrameError))
    decoder.abandon()


@given(st.sampled_from([HOST_TFI, CHIP_TFI]), st.binary(min_size=1, max_size=264), st.binary(max_size=20))
def test_encode_then_decode_round_trips(tfi: int, data: bytes, noise: bytes) -> None:
    noise = noise.replace(b"\x00", b"\x55")  # noise never forms a start code
    frames = FrameDecoder().feed(noise + encode(tfi, data))
    assert frames == [Information(tfi, data)]


# --- the chip ------------------------------------------------------------------------------------

UID = bytes.fromhex("9C599B32")


def chip(keys: KeyScheme = KeyScheme.DEFAULT) -> Pn532:
    state = issue_m1_card(UID, Profile.GENUINE, keys, 2500, bytes(16))
    return Pn532(M1Card(state, bytes), lambda card, uid: M1Reader(card, uid, random=bytes(4)))


def exchange(pn532: Pn532, data: bytes) -> bytes:
    """Send one command; check the ACK and the reply's command code; the reply data after it."""
    out = pn532.receive(encode(HOST_TFI, data))
    assert out.startswith(ACK_FRAME)
    [reply] = FrameDecoder().feed(out[len(ACK_FRAME) :])
    assert isinstance(reply, Information) and reply.tfi == CHIP_TFI and reply.data[0] == data[0] + 1
    return reply.data[1:]


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def test_libnfc_open_and_initiator_init_sequence() -> None:
    pn532 = chip()
    out = pn532.receive(WAKE_UP + SAM_CONFIGURATION)
    assert out == ACK_FRAME + encode(CHIP_TFI, h("15"))
    assert exchange(pn532, h("00 00 6C 69 62 6E 66 63")) == h("00 6C 69 62 6E 66 63")
    assert exchange(pn532, h("02")) == h("32 01 06 07")
    assert exchange(pn532, h("12 14")) == b""
    assert exchange(pn532, h("06 63 02 63 03 63 0D 63 38 63 3D")) == h("80 80 00 00 00")
    assert exchange(pn532, h("08 63 02 80 63 03 80")) == b""
    for command in ("32 01 00", "32 01 01", "32 05 FF FF FF", "08 63 05 40 63 3C 10", "32 05 00 01 02"):
        assert exchange(pn532, h(command)) == b""
    assert exchange(pn532, h("06 63 05 63 3C")) == h("40 10")


def test_list_passive_target_finds_the_card_only_for_106_kbps_a() -> None:
    pn532 = chip()
    assert exchange(pn532, h("4A 01 00")) == h("01 01 00 04 08 04") + UID
    assert exchange(pn532, h("44 00")) == h("00")
    assert exchange(pn532, h("4A 01 00") + UID) == h("01 01 00 04 08 04") + UID
    assert exchange(pn532, h("4A 01 00 01 02 03 04")) == h("00")
    assert exchange(pn532, h("4A 01 01 00 FF FF 01 00")) == h("00")
    assert exchange(pn532, h("4A 01 03 00")) == h("00")
    assert exchange(pn532, h("42 E0 50")) == h("01")  # no RATS from a Classic
    assert exchange(pn532, h("52 00")) == h("00")
    assert exchange(pn532, h("16 F0")) == h("00")


def test_mifare_auth_read_write_and_value_operations() -> None:
    pn532 = chip()
    assert exchange(pn532, h("40 01 30 04")) == h("27")  # nothing listed yet
    exchange(pn532, h("4A 01 00"))
    assert exchange(pn532, h("40 01 30 04")) == h("13")  # not authenticated
    assert exchange(pn532, h("40 01 60 04 FFFFFFFFFFFF") + UID) == h("00")
    assert exchange(pn532, h("06 63 38")) == h("08")  # MFCrypto1On
    assert exchange(pn532, h("40 01 30 04")) == h("00") + value_block(2500, 4)
    assert exchange(pn532, h("40 01 C0 04") + (100).to_bytes(4, "little")) == h("00")
    assert exchange(pn532, h("40 01 B0 04")) == h("00")
    assert exchange(pn532, h("40 01 30 04")) == h("00") + value_block(2400, 4)
    assert exchange(pn532, h("40 01 A0 06") + bytes(range(16))) == h("13")  # block 6 is written with key B
    assert exchange(pn532, h("4A 01 00")) == h("01 01 00 04 08 04") + UID
    assert exchange(pn532, h("40 01 61 04 FFFFFFFFFFFF") + UID) == h("00")
    assert exchange(pn532, h("40 01 A0 06") + bytes(range(16))) == h("00")
    assert exchange(pn532, h("40 01 30 06")) == h("00") + bytes(range(16))
    assert exchange(pn532, h("40 01 30 08")) == h("13")  # another sector: the card NAKs and drops the session
    assert exchange(pn532, h("40 01 30 04")) == h("13")
    assert exchange(pn532, h("40 01 61 00 FFFFFFFFFFFF") + UID) == h("00")
    assert exchange(pn532, h("08 63 38 00")) == b""  # the host turns Crypto-1 off
    assert exchange(pn532, h("40 01 30 00")) == h("13")


def test_a_wrong_key_gives_14_and_the_card_must_be_listed_again() -> None:
    pn532 = chip(KeyScheme.SHARED)
    exchange(pn532, h("4A 01 00"))
    assert exchange(pn532, h("40 01 60 3F FFFFFFFFFFFF") + UID) == h("14")
    assert exchange(pn532, h("40 01 60 3F FFFFFFFFFFFF") + UID) == h("27")
    assert exchange(pn532, h("4A 01 00") + UID) == h("01 01 00 04 08 04") + UID
    key_a = sector_keys(KeyScheme.SHARED, bytes(16), UID, 15)[0]
    assert exchange(pn532, h("40 01 60 3F") + key_a + UID) == h("00")


def test_bad_frames_get_what_a_pn532_gives_and_the_chip_goes_on() -> None:
    pn532 = chip()
    assert pn532.receive(encode(HOST_TFI, h("FE 01"))) == ACK_FRAME + ERROR_FRAME  # unknown command
    assert pn532.receive(encode(HOST_TFI, h("06 63"))) == ACK_FRAME + ERROR_FRAME  # bad parameters
    broken = bytearray(encode(HOST_TFI, h("02")))
    broken[-2] ^= 0xFF
    assert pn532.receive(bytes(broken)) == b""  # bad checksum: no ACK, the host resends
    assert pn532.receive(encode(HOST_TFI, h("02"))[:5]) == b""  # truncated: waits for the rest
    assert exchange(pn532, h("02")) == h("32 01 06 07")  # the resent frame is found inside the broken one
    firmware = pn532.receive(encode(HOST_TFI, h("02")))
    assert pn532.receive(NACK_FRAME) == firmware[len(ACK_FRAME) :]  # NACK: the last reply again


def test_raw_frames_unlock_a_gen1a_like_nfc_mfclassic_does() -> None:
    assert crc_a(h("50 00")) == h("57 CD") and crc_a(h("60 04")) == h("D1 3D")
    pn532 = Pn532(M1Card(issue_m1_card(UID, Profile.GEN1A, KeyScheme.SHARED, 0, bytes(16)), bytes), M1Reader)
    exchange(pn532, h("4A 01 00"))
    assert exchange(pn532, h("08 63 02 00 63 03 00")) == b""  # CRC off
    assert exchange(pn532, h("42 50 00 57 CD")) == h("01")  # HLTA: no answer
    assert exchange(pn532, h("08 63 3D 07")) == b""
    assert exchange(pn532, h("42 40")) == h("00 0A")
    assert exchange(pn532, h("06 63 3C")) == h("14")  # Initiator, RxLastBits 4
    assert exchange(pn532, h("08 63 3D 00")) == b""
    assert exchange(pn532, h("42 43")) == h("00 0A")
    assert exchange(pn532, h("42 30 00") + crc_a(h("30 00"))) == h("00") + pn532.card.state.blocks[0] + crc_a(
        pn532.card.state.blocks[0]
    )
    assert exchange(pn532, h("08 63 02 80 63 03 80")) == b""
    assert exchange(pn532, h("40 01 A0 00") + bytes(16)) == h("00")  # block 0 too, with no key
    assert exchange(pn532, h("40 01 30 00")) == h("00") + bytes(16)


def test_a_gen1a_takes_43_only_as_a_whole_byte_right_after_the_7_bit_40() -> None:
    pn532 = Pn532(M1Card(issue_m1_card(UID, Profile.GEN1A, KeyScheme.SHARED, 0, bytes(16)), bytes), M1Reader)
    exchange(pn532, h("4A 01 00"))
    assert exchange(pn532, h("08 63 02 00 63 03 00 63 3D 07")) == b""  # CRC off, TxLastBits 7
    assert exchange(pn532, h("42 40")) == h("00 0A")
    assert exchange(pn532, h("42 43")) == h("01")  # 43 in 7 bits: no answer, and the 40 is spent
    assert exchange(pn532, h("08 63 3D 00")) == b""
    assert exchange(pn532, h("42 43")) == h("01")  # a whole 43, but not right after a 40
    assert exchange(pn532, h("08 63 3D 07")) == b""
    assert exchange(pn532, h("42 40")) == h("00 0A")
    assert exchange(pn532, h("08 63 3D 00")) == b""
    assert exchange(pn532, h("42 43")) == h("00 0A")  # unlocked


class RawLink:
    """An M1 link over InCommunicateThru with host-made parity, the way mfoc drives a PN532."""

    def __init__(self, pn532: Pn532) -> None:
        self.pn532 = pn532

    @property
    def host_crc(self) -> bool:
        return False  # the chip keeps making CRCs until the test turns them off

    def power_on(self) -> None:
        exchange(self.pn532, h("32 01 00"))
        exchange(self.pn532, h("32 01 01"))
        exchange(self.pn532, h("4A 01 00"))
        exchange(self.pn532, h("08 63 0D 10"))  # ParityDisable

    def transceive(self, frame: Frame) -> Frame | None:
        parity = frame.parity or tuple(odd_parity(b) for b in frame.data)
        packed, tx_bits = wrap_bits(frame.data, parity)
        exchange(self.pn532, bytes([0x08, 0x63, 0x3D, tx_bits]))
        reply = exchange(self.pn532, h("42") + packed)
        if reply[0] != 0:
            return None
        rx_bits = exchange(self.pn532, h("06 63 3C"))[0] & 0x07
        if len(reply) == 2 and rx_bits and rx_bits < 8:
            return Frame(reply[1:], bits=rx_bits)
        data, answer_parity = unwrap_bits(reply[1:], rx_bits)
        return Frame(data, answer_parity)


def test_host_parity_frames_carry_a_nested_authentication() -> None:
    assert wrap_bits(h("01 02 03 04 A1 B2 C3 D4"), (1, 0, 1, 0, 1, 1, 0, 0)) == (h("01 05 0C 24 10 5A F6 30 6A"), 0)
    assert wrap_bits(h("60 04 D1 3D"), (1, 0, 0, 1)) == (h("60 09 44 EB 09"), 4)
    assert unwrap_bits(h("11 22 33 44 05"), 4) == (h("11 91 0C A8"), (0, 1, 1, 0))
    pn532 = chip(KeyScheme.SHARED)
    link = RawLink(pn532)
    link.power_on()
    reader = M1Reader(link, int.from_bytes(UID), random=bytes(4))
    reader.authenticate(3, int.from_bytes(sector_keys(KeyScheme.SHARED, bytes(16), UID, 0)[0]))
    reader.authenticate(7, int.from_bytes(sector_keys(KeyScheme.SHARED, bytes(16), UID, 1)[0]))  # nested
    assert reader.read_block(4) == value_block(2500, 4)
    # mfoc turns the chip's CRC off and encrypts the CRC_A of its nested AUTH along with it
    assert exchange(pn532, h("08 63 02 00 63 03 00")) == b""
    assert reader.cipher is not None
    command = h("60 0B")
    encrypted, parity = encrypt_bytes(reader.cipher, command + crc_a(command))
    answer = link.transceive(Frame(encrypted, tuple(parity)))
    assert answer is not None and len(answer.data) == 4  # the card's encrypted nonce


@given(st.lists(st.binary(min_size=1, max_size=24), max_size=12))
def test_any_commands_get_an_ack_and_never_a_nad_status(commands: list[bytes]) -> None:
    pn532 = chip()
    exchange(pn532, h("4A 01 00"))
    for data in commands:
        out = pn532.receive(encode(HOST_TFI, data))
        assert out.startswith(ACK_FRAME)
        [reply] = FrameDecoder().feed(out[len(ACK_FRAME) :])
        if isinstance(reply, Information) and data[0] in (0x40, 0x42, 0x44, 0x52, 0x16):
            assert not reply.data[1] & 0x80


# --- libnfc's own tools against the chip on a pty -----------------------------------------------

needs_libnfc = pytest.mark.skipif(shutil.which("nfc-list") is None, reason="libnfc-bin is not installed")


def serve_image(tmp_path: Path, state: M1State) -> Iterator[tuple[Path, str]]:
    """Serve ``state`` with ``yikatong card serve IMAGE --pn532``; yields (image, pty path), then stops it."""
    image = tmp_path / "m1.json"
    save_card(image, state)
    command = [sys.executable, "-m", "yikatong.cli", "card", "serve", str(image), "--pn532"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 60)
        line = child.stdout.readline().strip() if ready else ""
        assert line.startswith("LIBNFC_DEFAULT_DEVICE=pn532_uart:/dev/pts/"), line
        yield image, line.removeprefix("LIBNFC_DEFAULT_DEVICE=pn532_uart:")
    finally:
        child.terminate()
        child.wait(timeout=30)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A default-key genuine M1 card served on a pty."""
    yield from serve_image(tmp_path, issue_m1_card(UID, Profile.GENUINE, KeyScheme.DEFAULT, 2500, bytes(16)))


def libnfc(pty: str, *command: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, LIBNFC_AUTO_SCAN="false", LIBNFC_DEFAULT_DEVICE=f"pn532_uart:{pty}")
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


NFC_LIST_TARGET = (  # libnfc prints two spaces after each hex byte
    "ISO/IEC 14443A (106 kbps) target:\n"
    "    ATQA (SENS_RES): 00  04  \n"
    "       UID (NFCID1): 9c  59  9b  32  \n"
    "      SAK (SEL_RES): 08  \n"
)


@needs_libnfc
def test_nfc_list_finds_the_card(served: tuple[Path, str]) -> None:
    _, pty = served
    result = libnfc(pty, "nfc-list")
    assert result.returncode == 0, result.stderr
    assert "1 ISO14443A passive target(s) found:" in result.stdout and NFC_LIST_TARGET in result.stdout


@needs_libnfc
def test_nfc_mfclassic_dumps_the_image(served: tuple[Path, str], tmp_path: Path) -> None:
    image, pty = served
    result = libnfc(pty, "nfc-mfclassic", "r", "a", "u", "dump.mfd", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Done, 64 of 64 blocks read." in result.stdout
    state = load_card(image)
    assert isinstance(state, M1State)
    # the dump keeps key A (the key found) and the access bits, and leaves key B zero
    expected = b"".join(b[:10] + bytes(6) if i % 4 == 3 else b for i, b in enumerate(state.blocks))
    assert (tmp_path / "dump.mfd").read_bytes() == expected


@needs_libnfc
def test_bad_frames_on_the_pty_leave_the_chip_serving(served: tuple[Path, str]) -> None:
    _, pty = served
    fd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
    try:
        tty.setraw(fd)
        broken = bytearray(encode(HOST_TFI, h("02")))
        broken[-2] ^= 0xFF
        os.write(fd, bytes(broken) + encode(HOST_TFI, h("02"))[:4])  # a bad checksum, then a truncated frame
        os.write(fd, encode(HOST_TFI, h("FE")))  # then an unknown command
        wanted = ACK_FRAME + ERROR_FRAME
        got = b""
        while len(got) < len(wanted) and select.select([fd], [], [], 30)[0]:
            got += os.read(fd, 64)
        assert got == wanted
    finally:
        os.close(fd)
    result = libnfc(pty, "nfc-list")
    assert result.returncode == 0 and NFC_LIST_TARGET in result.stdout


@pytest.fixture
def gen1a(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A Gen1a card with shared (non-default) keys, served on a pty."""
    yield from serve_image(tmp_path, issue_m1_card(UID, Profile.GEN1A, KeyScheme.SHARED, 2500, bytes(16)))


@needs_libnfc
def test_nfc_mfclassic_unlocked_read_and_write_of_a_gen1a(gen1a: tuple[Path, str], tmp_path: Path) -> None:
    image, pty = gen1a
    result = libnfc(pty, "nfc-mfclassic", "R", "a", "u", "dump.mfd", cwd=tmp_path)
    assert result.returncode == 0 and "Card unlocked" in result.stdout, result.stdout + result.stderr
    state = load_card(image)
    assert isinstance(state, M1State)
    dump = bytearray((tmp_path / "dump.mfd").read_bytes())
    assert dump == b"".join(state.blocks)  # the backdoor reads every block, keys included
    dump[16 * 8 : 16 * 9] = bytes(range(16))
    (tmp_path / "new.mfd").write_bytes(dump)
    result = libnfc(pty, "nfc-mfclassic", "W", "a", "u", "new.mfd", cwd=tmp_path)
    assert "Done, 64 of 64 blocks written." in result.stdout, result.stdout + result.stderr
    written = load_card(image)
    assert isinstance(written, M1State) and written.blocks[8] == bytes(range(16))  # the image file was updated


def test_card_serve_pn532_refuses_a_cpu_card(tmp_path: Path) -> None:
    image = tmp_path / "cpu.json"
    save_card(image, new_state())
    served = subprocess.run(
        [sys.executable, "-m", "yikatong.cli", "card", "serve", str(image), "--pn532"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert served.returncode == 2
    assert "is a CPU card: the PN532 emulator carries M1 cards only" in served.stderr
