"""Attacks through the card interface: nested key recovery on random keys, dictionary, PRNG class, backdoors."""

from __future__ import annotations

import random

import pytest

from audit.m1_attacks import (
    AttackFailed,
    PrngClass,
    accepts_backdoor_key,
    classify_prng,
    collect_nonces,
    dictionary_attack,
    has_gen1a_backdoor,
    nested_attack,
)
from cardsim.m1_issue import KeyScheme, issue_m1_card, sector_keys
from cardsim.mifare import M1Card, Profile
from terminals.m1 import FrameSlot


def make(seed: int, profile: Profile = Profile.GENUINE, scheme: KeyScheme = KeyScheme.DIVERSIFIED):
    rnd = random.Random(seed)
    master, uid = rnd.randbytes(16), rnd.randbytes(4)
    card = M1Card(issue_m1_card(uid, profile, scheme, 1000, master), rng=rnd.randbytes)
    card.power_on()
    return card, master, uid


@pytest.mark.parametrize("seed", range(10))
def test_nested_attack_recovers_random_keys(seed: int) -> None:
    card, master, uid = make(seed)
    known = int.from_bytes(sector_keys(KeyScheme.DIVERSIFIED, master, uid, 0)[0])
    target_sector = 1 + seed % 15
    target_type = 0x60 if seed % 2 else 0x61
    key_a, key_b = sector_keys(KeyScheme.DIVERSIFIED, master, uid, target_sector)
    expected = int.from_bytes(key_a if target_type == 0x60 else key_b)
    got = nested_attack(card, int.from_bytes(uid), (3, known, 0x60), (target_sector * 4 + 3, target_type))
    assert got == expected


def test_nested_attack_refuses_a_hardened_card() -> None:
    card, master, uid = make(1, Profile.HARDENED)
    known = int.from_bytes(sector_keys(KeyScheme.DIVERSIFIED, master, uid, 0)[0])
    with pytest.raises(AttackFailed, match="weak PRNG"):
        nested_attack(card, int.from_bytes(uid), (3, known, 0x60), (7, 0x60))


def test_dictionary_finds_default_keys_only_where_they_are() -> None:
    card, _, _ = make(2, scheme=KeyScheme.DEFAULT)
    assert len(dictionary_attack(FrameSlot(card))) == 32
    card, _, _ = make(2, scheme=KeyScheme.DIVERSIFIED)
    assert dictionary_attack(FrameSlot(card), sectors=range(4)) == {}


@pytest.mark.parametrize(
    ("profile", "prng", "magic", "backdoor"),
    [
        (Profile.GENUINE, PrngClass.WEAK, False, False),
        (Profile.HARDENED, PrngClass.HARDENED, False, False),
        (Profile.STATIC_NONCE, PrngClass.STATIC, False, False),
        (Profile.GEN1A, PrngClass.WEAK, True, False),
        (Profile.FM11RF08S, PrngClass.WEAK, False, True),
    ],
)
def test_chip_profiles_are_told_apart(profile: Profile, prng: PrngClass, magic: bool, backdoor: bool) -> None:
    card, _, _ = make(3, profile)
    assert classify_prng(collect_nonces(card, 6)) is prng
    assert has_gen1a_backdoor(card) is magic
    assert accepts_backdoor_key(card) is backdoor
