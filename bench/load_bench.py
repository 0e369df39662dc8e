"""Benchmark: ``yikatong load`` itself, and the issue-16 row "10,000 terminals at 1,000 taps/s on Mosquitto".

    python3 bench/load_bench.py [--terminals 10000] [--rate 1000] [--seconds 60] [--before 018911e]
        [--before-rates 500,1000] [--cost-terminals 5000] [--cost-rate 500] [--sweep] [--skip-cost]

(a) The generator's own cost, its two uplinks side by side: one ``LoadRun`` (one worker's engine) in this process
    drives ``--cost-terminals`` terminals over a private Mosquitto, a tiny acker child process standing in for the
    clearing (acks each terminal through its highest seq: it costs next to nothing and never holds the load back).
    CPU of this process per wall second (getrusage): while every terminal is connected and idle, then while
    ``--cost-rate`` taps/s are offered; hence µs per idle terminal a second and CPU ms per tap, for the lean uplink
    (the default) and for the real terminal's aiomqtt ``Uplink``, and their ratio.
(b) The row: ``yikatong load --terminals 10000 --cards 20000 --rate 1000 --duration 60 --broker <private
    Mosquitto>`` as a child process (its clearing processes on SQLite, its default workers), and with ``--before
    COMMIT`` the same command of that commit's tree (``git archive``, run from a temporary folder) at each of
    ``--before-rates``, side by side: achieved acked/s during the load, ack latency p50/p99/p99.9/max (the old tool
    has no p99.9/max and times from the outbox, not from the tap's moment), whether the offered rate kept its
    schedule (now: taps late and the worst lag; before: seconds of the load whose offered rate showed 0), records
    sent again, Mosquitto's "messages are being dropped" warnings, and the CPU the load, its clearings and
    Mosquitto used per wall second of the offered load (cores; /proc).
(c) With ``--sweep``: ``yikatong load --sweep`` with the same terminals from 250 taps/s, x1.25 every 10 s, until p99
    passes 1 s: every step and the highest rate that held.

The private Mosquitto (a free port, no persistence, the default limits: 1,000 queued messages a client, after
which it drops QoS 1 messages for it and says so in its log) is started by the bench with its open-files limit
raised to the hard limit: 10,000 connections need 10,000 descriptors (``ulimit -n`` is often 1,024). Nothing else
may use it. Not a test: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
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
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

import aiomqtt

from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from terminals.messages import ACK_SCHEMA, BATCH_SCHEMA, Ack, ack_topic
from terminals.mqtt import BrokerUrl, free_port
from terminals.outbox import MemoryOutbox
from yikatong.load_schedule import Plan
from yikatong.load_stats import percentiles
from yikatong.loadgen import LoadRun, SimTerminal, TimedQueue, terminal_numbers
from yikatong.process import setup_logging
from yikatong.synthetic import SyntheticCard, synthetic_cards

ROOT = Path(__file__).resolve().parent.parent
CITIES = ["4510", "4560", "4530"]
HOST = IssuerHost(IssuerKeyStore.test_set())
TICKS = os.sysconf("SC_CLK_TCK")
PROGRESS = re.compile(r"^\s*(?:step \d+/\d+ at [\d,]+/s\s+)?\d+ s\s+offered")


def _raise_open_files() -> None:
    """This process and its children (Mosquitto, yikatong load) may open as many files as the hard limit allows."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Mosquitto:
    """A private Mosquitto of the bench's."""

    url: BrokerUrl
    pid: int
    log: Path

    def dropped(self) -> int:
        """Its "Outgoing messages are being dropped" warnings so far."""
        return self.log.read_text(errors="replace").count("are being dropped")


@contextlib.contextmanager
def mosquitto(folder: Path) -> Iterator[Mosquitto]:
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    conf, log = folder / "mosquitto.conf", folder / "mosquitto.log"
    # "user root": started as root it keeps its user, which may write the log into the bench's private folder
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest file {log}\nuser root\n"
    )
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)  # our open-files limit
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mosquitto did not start on port {port}")
            time.sleep(0.05)
        yield Mosquitto(BrokerUrl("127.0.0.1", port), proc.pid, log)
    finally:
        proc.kill()
        proc.wait(10)


