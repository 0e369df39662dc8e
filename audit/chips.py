"""The chip audit of a fleet: every card through its own interface (APDUs or radio frames), then the checks
that need the whole fleet (one broken card's keys tried on the others), gathered into one ``Report``."""

from __future__ import annotations

import copy
import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from audit.chip_makers import Maker
from audit.cpu_audit import CpuAudit, KeySource, audit_cpu
from audit.findings import Report, finding
from audit.fleet import FleetCard, fleet_view
from audit.m1_attacks import try_key
from audit.m1_audit import KEY_NAMES, KeyRecovery, M1Audit, audit_m1
from cardsim.files import JSONValue
from cardsim.issue_options import DEFAULT_MAX_BALANCE
from cardsim.mifare import M1Card
from cardsim.purse import PurseCard, PurseState
from terminals.flows import TransactionError
from terminals.m1 import FrameSlot
from terminals.reader import CardGone, InProcessReader

Progress = Callable[[str], None]


class SimulatedCpu(InProcessReader):
    """A simulated CPU card in a reader that can cut power after a number of the card's writes (a tearing rig)."""

    def __init__(self, card: PurseCard, name: str) -> None:
        super().__init__(card, name)
        self._card = card

    def tear_after(self, writes: int | None) -> None:
        """Cut power after ``writes`` non-volatile writes of the next command (None: no cut)."""
        self._card.eeprom.budget = writes


@dataclass
class ChipAudit:
    """The audit's results so far, card by card."""

    cpu: list[tuple[str, CpuAudit]] = field(default_factory=list)
    # the card stays at hand for the fleet checks when it is simulated; a card on a reader has left by then
    m1: list[tuple[str, M1Audit, M1Card | None]] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    issued_for: dict[str, str] = field(default_factory=dict)  # card name -> city, from the issuer's records

    def add_cpu(self, name: str, result: CpuAudit) -> None:
        """A CPU card's audit (from an image or a reader)."""
        self.cpu.append((name, result))

    def recovered_keys(self) -> tuple[int, ...]:
        """Every key an attack broke out of the M1 cards audited so far (distinct, in order)."""
        return tuple(dict.fromkeys(k for _, m1, _ in self.m1 for k in m1.recovered.values()))

    def add_m1(self, name: str, result: M1Audit, chip: M1Card | None = None) -> None:
        """An M1 card's audit; ``chip`` when the simulated card can still be tried with other cards' keys."""
        self.m1.append((name, result, chip))


def audit_image_card(
    card: FleetCard,
    sources: list[KeySource],
    audit: ChipAudit,
    *,
    active: bool,
    recover_all: bool,
    progress: Progress,
    recovery: KeyRecovery | None = None,
    issuer_max: int = DEFAULT_MAX_BALANCE,
) -> None:
    """Audit one simulated card. It works on a copy: the image on disk, or the fleet, is never changed.
    ``recovery`` runs the whole key-recovery chain on an M1 card, with the keys already broken out of the
    fleet's other cards tried first; ``issuer_max``: the issuer's published maximum balance (fen)."""
    state = copy.deepcopy(card.state)
    if card.issued_for:
        audit.issued_for[card.name] = card.issued_for
    try:
        if isinstance(state, PurseState):
            reader = SimulatedCpu(PurseCard(state, os.urandom), card.name)
            cpu = audit_cpu(reader, sources, active=active, rig=reader, issuer_max=issuer_max, progress=progress)
            audit.add_cpu(card.name, cpu)
        else:
            chip = M1Card(state, os.urandom)
            if recovery is not None:
                recovery = replace(recovery, fleet_keys=audit.recovered_keys())
            result = audit_m1(chip, recover_all=recover_all, recovery=recovery, progress=progress)
            audit.add_m1(card.name, result, chip)
    except (TransactionError, CardGone) as err:
        audit.failed.append(f"{card.name}: could not be audited: {err}")


def _opens(card: M1Audit, chip: M1Card | None, slot: tuple[int, int], key: int) -> bool:
    """Whether ``key`` opens the slot on this card (compared when known, else one authentication when the
    card is at hand)."""
    known = card.keys.get(slot)
    if known is not None or chip is None:
        return known == key
    return try_key(FrameSlot(chip), slot[0] * 4 + 3, key, slot[1])


def _shared_m1_keys(audit: ChipAudit, progress: Progress) -> dict[str, list[str]]:
    """Try every key an attack recovered on the same sector of every other M1 card of the fleet (compared
    with the keys known of cards audited on a reader: they have left the field).

    Returns, per card UID, the evidence lines of keys it shares with other cards (dictionary keys are left to
    M1-DEFAULT-KEY).
    """
    shared: dict[str, list[str]] = defaultdict(list)
    for _, source, _ in audit.m1:
        if source.recovered:
            progress(f"M1 card {source.uid}: trying its recovered keys on the other cards")
        for slot, key in sorted(source.recovered.items()):
            for _, other, chip in audit.m1:
                if other is source or not _opens(other, chip, slot, key):
                    continue
                line = f"sector {slot[0]} key {KEY_NAMES[slot[1]]} = {key:012X} opens {source.uid} and {other.uid}"
                for uid in (source.uid, other.uid):
                    if line not in shared[uid]:
                        shared[uid].append(line)
    return shared


