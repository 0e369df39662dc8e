"""No planted chip OS flaw hides another: a simulated CPU card with each single ``Defect`` and with each pair of
them, audited actively with the issuer keys and a tearing rig, is reported with exactly the findings of its flaws
(and its algorithm); a clean card gets no defect finding. Through pcscd + vpcd (a reader that cannot cut power: no
tearing probe) a served card with each flaw and each pair is reported exactly so too, and keeps its files."""

from __future__ import annotations

import datetime as dt
import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
from support import SLOT_01, ServedCard, files_of, yikatong

from audit.chips import ChipAudit, audit_image_card
from audit.cpu_audit import CpuAudit, KeySource
from audit.findings import CHIP_RULES, Severity
from audit.fleet import FleetCard
from cardsim.crypto import Algorithm
from cardsim.image import load_purse, save_card
from cardsim.keys import IssuerKeyStore
from cardsim.personalise import CardRequest, issue_cpu_card
from cardsim.purse import Defect, PurseState
from cardsim.resources import fixture_path
from terminals.pcsc import list_readers

ISSUER_KEY_FILE = fixture_path("keys/fleet-keys.json")
ISSUER_KEYS = IssuerKeyStore.load(ISSUER_KEY_FILE)
FINDING: dict[Defect, str] = {
    Defect.MAC1_UNCHECKED: "CPU-MAC1-NOT-CHECKED",
    Defect.REPLAY: "CPU-REPLAY",
    Defect.NO_LOCKOUT: "CPU-NO-LOCKOUT",
    Defect.COUNTER_STUCK: "CPU-COUNTER",
    Defect.NO_JOURNAL: "CPU-TEARING",
    Defect.WEAK_RANDOM: "CPU-WEAK-RANDOM",
    Defect.FUZZ_CORRUPTS: "CPU-ROBUSTNESS",
    Defect.MAC2_UNCHECKED: "CPU-MAC2-NOT-CHECKED",
    Defect.PLAIN_WRITE: "CPU-UNPROTECTED-FILE",
    Defect.NO_MAX_BALANCE: "CPU-LOAD-ABOVE-MAX",
    Defect.OVERDRAFT: "CPU-OVERDRAFT",
}
ALGORITHM_FINDING = {Algorithm.SM4: "CPU-SM4", Algorithm.DES3: "CPU-3DES"}
DEFECT_SETS = [frozenset[Defect](), *(frozenset({d}) for d in FINDING)] + [
    frozenset(pair) for pair in itertools.combinations(FINDING, 2)
]
NEEDS_POWER_CUT = {"CPU-TEARING"}  # what a PC/SC reader cannot probe


def set_id(defects: frozenset[Defect]) -> str:
    """A test id: the flaws' names, or "clean"."""
    return "+".join(sorted(d.value for d in defects)) or "clean"


def expected(defects: frozenset[Defect], alg: Algorithm, power_cut: bool = True) -> list[str]:
    """The findings of an active audit of a card with ``defects``: its algorithm's and one per flaw, less those of
    the probes that need a reader that can cut power when it cannot (sorted)."""
    found = {ALGORITHM_FINDING[alg], *(FINDING[d] for d in defects)}
    return sorted(found if power_cut else found - NEEDS_POWER_CUT)


def new_card_state(defects: frozenset[Defect], alg: Algorithm = Algorithm.SM4) -> PurseState:
    """A freshly issued card (issuer keys) with ``defects`` planted."""
    state = issue_cpu_card(ISSUER_KEYS, CardRequest("4510", alg, 5000, 7, dt.date(2026, 1, 1), dt.date(2036, 1, 1)))
    state.defects = defects
    return state


def audit(defects: frozenset[Defect], alg: Algorithm = Algorithm.SM4, keys: IssuerKeyStore = ISSUER_KEYS) -> CpuAudit:
    """An active audit (the reviewer holds ``keys``, the reader can cut power) of a fresh card with ``defects``,
    run as ``audit chips`` runs it on a card image."""
    state = new_card_state(defects, alg)
    chips = ChipAudit()
    sources = [KeySource("issuer keys", keys, False)]
    audit_image_card(FleetCard("card", state), sources, chips, active=True, recover_all=False, progress=lambda _: None)
    assert not chips.failed
    [(_, result)] = chips.cpu
    return result