@contextlib.contextmanager
def broker_for(choice: str, folder: Path) -> Iterator[tuple[BrokerUrl, int | None]]:
    """(broker URL, Mosquitto's pid when it is the bench's own): ``private`` or a given URL (bench/hotlist_bench)."""
    if choice != "private":
        yield BrokerUrl.parse(choice), None
        return
    with mosquitto(folder / "broker") as broker:
        yield broker.url, broker.pid


async def forget_sessions(broker: BrokerUrl, identifiers: list[str], parallel: int = 200) -> None:
    """Connect once with a clean session as each client id: a shared broker drops what it kept for it."""
    gate = asyncio.Semaphore(parallel)

    async def forget(identifier: str) -> None:
        async with gate:
            with contextlib.suppress(aiomqtt.MqttError):
                async with broker.client(identifier, clean_session=True):
                    pass

    await asyncio.gather(*(forget(i) for i in identifiers))


def cpu_of(pid: int) -> float | None:
    """CPU seconds a running process has used so far (Linux /proc); None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                found = [int(c) for c in (task / "children").read_text().split()]
                out += found
                todo += found
    return out


def group(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return "gone"
    return "clearings" if "clearing serve" in command else "load"


# --- (a) the generator's own cost ---------------------------------------------------------------------------


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


def _cards(count: int, seed: int) -> dict[str, list[SyntheticCard]]:
    by_city: dict[str, list[SyntheticCard]] = {}
    for card in synthetic_cards(count, CITIES, seed):
        card.balance = 20_000
        by_city.setdefault(card.issuer, []).append(card)
    return by_city


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _cost(
    broker: BrokerUrl, folder: Path, terminals: int, rate: float, seconds: float, lean: bool
) -> dict[str, Any]:
    seed = secrets.randbits(32)
    pairs = terminal_numbers(CITIES, terminals, random.Random(seed))
    sims = [SimTerminal(HOST, c, n, TimedQueue(MemoryOutbox()), 200) for c, n in pairs]
    roster = folder / f"roster-{seed}.txt"
    roster.write_text("\n".join(n for _, n in pairs) + "\n")
    plan = Plan(rate, seconds)
    run = LoadRun(broker, sims, _cards(2 * terminals, seed), plan, seed=seed, session_expiry=0, lean=lean)
    with acker_process(broker, roster):
        try:
            await run.connect(lambda _p: None, 300)
            gc.collect()
            gc.freeze()  # as a worker does after connecting
            await asyncio.sleep(3)  # subscriptions and retained lists settle
            cpu, began = _cpu(), time.monotonic()
            await asyncio.sleep(8)
            idle = (_cpu() - cpu) / (time.monotonic() - began)
            cpu, began = _cpu(), time.monotonic()
            await run.offer(plan, time.monotonic() + 0.1)
            busy = (_cpu() - cpu) / (time.monotonic() - began)
            await run.drain(lambda _p: None, 30)
        finally:
            await run.close()
            gc.unfreeze()
    total = run.tally.total()
    return {
        "connect": run.connect_seconds,
        "idle_us": idle / terminals * 1e6,
        "idle": idle,
        "busy": busy,
        "tap_ms": (busy - idle) / rate * 1000,
        "late": total.late,
        **percentiles(total.latency),
    }


def part_a(broker: BrokerUrl, folder: Path, args: argparse.Namespace) -> None:
    print(
        f"(a) the generator's own cost: one worker's engine, {args.cost_terminals:,} terminals, {args.cost_rate:g} "
        f"taps/s for {args.cost_seconds:g} s, a tiny acker as the clearing; cores = CPU s per wall s of this process"
    )
    print(
        f"{'uplink':>8} {'connect s':>9} {'idle cores':>10} {'µs/term/s':>9} {'load cores':>10} {'ms/tap':>7} "
        f"{'late':>5} {'p50 ms':>7} {'p99 ms':>7}"
    )
    rows = {}
    for name, lean in (("lean", True), ("aiomqtt", False)):
        r = rows[name] = asyncio.run(
            _cost(broker, folder, args.cost_terminals, args.cost_rate, args.cost_seconds, lean)
        )
        print(
            f"{name:>8} {r['connect']:>9.1f} {r['idle']:>10.3f} {r['idle_us']:>9.1f} {r['busy']:>10.3f} "
            f"{r['tap_ms']:>7.3f} {r['late']:>5,} {r['p50'] or float('nan'):>7.1f} {r['p99'] or float('nan'):>7.1f}",
            flush=True,
        )
    light, real = rows["lean"], rows["aiomqtt"]
    print(
        f"  aiomqtt / lean: idle {real['idle_us'] / max(light['idle_us'], 1e-9):.1f}x, per tap "
        f"{real['tap_ms'] / max(light['tap_ms'], 1e-9):.1f}x the CPU"
    )


# --- (b) the row, before and now ----------------------------------------------------------------------------


@dataclass
class Watch:
    """CPU of the load's process tree and of Mosquitto, sampled at each progress line of the offered load."""

    pid: int
    broker: int
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    seen: dict[int, tuple[str, float]] = field(default_factory=dict)

    def sample(self) -> None:
        for pid in [self.pid, *descendants(self.pid)]:
            cpu = cpu_of(pid)
            if cpu is not None:
                self.seen[pid] = (self.seen.get(pid, (group(pid), 0.0))[0], cpu)
        totals: dict[str, float] = {"mosquitto": cpu_of(self.broker) or 0.0}
        for name, cpu in self.seen.values():
            totals[name] = totals.get(name, 0.0) + cpu
        self.samples.append((time.monotonic(), totals))

    def cores(self) -> dict[str, float]:
        """Per group, CPU seconds per wall second between the first and the last sample."""
        if len(self.samples) < 2:
            return {}
        (t0, first), (t1, last) = self.samples[0], self.samples[-1]
        return {name: (last[name] - first.get(name, 0.0)) / (t1 - t0) for name in last}


