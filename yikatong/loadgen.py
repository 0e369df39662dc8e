"""The load generator's engine: thousands of simulated terminals in one asyncio process, each with its own MQTT
connection, outbox and uplink (the same ``Uplink`` a real terminal runs), fed at an offered rate that follows a
profile. It measures what a load tester needs: the rate achieved, and for every record the time from its tap to
the clearing's ack.

The offered load is open-loop: taps are due at the profile's rate whatever the clearing does, so a slow clearing
shows as growing queues and latency, not as a politely lower rate. If this process cannot make records as fast
as they are due, ``generated`` falls behind ``offered`` and the summary says so.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from cardsim.issuer import IssuerHost
from terminals.hotlist import HotlistBook
from terminals.messages import CHINA, Ack, TxnFields, TxnRecord
from terminals.mqtt import BrokerUrl
from terminals.outbox import MemoryOutbox, Outbox
from terminals.uplink import Uplink
from yikatong.synthetic import SyntheticCard, SyntheticTerminal

TICK = 0.02  # seconds between pacing steps: small enough that taps come evenly, large enough to be cheap
TOP_UP = 5000  # fen a rider loads when the card cannot pay the fare
HOME_SHARE = 0.8  # share of taps by a card of the terminal's own city; the rest ride in another city


def _peak(x: float, centre: float, width: float) -> float:
    return math.exp(-(((x - centre) / width) ** 2) / 2)


def rush_hour(x: float) -> float:
    """A day compressed into the run: a morning and an evening peak (full rate) over a quiet base (a fifth)."""
    return 0.2 + 0.8 * max(_peak(x, 0.3, 0.07), _peak(x, 0.75, 0.07))


PROFILES: dict[str, Callable[[float], float]] = {"flat": lambda _x: 1.0, "rush-hour": rush_hour}
"""Offered rate as a share of ``--rate``, by the fraction of the run gone (0..1)."""


@dataclass(frozen=True)
class Plan:
    """What to offer: ``rate`` taps/s at the profile's peak for ``duration`` seconds."""

    rate: float
    duration: float
    profile: str = "flat"

    def due(self, since: float, until: float) -> float:
        """Taps due between two moments of the run (seconds from its start; midpoint rule)."""
        until = min(until, self.duration)
        return max(0.0, until - since) * self.rate_at((since + until) / 2)

    def rate_at(self, elapsed: float) -> float:
        """The offered rate at ``elapsed`` seconds."""
        return self.rate * PROFILES[self.profile](min(elapsed, self.duration) / self.duration)


class TimedQueue:
    """An outbox wrapper that notes when each record was made and, when the clearing's ack covers it, how long
    that took (the ack latency; ``latencies``, or ``on_ack`` on each ack); records left from an earlier run have
    no start time and are not timed."""

    def __init__(
        self, inner: MemoryOutbox | Outbox, on_ack: Callable[[list[float], int, int], None] | None = None
    ) -> None:
        self.inner = inner
        self.on_ack = on_ack
        self._made: deque[tuple[int, float]] = deque()

    def append(self, fields: TxnFields) -> TxnRecord:
        """Store a record and start its clock."""
        record = self.inner.append(fields)
        self._made.append((record.seq, time.monotonic()))
        return record

    def unacked(self, after: int = 0, limit: int = 100) -> list[tuple[int, str]]:
        """As the inner outbox."""
        return self.inner.unacked(after, limit)

    def apply_ack(self, ack: Ack) -> tuple[int, int]:
        """As the inner outbox; with ``on_ack``, timing the records the ack covers for it."""
        acked, rejected = self.inner.apply_ack(ack)
        if self.on_ack is not None:
            latencies = self.latencies(ack.acked_through)
            if acked or rejected:
                self.on_ack(latencies, acked, rejected)
        return acked, rejected

    def latencies(self, acked_through: int) -> list[float]:
        """How long the records up to ``acked_through`` waited from being made until now (each timed once)."""
        now, latencies = time.monotonic(), []
        while self._made and self._made[0][0] <= acked_through:
            latencies.append(now - self._made.popleft()[1])
        return latencies

    def queued(self) -> int:
        """As the inner outbox."""
        return self.inner.queued()


