"""Issuing a legacy M1 city card: sector keys by scheme, access conditions, and the sector-1 purse."""

from __future__ import annotations

import enum

from cardsim.crypto import Algorithm, BlockKey
from cardsim.mifare import (
    BLOCK_SIZE,
    BLOCKS,
    M1State,
    Profile,
    encode_access,
    manufacturer_block,
    value_block,
)

PURSE_SECTOR = 1
# Purse blocks 4/5: value block (read AB, write B, increment B, decrement AB); record block 6: write B;
# trailer: keys written with B, key B never readable.
PURSE_ACCESS = encode_access([(1, 1, 0), (1, 1, 0), (1, 0, 0), (0, 1, 1)])
OTHER_ACCESS = encode_access([(1, 0, 0), (1, 0, 0), (1, 0, 0), (0, 1, 1)])


class KeyScheme(enum.Enum):
    """How sector keys are chosen: the factory default, one set for the whole fleet, or per card UID."""

    DEFAULT = "default"
    SHARED = "shared"
    DIVERSIFIED = "diversified"


def sector_keys(scheme: KeyScheme, master: bytes, uid: bytes, sector: int) -> tuple[bytes, bytes]:
    """Key A and key B (6 bytes each) of one sector."""
    if scheme is KeyScheme.DEFAULT:
        return b"\xff" * 6, b"\xff" * 6
    seed = uid if scheme is KeyScheme.DIVERSIFIED else b"\x00" * 4
    block = BlockKey(Algorithm.SM4, master).encrypt(seed + bytes([sector]) + b"M1-KEYS" + bytes(4))
    return block[0:6], block[6:12]


ISSUER_BLOCK = 1


def issue_m1_card(
    uid: bytes, profile: Profile, scheme: KeyScheme, balance: int, master: bytes, city: str = "4510"
) -> M1State:
    """A personalised M1 card: issuer city in block 1 (BCD), purse in sector 1 (value 4, backup 5, record 6),
    keys per ``scheme``."""
    if len(uid) != 4:
        raise ValueError("an M1 UID is 4 bytes")
    if not 0 <= balance < 2**31:
        raise ValueError("balance must fit a value block")
    blocks = [bytes(BLOCK_SIZE)] * BLOCKS
    blocks[0] = manufacturer_block(uid)
    blocks[ISSUER_BLOCK] = bytes.fromhex(city) + b"YKT-M1" + bytes(8)
    for sector in range(16):
        key_a, key_b = sector_keys(scheme, master, uid, sector)
        access = PURSE_ACCESS if sector == PURSE_SECTOR else OTHER_ACCESS
        blocks[sector * 4 + 3] = key_a + access + key_b
    blocks[4] = value_block(balance, 4)
    blocks[5] = value_block(balance, 4)
    return M1State(blocks=list(blocks), profile=profile)
