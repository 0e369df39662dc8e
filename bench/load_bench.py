"""Benchmark: what ``yikatong load`` costs itself, and where the real clearing saturates.

(a) The load generator's own overhead. Its engine (``yikatong.loadgen.LoadRun``: a ``SimTerminal``, outbox and
    ``Uplink`` per terminal, one asyncio loop, exactly what ``yikatong load`` runs) drives 1,000 / 5,000 / 10,000
    terminals in this process at a fixed offered rate; the clearing is a tiny acker in a child process (subscribed
    to ``yikatong/+/txn/+``, it acks each of this run's terminals through the highest seq it got, nothing stored),
    so the clearing costs next to nothing and never holds the load back. CPU time of this process (getrusage) over
    wall time is the cores the load generator uses: while every terminal is connected and idle (no taps; the
    first third of that time left out, while subscriptions settle), and while taps are offered. Hence the idle
    cost per terminal, and terminals per core at that rate (terminals / cores: what one core would drive if the
    cost grew in proportion to the terminals).
(b) End to end with the real clearing: ``yikatong load`` as a child process starting its clearing processes (one
    per city, SQLite files), offered rates stepped with 1,000 terminals, ~20 s each: achieved acked/s and ack
    latency p50/p95/p99 per step, so the saturation point shows; records the terminals sent again because no ack
    came in time (the clearings' duplicates) and the CPU seconds of the load and clearing processes together.

    python3 bench/load_bench.py [--broker private|mqtt://127.0.0.1:1883] [--terminals 1000,5000,10000]
        [--rate 200] [--idle 15] [--seconds 20] [--steps 250,500,1000,2000,3000] [--step-terminals 1000]
        [--step-seconds 20] [--drain 30]

Not a test: it prints figures and asserts nothing. By default the broker is a private Mosquitto on a free port
(no persistence), started and stopped by the bench: other users of the machine's Mosquitto, the sessions earlier
runs left there, and the clearings' fixed MQTT client ids (``yikatong-clearing-CITY-1``, the same for every
``yikatong load``) cannot disturb the figures. With ``--broker URL`` nothing else may run ``yikatong load`` on that
broker meanwhile; the bench forgets the MQTT sessions its terminals leave there afterwards.
All processes share this machine's cores: the figures of (b) include the load generator's own cost from (a).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import re
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from terminals.messages import ACK_SCHEMA, BATCH_SCHEMA, Ack, ack_topic
from terminals.mqtt import BrokerUrl, free_port
from terminals.outbox import MemoryOutbox
from yikatong.load_report import percentiles_ms
from yikatong.loadgen import LoadRun, Plan, Progress, SimTerminal, TimedQueue, terminal_numbers
from yikatong.process import setup_logging
from yikatong.synthetic import SyntheticCard, synthetic_cards

CITIES = ["4510", "4560", "4530"]
HOST = IssuerHost(IssuerKeyStore.test_set())
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_self() -> float:
    """CPU seconds (user + system) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_children() -> float:
    """CPU seconds of the children (and their children) that have ended and been waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pid: int | None) -> float:
    """CPU seconds a running process has used so far (Linux /proc); nan when unknown."""
    if pid is None:
        return float("nan")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


@contextlib.contextmanager
def broker_for(choice: str, folder: Path) -> Iterator[tuple[BrokerUrl, int | None]]:
    """(broker URL, Mosquitto's pid when it is the bench's own)."""
    if choice != "private":
        yield BrokerUrl.parse(choice), None
        return
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mosquitto did not start on port {port}")
            time.sleep(0.05)
        yield BrokerUrl("127.0.0.1", port), proc.pid
    finally:
        proc.kill()
        proc.wait(10)


async def forget_sessions(broker: BrokerUrl, identifiers: list[str], parallel: int = 200) -> None:
    """Connect once with a clean session as each client id: the broker drops what it kept for it."""
    gate = asyncio.Semaphore(parallel)

    async def forget(identifier: str) -> None:
        async with gate:
            with contextlib.suppress(aiomqtt.MqttError):
                async with broker.client(identifier, clean_session=True):
                    pass

    await asyncio.gather(*(forget(i) for i in identifiers))


# --- (a) the load generator's own cost ------------------------------------------------------------------


async def acker(broker: BrokerUrl, roster: Path) -> None:
    """The tiny clearing of part (a): acks each terminal of ``roster`` through the highest seq it got."""
    mine = set(roster.read_text().split())
    highest: dict[str, int] = {}
    async with broker.client(f"bench-acker-{secrets.token_hex(3)}", clean_session=True) as client:
        await client.subscribe("yikatong/+/txn/+", qos=1)
        print("ready", flush=True)
        async for message in client.messages:
            _, city, _, terminal = message.topic.value.split("/")
            if terminal not in mine or not isinstance(message.payload, bytes):
                continue
            doc = json.loads(message.payload)
            seqs = [r["seq"] for r in doc["records"]] if doc.get("schema") == BATCH_SCHEMA else [doc["seq"]]
            highest[terminal] = max(highest.get(terminal, 0), *seqs)
            ack = Ack(schema=ACK_SCHEMA, terminal=terminal, acked_through=highest[terminal])
            await client.publish(ack_topic(city, terminal), ack.to_json(), qos=1)


@contextlib.contextmanager
def acker_process(broker: BrokerUrl, roster: Path) -> Iterator[None]:
    command = [sys.executable, __file__, "--acker", str(roster), "--broker", str(broker)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit("the acker did not start")
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@dataclass(frozen=True)
class QuietFirst(Plan):
    """The plan's flat rate after ``quiet`` seconds with no taps at all (every terminal connected, idle)."""

    quiet: float = 10.0

    def rate_at(self, elapsed: float) -> float:
        return 0.0 if elapsed < self.quiet else super().rate_at(elapsed)


