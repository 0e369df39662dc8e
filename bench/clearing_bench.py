"""Benchmark: the clearing's ingest beside its limits, in one run, on Mosquitto + SQLite and Mosquitto +
PostgreSQL.

    python3 bench/clearing_bench.py [--records 20000] [--terminals 20] [--batch 100] [--commit 5000]
        [--workers 2] [--repeat 3] [--rate 500] [--seconds 10] [--broker mqtt://127.0.0.1:1883]
        [--pg postgresql+asyncpg://postgres@127.0.0.1:5432/postgres] [--clearing-code DIR]

For 100-record messages (``--batch``) and for 1-record messages it prints, as records/s:
- the raw pipe: this process publishes the payloads (QoS 1, each PUBACK awaited) to a plain aiomqtt subscriber in
  another process; from the first publish to the last message received;
- the irreducible parts measured alone: the batched TAC verification (``clearing.verify.tac_problems``) of the
  records, and the ledger's bulk insert of their rows into the same database, ``--commit`` records per
  transaction; and their sum (the ceiling: 1 / (1/tac + 1/insert));
- full ingest: the same publisher, and a real ``yikatong clearing serve`` process (on PostgreSQL also
  ``--workers`` of them behind a shared subscription); from the first publish until every terminal is acked
  through its last seq. Beside it its ratio to the ceiling and to the raw pipe, and the CPU the clearing
  process(es) and the PostgreSQL server spent per record (µs; robust when the machine is busy).
Then the publish -> ack latency of 1-record messages at a fixed offered load (``--rate``).

``--clearing-code DIR`` runs the clearing processes from another source tree, to measure a before with the same
bench: ``mkdir /tmp/before && git archive 018911e | tar -x -C /tmp/before`` then ``--clearing-code /tmp/before``
(the parts alone are measured with this tree's code either way).

Each figure is the best of ``--repeat`` runs (other work on the machine only ever slows a run down). Not a test: it
prints figures and asserts nothing. Each database is new (the PostgreSQL ones are dropped after);
each ingest run has new cards, so nothing is a duplicate.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import multiprocessing
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import asyncpg

from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from clearing.db import migrate, open_engine
from clearing.intake import Accepted, Intake, Topic
from clearing.ledger import bulk_insert, ledger_row
from clearing.schema import SOURCE_TERMINAL
from clearing.verify import tac_problems
from terminals.messages import TxnRecord, batch_payload, parse_ack, txn_topic
from terminals.mqtt import BrokerUrl
from yikatong.synthetic import SyntheticTerminal, synthetic_cards

CITY = "4560"
HOST = IssuerHost(IssuerKeyStore.test_set())
START = dt.datetime(2026, 11, 24, 6, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Message:
    terminal: str
    seq: int  # the last seq in it
    payload: str
    records: int


def make_stream(records: int, terminals: int, batch: int) -> list[Message]:
    """Messages of ``batch`` records each, terminals interleaved like a busy city; new cards every call."""
    cards = synthetic_cards(max(200, terminals * 5), [CITY], seed=secrets.randbits(32))
    numbers = [CITY + secrets.token_hex(4).upper() for _ in range(terminals)]
    makers = [SyntheticTerminal(HOST, CITY, n, START) for n in numbers]
    per_terminal = records // terminals
    stream = []
    for start in range(0, per_terminal, batch):
        for index, maker in enumerate(makers):
            docs = [
                maker.purchase(cards[(index * 7919 + i) % len(cards)], 200).to_json()
                for i in range(start, min(start + batch, per_terminal))
            ]
            payload = docs[0] if len(docs) == 1 else batch_payload(docs)
            stream.append(Message(maker.terminal, maker.seq, payload, len(docs)))
    return stream


def records_of(stream: list[Message]) -> list[TxnRecord]:
    intake = Intake(CITY, HOST)
    out = []
    for message in stream:
        for verdict in intake.message(Topic("terminal", message.terminal), message.payload.encode(), frozenset()):
            assert isinstance(verdict, Accepted), verdict
            out.append(verdict.record)
    return out


# --- the raw pipe ------------------------------------------------------------------------------------------------


def _raw_subscriber(url: str, topic: str, messages: int, pipe: Connection) -> None:
    """In a process of its own: subscribe, say so, receive ``messages`` messages, send back when the last came."""

    async def run() -> None:
        broker = BrokerUrl.parse(url)
        async with broker.client(f"bench-raw-sub-{secrets.token_hex(3)}", clean_session=True) as sub:
            await sub.subscribe(topic, qos=1)
            pipe.send("ready")
            got = 0
            async for _ in sub.messages:
                got += 1
                if got == messages:
                    pipe.send(time.time())
                    return

    asyncio.run(run())


async def publish_all(broker: BrokerUrl, stream: list[Message], topic_of: dict[str, str]) -> float:
    """Publish the stream (QoS 1, in order, each PUBACK awaited); the wall time of the first publish."""
    async with broker.client(f"bench-pub-{secrets.token_hex(3)}", clean_session=True) as pub:
        started = time.time()
        for message in stream:
            await pub.publish(topic_of[message.terminal], message.payload, qos=1)
        return started


async def raw_pipe(broker: BrokerUrl, stream: list[Message]) -> float:
    """Records/s from the first QoS 1 publish to the last message received by a plain aiomqtt subscriber."""
    tag = secrets.token_hex(3)
    mine, theirs = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_raw_subscriber, args=(str(broker), f"bench/{tag}/+", len(stream), theirs)
    )
    process.start()
    try:
        assert await asyncio.to_thread(mine.recv) == "ready"
        started = await publish_all(broker, stream, {m.terminal: f"bench/{tag}/{m.terminal}" for m in stream})
        last: float = await asyncio.to_thread(mine.recv)
        return sum(m.records for m in stream) / (last - started)
    finally:
        process.join(10)


# --- the irreducible parts alone ---------------------------------------------------------------------------------


def tac_alone(records: list[TxnRecord]) -> float:
    """Records/s of the batched TAC verification alone."""
    started = time.perf_counter()
    problems = tac_problems(HOST, records)
    elapsed = time.perf_counter() - started
    assert not any(problems)
    return len(records) / elapsed


async def insert_alone(db: str, records: list[TxnRecord], commit: int) -> float:
    """Records/s of the ledger's bulk insert alone (rows made beforehand), ``commit`` records per transaction."""
    now = time.time()
    rows = [ledger_row(CITY, Accepted(r, forward=False), SOURCE_TERMINAL, now) for r in records]
    engine = open_engine(db)
    await migrate(engine)
    try:
        started = time.perf_counter()
        for start in range(0, len(rows), commit):
            async with engine.begin() as connection:
                assert await bulk_insert(connection, rows[start : start + commit]) == len(rows[start : start + commit])
        return len(rows) / (time.perf_counter() - started)
    finally:
        await engine.dispose()


