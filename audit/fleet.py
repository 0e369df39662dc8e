"""Card fleets to audit: a folder of card images, or a fleet file (``yikatong.fleet/1``) that describes a mixed
fleet to generate, with weaknesses planted on purpose and, per card, the findings the audit must report.

A fleet file lists card entries; each makes ``count`` cards (default 1):
- CPU: ``city``, ``alg`` (3des, sm4, des), ``keys`` ("issuer": diversified from the fleet's key file,
  "test": diversified from the published test keys, "undiversified": the issuer master keys themselves),
  ``defects`` (chip OS flaws, cardsim.purse.Defect values);
- M1: ``city``, ``profile`` (cardsim.mifare.Profile), ``m1_keys`` (default, shared, diversified) and ``plant``:
  ``default_sectors`` (keys FFFFFFFFFFFF), ``keyb_readable_sectors`` (transport access bits), ``broken_access_sectors``
  (inconsistent access bits), ``broken_value`` (purse value block redundancy broken);
- ``expect``: the finding ids the audit must report for each card of the entry (used by the tests).
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cardsim.crypto import Algorithm
from cardsim.files import read_json
from cardsim.image import CardImageError, load_card
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
    """One card to audit: where it came from, its state, and (generated fleets) the findings planted in it."""

    name: str
    state: PurseState | M1State
    expect: frozenset[str] | None = None


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
            cards.append(FleetCard(label, state, expect))
    return Fleet(cards, issuer, str(path))
