"""``audit autopwn``: the whole M1 key-recovery chain on one card, its table, dump and keys file."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from support import new_state

from audit.autopwn import DICTIONARY, REUSED, TRAILER, autopwn
from audit.chips import audit_fleet
from audit.fleet import FleetCard
from audit.m1_audit import KeyRecovery
from cardsim.image import save_card
from cardsim.m1_issue import KeyScheme, issue_m1_card
from cardsim.mifare import TRANSPORT_ACCESS, Frame, M1Card, M1State, Profile
from terminals.m1 import M1Gone

SEED = 20


def slipshod_card(profile: Profile = Profile.GENUINE, seed: int = SEED) -> M1State:
    """Diversified keys, but sector 0 left on the factory key and sectors 2..15 given sector 1's keys (an issuer's
    slip that keeps the chain short enough for CI: two nested attacks, the rest reused)."""
    rnd = random.Random(seed)
    state = issue_m1_card(rnd.randbytes(4), profile, KeyScheme.DIVERSIFIED, 2500, rnd.randbytes(16), city="4530")
    state.blocks[3] = bytes.fromhex("FFFFFFFFFFFF") + state.blocks[3][6:10] + bytes.fromhex("FFFFFFFFFFFF")
    sector1 = state.blocks[7]
    for sector in range(2, 16):
        trailer = state.blocks[sector * 4 + 3]
        state.blocks[sector * 4 + 3] = sector1[0:6] + trailer[6:10] + sector1[10:16]
    return state


def test_weak_card_falls_entirely_and_each_key_says_how() -> None:
    state = slipshod_card()
    result = autopwn(M1Card(state, os.urandom))
    assert not result.missing
    for (sector, key_type), found in result.keys.items():
        assert found.key == state.sector_key(sector, key_type)
    assert {result.keys[(0, t)].how for t in (0x60, 0x61)} == {DICTIONARY}
    assert {result.keys[(1, t)].how for t in (0x60, 0x61)} == {"nested"}
    assert {f.how for s, f in result.keys.items() if s[0] >= 2} == {REUSED}
    assert result.dump() == b"".join(state.blocks)  # every block read, trailers completed with the keys
    assert [s.name for s in result.stages] == ["dictionary", "nested"]
    assert "32 of 32 keys" in result.table()


def test_a_budget_that_runs_out_keeps_the_keys_found_and_says_why() -> None:
    state = slipshod_card()
    result = autopwn(M1Card(state, os.urandom), max_seconds=0.001)
    assert {s for s, f in result.keys.items() if f.how == DICTIONARY} == {(0, 0x60), (0, 0x61)}
    assert len(result.missing) == 30
    [stage] = [s for s in result.stages if s.name == "nested"]
    assert stage.outcome == "failed" and "budget" in stage.why


def test_cli_writes_the_dump_the_json_and_the_keys_and_leaves_the_image(tmp_path: Path) -> None:
    state = slipshod_card()
    image = tmp_path / "m1.json"
    save_card(image, state)
    before = image.read_bytes()
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "yikatong.cli", "audit", "autopwn", str(image), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "32 of 32 keys" in done.stdout and "nested" in done.stdout
    uid = state.blocks[0][:4].hex().upper()
    assert (out / f"m1-{uid}.mfd").read_bytes() == b"".join(state.blocks)
    doc = json.loads((out / f"m1-{uid}.json").read_text())
    assert doc["Card"]["UID"] == uid and doc["SectorKeys"]["1"]["KeyAFound"] == "nested"
    keys = (out / f"m1-{uid}-keys.dic").read_text().split()
    assert sorted(keys) == sorted({f"{state.sector_key(s, t):012X}" for s in range(16) for t in (0x60, 0x61)})
    assert image.read_bytes() == before


def test_cli_refuses_a_cpu_image_and_two_card_sources(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "yikatong.cli", "audit", "autopwn", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    both = run(str(tmp_path / "m1.json"), "--pn532", "/dev/null")
    assert both.returncode == 2 and "one card" in both.stderr
    cpu = tmp_path / "cpu.json"
    save_card(cpu, new_state())
    refused = run(str(cpu))
    assert refused.returncode == 2 and "CPU card" in refused.stderr and "Traceback" not in refused.stderr


def one_key_card(profile: Profile, seed: int, default_sector0: bool) -> tuple[M1State, int]:
    """Every sector on one random key (A = B), sector 0 on the factory key if asked: one attack, the rest reused."""
    rnd = random.Random(seed)
    state = issue_m1_card(rnd.randbytes(4), profile, KeyScheme.DIVERSIFIED, 2500, rnd.randbytes(16), city="4560")
    key = rnd.randbytes(6)
    for sector in range(16):
        trailer = state.blocks[sector * 4 + 3]
        own = bytes.fromhex("FFFFFFFFFFFF") if default_sector0 and sector == 0 else key
        state.blocks[sector * 4 + 3] = own + trailer[6:10] + own
    return state, int.from_bytes(key)


def test_chips_recover_keys_reports_each_attack_with_its_finding() -> None:
    darkside, _ = one_key_card(Profile.GENUINE, 31, default_sector0=False)
    hardened, hard_key = one_key_card(Profile.HARDENED, 32, default_sector0=True)
    static, _ = one_key_card(Profile.STATIC_NONCE, 33, default_sector0=True)
    backdoor, _ = one_key_card(Profile.FM11RF08S, 34, default_sector0=False)  # a whole diversified card: the bench
    mask = (1 << 48) - (1 << 22)  # hardnested at test size: 22 bits open (the bench runs all 48)
    named = {"darkside": darkside, "hardnested": hardened, "static": static, "backdoor": backdoor}
    recovery = KeyRecovery(hardnested_key_bits=(mask, hard_key & mask))
    report = audit_fleet([FleetCard(n, s) for n, s in named.items()], [], ["fleet"], active=False, recovery=recovery)
    names = {s["subject"]: s["source"] for s in report.subjects}
    found: dict[str, set[str]] = {}
    for f in report.findings:
        found.setdefault(str(names[f.subject]), set()).add(f.id)
    assert "M1-DARKSIDE" in found["darkside"] and "M1-DEFAULT-KEY" not in found["darkside"]
    assert "M1-HARDNESTED" in found["hardnested"]
    assert "M1-STATIC-NESTED" in found["static"]
    assert "M1-BACKDOOR-RECOVERY" in found["backdoor"]
    assert all(s["keys known"] == "32 of 32" for s in report.subjects), report.subjects
    rows = {s["source"]: s["keys broken by"] for s in report.subjects}
    assert rows["darkside"] == "darkside 32" and rows["backdoor"] == "backdoor 32"


@pytest.mark.parametrize("profile", list(Profile))
def test_each_profile_ends_with_all_keys_or_says_which_stage_could_not_run(profile: Profile) -> None:
    """No default key anywhere: weak-PRNG and static chips fall to darkside, an FM11RF08S to its backdoor; a
    hardened chip keeps its keys, and the stages say why (no leak for darkside, no known key for hardnested)."""
    state, key = one_key_card(profile, 40 + list(Profile).index(profile), default_sector0=False)
    result = autopwn(M1Card(state, os.urandom))
    stages = {s.name: s for s in result.stages}
    if profile is Profile.HARDENED:
        assert len(result.missing) == 32
        assert stages["darkside"].outcome == "failed" and "random" in stages["darkside"].why
        assert stages["hardnested"].outcome == "skipped" and "known key" in stages["hardnested"].why
    else:
        assert not result.missing and {f.key for f in result.keys.values()} == {key}
        first = "backdoor" if profile is Profile.FM11RF08S else "darkside"
        assert stages[first].outcome == "ran", result.stages


class LeavingCard:
    """An M1 card that leaves the field (M1Gone) after ``fields`` power-ups."""

    def __init__(self, card: M1Card, fields: int) -> None:
        self.card, self.fields = card, fields

    @property
    def host_crc(self) -> bool:
        return False

    def power_on(self) -> None:
        self.fields -= 1
        if self.fields < 0:
            raise M1Gone("no card in the field")
        self.card.power_on()

    def anticollision(self) -> tuple[bytes, int, bytes]:
        return self.card.anticollision()

    def transceive(self, frame: Frame) -> Frame | None:
        return self.card.transceive(frame)


def test_a_card_that_leaves_mid_chain_keeps_the_keys_found_and_says_so() -> None:
    state = slipshod_card()
    result = autopwn(LeavingCard(M1Card(state, os.urandom), 60))  # type: ignore[arg-type]
    assert {(0, 0x60), (0, 0x61)} <= set(result.keys) and result.missing
    assert result.stages[-1].name == "card" and "no card in the field" in result.stages[-1].why


def test_key_b_readable_in_a_trailer_is_read_once_key_a_falls_to_an_attack() -> None:
    state = slipshod_card()
    trailer = state.blocks[23]  # sector 5: its own keys, and key B readable (transport access bits)
    state.blocks[23] = bytes.fromhex("A1A2A3A4A5A6") + TRANSPORT_ACCESS + bytes.fromhex("B1B2B3B4B5B6")
    assert trailer != state.blocks[23]
    result = autopwn(M1Card(state, os.urandom))
    assert result.keys[(5, 0x60)].how == "nested" and result.keys[(5, 0x61)].how == TRAILER
    assert result.keys[(5, 0x61)].key == 0xB1B2B3B4B5B6 and not result.missing


def test_a_backdoor_slot_that_cannot_fall_is_listed_and_the_other_sectors_still_tried() -> None:
    state, key = one_key_card(Profile.FM11RF08S, 60, default_sector0=False)
    trailer = state.blocks[7]  # sector 1: its own keys, key B readable data (the chip refuses it as a key)
    state.blocks[7] = bytes.fromhex("C1C2C3C4C5C6") + TRANSPORT_ACCESS + bytes.fromhex("D1D2D3D4D5D6")
    assert trailer != state.blocks[7]
    result = autopwn(M1Card(state, os.urandom))
    stage = next(s for s in result.stages if s.name == "backdoor")
    assert "budget" not in stage.why
    assert result.keys[(1, 0x61)].how == TRAILER  # read with key A, not broken
    assert not result.missing and result.keys[(15, 0x60)].key == key


def test_cli_keys_file_is_tried_before_any_attack_and_a_bad_line_is_named(tmp_path: Path) -> None:
    state, key = one_key_card(Profile.HARDENED, 70, default_sector0=False)  # no attack could break it here
    image = tmp_path / "m1.json"
    save_card(image, state)
    keys = tmp_path / "keys.dic"
    keys.write_text(f"# from another card\nFFFFFFFFFFFF\n\n{key:012X}\n")
    command = [sys.executable, "-m", "yikatong.cli", "audit", "autopwn", str(image), "--out", str(tmp_path)]
    done = subprocess.run([*command, "--keys", str(keys)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "fleet key" in done.stdout, done.stdout + done.stderr
    keys.write_text("FFFFFFFFFFFF\nnot a key\n")
    bad = subprocess.run([*command, "--keys", str(keys)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "keys.dic:2" in bad.stderr, bad.stderr