def _shared_cpu_keys(audit: ChipAudit) -> dict[str, list[str]]:
    """Cards whose load MAC1 proved the same key (the master itself, or a copied card key)."""
    by_key: dict[bytes, list[str]] = defaultdict(list)
    for _, result in audit.cpu:
        if result.keys is not None:
            by_key[result.keys.load_key].append(result.serial)
    shared: dict[str, list[str]] = {}
    for serials in by_key.values():
        if len(serials) > 1:
            for serial in serials:
                shared[serial] = [f"the same load key as cards {', '.join(s for s in serials if s != serial)}"]
    return shared


def _maker_columns(maker: Maker | None) -> dict[str, JSONValue]:
    """The subject row's chip maker columns (the fleet view counts them)."""
    if maker is None:
        return {"chip maker": "unknown", "maker country": "", "maker evidence": "not read"}
    return {"chip maker": maker.label, "maker country": maker.country, "maker evidence": maker.evidence}


def build_report(audit: ChipAudit, inputs: list[str], *, active: bool, progress: Progress) -> Report:
    """The fleet checks (shared keys), then one report of every card's findings."""
    report = Report("chips", inputs)
    m1_shared = _shared_m1_keys(audit, progress)
    cpu_shared = _shared_cpu_keys(audit)
    for name, result in audit.cpu:
        findings = result.findings
        extra = cpu_shared.get(result.serial)
        if extra and not any(f.id == "CPU-UNDIVERSIFIED" for f in findings):
            findings.append(finding("CPU-UNDIVERSIFIED", result.serial, "cpu", result.city, extra))
        keys = result.keys
        report.subjects.append(
            {
                "subject": result.serial,
                "source": name,
                "tech": "cpu",
                "city": result.city,
                "algorithm": result.algorithm,
                "keys": "unknown"
                if keys is None
                else f"{keys.source.name}, {'diversified' if keys.diversified else 'NOT diversified'}",
                **_maker_columns(result.maker),
            }
        )
        report.findings += findings
        report.skipped += result.skipped
    for name, m1, _ in audit.m1:
        if m1.uid in m1_shared:
            m1.add("M1-UNDIVERSIFIED", m1_shared[m1.uid])
        findings = m1.findings
        # The city is read from block 1 when a sector-0 key is known; else the issuer's records name it, and say so.
        city, city_from = m1.city, "card (block 1)" if m1.city else "unknown (block 1 not read: no sector-0 key)"
        if not city and audit.issued_for.get(name):
            city, city_from = audit.issued_for[name], "issuer record (block 1 not read: no sector-0 key)"
            findings = [replace(f, city=city) for f in findings]
        report.subjects.append(
            {
                "subject": m1.uid,
                "source": name,
                "tech": "m1",
                "city": city,
                "city from": city_from,
                "algorithm": "crypto-1",
                "prng": m1.prng,
                "keys known": f"{len(m1.keys)} of 32",
                "keys broken by": ", ".join(f"{how} {n}" for how, n in sorted(m1.attacks.items())),
                "recovery seconds": round(m1.recovery_seconds, 1),
                **_maker_columns(m1.maker),
            }
        )
        report.findings += findings
        report.skipped += m1.skipped
    report.skipped += audit.failed
    if not active:
        report.skipped.insert(0, "active probes were not run (no --active): they spend a few fen and lock the card")
    by_rule: dict[str, int] = defaultdict(int)
    for f in report.findings:
        by_rule[f.id] += 1
    report.checks = dict(sorted(by_rule.items()))
    report.findings.sort(key=lambda f: (-f.severity, f.subject, f.id))
    report.fleet = fleet_view(report.subjects, report.findings).to_json()
    return report


def audit_fleet(
    cards: Iterable[FleetCard],
    sources: list[KeySource],
    inputs: list[str],
    *,
    active: bool,
    recover_all: bool = False,
    recovery: KeyRecovery | None = None,
    progress: Progress = lambda _: None,
    issuer_max: int = DEFAULT_MAX_BALANCE,
) -> Report:
    """Audit every card of a fleet (simulated cards) and build the report; ``recovery``: the whole key-recovery
    chain on each M1 card (``audit chips --recover-keys``), each card's budget cut to what is left of the fleet's
    (``KeyRecovery.fleet_seconds``) when one is set; ``issuer_max``: the issuer's published maximum balance (fen)."""
    audit = ChipAudit()
    cards = list(cards)
    start = time.monotonic()
    for i, card in enumerate(cards, 1):
        progress(f"[{i}/{len(cards)}] {card.name}")
        budget = recovery
        if recovery is not None and recovery.fleet_seconds is not None:
            left = max(0.0, recovery.fleet_seconds - (time.monotonic() - start))
            budget = replace(recovery, max_seconds=min(recovery.max_seconds or left, left))
        audit_image_card(
            card,
            sources,
            audit,
            active=active,
            recover_all=recover_all,
            progress=progress,
            recovery=budget,
            issuer_max=issuer_max,
        )
    return build_report(audit, inputs, active=active, progress=progress)