def _cards(count: int, seed: int) -> dict[str, list[SyntheticCard]]:
    by_city: dict[str, list[SyntheticCard]] = {}
    for card in synthetic_cards(count, CITIES, seed):
        card.balance = 20_000
        by_city.setdefault(card.issuer, []).append(card)
    return by_city


def _window(samples: list[tuple[float, float, float]], start: float, end: float) -> tuple[float, float]:
    """(cores of this process, cores of the broker) between two moments of the run (seconds)."""
    inside = [s for s in samples if start <= s[0] <= end]
    if len(inside) < 2:
        return float("nan"), float("nan")
    (t0, own0, broker0), (t1, own1, broker1) = inside[0], inside[-1]
    return (own1 - own0) / (t1 - t0), (broker1 - broker0) / (t1 - t0)


async def overhead(
    broker: BrokerUrl, broker_pid: int | None, terminals: int, args: argparse.Namespace, folder: Path
) -> dict[str, Any]:
    """Part (a) for one terminal count."""
    seed = secrets.randbits(32)
    pairs = terminal_numbers(CITIES, terminals, random.Random(seed))
    sims = [SimTerminal(HOST, c, n, TimedQueue(MemoryOutbox()), 200) for c, n in pairs]
    roster = folder / f"terminals-{terminals}.txt"
    roster.write_text("\n".join(n for _, n in pairs) + "\n")
    plan = QuietFirst(args.rate, args.idle + args.seconds, quiet=args.idle)
    load = LoadRun(broker, sims, _cards(2 * terminals, seed), plan, seed=seed)
    samples: list[tuple[float, float, float]] = []  # (seconds into the run, CPU s of this process, of the broker)

    def report(progress: Progress) -> None:
        if progress.phase == "load":
            samples.append((progress.elapsed, cpu_self(), cpu_of(broker_pid)))

    try:
        with acker_process(broker, roster):
            await load.run(report, connect_timeout=180, drain_timeout=args.drain)
    finally:
        if broker_pid is None:
            await forget_sessions(broker, [f"yikatong-terminal-{n}" for _, n in pairs])
    # the first third of the quiet time is left out: the terminals' subscriptions are still settling then
    idle_cores, idle_broker = _window(samples, args.idle / 3, args.idle - 0.5)
    busy_cores, busy_broker = _window(samples, args.idle + 2.0, args.idle + args.seconds)
    seconds = load.timeline[int(args.idle) + 2 : int(args.idle + args.seconds)]
    latencies = [x for s in seconds for x in s.latencies]
    return {
        "terminals": terminals,
        "connect": load.connect_seconds,
        "idle_cores": idle_cores,
        "idle_us": idle_cores / terminals * 1e6,
        "idle_broker": idle_broker,
        "cores": busy_cores,
        "broker": busy_broker,
        "made": sum(s.generated for s in seconds) / max(1, len(seconds)),
        "acked": sum(s.acked for s in seconds) / max(1, len(seconds)),
        **percentiles_ms(latencies),
    }


async def part_a(broker: BrokerUrl, broker_pid: int | None, args: argparse.Namespace, folder: Path) -> None:
    print(
        f"(a) the load generator's own cost: {args.rate:g} taps/s offered for {args.seconds:g} s after {args.idle:g} s "
        f"idle; a tiny acker as the clearing; cores = CPU s per wall s of the load process"
    )
    print(
        f"{'terminals':>9} {'connect s':>9} {'idle cores':>10} {'idle µs/term/s':>14} {'load cores':>10} "
        f"{'terminals/core':>14} {'made/s':>7} {'acked/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'broker cores':>13}"
    )
    for terminals in args.terminals:
        r = await overhead(broker, broker_pid, terminals, args, folder)
        print(
            f"{r['terminals']:>9,} {r['connect']:>9.1f} {r['idle_cores']:>10.3f} {r['idle_us']:>14.1f} "
            f"{r['cores']:>10.3f} {terminals / r['cores']:>14,.0f} {r['made']:>7.0f} {r['acked']:>7.0f} "
            f"{r['p50'] or float('nan'):>7.1f} {r['p99'] or float('nan'):>7.1f} "
            f"{r['idle_broker']:>5.2f} / {r['broker']:<4.2f}",
            flush=True,
        )
    print("  broker cores: idle / under load (Mosquitto's CPU; only with the private broker)")


