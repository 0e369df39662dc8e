"""Darkside (audit/darkside.py): a key of a random genuine card with no default key, knowing no key; chips that
do not leak are refused with the reason; the same attack through a PN532 that leaves CRC_A to the host."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pn532_host import emulated, key

import cardsim.mifare
from audit._crypto1 import darkside_keys
from audit.darkside import darkside_attack
from audit.m1_attacks import DEFAULT_KEYS, AttackFailed, try_key
from cardsim.m1_issue import KeyScheme, issue_m1_card, sector_keys
from cardsim.mifare import M1Card, Profile
from terminals.m1 import FrameSlot


def card(profile: Profile, master: bytes, uid: bytes, seed: int) -> M1Card:
    """A card issued with keys diversified from a random master (no sector keeps a default key)."""
    return M1Card(issue_m1_card(uid, profile, KeyScheme.DIVERSIFIED, 1000, master), random.Random(seed).randbytes)


@settings(max_examples=3, deadline=None)
@given(
    master=st.binary(min_size=16, max_size=16),
    uid=st.binary(min_size=4, max_size=4),
    sector=st.integers(0, 15),
    seed=st.integers(0, 2**32),
)
def test_darkside_recovers_key_a_and_key_b_of_a_random_genuine_card(
    master: bytes, uid: bytes, sector: int, seed: int
) -> None:
    chip = card(Profile.GENUINE, master, uid, seed)
    trailer = sector * 4 + 3
    assert not any(try_key(FrameSlot(chip), trailer, k, t) for k in DEFAULT_KEYS for t in (0x60, 0x61))
    lines: list[str] = []
    for key_type in (0x60, 0x61):
        expected = int.from_bytes(sector_keys(KeyScheme.DIVERSIFIED, master, uid, sector)[key_type - 0x60])
        assert darkside_attack(chip, (trailer, key_type), progress=lines.append) == expected
    assert any("leak 8/8" in line for line in lines)


@pytest.mark.parametrize(
    ("profile", "reason"),
    [
        (Profile.HARDENED, "nonces are random"),
        (Profile.FM11RF08S, "no NAK for any of the 256 parity combinations.*does not leak"),
    ],
)
def test_chips_that_do_not_leak_are_refused_with_the_reason(profile: Profile, reason: str) -> None:
    chip = card(profile, bytes(range(16)), bytes.fromhex("1A2B3C4D"), 20)
    with pytest.raises(AttackFailed, match=reason):
        darkside_attack(chip, (7, 0x60))


def test_an_exhausted_budget_says_how_far_it_got() -> None:
    chip = card(Profile.GENUINE, bytes(range(16)), bytes.fromhex("1A2B3C4D"), 20)
    with pytest.raises(AttackFailed, match="out of time while collecting leak 1: 0 of 8 leaks collected for nT"):
        darkside_attack(chip, (7, 0x60), max_seconds=0)


def test_bad_input_is_a_clear_error() -> None:
    chip = card(Profile.GENUINE, bytes(range(16)), bytes.fromhex("1A2B3C4D"), 20)
    with pytest.raises(ValueError, match="darkside target"):
        darkside_attack(chip, (64, 0x60))
    with pytest.raises(ValueError, match="darkside target"):
        darkside_attack(chip, (3, 0x64))
    with pytest.raises(ValueError, match="8 variants"):
        darkside_keys(0, 0, 0, bytes(7), bytes(8))
    with pytest.raises(ValueError, match="4 bits"):
        darkside_keys(0, 0, 0, bytes([0x10] * 8), bytes(8))


def test_the_nak_a_genuine_chip_sends_leaks_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """A genuine chip's leaked NAK reads 0x5 (transmission error); a chip that leaks 0x4 instead is solved too."""
    monkeypatch.setattr(cardsim.mifare, "NAK_TRANSMISSION", 0x4)
    master, uid = bytes(range(16)), bytes.fromhex("1A2B3C4D")
    chip = card(Profile.GENUINE, master, uid, 21)
    expected = int.from_bytes(sector_keys(KeyScheme.DIVERSIFIED, master, uid, 9)[0])
    assert darkside_attack(chip, (38, 0x60)) == expected


def test_darkside_through_a_pn532_that_leaves_crc_to_the_host() -> None:
    link, _ = emulated(Profile.GENUINE, KeyScheme.DIVERSIFIED)
    assert link.host_crc
    assert darkside_attack(link, (11, 0x61)) == key(KeyScheme.DIVERSIFIED, 2, 0x61)
