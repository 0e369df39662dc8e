"""The demo's world, without any I/O: a fleet for Jinan, Yantai and Zibo (CPU 3DES and SM4 purses, legacy M1
cards, and a few planted on purpose: a clone, a tampered M1 card, weak chips), the terminals of each city, and a
day of riders: buses, metro trips (entry, then exit), top-ups, and riders who take the train to another city.

Planted cards, and what should catch them:
- a clone of a Jinan SM4 card, ridden in Zibo while the original rides in Jinan: the clearing flags the conflict,
  reconciliation reports the counter repeat and the impossible travel, and puts the card on its hotlist;
- a Yantai M1 card whose value block is rewritten mid-day with a cracked key: reconciliation reports the balance
  rise with no load (REC-M1-TAMPER);
- a Jinan SM4 card with a weak random generator, and a Zibo M1 card still on factory keys: the chip audit.
"""

from __future__ import annotations

import copy
import datetime as dt
import random
from dataclasses import dataclass, field

from cardsim.crypto import Algorithm
from cardsim.keys import IssuerKeyStore
from cardsim.m1_issue import PURSE_SECTOR, KeyScheme, issue_m1_card
from cardsim.mifare import M1State, Profile, parse_value_block, value_block
from cardsim.personalise import CardRequest, issue_cpu_card
from cardsim.purse import Defect, PurseState
from terminals.messages import CHINA
from terminals.metro import FareTable
from terminals.terminal import Kind, TerminalConfig

CITIES = {"4510": "Jinan", "4560": "Yantai", "4530": "Zibo"}
BUS_FARE = {"4510": 200, "4560": 150, "4530": 100}  # fen
TOP_UP = 5000  # fen, when a card cannot pay
LOW_BALANCE = 800  # a CPU rider tops up below this (more than any metro fare)
DAY = dt.date(2026, 11, 24)
FIRST_TAP = dt.datetime(2026, 11, 24, 7, 0, tzinfo=CHINA)
METRO_LINE = "M1"  # every city of the fare table has one
TAMPER_BONUS = 10_000  # fen the fraudster writes onto the tampered M1 card


@dataclass
class DemoCard:
    """A card in a rider's pocket: its chip state, home city, where and when it was last tapped."""

    name: str
    home: str
    state: PurseState | M1State
    planted: str = ""
    city: str = ""
    last_tap: dt.datetime | None = None
    in_metro: str | None = None  # the station entered, while on a metro trip

    def __post_init__(self) -> None:
        self.city = self.city or self.home

    @property
    def tech(self) -> str:
        """cpu or m1."""
        return "m1" if isinstance(self.state, M1State) else "cpu"


@dataclass(frozen=True)
class Tap:
    """One presentation of a card at a terminal at a moment of the day."""

    card: DemoCard
    terminal: TerminalConfig
    when: dt.datetime


@dataclass
class Day:
    """The demo's plan: the fleet, the terminals and, in order, the taps of the day (and the tampering)."""

    cards: list[DemoCard]
    terminals: list[TerminalConfig]
    taps: list[Tap] = field(default_factory=list)
    tamper_at: int = -1  # the tampered card is rewritten just before this tap

    def terminals_of(self, city: str) -> list[TerminalConfig]:
        """The terminals of one city."""
        return [t for t in self.terminals if t.city == city]


def issue_fleet(keys: IssuerKeyStore, per_city: int, rng: random.Random) -> list[DemoCard]:
    """``per_city`` CPU cards of each algorithm and ``per_city`` M1 cards per city, then the planted ones."""
    cards: list[DemoCard] = []
    for n, city in enumerate(CITIES):
        for alg in (Algorithm.DES3, Algorithm.SM4):
            for i in range(per_city):
                sequence = 100 * n + 10 * (alg is Algorithm.SM4) + i + 1
                request = CardRequest(city, alg, rng.randrange(800, 3000), sequence, DAY, DAY.replace(year=2036))
                cards.append(DemoCard(f"{city}-{alg.value}-{i + 1}", city, issue_cpu_card(keys, request)))
        master = _master(keys, city)
        for i in range(per_city):
            state = issue_m1_card(rng.randbytes(4), Profile.GENUINE, KeyScheme.DIVERSIFIED, 3000, master, city)
            cards.append(DemoCard(f"{city}-m1-{i + 1}", city, state))
    weak = CardRequest("4510", Algorithm.SM4, 2000, 99, DAY, DAY.replace(year=2036))
    weak_state = issue_cpu_card(keys, weak)
    weak_state.defects = frozenset({Defect.WEAK_RANDOM})
    cards.append(DemoCard("4510-sm4-weak-random", "4510", weak_state, "weak random generator"))
    factory = issue_m1_card(rng.randbytes(4), Profile.GENUINE, KeyScheme.DEFAULT, 3000, _master(keys, "4530"), "4530")
    cards.append(DemoCard("4530-m1-factory-keys", "4530", factory, "factory default keys"))
    original = next(c for c in cards if c.home == "4510" and c.name.endswith("sm4-1"))
    clone = DemoCard(f"{original.name}-clone", "4510", copy.deepcopy(original.state), f"clone of {original.name}")
    clone.city = "4530"  # the clone rides in Zibo
    cards.append(clone)
    tampered = next(c for c in cards if c.home == "4560" and c.tech == "m1")
    tampered.planted = "value block rewritten"
    return cards


