"""Benchmark: a clearing's resident memory under a flood while its database is stalled (backpressure).

A real `yikatong clearing serve` process on Mosquitto + PostgreSQL. First its resident memory at rest; then psql
(an outside client) holds an exclusive lock on the quarantine table, so every commit waits, while
`mosquitto_pub -l` floods the clearing's terminal topics with --messages junk messages; the clearing's RSS is
sampled every 0.2 s. Then the lock is released and the time until the clearing is idle again is measured.
Printed side by side: RSS at rest, peak RSS during the flood, the ratio, messages dropped by backpressure (the
senders would resend them) and quarantined.

    python3 bench/clearing_flood.py [--messages 200000] [--stall 30] [--broker-port 1883]

Not a test: it prints figures and asserts nothing. Uses a new PostgreSQL database, dropped afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
CITY = "4560"


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from /proc (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--stall", type=float, default=30.0, help="seconds the database stays locked")
    parser.add_argument("--broker-port", type=int, default=1883)
    args = parser.parse_args()
    name = f"yikatong_flood_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN)
    await admin.execute(f"CREATE DATABASE {name}")
    folder = Path(tempfile.mkdtemp())
    log = folder / "serve.log"
    db = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    command = [sys.executable, "-m", "yikatong.cli", "clearing", "serve", "--city", CITY]
    command += ["--broker", f"mqtt://127.0.0.1:{args.broker_port}", "--db", db, "--worker", f"flood-{name}"]
    command += ["--report-every", "1", "--quarantine-cap", str(10 * args.messages)]
    serve = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        while "connected to" not in log.read_text():
            assert serve.poll() is None, log.read_text()
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        at_rest = rss_kib(serve.pid)
        locker = subprocess.Popen(
            [
                "psql",
                "-h",
                "127.0.0.1",
                "-U",
                "postgres",
                "-d",
                name,
                "-q",
                "-c",
                f"BEGIN; LOCK TABLE quarantine IN ACCESS EXCLUSIVE MODE; SELECT pg_sleep({args.stall}); COMMIT;",
            ],
            stdout=subprocess.DEVNULL,
        )
        await asyncio.sleep(0.5)
        started = time.monotonic()
        publishers = flood(args.broker_port, args.messages, folder)
        peak = at_rest
        while locker.poll() is None:
            peak = max(peak, rss_kib(serve.pid))
            await asyncio.sleep(0.2)
        published = all(p.poll() is not None for p in publishers)
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
            peak = max(peak, rss_kib(serve.pid))
        drained = time.monotonic() - drain_start - 5
        peak_hwm = rss_kib(serve.pid, "VmHWM")
    finally:
        serve.terminate()
        serve.wait(20)
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    report(log, args.messages, stalled_for, published, at_rest, max(peak, peak_hwm), drained)


def report(
    log: Path, messages: int, stalled_for: float, published: bool, at_rest: int, peak: int, drained: float
) -> None:
    """The figures, side by side."""
    final = re.findall(r"clearing \d+: .*", log.read_text())[-1]
    quarantined = int(re.search(r"([\d,]+) quarantined", final).group(1).replace(",", ""))  # type: ignore[union-attr]
    dropped = re.search(r"([\d,]+) dropped", final)
    print(
        f"flood: {messages:,} messages from 8 mosquitto_pub processes, database locked {stalled_for:.1f} s"
        f" ({'all published during the stall' if published else 'publishing outlasted the stall'})"
    )
    print(f"{'RSS at rest':>14} {'peak RSS':>10} {'peak/rest':>10} {'dropped':>10} {'quarantined':>12} {'drain s':>8}")
    print(
        f"{at_rest / 1024:>11.0f} MiB {peak / 1024:>6.0f} MiB {peak / at_rest:>10.2f}"
        f" {dropped.group(1) if dropped else '0':>10} {quarantined:>12,} {drained:>8.1f}"
    )
    print(f"last progress line: {final}")


if __name__ == "__main__":
    asyncio.run(main())