@pytest.mark.parametrize("alg", list(ALGORITHM_FINDING))
@pytest.mark.parametrize("defects", DEFECT_SETS, ids=set_id)
def test_each_defect_and_each_pair_is_found_exactly(defects: frozenset[Defect], alg: Algorithm) -> None:
    assert sorted(f.id for f in audit(defects, alg).findings) == expected(defects, alg)


@pytest.mark.pcsc
@pytest.mark.parametrize("defects", DEFECT_SETS, ids=set_id)
def test_through_pcscd_and_vpcd_each_defect_and_each_pair_is_found_exactly_and_the_card_keeps_its_files(
    tmp_path: Path, defects: frozenset[Defect]
) -> None:
    name, port = SLOT_01
    assert name in list_readers(), "run scripts/services.sh to start pcscd with vpcd"
    state = new_card_state(defects)
    image, report = tmp_path / "card.json", tmp_path / "audit-chips.json"
    save_card(image, state)
    with ServedCard(image, "--port", port) as served:
        done = yikatong(
            "audit", "chips", "--reader", name, "--count", "1", "--wait", "20", "--keys", str(ISSUER_KEY_FILE),
            "--active", "--json", str(report), "--html", str(tmp_path / "audit-chips.html"),
        )  # fmt: skip
    want = expected(defects, Algorithm.SM4, power_cut=False)
    assert done.returncode == int(any(CHIP_RULES[f].severity >= Severity.HIGH for f in want)), done.stderr
    doc = json.loads(report.read_text())
    assert sorted(f["id"] for f in doc["findings"]) == want
    [subject] = doc["subjects"]
    assert [s for s in doc["skipped"] if "tearing" in s] == [
        f"{subject['subject']}: tearing probe needs a reader that can cut power mid-command "
        "(simulated cards have one, a PC/SC reader has not)"
    ]
    # What the served card saved once it stopped: the plain-write probe put every file back, the lockout probe
    # locked it unless the flaw keeps it open.
    assert served.returncode == 0, served.output
    saved = load_purse(image)
    assert files_of(saved) == files_of(state)
    assert saved.locked == (Defect.NO_LOCKOUT not in defects)


@pytest.mark.parametrize(
    ("defects", "old"),
    [
        ({Defect.NO_JOURNAL}, ["offline counter", "newest log record", "transaction proof", "newest trip record"]),
        # the stuck counter reads old after any DEBIT: it is left out, and the other parts still show the mix
        ({Defect.NO_JOURNAL, Defect.COUNTER_STUCK}, ["newest log record", "transaction proof", "newest trip record"]),
    ],
    ids=["no-journal", "no-journal+counter-stuck"],
)
def test_tearing_evidence_names_the_old_and_new_parts_at_the_tear_point(defects: set[Defect], old: list[str]) -> None:
    [tearing] = [f for f in audit(frozenset(defects)).findings if f.id == "CPU-TEARING"]
    # A journal-less DEBIT writes the balance first: one write in, only the balance is new.
    assert tearing.details == {"writes": 1, "old": old, "new": ["balance"], "neither": []}
    assert "power cut after 1 writes of the DEBIT leaves a mix (old: " in "\n".join(tearing.evidence)
    [balance] = [line.split(", ") for line in tearing.evidence if line.startswith("balance: ")]
    before, new, after = (int(part.rsplit(" ", 1)[1]) for part in balance)
    assert new == before - 1 and after == new  # the spec's new balance is the old one less the DEBIT's fen
    assert any("not judged" in line for line in tearing.evidence) == (Defect.COUNTER_STUCK in defects)


@pytest.mark.parametrize("defects", [frozenset(), frozenset({Defect.NO_JOURNAL})], ids=["clean", "no-journal"])
def test_without_the_tac_key_the_tearing_probe_judges_the_proof_by_mac2(defects: frozenset[Defect]) -> None:
    no_tac = IssuerKeyStore([replace(s, tac=None) for s in ISSUER_KEYS])
    result = audit(defects, keys=no_tac)
    assert result.keys is not None and result.keys.tac is None
    assert ("CPU-TEARING" in {f.id for f in result.findings}) == (Defect.NO_JOURNAL in defects)
