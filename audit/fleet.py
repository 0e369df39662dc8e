"""Card fleets to audit: a folder of card images, or a fleet file (``yikatong.fleet/1``) that describes a mixed
fleet to generate, with weaknesses planted on purpose and, per card, the findings the audit must report.

A fleet file lists card entries; each makes ``count`` cards (default 1):
- CPU: ``city``, ``alg`` (3des, sm4, des), ``maker`` (cardsim.issue_options.CPU_CHIP_MAKERS: that maker's ATR
  historical bytes; default the simulator's own), ``keys`` ("issuer": diversified from the fleet's key file,
  "test": diversified from the published test keys, "undiversified": the issuer master keys themselves),
  ``defects`` (chip OS flaws, cardsim.purse.Defect values);
- M1: ``city``, ``profile`` (cardsim.mifare.Profile), ``maker`` (cardsim.issue_options.M1_CHIP_MAKERS: the chip
  maker's block 0; default the manufacturer data of older images), ``m1_keys`` (default, shared, diversified) and
  ``plant``:
  ``default_sectors`` (keys FFFFFFFFFFFF), ``keyb_readable_sectors`` (transport access bits), ``broken_access_sectors``
  (inconsistent access bits), ``broken_value`` (purse value block redundancy broken);
- ``expect``: the finding ids the audit must report for each card of the entry (used by the tests).
"""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from audit.findings import Finding, Severity
from cardsim.crypto import Algorithm
from cardsim.files import JSONValue, read_json
from cardsim.image import CardImageError, load_card
from cardsim.issue_options import CPU_CHIP_MAKERS, M1_CHIP_MAKERS
from cardsim.keys import IssuerKeyStore, KeyFileError
from cardsim.m1_issue import PURSE_SECTOR, KeyScheme, issue_m1_card
from cardsim.mifare import TRANSPORT_ACCESS, M1State, Profile
from cardsim.personalise import CardRequest, IssueError, issue_cpu_card
from cardsim.purse import Defect, PurseKeys, PurseState

FLEET_SCHEMA = "yikatong.fleet/1"
_DEFAULT_KEY = b"\xff" * 6


class FleetError(ValueError):
    """A fleet file or card folder that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class FleetCard:
    """One card to audit: where it came from, its state, and (generated fleets) the findings planted in it and the
    city the issuer's records say it was issued for ("" when no record: a folder of images)."""

    name: str
    state: PurseState | M1State
    expect: frozenset[str] | None = None
    issued_for: str = ""


@dataclass(frozen=True)
class Fleet:
    """Cards, and the issuer keys they were issued with when the fleet file names them."""

    cards: list[FleetCard]
    issuer_keys: IssuerKeyStore | None
    source: str


def load_image_folder(folder: Path) -> Fleet:
    """Every ``*.json`` card image in ``folder`` (sorted by name); FleetError naming the first bad file."""
    if not folder.is_dir():
        raise FleetError(f"{folder}: not a folder of card images")
    cards = []
    for path in sorted(folder.glob("*.json")):
        try:
            cards.append(FleetCard(path.name, load_card(path)))
        except CardImageError as err:
            raise FleetError(str(err)) from err
    if not cards:
        raise FleetError(f"{folder}: no card images (*.json) in it")
    return Fleet(cards, None, str(folder))


class _Entry:
    """Typed access to one fleet entry; errors name the file and entry."""

    def __init__(self, doc: Mapping[str, object], where: str) -> None:
        self.doc = doc
        self.where = where

    def fail(self, what: str) -> FleetError:
        return FleetError(f"{self.where}: {what}")

    def choice(self, name: str, choices: list[str], default: str | None = None) -> str:
        value = self.doc.get(name, default)
        if value not in choices:
            raise self.fail(f"'{name}' must be one of {', '.join(choices)}")
        return str(value)

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        value = self.doc.get(name, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.fail(f"'{name}' must be an integer {low}..{high}")
        return value

    def names(self, name: str, choices: list[str] | None = None) -> list[str]:
        value = self.doc.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.fail(f"'{name}' must be a list of names")
        if choices is not None and not set(value) <= set(choices):
            raise self.fail(f"'{name}' may hold only {', '.join(choices)}")
        return list(value)

    def sectors(self, plant: Mapping[str, object], name: str) -> list[int]:
        value = plant.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, int) and 0 <= v < 16 for v in value):
            raise self.fail(f"plant '{name}' must be a list of sectors 0..15")
        return list(value)


