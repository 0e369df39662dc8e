"""PN532 UART frames (NXP UM0701 §6.2), sans-IO, for both directions: the emulator and a host adapter.

Information frame: ``00 00 FF LEN LCS TFI data DCS 00``; extended: ``00 00 FF FF FF LENM LENL LCS TFI data DCS 00``;
ACK ``00 00 FF 00 FF 00``; NACK ``00 00 FF FF 00 00``; error frame ``00 00 FF 01 FF 7F 81 00``.
``FrameDecoder`` takes bytes as they arrive and yields frames or typed errors; it never raises.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

START: Final = b"\x00\x00\xff"
ACK_FRAME: Final = b"\x00\x00\xff\x00\xff\x00"
NACK_FRAME: Final = b"\x00\x00\xff\xff\x00\x00"
ERROR_FRAME: Final = b"\x00\x00\xff\x01\xff\x7f\x81\x00"
HOST_TFI: Final = 0xD4
CHIP_TFI: Final = 0xD5
MAX_NORMAL: Final = 255  # TFI + data in a normal frame
MAX_EXTENDED: Final = 265  # TFI + data in an extended frame (UM0701)


class FrameError(Exception):
    """A frame that cannot be built or that arrived broken; ``reason`` says which way."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Control(enum.Enum):
    """The control frames that carry no data."""

    ACK = "ack"
    NACK = "nack"
    ERROR = "error"  # application-level (syntax) error


@dataclass(frozen=True)
class Information:
    """An information frame: ``tfi`` D4 (host to chip) or D5 (chip to host), then the command code and data."""

    tfi: int
    data: bytes


Decoded = Information | Control | FrameError


def _checksum(data: bytes) -> int:
    return -sum(data) & 0xFF


def encode(tfi: int, data: bytes) -> bytes:
    """An information frame; extended when TFI+data exceed 255 bytes."""
    body = bytes([tfi]) + data
    n = len(body)
    if n > MAX_EXTENDED:
        raise FrameError(f"{n} bytes do not fit a frame")
    if n < MAX_NORMAL:
        header = bytes([n, -n & 0xFF])
    else:
        header = bytes([0xFF, 0xFF, n >> 8, n & 0xFF, _checksum(bytes([n >> 8, n & 0xFF]))])
    return START + header + body + bytes([_checksum(body), 0])


def encode_control(control: Control) -> bytes:
    """The bytes of an ACK, NACK or error frame."""
    return {Control.ACK: ACK_FRAME, Control.NACK: NACK_FRAME, Control.ERROR: ERROR_FRAME}[control]


class FrameDecoder:
    """Streaming decoder: skips the wake-up preamble and noise before ``00 00 FF``, keeps split reads."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Decoded]:
        """Append received bytes; every complete frame (or broken one, as a ``FrameError``) in arrival order."""
        self._buffer += data
        out: list[Decoded] = []
        while True:
            start = self._buffer.find(START)
            if start < 0:
                # keep a possible partial start code (its last two bytes) for the next read
                del self._buffer[: max(0, len(self._buffer) - 2)]
                return out
            del self._buffer[:start]
            item, used = _parse(bytes(self._buffer))
            if used == 0:
                return out
            del self._buffer[:used]
            out.append(item)

    def abandon(self) -> FrameError | None:
        """The reader timed out: drop a half-received frame, reported as truncated."""
        had_frame = self._buffer.startswith(START)
        self._buffer.clear()
        return FrameError("truncated") if had_frame else None


def _parse(buf: bytes) -> tuple[Decoded, int]:
    """One frame from a buffer starting with ``00 00 FF``: (frame, bytes used), or (error, 0) if incomplete."""
    incomplete: tuple[Decoded, int] = (FrameError("truncated"), 0)
    if len(buf) < 6:
        return incomplete
    head = buf[3:6]
    if buf[:6] == ACK_FRAME:
        return Control.ACK, 6
    if buf[:6] == NACK_FRAME:
        return Control.NACK, 6
    if buf[:8] == ERROR_FRAME:
        return Control.ERROR, 8
    if head[0] == 0xFF and head[1] == 0xFF:
        if len(buf) < 8:
            return incomplete
        n = buf[5] << 8 | buf[6]
        if (buf[5] + buf[6] + buf[7]) & 0xFF:
            return FrameError("length checksum"), 3
        body_at = 8
    else:
        n = head[0]
        if (head[0] + head[1]) & 0xFF:
            return FrameError("length checksum"), 3
        body_at = 5
    if n == 0:
        return FrameError("empty frame"), body_at
    end = body_at + n + 2
    if len(buf) < end:
        return incomplete
    body = buf[body_at : body_at + n]
    # A broken frame may be a truncated one with the next frame inside: skip only its start code and rescan.
    if (sum(body) + buf[body_at + n]) & 0xFF:
        return FrameError("data checksum"), 3
    if buf[end - 1] != 0:
        return FrameError("postamble"), 3
    return Information(body[0], body[1:]), end
