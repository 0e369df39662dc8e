"""Issuing a legacy M1 city card: sector keys by scheme, access conditions, and the sector-1 purse."""

from __future__ import annotations

import enum
from typing import Final

from cardsim.crypto import Algorithm, BlockKey
from cardsim.issue_options import M1_CHIP_MAKERS
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

# Block 0 after the UID and BCC, per maker: the SAK the card answers, ATQA (LSB first), 8 manufacturer bytes. The
# bytes Proxmark3's hf mf info fingerprints on are the real ones (docs/audit-choices.md, "Fleet view"); the rest of
# the manufacturer data is per-chip production data, here stand-ins. Real NXP chips store SAK 88 in block 0 and
# answer 08; the card model answers block 0's byte, so these store 08.
_BLOCK0_TAILS: Final = {
    "nxp": bytes.fromhex("080400 46 5925584910 2302"),
    "fudan-fm11rf08": bytes.fromhex("080400 03 B54C320000 001D"),
    "fudan-fm11rf08s": bytes.fromhex("080400 04 00332A7C9F 2D90"),
    "infineon": bytes.fromhex("880400 43 0000000000 0000"),
}


def maker_block(uid: bytes, maker: str | None) -> bytes:
    """Block 0 of a card of this chip maker (one of ``M1_CHIP_MAKERS``; None: the manufacturer data of older
    images); ValueError naming the choices for another maker."""
    if maker is None:
        return manufacturer_block(uid)
    tail = _BLOCK0_TAILS.get(maker)
    if tail is None:
        raise ValueError(f"M1 chip maker must be one of {', '.join(M1_CHIP_MAKERS)}, not {maker!r}")
    return uid + bytes([uid[0] ^ uid[1] ^ uid[2] ^ uid[3]]) + tail


def issue_m1_card(
    uid: bytes,
    profile: Profile,
    scheme: KeyScheme,
    balance: int,
    master: bytes,
    city: str = "4510",
    maker: str | None = None,
) -> M1State:
    """A personalised M1 card: block 0 of the chip ``maker`` (``maker_block``), issuer city in block 1 (BCD),
    purse in sector 1 (value 4, backup 5, record 6), keys per ``scheme``."""
    if len(uid) != 4:
        raise ValueError("an M1 UID is 4 bytes")
    if not 0 <= balance < 2**31:
        raise ValueError("balance must fit a value block")
    blocks = [bytes(BLOCK_SIZE)] * BLOCKS
    blocks[0] = maker_block(uid, maker)
    blocks[ISSUER_BLOCK] = bytes.fromhex(city) + b"YKT-M1" + bytes(8)
    for sector in range(16):
        key_a, key_b = sector_keys(scheme, master, uid, sector)
        access = PURSE_ACCESS if sector == PURSE_SECTOR else OTHER_ACCESS
        blocks[sector * 4 + 3] = key_a + access + key_b
    blocks[4] = value_block(balance, 4)
    blocks[5] = value_block(balance, 4)
    return M1State(blocks=list(blocks), profile=profile)
