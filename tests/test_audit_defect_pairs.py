"""No planted chip OS flaw hides another: a simulated CPU card with each single ``Defect`` and with each pair of
them, audited actively with the issuer keys and a tearing rig, is reported with exactly the findings of its flaws
(and its algorithm); a clean card gets no defect finding."""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import replace

import pytest

from audit.chips import ChipAudit, audit_image_card
from audit.cpu_audit import CpuAudit, KeySource
from audit.fleet import FleetCard
from cardsim.crypto import Algorithm
from cardsim.keys import IssuerKeyStore
from cardsim.personalise import CardRequest, issue_cpu_card
from cardsim.purse import Defect
from cardsim.resources import fixture_path

ISSUER_KEYS = IssuerKeyStore.load(fixture_path("keys/fleet-keys.json"))
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


def audit(defects: frozenset[Defect], alg: Algorithm = Algorithm.SM4, keys: IssuerKeyStore = ISSUER_KEYS) -> CpuAudit:
    """An active audit (the reviewer holds ``keys``, the reader can cut power) of a fresh card with ``defects``,
    run as ``audit chips`` runs it on a card image."""
    state = issue_cpu_card(ISSUER_KEYS, CardRequest("4510", alg, 5000, 7, dt.date(2026, 1, 1), dt.date(2036, 1, 1)))
    state.defects = defects
    chips = ChipAudit()
    sources = [KeySource("issuer keys", keys, False)]
    audit_image_card(FleetCard("card", state), sources, chips, active=True, recover_all=False, progress=lambda _: None)
    assert not chips.failed
    [(_, result)] = chips.cpu
    return result


@pytest.mark.parametrize("alg", list(ALGORITHM_FINDING))
@pytest.mark.parametrize("defects", DEFECT_SETS, ids=lambda s: "+".join(sorted(d.value for d in s)) or "clean")
def test_each_defect_and_each_pair_is_found_exactly(defects: frozenset[Defect], alg: Algorithm) -> None:
    found = {f.id for f in audit(defects, alg).findings}
    assert found == {ALGORITHM_FINDING[alg], *(FINDING[d] for d in defects)}


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