def _cpu_card(entry: _Entry, issuer: IssuerKeyStore, sequence: int) -> PurseState:
    keys_kind = entry.choice("keys", ["issuer", "test", "undiversified"], "issuer")
    store = IssuerKeyStore.test_set() if keys_kind == "test" else issuer
    request = CardRequest(
        city=entry.choice("city", ["4510", "4560", "4530"]),
        algorithm=Algorithm(entry.choice("alg", [a.value for a in Algorithm])),
        balance=entry.integer("balance", 5000, 0, 100_000),
        sequence=sequence,
        start=dt.date(2026, 1, 1),
        expiry=dt.date(2036, 1, 1),
        chip_maker=entry.choice("maker", list(CPU_CHIP_MAKERS)) if "maker" in entry.doc else None,
    )
    try:
        state = issue_cpu_card(store, request)
    except IssueError as err:
        raise entry.fail(str(err)) from err
    if keys_kind == "undiversified":
        masters = store.get(request.city, request.key_version)
        assert masters is not None and masters.load is not None and masters.tac is not None  # issue_cpu_card checked
        state.keys = PurseKeys(masters.purchase, masters.load, masters.tac, masters.maintenance)
    state.defects = frozenset(Defect(d) for d in entry.names("defects", [d.value for d in Defect]))
    return state


def _m1_card(entry: _Entry, issuer: IssuerKeyStore, uid: bytes) -> M1State:
    city = entry.choice("city", ["4510", "4560", "4530"])
    key_set = issuer.get(city, 1)
    if key_set is None:
        raise entry.fail(f"the fleet's key file has no keys for {city}")
    state = issue_m1_card(
        uid,
        Profile(entry.choice("profile", [p.value for p in Profile], Profile.GENUINE.value)),
        KeyScheme(entry.choice("m1_keys", [k.value for k in KeyScheme], KeyScheme.DIVERSIFIED.value)),
        entry.integer("balance", 5000, 0, 100_000),
        key_set.purchase,
        city,
        entry.choice("maker", list(M1_CHIP_MAKERS)) if "maker" in entry.doc else None,
    )
    plant = entry.doc.get("plant", {})
    if not isinstance(plant, dict):
        raise entry.fail("'plant' must be an object")
    blocks = state.blocks
    for sector in entry.sectors(plant, "default_sectors"):
        trailer = blocks[sector * 4 + 3]
        blocks[sector * 4 + 3] = _DEFAULT_KEY + trailer[6:10] + _DEFAULT_KEY
    for sector in entry.sectors(plant, "keyb_readable_sectors"):
        trailer = blocks[sector * 4 + 3]
        blocks[sector * 4 + 3] = trailer[0:6] + TRANSPORT_ACCESS + trailer[10:16]
    for sector in entry.sectors(plant, "broken_access_sectors"):
        trailer = blocks[sector * 4 + 3]
        blocks[sector * 4 + 3] = trailer[0:7] + bytes([trailer[7] ^ 0x10]) + trailer[8:16]
    if plant.get("broken_value", False):
        purse = blocks[PURSE_SECTOR * 4]
        blocks[PURSE_SECTOR * 4] = purse[0:4] + bytes(4) + purse[8:16]  # the inverted copy wiped
    return state


