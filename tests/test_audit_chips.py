"""The chip audit: the planted fixture fleet reports exactly its planted findings (and the control cards none of
them), passive mode leaves the cards untouched, the CLI's files and exit codes, bad input, and a card on the real
PC/SC stack."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import ServedCard

from audit.autopwn import ATTACK_RULES
from audit.chips import SimulatedCpu, audit_fleet
from audit.cpu_audit import CHI2_LIMIT, KeySource, audit_cpu, chi_square
from audit.findings import CHIP_RULES, Report
from audit.fleet import FleetError, generate_fleet
from cardsim.crypto import Algorithm
from cardsim.image import purse_to_json, save_card
from cardsim.keys import IssuerKeyStore
from cardsim.mifare import M1State
from cardsim.personalise import CardRequest, issue_cpu_card
from cardsim.purse import Defect, PurseCard, PurseState
from cardsim.resources import fixture_path
from terminals.metro import parse_trip
from terminals.pcsc import list_readers

PLANTED = fixture_path("fleets/planted.json")
ACTIVE_ONLY = {
    "CPU-MAC1-NOT-CHECKED",
    "CPU-MAC2-NOT-CHECKED",
    "CPU-OVERDRAFT",
    "CPU-REPLAY",
    "CPU-NO-LOCKOUT",
    "CPU-COUNTER",
    "CPU-TEARING",
    "CPU-ROBUSTNESS",
    "CPU-UNPROTECTED-FILE",
}
CONTROLS = ("cpu-clean-control", "m1-clean-control")


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "yikatong.cli", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def sources(fleet_keys: IssuerKeyStore | None) -> list[KeySource]:
    found = [KeySource("published test keys", IssuerKeyStore.test_set(), True)]
    if fleet_keys is not None:
        found.append(KeySource("issuer keys", fleet_keys, False))
    return found


def by_card(report: Report) -> dict[str, set[str]]:
    """Finding ids per fleet card name."""
    names = {s["subject"]: s["source"] for s in report.subjects}
    found: dict[str, set[str]] = {name: set() for name in names.values()}
    for f in report.findings:
        found[names[f.subject]].add(f.id)
    return found


@pytest.fixture(scope="module")
def active_report() -> Report:
    fleet = generate_fleet(PLANTED)
    return audit_fleet(fleet.cards, sources(fleet.issuer_keys), [str(PLANTED)], active=True)


def test_planted_fleet_reports_exactly_the_planted_findings(active_report: Report) -> None:
    fleet = generate_fleet(PLANTED)
    found = by_card(active_report)
    expected = {card.name: set(card.expect or ()) for card in fleet.cards}
    assert found == expected
    # Every catalogue finding is planted somewhere, and the control cards hold none but their algorithm/Crypto-1.
    # (the key-recovery chain's own findings need --recover-keys: tests/test_autopwn.py plants those)
    planted = set(CHIP_RULES) - set(ATTACK_RULES.values()) | {"M1-KEY-RECOVERED"}
    assert set().union(*expected.values()) == planted
    assert found["cpu-clean-control"] == {"CPU-SM4"} and found["m1-clean-control"] == {"M1-CRYPTO1"}


def test_findings_carry_evidence_remediation_and_recovered_keys(active_report: Report) -> None:
    fleet = generate_fleet(PLANTED)
    for f in active_report.findings:
        assert f.evidence and f.remediation and f.severity is CHIP_RULES[f.id].severity
    recovered = [f for f in active_report.findings if f.id == "M1-KEY-RECOVERED"]
    nested = next(c for c in fleet.cards if c.name == "m1-nested-shared")
    assert not isinstance(nested.state, PurseState)
    # The report shows each recovered key and its time; the keys are the card's real purse sector keys.
    assert {(f.details["key_type"], f.details["key"]) for f in recovered} == {
        ("A", f"{nested.state.sector_key(1, 0x60):012X}"),
        ("B", f"{nested.state.sector_key(1, 0x61):012X}"),
    }
    assert all(f.details["seconds"] >= 0 for f in recovered)
    tearing = next(f for f in active_report.findings if f.id == "CPU-TEARING")
    assert any("power cut after 1 writes of the DEBIT leaves a mix (old: " in line for line in tearing.evidence)
    assert tearing.details["new"] == ["balance"] and "newest log record" in str(tearing.details["old"])


def test_tearing_cuts_on_a_journalled_card_reach_both_sides_of_the_commit_and_are_not_reported() -> None:
    """Every cut leaves all old or all new: some torn DEBITs committed (recovered from the journal), some did
    not, and the audit's trip records are single journeys that no metro gate takes for an open entry."""
    keys = IssuerKeyStore.load(fixture_path("keys/fleet-keys.json"))
    state = issue_cpu_card(keys, CardRequest("4510", Algorithm.SM4, 5000, 1, dt.date(2026, 1, 1), dt.date(2036, 1, 1)))
    reader = SimulatedCpu(PurseCard(state, os.urandom), "cpu")
    result = audit_cpu(reader, sources(keys), active=True, rig=reader)
    assert {f.id for f in result.findings} == {"CPU-SM4"}
    # The DEBIT that completed is the newest; its time says how many cut points came before it (one a second).
    points = int(f"{state.trips[0][31]:02x}") + 1
    assert 1 < len(state.trips) < points and state.journal is None
    assert all(parse_trip(record) is None for record in state.trips)