class SimTerminal:
    """One simulated bus terminal: signs records like a PSAM would and keeps them until acked; refuses the cards
    on the hotlists it holds (every issuer's, as a real terminal)."""

    def __init__(self, host: IssuerHost, city: str, number: str, outbox: TimedQueue, fare: int) -> None:
        self.city = city
        self.terminal_hex = number
        self.outbox = outbox
        self.fare = fare
        last = outbox.inner.next_seq - 1
        self.maker = SyntheticTerminal(host, city, number, clock=lambda: dt.datetime.now(CHINA), seq=last)
        self.book = HotlistBook()
        # issuer -> (version, monotonic time) of each list version as it was applied: when the news arrived
        self.applied: dict[str, list[tuple[int, float]]] = {}

    def tap(self, card: SyntheticCard) -> int:
        """One rider: pays the fare (topping up first when the card cannot); returns the records made, 0 when
        the card is on a hotlist this terminal holds (refused: nothing is made)."""
        if self.book.blocking(card.serial) is not None:
            return 0
        made = 0
        if card.balance < self.fare:
            self.outbox.append(self.maker.top_up(card, TOP_UP))
            made += 1
        self.outbox.append(self.maker.purchase(card, self.fare))
        return made + 1

    def offer_hotlist(self, topic: str, payload: bytes | str) -> bool:
        """Take a hotlist message into the book, noting when a new version of a list was applied."""
        news = self.book.offer(topic, payload)
        if news.issuer is not None and news.version is not None:
            self.applied.setdefault(news.issuer, []).append((news.version, time.monotonic()))
        return not news.refused

    def held_since(self, issuer: str, version: int) -> float | None:
        """When this terminal first held ``version`` (or a later one) of ``issuer``'s list; None if not yet."""
        return next((at for held, at in self.applied.get(issuer, []) if held >= version), None)


HotlistAdd = Callable[[str, list[str]], Awaitable[int]]
"""Put cards on an issuer's hotlist and publish it, as ``clearing hotlist add`` does: (issuer, card ids) -> the
new version."""


@dataclass(frozen=True)
class HotlistPlan:
    """At ``at`` seconds into the load, put ``cards`` (some of the run's) on their issuers' hotlists by ``add``."""

    at: float
    cards: Sequence[SyntheticCard]
    add: HotlistAdd


@dataclass
class Propagation:
    """What became of the hotlist add of a run; times are seconds since the add began."""

    listed: frozenset[str] = frozenset()
    added: float | None = None  # monotonic time the add began
    at: float | None = None  # the same, in seconds into the load
    versions: dict[str, int] = field(default_factory=dict)  # issuer -> the version the add made
    published: dict[str, float] = field(default_factory=dict)  # issuer -> its add stored and published
    ahead: dict[str, int] = field(default_factory=dict)  # issuer -> a version terminals held already, not below
    first_refusal: dict[str, float] = field(default_factory=dict)  # terminal city -> first refusal of a listed card
    refusals: dict[str, int] = field(default_factory=dict)  # terminal city -> taps of listed cards refused
    # (terminal, seq) of the records of listed cards made after the add began (before their terminal held it)
    records: set[tuple[str, int]] = field(default_factory=set)
    rejected: int = 0  # of those, how many the clearing rejected

    def refused(self, city: str) -> None:
        """A terminal of ``city`` refused a listed card now."""
        if self.added is not None:
            self.first_refusal.setdefault(city, time.monotonic() - self.added)
        self.refusals[city] = self.refusals.get(city, 0) + 1

    def holding(self, terminals: Sequence[SimTerminal]) -> list[float]:
        """For each terminal that holds every version the add made: how long after the add it got the last."""
        if self.added is None or not self.versions:
            return []
        out = []
        for terminal in terminals:
            times = [terminal.held_since(issuer, version) for issuer, version in self.versions.items()]
            known = [at for at in times if at is not None]
            if len(known) == len(times):
                out.append(max(known) - self.added)
        return out


@dataclass
class Second:
    """What happened in one second of the run."""

    offered: float = 0.0
    generated: int = 0
    acked: int = 0
    rejected: int = 0
    latencies: list[float] = field(default_factory=list)


@dataclass
class Progress:
    """A live snapshot for the progress line."""

    elapsed: float
    phase: str
    connected: int
    terminals: int
    generated: int
    acked: int
    rejected: int
    queued: int
    last: Second


