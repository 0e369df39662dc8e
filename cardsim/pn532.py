"""An emulated NXP PN532 (UART) with one MIFARE Classic card in its field, as a pure state machine.

``Pn532.receive(bytes)`` returns the bytes the chip writes back; I/O lives in an adapter. Behaviour follows what
libnfc 1.8.0 sends and expects (docs/research/pn532-libnfc.md). The chip runs Crypto-1 for InDataExchange itself;
that reader side is injected (``session``) because cardsim imports no other layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from cardsim.crypto1 import odd_parity
from cardsim.mifare import BLOCK_SIZE, Frame, M1Card, M1Command, crc_a
from cardsim.pn532_frames import CHIP_TFI, HOST_TFI, Control, FrameDecoder, Information, encode, encode_control

FIRMWARE: Final = bytes([0x32, 0x01, 0x06, 0x07])  # PN532 v1.6, ISO 14443A/B and 18092
# Register file defaults (research notes §6): TxMode, RxMode, ManualRCV, Status2, Control, BitFraming.
DEFAULT_REGISTERS: Final[dict[int, int]] = {
    0x6302: 0x80,
    0x6303: 0x80,
    0x630D: 0x00,
    0x6338: 0x00,
    0x633C: 0x10,
    0x633D: 0x00,
}
TX_MODE: Final = 0x6302  # bit 7 TxCRCEn
RX_MODE: Final = 0x6303  # bit 7 RxCRCEn
MANUAL_RCV: Final = 0x630D  # 0x10 ParityDisable
STATUS2: Final = 0x6338
CONTROL: Final = 0x633C  # bits 2..0 RxLastBits
BIT_FRAMING: Final = 0x633D  # bits 2..0 TxLastBits
MF_CRYPTO1_ON: Final = 0x08
# Status bytes (UM0701 §7.1); bit 7 (NAD) is never set because libnfc aborts on it.
OK: Final = 0x00
TIMEOUT: Final = 0x01
INVALID_FRAME: Final = 0x13  # what a MIFARE NAK gives
AUTH_ERROR: Final = 0x14
NOT_ACCEPTABLE: Final = 0x27


class MifareSession(Protocol):
    """The chip's reader-side Crypto-1 over the card (``terminals.m1.M1Reader`` fits)."""

    def authenticate(self, block: int, key: int, key_type: int) -> None:
        """Three-pass authentication; raises on a wrong key."""
        ...

    def read_block(self, block: int) -> bytes:
        """READ (30)."""
        ...

    def write_block(self, block: int, data: bytes) -> None:
        """WRITE (A0) and its data."""
        ...

    def value_operation(self, command: int, block: int, operand: int) -> None:
        """INCREMENT/DECREMENT/RESTORE."""
        ...

    def transfer(self, block: int) -> None:
        """TRANSFER (B0)."""
        ...


SessionFactory = Callable[[M1Card, int], MifareSession]


def wrap_bits(data: bytes, parity: tuple[int, ...]) -> tuple[bytes, int]:
    """Host-made parity: each byte LSB first then its parity bit, packed LSB first; (bytes, TxLastBits)."""
    stream: list[int] = []
    for byte, p in zip(data, parity, strict=True):
        stream += [(byte >> i) & 1 for i in range(8)] + [p]
    packed = bytes(sum(bit << i for i, bit in enumerate(stream[k : k + 8])) for k in range(0, len(stream), 8))
    return packed, len(stream) % 8


