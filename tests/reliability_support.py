"""Helpers of the reliability scenarios: a private Mosquitto that keeps its sessions over a restart, the
`yikatong load` process with per-terminal state files, a TCP proxy that can cut a terminal off the network,
CPU cards, and the check every scenario ends with: the ledger holds exactly the records the terminals
completed (seq 1 up to each outbox's next seq), each once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mqtt_support import PrivateMosquitto
from sqlalchemy import func, select
from support import new_state

from cardsim.crypto import Algorithm
from cardsim.purse import PurseCard
from clearing.db import open_engine
from clearing.ledger import LEDGER, QUARANTINE
from clearing.schema import FORWARD_PENDING, SOURCE_INTEROP, SOURCE_TERMINAL
from terminals.mqtt import BrokerUrl, free_port
from terminals.outbox import Outbox
from terminals.terminal import Terminal

Completed = set[tuple[str, int]]
"""(terminal, seq) of records the terminals completed."""


# --- cards and terminals ---------------------------------------------------------------------------------


def cpu_card(sequence: int, alg: Algorithm = Algorithm.SM4, city: str = "4510") -> PurseCard:
    """A CPU purse card of ``city`` with its own serial (``sequence``): no two terminals share a card."""
    card = PurseCard(new_state(alg, 100_000, city, sequence), random.Random(sequence).randbytes)
    card.power_on()
    return card


def completed(terminal: Terminal) -> Completed:
    """Every record the terminal completed, as (terminal, seq): seq 1 up to its outbox's next seq."""
    return {(terminal.terminal_hex, seq) for seq in range(1, terminal.outbox.counts().next_seq)}


# --- what the clearing database holds --------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One ledger row, as much of it as the checks need."""

    terminal: str
    seq: int
    identity: tuple[str, str, str, int]  # issuer, card, kind, card counter
    acquirer: str
    source: str
    forward: str | None


@dataclass(frozen=True)
class Quarantined:
    """One quarantine row."""

    topic: str
    terminal: str | None
    seq: int | None
    reason: str
    payload: bytes
    size: int


@dataclass
class LedgerView:
    """What the clearing database holds for one city."""

    rows: list[Row]
    quarantine: list[Quarantined] = field(default_factory=list)

    def terminal_rows(self) -> list[tuple[str, int]]:
        """(terminal, seq) of every row from the city's own terminals."""
        return [(r.terminal, r.seq) for r in self.rows if r.source == SOURCE_TERMINAL]

    @property
    def doubled(self) -> int:
        """Rows beyond the first of a (terminal, seq) or of a record identity."""
        keys = self.terminal_rows()
        identities = [r.identity for r in self.rows]
        return max(len(keys) - len(set(keys)), len(identities) - len(set(identities)))


async def ledger_view(db: str, city: str) -> LedgerView:
    """The ledger and quarantine rows of ``city`` in the clearing database ``db``."""
    engine = open_engine(db)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(
                    LEDGER.c.terminal,
                    LEDGER.c.seq,
                    LEDGER.c.issuer,
                    LEDGER.c.card,
                    LEDGER.c.kind,
                    LEDGER.c.card_counter,
                    LEDGER.c.acquirer,
                    LEDGER.c.source,
                    LEDGER.c.forward,
                ).where(LEDGER.c.city == city)
            )
            quarantine = await conn.execute(
                select(
                    QUARANTINE.c.topic,
                    QUARANTINE.c.terminal,
                    QUARANTINE.c.seq,
                    QUARANTINE.c.reason,
                    QUARANTINE.c.payload,
                    QUARANTINE.c.size,
                ).where(QUARANTINE.c.city == city)
            )
            return LedgerView(
                [
                    Row(str(t), int(s), (str(i), str(c), str(k), int(n)), str(a), str(src), fwd)
                    for t, s, i, c, k, n, a, src, fwd in rows.all()
                ],
                [
                    Quarantined(str(t), term, seq, str(r), bytes(p), int(z))
                    for t, term, seq, r, p, z in quarantine.all()
                ],
            )
    finally:
        await engine.dispose()


async def ledger_size(db: str, city: str) -> int:
    """Rows of ``city``'s own terminals in the ledger."""
    engine = open_engine(db)
    try:
        async with engine.connect() as conn:
            query = select(func.count()).where(LEDGER.c.city == city, LEDGER.c.source == SOURCE_TERMINAL)
            return int((await conn.execute(query)).scalar_one())
    finally:
        await engine.dispose()