def generate_fleet(path: Path) -> Fleet:
    """The cards a fleet file describes, issued afresh (deterministic: the file's ``seed`` fixes the UIDs)."""
    doc = read_json(path, FleetError, "fleet file")
    if not isinstance(doc, dict) or doc.get("schema") != FLEET_SCHEMA:
        raise FleetError(f"{path}: not a {FLEET_SCHEMA} document")
    keys_name = doc.get("keys")
    if not isinstance(keys_name, str):
        raise FleetError(f"{path}: 'keys' must name the issuer key file (relative to the fleet file)")
    try:
        issuer = IssuerKeyStore.load(path.parent / keys_name)
    except KeyFileError as err:
        raise FleetError(f"{path}: {err}") from err
    entries = doc.get("cards")
    if not isinstance(entries, list) or not entries:
        raise FleetError(f"{path}: 'cards' must be a non-empty list")
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise FleetError(f"{path}: 'seed' must be a whole number")
    rng = random.Random(seed)
    cards: list[FleetCard] = []
    for i, raw in enumerate(entries):
        if not isinstance(raw, dict):
            raise FleetError(f"{path}: cards[{i}] is not an object")
        entry = _Entry(raw, f"{path}: cards[{i}] ({raw.get('name', 'unnamed')})")
        name = str(raw.get("name", f"card-{i}"))
        expect = frozenset(entry.names("expect")) if "expect" in raw else None
        count = entry.integer("count", 1, 1, 100_000)
        tech = entry.choice("tech", ["cpu", "m1"])
        for n in range(count):
            label = name if count == 1 else f"{name}-{n + 1}"
            state: PurseState | M1State
            if tech == "cpu":
                state = _cpu_card(entry, issuer, len(cards) + 1)
            else:
                state = _m1_card(entry, issuer, rng.randbytes(4))
            cards.append(FleetCard(label, state, expect, str(raw["city"])))
    return Fleet(cards, issuer, str(path))


# --- the fleet view (the plan's goal: chips and algorithms of domestic origin) ----------------------

ALGORITHM_NAMES: Final = {"crypto-1": "M1 Crypto-1", "des": "CPU single DES", "3des": "CPU 3DES", "sm4": "CPU SM4"}
DOMESTIC_ALGORITHM: Final = "sm4"
REPLACE_FROM: Final = Severity.MEDIUM
"""A card joins the replace-first list with a finding of at least this severity (every M1 card: Crypto-1 is high)."""


@dataclass(frozen=True)
class CardView:
    """One card as the fleet view sees it: its subject row of the report and its findings, summed up."""

    subject: str
    city: str
    tech: str
    algorithm: str  # a key of ALGORITHM_NAMES, "" when the audit could not tell
    maker: str  # company and chip, "unknown" when the card did not tell
    country: str  # "" when unknown
    worst: Severity | None
    findings: int
    key_seconds: float | None  # how fast its first key fell: 0 for a dictionary key, None when none fell

    def to_json(self) -> dict[str, JSONValue]:
        """The card's row as JSON."""
        return {
            "subject": self.subject,
            "city": self.city,
            "tech": self.tech,
            "algorithm": ALGORITHM_NAMES.get(self.algorithm, self.algorithm),
            "maker": self.maker,
            "country": self.country,
            "worst": self.worst.label if self.worst is not None else None,
            "findings": self.findings,
            "key_seconds": self.key_seconds,
        }


