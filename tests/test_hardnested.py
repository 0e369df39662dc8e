"""Hardnested (audit/hardnested.py): a key of a hardened card from one known key, with a test-size search (most
key bits fixed, the issue's CI budget); the sum and bit-flip properties keep the true state; a budget too small,
a static nonce, a wrong known key and bad input are clear failures; a weak-PRNG card and a PN532 that leaves
CRC_A to the host work too."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
from test_pn532_host import emulated, key

from audit._hardnested import brute_force8
from audit.hardnested import (
    BRUTE_NONCES,
    NestedNonces,
    candidate_states,
    collect_nested_nonces,
    hardnested_attack,
    sum8_plan,
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


TOP_BYTE = 0xFF << 40  # the key bits that are the 4 high bits of both halves: Sum(a8) needs them open


def fixed_bits_sum8(key: int, unknown: int, seed: int) -> tuple[int, int]:
    """known_key_bits that leave key byte 0 and ``unknown - 8`` more random key bits open (the Sum(a8) search)."""
    open_bits = random.Random(seed).sample(range(40), unknown - 8)
    mask = (1 << 40) - 1 - sum(1 << b for b in open_bits)
    return mask, key & mask


def after_first_byte(key: int, uid: int, enc: int) -> Crypto1:
    """The cipher state of a nested authentication with ``key`` after the first byte of {nT} = ``enc``."""
    state = Crypto1.from_key(key)
    for i in range(8):
        state.bit((uid ^ enc) >> (24 + i) & 1, encrypted=True)
    return state


@pytest.mark.parametrize(
    ("seed", "sector", "key_type", "open_bits", "said"),
    [
        (1, 5, 0x61, fixed_bits, "nonces collected, every first byte seen"),
        (2, 12, 0x60, fixed_bits, "nonces collected, every first byte seen"),
        (8, 6, 0x60, fixed_bits_sum8, "Sum(a8) guesses"),  # key byte 0 open: the Sum(a8) search runs
        (9, 14, 0x61, fixed_bits_sum8, "Sum(a8) guesses"),
    ],
)
def test_hardnested_recovers_a_key_of_a_hardened_card(
    seed: int, sector: int, key_type: int, open_bits: Callable[[int, int, int], tuple[int, int]], said: str
) -> None:
    chip, uid = card(Profile.HARDENED, seed)
    expected = sector_key(uid, sector, key_type)
    lines: list[str] = []
    got = hardnested_attack(
        chip,
        uid,
        (3, sector_key(uid, 0, 0x60), 0x60),
        (sector * 4 + 3, key_type),
        progress=lines.append,
        known_key_bits=open_bits(expected, 26, seed),
    )
    assert got == expected
    assert any(said in line for line in lines), lines


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


@pytest.mark.parametrize("seed", range(4))
def test_the_sum8_guesses_keep_the_key(seed: int) -> None:
    """After the chosen first byte, the key's state is in the lists of exactly one Sum(a8) guess (never one
    dropped as impossible), the guesses split the Sum(a0) space, and brute_force8 finds the key from there."""
    chip, uid = card(Profile.HARDENED, 20 + seed)
    expected = sector_key(uid, 4, 0x61)
    nonces = collect_nested_nonces(chip, uid, (3, sector_key(uid, 0, 0x60), 0x60), (19, 0x61), sum8_samples=24)
    assert max(len(seconds) for seconds in nonces.a8.values()) >= 24
    bits = fixed_bits_sum8(expected, 22, seed)
    plan = sum8_plan(nonces, bits)
    state = after_first_byte(expected, uid, next(iter(nonces.by_first[plan.first].values()))[0])
    holding = [
        g for g in plan.guesses if any(np.isin(state.odd, o).any() and np.isin(state.even, e).any() for o, e in g.pairs)
    ]
    assert len(holding) == 1
    # the guesses split what Sum(a0) and the flips leave (the 4 high bits of the halves traded for the 4 fed-back
    # bits below them), less the guesses the second bytes seen rule out
    assert plan.space <= sum(len(o) * len(e) for o, e in candidate_states(nonces, bits))
    assert abs(sum(plan.posterior) - 1) < 1e-9 and plan.expected < plan.space
    fed, targets = nonces.checks(uid)
    first = nonces.first_checks(uid, plan.first)
    for odd, even in holding[0].pairs:
        if np.isin(state.odd, odd).any() and np.isin(state.even, even).any():
            key_state = Crypto1.from_key(expected)
            for bitsliced in (True, False):
                found = brute_force8(odd.tobytes(), even.tobytes(), *first, fed, targets, 2, bitsliced)
                assert found == [key_state.odd << 24 | key_state.even]
            # with few checks many wrong states pass: the bitsliced kernel passes the same ones as the plain one
            weak = (first[0][:8], first[1][:2], fed[:4], targets[:1])
            some = odd[:20].tobytes()
            assert brute_force8(some, even.tobytes(), *weak, 2, True) == brute_force8(
                some, even.tobytes(), *weak, 2, False
            )


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
    with pytest.raises(AttackFailed, match="first bytes 1234 came with both a8 readings"):
        nonces = NestedNonces()
        nonces.add(0x12345678, (0, 0, 0, 0))
        nonces.add(0x12340000, (0, 1, 0, 0))
