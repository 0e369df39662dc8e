"""Hardnested (audit/hardnested.py): a key of a hardened card from one known key, with a test-size search (most
key bits fixed, the issue's CI budget); the sum and bit-flip properties keep the true state; a budget too small,
a static nonce, a wrong known key and bad input are clear failures; a weak-PRNG card and a PN532 that leaves
CRC_A to the host work too."""

from __future__ import annotations

import random

import numpy as np
import pytest
from test_pn532_host import emulated, key

from audit.hardnested import (
    BRUTE_NONCES,
    NestedNonces,
    candidate_states,
    collect_nested_nonces,
    hardnested_attack,
)
from audit.m1_attacks import AttackFailed
from cardsim.crypto1 import Crypto1
from cardsim.m1_issue import KeyScheme, issue_m1_card, sector_keys
from cardsim.mifare import M1Card, Profile

MASTER = bytes(range(16))


def card(profile: Profile, seed: int) -> tuple[M1Card, int]:
    """A card with keys diversified from a fixed master (no default key anywhere) and its UID."""
    rnd = random.Random(seed)
    uid = rnd.randbytes(4)
    return M1Card(issue_m1_card(uid, profile, KeyScheme.DIVERSIFIED, 1000, MASTER), rnd.randbytes), int.from_bytes(uid)


def sector_key(uid: int, sector: int, key_type: int) -> int:
    key_a, key_b = sector_keys(KeyScheme.DIVERSIFIED, MASTER, uid.to_bytes(4), sector)
    return int.from_bytes(key_a if key_type == 0x60 else key_b)


def fixed_bits(key: int, unknown: int, seed: int) -> tuple[int, int]:
    """known_key_bits that leave ``unknown`` random key bits open (a test-size search)."""
    open_bits = random.Random(seed).sample(range(48), unknown)
    mask = (1 << 48) - 1 - sum(1 << b for b in open_bits)
    return mask, key & mask


@pytest.mark.parametrize(("seed", "sector", "key_type"), [(1, 5, 0x61), (2, 12, 0x60)])
def test_hardnested_recovers_a_key_of_a_hardened_card(seed: int, sector: int, key_type: int) -> None:
    chip, uid = card(Profile.HARDENED, seed)
    expected = sector_key(uid, sector, key_type)
    lines: list[str] = []
    got = hardnested_attack(
        chip,
        uid,
        (3, sector_key(uid, 0, 0x60), 0x60),
        (sector * 4 + 3, key_type),
        progress=lines.append,
        known_key_bits=fixed_bits(expected, 26, seed),
    )
    assert got == expected
    assert any("nonces collected, every first byte seen" in line for line in lines)
    assert any("states left of 2^26" in line for line in lines)
    assert lines[-1].startswith(f"hardnested: key {expected:012X}")


@pytest.mark.parametrize("seed", range(5))
def test_the_sum_and_bit_flip_properties_keep_the_key(seed: int) -> None:
    """The state the card started from (the key) is in what the properties leave; they do cut the space."""
    chip, uid = card(Profile.HARDENED, 10 + seed)
    expected = sector_key(uid, 3, 0x60)
    nonces = collect_nested_nonces(chip, uid, (3, sector_key(uid, 0, 0x60), 0x60), (15, 0x60))
    assert len(nonces.a0) == 256 and len(nonces.nonces) == BRUTE_NONCES
    bits = fixed_bits(expected, 20, seed)
    pairs = candidate_states(nonces, bits)
    state = Crypto1.from_key(expected)
    assert any(np.isin(state.odd, odd).any() and np.isin(state.even, even).any() for odd, even in pairs)
    assert sum(len(odd) * len(even) for odd, even in pairs) < 2**20


def test_a_budget_too_small_says_how_far_it_got() -> None:
    chip, uid = card(Profile.HARDENED, 3)
    known = (3, sector_key(uid, 0, 0x60), 0x60)
    with pytest.raises(AttackFailed, match=r"budget ran out while collecting nonces: 0 nonces, 0 of 256 first"):
        hardnested_attack(chip, uid, known, (7, 0x60), max_seconds=0)
    # a search far too big for the budget: stops in the brute force (or, on a slow machine, while collecting)
    with pytest.raises(AttackFailed, match=r"budget (of 3 s )?ran out.*(states at .* M/s|first bytes seen)"):
        hardnested_attack(chip, uid, known, (7, 0x60), max_seconds=3, known_key_bits=(0xFF, 0))


def test_a_weak_prng_card_is_fine_too() -> None:
    chip, uid = card(Profile.GENUINE, 4)
    expected = sector_key(uid, 9, 0x61)
    got = hardnested_attack(
        chip, uid, (3, sector_key(uid, 0, 0x60), 0x60), (39, 0x61), known_key_bits=fixed_bits(expected, 24, 4)
    )
    assert got == expected


def test_through_a_pn532_that_leaves_crc_to_the_host() -> None:
    link, chip = emulated(Profile.HARDENED, KeyScheme.DIVERSIFIED)
    assert link.host_crc
    expected = key(KeyScheme.DIVERSIFIED, 2, 0x61)
    known = (3, key(KeyScheme.DIVERSIFIED, 0, 0x60), 0x60)
    got = hardnested_attack(link, chip.state.uid, known, (11, 0x61), known_key_bits=fixed_bits(expected, 24, 5))
    assert got == expected


def test_cards_it_cannot_work_on_are_refused_with_the_reason() -> None:
    chip, uid = card(Profile.STATIC_NONCE, 6)
    with pytest.raises(AttackFailed, match="nonces do not vary"):
        hardnested_attack(chip, uid, (3, sector_key(uid, 0, 0x60), 0x60), (7, 0x60))
    chip, uid = card(Profile.HARDENED, 6)
    with pytest.raises(AttackFailed, match="the known key does not open block 3"):
        hardnested_attack(chip, uid, (3, 0xFFFFFFFFFFFF, 0x60), (7, 0x60))


def test_bad_input_is_a_clear_error() -> None:
    chip, uid = card(Profile.HARDENED, 7)
    known = (3, sector_key(uid, 0, 0x60), 0x60)
    with pytest.raises(AttackFailed, match="target key type 60 or 61"):
        hardnested_attack(chip, uid, known, (7, 0x64))
    with pytest.raises(AttackFailed, match=r"blocks 0\.\.63.*target \(64, 96\)"):
        hardnested_attack(chip, uid, known, (64, 0x60))
    with pytest.raises(AttackFailed, match="outside the 48-bit mask"):
        hardnested_attack(chip, uid, known, (7, 0x60), known_key_bits=(0xFF, 0x100))
    with pytest.raises(AttackFailed, match="frames are not clean"):
        nonces = NestedNonces()
        nonces.add(0x12345678, (0, 0, 0, 0))
        nonces.add(0x12000000, (1, 0, 0, 0))
