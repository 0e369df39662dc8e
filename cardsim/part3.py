"""The firmware of an ACR122U-like contactless reader holding an M1 card, as PC/SC Part 3 pseudo-APDUs (sans-IO).

pcscd talks APDUs; an M1 card talks Crypto-1 frames. A contactless reader bridges them: it answers the CLA FF
pseudo-APDUs itself and runs the real three-pass authentication and encrypted block commands against the card
(``terminals.m1.M1Reader`` over ``cardsim.mifare.M1Card``). Every failure is 63 00, as on an ACR122U
(docs/research/pn532-libnfc.md section 5, docs/card-choices.md). ``cardsim`` imports no other layer, so the
reader-side Crypto-1 session is handed in (``yikatong.card_cli.part3_reader`` wires ``terminals.m1.M1Reader``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

from cardsim.apdu import SW, ApduError, Command, check_le, handlers, handles, respond, route
from cardsim.crypto1 import Crypto1
from cardsim.mifare import BLOCK_SIZE, BLOCKS, M1Card, M1Command, parse_value_block, value_block

# PC/SC Part 3 ATR: RID A0 00 00 03 06, standard 03 (ISO 14443 A part 3), card name 00 01 (MIFARE Classic 1K).
PART3_ATR: Final = bytes.fromhex("3B8F8001804F0CA000000306030001000000006A")
FAILED: Final = 0x6300  # ACR122U: "the operation failed", whatever the reason
FUNCTION_NOT_SUPPORTED: Final = 0x6A81
PSEUDO: Final = 0xFF
KEY_SLOTS: Final = 2
# FF D7 value operation byte -> the card command it runs (00 store is a plain block write).
_VALUE_OPS: Final = {0x01: M1Command.INCREMENT, 0x02: M1Command.DECREMENT}
_RESTORE: Final = 0x03


class M1Session(Protocol):
    """The reader side of Crypto-1 with one card (``terminals.m1.M1Reader``); ``cipher`` is None until authenticated.
    Its methods raise the ``refused`` exception given to ``Part3Reader`` when the card refuses or stays silent."""

    cipher: Crypto1 | None

    def authenticate(self, block: int, key: int, key_type: int) -> None:
        """Three-pass authentication to the sector of ``block``."""
        ...

    def read_block(self, block: int) -> bytes:
        """READ: 16 bytes."""
        ...

    def write_block(self, block: int, data: bytes) -> None:
        """WRITE: 16 bytes."""
        ...

    def value_operation(self, command: int, block: int, operand: int) -> None:
        """INCREMENT, DECREMENT or RESTORE into the card's value register."""
        ...

    def transfer(self, block: int) -> None:
        """TRANSFER: the value register into ``block``."""
        ...


class _Refused(Exception):
    """The reader firmware itself refuses (no key, no such block, not authenticated): 63 00."""