def test_passive_audit_runs_no_active_probe_and_says_so() -> None:
    fleet = generate_fleet(PLANTED)
    report = audit_fleet(fleet.cards, sources(fleet.issuer_keys), [str(PLANTED)], active=False)
    expected = {card.name: set(card.expect or ()) - ACTIVE_ONLY for card in fleet.cards}
    assert by_card(report) == expected
    assert "no --active" in report.skipped[0]


def test_without_the_issuer_keys_the_audit_cannot_prove_undiversified_keys() -> None:
    fleet = generate_fleet(PLANTED)
    cpu = [c for c in fleet.cards if c.name.startswith(("cpu-undiversified", "cpu-test-keys"))]
    report = audit_fleet(cpu, sources(None), ["cpu"], active=True)
    found = by_card(report)
    assert found["cpu-test-keys"] == {"CPU-SM4", "CPU-TEST-KEYS"}  # the published keys are always tried
    assert found["cpu-undiversified-1"] == {"CPU-SM4"}
    assert any("need the card's purchase key" in s for s in report.skipped)


def test_chi_square_of_uniform_and_biased_bytes() -> None:
    assert chi_square(bytes(range(256)) * 8) == 0
    assert chi_square(bytes(2048)) > CHI2_LIMIT
    assert chi_square(os.urandom(2048)) < CHI2_LIMIT  # fails about once in a million runs


@pytest.mark.parametrize(
    ("balance", "defects", "issuer_max", "amounts"),
    [
        (5000, {Defect.NO_MAX_BALANCE}, 100_000, [95_001, 2**32 - 5000]),  # past the maximum, and past 4 bytes
        (5000, set(), 100_000, None),  # a genuine card refuses both (6985)
        (5000, set(), 1000, [1]),  # a card whose own maximum is above the one the issuer publishes
        (0, {Defect.NO_MAX_BALANCE}, 100_000, [100_001]),  # no 4-byte amount takes a zero balance past 4 bytes
    ],
    ids=["no-max-balance", "genuine", "above-published", "zero-balance"],
)
def test_the_load_limit_probe_is_passive_and_reports_the_loads_a_card_accepts(
    balance: int, defects: set[Defect], issuer_max: int, amounts: list[int] | None
) -> None:
    keys = IssuerKeyStore.load(fixture_path("keys/fleet-keys.json"))
    request = CardRequest("4510", Algorithm.SM4, balance, 1, dt.date(2026, 1, 1), dt.date(2036, 1, 1))
    state = issue_cpu_card(keys, request)
    state.defects = frozenset(defects)
    before = purse_to_json(state)
    reader = SimulatedCpu(PurseCard(state, os.urandom), "cpu")
    result = audit_cpu(reader, sources(keys), active=False, rig=reader, issuer_max=issuer_max)
    found = [f.details["amounts"] for f in result.findings if f.id == "CPU-LOAD-ABOVE-MAX"]
    assert found == ([] if amounts is None else [amounts])
    assert purse_to_json(state) == before  # INITIALIZE FOR LOAD alone: nothing on the card changed
    [skipped] = result.skipped
    assert "need --active" in skipped and "tearing probe needs --active and a reader that can cut power" in skipped


