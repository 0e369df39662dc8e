"""Benchmark: the clearing's sustained ingest (records verified, committed and acked per second) on Mosquitto +
SQLite and Mosquitto + PostgreSQL, printed beside the raw aiomqtt QoS 1 publish->receive rate of the same
payloads on the same broker in the same run; then the end-to-end latency (publish -> ack) at a fixed offered load.

    python3 bench/clearing_bench.py [--records 20000] [--terminals 20] [--batch 100] [--rate 500] [--seconds 10]
        [--broker mqtt://127.0.0.1:1883] [--pg postgresql+asyncpg://postgres@127.0.0.1/postgres]

Not a test: it prints figures and asserts nothing. Publisher, broker client and clearing share this process
(one core), as the raw pipe's publisher and subscriber do, so the ratio compares like with like.
The PostgreSQL run uses a new database that is dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg

from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from clearing.db import migrate, open_engine
from clearing.intake import Intake
from clearing.ledger import Ledger
from clearing.service import ClearingService
from terminals.messages import ack_topic, batch_payload, parse_ack, txn_topic
from terminals.mqtt import BrokerUrl
from yikatong.synthetic import SyntheticTerminal, synthetic_cards

CITY = "4560"
HOST = IssuerHost(IssuerKeyStore.test_set())
START = dt.datetime(2026, 11, 24, 6, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))


def make_stream(records: int, terminals: int, batch: int) -> list[tuple[str, int, str, int]]:
    """(terminal, last seq in the message, payload, records in it), terminals interleaved like a busy city."""
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
            stream.append((maker.terminal, maker.seq, payload, len(docs)))
    return stream


async def raw_pipe(broker: BrokerUrl, stream: list[tuple[str, int, str, int]]) -> float:
    """Records/s from the first QoS 1 publish to the last message received by a plain aiomqtt subscriber."""
    total = sum(n for *_, n in stream)
    async with (
        broker.client(f"bench-raw-sub-{secrets.token_hex(3)}", clean_session=True) as sub,
        broker.client(f"bench-raw-pub-{secrets.token_hex(3)}", clean_session=True) as pub,
    ):
        tag = secrets.token_hex(3)
        await sub.subscribe(f"bench/{tag}/+", qos=1)
        sizes = {payload: n for _, _, payload, n in stream}
        start = time.perf_counter()

        async def publish() -> None:
            for terminal, _, payload, _ in stream:
                await pub.publish(f"bench/{tag}/{terminal}", payload, qos=1)

        publisher = asyncio.create_task(publish())
        got = 0
        async for message in sub.messages:
            got += sizes[message.payload.decode()] if isinstance(message.payload, bytes) else 1
            if got >= total:
                break
        await publisher
        return total / (time.perf_counter() - start)


@contextlib.asynccontextmanager
async def clearing_on(broker: BrokerUrl, db: str) -> AsyncIterator[ClearingService]:
    engine = open_engine(db)
    await migrate(engine)
    service = ClearingService(
        broker, Ledger(engine, CITY), Intake(CITY, HOST), worker=secrets.token_hex(3), persistent=False
    )
    task = asyncio.create_task(service.run())
    while not service.stats.connected:
        await asyncio.sleep(0.02)
    try:
        yield service
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await engine.dispose()


async def ingest(broker: BrokerUrl, db: str, stream: list[tuple[str, int, str, int]]) -> tuple[float, int]:
    """Records/s from the first publish until every terminal is acked through its last seq; and rows stored."""
    total = sum(n for *_, n in stream)
    last = {}
    for terminal, seq, _, _ in stream:
        last[terminal] = seq
    async with (
        clearing_on(broker, db) as service,
        broker.client(f"bench-pub-{secrets.token_hex(3)}", clean_session=True) as pub,
    ):
        await pub.subscribe(f"yikatong/{CITY}/ack/+", qos=1)
        start = time.perf_counter()

        async def publish() -> None:
            for terminal, _, payload, _ in stream:
                await pub.publish(txn_topic(CITY, terminal), payload, qos=1)

        publisher = asyncio.create_task(publish())
        waiting = dict(last)
        async for message in pub.messages:
            ack = parse_ack(message.payload)  # type: ignore[arg-type]
            if waiting.get(ack.terminal, 1 << 62) <= ack.acked_through:
                del waiting[ack.terminal]
                if not waiting:
                    break
        await publisher
        rate = total / (time.perf_counter() - start)
        return rate, service.stats.stored


async def latency(broker: BrokerUrl, db: str, rate: float, seconds: float, terminals: int) -> list[float]:
    """Publish single records at ``rate``/s spread over terminals; seconds from each publish to its ack."""
    count = int(rate * seconds)
    stream = make_stream(count, terminals, 1)
    sent: dict[tuple[str, int], float] = {}
    delays: list[float] = []
    async with clearing_on(broker, db), broker.client(f"bench-lat-{secrets.token_hex(3)}", clean_session=True) as c:
        await c.subscribe(f"yikatong/{CITY}/ack/+", qos=1)
        acked: dict[str, int] = {}

        async def receive() -> None:
            async for message in c.messages:
                ack = parse_ack(message.payload)  # type: ignore[arg-type]
                now = time.perf_counter()
                for seq in range(acked.get(ack.terminal, 0) + 1, ack.acked_through + 1):
                    delays.append(now - sent.pop((ack.terminal, seq)))
                acked[ack.terminal] = max(acked.get(ack.terminal, 0), ack.acked_through)

        receiver = asyncio.create_task(receive())
        start = time.perf_counter()
        for i, (terminal, seq, payload, _) in enumerate(stream):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent[(terminal, seq)] = time.perf_counter()
            await c.publish(ack_topic(CITY, terminal).replace("/ack/", "/txn/"), payload, qos=1)
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


async def main(args: argparse.Namespace) -> None:
    broker = BrokerUrl.parse(args.broker)
    folder = Path(tempfile.mkdtemp(prefix="clearing-bench-"))
    print(f"clearing ingest on {broker}: {args.records:,} records from {args.terminals} terminals")
    print(f"{'payload':<22} {'raw pipe rec/s':>15} {'store':<11} {'ingest rec/s':>13} {'ingest/raw':>11}")
    async with pg_database(args.pg) as pg:
        for batch in (args.batch, 1):
            records = args.records if batch > 1 else args.records // 4
            stream = make_stream(records, args.terminals, batch)
            raw = await raw_pipe(broker, stream)
            for store, db in (("sqlite", f"sqlite:///{folder / f'b{batch}.sqlite'}"), ("postgresql", pg)):
                stream = make_stream(records, args.terminals, batch)  # new cards: nothing is a duplicate
                rate, stored = await ingest(broker, db, stream)
                label = f"{batch} record(s)/message"
                print(
                    f"{label:<22} {raw:>15,.0f} {store:<11} {rate:>13,.0f} {rate / raw:>10.2f}x"
                    f"{'' if stored == len(stream) * batch or batch == 1 else '  (stored ' + str(stored) + ')'}"
                )
        print(
            f"\nlatency, publish -> ack, single-record messages at {args.rate:.0f} records/s for {args.seconds:.0f} s"
        )
        for store, db in (("sqlite", f"sqlite:///{folder / 'lat.sqlite'}"), ("postgresql", pg)):
            delays = await latency(broker, db, args.rate, args.seconds, args.terminals)
            print(
                f"  {store:<11} {len(delays):>6,} acked   p50 {pct(delays, 50):6.1f} ms   p99 {pct(delays, 99):6.1f} ms"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--terminals", type=int, default=20)
    parser.add_argument("--batch", type=int, default=100, help="records per message of the batched run")
    parser.add_argument("--rate", type=float, default=500.0, help="offered load of the latency run, records/s")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--pg", default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres")
    asyncio.run(main(parser.parse_args()))
