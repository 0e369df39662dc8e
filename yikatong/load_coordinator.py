"""The parent of ``yikatong load``'s workers: it starts the offered load on every worker at one moment, makes the
hotlist add when the run has one, steps a sweep's rates up until the SLO breaks, scrapes the clearings' metrics
once a second, shows merged progress, and hands the whole run to the report as a ``RunResult``."""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from yikatong.load_metrics import CityMetrics, MetricsDoc, MetricsError, MetricsSeries, read_metrics
from yikatong.load_schedule import Plan, Sweep
from yikatong.load_stats import Counts, Tally
from yikatong.load_workers import WorkerPool, WorkerResult, merge
from yikatong.loadgen import HotlistAdd, HotlistPlan, Progress, Propagation

START_AFTER = 0.5  # seconds from the command to the first tap: every worker has it by then
SCRAPE_EVERY = 1.0  # seconds between scrapes of the clearings' metrics
SCRAPE_TIMEOUT = 2.0  # seconds a metrics endpoint may take to answer

Show = Callable[[Progress, str], None]
"""Shows the merged progress once a second, with a note (the sweep's step)."""


@dataclass
class StepResult:
    """One step of a sweep: its offered rate and what became of its taps (by their moment in the step)."""

    rate: float
    seconds: float
    counts: Counts
    unacked: int  # records still waiting after the step's drain
    slo: float  # seconds
    busy: float | None = None  # share of the machine's CPU busy while the step's taps were offered

    @property
    def held(self) -> bool:
        """Every record acked and p99 within the SLO."""
        timed = self.counts.latency.get_total_count()
        return self.unacked == 0 and timed > 0 and self.counts.latency.get_value_at_percentile(99) <= self.slo * 1e6


@dataclass
class RunResult:
    """A whole run, merged over the workers: what the report is made of."""

    workers: int
    terminals: int
    cities: list[str]  # the terminals' cities
    connected: int
    connect_seconds: float
    drain_seconds: float
    duration: float  # seconds of offered load (a sweep's steps together)
    generated: int
    published: int  # records published, resends included
    acked: int
    rejected: int
    unacked: int
    tally: Tally
    propagation: Propagation | None = None
    listed: dict[str, str] = field(default_factory=dict)  # card id -> issuer, of the cards the hotlist add listed
    holding: list[float] = field(default_factory=list)
    steps: list[StepResult] = field(default_factory=list)
    metrics: MetricsDoc | None = None
    busy: float | None = None  # share of the machine's CPU busy while taps were offered (None: not on Linux)