class OddAnswers(SimulatedCpu):
    """A weak-random card that answers ``sw`` to GET BALANCE (``step`` "balance") or to every INITIALIZE FOR LOAD
    of more than one fen ("load": the load-limit probe's, not the key check's)."""

    def __init__(self, step: str, sw: bytes) -> None:
        state = issue_cpu_card(
            IssuerKeyStore.test_set(),
            CardRequest("4510", Algorithm.SM4, 5000, 1, dt.date(2026, 1, 1), dt.date(2036, 1, 1)),
        )
        state.defects = frozenset({Defect.WEAK_RANDOM})
        super().__init__(PurseCard(state, os.urandom), "cpu")
        self.step, self.sw = step, sw

    def transmit(self, apdu: bytes) -> bytes:
        balance = apdu[:4] == bytes.fromhex("805C0002")
        big_load = apdu[:4] == bytes.fromhex("80500002") and int.from_bytes(apdu[6:10]) > 1
        if (balance and self.step == "balance") or (big_load and self.step == "load"):
            return self.sw
        return super().transmit(apdu)


@pytest.mark.parametrize(
    ("step", "sw", "skipped"),
    [
        ("balance", b"\x6a\x81", ["load-limit probe: GET BALANCE answered 6A81 with 0 bytes: no limit tested"]),
        (
            "load",
            b"\x93\x03",
            [
                "load-limit probe: INITIALIZE FOR LOAD of 95001 fen answered 9303, not 6985: the issuer's maximum "
                "balance of 100000 fen not tested",
                "load-limit probe: INITIALIZE FOR LOAD of 4294962296 fen answered 9303, not 6985: the 4-byte "
                "balance not tested",
            ],
        ),
        ("load", b"\x69\x85", []),  # the refusal of a genuine card: tested, and nothing found
    ],
    ids=["balance-refused", "load-locked", "load-refused"],
)
def test_a_load_limit_probe_that_cannot_test_says_so_and_the_audit_keeps_its_findings(
    step: str, sw: bytes, skipped: list[str]
) -> None:
    reader = OddAnswers(step, sw)
    result = audit_cpu(reader, sources(None), active=False)
    assert {f.id for f in result.findings} == {"CPU-SM4", "CPU-TEST-KEYS", "CPU-WEAK-RANDOM"}
    assert [line.removeprefix(f"{result.serial}: ") for line in result.skipped[:-1]] == skipped
    assert "need --active" in result.skipped[-1]


