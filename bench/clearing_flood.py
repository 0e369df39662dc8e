"""Benchmark: a clearing's resident memory under a flood while its database is stalled (backpressure).

A real `yikatong clearing serve` process on PostgreSQL. First its resident memory at rest; then psql (an outside
client) holds an exclusive lock on the quarantine table, so every commit waits, while `mosquitto_pub -l` floods
the clearing's terminal topics with --messages junk messages; the clearing's RSS is sampled every 0.2 s. Then
the lock is released and the time until the clearing is idle again is measured. Two brokers, side by side:

- the machine's Mosquitto (127.0.0.1:1883), which queues at most 1,000 messages for a subscriber that is behind
  and drops the rest itself (`max_queued_messages`), so the clearing sees little of the flood;
- a private Mosquitto with no queue or in-flight limit, which pushes the whole flood into the clearing: there
  the clearing's own bounds (two batches, then 10,000 messages / 32 MiB in aiomqtt's queue) are what hold.

    python3 bench/clearing_flood.py [--messages 200000] [--stall 30]

Not a test: it prints figures and asserts nothing. Uses new PostgreSQL databases, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from terminals.mqtt import free_port

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
CITY = "4510"


@dataclass
class Figures:
    broker: str
    at_rest: int  # KiB
    peak: int  # KiB
    stalled_for: float
    dropped: int
    quarantined: int
    drained: float


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from /proc (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


@contextlib.contextmanager
def unlimited_mosquitto(folder: Path) -> Iterator[int]:
    """A Mosquitto of our own on a free port that queues and sends without limit; its port."""
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n"
    )
    proc = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)])
    try:
        time.sleep(0.5)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def flood(port: int, messages: int, folder: Path) -> list[subprocess.Popen[bytes]]:
    """`mosquitto_pub -l` on 8 made-up terminal topics at once: ``messages`` lines of ~100 bytes in all."""
    binary = shutil.which("mosquitto_pub") or "/usr/bin/mosquitto_pub"
    procs = []
    for n in range(8):
        path = folder / f"flood-{n}.txt"
        line = b'{"schema":"yikatong.txn/1","seq":%d,"junk":"' + b"x" * 60 + b'"}'
        path.write_bytes(b"\n".join(line % i for i in range(messages // 8)) + b"\n")
        topic = f"yikatong/{CITY}/txn/{CITY}F100D{n:03X}"
        command = [binary, "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic, "-l"]
        procs.append(subprocess.Popen(command, stdin=path.open("rb"), stderr=subprocess.DEVNULL))
    return procs


async def flood_run(label: str, port: int, messages: int, stall: float) -> Figures:
    """One flood against a clearing on a new database behind the broker on ``port``."""
    name = f"yikatong_flood_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN)
    await admin.execute(f"CREATE DATABASE {name}")
    folder = Path(tempfile.mkdtemp())
    log = folder / "serve.log"
    db = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    command = [sys.executable, "-m", "yikatong.cli", "clearing", "serve", "--city", CITY, "--db", db]
    command += ["--broker", f"mqtt://127.0.0.1:{port}", "--worker", f"flood-{name}", "--session-expiry", "0"]
    command += ["--report-every", "1", "--quarantine-cap", str(10 * messages)]
    serve = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        while "connected to" not in log.read_text():
            assert serve.poll() is None, log.read_text()
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        at_rest = rss_kib(serve.pid)
        lock = f"BEGIN; LOCK TABLE quarantine IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({stall}); COMMIT;"
        locker = subprocess.Popen(
            ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", name, "-q", "-c", lock], stdout=subprocess.DEVNULL
        )
        await asyncio.sleep(0.5)
        started = time.monotonic()
        publishers = flood(port, messages, folder)
        peak = at_rest
        while locker.poll() is None:
            peak = max(peak, rss_kib(serve.pid))
            await asyncio.sleep(0.2)
        for p in publishers:
            p.wait()
        stalled_for = time.monotonic() - started
        drain_start = time.monotonic()
        last, same = "", 0
        while same < 5:  # idle: five equal progress lines in a row
            await asyncio.sleep(1)
            lines = re.findall(r"clearing \d+: .*", log.read_text())
            now = lines[-1].split(";")[0] if lines else ""
            same = same + 1 if now == last else 0
            last = now
        drained = time.monotonic() - drain_start - 5
        peak = max(peak, rss_kib(serve.pid, "VmHWM"))
    finally:
        serve.terminate()
        serve.wait(20)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    final = re.findall(r"clearing \d+: .*", log.read_text())[-1]
    quarantined = re.search(r"([\d,]+) quarantined", final)
    dropped = re.search(r"([\d,]+) dropped", final)
    return Figures(
        label,
        at_rest,
        peak,
        stalled_for,
        int(dropped.group(1).replace(",", "")) if dropped else 0,
        int(quarantined.group(1).replace(",", "")) if quarantined else 0,
        drained,
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--stall", type=float, default=30.0, help="seconds the database stays locked")
    args = parser.parse_args()
    runs = [await flood_run("machine Mosquitto", 1883, args.messages, args.stall)]
    with unlimited_mosquitto(Path(tempfile.mkdtemp())) as port:
        runs.append(await flood_run("unlimited Mosquitto", port, args.messages, args.stall))
    print(f"flood: {args.messages:,} messages of ~100 bytes from 8 mosquitto_pub processes, database locked by psql")
    head = f"{'broker':<20} {'locked s':>8} {'RSS rest':>9} {'RSS peak':>9} {'peak/rest':>9}"
    print(f"{head} {'dropped':>9} {'quarantined':>11} {'drain s':>7}")
    for r in runs:
        print(
            f"{r.broker:<20} {r.stalled_for:>8.1f} {r.at_rest / 1024:>5.0f} MiB {r.peak / 1024:>5.0f} MiB"
            f" {r.peak / r.at_rest:>9.2f} {r.dropped:>9,} {r.quarantined:>11,} {r.drained:>7.1f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