async def wait_for(check: Callable[[], Any], what: str, timeout: float = 60.0) -> None:
    """Poll ``check()`` (a function, or one returning an awaitable) until it is true; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"not reached in {timeout:.0f} s: {what}"
        await asyncio.sleep(0.1)


@dataclass
class Tally:
    """The outcome of comparing the records completed with the ledger."""

    records: int
    in_ledger: int
    doubled: int
    lost: list[tuple[str, int]]
    extra: list[tuple[str, int]]

    def line(self, scenario: str, terminals: int, *more: str) -> str:
        """``scenario: N terminals, M records completed, K in ledger, D doubled, ...``."""
        noun = "terminal" if terminals == 1 else "terminals"
        head = f"{scenario}: {terminals} {noun}, {self.records} records completed, {self.in_ledger} in ledger"
        return ", ".join([head, f"{self.doubled} doubled", *more])

    def check(self, summary: str) -> None:
        """None lost, none extra, none doubled."""
        assert not self.lost and not self.extra, (
            f"{summary}; lost ({len(self.lost)}): {self.lost[:10]}, extra ({len(self.extra)}): {self.extra[:10]}"
        )
        assert self.doubled == 0 and self.in_ledger == self.records, summary


def tally(done: Completed, views: Iterable[LedgerView]) -> Tally:
    """Compare the completed records with the terminal rows of the cities' ledgers."""
    rows: list[tuple[str, int]] = []
    doubled = 0
    for view in views:
        rows += view.terminal_rows()
        doubled += view.doubled
    stored = set(rows)
    return Tally(len(done), len(rows), doubled, sorted(done - stored), sorted(stored - done))


def interop_check(views: dict[str, LedgerView]) -> int:
    """Each record of another city's card is in its issuer's ledger once (source interop) and its forward was
    answered; how many were forwarded."""
    forwarded = 0
    for city, view in views.items():
        foreign = {r.identity for r in view.rows if r.source == SOURCE_TERMINAL and r.identity[0] != city}
        pending = [r for r in view.rows if r.forward == FORWARD_PENDING]
        assert not pending, f"{len(pending)} forwards of {city} still unanswered"
        for issuer, other in views.items():
            if issuer == city:
                continue
            sent = {i for i in foreign if i[0] == issuer}
            got = [r.identity for r in other.rows if r.source == SOURCE_INTEROP and r.acquirer == city]
            assert len(got) == len(set(got)), f"{issuer} stored a forward of {city} twice"
            assert set(got) == sent, (
                f"forwards {city}->{issuer}: {len(sent)} sent, {len(got)} stored; "
                f"missing {sorted(sent - set(got))[:5]}, extra {sorted(set(got) - sent)[:5]}"
            )
            forwarded += len(sent)
    return forwarded


# --- the broker -------------------------------------------------------------------------------------------


class DurableMosquitto(PrivateMosquitto):
    """A private Mosquitto that keeps its sessions and queued messages over a graceful restart.

    Started as root without a ``user`` line, Mosquitto drops to its ``mosquitto`` user, which cannot write its
    persistence file into pytest's root-only folders: every session would be forgotten at a restart. So the
    configuration always says ``user root`` (keep the user it was started as; ignored when not root)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        conf = self.conf.read_text()
        if "\nuser " not in conf:
            self.conf.write_text(conf + "user root\n")
        self.folder = folder
        self.restarts = 0

    @property
    def persistence_file(self) -> Path:
        return self.folder / "mosquitto.db"

    def terminate(self) -> None:
        """Stop gracefully (SIGTERM): Mosquitto writes its sessions to the persistence file."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)
            self.proc = None

    def restart(self, *, graceful: bool, down: float = 1.0) -> None:
        """SIGTERM (sessions saved) or SIGKILL (whatever was in memory is gone), ``down`` seconds, start."""
        if graceful:
            self.terminate()
        else:
            self.stop()
        time.sleep(down)
        self.start()
        self.restarts += 1


@contextlib.contextmanager
def durable_mosquitto(folder: Path) -> Iterator[DurableMosquitto]:
    folder.mkdir(parents=True, exist_ok=True)
    broker = DurableMosquitto(folder)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


async def session_survives_restart(broker: DurableMosquitto) -> bool:
    """Restart ``broker`` gracefully and tell whether a persistent session survived it: a client subscribes with
    a persistent session and leaves; after the restart a QoS 1 message is published on its topic, and the client
    comes back without subscribing again: it gets the message only if the broker restored its session."""
    client_id = f"persistence-probe-{secrets.token_hex(3)}"
    topic = f"probe/{client_id}"
    async with broker.url.client(client_id) as probe:
        await probe.subscribe(topic, qos=1)
    await asyncio.to_thread(broker.restart, graceful=True, down=0.5)
    assert broker.persistence_file.exists(), f"Mosquitto wrote no {broker.persistence_file} when stopped"
    async with broker.url.client(f"probe-publisher-{secrets.token_hex(3)}", clean_session=True) as publisher:
        await publisher.publish(topic, b"still subscribed", qos=1)
    async with broker.url.client(client_id) as probe:  # the persistent session again, no subscribe
        try:
            async with asyncio.timeout(10):
                async for message in probe.messages:
                    return message.payload == b"still subscribed"
        except TimeoutError:
            return False
    return False