def test_cli_max_balance_is_the_issuers_published_maximum(tmp_path: Path) -> None:
    keys = IssuerKeyStore.load(fixture_path("keys/fleet-keys.json"))
    cards = tmp_path / "cards"
    cards.mkdir()
    request = CardRequest("4510", Algorithm.SM4, 5000, 1, dt.date(2026, 1, 1), dt.date(2036, 1, 1))
    save_card(cards / "card.json", issue_cpu_card(keys, request))
    args = ["audit", "chips", "--cards", str(cards), "--fail-on", "high"]
    assert run_cli(*args, cwd=tmp_path).returncode == 0  # the default maximum: 100,000 fen, the card's own
    assert run_cli(*args, "--max-balance", "4999", cwd=tmp_path).returncode == 1
    doc = json.loads((tmp_path / "audit-chips.json").read_text())
    [found] = [f for f in doc["findings"] if f["id"] == "CPU-LOAD-ABOVE-MAX"]
    assert found["severity"] == "high" and found["details"] == {"balance": 5000, "issuer_max": 4999, "amounts": [1]}
    shown = run_cli("audit", "chips", "--help").stdout
    assert "--max-balance FEN" in shown
    # what the active probes cost, said plainly: a few fen, unless the card has the overdraft flaw
    assert "left holding a wrapped balance of about 4.29 billion fen" in " ".join(shown.split())


def test_cli_on_card_images_writes_reports_leaves_images_unchanged_and_gates(tmp_path: Path) -> None:
    fleet = generate_fleet(PLANTED)
    cards = tmp_path / "cards"
    cards.mkdir()
    for card in fleet.cards:
        if card.name in (*CONTROLS, "cpu-replay", "cpu-overdraft"):  # the overdraft wraps the copy's balance
            save_card(cards / f"{card.name}.json", card.state)
    digest = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in cards.iterdir()}
    keys = str(fixture_path("keys/fleet-keys.json"))
    done = run_cli("audit", "chips", "--cards", str(cards), "--keys", keys, "--active", cwd=tmp_path)
    assert done.returncode == 1, done.stderr  # CPU-REPLAY is critical, at or above the default 'high'
    doc = json.loads((tmp_path / "audit-chips.json").read_text())
    assert doc["schema"] == "yikatong.audit-report/1" and doc["kind"] == "chips"
    found = sorted(f["id"] for f in doc["findings"])
    assert found == ["CPU-3DES", "CPU-OVERDRAFT", "CPU-REPLAY", "CPU-SM4", "CPU-SM4", "M1-CRYPTO1"]
    assert doc["counts"] == {"critical": 2, "high": 1, "medium": 0, "low": 0, "info": 1, "pass": 2}
    assert "<html" in (tmp_path / "audit-chips.html").read_text()
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in cards.iterdir()} == digest
    (cards / "cpu-replay.json").unlink()
    (cards / "cpu-overdraft.json").unlink()
    # The clean controls: only M1-CRYPTO1 (high) remains, so the gate depends on --fail-on.
    args = ["audit", "chips", "--cards", str(cards), "--keys", keys, "--json", "c.json", "--html", "c.html"]
    assert run_cli(*args, "--fail-on", "critical", cwd=tmp_path).returncode == 0
    assert run_cli(*args, "--fail-on", "high", cwd=tmp_path).returncode == 1


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: (d / "bad.json").write_text('{"schema": "yikatong.card/1", "tech": "cpu"}'), "bad.json"),
        (lambda d: (d / "torn.json").write_text('{"schema": '), "torn.json: not valid JSON"),
        (lambda d: None, "no card images"),
    ],
    ids=["corrupt-field", "truncated", "empty-folder"],
)
def test_bad_card_images_exit_2_naming_the_file_and_write_nothing(
    tmp_path: Path, setup: Callable[[Path], object], message: str
) -> None:
    cards = tmp_path / "cards"
    cards.mkdir()
    setup(cards)
    done = run_cli("audit", "chips", "--cards", str(cards), cwd=tmp_path)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.glob("audit-chips.*"))