class Part3Reader:
    """A contactless reader with one M1 card on it; the ``vpcd.ServedCard`` of an M1 image.

    Keys loaded with FF 82 are volatile (cleared at power-on); an authentication lasts until the next one fails,
    a command is refused, or the field drops.
    """

    def __init__(self, card: M1Card, connect: Callable[[M1Card], M1Session], refused: type[Exception]) -> None:
        self.card = card
        self._connect = connect
        self._refused = (refused, _Refused)
        self._keys: list[int | None] = [None] * KEY_SLOTS
        self._reader = connect(card)
        self._table = handlers(self)

    def power_on(self) -> bytes:
        """Field on: the card resets, the reader selects it and forgets its keys; returns the Part 3 ATR."""
        self.card.power_on()
        self._keys = [None] * KEY_SLOTS
        self._reader = self._connect(self.card)
        return PART3_ATR

    def power_off(self) -> None:
        """Field off: no session survives."""
        self._reader.cipher = None

    def transmit(self, apdu: bytes) -> bytes:
        """Answer one pseudo-APDU; any bytes get an R-APDU with a status word, never an exception."""
        try:
            cmd, handler = route(apdu, self._table)
            return handler(cmd)
        except ApduError as err:
            return respond(b"", err.sw)
        except self._refused:
            self._reader.cipher = None  # the card dropped to idle on its NAK or silence
            return respond(b"", FAILED)

    # --- helpers ---------------------------------------------------------------------------------

    @staticmethod
    def _block(cmd: Command) -> int:
        """The block of P1 P2 (P1 is the address MSB: 00 on a 1K card)."""
        if cmd.p1 != 0 or cmd.p2 >= BLOCKS:
            raise _Refused(f"no block {cmd.p1:02X}{cmd.p2:02X} on a 1K card")
        return cmd.p2

    @staticmethod
    def _lc(cmd: Command, *lengths: int) -> None:
        if len(cmd.data) not in lengths or cmd.le is not None:
            raise ApduError(SW.WRONG_LENGTH)

    def _authenticated(self) -> M1Session:
        if self._reader.cipher is None:
            raise _Refused("not authenticated")
        return self._reader

    # --- pseudo-APDUs ----------------------------------------------------------------------------

    @handles(PSEUDO, 0xCA)
    def _get_data(self, cmd: Command) -> bytes:
        """FF CA 00 00 Le: the UID (P1 01, the ATS, exists only on ISO 14443-4 cards)."""
        if cmd.data:
            raise ApduError(SW.WRONG_LENGTH)
        if (cmd.p1, cmd.p2) != (0, 0):
            return respond(b"", FUNCTION_NOT_SUPPORTED)
        uid = self.card.anticollision()[0]
        check_le(cmd, len(uid))
        return respond(uid)

    @handles(PSEUDO, 0x82)
    def _load_key(self, cmd: Command) -> bytes:
        """FF 82 00 slot 06 key: a key into volatile slot 00 or 01."""
        self._lc(cmd, 6)
        if cmd.p1 != 0 or cmd.p2 >= KEY_SLOTS:
            raise _Refused("only volatile key slots 00 and 01")
        self._keys[cmd.p2] = int.from_bytes(cmd.data)
        return respond()

    @handles(PSEUDO, 0x86)
    def _authenticate(self, cmd: Command) -> bytes:
        """FF 86 00 00 05 01 00 blk 60|61 slot: three-pass Crypto-1 authentication with the card."""
        self._lc(cmd, 5)
        version, msb, block, key_type, slot = cmd.data
        if (cmd.p1, cmd.p2, version, msb) != (0, 0, 1, 0) or block >= BLOCKS or key_type not in (0x60, 0x61):
            raise _Refused("malformed authenticate")
        key = self._keys[slot] if slot < KEY_SLOTS else None
        if key is None:
            raise _Refused(f"no key in slot {slot:02X}")
        self._reader.authenticate(block, key, key_type)
        return respond()

    @handles(PSEUDO, 0xB0)
    def _read_binary(self, cmd: Command) -> bytes:
        """FF B0 00 blk 10: one block."""
        if cmd.data or cmd.le != BLOCK_SIZE:
            raise ApduError(SW.WRONG_LENGTH)
        block = self._block(cmd)
        return respond(self._authenticated().read_block(block))

    @handles(PSEUDO, 0xD6)
    def _update_binary(self, cmd: Command) -> bytes:
        """FF D6 00 blk 10 data: write one block."""
        self._lc(cmd, BLOCK_SIZE)
        block = self._block(cmd)
        self._authenticated().write_block(block, cmd.data)
        return respond()

    @handles(PSEUDO, 0xD7)
    def _value_block(self, cmd: Command) -> bytes:
        """FF D7 00 blk 05 {00 store|01 inc|02 dec} value (signed, MSB first), or FF D7 00 src 02 03 dst (restore
        src into dst, same sector)."""
        self._lc(cmd, 5, 2)
        block = self._block(cmd)
        reader = self._authenticated()
        op = cmd.data[0]
        if len(cmd.data) == 2:
            if op != _RESTORE or cmd.data[1] >= BLOCKS:
                raise _Refused("malformed restore")
            reader.value_operation(M1Command.RESTORE, block, 0)
            reader.transfer(cmd.data[1])
            return respond()
        value = int.from_bytes(cmd.data[1:], signed=True)
        if op == 0x00:
            reader.write_block(block, value_block(value, block))
            return respond()
        command = _VALUE_OPS.get(op)
        if command is None:
            raise _Refused(f"no value operation {op:02X}")
        reader.value_operation(command, block, value)
        reader.transfer(block)
        return respond()

    @handles(PSEUDO, 0xB1)
    def _read_value(self, cmd: Command) -> bytes:
        """FF B1 00 blk 04: a value block's value (signed, MSB first)."""
        if cmd.data or cmd.le != 4:
            raise ApduError(SW.WRONG_LENGTH)
        block = self._block(cmd)
        parsed = parse_value_block(self._authenticated().read_block(block))
        if parsed is None:
            raise _Refused(f"block {block} is not a value block")
        return respond(parsed[0].to_bytes(4, signed=True))
