"""``yikatong load``'s worker processes: each runs a share of the simulated terminals and of every timetable
(``LoadRun`` with ``share=(k, n)``) on its own event loop and core, and answers its parent over a pipe.

One Python process drives a few thousand MQTT clients before its event loop, not the broker or the clearing,
sets the pace; several processes, each with its own loop, garbage collector and core, do not wait for each other.
The parent tells every worker what to offer and when (a moment on the machine's monotonic clock, which all
processes share), and collects progress once a second and, at the end, counts and HDR histograms that add up
exactly (``yikatong.load_stats``).

Parent to worker: ``("offer", label, plan, start)``, ``("drain", timeout)``, ``("versions", {issuer: version})``
(the hotlist add the parent made), ``("finish",)``. Worker to parent: ``("progress", ProgressWire)``,
``("connected",)``, ``("offered",)``, ``("drained", CountsWire by phase, queued)``, ``("result", WorkerResult)``,
``("error", text)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import multiprocessing
import os
import resource
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypedDict

from cardsim.issuer import IssuerHost
from terminals.mqtt import BrokerUrl
from terminals.outbox import OutboxError
from yikatong.argtypes import load_keys
from yikatong.errors import CliError
from yikatong.load_schedule import Plan
from yikatong.load_stats import Counts, CountsWire, Tally, TallyWire
from yikatong.loadgen import HotlistPlan, LoadRun, Progress, Propagation, SimTerminal, TimedQueue, open_outbox
from yikatong.process import setup_logging
from yikatong.synthetic import SyntheticCard

PR_SET_PDEATHSIG = 1  # prctl(2)
SPARE_FILES = 100  # open files beside the terminals' sockets (the interpreter's, state files' journals, pipes)


@dataclass(frozen=True)
class WorkerSpec:
    """What worker ``share`` of ``shares`` runs: its terminals (city, number) and cards, and how; its k-th
    terminal connects to ``brokers[k % len(brokers)]``."""

    share: int
    shares: int
    brokers: tuple[BrokerUrl, ...]
    terminals: list[tuple[str, str]]
    cards: list[SyntheticCard]
    keys: Path | None
    fare: int
    seed: int
    connect_timeout: float
    state_dir: Path | None = None
    session_expiry: int | None = None
    hotlist_at: float | None = None  # the parent adds the cards at this moment; the worker watches
    hotlist_cards: list[SyntheticCard] = field(default_factory=list)
    lean: bool = True  # LeanUplink per terminal (else the real Uplink)
    pki: Path | None = None  # over mqtts://: the PKI folder holding each terminal's certificate
    parent: int = field(default_factory=os.getpid)  # the process that starts the worker


class ProgressWire(TypedDict):
    """A worker's ``Progress`` as plain data (``second``: the run's second ``last`` is of)."""

    phase: str
    elapsed: float
    connected: int
    terminals: int
    generated: int
    acked: int
    rejected: int
    queued: int
    lag: float
    late: int
    second: int
    last: CountsWire | None


class WorkerResult(TypedDict):
    """What a worker sends when it finishes."""

    tally: TallyWire
    propagation: Propagation
    holding: list[float]  # per terminal holding the add's versions: seconds from the add
    published: int  # records published, resends included
    generated: int
    acked: int
    rejected: int
    connected: int
    queued: int
    connect_seconds: float


def _split(items: list[Any], shares: int) -> list[list[Any]]:
    """``items`` in ``shares`` contiguous blocks of sizes differing by at most one (contiguous: the cities are
    interleaved, so every block holds terminals and cards of every city)."""
    size, extra = divmod(len(items), shares)
    out, start = [], 0
    for k in range(shares):
        end = start + size + (k < extra)
        out.append(items[start:end])
        start = end
    return out


def worker_specs(
    shares: int,
    terminals: list[tuple[str, str]],
    cards: list[SyntheticCard],
    brokers: Sequence[BrokerUrl],
    **common: Any,
) -> list[WorkerSpec]:
    """One spec per worker (``shares`` at most the number of terminals and of cards), the rest alike; terminal i
    of the run connects to ``brokers[i % len(brokers)]`` (each worker's list turned to where its block starts)."""
    shares = max(1, min(shares, len(terminals), len(cards)))
    specs, first = [], 0
    for k, (t, c) in enumerate(zip(_split(terminals, shares), _split(cards, shares), strict=True)):
        turn = first % len(brokers)
        specs.append(WorkerSpec(k, shares, tuple(brokers[turn:]) + tuple(brokers[:turn]), t, c, **common))
        first += len(t)
    return specs


# --- in the worker process ----------------------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """Linux: this process gets SIGKILL when its parent ends, however it ends, as a thread would: a SIGKILLed
    ``yikatong load`` must not leave workers making records into its state files."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it ended before that took hold
        os._exit(1)


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """A worker process: Ctrl-C is the parent's to handle (it stops the workers)."""
    _die_with(spec.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(logging.ERROR)
    try:
        asyncio.run(_worker(spec, conn))
    except (OutboxError, CliError, OSError) as err:
        conn.send(("error", f"worker {spec.share}: {err}"))


def open_files(needed: int, who: str) -> None:
    """Let this process hold ``needed`` open files (a socket each terminal): the soft limit is raised up to the
    hard one; past that, a ``CliError`` that says what to do."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed or soft == resource.RLIM_INFINITY:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise CliError(
            f"{who} needs {needed:,} open files (a socket per terminal) but may hold {hard:,} (ulimit -Hn): raise "
            "the limit, or spread the terminals over more --workers"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _build(spec: WorkerSpec) -> LoadRun:
    host = IssuerHost(load_keys(spec.keys))
    terminals = [
        SimTerminal(host, city, number, TimedQueue(open_outbox(spec.state_dir, number, city)), spec.fare)
        for city, number in spec.terminals
    ]
    by_city: dict[str, list[SyntheticCard]] = {}
    for card in spec.cards:
        by_city.setdefault(card.issuer, []).append(card)
    hotlist = None if spec.hotlist_at is None else HotlistPlan(spec.hotlist_at, spec.hotlist_cards)
    return LoadRun(
        spec.brokers,
        terminals,
        by_city,
        seed=spec.seed * 1000 + spec.share,
        session_expiry=spec.session_expiry,
        hotlist=hotlist,
        share=(spec.share, spec.shares),
        lean=spec.lean,
        pki=spec.pki,
    )


def _wire(progress: Progress, started: float | None) -> ProgressWire:
    second = int(progress.elapsed) - 1
    return {
        "phase": progress.phase,
        "elapsed": progress.elapsed,
        "connected": progress.connected,
        "terminals": progress.terminals,
        "generated": progress.generated,
        "acked": progress.acked,
        "rejected": progress.rejected,
        "queued": progress.queued,
        "lag": progress.lag,
        "late": progress.late,
        "second": second if started is not None else -1,
        "last": None if progress.last is None else progress.last.to_wire(),
    }


def _reader(conn: Connection, inbox: asyncio.Queue[tuple[Any, ...]]) -> Callable[[], None]:
    """The parent's commands into ``inbox``; when the parent is gone, this worker goes at once (where the
    kernel does not see to it)."""

    def read() -> None:
        try:
            inbox.put_nowait(conn.recv())
        except (EOFError, OSError):
            os._exit(1)

    return read


async def _worker(spec: WorkerSpec, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    loop.add_reader(conn.fileno(), _reader(conn, inbox))
    open_files(len(spec.terminals) + SPARE_FILES, f"load worker {spec.share}")
    run = _build(spec)

    def report(progress: Progress) -> None:
        conn.send(("progress", _wire(progress, run.started)))

    try:
        await run.connect(report, spec.connect_timeout)
        # everything made so far lives until the end: out of the collector's way, or each full collection walks
        # the thousands of clients again and stalls the loop for up to seconds (the offered rate with it)
        gc.collect()
        gc.freeze()
        conn.send(("connected",))
        while (command := await inbox.get())[0] != "finish":
            match command:
                case ("offer", int(label), Plan() as plan, float(start)):
                    await run.offer(plan, start, label=label, report=report)
                    conn.send(("offered",))
                case ("drain", int() | float() as timeout):
                    await run.drain(report, float(timeout))
                    phases = {label: counts.to_wire() for label, counts in run.tally.phases.items()}
                    conn.send(("drained", phases, run.queued()))
                case ("versions", dict(versions)):
                    run.propagation.versions = versions
                case _:
                    raise CliError(f"a load worker got a command it does not know: {command!r}")
    finally:
        await run.close()
        loop.remove_reader(conn.fileno())
    result: WorkerResult = {
        "tally": run.tally.to_wire(),
        "propagation": run.propagation,
        "holding": run.propagation.holding(run.terminals),
        "published": sum(u.stats.published for u in run.uplinks),
        "generated": run.generated,
        "acked": run.acked,
        "rejected": run.rejected,
        "connected": run.connected(),
        "queued": run.queued(),
        "connect_seconds": run.connect_seconds,
    }
    conn.send(("result", result))


# --- in the parent ------------------------------------------------------------------------------------------


class WorkerPool:
    """The worker processes of a run, seen from the parent: ``send`` to all, ``expect`` an answer from each, and
    the latest progress of each (``progress``). Use as an async context manager: the workers stop on the way
    out whatever happened."""

    def __init__(self, specs: list[WorkerSpec]) -> None:
        self.specs = specs
        self.progress: list[ProgressWire | None] = [None] * len(specs)
        self.fresh = False  # a worker reported since merged_progress was last taken
        self._inboxes: list[asyncio.Queue[tuple[Any, ...]]] = [asyncio.Queue() for _ in specs]
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []

    async def __aenter__(self) -> WorkerPool:
        # spawn, not fork: a fresh interpreter without the parent's event loop, broker or threads
        context = multiprocessing.get_context("spawn")
        loop = asyncio.get_running_loop()
        for k, spec in enumerate(self.specs):
            mine, theirs = context.Pipe()
            proc = context.Process(target=worker_main, args=(spec, theirs), name=f"yikatong-load-{k}", daemon=True)
            proc.start()  # from this thread: the worker's parent-death signal follows the thread that started it
            theirs.close()
            self._conns.append(mine)
            self._procs.append(proc)
            loop.add_reader(mine.fileno(), self._receive, k)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        loop = asyncio.get_running_loop()
        for conn in self._conns:
            loop.remove_reader(conn.fileno())
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            await asyncio.to_thread(proc.join, 10)
            if proc.is_alive():
                proc.kill()
        for conn in self._conns:
            conn.close()

    def _receive(self, k: int) -> None:
        try:
            message = self._conns[k].recv()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self._conns[k].fileno())
            code = self._procs[k].exitcode
            message = ("error", f"load worker {k} ended unexpectedly (exit code {code})")
        if message[0] == "progress":
            self.progress[k] = message[1]
            self.fresh = True
        else:
            self._inboxes[k].put_nowait(message)

    def send(self, *message: object) -> None:
        """The same command to every worker."""
        for conn in self._conns:
            conn.send(message)

    async def expect(self, kind: str) -> list[tuple[Any, ...]]:
        """The next message of each worker, which must be ``kind`` (a worker's error is raised as ``CliError``)."""
        out = []
        for inbox in self._inboxes:
            message = await inbox.get()
            if message[0] == "error":
                raise CliError(str(message[1]))
            if message[0] != kind:
                raise CliError(f"a load worker answered {message[0]!r} where {kind!r} was due")
            out.append(message)
        return out

    def merged_progress(self) -> Progress | None:
        """Every worker's latest progress as one (None before each has reported); the last second is the latest
        that every worker has reported."""
        reports = [p for p in self.progress if p is not None]
        if len(reports) < len(self.progress):
            return None
        self.fresh = False
        seconds = [
            p["last"] for p in reports if p["last"] is not None and p["second"] == min(r["second"] for r in reports)
        ]
        last = None
        for wire in seconds:
            last = last or Counts()
            last.add(Counts.from_wire(wire))
        return Progress(
            max(p["elapsed"] for p in reports),
            min((p["phase"] for p in reports), key=("connecting", "load", "draining").index),
            sum(p["connected"] for p in reports),
            sum(p["terminals"] for p in reports),
            sum(p["generated"] for p in reports),
            sum(p["acked"] for p in reports),
            sum(p["rejected"] for p in reports),
            sum(p["queued"] for p in reports),
            max(p["lag"] for p in reports),
            sum(p["late"] for p in reports),
            last,
        )


@dataclass
class Merged:
    """The workers' results as one."""

    tally: Tally
    propagation: Propagation
    holding: list[float]
    published: int
    generated: int
    acked: int
    rejected: int
    connected: int
    queued: int
    connect_seconds: float


def merge(results: list[WorkerResult]) -> Merged:
    """Add up the workers' results (the propagation's add-side fields are the caller's)."""
    tally, propagation, holding = Tally(), Propagation(), []
    for result in results:
        tally.add(Tally.from_wire(result["tally"]))
        propagation.add(result["propagation"])
        holding += result["holding"]
    return Merged(
        tally,
        propagation,
        holding,
        sum(r["published"] for r in results),
        sum(r["generated"] for r in results),
        sum(r["acked"] for r in results),
        sum(r["rejected"] for r in results),
        sum(r["connected"] for r in results),
        sum(r["queued"] for r in results),
        max(r["connect_seconds"] for r in results),
    )