# --- the load generator as a process ---------------------------------------------------------------------


@dataclass
class LoadProcess:
    """A running `yikatong load` with ``--state-dir``; as a context manager, killed on the way out if it still
    runs."""

    proc: subprocess.Popen[bytes]
    out: Path
    state: Path

    @property
    def log(self) -> Path:
        return self.out / "load.log"

    def __enter__(self) -> LoadProcess:
        return self

    def __exit__(self, *_exc: object) -> None:
        """A run the test left behind (it failed early) is killed, not left to run out its duration."""
        if self.running():
            self.kill()

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    async def finish(self, timeout: float = 150.0) -> dict[str, Any]:
        """Wait for the run to end; it must exit 0 (every record acked, none rejected). Its summary."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"yikatong load did not finish in {timeout:.0f} s:\n{self.tail()}")
            await asyncio.sleep(0.2)
        summary = self.out / "load-summary.json"
        assert summary.exists(), f"yikatong load exited {self.proc.returncode} without a summary:\n{self.tail()}"
        doc: dict[str, Any] = json.loads(summary.read_text())
        assert self.proc.returncode == 0, (
            f"yikatong load exited {self.proc.returncode}: {doc['generated']} made, {doc['acked']} acked, "
            f"{doc['rejected']} rejected, {doc['unacked']} unacked\n{self.tail()}"
        )
        return doc


def start_load(
    broker: BrokerUrl,
    state: Path,
    out: Path,
    *,
    terminals: int,
    cities: str,
    rate: float,
    duration: float,
    seed: int,
    cards: int = 200,
    drain: float = 90.0,
) -> LoadProcess:
    """`yikatong load` against ``broker`` with the terminals' outboxes in ``state`` and no clearing of its own."""
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "yikatong.cli", "load", "--broker", str(broker), "--external-clearing"]
    command += ["--terminals", str(terminals), "--cards", str(cards), "--cities", cities, "--rate", str(rate)]
    command += ["--duration", str(duration), "--seed", str(seed), "--drain", str(drain), "--connect-timeout", "60"]
    command += ["--state-dir", str(state), "--out", str(out)]
    with (out / "load.log").open("wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    return LoadProcess(proc, out, state)


def roster(state: Path) -> list[tuple[str, str]]:
    """The (city, terminal number) pairs of a state folder."""
    return [(str(city), str(number)) for city, number in json.loads((state / "terminals.json").read_text())]


@dataclass
class Outboxes:
    """What the terminals' state files of a load run say."""

    completed: dict[str, Completed]  # by city
    queued: int
    rejected: int

    @property
    def records(self) -> int:
        return sum(len(c) for c in self.completed.values())

    def all(self) -> Completed:
        return set().union(*self.completed.values())


def read_outboxes(state: Path) -> Outboxes:
    """Every record each terminal of the roster completed, and what still waits in (or was rejected into) its
    outbox. Read while no load process runs on ``state``."""
    by_city: dict[str, Completed] = {}
    queued = rejected = 0
    for city, number in roster(state):
        path = state / f"terminal-{number}.sqlite"
        assert path.exists(), f"terminal {number} has no state file {path}"
        outbox = Outbox(path)
        try:
            counts = outbox.counts()
        finally:
            outbox.close()
        by_city.setdefault(city, set()).update((number, seq) for seq in range(1, counts.next_seq))
        queued += counts.queued
        rejected += counts.rejected
    return Outboxes(by_city, queued, rejected)


# --- a network between a terminal and the broker that can be cut ---------------------------------------


class CuttableLink:
    """A TCP proxy in front of the broker. ``cut()`` drops every connection through it (RST) and closes the
    listening socket (reconnects are refused); ``restore()`` listens again on the same port."""

    def __init__(self, target: BrokerUrl) -> None:
        self.target = target
        self.port = free_port()
        self.url = BrokerUrl("127.0.0.1", self.port, target.username, target.password)
        self.connections = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def restore(self) -> None:
        """Accept connections (again)."""
        assert self._server is None, "the link is up"
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def cut(self) -> None:
        """Drop every connection and refuse new ones."""
        assert self._server is not None, "the link is already cut"
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None
        self.cuts += 1

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            broker_reader, broker_writer = await asyncio.open_connection(self.target.host, self.target.port)
        except OSError:
            client_writer.transport.abort()
            return
        self.connections += 1
        self._writers |= {client_writer, broker_writer}
        await asyncio.gather(
            self._pipe(client_reader, broker_writer, client_writer),
            self._pipe(broker_reader, client_writer, broker_writer),
        )

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, other: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for end in (writer, other):
                end.transport.abort()
                self._writers.discard(end)