class LoadRun:
    """Drive ``terminals`` over ``broker`` at ``plan``; ``run()`` fills the per-second ``timeline``. With
    ``session_expiry`` (seconds) the terminals speak MQTT 5 and the broker forgets their sessions that long after
    they disconnect; without, their MQTT 3.1.1 sessions last as long as the broker keeps them. With ``hotlist``,
    its cards go on their issuers' hotlists during the load and ``propagation`` tells how that reached the
    terminals: from the add on, each listed card is also presented once a pacing step at a random terminal of
    every city not yet seen refusing one (a blocked card tried everywhere), so the first refusal in a city
    measures the list's way there, not how often the rider happens to ride."""

    def __init__(
        self,
        broker: BrokerUrl,
        terminals: Sequence[SimTerminal],
        cards: dict[str, list[SyntheticCard]],
        plan: Plan,
        *,
        seed: int | None = None,
        ack_timeout: float = 10.0,
        session_expiry: int | None = None,
        hotlist: HotlistPlan | None = None,
    ) -> None:
        self.broker = broker
        self.terminals = list(terminals)
        self.cards = cards
        self.all_cards = [card for group in cards.values() for card in group]
        self.plan = plan
        self.rng = random.Random(seed)
        # the outboxes stay on the event loop: the taps write them there too, and MemoryOutbox is not thread-safe
        self.uplinks = [
            Uplink(
                broker,
                t,
                ack_timeout=ack_timeout,
                max_backoff=5.0,
                session_expiry=session_expiry,
                on_ack=partial(self._on_ack, t.outbox),
                in_thread=False,
            )
            for t in self.terminals
        ]
        self.hotlist = hotlist
        self.propagation = Propagation(frozenset(c.serial for c in hotlist.cards) if hotlist else frozenset())
        self._by_city: dict[str, list[int]] = {}
        for index, terminal in enumerate(self.terminals):
            self._by_city.setdefault(terminal.city, []).append(index)
        self._probes = 0
        self.timeline: list[Second] = []
        self.generated = self.acked = self.rejected = 0
        self.offered = 0.0  # taps due over the whole run
        self.connect_seconds = 0.0
        self.drain_seconds = 0.0
        self._started = 0.0

    def _second(self) -> Second:
        index = max(0, int(time.monotonic() - self._started)) if self._started else 0
        while len(self.timeline) <= index:
            self.timeline.append(Second())
        return self.timeline[index]

    def _on_ack(self, queue: TimedQueue, ack: Ack, acked: int, rejected: int) -> None:
        """Count acks; records resumed from an earlier run's state files count but are not timed."""
        latencies = queue.latencies(ack.acked_through)
        if not (acked or rejected):  # an ack repeated: nothing new to count
            return
        if self.propagation.records:
            listed = self.propagation.records
            self.propagation.rejected += sum(1 for r in ack.rejected if (ack.terminal, r.seq) in listed)
        self.acked += acked
        self.rejected += rejected
        if self._started:
            second = self._second()
            second.acked += acked
            second.rejected += rejected
            second.latencies.extend(latencies)

    def connected(self) -> int:
        """Terminals connected to the broker now."""
        return sum(1 for u in self.uplinks if u.stats.connected)

    def queued(self) -> int:
        """Records waiting for an ack, over all terminals."""
        return sum(t.outbox.queued() for t in self.terminals)

    def _pick_card(self, terminal: SimTerminal) -> SyntheticCard:
        home = self.cards.get(terminal.city)
        if home and self.rng.random() < HOME_SHARE:
            return self.rng.choice(home)
        return self.rng.choice(self.all_cards)

    async def run(
        self,
        report: Callable[[Progress], None],
        *,
        connect_timeout: float = 120.0,
        drain_timeout: float = 60.0,
    ) -> None:
        """Connect every terminal, offer the plan's load (taps; a tap that needs a top-up first makes two
        records), then wait for the acks of what was made."""
        tasks = [asyncio.create_task(u.run()) for u in self.uplinks]
        began = time.monotonic()
        try:
            await self._connect(report, began, connect_timeout)
            self.connect_seconds = time.monotonic() - began
            await self._offer(report)
            drained = time.monotonic()
            await self._drain(report, drain_timeout)
            self.drain_seconds = time.monotonic() - drained
        finally:
            for task in tasks:
                task.cancel()
            # a client that hangs in its disconnect must not hold the summary back
            await asyncio.wait(tasks, timeout=15)

    async def _connect(self, report: Callable[[Progress], None], began: float, timeout: float) -> None:
        while self.connected() < len(self.terminals) and time.monotonic() - began < timeout:
            await asyncio.sleep(0.5)
            report(self._progress("connecting", time.monotonic() - began))

    async def _offer(self, report: Callable[[Progress], None]) -> None:
        self._started = time.monotonic()
        next_report, last, due, made_here = 1.0, 0.0, 0.0, 0
        adding: asyncio.Task[None] | None = None
        while True:
            elapsed = time.monotonic() - self._started
            second = self._second()
            due += self.plan.due(last, elapsed)
            last = elapsed
            second.offered = self.plan.rate_at(int(elapsed) + 0.5)
            if self.hotlist is not None and adding is None and elapsed >= self.hotlist.at:
                adding = asyncio.create_task(self._add_hotlist(self.hotlist))
            while made_here < due:
                index = self.rng.randrange(len(self.terminals))
                self._tap(index, self._pick_card(self.terminals[index]), second)
                made_here += 1
            if self.hotlist is not None and self.propagation.added is not None:
                self._probe(self.hotlist.cards, second)
            if elapsed >= self.plan.duration:
                self.offered = due
                break
            if elapsed >= next_report:
                report(self._progress("load", elapsed))
                next_report += 1.0
            await asyncio.sleep(TICK)
        if adding is not None:
            await adding  # its failure is the run's

    def _tap(self, index: int, card: SyntheticCard, second: Second) -> None:
        terminal = self.terminals[index]
        made = terminal.tap(card)
        if not made:
            self.propagation.refused(terminal.city)
            return
        if self.propagation.added is not None and card.serial in self.propagation.listed:
            last = terminal.maker.seq
            self.propagation.records.update((terminal.terminal_hex, seq) for seq in range(last - made + 1, last + 1))
        self.generated += made
        second.generated += made
        self.uplinks[index].notify()

    def _probe(self, listed: Sequence[SyntheticCard], second: Second) -> None:
        """A listed card presented at a random terminal of each city where none was refused yet."""
        for city, indexes in self._by_city.items():
            if city not in self.propagation.first_refusal:
                card = listed[self._probes % len(listed)]
                self._probes += 1
                self._tap(self.rng.choice(indexes), card, second)

    async def _add_hotlist(self, plan: HotlistPlan) -> None:
        """Put the plan's cards on their issuers' lists (one add per issuer), noting versions terminals held."""
        by_issuer: dict[str, list[str]] = {}
        for card in plan.cards:
            by_issuer.setdefault(card.issuer, []).append(card.serial)
        held = {issuer: max(t.book.version(issuer) for t in self.terminals) for issuer in by_issuer}
        self.propagation.added = time.monotonic()
        self.propagation.at = self.propagation.added - self._started
        for issuer, cards in by_issuer.items():
            version = await plan.add(issuer, cards)
            self.propagation.versions[issuer] = version
            self.propagation.published[issuer] = time.monotonic() - self.propagation.added
            if held[issuer] >= version:
                self.propagation.ahead[issuer] = held[issuer]

    async def _drain(self, report: Callable[[Progress], None], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.queued() and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            report(self._progress("draining", time.monotonic() - self._started))

    def _progress(self, phase: str, elapsed: float) -> Progress:
        index = int(elapsed) - 1
        last = self.timeline[index] if phase == "load" and 0 <= index < len(self.timeline) else Second()
        return Progress(
            elapsed,
            phase,
            self.connected(),
            len(self.terminals),
            self.generated,
            self.acked,
            self.rejected,
            self.queued(),
            last,
        )


def terminal_numbers(cities: Sequence[str], count: int, rng: random.Random) -> list[tuple[str, str]]:
    """``count`` (city, terminal number) pairs spread over the cities, numbers unique and random (so runs on a
    shared broker do not share topics)."""
    numbers: set[str] = set()
    out = []
    for i in range(count):
        city = cities[i % len(cities)]
        number = city + f"{rng.getrandbits(32):08X}"
        while number in numbers:
            number = city + f"{rng.getrandbits(32):08X}"
        numbers.add(number)
        out.append((city, number))
    return out


def open_outbox(state_dir: Path | None, number: str, city: str) -> MemoryOutbox | Outbox:
    """A durable outbox file in ``state_dir`` (survives a SIGKILL of the load process), or one in memory."""
    if state_dir is None:
        return MemoryOutbox()
    outbox = Outbox(state_dir / f"terminal-{number}.sqlite")
    outbox.bind_terminal(number, city)
    return outbox
