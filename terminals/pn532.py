"""Host side of an NXP PN532 board on a serial port (UART), driven the way libnfc's ``pn532_uart`` and mfoc do it.

``Pn532Link`` is an ``M1Chip`` over raw frames: the chip's parity and CRC are off (ManualRCV ParityDisable,
TxMode/RxMode CRC off), the host makes parity bits (``cardsim.pn532.wrap_bits``) and CRC_A (``host_crc``), so
Crypto-1 runs on the host and the nested attack works as on real hardware. The port is anything with
``write``/``read``/``flush``/``reset_input_buffer`` (``serial.Serial`` fits); pyserial is imported only by
``open_pn532``. Every failure of the chip or the port is a ``Pn532Error``; no reply bytes raise anything else.
Byte traces and sequences: docs/research/pn532-libnfc.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, Protocol

from cardsim.crypto1 import odd_parity
from cardsim.mifare import Frame
from cardsim.pn532 import BIT_FRAMING, CONTROL, MANUAL_RCV, RX_MODE, STATUS2, TX_MODE, unwrap_bits, wrap_bits
from cardsim.pn532_frames import CHIP_TFI, HOST_TFI, Control, FrameDecoder, FrameError, Information, encode
from cardsim.pn532_frames import encode_control as control_frame
from terminals.m1 import M1Gone

# libnfc assumes the chip sleeps (LowVBat) and wakes it with this preamble before SAMConfiguration.
WAKE_UP: Final = b"\x55\x55" + bytes(14)
PN532_IC: Final = 0x32
DEFAULT_TIMEOUT: Final = 1.0  # seconds for one command's ACK and reply (libnfc: 0.35 s, 1 s at wake-up)
POLL_INTERVAL: Final = 0.1
REMOVAL_POLLS: Final = 3  # empty polls in a row (about 0.3 s) before a card counts as gone


class Pn532Error(M1Gone):
    """The PN532 or its port failed: silence, a broken or unexpected frame, an error frame, or a port error.

    An ``M1Gone``: a terminal treats a board that fails mid-tap like a card that left the field, and an audit
    stops instead of reading it as a wrong key."""


class BytePort(Protocol):
    """What the driver needs from a serial port (``serial.Serial`` has all of it)."""

    def write(self, data: bytes, /) -> int | None:
        """Send bytes."""
        ...

    def read(self, size: int = 1, /) -> bytes:
        """Up to ``size`` bytes; fewer (or none) when the port's own read timeout runs out."""
        ...

    def flush(self) -> None:
        """Wait until written bytes are out."""
        ...

    def reset_input_buffer(self) -> None:
        """Discard bytes received and not read."""
        ...


