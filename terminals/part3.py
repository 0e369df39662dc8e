"""MIFARE Classic through a PC/SC Part 3 contactless reader (ACR122U, ACR1252U, ...): the terminal side.

A Part 3 reader hides the card's Crypto-1 frames behind CLA FF pseudo-APDUs, so a terminal gets block-level
access only (``terminals.m1.M1Session``): no raw frames, hence no nested attack, no PRNG check and no way to cycle
the field. Value blocks need the ACS vendor command FF D7 (Part 3 itself has none); a reader without it is refused
before anything is written. docs/terminal-choices.md says which readers have it.
"""

from __future__ import annotations

from typing import Final

from cardsim.mifare import M1Command
from terminals.flows import TransactionError
from terminals.m1 import M1Error, M1Gone
from terminals.reader import CardGone, Reader

# 3B 8F 80 01 | 80 4F 0C | A0 00 00 03 06 (PC/SC RID) | SS | NN NN | 00 00 00 00 | TCK
_PART3_HEAD: Final = bytes.fromhex("3B8F8001804F0CA000000306")
_PART3_ATR_LENGTH: Final = 20
CLASSIC_1K: Final = "MIFARE Classic 1K"
# Card names of the PC/SC Part 3 supplement (the storage cards a contactless reader is likely to meet).
CARD_NAMES: Final[dict[int, str]] = {
    0x0000: "storage card (name not given)",
    0x0001: CLASSIC_1K,
    0x0002: "MIFARE Classic 4K",
    0x0003: "MIFARE Ultralight",
    0x0026: "MIFARE Mini",
    0x0036: "MIFARE Plus SL1 2K",
    0x0037: "MIFARE Plus SL1 4K",
    0x0038: "MIFARE Plus SL2 2K",
    0x0039: "MIFARE Plus SL2 4K",
    0x003A: "MIFARE Ultralight C",
    0x003B: "FeliCa",
    0x003D: "MIFARE Ultralight EV1",
}
_OK: Final = b"\x90\x00"
_FAILED: Final = b"\x63\x00"
# What a reader answers to an instruction it does not have: function not supported, INS or CLA unknown.
_NOT_SUPPORTED: Final = {b"\x6a\x81", b"\x6d\x00", b"\x6e\x00"}
_KEY_SLOT: Final = 0x00  # volatile slot 00: keys never outlive the reader's power
_DECREMENT, _RESTORE = 0x02, 0x03  # FF D7 operation bytes (ACS)


def storage_card_name(atr: bytes) -> str | None:
    """The card name of a PC/SC Part 3 storage-card ATR (e.g. "MIFARE Classic 1K"); None for any other ATR
    (a CPU card). TransactionError for a Part 3 ATR with a wrong length or TCK."""
    if not atr.startswith(_PART3_HEAD):
        return None
    if len(atr) != _PART3_ATR_LENGTH:
        raise TransactionError("ATR", f"Part 3 ATR of {len(atr)} bytes (a storage card's has {_PART3_ATR_LENGTH})")
    check = 0
    for byte in atr[1:]:  # the TCK makes T0..TCK XOR to zero
        check ^= byte
    if check:
        raise TransactionError("ATR", f"Part 3 ATR with a wrong TCK {atr[-1]:02X} (expected {atr[-1] ^ check:02X})")
    code = int.from_bytes(atr[13:15])
    return CARD_NAMES.get(code, f"storage card {code:04X}")


def _command(reader: Reader, apdu: bytes, step: str, answer_length: int = 0) -> bytes:
    """Send a pseudo-APDU; its data on 90 00, else M1Error naming ``step`` (the card left, refused, or the
    reader answered something else)."""
    try:
        answer = reader.transmit(apdu)
    except CardGone as err:
        raise M1Gone(f"{step}: card left ({err})") from err
    status, data = answer[-2:], answer[:-2]
    if status == _OK and len(data) == answer_length:
        return data
    if status == _FAILED:
        raise M1Error(f"{step}: failed (63 00)")
    if status in _NOT_SUPPORTED:
        raise M1Error(f"{step}: the reader does not support {apdu[:2].hex(' ').upper()} ({status.hex(' ').upper()})")
    raise M1Error(f"{step}: unexpected answer {answer.hex(' ').upper() or 'none'}")


