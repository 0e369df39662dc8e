"""The demo's world, without any I/O: a fleet for Jinan, Yantai and Zibo (CPU 3DES and SM4 purses, legacy M1
cards, and a few planted on purpose: a clone, a tampered M1 card, weak chips), the terminals of each city, and a
day of riders: buses, metro trips (entry, then exit), top-ups, and riders who take the train to another city.

Planted cards, and what should catch them:
- a clone of a Jinan SM4 card, ridden in Zibo while the original rides in Jinan: the clearing flags the conflict,
  reconciliation reports the counter repeat and the impossible travel, and puts the card on its hotlist;
- a Yantai M1 card whose value block is rewritten mid-day with a cracked key: reconciliation reports the balance
  rise with no load (REC-M1-TAMPER);
- a Jinan SM4 card with a weak random generator, and a Zibo M1 card still on factory keys: the chip audit;
- a Zibo SM4 card whose chip ignores its maximum balance on loads: the chip audit (CPU-LOAD-ABOVE-MAX), without
  --active, since it only asks for such a load (INITIALIZE FOR LOAD) and moves no money.
"""

from __future__ import annotations

import copy
import datetime as dt
import enum
import random
from dataclasses import dataclass, field

from cardsim.crypto import Algorithm
from cardsim.keys import IssuerKeyStore
from cardsim.m1_issue import PURSE_SECTOR, KeyScheme, issue_m1_card
from cardsim.mifare import M1State, Profile, parse_value_block, value_block
from cardsim.personalise import CardRequest, issue_cpu_card
from cardsim.purse import Defect, PurseState
from terminals.kinds import TerminalKind
from terminals.messages import CHINA
from terminals.metro import FareTable
from terminals.terminal import TerminalConfig

CITIES = {"4510": "Jinan", "4560": "Yantai", "4530": "Zibo"}
BUS_FARE = {"4510": 200, "4560": 150, "4530": 100}  # fen
TOP_UP = 5000  # fen, when a card cannot pay
LOW_BALANCE = 800  # a CPU rider tops up below this (more than any metro fare)
DAY = dt.date(2026, 11, 24)
FIRST_TAP = dt.datetime(2026, 11, 24, 7, 0, tzinfo=CHINA)
METRO_LINE = "M1"  # every city of the fare table has one
TAMPER_BONUS = 10_000  # fen the fraudster writes onto the tampered M1 card
SM4_MAKERS = ("fudan-fm1208", "huada-ciu")  # the SM4 cards: domestic chips, as the plan asks
DES3_MAKERS = ("nxp-jcop", "infineon-cipurse", "fudan-fm1208")
M1_MAKERS = ("nxp", "fudan-fm11rf08", "nxp", "infineon")  # the legacy M1 fleet's chips, mostly imported


class Plant(enum.Enum):
    """What was planted on a card on purpose (the value is how the summary names it)."""

    WEAK_RANDOM = "weak random generator"
    FACTORY_KEYS = "factory default keys"
    CLONE = "clone"
    TAMPERED = "value block rewritten"
    NO_MAX_BALANCE = "loads past its maximum balance"


@dataclass
class DemoCard:
    """A card in a rider's pocket: its chip state, home city, where and when it was last tapped."""

    name: str
    home: str
    state: PurseState | M1State
    plant: Plant | None = None
    clone_of: DemoCard | None = None  # the card a planted clone copies
    city: str = ""
    last_tap: dt.datetime | None = None
    in_metro: str | None = None  # the station entered, while on a metro trip

    def __post_init__(self) -> None:
        self.city = self.city or self.home

    @property
    def tech(self) -> str:
        """cpu or m1."""
        return "m1" if isinstance(self.state, M1State) else "cpu"

    @property
    def planted(self) -> str:
        """What was planted on the card, in words ("" for an ordinary card)."""
        if self.clone_of is not None:
            return f"clone of {self.clone_of.name}"
        return self.plant.value if self.plant is not None else ""


@dataclass(frozen=True)
class Fleet:
    """Every card of the demo, and the planted ones the day's plan needs by name."""

    cards: list[DemoCard]
    clone: DemoCard
    original: DemoCard  # the card the clone copies: the two ride in different cities at about the same time
    tampered: DemoCard


