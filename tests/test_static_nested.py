"""Static nested and the FM11RF08S backdoor recovery (audit/static_nested.py) on the chips they apply to, the
nonces those chips send (cardsim/mifare.py), a PN532 that leaves CRC_A to the host, and clear refusals where the
attacks do not apply."""

from __future__ import annotations

import random

import pytest
from test_pn532_host import UID, emulated, key

from audit import static_nested
from audit.m1_attacks import AttackFailed, try_key
from audit.static_nested import backdoor_recovery, key_candidates, static_nested_attack
from cardsim.crypto1 import is_weak_nonce, prng_successor
from cardsim.m1_issue import KeyScheme, issue_m1_card, sector_keys
from cardsim.mifare import BACKDOOR_KEY, STATIC_NONCE, M1Card, Profile, fm11rf08s_nested_nonce, fm11rf08s_seed
from terminals.m1 import FrameSlot, M1Reader

SECTOR_PN532 = 10  # test size: a sector whose keys come early in their lists (each try is slower through the PN532)


def card(profile: Profile, seed: int) -> tuple[M1Card, dict[tuple[int, int], int]]:
    """A card issued with keys diversified from a random master (no default key anywhere), and its 32 keys."""
    rnd = random.Random(seed)
    master, uid = rnd.randbytes(16), rnd.randbytes(4)
    chip = M1Card(issue_m1_card(uid, profile, KeyScheme.DIVERSIFIED, 1000, master), rnd.randbytes)
    keys = {}
    for sector in range(16):
        key_a, key_b = sector_keys(KeyScheme.DIVERSIFIED, master, uid, sector)
        keys[(sector, 0x60)], keys[(sector, 0x61)] = int.from_bytes(key_a), int.from_bytes(key_b)
    return chip, keys


def nested_nonce(chip: M1Card, first: tuple[int, int, int], target: tuple[int, int, int]) -> int:
    """The plain nonce of a nested authentication ``target`` = (block, key, command) after ``first``."""
    chip.power_on()
    reader = M1Reader(chip, chip.state.uid)
    reader.authenticate(*first)
    reader.authenticate(*target)
    return reader.last_nt


# --- the chips -----------------------------------------------------------------------------------


def test_fm11rf08s_nested_nonce_is_fixed_per_slot_whatever_key_opens_the_session() -> None:
    chip, keys = card(Profile.FM11RF08S, 1)
    backdoor_a = (8, BACKDOOR_KEY, 0x64)
    by_backdoor = nested_nonce(chip, backdoor_a, backdoor_a)
    assert nested_nonce(chip, backdoor_a, backdoor_a) == by_backdoor, "static across sessions"
    assert nested_nonce(chip, (3, keys[(0, 0x61)], 0x61), (8, keys[(2, 0x60)], 0x60)) == by_backdoor
    by_b = nested_nonce(chip, backdoor_a, (8, BACKDOOR_KEY, 0x65))
    assert by_b != by_backdoor and is_weak_nonce(by_b) and is_weak_nonce(by_backdoor)
    # Key A and key B of the sector come from one sector value: the relation the recovery uses.
    assert fm11rf08s_seed(by_backdoor, keys[(2, 0x60)]) == fm11rf08s_seed(by_b, keys[(2, 0x61)])
    assert fm11rf08s_nested_nonce(fm11rf08s_seed(by_b, keys[(2, 0x61)]), keys[(2, 0x61)]) == by_b
    # First authentications still draw from a running weak PRNG: the nonce changes and passes the LFSR check.
    firsts = []
    for _ in range(3):
        chip.select()  # a new selection, the PRNG running on
        reader = M1Reader(chip, chip.state.uid)
        reader.authenticate(8, keys[(2, 0x60)], 0x60)
        firsts.append(reader.last_nt)
    assert len(set(firsts)) == 3 and all(is_weak_nonce(n) for n in firsts)


def test_static_nonce_chip_restarts_its_prng_at_each_first_authentication() -> None:
    chip, keys = card(Profile.STATIC_NONCE, 2)
    known = (3, keys[(0, 0x60)], 0x60)
    for _ in range(2):
        chip.power_on()
        reader = M1Reader(chip, chip.state.uid)
        reader.authenticate(*known)
        assert reader.last_nt == STATIC_NONCE
        reader.authenticate(*known)
        assert reader.last_nt == prng_successor(STATIC_NONCE, 160)
        reader.authenticate(11, keys[(2, 0x61)], 0x61)
        assert reader.last_nt == prng_successor(STATIC_NONCE, 320)


def test_key_candidates_hold_the_key_and_refuse_a_wrong_nonce() -> None:
    chip, keys = card(Profile.FM11RF08S, 3)
    uid = chip.state.uid
    nt = nested_nonce(chip, (4, BACKDOOR_KEY, 0x64), (4, BACKDOOR_KEY, 0x64))
    nt_enc, parities = static_nested._backdoor_sample(chip, uid, 1, 0x60)[1:]
    candidates = key_candidates(uid, nt, nt_enc, parities)
    assert keys[(1, 0x60)] in candidates and 10_000 < len(candidates) < 200_000
    wrong = [n for n in (prng_successor(nt, d) for d in range(1, 40)) if len(key_candidates(uid, n, nt_enc, parities))]
    assert len(wrong) < 20, "the three inner parity bits reject most wrong nonces"