def _master(keys: IssuerKeyStore, city: str) -> bytes:
    key_set = keys.get(city, 1)
    if key_set is None:
        raise ValueError(f"the key file has no keys of city {city}")
    return key_set.purchase


def terminals(fares: FareTable, rng: random.Random) -> list[TerminalConfig]:
    """Per city: two buses, metro entry gates at the first two stations of the fare table's line and exit gates
    at the last two, one top-up machine."""
    configs: list[TerminalConfig] = []
    for city in CITIES:
        line = sorted((s for s in fares.city(city).stations.values() if s.line == METRO_LINE), key=lambda s: s.km)
        numbers = iter([bytes.fromhex(city) + rng.randbytes(4) for _ in range(7)])
        configs += [TerminalConfig(city, Kind.BUS, next(numbers), BUS_FARE[city]) for _ in range(2)]
        configs += [TerminalConfig(city, Kind.METRO_ENTRY, next(numbers), 0, s.line, s.code) for s in line[:2]]
        configs += [TerminalConfig(city, Kind.METRO_EXIT, next(numbers), 0, s.line, s.code) for s in line[-2:]]
        configs.append(TerminalConfig(city, Kind.TOPUP, next(numbers), TOP_UP))
    return configs


def plan_day(
    cards: list[DemoCard],
    specs: list[TerminalConfig],
    rides: int,
    rng: random.Random,
    travel_minutes: dict[frozenset[str], int],
) -> Day:
    """``rides`` taps over the day, 30 s apart: each picks a rider, who rides in the city they are in (a CPU rider
    sometimes takes the train to another city first, when ``travel_minutes`` allows), tops up when low."""
    day = Day(cards, specs)
    by_kind = {(s.city, s.kind): [t for t in specs if t.city == s.city and t.kind is s.kind] for s in specs}
    clone = next(c for c in cards if "clone" in c.planted)
    original = next(c for c in cards if clone.name.startswith(c.name) and c is not clone)
    tampered = next(c for c in cards if c.planted == "value block rewritten")
    riders = [c for c in cards if c is not clone]
    balance = {id(c): _balance(c) for c in cards}
    when = FIRST_TAP
    for n in range(rides):
        when += dt.timedelta(seconds=30)
        # the clone and its original tap within minutes of each other, 40 minutes apart by train
        card = clone if n in (rides // 3, rides // 3 + 2) else original if n == rides // 3 + 1 else rng.choice(riders)
        if n == 2 * rides // 3:
            day.tamper_at = len(day.taps)  # rewritten now; it rides at once
            day.taps.append(Tap(tampered, by_kind[(tampered.city, Kind.BUS)][0], when))
            when += dt.timedelta(seconds=30)
        if card.in_metro is not None:
            exit_gate = rng.choice(by_kind[(card.city, Kind.METRO_EXIT)])
            day.taps.append(Tap(card, exit_gate, when))
            balance[id(card)] -= 700  # at most; the gate charges by distance
            card.in_metro = None
            card.last_tap = when
            continue
        if card.tech == "cpu" and card is not clone and card is not original and rng.random() < 0.15:
            _travel(card, when, rng, travel_minutes)
        if card.tech == "cpu" and balance[id(card)] < LOW_BALANCE:
            day.taps.append(Tap(card, by_kind[(card.city, Kind.TOPUP)][0], when))
            balance[id(card)] += TOP_UP
            when += dt.timedelta(seconds=30)
        if card.tech == "cpu" and rng.random() < 0.4:
            gate = rng.choice(by_kind[(card.city, Kind.METRO_ENTRY)])
            day.taps.append(Tap(card, gate, when))
            card.in_metro = gate.station
        elif card.tech == "cpu" or balance[id(card)] >= BUS_FARE[card.city]:
            day.taps.append(Tap(card, rng.choice(by_kind[(card.city, Kind.BUS)]), when))
            balance[id(card)] -= BUS_FARE[card.city]
        card.last_tap = when
    for card in cards:  # riders still inside the metro leave at the end of the day
        if card.in_metro is not None:
            when += dt.timedelta(seconds=30)
            day.taps.append(Tap(card, by_kind[(card.city, Kind.METRO_EXIT)][0], when))
            card.in_metro = None
    return day


def _travel(card: DemoCard, when: dt.datetime, rng: random.Random, travel: dict[frozenset[str], int]) -> None:
    """Take the train to another city when the last tap was long enough ago for the trip."""
    other = rng.choice([c for c in CITIES if c != card.city])
    minutes = travel[frozenset({card.city, other})]
    if card.last_tap is None or when - card.last_tap >= dt.timedelta(minutes=minutes + 10):
        card.city = other


def _balance(card: DemoCard) -> int:
    if isinstance(card.state, PurseState):
        return card.state.balance
    parsed = parse_value_block(card.state.blocks[4 * PURSE_SECTOR])
    return parsed[0] if parsed else 0


def tamper(card: DemoCard) -> None:
    """What a fraudster with the cracked sector key does: raise the value block (and its backup) with no load."""
    assert isinstance(card.state, M1State)
    value = _balance(card) + TAMPER_BONUS
    for block in (4 * PURSE_SECTOR, 4 * PURSE_SECTOR + 1):
        card.state.blocks[block] = value_block(value, block)