def test_bad_usage_exits_2(tmp_path: Path) -> None:
    assert run_cli("audit", "chips", "--fleet", str(PLANTED), "--fail-on", "severe").returncode == 2
    assert run_cli("audit", "chips").returncode == 2
    assert run_cli("audit", "chips", "--cards", str(tmp_path / "missing")).returncode == 2
    bad_keys = tmp_path / "keys.json"
    bad_keys.write_text("{}")
    done = run_cli("audit", "chips", "--fleet", str(PLANTED), "--keys", str(bad_keys), cwd=tmp_path)
    assert done.returncode == 2 and "keys.json" in done.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda doc: doc["cards"][0].update(defects=["sloppy"]), "cards[0] (cpu-clean-control): 'defects' may hold"),
        (lambda doc: doc["cards"][1].update(alg="aes"), "cards[1] (cpu-3des): 'alg' must be one of"),
        (lambda doc: doc.update(schema="x"), "not a yikatong.fleet/1 document"),
        (lambda doc: doc["cards"][16].update(plant={"default_sectors": [16]}), "sectors 0..15"),
    ],
)
def test_bad_fleet_files_name_the_entry(
    tmp_path: Path, change: Callable[[dict[str, Any]], object], message: str
) -> None:
    doc = json.loads(PLANTED.read_text())
    doc["keys"] = str(fixture_path("keys/fleet-keys.json"))
    change(doc)
    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(FleetError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        generate_fleet(path)


@pytest.mark.pcsc
def test_audit_of_a_card_served_to_pcscd_through_vpcd(tmp_path: Path) -> None:
    """A flawed card served by `card serve` is audited through pcscd like a real card on a real reader."""
    assert "Virtual PCD 00 00" in list_readers(), "run scripts/services.sh to start pcscd with vpcd"
    fleet = generate_fleet(PLANTED)
    image = tmp_path / "card.json"
    save_card(image, next(c for c in fleet.cards if c.name == "cpu-weak-random").state)
    keys = str(fixture_path("keys/fleet-keys.json"))
    with ServedCard(image):
        done = run_cli(
            "audit",
            "chips",
            "--reader",
            "Virtual PCD 00 00",
            "--count",
            "1",
            "--wait",
            "20",
            "--keys",
            keys,
            "--active",
            cwd=tmp_path,
        )
    assert done.returncode == 1, done.stderr
    doc = json.loads((tmp_path / "audit-chips.json").read_text())
    assert sorted(f["id"] for f in doc["findings"]) == ["CPU-3DES", "CPU-WEAK-RANDOM"]
    assert any("tearing probe needs a reader that can cut power" in s for s in doc["skipped"])
    assert doc["subjects"][0]["keys"] == "issuer keys, diversified"


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 3),
    st.sampled_from(["cpu", "m1", "sm4", "des", "4510", "hardened", "shared", "test", "replay", "x"]),
    st.lists(st.one_of(st.integers(-1, 17), st.sampled_from(["replay", "weak-random", "?"])), max_size=3),
)
_fields = st.dictionaries(
    st.sampled_from(["alg", "keys", "defects", "profile", "m1_keys", "plant", "count", "balance", "expect", "name"]),
    st.one_of(_values, st.dictionaries(st.sampled_from(["default_sectors", "broken_value", "x"]), _values)),
    max_size=3,
)
# A plausible entry (a technology, a city, an algorithm) with a few fields of any shape laid over it.
_entries = st.tuples(
    st.fixed_dictionaries(
        {"tech": st.sampled_from(["cpu", "m1"]), "city": st.sampled_from(["4510", "4530"]), "alg": st.just("sm4")}
    ),
    _fields,
).map(lambda pair: {**pair[0], **pair[1]})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cards=st.one_of(_values, st.lists(st.one_of(_entries, _values), max_size=4)))
def test_any_fleet_file_generates_or_names_what_is_wrong(tmp_path: Path, cards: object) -> None:
    path = tmp_path / "fleet.json"
    doc = {"schema": "yikatong.fleet/1", "keys": str(fixture_path("keys/fleet-keys.json")), "cards": cards}
    path.write_text(json.dumps(doc))
    try:
        fleet = generate_fleet(path)
    except FleetError as err:
        assert str(path) in str(err)
    else:
        assert fleet.cards and all(isinstance(c.state, (PurseState, M1State)) for c in fleet.cards)