# --- full ingest: real clearing processes ------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def clearing_processes(
    broker: BrokerUrl, db: str, workers: int, folder: Path, code: Path | None
) -> AsyncIterator[list[int]]:
    """``workers`` ``yikatong clearing serve`` processes (shared subscription when more than one; from the source
    tree ``code`` when given), waited for until each is connected; their pids. Stopped afterwards."""
    env = os.environ if code is None else {**os.environ, "PYTHONPATH": str(code.resolve())}
    procs = []
    logs = []
    tag = secrets.token_hex(3)
    for index in range(workers):
        log = folder / f"serve-{tag}-{index}.log"
        command = [sys.executable, "-m", "yikatong.cli", "clearing", "serve", "--city", CITY, "--broker", str(broker)]
        command += ["--db", db, "--worker", f"bench-{tag}-{index}", "--report-every", "0"]
        command += ["--shared"] if workers > 1 else []  # one worker: the default MQTT 3.1.1 session, wiped after
        with log.open("w") as out:
            procs.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=code))
        logs.append(log)
    try:
        deadline = time.monotonic() + 60
        for proc, log in zip(procs, logs, strict=True):
            while "connected to" not in log.read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"clearing serve did not start: {log.read_text()}")
                await asyncio.sleep(0.05)
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(20)
        if workers == 1:  # its persistent session would queue the city's records on the broker for ever
            await _forget_session(broker, f"yikatong-clearing-{CITY}-bench-{tag}-0")


