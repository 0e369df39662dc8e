"""What an audit reports: findings with stable ids (spec audit.md), severities, and the report document.

Both jobs (chip audit, reconciliation) produce a ``Report``; ``audit.html`` renders it for people and
``Report.to_json`` is the machine-readable form (``yikatong.audit-report/1``).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version
from typing import TYPE_CHECKING, Final

from cardsim.files import JSONValue

if TYPE_CHECKING:  # the type only: a report needs no database driver
    from clearing.settlement import SettlementDoc

REPORT_SCHEMA: Final = "yikatong.audit-report/1"
TOOL: Final = f"yikatong {version('yikatong')}"
"""What wrote a report: audit ships in the yikatong distribution, whose installed metadata gives the version
(read here rather than from the yikatong package, which sits above audit)."""


class Severity(enum.IntEnum):
    """Ordered severities; ``pass`` is a positive result worth showing (e.g. an SM4 purse)."""

    PASS = 0
    INFO = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4
    CRITICAL = 5

    @property
    def label(self) -> str:
        """The lower-case name used in JSON, HTML and on the command line."""
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Severity:
        """A severity from its name (any case); ValueError names the choices."""
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(f"severity must be one of {', '.join(s.label for s in cls)}") from None


@dataclass(frozen=True)
class Rule:
    """One catalogue entry: severity, what it means, what to do about it."""

    severity: Severity
    title: str
    remediation: str


_M1_MIGRATE = "migrate the card to a CPU card with an SM4 purse (the 2009 plan)"
_CPU_FIX = "replace the card's chip operating system (or the card) and hotlist the affected cards"

CHIP_RULES: Final[dict[str, Rule]] = {
    "M1-CRYPTO1": Rule(Severity.HIGH, "card speaks MIFARE Classic Crypto-1 (broken cipher)", _M1_MIGRATE),
    "M1-DEFAULT-KEY": Rule(
        Severity.CRITICAL, "a sector opens with a public default key", "personalise every sector with diversified keys"
    ),
    "M1-KEY-RECOVERED": Rule(
        Severity.CRITICAL, "a sector key was recovered by an attack", f"rotate the fleet's M1 keys; {_M1_MIGRATE}"
    ),
    "M1-DARKSIDE": Rule(
        Severity.CRITICAL,
        "a sector key fell to the darkside attack with no key known (the chip leaks an encrypted NAK)",
        _M1_MIGRATE,
    ),
    "M1-HARDNESTED": Rule(
        Severity.CRITICAL,
        "a sector key of a hardened (random-nonce) chip fell to the hardnested attack from one known key",
        _M1_MIGRATE,
    ),
    "M1-STATIC-NESTED": Rule(
        Severity.CRITICAL, "a sector key fell to the static nested attack (the chip's nonce never changes)", _M1_MIGRATE
    ),
    "M1-BACKDOOR-RECOVERY": Rule(
        Severity.CRITICAL,
        "sector keys fell through the vendor backdoor key and the chip's static encrypted nonces (FM11RF08S)",
        f"withdraw the chip series; {_M1_MIGRATE}",
    ),
    "M1-UNDIVERSIFIED": Rule(
        Severity.HIGH, "the same sector key on different cards", "diversify sector keys per card UID"
    ),
    "M1-WEAK-PRNG": Rule(Severity.HIGH, "tag nonces follow the 16-bit LFSR (nested attack feasible)", _M1_MIGRATE),
    "M1-STATIC-NONCE": Rule(Severity.HIGH, "the tag returns the same nonce every time", _M1_MIGRATE),
    "M1-MAGIC": Rule(
        Severity.CRITICAL,
        "Gen1a backdoor answers or block 0 is writable (UID cloning)",
        "withdraw and hotlist the card",
    ),
    "M1-BACKDOOR-KEY": Rule(
        Severity.CRITICAL, "a vendor backdoor key is accepted", f"withdraw chips of this vendor; {_M1_MIGRATE}"
    ),
    "M1-KEYB-READABLE": Rule(
        Severity.CRITICAL,
        "trailer access conditions make key B readable",
        "rewrite the trailer with access bits that keep key B secret",
    ),
    "M1-ACCESS-BITS": Rule(
        Severity.MEDIUM, "sector access bits are inconsistent (sector blocked)", "re-issue the card"
    ),
    "M1-VALUE-BLOCK": Rule(
        Severity.MEDIUM, "value block redundancy is broken", "restore the purse from its backup and check the terminal"
    ),
    "CPU-SINGLE-DES": Rule(Severity.MEDIUM, "purse uses single DES", "re-issue with an SM4 purse"),
    "CPU-3DES": Rule(Severity.INFO, "purse uses 3DES", "plan the move to SM4 (the domestic algorithm)"),
    "CPU-SM4": Rule(Severity.PASS, "purse uses SM4, the domestic algorithm the 2009 plan asks for", "none"),
    "CPU-MAC1-NOT-CHECKED": Rule(Severity.CRITICAL, "a DEBIT with a wrong MAC1 is accepted", _CPU_FIX),
    "CPU-REPLAY": Rule(Severity.CRITICAL, "a replayed DEBIT or CREDIT is accepted twice", _CPU_FIX),
    "CPU-MAC2-NOT-CHECKED": Rule(
        Severity.CRITICAL, "a CREDIT FOR LOAD with a wrong MAC2 is accepted (free money)", _CPU_FIX
    ),
    "CPU-UNPROTECTED-FILE": Rule(
        Severity.CRITICAL,
        "a public file (card class, expiry) is rewritten without secure messaging: anyone can forge a discount",
        f"{_CPU_FIX}; check the card class and expiry of the cards against the issuer's records",
    ),
    "CPU-OVERDRAFT": Rule(Severity.CRITICAL, "a DEBIT larger than the balance is accepted", _CPU_FIX),
    "CPU-LOAD-ABOVE-MAX": Rule(
        Severity.HIGH,
        "a load above the maximum balance, or past the 4-byte balance, is accepted",
        f"{_CPU_FIX}; until then the issuer host refuses such loads",
    ),
    "CPU-NO-LOCKOUT": Rule(Severity.HIGH, "repeated MAC failures never lock the application", _CPU_FIX),
    "CPU-COUNTER": Rule(Severity.HIGH, "the transaction counter does not increase by one", _CPU_FIX),
    "CPU-TEARING": Rule(
        Severity.HIGH, "a transaction cut mid-way leaves a mixed state", "use a chip OS with journalled commits"
    ),
    "CPU-WEAK-RANDOM": Rule(Severity.HIGH, "card randoms repeat or are biased", _CPU_FIX),
    "CPU-ROBUSTNESS": Rule(
        Severity.HIGH,
        "a malformed or out-of-order command changes the card's state, or is not answered with a status word",
        _CPU_FIX,
    ),
    "CPU-TEST-KEYS": Rule(
        Severity.CRITICAL,
        "card keys derive from the published test master keys",
        "re-key the card with production keys",
    ),
    "CPU-UNDIVERSIFIED": Rule(
        Severity.HIGH, "cards share a purse key (not diversified per card)", "diversify card keys per card serial"
    ),
}


_HOTLIST = "hotlist the card and ask the issuer to withdraw it"

RECONCILE_RULES: Final[dict[str, Rule]] = {
    "REC-MISSING": Rule(
        Severity.HIGH, "record held by one side (acquirer or issuer) and missing on the other", "resend the forward"
    ),
    "REC-DUPLICATE": Rule(Severity.MEDIUM, "the same record appears more than once in one ledger", "remove the copy"),
    "REC-CONFLICT": Rule(Severity.CRITICAL, "same record id with different content (clone)", _HOTLIST),
    "REC-COUNTER-GAP": Rule(
        Severity.MEDIUM, "card counter skips values (records missing)", "find the missing records at the terminals"
    ),
    "REC-COUNTER-REPEAT": Rule(Severity.HIGH, "two records of a card use the same counter (clone)", _HOTLIST),
    "REC-BALANCE": Rule(
        Severity.HIGH, "balance does not follow from the card's previous record and the amount", _HOTLIST
    ),
    "REC-TAC": Rule(Severity.CRITICAL, "TAC (or M1 record MAC) fails with the issuer's keys", _HOTLIST),
    "REC-TAC-KEYS": Rule(
        Severity.HIGH,
        "no TAC of an issuer verifies with the key file given (wrong key file?)",
        "reconcile again with the key file the issuer's cards were personalised from (--keys); if it is the right "
        "one, treat every record of this issuer as forged and settle none of them",
    ),
    "REC-M1-TAMPER": Rule(Severity.CRITICAL, "M1 balance rose with no load record (value block tampered)", _HOTLIST),
    "REC-IMPOSSIBLE-TRAVEL": Rule(
        Severity.CRITICAL, "same card in two cities faster than the travel time between them (clone)", _HOTLIST
    ),
    "REC-SETTLEMENT": Rule(
        Severity.CRITICAL,
        "settlement positions do not sum to zero or do not match the records",
        "re-run the day's settlement from the ledgers",
    ),
}


@dataclass(frozen=True)
class Finding:
    """One finding: catalogue ``id``, the card or record it is about, and the evidence that proves it."""

    id: str
    severity: Severity
    subject: str  # card serial or UID (chips); record id, card or city (reconciliation)
    tech: str  # "cpu", "m1" or "" when it is not about one card technology
    city: str  # issuer city of the card, or the city the finding is about; "" when unknown
    title: str
    evidence: tuple[str, ...]
    remediation: str
    details: dict[str, JSONValue] = field(default_factory=dict)

    def to_json(self) -> dict[str, JSONValue]:
        """The finding as a JSON object."""
        return {
            "id": self.id,
            "severity": self.severity.label,
            "subject": self.subject,
            "tech": self.tech,
            "city": self.city,
            "title": self.title,
            "evidence": list(self.evidence),
            "remediation": self.remediation,
            "details": self.details,
        }


def finding(rule_id: str, subject: str, tech: str, city: str, evidence: list[str], **details: JSONValue) -> Finding:
    """A finding of catalogue rule ``rule_id`` (chip or reconciliation), with its severity, title and remediation."""
    rule = CHIP_RULES.get(rule_id) or RECONCILE_RULES[rule_id]
    return Finding(rule_id, rule.severity, subject, tech, city, rule.title, tuple(evidence), rule.remediation, details)


@dataclass
class Report:
    """A whole audit: what was examined, what was found, and the extra tables each job adds."""

    kind: str  # "chips" or "reconcile"
    inputs: list[str]
    findings: list[Finding] = field(default_factory=list)
    subjects: list[dict[str, JSONValue]] = field(default_factory=list)  # cards audited / cities reconciled
    checks: dict[str, int] = field(default_factory=dict)  # check name -> how many offending items
    skipped: list[str] = field(default_factory=list)  # probes not run, and why
    settlement: SettlementDoc | None = None
    hotlist: list[str] = field(default_factory=list)
    fleet: dict[str, JSONValue] | None = None  # chips: the fleet view (audit.fleet.FleetView.to_json)
    generated: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    def counts(self) -> dict[str, int]:
        """Findings per severity label, every severity present (zeros included), most severe first."""
        by = Counter(f.severity for f in self.findings)
        return {s.label: by.get(s, 0) for s in sorted(Severity, reverse=True)}

    def worst(self) -> Severity | None:
        """The highest severity found, or None when there are no findings."""
        return max((f.severity for f in self.findings), default=None)

    def exit_code(self, fail_on: Severity) -> int:
        """1 when a finding at or above ``fail_on`` exists, else 0."""
        worst = self.worst()
        return 1 if worst is not None and worst >= fail_on else 0

    def to_json(self) -> dict[str, object]:
        """The report document (``yikatong.audit-report/1``; ``settlement`` is a SettlementDoc, a TypedDict)."""
        return {
            "schema": REPORT_SCHEMA,
            "kind": self.kind,
            "tool": TOOL,
            "generated": self.generated,
            "inputs": self.inputs,
            "counts": self.counts(),
            "checks": self.checks,
            "findings": [f.to_json() for f in self.findings],
            "subjects": self.subjects,
            "skipped": self.skipped,
            "settlement": self.settlement,
            "hotlist": self.hotlist,
            "fleet": self.fleet,
        }
