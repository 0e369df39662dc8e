"""Reader side of MIFARE Classic: Crypto-1 authentication, block and value commands, and the legacy M1 purse
transaction (sector 1: value block 4, backup 5, last-transaction record 6)."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cardsim.bcd import bcd_date, bcd_time
from cardsim.crypto1 import Crypto1, decrypt_bytes, encrypt_bytes, prng_successor
from cardsim.mifare import ACK, BLOCK_SIZE, Frame, M1Command, crc_a, parse_value_block, value_block

PURSE_BLOCK, BACKUP_BLOCK, RECORD_BLOCK = 4, 5, 6


class M1Link(Protocol):
    """Anything that carries frames to an M1 card (the card object itself, or a reader's raw mode)."""

    @property
    def host_crc(self) -> bool:
        """True when the reader chip leaves CRC_A to the host (a PN532 in raw mode): the host appends it to
        every command and data frame, inside the encryption, and finds it at the end of a block answer."""
        ...

    def power_on(self) -> None:
        """Cycle the RF field: the card forgets any session."""
        ...

    def transceive(self, frame: Frame) -> Frame | None:
        """Send a frame; the card's answer, or None for silence."""
        ...


class M1Chip(M1Link, Protocol):
    """An M1 card in the field of a reader that passes raw frames: frames, plus the anticollision answer
    (UID, SAK, ATQA)."""

    def anticollision(self) -> tuple[bytes, int, bytes]: ...


def with_crc(link: M1Link, data: bytes) -> bytes:
    """A command or data frame as ``link`` wants it: with its CRC_A when the host makes CRCs."""
    return data + crc_a(data) if link.host_crc else data


class M1Error(Exception):
    """The card refused or did not answer; the message says which step."""


class M1Gone(Exception):
    """The card left or the reader failed: no answer of the card's at all. Not an ``M1Error``, so that nothing
    takes it for a refusal (an audit for a wrong key); a terminal treats it like silence (the payment may be
    torn)."""


class M1Unsettled(M1Error):
    """An interrupted purchase whose outcome the card no longer shows (it was used elsewhere since)."""


class M1Session(Protocol):
    """A reader session with one M1 card at block level: what every reader offers, a PC/SC Part 3 reader
    included. Each method raises M1Error when the card refuses or stays silent, M1Gone when it has left or the
    reader failed."""

    uid: int

    def authenticate(self, block: int, key: int, key_type: int = M1Command.AUTH_A) -> None:
        """Three-pass authentication to the sector of ``block`` with key A (60) or B (61)."""
        ...

    def read_block(self, block: int) -> bytes:
        """One block, 16 bytes."""
        ...

    def write_block(self, block: int, data: bytes) -> None:
        """Write one block."""
        ...

    def decrement(self, block: int, amount: int) -> None:
        """Take ``amount`` off the value block ``block`` (DECREMENT, then TRANSFER into the same block)."""
        ...

    def restore(self, source: int, target: int) -> None:
        """Copy the value block ``source`` into ``target`` of the same sector (RESTORE, then TRANSFER)."""
        ...


class M1Slot(Protocol):
    """A reader with one M1 card in its field, at block level."""

    def uid(self) -> bytes:
        """The card's UID (4 bytes)."""
        ...

    def session(self) -> M1Session:
        """A new session with nothing authenticated (a fresh field where the reader can cycle it)."""
        ...


class M1Reader:
    """A reader session with one M1 card over raw frames (``M1Session`` and the single card commands).
    ``random`` supplies reader nonces."""

    def __init__(self, link: M1Link, uid: int, random: bytes | None = None) -> None:
        self.link = link
        self.uid = uid
        self._random = random
        self.cipher: Crypto1 | None = None
        self.last_nt = 0

    def _reader_nonce(self) -> int:
        return int.from_bytes(self._random if self._random is not None else os.urandom(4))

    def _send(self, data: bytes) -> Frame | None:
        data = with_crc(self.link, data)
        if self.cipher is None:
            return self.link.transceive(Frame(data))
        enc, parities = encrypt_bytes(self.cipher, data)
        return self.link.transceive(Frame(enc, tuple(parities)))

    def _ack(self, answer: Frame | None, step: str) -> None:
        if answer is None or answer.bits != 4 or self.cipher is None:
            raise M1Error(f"{step}: no answer")
        ks = 0
        for i in range(4):
            ks |= int(self.cipher.bit()) << i
        if answer.data[0] ^ ks != ACK:
            raise M1Error(f"{step}: refused (NAK)")

    def authenticate(self, block: int, key: int, key_type: int = M1Command.AUTH_A) -> None:
        """Three-pass authentication to the sector of ``block``; nested when a session is open."""
        nested = self.cipher is not None
        answer = self._send(bytes([key_type, block]))
        if answer is None or len(answer.data) != 4:
            self.cipher = None
            raise M1Error(f"AUTH {key_type:02X} block {block}: no nonce")
        cipher = Crypto1.from_key(key)
        if nested:
            nt = int.from_bytes(answer.data) ^ int(cipher.word(self.uid ^ int.from_bytes(answer.data), encrypted=True))
        else:
            nt = int.from_bytes(answer.data)
            cipher.word(self.uid ^ nt)
        self.last_nt = nt
        nr_enc, nr_par = encrypt_bytes(cipher, self._reader_nonce().to_bytes(4), feed=True)
        ar_enc, ar_par = encrypt_bytes(cipher, prng_successor(nt, 64).to_bytes(4))
        answer = self.link.transceive(Frame(nr_enc + ar_enc, tuple(nr_par + ar_par)))
        if answer is None or len(answer.data) != 4:
            self.cipher = None
            raise M1Error(f"AUTH {key_type:02X} block {block}: wrong key (no tag answer)")
        at, parity_ok = decrypt_bytes(cipher, answer.data, list(answer.parity))
        if int.from_bytes(at) != prng_successor(nt, 96) or not parity_ok:
            self.cipher = None
            raise M1Error(f"AUTH {key_type:02X} block {block}: tag answer does not verify")
        self.cipher = cipher

    def read_block(self, block: int) -> bytes:
        """READ (30): 16 bytes."""
        answer = self._send(bytes([M1Command.READ, block]))
        if answer is None or self.cipher is None:
            raise M1Error(f"READ block {block}: no answer")
        if answer.bits == 4:
            self._ack(answer, f"READ block {block}")
        plain, parity_ok = decrypt_bytes(self.cipher, answer.data, list(answer.parity))
        if self.link.host_crc:
            if crc_a(plain[:BLOCK_SIZE]) != plain[BLOCK_SIZE:]:
                raise M1Error(f"READ block {block}: garbled answer (CRC_A)")
            plain = plain[:BLOCK_SIZE]
        if len(plain) != BLOCK_SIZE or not parity_ok:
            raise M1Error(f"READ block {block}: garbled answer")
        return plain

    def write_block(self, block: int, data: bytes) -> None:
        """WRITE (A0) then the 16 data bytes."""
        self._ack(self._send(bytes([M1Command.WRITE, block])), f"WRITE block {block}")
        self._ack(self._send(data), f"WRITE block {block} data")

    def value_operation(self, command: int, block: int, operand: int) -> None:
        """INCREMENT (C1), DECREMENT (C0) or RESTORE (C2) into the card's value register."""
        self._ack(self._send(bytes([command, block])), f"{command:02X} block {block}")
        answer = self._send(operand.to_bytes(4, "little", signed=True))
        if answer is not None:
            self._ack(answer, f"{command:02X} block {block} operand")
            raise M1Error(f"{command:02X} block {block}: unexpected answer")

    def transfer(self, block: int) -> None:
        """TRANSFER (B0): write the value register into ``block``."""
        self._ack(self._send(bytes([M1Command.TRANSFER, block])), f"TRANSFER block {block}")

    def decrement(self, block: int, amount: int) -> None:
        """DECREMENT ``block`` by ``amount``, then TRANSFER into the same block."""
        self.value_operation(M1Command.DECREMENT, block, amount)
        self.transfer(block)

    def restore(self, source: int, target: int) -> None:
        """RESTORE ``source`` into the value register, then TRANSFER into ``target``."""
        self.value_operation(M1Command.RESTORE, source, 0)
        self.transfer(target)


class FrameSlot:
    """An M1 card on a raw-frame link (the in-process card, a PN532): each session a fresh field, with the card
    first seen there (another card answering means this one left)."""

    def __init__(self, chip: M1Chip) -> None:
        self.chip = chip
        self._uid: bytes | None = None

    def uid(self) -> bytes:
        """The UID from the first anticollision answer."""
        if self._uid is None:
            self._uid = self.chip.anticollision()[0]
        return self._uid

    def session(self) -> M1Reader:
        """Cycle the field and open a frame-level session; M1Gone when another card answers (a swap mid-tap
        must not charge, nor hotlist-check, the wrong card)."""
        uid = self.uid()
        self.chip.power_on()
        now = self.chip.anticollision()[0]
        if now != uid:
            raise M1Gone(f"card {uid.hex().upper()} left the field (card {now.hex().upper()} answers)")
        return M1Reader(self.chip, int.from_bytes(uid))


MAX_M1_AMOUNT = 0xFFFF  # the record block holds a 2-byte amount


@dataclass(frozen=True)
class M1Transaction:
    """An M1 purse purchase as the terminal saw it; ``counter`` is the card's record counter before it."""

    uid: int
    counter: int
    amount: int
    balance_before: int
    balance_after: int
    terminal: bytes
    when: dt.datetime


def record_block(counter: int, when: dt.datetime, terminal: bytes, amount: int) -> bytes:
    """Block 6: counter(2) | YYMMDDhhmmss BCD(6) | terminal(6) | amount(2)."""
    return counter.to_bytes(2) + bcd_date(when)[1:] + bcd_time(when) + terminal + amount.to_bytes(2)


def _open_purse(reader: M1Session, key_b: int) -> tuple[int, int]:
    """Authenticate sector 1 with key B; (balance, record counter), repairing a torn purse from the backup."""
    reader.authenticate(PURSE_BLOCK, key_b, M1Command.AUTH_B)
    parsed = parse_value_block(reader.read_block(PURSE_BLOCK))
    if parsed is None:
        backup = parse_value_block(reader.read_block(BACKUP_BLOCK))
        if backup is None:
            raise M1Error("purse and backup value blocks are both corrupted: card refused")
        reader.restore(BACKUP_BLOCK, PURSE_BLOCK)
        parsed = backup
    counter = int.from_bytes(reader.read_block(RECORD_BLOCK)[0:2])
    return parsed[0], counter


def m1_purchase(
    reader: M1Session,
    key_b: int,
    terminal: bytes,
    amount: int,
    when: dt.datetime,
    before_write: Callable[[M1Transaction], None] | None = None,
) -> M1Transaction:
    """Key B on sector 1, check the value block, write the record (counter + 1), decrement, transfer, backup.

    ``before_write`` gets the transaction before the first write, so a terminal can journal it: if the card
    leaves mid-way, ``m1_outcome`` on its next tap tells whether the money was taken. The record goes first
    so that a counter, once the purse moved, is never reused.
    """
    if not 0 < amount <= MAX_M1_AMOUNT:
        raise M1Error(f"an M1 fare must be 1..{MAX_M1_AMOUNT} fen")
    balance, counter = _open_purse(reader, key_b)
    if amount > balance:
        raise M1Error(f"insufficient balance: {balance} fen, fare {amount} fen")
    if counter >= 0xFFFF:
        raise M1Error("record counter exhausted: card refused")
    txn = M1Transaction(reader.uid, counter, amount, balance, balance - amount, terminal, when)
    if before_write is not None:
        before_write(txn)
    reader.write_block(RECORD_BLOCK, record_block(counter + 1, when, terminal, amount))
    reader.decrement(PURSE_BLOCK, amount)
    reader.write_block(BACKUP_BLOCK, value_block(balance - amount, PURSE_BLOCK))
    return txn


def m1_outcome(reader: M1Session, key_b: int, txn: M1Transaction) -> bool:
    """Whether an interrupted ``m1_purchase`` took the money (True) or not (False), read off the card.

    M1Unsettled when the card shows neither state (it was used elsewhere since): the outcome cannot be told.
    """
    balance, counter = _open_purse(reader, key_b)
    if counter == txn.counter or (counter == txn.counter + 1 and balance == txn.balance_before):
        return False
    if counter == txn.counter + 1 and balance == txn.balance_after:
        if parse_value_block(reader.read_block(BACKUP_BLOCK)) != (txn.balance_after, PURSE_BLOCK):
            reader.write_block(BACKUP_BLOCK, value_block(txn.balance_after, PURSE_BLOCK))
        return True
    raise M1Unsettled(f"card moved on since the interrupted purchase (counter {counter}, balance {balance})")