async def _forget_session(broker: BrokerUrl, identifier: str) -> None:
    async with broker.client(identifier, clean_session=True):
        pass


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


async def pg_backends(db: str) -> list[int]:
    """The pids of the PostgreSQL server processes serving database ``db``."""
    dsn = db.replace("postgresql+asyncpg://", "postgresql://")
    name = dsn.rsplit("/", 1)[1]
    conn = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/postgres")
    try:
        rows = await conn.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", name)
        return [int(r["pid"]) for r in rows]
    finally:
        await conn.close()


@dataclass(frozen=True)
class Ingest:
    rate: float  # records/s
    clearing_us: float  # CPU µs per record in the clearing process(es)
    server_us: float | None  # CPU µs per record in the PostgreSQL server processes


async def ingest(
    broker: BrokerUrl, db: str, stream: list[Message], workers: int, folder: Path, code: Path | None = None
) -> Ingest:
    """Records/s from the first publish until every terminal is acked through its last seq."""
    total = sum(m.records for m in stream)
    last = {m.terminal: m.seq for m in stream}
    engine = open_engine(db)
    await migrate(engine)  # before the workers start: they would all migrate at once
    await engine.dispose()
    async with clearing_processes(broker, db, workers, folder, code) as pids:
        servers = await pg_backends(db) if db.startswith("postgresql") else []
        async with broker.client(f"bench-acks-{secrets.token_hex(3)}", clean_session=True) as acks:
            await acks.subscribe(f"yikatong/{CITY}/ack/+", qos=1)
            cpu, server_cpu = cpu_seconds(pids), cpu_seconds(servers)
            publisher = asyncio.create_task(publish_all(broker, stream, {t: txn_topic(CITY, t) for t in last}))
            waiting = dict(last)
            async for message in acks.messages:
                ack = parse_ack(message.payload)
                if waiting.get(ack.terminal, 1 << 62) <= ack.acked_through:
                    del waiting[ack.terminal]
                    if not waiting:
                        break
            done = time.time()
            started = await publisher
            used, server_used = cpu_seconds(pids) - cpu, cpu_seconds(servers) - server_cpu
    return Ingest(total / (done - started), used / total * 1e6, server_used / total * 1e6 if servers else None)


# --- latency at a fixed offered load -----------------------------------------------------------------------------


async def latency(
    broker: BrokerUrl, db: str, rate: float, seconds: float, terminals: int, folder: Path, code: Path | None
) -> list[float]:
    """Publish single records at ``rate``/s spread over terminals; seconds from each publish to its ack."""
    stream = make_stream(int(rate * seconds), terminals, 1)
    sent: dict[tuple[str, int], float] = {}
    delays: list[float] = []
    engine = open_engine(db)
    await migrate(engine)
    await engine.dispose()
    async with (
        clearing_processes(broker, db, 1, folder, code),
        broker.client(f"bench-lat-{secrets.token_hex(3)}", clean_session=True) as client,
    ):
        await client.subscribe(f"yikatong/{CITY}/ack/+", qos=1)
        acked: dict[str, int] = {}

        async def receive() -> None:
            async for message in client.messages:
                ack = parse_ack(message.payload)
                now = time.perf_counter()
                for seq in range(acked.get(ack.terminal, 0) + 1, ack.acked_through + 1):
                    delays.append(now - sent.pop((ack.terminal, seq)))
                acked[ack.terminal] = max(acked.get(ack.terminal, 0), ack.acked_through)

        receiver = asyncio.create_task(receive())
        start = time.perf_counter()
        for i, message in enumerate(stream):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[(message.terminal, message.seq)] = time.perf_counter()
            await client.publish(txn_topic(CITY, message.terminal), message.payload, qos=1)
        deadline = time.perf_counter() + 30
        while sent and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        receiver.cancel()
    return delays