class Pn532:
    """Commands to a PN532: frame, expect the ACK, read the reply (TFI D5, code + 1), each within ``timeout``."""

    def __init__(
        self, port: BytePort, *, timeout: float = DEFAULT_TIMEOUT, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.port = port
        self.timeout = timeout
        self._clock = clock
        self._decoder = FrameDecoder()
        self._pending: list[Information | Control | FrameError] = []

    def wake_up(self) -> None:
        """Wake the chip as libnfc does (preamble + SAMConfiguration normal mode), then check it is a PN532."""
        self.command(0x14, b"\x01", preamble=WAKE_UP)
        firmware = self.command(0x02)
        if len(firmware) != 4 or firmware[0] != PN532_IC:
            raise Pn532Error(f"not a PN532 (GetFirmwareVersion answered {firmware.hex(' ')})")

    def command(self, code: int, data: bytes = b"", *, preamble: bytes = b"") -> bytes:
        """Send one command; the reply's data after its code. A broken reply frame is asked for again (NACK)
        once, as the PN532 user manual (UM0701) lets the host do."""
        try:
            self.port.reset_input_buffer()  # a late reply to an earlier command must not pass for this one
            self._decoder.abandon()
            self._pending.clear()
            self._write(preamble + encode(HOST_TFI, bytes([code]) + data))
            deadline = self._clock() + self.timeout
            first = self._next(deadline, code)
            if first is not Control.ACK:
                raise Pn532Error(f"command {code:02X}: {_describe(first)} instead of the ACK")
            reply = self._next(deadline, code)
            if isinstance(reply, FrameError):
                self._write(control_frame(Control.NACK))
                try:
                    reply = self._next(self._clock() + self.timeout, code)
                except Pn532Error as silent:
                    raise Pn532Error(f"command {code:02X}: {_describe(reply)}, and no answer to the NACK") from silent
        except (OSError, ValueError) as err:  # pyserial's SerialException is an OSError; a closed port: ValueError
            raise Pn532Error(f"command {code:02X}: port error: {err}") from err
        if reply is Control.ERROR:
            raise Pn532Error(f"command {code:02X}: the PN532 answered with an error frame (syntax error)")
        if not isinstance(reply, Information):
            raise Pn532Error(f"command {code:02X}: {_describe(reply)} instead of the reply")
        if reply.tfi != CHIP_TFI or reply.data[:1] != bytes([(code + 1) & 0xFF]):
            raise Pn532Error(f"command {code:02X}: unexpected reply {bytes([reply.tfi]).hex()} {reply.data[:1].hex()}")
        return reply.data[1:]

    def _write(self, data: bytes) -> None:
        self.port.write(data)
        self.port.flush()

    def _next(self, deadline: float, code: int) -> Information | Control | FrameError:
        """The next frame from the chip, or Pn532Error when none comes by ``deadline``."""
        while not self._pending:
            if self._clock() >= deadline:
                raise Pn532Error(f"command {code:02X}: no answer from the PN532 (is it a PN532 on this port?)")
            self._pending = self._decoder.feed(self.port.read(1))
        return self._pending.pop(0)


def _describe(item: Information | Control | FrameError) -> str:
    if isinstance(item, FrameError):
        return f"a broken frame ({item.reason})"
    if isinstance(item, Control):
        return f"a {item.value} frame"
    return f"a {item.tfi:02X} information frame"


# --- MIFARE Classic over raw frames ----------------------------------------------------------------------


class Pn532Link:
    """An M1 card in the field of a PN532, over raw frames with host-made parity and CRC (``M1Chip``).

    ``power_on`` cycles the field and selects the card (InListPassiveTarget, 106 kbps type A), then puts the chip
    in raw mode; ``transceive`` sends one frame with InCommunicateThru. Use as a context manager, or ``close``.
    """

    def __init__(self, chip: Pn532, close: Callable[[], None] = lambda: None) -> None:
        self.chip = chip
        self._close = close
        self._target: tuple[bytes, int, bytes] | None = None
        self._tx_bits: int | None = None  # BitFraming TxLastBits as last written
        self._last_uid: bytes | None = None  # the card a poll found last, until it is seen to leave
        chip.wake_up()
        chip.command(0x32, b"\x05\x00\x01\x02")  # MaxRetries: one activation try, so polling returns at once

    @property
    def host_crc(self) -> bool:
        """True: the chip's CRC is off; the host appends and checks CRC_A."""
        return True

    def list_target(self) -> tuple[bytes, int, bytes] | None:
        """Cycle the field and select a card: (UID, SAK, ATQA), or None when no card answers."""
        self.chip.command(0x32, b"\x01\x00")  # RF off: the card loses power and any session
        self.chip.command(0x32, b"\x01\x01")
        self._target = self._select(b"")
        if self._target is not None:
            self._last_uid = self._target[0]
        return self._target

    def _select(self, uid: bytes) -> tuple[bytes, int, bytes] | None:
        """InListPassiveTarget (106 kbps type A; only ``uid`` if given), then raw mode for the selected card."""
        # the chip's own parity, CRC and whole bytes for anticollision and SELECT, as libnfc and mfoc restore them
        self.chip.command(0x08, _registers((TX_MODE, 0x80), (RX_MODE, 0x80), (MANUAL_RCV, 0x00), (BIT_FRAMING, 0)))
        self._tx_bits = 0
        reply = self.chip.command(0x4A, b"\x01\x00" + uid)
        if reply[:1] == b"\x00":
            return None
        if len(reply) < 6 or reply[0] != 1 or len(reply) < 6 + reply[5]:
            raise Pn532Error(f"InListPassiveTarget: unexpected answer {reply.hex(' ')}")
        # Raw mode: no chip CRC, host-made parity, Crypto-1 of the chip off.
        self.chip.command(0x08, _registers((TX_MODE, 0x00), (RX_MODE, 0x00), (MANUAL_RCV, 0x10), (STATUS2, 0x00)))
        return reply[6 : 6 + reply[5]], reply[4], reply[2:4][::-1]  # SENS_RES comes MSB first

    def wait_for_card(self, timeout: float) -> bool:
        """Poll for a card for up to ``timeout`` seconds; True when one is selected."""
        deadline = time.monotonic() + timeout
        while self.list_target() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)
        return True

    def wait_for_removal(self, timeout: float) -> bool:
        """Poll for up to ``timeout`` seconds until the card selected last has left the field; True when it has:
        another UID answers, or no card answers ``REMOVAL_POLLS`` polls in a row. A card at the edge of the field
        drops out of single polls; taking one empty poll for "gone" would let a terminal charge it again. A run
        of empty polls begun before ``timeout`` is finished."""
        present = self._last_uid
        if present is None:
            return True
        deadline = time.monotonic() + timeout
        empty = 0
        while True:
            target = self.list_target()
            if target is not None and target[0] != present:
                return True
            empty = 0 if target is not None else empty + 1
            if empty >= REMOVAL_POLLS:
                self._last_uid = None
                return True
            if not empty and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_INTERVAL)

    def power_on(self) -> None:
        """Cycle the field and select the card; M1Gone when none is there."""
        if self.list_target() is None:
            raise M1Gone("no card in the field of the PN532")

    def anticollision(self) -> tuple[bytes, int, bytes]:
        """UID, SAK and ATQA of the selected card (selecting one first if none is)."""
        if self._target is None:
            self.power_on()
        assert self._target is not None
        return self._target

    def transceive(self, frame: Frame) -> Frame | None:
        """One raw frame; the card's answer or None for silence. An empty frame means the reader stays silent:
        the card drops what it was doing and is selected again (without a power cycle)."""
        if not frame.data:
            if self._target is not None:
                self._target = self._select(self._target[0])
            return None
        if frame.bits is not None:  # short frame: one byte, no parity
            packed, tx_bits = frame.data[:1], frame.bits % 8
        else:
            parity = frame.parity or tuple(odd_parity(b) for b in frame.data)
            packed, tx_bits = wrap_bits(frame.data, parity)
        if tx_bits != self._tx_bits:
            self.chip.command(0x08, _registers((BIT_FRAMING, tx_bits)))
            self._tx_bits = tx_bits
        reply = self.chip.command(0x42, packed)
        if not reply:
            raise Pn532Error("InCommunicateThru: empty answer")
        if reply[0] & 0x3F:
            return None  # timeout, or an RF error: no usable answer from the card
        data = reply[1:]
        if not data:
            return None
        control = self.chip.command(0x06, CONTROL.to_bytes(2))
        rx_bits = control[0] & 0x07 if control else 0
        if len(data) == 1 and rx_bits:
            return Frame(data, bits=rx_bits)  # a 4-bit ACK/NAK
        plain, parity = unwrap_bits(data, rx_bits)
        return Frame(plain, parity)

    def close(self) -> None:
        """Switch the field off and close the port."""
        try:
            self.chip.command(0x32, b"\x01\x00")
        except Pn532Error:
            pass  # the port may already be gone; closing must still work
        finally:
            self._close()

    def __enter__(self) -> Pn532Link:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


def _registers(*writes: tuple[int, int]) -> bytes:
    """WriteRegister arguments: address (2 bytes) and value for each register."""
    return b"".join(address.to_bytes(2) + bytes([value]) for address, value in writes)


def open_pn532(device: str, *, timeout: float = DEFAULT_TIMEOUT) -> Pn532Link:
    """Open a PN532 on the serial ``device`` (115200 baud, 8N1), wake it and check it; Pn532Error when the device
    cannot be opened or is no PN532."""
    import serial  # pyserial: only where a device is opened

    try:
        port = serial.Serial(device, 115200, timeout=0.05, write_timeout=timeout)
    except (OSError, ValueError) as err:
        raise Pn532Error(f"{device}: cannot open the serial port: {err}") from err
    time.sleep(0.05)  # as libnfc: let the line settle, then drop what came
    try:
        return Pn532Link(Pn532(port, timeout=timeout), port.close)
    except Pn532Error as err:
        port.close()
        raise Pn532Error(f"{device}: {err}") from err
