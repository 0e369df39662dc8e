"""The emulated PN532: its UART frame codec, the chip state machine, and libnfc's tools against it on a pty."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

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
    decoder.feed(FIRMWARE_REPLY[:7])
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