# --- (b) end to end with the real clearing ---------------------------------------------------------------


def step(broker: BrokerUrl, rate: float, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Part (b): one ``yikatong load`` run at ``rate`` taps/s, clearing processes started by it."""
    seed = secrets.randbits(32)
    out = folder / f"step-{rate:g}"
    command = [sys.executable, "-m", "yikatong.cli", "load", "--broker", str(broker), "--out", str(out)]
    command += ["--terminals", str(args.step_terminals), "--cards", str(2 * args.step_terminals)]
    command += ["--rate", f"{rate:g}", "--duration", f"{args.step_seconds:g}", "--drain", f"{args.drain:g}"]
    command += ["--seed", str(seed)]
    # what the clearings' persistent sessions (fixed client ids) kept from an earlier run is not this step's load
    asyncio.run(forget_sessions(broker, [f"yikatong-clearing-{city}-1" for city in CITIES]))
    cpu, began = cpu_children(), time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    cpu, wall = cpu_children() - cpu, time.monotonic() - began
    if not (out / "load-summary.json").exists():
        raise SystemExit(f"yikatong load failed ({done.returncode}):\n{done.stderr[-2000:]}")
    doc = json.loads((out / "load-summary.json").read_text())
    resent = 0
    for city in CITIES:
        found = re.search(r"([\d,]+) duplicates", (out / f"clearing-{city}.log").read_text())
        resent += int(found.group(1).replace(",", "")) if found else 0
    return {"doc": doc, "cpu": cpu, "wall": wall, "resent": resent, "seed": seed}


def part_b(broker: BrokerUrl, private: bool, args: argparse.Namespace, folder: Path) -> None:
    print(
        f"\n(b) end to end: yikatong load with {args.step_terminals:,} terminals starting its clearing processes "
        f"(SQLite), {args.step_seconds:g} s per step"
    )
    print(
        f"{'offered/s':>9} {'made/s':>7} {'acked/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
        f"{'unacked':>7} {'resent':>7} {'CPU s':>6} {'wall s':>6}"
    )
    for rate in args.steps:
        r = step(broker, rate, args, folder)
        doc, lat = r["doc"], r["doc"]["latency_ms"]
        if not private:
            pairs = terminal_numbers(CITIES, args.step_terminals, random.Random(r["seed"]))
            asyncio.run(forget_sessions(broker, [f"yikatong-terminal-{n}" for _, n in pairs]))
        print(
            f"{rate:>9,.0f} {doc['generated_per_second']:>7,.0f} {doc['acked_per_second']:>7,.0f} "
            f"{lat['p50'] or float('nan'):>8,.0f} {lat['p95'] or float('nan'):>8,.0f} "
            f"{lat['p99'] or float('nan'):>8,.0f} {doc['unacked']:>7,} {r['resent']:>7,} {r['cpu']:>6.0f} "
            f"{r['wall']:>6.0f}",
            flush=True,
        )
    print(
        "  acked/s: acks during the offered seconds; unacked: records still waiting after the drain; resent: "
        "records the clearings got again (no ack in time); CPU s: load and clearing processes together"
    )


def main(args: argparse.Namespace) -> None:
    setup_logging(logging.ERROR)  # the uplinks' reconnect warnings, as in yikatong load
    folder = Path(tempfile.mkdtemp(prefix="load-bench-"))
    print(f"load bench on {os.cpu_count()} cores; broker: {args.broker}; files in {folder}\n")
    with broker_for(args.broker, folder) as (broker, pid):

        async def run_a() -> None:
            await part_a(broker, pid, args, folder)

        if args.terminals:
            asyncio.run(run_a())
        if args.steps:
            part_b(broker, pid is not None, args, folder)


def _numbers(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> list[Any]:
        return [kind(part) for part in text.split(",") if part.strip()]

    return parse


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="private", help="private (a Mosquitto of the bench's own) or a URL")
    parser.add_argument("--terminals", type=_numbers(int), default=[1000, 5000, 10000], help="part (a) counts")
    parser.add_argument("--rate", type=float, default=200.0, help="part (a) offered taps/s")
    parser.add_argument("--idle", type=float, default=15.0, help="part (a) seconds connected with no taps")
    parser.add_argument("--seconds", type=float, default=20.0, help="part (a) seconds of taps")
    parser.add_argument("--steps", type=_numbers(float), default=[250, 500, 1000, 2000, 3000], help="part (b) rates")
    parser.add_argument("--step-terminals", type=int, default=1000)
    parser.add_argument("--step-seconds", type=float, default=20.0)
    parser.add_argument("--drain", type=float, default=30.0, help="seconds to wait for the last acks")
    parser.add_argument("--acker", type=Path, help=argparse.SUPPRESS)  # internal: run the part (a) acker
    parsed = parser.parse_args()
    if parsed.acker is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(acker(BrokerUrl.parse(parsed.broker), parsed.acker))
    else:
        main(parsed)
