"""The project's one crypto module: purse ciphers, MACs, key derivation and MAC/TAC message layouts.

Card, PSAM, issuer host, clearing and audit all call these functions, so a MAC computed on one side is
verified by the very same code on the other. Block ciphers come from ``cryptography``; this module only
chains blocks (CBC-MAC) and lays out the data that goes into them (spec card.md, part A).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Final, TypeAlias

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

MAC_SIZE: Final = 4
"""A purse MAC, TAC or M1 record MAC is the left 4 bytes of the last CBC block."""


class Algorithm(enum.Enum):
    """Purse algorithm of a CPU card; ``value`` is the name used in images and on the wire."""

    DES3 = "3des"
    SM4 = "sm4"
    DES = "des"  # legacy single-DES purse: still found in old fleets, an audit finding (CPU-SINGLE-DES)

    @property
    def algorithm_id(self) -> int:
        """Algorithm id byte of the INITIALIZE response (project convention: 00 3DES, 01 single DES, 04 SM4)."""
        return {Algorithm.DES3: 0x00, Algorithm.DES: 0x01, Algorithm.SM4: 0x04}[self]

    @property
    def block_size(self) -> int:
        """Cipher block size in bytes."""
        return 16 if self is Algorithm.SM4 else 8

    @classmethod
    def from_id(cls, algorithm_id: int) -> Algorithm:
        """The algorithm for an INITIALIZE algorithm id byte; ValueError for an unknown id."""
        for alg in cls:
            if alg.algorithm_id == algorithm_id:
                return alg
        raise ValueError(f"unknown algorithm id {algorithm_id:02X}")


def _cipher_context(alg: Algorithm, key: bytes) -> CipherContext:
    if alg is Algorithm.SM4:
        if len(key) != 16:
            raise ValueError(f"SM4 key must be 16 bytes, got {len(key)}")
        return Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
    # 8-byte keys are single DES, 16-byte keys two-key 3DES; both are given to TripleDES as 24 bytes
    # (K|K|K and K1|K2|K1), the form it supports without deprecation.
    if len(key) == 8:
        key24 = key * 3
    elif len(key) == 16:
        key24 = key + key[:8]
    else:
        raise ValueError(f"DES/3DES key must be 8 or 16 bytes, got {len(key)}")
    return Cipher(TripleDES(key24), modes.ECB()).encryptor()


class BlockKey:
    """A key bound to its algorithm, with a reusable ECB context (creating one costs ~10x a block).

    For 3DES cards an 8-byte key means single DES, a 16-byte key two-key 3DES.
    """

    __slots__ = ("_ecb", "algorithm", "key")

    def __init__(self, algorithm: Algorithm, key: bytes) -> None:
        self.algorithm = algorithm
        self.key = bytes(key)
        self._ecb = _cipher_context(algorithm, self.key)

    def encrypt(self, data: bytes) -> bytes:
        """ECB-encrypt whole blocks."""
        if len(data) % self.algorithm.block_size:
            raise ValueError("ECB input must be whole blocks")
        return self._ecb.update(data)

    def mac(self, data: bytes) -> bytes:
        """Purse MAC: pad ``80 00..`` (always), CBC-MAC with IV 0, keep the left MAC_SIZE bytes."""
        size = self.algorithm.block_size
        padded = pad80(data, size)
        return self.cbc_macs([padded[offset : offset + size] for offset in range(0, len(padded), size)])[:MAC_SIZE]

    def cbc_macs(self, steps: Sequence[bytes]) -> bytes:
        """The last CBC block (IV 0) of many padded messages of as many blocks at once: ``steps[k]`` is the k-th
        block of every message, concatenated in message order; so is the result. One ECB call per step serves
        all the messages (a call costs as much as ~2 blocks)."""
        chain = self._ecb.update(steps[0])
        for blocks in steps[1:]:
            chain = self._ecb.update((int.from_bytes(chain) ^ int.from_bytes(blocks)).to_bytes(len(blocks)))
        return chain


def pad80(data: bytes, block_size: int) -> bytes:
    """ISO 9797-1 method 2 padding: append 80, then 00 up to a whole number of blocks."""
    padded = data + b"\x80"
    return padded + bytes(-len(padded) % block_size)


_INVERT: Final = bytes(range(255, -1, -1))
"""bytes.translate table: every byte to its complement (x ^ FF)."""


def diversify(alg: Algorithm, master: BlockKey | bytes, card_serial: bytes) -> bytes:
    """Card key from an issuer master key and the 8-byte card serial (spec A, Cryptography)."""
    if len(card_serial) != 8:
        raise ValueError("card serial for diversification must be 8 bytes")
    mk = master if isinstance(master, BlockKey) else BlockKey(alg, master)
    inverted = card_serial.translate(_INVERT)
    if alg is Algorithm.DES3:
        return mk.encrypt(card_serial) + mk.encrypt(inverted)
    if alg is Algorithm.DES:
        # One 8-byte single-DES key, stored twice so every card key is 16 bytes (K|K|K in TripleDES is DES).
        single = mk.encrypt(card_serial)
        return single + single
    return mk.encrypt(card_serial + inverted)


def session_key(card_key: BlockKey, key_input: bytes) -> BlockKey:
    """Session key from an 8-byte input: (3)DES ECB for DES-family cards; SM4 over ``input | 80 00*7``."""
    if len(key_input) != 8:
        raise ValueError("session key input must be 8 bytes")
    if card_key.algorithm is not Algorithm.SM4:
        return BlockKey(card_key.algorithm, card_key.encrypt(key_input))
    return BlockKey(Algorithm.SM4, card_key.encrypt(key_input + b"\x80" + bytes(7)))


def tac_key(alg: Algorithm, dtk: bytes) -> BlockKey:
    """The TAC key: for 3DES cards the XOR of DTK's halves (single DES), single-DES cards its key, SM4 DTK."""
    if alg is Algorithm.DES3:
        return BlockKey(alg, (int.from_bytes(dtk[:8]) ^ int.from_bytes(dtk[8:])).to_bytes(8))
    if alg is Algorithm.DES:
        return BlockKey(alg, dtk[:8])
    return BlockKey(alg, dtk)


