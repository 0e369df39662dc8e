"""Benchmark: the clearing on a 3-node NATS cluster beside the single Mosquitto, in one run, and the recovery
after a node is SIGKILLed (issue 21).

    python3 bench/cluster_bench.py [--terminals 60] [--rate 800] [--seconds 10] [--workers 1,2,4]
        [--mosquitto mqtt://127.0.0.1:1883] [--recovery-rate 100] [--recovery-seconds 30] [--kill-at 10]
        [--down 5] [--skip-throughput] [--skip-recovery]

(a) Throughput: the same offered load, ``yikatong load --terminals N --rate R --duration S`` as a child process,
    once on the machine's Mosquitto (``--broker``; one clearing a city, MQTT 5) and once on ``--cluster`` for each
    of ``--workers`` clearing workers a city (``--cluster-workers``), each row on a new PostgreSQL database (made
    with psql, dropped after). ``--rate`` is meant to be more than the clearings can take: the row shows what they
    achieved, the records they stored per second (their metrics: from the first scrape that saw one stored to the
    last; forwarded records count at the issuer too) beside the load's own "acked/s during the load", the ack
    latency p50/p99 from each tap's moment (the load summary), the records sent again, those never acked (see
    docs/demo-and-load-choices.md on refused subscriptions) and each worker's share (records it stored: min-max).
(b) Recovery: ``yikatong load --cluster --cluster-workers 2`` at a steady ``--recovery-rate``; ``--kill-at``
    seconds into it the bench SIGKILLs node n2 (terminal i is on node i % 3, so a third of the terminals, and each
    city's worker w2 answers there), and restarts it ``--down`` seconds later. A NATS subscriber of the bench on
    node n1 timestamps every ack the clearings publish (``yikatong.*.ack.*``; NATS delivers a message to a
    connected MQTT subscriber as it does to this one). Printed: from the kill to the first ack after it (any
    terminal, and one of a terminal on a surviving node), the longest gap between acks around the kill, the time
    the restart took to be ready, from the restart to the first ack to a terminal of the killed node (those
    terminals have that node alone as broker: they reconnect when it is back, then send what they kept), and the
    load's own end: unacked, sent again, p99/max latency.

Not a test: it prints figures and asserts nothing. The load runs from this tree (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import nats

from yikatong.loadgen import terminal_numbers
from yikatong.nats_cluster import NatsCluster

CITIES = ["4510", "4560", "4530"]
PG = "postgresql+asyncpg://postgres@127.0.0.1:5432/"
KILLED = "n2"  # node index 1: terminals i % 3 == 1 and each city's worker w2 answer there
WATCHER = "n1"


def psql(statement: str) -> None:
    """One statement as the postgres superuser (trust auth on loopback)."""
    subprocess.run(["psql", "-h", "127.0.0.1", "-U", "postgres", "-qc", statement], check=True)


def load_command(args: argparse.Namespace, out: Path, db: str, rate: float, seconds: float) -> list[str]:
    """``yikatong load`` of a row, without where it runs."""
    return [
        sys.executable,
        "-m",
        "yikatong.cli",
        "load",
        "--terminals",
        str(args.terminals),
        "--cards",
        str(args.terminals * 10),
        "--rate",
        str(rate),
        "--duration",
        str(seconds),
        "--drain",
        "60",
        "--db",
        db,
        "--out",
        str(out),
        "--seed",
        str(args.seed),
    ]


def run_row(args: argparse.Namespace, out: Path, where: list[str]) -> dict[str, Any]:
    """One throughput row on a fresh database: the load summary, with its exit code."""
    name = f"cluster_bench_{secrets.token_hex(4)}"
    psql(f"CREATE DATABASE {name}")
    try:
        command = load_command(args, out, PG + name, args.rate, args.seconds) + where
        print("  $", " ".join(command[2:]), flush=True)
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode not in (0, 1):
            raise SystemExit(f"load failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        doc: dict[str, Any] = json.loads((out / "load-summary.json").read_text())
        doc["exit"] = done.returncode
        return doc
    finally:
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def stored_per_second(metrics: dict[str, Any]) -> float:
    """Records the clearings stored (terminals' and forwarded) per second, from the first scrape that saw one
    stored to the last: what they achieved, whether or not each ack reached its terminal."""
    busy = [float(s["second"]) for s in metrics["timeline"] if sum(s["stored_per_second"].values()) > 0]
    if not busy:
        return 0.0
    stored = sum(int(c["records_stored"]) for c in metrics["cities"].values())
    return stored / (busy[-1] - busy[0] + 1.0)  # a scrape's rate covers the second before it


def row_line(label: str, doc: dict[str, Any]) -> str:
    """The printed row."""
    metrics = doc["clearing_metrics"]
    achieved = stored_per_second(metrics)
    lat = doc["latency_ms"]
    stored = [c["records_stored"] for c in metrics["cities"].values()]
    shares = f"{min(stored):,}-{max(stored):,} ({len(stored)})" if stored else "-"
    return (
        f"{label:<24} {achieved:>9,.0f} {doc['acked_per_second']:>10,.0f} {lat['p50']:>9,.0f} {lat['p99']:>9,.0f} "
        f"{doc['resent']:>7,} {doc['unacked']:>8,}  {shares}"
    )


def part_a(args: argparse.Namespace, folder: Path) -> None:
    """Throughput: Mosquitto, then the cluster with each --workers."""
    print(
        f"(a) throughput: {args.terminals} terminals, {args.rate:g} taps/s offered for {args.seconds:g} s, "
        "PostgreSQL, a new database a row"
    )
    rows = [("Mosquitto, 1 a city", ["--broker", args.mosquitto])]
    rows += [(f"NATS x3, {w} a city", ["--cluster", "--cluster-workers", str(w)]) for w in args.workers]
    lines = []
    for k, (label, where) in enumerate(rows):
        lines.append(row_line(label, run_row(args, folder / f"row-{k}", where)))
    print(
        f"\n{'broker, workers':<24} {'stored/s':>9} {'acked/s*':>10} {'p50 ms':>9} {'p99 ms':>9} {'resent':>7} "
        f"{'unacked':>8}  stored per worker min-max (workers)"
    )
    for line in lines:
        print(line)
    print(
        "stored/s: records the clearings stored (from their metrics, forwarded ones too) from the first scrape that "
        "saw one stored to the last; *: the load's acked/s during the offered load only\n"
    )


class AckWatch:
    """Every ack the clearings publish, timestamped (monotonic) with its terminal, via a NATS subscription."""

    def __init__(self) -> None:
        self.acks: list[tuple[float, str]] = []

    async def run(self, server: str, stop: asyncio.Event) -> None:
        """Subscribed on ``server`` until ``stop``."""

        async def quiet(_error: Exception) -> None:  # a node of the cluster killed: it reconnects, nothing to say
            return

        client = await nats.connect(servers=[server], max_reconnect_attempts=-1, error_cb=quiet)

        async def take(message: Any) -> None:
            self.acks.append((time.monotonic(), message.subject.rsplit(".", 1)[1]))

        await client.subscribe("yikatong.*.ack.*", cb=take)
        await stop.wait()
        await client.close()

    def first_after(self, moment: float, terminals: set[str] | None = None) -> float | None:
        """When the first ack after ``moment`` came (of one of ``terminals``)."""
        found = [at for at, t in self.acks if at > moment and (terminals is None or t in terminals)]
        return min(found) if found else None

    def longest_gap(self, start: float, end: float) -> float:
        """The longest time without an ack between ``start`` and ``end``."""
        times = [start, *sorted(at for at, _ in self.acks if start < at < end), end]
        return max(b - a for a, b in itertools.pairwise(times))


async def recovery(args: argparse.Namespace, folder: Path) -> None:
    """Part (b)."""
    name = f"cluster_bench_{secrets.token_hex(4)}"
    psql(f"CREATE DATABASE {name}")
    out = folder / "recovery"
    roster = terminal_numbers(CITIES, args.terminals, random.Random(args.seed))
    on_killed = {number for i, (_, number) in enumerate(roster) if i % 3 == 1}
    command = load_command(args, out, PG + name, args.recovery_rate, args.recovery_seconds)
    command += ["--cluster", "--cluster-workers", "2"]
    print(
        f"(b) recovery: node {KILLED} SIGKILLed {args.kill_at:g} s into a steady load, restarted {args.down:g} s later"
    )
    print("  $", " ".join(command[2:]), flush=True)
    # the progress lines (stderr) say when the load began
    proc = await asyncio.create_subprocess_exec(*command, stdout=subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    watch, stop = AckWatch(), asyncio.Event()
    cluster: NatsCluster | None = None
    watcher: asyncio.Task[None] | None = None
    try:
        while b" s  offered" not in (line := await proc.stderr.readline()):  # the first second of the load
            if not line:
                raise SystemExit("the load ended before its load began")
        began = time.monotonic() - 1.0
        cluster = NatsCluster.load(out / "nats-cluster")
        watcher = asyncio.create_task(watch.run(cluster.node(WATCHER).nats_url, stop))
        drain = asyncio.create_task(proc.stderr.read())  # the progress lines, not to block the child
        await asyncio.sleep(max(0.0, began + args.kill_at - time.monotonic()))
        killed = time.monotonic()  # before the SIGKILL: kill() returns once the process is seen gone
        await asyncio.to_thread(cluster.kill, KILLED)
        await asyncio.sleep(args.down)
        restarting = time.monotonic()
        await asyncio.to_thread(cluster.restart, KILLED)
        ready = time.monotonic()
        await proc.wait()
        await drain
        doc = json.loads((out / "load-summary.json").read_text())
    finally:
        stop.set()
        if watcher is not None:
            await watcher
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        # the restarted node is the bench's: the load stopped only the nodes it started
        (cluster or NatsCluster.load(out / "nats-cluster")).stop()
        psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    survivors = {number for _, number in roster} - on_killed

    def s(since: float, moment: float | None) -> str:
        return "-" if moment is None else f"{moment - since:.3f} s"

    lat = doc["latency_ms"]
    print(f"\n{'measure':<58} value")
    for label, value in [
        ("kill -> first ack (any terminal)", s(killed, watch.first_after(killed))),
        ("kill -> first ack to a terminal on a surviving node", s(killed, watch.first_after(killed, survivors))),
        (
            "longest gap between acks, kill -5 s to +10 s",
            s(0, watch.longest_gap(killed - 5, killed + 10)),
        ),
        (f"restart of {KILLED}: until ready (healthz, meta leader, MQTT)", s(restarting, ready)),
        (f"restart -> first ack to a terminal of {KILLED}", s(restarting, watch.first_after(restarting, on_killed))),
        (
            f"kill -> first ack to a terminal of {KILLED} after it was ready",
            s(killed, watch.first_after(ready, on_killed)),
        ),
    ]:
        print(f"{label:<58} {value}")
    print(
        f"load: exit {proc.returncode}, {doc['acked']:,}/{doc['generated']:,} acked, {doc['unacked']:,} unacked, "
        f"{doc['resent']:,} sent again, p99 {lat['p99']:,.0f} ms, max {lat['max']:,.0f} ms"
    )


def main(args: argparse.Namespace) -> None:
    """Both parts, their files in a temporary folder."""
    folder = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    print(f"cluster bench on {os.cpu_count()} cores; files in {folder}\n")
    if not args.skip_throughput:
        part_a(args, folder)
    if not args.skip_recovery:
        asyncio.run(recovery(args, folder))


def _counts(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--terminals", type=int, default=60, help="simulated terminals (default 60)")
    parser.add_argument("--rate", type=float, default=800.0, help="taps/s offered in (a): past saturation (800)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load a row of (a) (10)")
    parser.add_argument("--workers", type=_counts, default=[1, 2, 4], help="clearing workers a city (1,2,4)")
    parser.add_argument("--mosquitto", default="mqtt://127.0.0.1:1883", help="the single broker of the baseline")
    parser.add_argument("--recovery-rate", type=float, default=100.0, help="steady taps/s of (b) (100)")
    parser.add_argument("--recovery-seconds", type=float, default=30.0, help="seconds of load in (b) (30)")
    parser.add_argument("--kill-at", type=float, default=10.0, help="seconds into (b)'s load of the kill (10)")
    parser.add_argument("--down", type=float, default=5.0, help="seconds the node stays down (5)")
    parser.add_argument(
        "--seed",
        type=int,
        default=secrets.randbits(32),
        help="the load's seed, its terminals (default: new a run, or the machine's Mosquitto would still hold the "
        "sessions of a run minutes ago with the same terminal numbers)",
    )
    parser.add_argument("--skip-throughput", action="store_true", help="leave (a) out")
    parser.add_argument("--skip-recovery", action="store_true", help="leave (b) out")
    main(parser.parse_args())
