"""Benchmark: a terminal's taps with the durable outbox (journal + record, fsync'd) beside the bare purchase
flow, and how fast a backlog drains over MQTT to a clearing that acks (Mosquitto, and the embedded amqtt).

    python3 bench/terminal_bench.py [--taps 2000] [--backlog 5000] [--broker mqtt://127.0.0.1:1883]

Not a test: it prints figures, it asserts nothing. The acking clearing here is a minimal stand-in (parse,
ack through the highest seq), so the drain rate is the terminal side's and the broker's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import tempfile
import time
from pathlib import Path

from cardsim.crypto import Algorithm
from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from cardsim.personalise import CardRequest, issue_cpu_card
from cardsim.psam import Psam, PsamState
from cardsim.purse import PurseCard
from terminals.flows import purchase
from terminals.messages import Ack, parse_record, parse_uplink
from terminals.mqtt import BrokerUrl, embedded_broker
from terminals.outbox import Outbox
from terminals.reader import InProcessReader
from terminals.terminal import Terminal, TerminalConfig, TerminalKind
from terminals.uplink import Uplink

KEYS = IssuerKeyStore.test_set()
WHEN = dt.datetime(2026, 11, 24, 8, 15, 2)


def new_card(seq: int) -> PurseCard:
    req = CardRequest("4510", Algorithm.SM4, 10**8, seq, dt.date(2026, 1, 1), dt.date(2036, 1, 1), max_balance=10**8)
    return PurseCard(issue_cpu_card(KEYS, req), os.urandom)


def bare_flow(n: int) -> float:
    psam = InProcessReader(Psam(PsamState(bytes(10), bytes.fromhex("451000000001"), KEYS.for_psam())))
    card = InProcessReader(new_card(1))
    card.connect()
    start = time.perf_counter()
    for _ in range(n):
        purchase(card, psam, bytes.fromhex("451000000001"), 1, WHEN)
    return n / (time.perf_counter() - start)


def terminal(folder: Path, number: str) -> Terminal:
    config = TerminalConfig("4510", TerminalKind.BUS, bytes.fromhex(number), 1)
    return Terminal(config, Outbox(folder / f"{number}.sqlite"), KEYS, host=IssuerHost(KEYS))


def durable_taps(folder: Path, n: int) -> tuple[float, Terminal]:
    term = terminal(folder, "451000000001")
    card = new_card(2)
    start = time.perf_counter()
    for _ in range(n):
        assert term.tap(InProcessReader(card)).ok
    return n / (time.perf_counter() - start), term


async def acking_clearing(broker: BrokerUrl) -> None:
    async with broker.client("bench-clearing", clean_session=True) as client:
        await client.subscribe("yikatong/+/txn/+", qos=1)
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            docs = parse_uplink(message.payload)
            seqs = [parse_record(d).seq for d in docs]
            number = message.topic.value.rsplit("/", 1)[1]
            ack = Ack.model_validate({"schema": "yikatong.ack/1", "terminal": number, "acked_through": max(seqs)})
            await client.publish(f"yikatong/4510/ack/{number}", ack.to_json(), qos=1)


async def drain(broker: BrokerUrl, term: Terminal) -> float:
    backlog = term.outbox.counts().queued
    clearing = asyncio.create_task(acking_clearing(broker))
    await asyncio.sleep(0.3)
    uplink = Uplink(broker, term)
    start = time.perf_counter()
    done = await uplink.run_until(uplink.all_acked, 600)
    elapsed = time.perf_counter() - start
    clearing.cancel()
    await asyncio.gather(clearing, return_exceptions=True)
    return backlog / elapsed if done else float("nan")


async def drains(folder: Path, backlog: int, broker: BrokerUrl) -> list[tuple[str, float]]:
    results = []
    for name in ("mosquitto", "amqtt"):
        term = terminal(folder, f"4510{os.urandom(4).hex().upper()}")
        card = new_card(3)
        for _ in range(backlog):
            term.tap(InProcessReader(card))
        if name == "mosquitto":
            results.append((f"{name} {broker}", await drain(broker, term)))
        else:
            async with embedded_broker() as embedded:
                results.append((f"{name} (embedded)", await drain(embedded, term)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--taps", type=int, default=2000)
    parser.add_argument("--backlog", type=int, default=5000)
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bare = bare_flow(args.taps)
        durable, _ = durable_taps(folder, args.taps)
        print(f"taps ({args.taps}, one thread):")
        print(f"  bare purchase flow          {bare:10,.0f} /s")
        print(
            f"  terminal tap, durable outbox{durable:10,.0f} /s   ({bare / durable:.1f}x slower: two fsync'd commits)"
        )
        print(f"backlog drain ({args.backlog} records, batches of 100, acked by a stand-in clearing):")
        for name, rate in asyncio.run(drains(folder, args.backlog, BrokerUrl.parse(args.broker))):
            print(f"  {name:<32}{rate:10,.0f} records/s")


if __name__ == "__main__":
    main()