class Part3Session:
    """``M1Session`` over a Part 3 reader: keys go into the reader's volatile slot 00, the reader authenticates;
    DECREMENT and RESTORE are the ACS vendor command FF D7 (each with its TRANSFER)."""

    def __init__(self, reader: Reader, uid: int) -> None:
        self.reader = reader
        self.uid = uid

    def authenticate(self, block: int, key: int, key_type: int = M1Command.AUTH_A) -> None:
        """LOAD KEY (FF 82) into slot 00, then GENERAL AUTHENTICATE (FF 86) to ``block`` with key A or B."""
        step = f"AUTH {key_type:02X} block {block}"
        _command(self.reader, bytes([0xFF, 0x82, 0x00, _KEY_SLOT, 0x06]) + key.to_bytes(6), f"{step}: load key")
        general = bytes([0xFF, 0x86, 0x00, 0x00, 0x05, 0x01, 0x00, block, key_type, _KEY_SLOT])
        _command(self.reader, general, step)

    def read_block(self, block: int) -> bytes:
        """READ BINARY (FF B0): 16 bytes."""
        return _command(self.reader, bytes([0xFF, 0xB0, 0x00, block, 0x10]), f"READ block {block}", 16)

    def write_block(self, block: int, data: bytes) -> None:
        """UPDATE BINARY (FF D6) of one block."""
        _command(self.reader, bytes([0xFF, 0xD6, 0x00, block, 0x10]) + data, f"WRITE block {block}")

    def decrement(self, block: int, amount: int) -> None:
        """FF D7 00 blk 05 02 amount: DECREMENT then TRANSFER into the same block (ACS vendor command)."""
        apdu = bytes([0xFF, 0xD7, 0x00, block, 0x05, _DECREMENT]) + amount.to_bytes(4, signed=True)
        _command(self.reader, apdu, f"DECREMENT block {block} (FF D7)")

    def restore(self, source: int, target: int) -> None:
        """FF D7 00 src 02 03 dst: RESTORE then TRANSFER into ``target`` (ACS vendor command)."""
        apdu = bytes([0xFF, 0xD7, 0x00, source, 0x02, _RESTORE, target])
        _command(self.reader, apdu, f"RESTORE block {source} into {target} (FF D7)")


class Part3Slot:
    """``M1Slot`` over a connected Part 3 reader. Part 3 has no command to cycle the field: a new session is a
    new key load and authentication in the same field (a failed one leaves the card to the reader's care).

    ``purchase=True`` makes it a terminal's slot: its first ``uid`` also makes sure the reader has the ACS value
    command FF D7 (``check_value_command``), so that a reader without it refuses the card before anything is
    written. Other users (the audit) send no value command at all."""

    def __init__(self, reader: Reader, *, purchase: bool = False) -> None:
        self.reader = reader
        self.purchase = purchase
        self._uid: bytes | None = None

    def uid(self) -> bytes:
        """The UID (GET DATA, FF CA), asked once; for a purchase slot the FF D7 check follows it."""
        if self._uid is None:
            uid = _command(self.reader, bytes.fromhex("FFCA000000"), "GET UID (FF CA)", 4)
            if self.purchase:
                self.check_value_command()
            self._uid = uid
        return self._uid

    def check_value_command(self) -> None:
        """M1Error when the reader has no FF D7. It sends DECREMENT block 0 by 0: a reader with FF D7 refuses it
        with 63 00 (block 0 is never a value block, and nothing is authenticated yet); a reader without answers
        6A 81, 6D 00 or 6E 00. Only for a purchase: it is a (refused) write command."""
        try:
            answer = self.reader.transmit(bytes.fromhex("FFD70000050200000000"))
        except CardGone as err:
            raise M1Gone(f"value command check (FF D7): card left ({err})") from err
        if answer[-2:] in _NOT_SUPPORTED:
            raise M1Error(
                "this reader has no MIFARE value-block command FF D7 (an ACS vendor command; it answered "
                f"{answer[-2:].hex(' ').upper()}): M1 purse cards cannot be charged on it"
            )

    def session(self) -> Part3Session:
        """A new session on the same card (nothing authenticated by this session yet)."""
        return Part3Session(self.reader, int.from_bytes(self.uid()))
