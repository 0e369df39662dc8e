"""The load generator's engine for one process: simulated terminals on one asyncio loop, each with its own MQTT
connection, outbox and uplink (the same ``Uplink`` a real terminal runs), making taps on a fixed timetable
(``yikatong.load_schedule``). It measures what a load tester needs: the rate achieved, for every record the time
from the moment its tap was due to the clearing's ack, and how far behind its timetable the generator fell.

The offered load is open-loop: taps are due at their moments whatever the clearing does, so a slow clearing shows
as growing queues and latency, not as a politely lower rate; a generator that cannot keep up makes its taps late
and is charged for it (latency runs from the tap's moment), and the tally counts the taps it made late.
``yikatong.load_workers`` runs one of these per worker process, each with its share of terminals and taps.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from cardsim.issuer import IssuerHost
from clearing.pki import Identity
from terminals.hotlist import HotlistBook
from terminals.messages import CHINA, Ack, TxnFields
from terminals.mqtt import BrokerUrl
from terminals.outbox import MemoryOutbox, Outbox
from terminals.uplink import Uplink
from yikatong.load_schedule import LATE, Pacer, Plan, Timetable, per_second
from yikatong.load_stats import Counts, Tally
from yikatong.load_uplink import LeanUplink, LinkTimer
from yikatong.pki_devices import as_device
from yikatong.synthetic import SyntheticCard, SyntheticTerminal

TICK = 0.02  # seconds: the longest the pacing loop sleeps (hotlist probes and progress run at this step)
BURST = 16  # taps made in a row at most before the loop sees to the connections (acks, PUBACKs): ~6 ms of taps
TOP_UP = 5000  # fen a rider loads when the card cannot pay the fare
HOME_SHARE = 0.8  # share of taps by a card of the terminal's own city; the rest ride in another city


class TimedQueue:
    """An outbox wrapper that keeps, for each record made in this run, the moment its tap was due and its phase
    (``covered`` hands them out as the clearing's acks cover them); records left from an earlier run have no
    moment and are not timed."""

    def __init__(self, inner: MemoryOutbox | Outbox) -> None:
        self.inner = inner
        self._made: deque[tuple[int, float, int]] = deque()

    def append(self, fields: TxnFields, moment: float, label: int = 0) -> None:
        """Store a record of a tap due at ``moment`` (monotonic clock) in phase ``label``."""
        record = self.inner.append(fields)
        self._made.append((record.seq, moment, label))

    def unacked(self, after: int = 0, limit: int = 100) -> list[tuple[int, str]]:
        """As the inner outbox."""
        return self.inner.unacked(after, limit)

    def apply_ack(self, ack: Ack) -> tuple[int, int]:
        """As the inner outbox."""
        return self.inner.apply_ack(ack)

    def covered(self, acked_through: int) -> list[tuple[int, float, int]]:
        """(seq, moment, phase) of the records up to ``acked_through`` not handed out before, oldest first."""
        out = []
        while self._made and self._made[0][0] <= acked_through:
            out.append(self._made.popleft())
        return out

    def queued(self) -> int:
        """As the inner outbox."""
        return self.inner.queued()

    def refuse(self, seqs: Sequence[int], reason: str) -> None:
        """As the inner outbox."""
        self.inner.refuse(seqs, reason)

    def note_link(self, error: str | None) -> None:
        """As the inner outbox."""
        self.inner.note_link(error)


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

    def tap(self, card: SyntheticCard, moment: float, label: int = 0) -> int:
        """One rider, due at ``moment``: pays the fare (topping up first when the card cannot); returns the records
        made, 0 when the card is on a hotlist this terminal holds (refused: nothing is made)."""
        if self.book.blocking(card.serial) is not None:
            return 0
        made = 0
        if card.balance < self.fare:
            self.outbox.append(self.maker.top_up(card, TOP_UP), moment, label)
            made += 1
        self.outbox.append(self.maker.purchase(card, self.fare), moment, label)
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
    """At ``at`` seconds into the load, put ``cards`` (some of the run's) on their issuers' hotlists by ``add``;
    without ``add`` another process makes the add at that moment and this one only watches (a worker)."""

    at: float
    cards: Sequence[SyntheticCard]
    add: HotlistAdd | None = None


@dataclass
class Propagation:
    """What became of the hotlist add of a run; times are seconds since the add began."""

    listed: frozenset[str] = frozenset()
    added: float | None = None  # monotonic time the add began
    at: float | None = None  # the same, in seconds into the load
    versions: dict[str, int] = field(default_factory=dict)  # issuer -> the version the add made
    published: dict[str, float] = field(default_factory=dict)  # issuer -> its add stored and published
    held: dict[str, int] = field(default_factory=dict)  # issuer -> the highest version a terminal held at the add
    first_refusal: dict[str, float] = field(default_factory=dict)  # terminal city -> first refusal of a listed card
    refusals: dict[str, int] = field(default_factory=dict)  # terminal city -> taps of listed cards refused
    # (terminal, seq) of the records of listed cards made after the add began (before their terminal held it)
    records: set[tuple[str, int]] = field(default_factory=set)
    rejected: int = 0  # of those, how many the clearing rejected

    @property
    def ahead(self) -> dict[str, int]:
        """Issuer -> a version at least as high as the add's that terminals held already (they ignore the add's)."""
        held = {issuer: self.held.get(issuer, 0) for issuer in self.versions}
        return {issuer: version for issuer, version in held.items() if version >= self.versions[issuer]}

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

    def add(self, other: Propagation) -> None:
        """Fold in what another worker saw of the same add (the add itself, versions and times, is this one's)."""
        for issuer, version in other.held.items():
            self.held[issuer] = max(self.held.get(issuer, 0), version)
        for city, first in other.first_refusal.items():
            self.first_refusal[city] = min(first, self.first_refusal.get(city, first))
        for city, count in other.refusals.items():
            self.refusals[city] = self.refusals.get(city, 0) + count
        self.records |= other.records
        self.rejected += other.rejected


@dataclass
class Progress:
    """A live snapshot for the progress line: totals so far and the last whole second of the load."""

    elapsed: float
    phase: str  # connecting, load, draining
    connected: int
    terminals: int
    generated: int
    acked: int
    rejected: int
    queued: int
    lag: float  # how far behind its timetable the generator is now, seconds
    late: int  # taps made late so far
    last: Counts | None = None  # the last whole second of the load (None: not in the load)


class LoadRun:
    """Drive ``terminals`` over ``brokers``: ``run()`` offers ``plan`` once (connect, offer, drain), or a caller (a
    worker, with no ``plan``) steps through ``connect``, ``offer`` (as often as it likes: the steps of a sweep)
    and ``drain`` itself. With ``share`` (k, n) this is worker k of n: it makes every n-th tap of each timetable.
    Counts go into ``tally`` by seconds from ``started`` (the first offer's start). Terminal k connects to
    ``brokers[k % len(brokers)]`` (the nodes of a cluster, or one broker).

    With ``session_expiry`` (seconds) the terminals speak MQTT 5 and the broker forgets their sessions that long
    after they disconnect; without, their MQTT 3.1.1 sessions last as long as the broker keeps them. Each
    terminal's uplink is a ``LeanUplink`` (the real uplink's rules over a light connection), or with
    ``lean=False`` the real terminal's ``Uplink`` itself (an aiomqtt client each: dearer). With ``pki`` (over an
    ``mqtts://`` broker) each terminal connects with its own certificate from that PKI folder and signs what it
    publishes.

    With ``hotlist``, its cards go on their issuers' hotlists during the load and ``propagation`` tells how that
    reached the terminals: from the add on, each listed card is also presented once a pacing step at a random
    terminal of every city not yet seen refusing one (a blocked card tried everywhere), so the first refusal in a
    city measures the list's way there, not how often the rider happens to ride.

    ``clock`` (monotonic, seconds) and ``sleep`` are the run's time: tests give fake ones to drive the timetable
    without depending on how fast the machine is; the terminals' hotlist times are on ``time.monotonic``."""

    def __init__(
        self,
        brokers: Sequence[BrokerUrl],
        terminals: Sequence[SimTerminal],
        cards: dict[str, list[SyntheticCard]],
        plan: Plan | None = None,
        *,
        seed: int | None = None,
        ack_timeout: float = 10.0,
        session_expiry: int | None = None,
        hotlist: HotlistPlan | None = None,
        share: tuple[int, int] = (0, 1),
        lean: bool = True,
        pki: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.clock, self.sleep = clock, sleep
        self.terminals = list(terminals)
        self.cards = cards
        self.all_cards = [card for group in cards.values() for card in group]
        self.plan = plan
        self.share = share
        self.rng = random.Random(seed)
        # the outboxes stay on the event loop: the taps write them there too, and MemoryOutbox is not thread-safe
        self.timer = LinkTimer() if lean else None

        def terminal_broker(k: int, terminal: SimTerminal) -> BrokerUrl:  # over mqtts://, with its own certificate
            return as_device(brokers[k % len(brokers)], pki, Identity.terminal(terminal.terminal_hex))

        self.uplinks: list[LeanUplink | Uplink] = [
            LeanUplink(
                terminal_broker(k, t),
                t,
                self.timer,
                ack_timeout=ack_timeout,
                max_backoff=5.0,
                session_expiry=session_expiry,
                on_ack=partial(self._on_ack, t.outbox),
            )
            if self.timer is not None
            else Uplink(
                terminal_broker(k, t),
                t,
                ack_timeout=ack_timeout,
                max_backoff=5.0,
                session_expiry=session_expiry,
                on_ack=partial(self._on_ack, t.outbox),
                in_thread=False,
            )
            for k, t in enumerate(self.terminals)
        ]
        self.hotlist = hotlist
        # the listed cards as this worker's own objects (their counters move here); none when another worker has them
        serials = {card.serial: card for card in self.all_cards}
        self._listed = [serials[c.serial] for c in hotlist.cards if c.serial in serials] if hotlist else []
        self.propagation = Propagation(frozenset(c.serial for c in hotlist.cards) if hotlist else frozenset())
        self._by_city: dict[str, list[int]] = {}
        for index, terminal in enumerate(self.terminals):
            self._by_city.setdefault(terminal.city, []).append(index)
        self._probes = 0
        self.tally = Tally()
        self.generated = self.acked = self.rejected = self.late = 0
        self.schedule: list[tuple[float, Plan]] = []  # (start, plan) of each offer, on the monotonic clock
        self.started: float | None = None
        self.connect_seconds = 0.0
        self.drain_seconds = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._pacer: Pacer | None = None

    def _second(self, now: float) -> int:
        return int(now - self.started) if self.started is not None else 0

    def _on_ack(self, queue: TimedQueue, ack: Ack, acked: int, rejected: int) -> None:
        """Count acks and time what they cover; records resumed from an earlier run's state files count but are not
        timed."""
        covered = queue.covered(ack.acked_through)
        if not (acked or rejected):  # an ack repeated: nothing new to count
            return
        refused = {r.seq for r in ack.rejected}
        if self.propagation.records:
            listed = self.propagation.records
            self.propagation.rejected += sum(1 for seq in refused if (ack.terminal, seq) in listed)
        self.acked += acked
        self.rejected += rejected
        if self.started is None:
            return
        now = self.clock()
        second = self._second(now)
        self.tally.acked(second, acked, rejected)
        for seq, moment, label in covered:
            self.tally.timed(second, label, now - moment, seq in refused)

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
        """Connect every terminal, offer the plan's load from now (taps; a tap that needs a top-up first makes two
        records), then wait for the acks of what was made."""
        if self.plan is None:
            raise ValueError("LoadRun.run offers the plan the run was made with: give one")
        try:
            await self.connect(report, connect_timeout)
            await self.offer(self.plan, self.clock(), report=report)
            await self.drain(report, drain_timeout)
        finally:
            await self.close()

    async def connect(self, report: Callable[[Progress], None], timeout: float) -> None:
        """Start every terminal's uplink and wait until all are connected (or ``timeout``)."""
        began = time.monotonic()
        self._tasks = [asyncio.create_task(u.run()) for u in self.uplinks]
        if self.timer is not None:
            self._tasks.append(asyncio.create_task(self.timer.run()))
        while self.connected() < len(self.terminals) and time.monotonic() - began < timeout:
            await asyncio.sleep(0.5)
            report(self._progress("connecting", time.monotonic() - began))
        self.connect_seconds = time.monotonic() - began

    async def close(self) -> None:
        """Stop the uplinks."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # a client that hangs in its disconnect must not hold the summary back
            await asyncio.wait(self._tasks, timeout=15)

    async def offer(
        self, plan: Plan, start: float, *, label: int = 0, report: Callable[[Progress], None] | None = None
    ) -> None:
        """Make this worker's taps of ``plan`` at their moments, second 0 being ``start`` (monotonic clock; the
        run's second 0 is the first offer's start); ``label`` is the phase the taps count in."""
        if self.started is None:
            self.started = start
        self.schedule.append((start, plan))
        moments = Timetable(plan).moments(*self.share)
        offset = start - self.started
        self.tally.due(label, per_second(moments, offset % 1), int(offset))
        self._pacer = pacer = Pacer(moments, start)
        next_report, next_probe = start + 1.0, start
        adding: asyncio.Task[None] | None = None
        while (wait := pacer.wait(self.clock())) is not None:
            await self.sleep(min(wait, TICK))
            now = await self._catch_up(pacer, label)
            if self.hotlist is not None:
                if self.propagation.added is None and now - self.started >= self.hotlist.at:
                    adding = asyncio.create_task(self._add_hotlist(self.hotlist))
                if self.propagation.added is not None and now >= next_probe:
                    self._probe(now, label)
                    next_probe = now + TICK
            if report is not None and now >= next_report:
                report(self._progress("load", now - self.started))
                next_report += 1.0
        self._pacer = None
        if adding is not None:
            await adding  # its failure is the run's

    async def _catch_up(self, pacer: Pacer, label: int) -> float:
        """Make every tap due, each timed by the clock as it is made (after a stall the last of a burst is made
        well after the first), seeing to the connections every ``BURST`` taps: a burst must not hold back the acks
        and PUBACKs that come meanwhile (their wait would be charged to the system under test). Returns the time
        the last tap was due or made."""
        made = 0
        now = self.clock()
        while (moment := pacer.take(now)) is not None:
            index = self.rng.randrange(len(self.terminals))
            self._tap(index, self._pick_card(self.terminals[index]), moment, label, now)
            made += 1
            if made % BURST == 0:
                await asyncio.sleep(0)
            now = self.clock()
        return now

    def _tap(self, index: int, card: SyntheticCard, moment: float, label: int, now: float) -> None:
        terminal = self.terminals[index]
        made = terminal.tap(card, moment, label)
        lag = now - moment
        self.late += lag > LATE
        self.tally.made(self._second(now), self._second(moment), label, made, lag, lag > LATE)
        if not made:
            self.propagation.refused(terminal.city)
            return
        if self.propagation.added is not None and card.serial in self.propagation.listed:
            last = terminal.maker.seq
            self.propagation.records.update((terminal.terminal_hex, seq) for seq in range(last - made + 1, last + 1))
        self.generated += made
        self.uplinks[index].notify()

    def _probe(self, now: float, label: int) -> None:
        """A listed card (of this worker's) presented at a random terminal of each city where none was refused
        yet."""
        for city, indexes in self._by_city.items():
            if self._listed and city not in self.propagation.first_refusal:
                card = self._listed[self._probes % len(self._listed)]
                self._probes += 1
                self._tap(self.rng.choice(indexes), card, now, label, now)

    async def _add_hotlist(self, plan: HotlistPlan) -> None:
        """Put the plan's cards on their issuers' lists (one add per issuer; another process does it when the plan
        has no ``add``), noting the versions the terminals held."""
        by_issuer: dict[str, list[str]] = {}
        for card in plan.cards:
            by_issuer.setdefault(card.issuer, []).append(card.serial)
        news = self.propagation
        news.held = {issuer: max(t.book.version(issuer) for t in self.terminals) for issuer in by_issuer}
        news.added = time.monotonic()
        news.at = self.clock() - self.started if self.started is not None else 0.0
        if plan.add is None:
            return
        for issuer, cards in by_issuer.items():
            news.versions[issuer] = await plan.add(issuer, cards)
            news.published[issuer] = time.monotonic() - news.added

    async def drain(self, report: Callable[[Progress], None], timeout: float) -> None:
        """Wait until the clearing has acked every record made (or ``timeout``)."""
        began = self.clock()
        while self.queued() and self.clock() - began < timeout:
            await self.sleep(0.5)
            report(self._progress("draining", self.clock() - (self.started or began)))
        self.drain_seconds = self.clock() - began

    def lag(self) -> float:
        """How far behind its timetable the generator is now (0 outside an offer)."""
        return self._pacer.lag(self.clock()) if self._pacer is not None else 0.0

    def _progress(self, phase: str, elapsed: float) -> Progress:
        index = int(elapsed) - 1
        seconds = self.tally.seconds
        last = seconds[index] if phase == "load" and 0 <= index < len(seconds) else None
        return Progress(
            elapsed,
            phase,
            self.connected(),
            len(self.terminals),
            self.generated,
            self.acked,
            self.rejected,
            self.queued(),
            self.lag(),
            self.late,
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