def run_load(tree: Path, broker: Mosquitto, argv: list[str], out: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """``yikatong load`` of ``tree`` (run from it, so its packages come first), watched."""
    command = [sys.executable, "-m", "yikatong.cli", "load", "--broker", str(broker.url), "--out", str(out), *argv]
    proc = subprocess.Popen(command, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    watch = Watch(proc.pid, broker.pid)
    tail: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            tail[:] = [*tail[-20:], line]
            if PROGRESS.match(line):
                watch.sample()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait(1800)
    reader.join(10)
    if not (out / "load-summary.json").exists():
        raise SystemExit(f"yikatong load in {tree} failed ({proc.returncode}):\n{''.join(tail)}")
    return json.loads((out / "load-summary.json").read_text()), watch.cores()


def _extract(commit: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def _row(name: str, rate: float, doc: dict[str, Any], cores: dict[str, float], dropped: int) -> str:
    lat = doc["latency_ms"]
    seconds = doc["timeline"][: int(doc["settings"]["duration"])]
    if "schedule" in doc:
        schedule = doc["schedule"]
        kept = "on schedule" if not schedule["behind"] else f"{schedule['late']:,} late, lag {schedule['max_lag_s']} s"
        resent = f"{doc['resent']:,}"
    else:  # the tool before: no timetable; a stalled loop showed as seconds offering 0
        kept = f"offered 0 in {sum(1 for s in seconds if not s['offered'])} of {len(seconds)} s"
        resent = "-"

    def ms(key: str) -> str:
        return f"{lat[key]:,.0f}" if lat.get(key) is not None else "-"

    return (
        f"{name:>7} {rate:>6,.0f} {doc['acked_per_second']:>8,.0f} {ms('p50'):>7} {ms('p99'):>7} {ms('p99.9'):>7} "
        f"{ms('max'):>7}  {kept:<28} {resent:>6} {dropped:>7,} "
        f"{cores.get('load', 0):>5.2f} {cores.get('clearings', 0):>5.2f} {cores.get('mosquitto', 0):>5.2f}"
    )


def part_b(folder: Path, args: argparse.Namespace) -> None:
    common = ["--terminals", str(args.terminals), "--cards", str(2 * args.terminals), "--duration", f"{args.seconds:g}"]
    print(
        f"\n(b) yikatong load --terminals {args.terminals} --cards {2 * args.terminals} --rate R --duration "
        f"{args.seconds:g} on a private Mosquitto (clearings on SQLite; the tool's default workers)"
    )
    print(
        f"{'tool':>7} {'rate':>6} {'acked/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'p99.9':>7} {'max ms':>7}  "
        f"{'schedule':<28} {'resent':>6} {'dropped':>7} {'load':>5} {'clear':>5} {'mosq':>5}"
    )
    trees = [("now", ROOT, [args.rate])]
    if args.before:
        trees.insert(0, ("before", _extract(args.before, folder / "before"), args.before_rates))
    for name, tree, rates in trees:
        for rate in rates:
            with mosquitto(folder / f"broker-{name}-{rate:g}".replace(".", "_")) as broker:
                argv = [*common, "--rate", f"{rate:g}", "--seed", str(secrets.randbits(31))]
                doc, cores = run_load(tree, broker, argv, folder / f"{name}-{rate:g}")
                print(_row(name, rate, doc, cores, broker.dropped()), flush=True)
    print(
        "  acked/s: acks during the offered seconds; latency: before, from the record stored in the outbox; now, "
        "from the tap's moment on the timetable (no coordinated omission); schedule: now, taps made >100 ms late; "
        "resent: records published more than once; dropped: Mosquitto's 'messages are being dropped' warnings (a "
        "clearing more than 1,000 messages behind); load/clear/mosq: cores used during the offered load"
    )


def part_c(folder: Path, args: argparse.Namespace) -> None:
    argv = ["--terminals", str(args.terminals), "--cards", str(2 * args.terminals), "--sweep", "--rate", "250"]
    argv += ["--sweep-factor", "1.25", "--step-seconds", "10", "--slo-ms", "1000", "--drain", "30"]
    print(f"\n(c) yikatong load {' '.join(argv)} on a private Mosquitto")
    with mosquitto(folder / "broker-sweep") as broker:
        doc, _ = run_load(ROOT, broker, argv, folder / "sweep")
    sweep = doc["sweep"]
    print(f"{'offered/s':>9} {'acked':>7} {'p50 ms':>7} {'p99 ms':>7} {'p99.9':>7} {'late':>6}  held")
    for step in sweep["steps"]:
        lat = step["latency_ms"]
        print(
            f"{step['rate']:>9,.0f} {step['acked']:>7,} {lat['p50'] or 0:>7,.0f} {lat['p99'] or 0:>7,.0f} "
            f"{lat['p99.9'] or 0:>7,.0f} {step['late']:>6,}  {'yes' if step['held'] else 'no'}"
        )
    print(f"  highest rate that held: {sweep['held_rate']} taps/s; {sweep['limit']}")


def main(args: argparse.Namespace) -> None:
    setup_logging(logging.ERROR)
    _raise_open_files()
    folder = Path(tempfile.mkdtemp(prefix="load-bench-"))
    print(f"load bench on {os.cpu_count()} cores; files in {folder}\n")
    if not args.skip_cost:
        with mosquitto(folder / "broker-cost") as broker:
            part_a(broker.url, folder, args)
    part_b(folder, args)
    if args.sweep:
        part_c(folder, args)


def _numbers(text: str) -> list[float]:
    return [float(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--terminals", type=int, default=10_000, help="terminals of (b) and (c)")
    parser.add_argument("--rate", type=float, default=1000.0, help="taps/s of (b) now")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of load in (b)")
    parser.add_argument("--before", metavar="COMMIT", help="also run (b) with this commit's tool (e.g. 018911e)")
    parser.add_argument("--before-rates", type=_numbers, default=[500.0, 1000.0], help="rates of the tool before")
    parser.add_argument("--cost-terminals", type=int, default=5000, help="terminals of (a)")
    parser.add_argument("--cost-rate", type=float, default=500.0, help="taps/s of (a)")
    parser.add_argument("--cost-seconds", type=float, default=15.0, help="seconds of taps in (a)")
    parser.add_argument("--skip-cost", action="store_true", help="leave (a) out")
    parser.add_argument("--sweep", action="store_true", help="also (c), the sweep")
    parser.add_argument("--broker", help=argparse.SUPPRESS)  # internal: the acker's broker
    parser.add_argument("--acker", type=Path, help=argparse.SUPPRESS)  # internal: run the part (a) acker
    parsed = parser.parse_args()
    if parsed.acker is not None:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(acker(BrokerUrl.parse(parsed.broker), parsed.acker))
    else:
        main(parsed)