@dataclass(frozen=True)
class Tap:
    """One presentation of a card at a terminal at a moment of the day."""

    card: DemoCard
    terminal: TerminalConfig
    when: dt.datetime


@dataclass
class Day:
    """The demo's plan: the fleet, the terminals and, in order, the taps of the day (and the tampering)."""

    fleet: Fleet
    terminals: list[TerminalConfig]
    taps: list[Tap] = field(default_factory=list)
    tamper_at: int = -1  # the tampered card is rewritten just before this tap

    @property
    def cards(self) -> list[DemoCard]:
        """Every card of the fleet."""
        return self.fleet.cards

    def terminals_of(self, city: str) -> list[TerminalConfig]:
        """The terminals of one city."""
        return [t for t in self.terminals if t.city == city]


def issue_fleet(keys: IssuerKeyStore, per_city: int, rng: random.Random) -> Fleet:
    """``per_city`` CPU cards of each algorithm and ``per_city`` M1 cards per city, then the planted ones."""
    cards: list[DemoCard] = []
    for n, city in enumerate(CITIES):
        for alg in (Algorithm.DES3, Algorithm.SM4):
            for i in range(per_city):
                sequence = 100 * n + 10 * (alg is Algorithm.SM4) + i + 1
                makers = SM4_MAKERS if alg is Algorithm.SM4 else DES3_MAKERS
                request = CardRequest(
                    city,
                    alg,
                    rng.randrange(800, 3000),
                    sequence,
                    DAY,
                    DAY.replace(year=2036),
                    chip_maker=makers[(n + i) % len(makers)],
                )
                cards.append(DemoCard(f"{city}-{alg.value}-{i + 1}", city, issue_cpu_card(keys, request)))
        master = _master(keys, city)
        for i in range(per_city):
            maker = M1_MAKERS[(n + i) % len(M1_MAKERS)]
            # one key set for the city's whole M1 fleet, as legacy fleets had: one broken card breaks them all
            state = issue_m1_card(rng.randbytes(4), Profile.GENUINE, KeyScheme.SHARED, 3000, master, city, maker)
            cards.append(DemoCard(f"{city}-m1-{i + 1}", city, state))
    weak = CardRequest("4510", Algorithm.SM4, 2000, 99, DAY, DAY.replace(year=2036), chip_maker="huada-ciu")
    weak_state = issue_cpu_card(keys, weak)
    weak_state.defects = frozenset({Defect.WEAK_RANDOM})
    cards.append(DemoCard("4510-sm4-weak-random", "4510", weak_state, Plant.WEAK_RANDOM))
    factory = issue_m1_card(
        rng.randbytes(4), Profile.GENUINE, KeyScheme.DEFAULT, 3000, _master(keys, "4530"), "4530", "fudan-fm11rf08"
    )
    cards.append(DemoCard("4530-m1-factory-keys", "4530", factory, Plant.FACTORY_KEYS))
    original = next(c for c in cards if c.home == "4510" and c.name.endswith("sm4-1"))
    clone = DemoCard(f"{original.name}-clone", "4510", copy.deepcopy(original.state), Plant.CLONE, original)
    clone.city = "4530"  # the clone rides in Zibo
    cards.append(clone)
    tampered = next(c for c in cards if c.home == "4560" and c.tech == "m1")
    tampered.plant = Plant.TAMPERED
    capless = next(c for c in cards if c.home == "4530" and c.name.endswith("sm4-1"))
    assert isinstance(capless.state, PurseState)  # an SM4 card: a CPU purse
    capless.state.defects = frozenset({Defect.NO_MAX_BALANCE})
    capless.plant = Plant.NO_MAX_BALANCE
    return Fleet(cards, clone, original, tampered)


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
        configs += [TerminalConfig(city, TerminalKind.BUS, next(numbers), BUS_FARE[city]) for _ in range(2)]
        configs += [TerminalConfig(city, TerminalKind.METRO_ENTRY, next(numbers), 0, s.line, s.code) for s in line[:2]]
        configs += [TerminalConfig(city, TerminalKind.METRO_EXIT, next(numbers), 0, s.line, s.code) for s in line[-2:]]
        configs.append(TerminalConfig(city, TerminalKind.TOPUP, next(numbers), TOP_UP))
    return configs