@dataclass(frozen=True)
class Hotlist:
    """The run's hotlist add, made by the parent at ``at`` seconds into the load."""

    plan: HotlistPlan
    add: HotlistAdd


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, all) CPU time of the whole machine so far, in clock ticks (Linux /proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(n) for n in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle and iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU that was busy between two ``cpu_jiffies``."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT) as answer:
        text: str = answer.read().decode("utf-8", errors="replace")
    return text


async def _figures(series: MetricsSeries, url: str, second: float) -> dict[str, CityMetrics]:
    try:
        return read_metrics(await asyncio.to_thread(_fetch, url))
    except (OSError, MetricsError) as err:
        series.failed(f"{url} at {second:.1f} s: {err}")
        return {}


async def scrape(series: MetricsSeries, second: float) -> None:
    """One round over the endpoints at once into ``series``; an endpoint that fails is noted with its reason. A
    clearing's figures go under its city, or under the endpoint's name when that names one of several workers of
    the city (CITY-NAME: each worker's own figures)."""
    figures: dict[str, CityMetrics] = {}
    names = list(series.endpoints)
    found = await asyncio.gather(*(_figures(series, url, second) for url in series.endpoints.values()))
    for name, cities in zip(names, found, strict=True):
        figures |= {name if name.startswith(f"{city}-") else city: f for city, f in cities.items()}
    series.add(second, figures)


class Coordinator:
    """Runs the offered load over ``pool``'s workers: ``run`` (one plan) or ``sweep`` (steps until the SLO
    breaks), then ``finish``."""

    def __init__(self, pool: WorkerPool, show: Show, metrics: dict[str, str] | None = None) -> None:
        self.pool = pool
        self.show = show
        self.note = ""
        self.series = MetricsSeries(metrics) if metrics else None
        self.started: float | None = None
        self.duration = 0.0
        self.drain_seconds = 0.0
        self.steps: list[StepResult] = []
        self.propagation: Propagation | None = None
        self.listed: dict[str, str] = {}
        self._busy: list[tuple[float, float | None]] = []  # (seconds, busy share) of each offer

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Progress shown and metrics scraped once a second while the block runs."""
        task = asyncio.create_task(self._watch())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(SCRAPE_EVERY)
            progress = self.pool.merged_progress() if self.pool.fresh else None
            if progress is not None:
                self.show(progress, self.note)
            if self.series is not None:
                await scrape(self.series, time.monotonic() - (self.started or time.monotonic()))

    async def connect(self) -> None:
        """Wait until every worker has connected its terminals."""
        await self.pool.expect("connected")
        if self.series is not None:  # before the first tap: what the clearings had done already
            await scrape(self.series, 0.0)

    async def _offer(self, label: int, plan: Plan) -> float | None:
        """Offer ``plan`` on every worker from a moment just ahead; the share of the machine's CPU busy meanwhile
        (the generator shares the cores with what it tests, and with anything else running)."""
        start = time.monotonic() + START_AFTER
        if self.started is None:
            self.started = start
        self.pool.send("offer", label, plan, start)
        await asyncio.sleep(START_AFTER)
        before = cpu_jiffies()
        await self.pool.expect("offered")
        busy = busy_share(before, cpu_jiffies())
        self._busy.append((plan.duration, busy))
        self.duration += plan.duration
        return busy

    async def _drain(self, timeout: float) -> tuple[dict[int, Counts], int]:
        began = time.monotonic()
        self.pool.send("drain", timeout)
        phases: dict[int, Counts] = {}
        queued = 0
        for _, wires, waiting in await self.pool.expect("drained"):
            for label, wire in wires.items():
                counts = Counts.from_wire(wire)
                if label in phases:
                    phases[label].add(counts)
                else:
                    phases[label] = counts
            queued += waiting
        self.drain_seconds = time.monotonic() - began
        return phases, queued

    async def run(self, plan: Plan, drain: float, hotlist: Hotlist | None = None) -> None:
        """Offer ``plan`` once (with the hotlist add at its moment), then wait up to ``drain`` s for the acks."""
        adding = None
        if hotlist is not None:
            self.propagation = Propagation(frozenset(c.serial for c in hotlist.plan.cards))
            self.listed = {card.serial: card.issuer for card in hotlist.plan.cards}
            adding = asyncio.create_task(self._add_hotlist(hotlist))
        try:
            await self._offer(0, plan)
            if adding is not None:
                await adding  # its failure is the run's
        finally:
            if adding is not None:
                adding.cancel()
        await self._drain(drain)

    async def _add_hotlist(self, hotlist: Hotlist) -> None:
        """At the plan's moment, the cards onto their issuers' lists (the workers watch from the same moment)."""
        while self.started is None:
            await asyncio.sleep(0.01)
        await asyncio.sleep(max(0.0, self.started + hotlist.plan.at - time.monotonic()))
        news = self.propagation
        assert news is not None
        news.added = time.monotonic()
        news.at = news.added - self.started
        by_issuer: dict[str, list[str]] = {}
        for card in hotlist.plan.cards:
            by_issuer.setdefault(card.issuer, []).append(card.serial)
        for issuer, cards in by_issuer.items():
            news.versions[issuer] = await hotlist.add(issuer, cards)
            news.published[issuer] = time.monotonic() - news.added
        self.pool.send("versions", dict(news.versions))

    async def sweep(self, sweep: Sweep, drain: float) -> None:
        """The sweep's steps, each drained before the next, until one does not hold."""
        for label, rate in enumerate(sweep.rates()):
            self.note = f"step {label + 1}/{sweep.steps} at {rate:,.0f}/s  "
            busy = await self._offer(label, Plan(rate, sweep.seconds))
            self.note += "draining  "
            phases, queued = await self._drain(drain)
            step = StepResult(rate, sweep.seconds, phases.get(label, Counts()), queued, sweep.slo, busy)
            self.steps.append(step)
            if not step.held:
                break
        self.note = ""

    async def finish(self) -> RunResult:
        """Stop the workers' terminals and merge what they counted."""
        self.pool.send("finish")
        results: list[WorkerResult] = [message[1] for message in await self.pool.expect("result")]
        merged = merge(results)
        if self.series is not None:
            await scrape(self.series, time.monotonic() - (self.started or time.monotonic()))
        propagation = None
        if self.propagation is not None:
            propagation = self.propagation
            propagation.add(merged.propagation)
        return RunResult(
            workers=len(results),
            terminals=sum(len(spec.terminals) for spec in self.pool.specs),
            cities=sorted({city for spec in self.pool.specs for city, _ in spec.terminals}),
            connected=merged.connected,
            connect_seconds=merged.connect_seconds,
            drain_seconds=self.drain_seconds,
            duration=self.duration,
            generated=merged.generated,
            published=merged.published,
            acked=merged.acked,
            rejected=merged.rejected,
            unacked=merged.queued,
            tally=merged.tally,
            propagation=propagation,
            listed=self.listed,
            holding=merged.holding,
            steps=self.steps,
            metrics=self.series.doc() if self.series is not None else None,
            busy=self._busy_overall(),
        )

    def _busy_overall(self) -> float | None:
        """The offers' busy shares, weighted by their seconds (None when one is unknown)."""
        known = [(seconds, busy) for seconds, busy in self._busy if busy is not None]
        if not known or len(known) < len(self._busy):
            return None
        return sum(seconds * busy for seconds, busy in known) / sum(seconds for seconds, _ in known)