def unwrap_bits(packed: bytes, last_bits: int) -> tuple[bytes, tuple[int, ...]]:
    """The reverse of ``wrap_bits``: ``last_bits`` (0 = 8) valid bits in the last byte."""
    total = len(packed) * 8 - ((8 - last_bits) % 8 if packed else 0)
    stream = [(packed[k // 8] >> (k % 8)) & 1 for k in range(total)]
    groups = [stream[k : k + 9] for k in range(0, total - total % 9, 9)]
    data = bytes(sum(bit << i for i, bit in enumerate(group[:8])) for group in groups)
    return data, tuple(group[8] for group in groups)


class _Refused(Exception):
    """Internal: answer the host with this status byte."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


@dataclass
class Pn532:
    """The chip. ``session(card, uid)`` opens a reader-side Crypto-1 session; its errors must be ``Exception``s."""

    card: M1Card
    session: SessionFactory
    registers: dict[int, int] = field(default_factory=lambda: dict(DEFAULT_REGISTERS))
    _decoder: FrameDecoder = field(default_factory=FrameDecoder)
    _rf_on: bool = False
    _listed: bool = False
    _crypto: MifareSession | None = None
    _last_reply: bytes = b""

    def receive(self, data: bytes) -> bytes:
        """Bytes from the host in; the bytes the chip sends back (ACK + reply per good command frame)."""
        out = bytearray()
        for item in self._decoder.feed(data):
            if isinstance(item, Information) and item.tfi == HOST_TFI and item.data:
                out += encode_control(Control.ACK) + self._command(item.data)
            elif item is Control.NACK:
                out += self._last_reply
            # a bad checksum gets no ACK (the host resends); a host ACK aborts, and every command is already done
        return bytes(out)

    def _command(self, data: bytes) -> bytes:
        code, args = data[0], data[1:]
        handler = self._handlers().get(code)
        answer = None if handler is None else handler(args)
        reply = encode_control(Control.ERROR) if answer is None else encode(CHIP_TFI, bytes([code + 1]) + answer)
        self._last_reply = reply
        return reply

    def _handlers(self) -> dict[int, Callable[[bytes], bytes | None]]:
        return {
            0x00: self._diagnose,
            0x02: lambda _: FIRMWARE,
            0x06: self._read_register,
            0x08: self._write_register,
            0x12: lambda _: b"",
            0x14: lambda _: b"",
            0x16: self._power_down,
            0x32: self._rf_configuration,
            0x40: self._data_exchange,
            0x42: self._communicate_thru,
            0x44: self._deselect,
            0x4A: self._list_passive_target,
            0x52: self._release,
        }

    def _diagnose(self, args: bytes) -> bytes | None:
        if args[:1] == b"\x00":
            return args  # communication line test: the whole frame comes back
        return None

    def _read_register(self, args: bytes) -> bytes | None:
        if not args or len(args) % 2:
            return None
        addresses = [int.from_bytes(args[i : i + 2]) for i in range(0, len(args), 2)]
        return bytes(self._register(a) for a in addresses)

    def _register(self, address: int) -> int:
        value = self.registers.get(address, 0)
        if address == STATUS2 and self._crypto is not None:
            value |= MF_CRYPTO1_ON
        return value

    def _write_register(self, args: bytes) -> bytes | None:
        if not args or len(args) % 3:
            return None
        for i in range(0, len(args), 3):
            address = int.from_bytes(args[i : i + 2])
            self.registers[address] = args[i + 2]
            if address == STATUS2 and not args[i + 2] & MF_CRYPTO1_ON:
                self._crypto = None  # the host turned the chip's Crypto-1 off: the session is gone
        return b""

    def _power_down(self, args: bytes) -> bytes | None:
        if not args:
            return None
        self._set_rf(False)
        return bytes([OK])

    def _rf_configuration(self, args: bytes) -> bytes | None:
        if not args:
            return None
        if args[0] == 0x01 and len(args) >= 2:
            self._set_rf(bool(args[1] & 0x01))
        return b""  # timings and retries are accepted and do not matter here

    def _set_rf(self, on: bool) -> None:
        if on and not self._rf_on:
            self.card.power_on()  # RF off then on is a power cycle for the card
        if not on:
            self._listed = False
            self._crypto = None
        self._rf_on = on

    def _list_passive_target(self, args: bytes) -> bytes | None:
        if len(args) < 2 or args[0] not in (1, 2):
            return None
        if args[1] != 0x00:
            return b"\x00"  # only 106 kbps type A is in the field
        if not self._rf_on:
            self._set_rf(True)
        uid, sak, atqa = self.card.anticollision()
        wanted = args[2:]
        if wanted and wanted != uid:
            return b"\x00"
        self.card.select()  # a fresh selection: any session of the card is gone
        self._crypto = None
        self._listed = True
        return bytes([1, 1]) + atqa[::-1] + bytes([sak, len(uid)]) + uid  # SENS_RES MSB first

    def _communicate_thru(self, args: bytes) -> bytes:
        """A raw frame; parity made by the chip, or by the host when ManualRCV has ParityDisable set."""
        self.registers[CONTROL] = self.registers.get(CONTROL, 0) & ~0x07
        last_bits = self.registers.get(BIT_FRAMING, 0) & 0x07
        host_parity = bool(self.registers.get(MANUAL_RCV, 0) & 0x10)
        if not args or not self._listed or self._crypto is not None:
            return bytes([TIMEOUT])
        frame = self._air_frame(args, last_bits, host_parity)
        answer = None if frame is None else self.card.transceive(frame)
        if answer is None:
            return bytes([TIMEOUT])
        data = answer.data
        if answer.bits is not None:
            rx_bits = answer.bits  # a 4-bit ACK/NAK goes out as it is
        else:
            tx_crc, rx_crc = (self.registers.get(r, 0x80) & 0x80 for r in (TX_MODE, RX_MODE))
            if tx_crc and not rx_crc and not answer.parity and len(data) == BLOCK_SIZE:
                # the chip sent the CRC_A, so the card model answered without one: the host checks it itself now
                data += crc_a(data)
            rx_bits = 0
            if host_parity:
                parity = answer.parity or tuple(odd_parity(b) for b in data)
                data, rx_bits = wrap_bits(data, parity)
        self.registers[CONTROL] = self.registers.get(CONTROL, 0) | rx_bits
        return bytes([OK]) + data

    def _air_frame(self, args: bytes, last_bits: int, host_parity: bool) -> Frame | None:
        """The frame the card sees, or None if it is garbled. A CRC_A the chip adds is left out (the card model
        carries none); one the host made stays in the frame, and the card checks it (after decryption)."""
        total = len(args) * 8 - (8 - last_bits) % 8
        if last_bits and len(args) != 1 and not host_parity:
            return None
        if total < 8:  # a short frame (7-bit REQA/WUPA/40); a lone byte such as the Gen1a 43 has its parity bit
            return Frame(args[:1], bits=total)
        if host_parity:
            data, parity = unwrap_bits(args, last_bits)
            return Frame(data, parity)
        return Frame(args, tuple(odd_parity(b) for b in args))  # the chip's parity: right only for plain bytes

    def _deselect(self, args: bytes) -> bytes | None:
        self._crypto = None
        return bytes([OK])

    def _release(self, args: bytes) -> bytes | None:
        self._listed = False
        self._crypto = None
        return bytes([OK])

    def _data_exchange(self, args: bytes) -> bytes | None:
        if len(args) < 2:
            return None
        if not self._listed or args[0] != 0x01:
            return bytes([NOT_ACCEPTABLE])
        try:
            return bytes([OK]) + self._mifare(args[1:])
        except _Refused as refused:
            return bytes([refused.status])

    def _mifare(self, command: bytes) -> bytes:
        code = command[0]
        if code in (M1Command.AUTH_A, M1Command.AUTH_B) and len(command) >= 12:
            return self._authenticate(code, command[1], int.from_bytes(command[2:8]))
        crypto = self._crypto
        if len(command) < 2:
            raise _Refused(TIMEOUT)
        if crypto is None:
            return self._plain(command)
        block = command[1]
        try:
            if code == M1Command.READ and len(command) == 2:
                return crypto.read_block(block)
            if code == M1Command.WRITE and len(command) == 18:
                crypto.write_block(block, command[2:])
                return b""
            if code in (M1Command.INCREMENT, M1Command.DECREMENT, M1Command.RESTORE) and len(command) == 6:
                crypto.value_operation(code, block, int.from_bytes(command[2:6], "little", signed=True))
                return b""
            if code == M1Command.TRANSFER and len(command) == 2:
                crypto.transfer(block)
                return b""
        except Exception as refused:  # the card's NAK or silence ends its session, as on air
            self._crypto = None
            raise _Refused(INVALID_FRAME) from refused
        raise _Refused(INVALID_FRAME)

    def _plain(self, command: bytes) -> bytes:
        """READ or WRITE with no Crypto-1: only an unlocked Gen1a answers; any other card NAKs."""
        answer = self.card.transceive(Frame(command[:2]))
        if command[0] == M1Command.READ and answer is not None and len(answer.data) == BLOCK_SIZE:
            return answer.data
        if command[0] == M1Command.WRITE and len(command) == 2 + BLOCK_SIZE and answer is not None:
            answer = self.card.transceive(Frame(command[2:]))
            if answer is not None and answer.bits == 4:
                return b""
        raise _Refused(INVALID_FRAME)

    def _authenticate(self, code: int, block: int, key: int) -> bytes:
        uid = int.from_bytes(self.card.anticollision()[0])
        crypto = self._crypto or self.session(self.card, uid)
        try:
            crypto.authenticate(block, key, code)
        except Exception as failed:
            self._crypto = None
            self._listed = False  # the card went back to idle: the host must list it again
            raise _Refused(AUTH_ERROR) from failed
        self._crypto = crypto
        return b""