# --- static nested -------------------------------------------------------------------------------


@pytest.mark.parametrize(("seed", "target"), [(4, (7, 0x61)), (5, (62, 0x60))])
def test_static_nested_recovers_a_key_from_one_known_key(seed: int, target: tuple[int, int]) -> None:
    chip, keys = card(Profile.STATIC_NONCE, seed)
    lines: list[str] = []
    got = static_nested_attack(chip, chip.state.uid, (3, keys[(0, 0x60)], 0x60), target, progress=lines.append)
    assert got == keys[(target[0] // 4, target[1])]
    assert any("2 deep" in line for line in lines)


def test_static_nested_through_a_pn532_that_leaves_crc_to_the_host() -> None:
    link, _ = emulated(Profile.STATIC_NONCE, KeyScheme.DIVERSIFIED)
    assert link.host_crc
    known = (3, key(KeyScheme.DIVERSIFIED, 0, 0x60), 0x60)
    got = static_nested_attack(link, int.from_bytes(UID), known, (21, 0x61))
    assert got == key(KeyScheme.DIVERSIFIED, 5, 0x61)


# --- FM11RF08S backdoor --------------------------------------------------------------------------


def test_backdoor_recovery_recovers_both_keys_of_each_sector_asked() -> None:
    """Test size: three sectors of a card with 32 diversified keys (a whole card takes 30 s to 2 min here,
    thousands of card authentications per key, as on a real card: docs/research/static-nested.md)."""
    chip, keys = card(Profile.FM11RF08S, 2)
    lines: list[str] = []
    got = backdoor_recovery(chip, chip.state.uid, sectors=(1, 9, 15), progress=lines.append)
    assert got == {slot: k for slot, k in keys.items() if slot[0] in (1, 9, 15)}
    assert all(try_key(FrameSlot(chip), s * 4 + 3, k, t) for (s, t), k in got.items())
    assert any("candidates" in line for line in lines)


def test_backdoor_recovery_keeps_what_it_found_when_the_budget_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget expires (a stand-in clock) once the second sector starts: the first sector's keys are kept."""
    chip, keys = card(Profile.FM11RF08S, 2)
    expired: list[str] = []
    lines: list[str] = []
    monkeypatch.setattr(static_nested._Clock, "over", lambda self: bool(expired))
    monkeypatch.setattr(static_nested._Clock, "why", lambda self: "ran out of its budget")

    def progress(line: str) -> None:
        if line.startswith("FM11RF08S sector 1 "):
            expired.append(line)
        lines.append(line)

    got = backdoor_recovery(chip, chip.state.uid, sectors=(15, 1), progress=progress)
    assert got == {(15, 0x60): keys[(15, 0x60)], (15, 0x61): keys[(15, 0x61)]}
    assert any("stopped in sector 1" in line and "ran out" in line for line in lines)


def test_backdoor_recovery_through_a_pn532_that_leaves_crc_to_the_host() -> None:
    link, _ = emulated(Profile.FM11RF08S, KeyScheme.DIVERSIFIED)
    assert link.host_crc
    got = backdoor_recovery(link, int.from_bytes(UID), sectors=(SECTOR_PN532,))
    assert got == {(SECTOR_PN532, t): key(KeyScheme.DIVERSIFIED, SECTOR_PN532, t) for t in (0x60, 0x61)}


# --- where they do not apply ---------------------------------------------------------------------


@pytest.mark.parametrize("profile", [Profile.GENUINE, Profile.HARDENED, Profile.FM11RF08S])
def test_static_nested_refuses_a_card_whose_first_nonce_changes(profile: Profile) -> None:
    chip, keys = card(profile, 6)
    with pytest.raises(AttackFailed, match="static nested needs a nonce that never changes"):
        static_nested_attack(chip, chip.state.uid, (3, keys[(0, 0x60)], 0x60), (7, 0x60))


def test_static_nested_says_when_the_known_key_is_wrong() -> None:
    chip, keys = card(Profile.STATIC_NONCE, 7)
    with pytest.raises(AttackFailed, match="known key does not open its sector"):
        static_nested_attack(chip, chip.state.uid, (3, keys[(0, 0x60)] ^ 1, 0x60), (7, 0x60))


@pytest.mark.parametrize("profile", [Profile.GENUINE, Profile.STATIC_NONCE])
def test_backdoor_recovery_refuses_a_card_without_the_backdoor(profile: Profile) -> None:
    chip, _ = card(profile, 8)
    with pytest.raises(AttackFailed, match="refuses the FM11RF08S vendor key A396EFA4E24F"):
        backdoor_recovery(chip, chip.state.uid)