def plan_day(
    fleet: Fleet,
    specs: list[TerminalConfig],
    rides: int,
    rng: random.Random,
    travel_minutes: dict[frozenset[str], int],
) -> Day:
    """``rides`` taps over the day, 30 s apart: each picks a rider, who rides in the city they are in (a CPU rider
    sometimes takes the train to another city first, when ``travel_minutes`` allows), tops up when low."""
    plan = _Planner(Day(fleet, specs), rng, travel_minutes)
    riders = [c for c in fleet.cards if c is not fleet.clone]
    # the clone and its original tap within minutes of each other, 40 minutes apart by train
    clash = {rides // 3: fleet.clone, rides // 3 + 1: fleet.original, rides // 3 + 2: fleet.clone}
    for n in range(rides):
        plan.tick()
        card = clash[n] if n in clash else rng.choice(riders)
        if n == 2 * rides // 3:
            plan.tamper()
        plan.ride(card)
    plan.close_the_metro()
    return plan.day


class _Planner:
    """A day being planned: the clock, each card's balance as the plan expects it, the terminals by city and
    kind. Each step draws from ``rng`` in a fixed order, so a seed gives one day."""

    def __init__(self, day: Day, rng: random.Random, travel_minutes: dict[frozenset[str], int]) -> None:
        self.day = day
        self.rng = rng
        self.travel_minutes = travel_minutes
        self.when = FIRST_TAP
        self.balance = {c.name: _balance(c) for c in day.cards}
        self._terminals = {
            (s.city, s.kind): [t for t in day.terminals_of(s.city) if t.kind is s.kind] for s in day.terminals
        }

    def tick(self) -> None:
        """The next tap comes 30 s later."""
        self.when += dt.timedelta(seconds=30)

    def tamper(self) -> None:
        """The fraudster rewrites the tampered card now (``Day.tamper_at``); it rides a bus at once."""
        card = self.day.fleet.tampered
        self.day.tamper_at = len(self.day.taps)
        self._tap(card, self._of_kind(card, TerminalKind.BUS)[0])
        self.tick()

    def ride(self, card: DemoCard) -> None:
        """One rider's turn: leave the metro when inside it, else ride (CPU riders may travel and top up)."""
        if card.in_metro is not None:
            self._tap(card, self.rng.choice(self._of_kind(card, TerminalKind.METRO_EXIT)))
            self.balance[card.name] -= 700  # at most; the gate charges by distance
            card.in_metro = None
        elif card.tech == "cpu":
            self._ride_cpu(card)
        elif self.balance[card.name] >= BUS_FARE[card.city]:  # an M1 card cannot be topped up here
            self._bus(card)
        card.last_tap = self.when

    def close_the_metro(self) -> None:
        """Riders still inside the metro leave at the end of the day."""
        for card in self.day.cards:
            if card.in_metro is not None:
                self.tick()
                self._tap(card, self._of_kind(card, TerminalKind.METRO_EXIT)[0])
                card.in_metro = None

    def _ride_cpu(self, card: DemoCard) -> None:
        fleet = self.day.fleet
        if card is not fleet.clone and card is not fleet.original and self.rng.random() < 0.15:
            _travel(card, self.when, self.rng, self.travel_minutes)
        if self.balance[card.name] < LOW_BALANCE:
            self._tap(card, self._of_kind(card, TerminalKind.TOPUP)[0])
            self.balance[card.name] += TOP_UP
            self.tick()
        if self.rng.random() < 0.4:
            gate = self.rng.choice(self._of_kind(card, TerminalKind.METRO_ENTRY))
            self._tap(card, gate)
            card.in_metro = gate.station
        else:
            self._bus(card)

    def _bus(self, card: DemoCard) -> None:
        self._tap(card, self.rng.choice(self._of_kind(card, TerminalKind.BUS)))
        self.balance[card.name] -= BUS_FARE[card.city]

    def _of_kind(self, card: DemoCard, kind: TerminalKind) -> list[TerminalConfig]:
        """The terminals of a kind in the city the card is in."""
        return self._terminals[(card.city, kind)]

    def _tap(self, card: DemoCard, terminal: TerminalConfig) -> None:
        self.day.taps.append(Tap(card, terminal, self.when))


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