# --- what goes into each session key, MAC and TAC (spec A). Integers are big-endian. ---------------


def purchase_key_input(random: bytes, offline_counter: int, terminal_seq: int) -> bytes:
    """random(4) | offline counter(2) | terminal seq low 2 bytes."""
    return random + offline_counter.to_bytes(2) + (terminal_seq & 0xFFFF).to_bytes(2)


def load_key_input(random: bytes, online_counter: int) -> bytes:
    """random(4) | online counter(2) | 80 00."""
    return random + online_counter.to_bytes(2) + b"\x80\x00"


def block_key_input(challenge: bytes) -> bytes:
    """APPLICATION BLOCK session input (project choice, docs/card-choices.md): challenge(4) | 00*4."""
    return challenge + bytes(4)


def purchase_mac1_data(amount: int, txn_type: int, terminal: bytes, date: bytes, time: bytes) -> bytes:
    """amount(4) | type(1) | terminal no(6) | date(4) | time(3)."""
    return amount.to_bytes(4) + bytes([txn_type]) + terminal + date + time


def purchase_mac2_data(amount: int) -> bytes:
    """amount(4)."""
    return amount.to_bytes(4)


Layout: TypeAlias = tuple[tuple[str, int], ...]
"""The fields a MAC covers, in order: (name, width in bytes). Integers go big-endian, bytes as they are; the
clearing lays out whole columns of records by the same table (clearing.verify)."""

PURCHASE_TAC: Final[Layout] = (
    ("amount", 4),
    ("txn_type", 1),
    ("terminal", 6),
    ("terminal_seq", 4),
    ("date", 4),
    ("time", 3),
)
LOAD_TAC: Final[Layout] = (
    ("balance_after", 4),  # the new balance
    ("counter", 2),  # the online counter before the increment
    ("amount", 4),
    ("txn_type", 1),
    ("terminal", 6),
    ("date", 4),
    ("time", 3),
)
M1_RECORD: Final[Layout] = (
    ("uid", 4),
    ("counter", 2),
    ("amount", 4),
    ("balance_before", 4),
    ("balance_after", 4),
    ("terminal", 6),
    ("terminal_seq", 4),
    ("date", 4),
    ("time", 3),
)


def pack(layout: Layout, *values: int | bytes) -> bytes:
    """The data of ``layout`` from its field values in order."""
    return b"".join(
        value if isinstance(value, bytes) else value.to_bytes(width)
        for value, (_, width) in zip(values, layout, strict=True)
    )


def purchase_tac_data(
    amount: int, txn_type: int, terminal: bytes, terminal_seq: int, date: bytes, time: bytes
) -> bytes:
    """amount(4) | type(1) | terminal no(6) | terminal seq(4) | date(4) | time(3) (PURCHASE_TAC)."""
    return pack(PURCHASE_TAC, amount, txn_type, terminal, terminal_seq, date, time)


def load_mac1_data(balance_before: int, amount: int, txn_type: int, terminal: bytes) -> bytes:
    """balance before(4) | amount(4) | type(1) | terminal no(6)."""
    return balance_before.to_bytes(4) + amount.to_bytes(4) + bytes([txn_type]) + terminal


def load_mac2_data(amount: int, txn_type: int, terminal: bytes, date: bytes, time: bytes) -> bytes:
    """amount(4) | type(1) | terminal no(6) | date(4) | time(3)."""
    return purchase_mac1_data(amount, txn_type, terminal, date, time)


def load_tac_data(
    new_balance: int, online_counter: int, amount: int, txn_type: int, terminal: bytes, date: bytes, time: bytes
) -> bytes:
    """new balance(4) | online counter before increment(2) | amount(4) | type(1) | terminal(6) | date | time
    (LOAD_TAC)."""
    return pack(LOAD_TAC, new_balance, online_counter, amount, txn_type, terminal, date, time)


def m1_record_key(purchase_master: bytes | BlockKey, uid: bytes) -> BlockKey:
    """Key of the terminal MAC on M1 records (M1 cards have no TAC): SM4, diversified with uid | ~uid."""
    return BlockKey(Algorithm.SM4, diversify(Algorithm.SM4, purchase_master, uid + uid.translate(_INVERT)))


def m1_record_data(
    uid: bytes,
    counter: int,
    amount: int,
    balance_before: int,
    balance_after: int,
    terminal: bytes,
    terminal_seq: int,
    date: bytes,
    time: bytes,
) -> bytes:
    """uid(4) | counter(2) | amount(4) | balance before(4) | balance after(4) | terminal(6) | seq(4) | date | time
    (M1_RECORD)."""
    return pack(M1_RECORD, uid, counter, amount, balance_before, balance_after, terminal, terminal_seq, date, time)


def secure_message_data(header: bytes, data: bytes) -> bytes:
    """What the MAC of a secure-messaging command covers (project choice, docs/card-choices.md): its header
    CLA INS P1 P2, Lc as sent (the data and the 4-byte MAC), and the data."""
    return header + bytes([len(data) + MAC_SIZE]) + data


BLOCK_COMMAND_HEADER = secure_message_data(bytes.fromhex("841E0000"), b"")
"""What the APPLICATION BLOCK MAC covers: the command header with Lc (84 1E 00 00 04)."""