@contextlib.asynccontextmanager
async def pg_database(admin_url: str) -> AsyncIterator[str]:
    name = f"yikatong_bench_{secrets.token_hex(3)}"
    dsn = admin_url.replace("postgresql+asyncpg://", "postgresql://")
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 1 else float("nan")


def line(label: str, rate: float, note: str = "") -> None:
    print(f"  {label:<44} {rate:>10,.0f} rec/s  {note}")


async def main(args: argparse.Namespace) -> None:
    broker = BrokerUrl.parse(args.broker)
    folder = Path(tempfile.mkdtemp(prefix="clearing-bench-"))
    code = f"; clearing from {args.clearing_code}" if args.clearing_code else ""
    print(f"clearing ingest on {broker}: {args.terminals} terminals; {os.cpu_count()} cores{code}")
    print(f"each figure the best of {args.repeat} runs; CPU µs per record of the clearing process(es) and PostgreSQL")
    async with contextlib.AsyncExitStack() as stack:

        async def database(store: str) -> str:
            if store == "sqlite":
                return f"sqlite:///{folder / f'{secrets.token_hex(3)}.sqlite'}"
            return await stack.enter_async_context(pg_database(args.pg))

        for batch in (args.batch, 1):
            records = args.records if batch > 1 else args.records // 4
            print(f"\n{batch} record(s) per message, {records:,} records")
            raw = max([await raw_pipe(broker, make_stream(records, args.terminals, batch)) for _ in range(args.repeat)])
            line("raw pipe (aiomqtt QoS 1, subscriber process)", raw)
            sample = records_of(make_stream(records, args.terminals, batch))
            tac = max(tac_alone(sample) for _ in range(args.repeat))
            if batch > 1:
                line("TAC verification alone (batched)", tac)
            for store in ("sqlite", "postgresql"):
                if batch > 1:
                    insert = max(
                        [await insert_alone(await database(store), sample, args.commit) for _ in range(args.repeat)]
                    )
                    ceiling = 1 / (1 / tac + 1 / insert)
                    line(f"{store}: bulk insert alone ({args.commit:,}/commit)", insert)
                    line(f"{store}: ceiling, sum of the two parts", ceiling)
                for workers in (1, args.workers) if store == "postgresql" and args.workers > 1 else (1,):
                    runs = [
                        await ingest(
                            broker,
                            await database(store),
                            make_stream(records, args.terminals, batch),
                            workers,
                            folder,
                            args.clearing_code,
                        )
                        for _ in range(args.repeat)
                    ]
                    got = max(runs, key=lambda run: run.rate)
                    ratios = f"{got.rate / raw:4.2f}x raw"
                    if batch > 1:
                        ratios = f"{got.rate / ceiling:4.2f}x ceiling, " + ratios
                    cpu = f"clearing {got.clearing_us:5.1f} µs/rec"
                    if got.server_us is not None:
                        cpu += f", server {got.server_us:5.1f}"
                    line(
                        f"{store}: ingest, {workers} clearing process{'es' if workers > 1 else ''}",
                        got.rate,
                        f"{ratios}  ({cpu})",
                    )
        print(f"\nlatency, publish -> ack, 1-record messages at {args.rate:.0f} records/s for {args.seconds:.0f} s")
        for store in ("sqlite", "postgresql"):
            db = await database(store)
            delays = await latency(broker, db, args.rate, args.seconds, args.terminals, folder, args.clearing_code)
            print(
                f"  {store:<11} {len(delays):>6,} acked   p50 {pct(delays, 50):6.1f} ms   p99 {pct(delays, 99):6.1f} ms"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--terminals", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100, help="records per message of the batched run")
    parser.add_argument("--commit", type=int, default=5000, help="records per transaction of the insert alone")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shared clearing processes (PG)")
    parser.add_argument("--rate", type=float, default=500.0, help="offered load of the latency run, records/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each figure, the best printed (default 3)")
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--pg", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--clearing-code", type=Path, help="run the clearing processes from this source tree")
    asyncio.run(main(parser.parse_args()))