@dataclass
class CityView:
    """Counts of one city's cards (or the whole fleet's)."""

    cards: int = 0
    by_tech: Counter[str] = field(default_factory=Counter)
    by_algorithm: Counter[str] = field(default_factory=Counter)
    by_maker: Counter[str] = field(default_factory=Counter)
    domestic_chip: int = 0
    foreign_chip: int = 0
    domestic_algorithm: int = 0

    def add(self, card: CardView) -> None:
        """Count one card."""
        self.cards += 1
        self.by_tech[card.tech] += 1
        self.by_algorithm[card.algorithm] += 1
        self.by_maker[f"{card.maker} ({card.country})" if card.country else card.maker] += 1
        self.domestic_chip += card.country == "China"
        self.foreign_chip += card.country not in ("", "China")
        self.domestic_algorithm += card.algorithm == DOMESTIC_ALGORITHM

    def share(self, count: int) -> float:
        """``count`` as a share of the cards (0 for no cards)."""
        return round(count / self.cards, 4) if self.cards else 0.0

    def to_json(self) -> dict[str, JSONValue]:
        """The counts and the domestic shares as JSON."""
        return {
            "cards": self.cards,
            "tech": dict(sorted(self.by_tech.items())),
            "algorithm": {ALGORITHM_NAMES.get(a, a or "unknown"): n for a, n in sorted(self.by_algorithm.items())},
            "maker": dict(sorted(self.by_maker.items())),
            "domestic_chip": self.domestic_chip,
            "foreign_chip": self.foreign_chip,
            "unknown_chip": self.cards - self.domestic_chip - self.foreign_chip,
            "domestic_algorithm": self.domestic_algorithm,
            "domestic_chip_share": self.share(self.domestic_chip),
            "domestic_algorithm_share": self.share(self.domestic_algorithm),
        }


@dataclass
class FleetView:
    """Per city and for the whole fleet: cards by technology, algorithm and chip maker, the shares already on
    domestic chips and on SM4, and the cards to replace first."""

    cities: dict[str, CityView]
    total: CityView
    replace_first: list[CardView]

    def to_json(self) -> dict[str, JSONValue]:
        """The report's ``fleet`` section."""
        return {
            "cities": {city: view.to_json() for city, view in self.cities.items()},
            "total": self.total.to_json(),
            "replace_first": [card.to_json() for card in self.replace_first],
        }


def _key_seconds(findings: Sequence[Finding]) -> float | None:
    """How fast the card's first key fell: 0 when a dictionary key opens a sector or its keys are another card's
    (known before it was touched), else the fastest attack's seconds (a finding's ``seconds`` detail), None when
    no key fell."""
    if any(f.id in ("M1-DEFAULT-KEY", "M1-UNDIVERSIFIED") for f in findings):
        return 0.0
    seconds = [float(s) for f in findings if isinstance(s := f.details.get("seconds"), int | float)]
    return min(seconds, default=None)


def _text(subject: Mapping[str, JSONValue], key: str) -> str:
    value = subject.get(key, "")
    return value if isinstance(value, str) else ""


def fleet_view(subjects: Sequence[Mapping[str, JSONValue]], findings: Sequence[Finding]) -> FleetView:
    """The fleet view of a chip report's cards (its ``subjects`` rows: city, tech, algorithm, chip maker, maker
    country) and their findings. The replace-first list is ordered by the worst finding, then by how fast a key
    fell (fastest first; cards with no fallen key last), then by subject."""
    by_subject: dict[str, list[Finding]] = {}
    for f in findings:
        by_subject.setdefault(f.subject, []).append(f)
    cities: dict[str, CityView] = {}
    total = CityView()
    cards = []
    for subject in subjects:
        name = _text(subject, "subject")
        own = by_subject.get(name, [])
        card = CardView(
            name,
            _text(subject, "city"),
            _text(subject, "tech"),
            _text(subject, "algorithm"),
            _text(subject, "chip maker") or "unknown",
            _text(subject, "maker country"),
            max((f.severity for f in own), default=None),
            len(own),
            _key_seconds(own),
        )
        cities.setdefault(card.city or "no city", CityView()).add(card)
        total.add(card)
        cards.append(card)
    urgent = [c for c in cards if c.worst is not None and c.worst >= REPLACE_FROM]
    urgent.sort(key=lambda c: (-(c.worst or 0), c.key_seconds is None, c.key_seconds or 0.0, c.subject))
    return FleetView(dict(sorted(cities.items())), total, urgent)
