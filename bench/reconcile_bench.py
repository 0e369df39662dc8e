"""Benchmark: `audit reconcile` over one day of a million records of three cities, every TAC verified: the
ledgers in memory (as from a clearing database, algorithm and key version known), then read from the daily
clearing files (CSV) by the line reader and by the columnar one (pyarrow) side by side, then reconciled per
stage (checks alone, with the TACs in this process after them, with the TACs in --jobs forked processes beside
them), then the whole command `yikatong audit reconcile FILES` end to end in a new process.

    python3 bench/reconcile_bench.py [--records 1000000] [--cards 30000] [--jobs 2] [--folder DIR]

Not a test: it prints figures and asserts nothing. The day is generated with numpy (cards, counters, balances,
times; 20 % of the records are other cities' cards, so they sit in two ledgers: the acquirer's and the
issuer's) and every record is signed with the published test keys, so the TAC runs verify real MACs. A
clearing file does not say a card's algorithm: the first record of each card tries them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np

from audit.ledger_sources import read_cities, read_clearing_file, write_clearing_file
from audit.reconcile import (
    LOAD,
    CityLedger,
    Ints,
    Options,
    Records,
    Source,
    reconcile,
    tac_columns,
)
from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from cardsim.personalise import application_serial
from clearing.verify import ALGS, KINDS, expected_macs

T = TypeVar("T")
CITIES = np.array([4510, 4560, 4530])
HEX_CITIES = np.array([int(str(city), 16) for city in CITIES.tolist()])  # terminal numbers start with the city
DAY_START = np.datetime64("2026-11-24T06:00:00")  # local time (+08:00)
EPOCH_US = (DAY_START - np.datetime64("1970-01-01T08:00:00")).astype("timedelta64[us]").astype(np.int64)


def generate(count: int, cards: int, seed: int = 1) -> Records:
    """One day of ``count`` records over ``cards`` cards: each card rides in one city all day (its own in 80 %
    of cases), 5 % of CPU records are loads, one record every 15 minutes per card. TACs not yet signed."""
    rng = np.random.default_rng(seed)
    issuer = CITIES[np.arange(cards) % 3]
    m1 = np.arange(cards) % 10 == 9
    uids = rng.choice(2**32, size=cards, replace=False).tolist()
    serials = rng.integers(0, 10**12, cards).tolist()
    ids = np.array(
        [
            f"{uids[n]:08X}" if m1[n] else application_serial(str(city), serials[n]).hex()
            for n, city in enumerate(issuer.tolist())
        ],
        dtype=object,
    )
    other = (np.arange(cards) + 1 + rng.integers(0, 2, cards)) % 3
    home = np.where(rng.random(cards) < 0.8, np.arange(cards) % 3, other)  # index into CITIES
    card = np.sort(rng.integers(0, cards, count))
    start = np.searchsorted(card, card)  # the first record of each record's card
    position = np.arange(count) - start
    load = ~m1[card] & (rng.random(count) < 0.05)
    kind = np.where(load, LOAD, KINDS.index("purchase"))
    amount = np.where(load, 5000, 100 + 50 * rng.integers(0, 9, count))
    delta = np.where(load, amount, -amount)
    total = np.cumsum(delta)
    after = 1_000_000 + total - np.concatenate(([0], total))[start]
    # each counter counts its own kind of record: loads the online counter, the rest the offline one
    loads_before = np.cumsum(load) - load - np.concatenate(([0], np.cumsum(load)))[start]
    counter = np.where(load, loads_before, position - loads_before)
    seconds = position * 900 + rng.integers(0, 900, cards)[card]
    local = DAY_START + seconds.astype("timedelta64[s]")
    acquirer = CITIES[home[card]]
    alg = np.where(m1, ALGS.index("sm4"), np.where(np.arange(cards) % 2, ALGS.index("3des"), ALGS.index("sm4")))
    return Records(
        issuer=issuer[card].astype(np.int64),
        acquirer=acquirer.astype(np.int64),
        card=ids[card],
        kind=kind.astype(np.int64),
        counter=counter.astype(np.int64),
        terminal=(HEX_CITIES[home[card]] * 16**8 + rng.integers(1, 1000, count)).astype(np.int64),
        terminal_seq=np.arange(1, count + 1, dtype=np.int64),
        amount=amount.astype(np.int64),
        balance_before=(after - delta).astype(np.int64),
        balance_after=after.astype(np.int64),
        time=np.array([t + "+08:00" for t in np.datetime_as_string(local, unit="s").tolist()], dtype=object),
        time_us=EPOCH_US + seconds.astype(np.int64) * 1_000_000,
        tac=np.zeros(count, dtype=np.int64),
        alg=alg[card].astype(np.int64),
        key_version=np.ones(count, dtype=np.int64),
        source=np.zeros(count, dtype=np.int64),
        line=np.arange(1, count + 1, dtype=np.int64),
    )


def sign_tacs(keys: IssuerKeyStore, records: Records) -> Ints:
    """The TAC (CPU) or record MAC (M1) of every row, with its algorithm and key version (which must be known)."""
    expected = expected_macs(IssuerHost(keys), tac_columns(records))
    assert not expected.refused, "every record is signed with a key of the test set"
    return expected.macs


def ledgers_of(records: Records) -> list[CityLedger]:
    """Each city's ledger as its clearing database holds it: its terminals' records and its cards' forwards."""
    return [
        CityLedger(
            str(city),
            (Source(f"bench ledger of {city}", "row"),),
            records.take((records.acquirer == city) | ((records.issuer == city) & (records.acquirer != city))),
            issuer_side=True,
        )
        for city in CITIES.tolist()
    ]


def write_files(records: Records, folder: Path) -> list[tuple[Path, str | None]]:
    """The acquirer files and the issuer-side files of the day (what audit reconcile reads)."""
    kinds = np.array(KINDS, dtype=object)[records.kind]
    issuer = [f"{x:04d}" for x in records.issuer.tolist()]
    acquirer = [f"{x:04d}" for x in records.acquirer.tolist()]
    columns = (
        [f"{i}-{c}-{k}-{n}" for i, c, k, n in zip(issuer, records.card, kinds, records.counter.tolist(), strict=True)],
        acquirer,
        issuer,
        [f"{x:012X}" for x in records.terminal.tolist()],
        records.terminal_seq.tolist(),
        records.card.tolist(),
        records.counter.tolist(),
        kinds.tolist(),
        records.amount.tolist(),
        records.balance_before.tolist(),
        records.balance_after.tolist(),
        records.time.tolist(),
        [f"{x:08X}" for x in records.tac.tolist()],
    )
    rows = list(zip(*columns, strict=True))
    files: list[tuple[Path, str | None]] = []
    for city in CITIES.tolist():
        path = folder / f"clearing-{city}-2026-11-24.csv"
        write_clearing_file(path, [rows[i] for i in np.flatnonzero(records.acquirer == city).tolist()])
        files.append((path, None))
        path = folder / f"issuer-{city}-2026-11-24.csv"
        mine = np.flatnonzero((records.issuer == city) & (records.acquirer != city))
        write_clearing_file(path, [rows[i] for i in mine.tolist()])
        files.append((path, str(city)))
    return files


def timed(what: str, seconds: list[float], work: Callable[[], T]) -> T:
    """Run ``work()``, note its duration."""
    begin = time.perf_counter()
    result = work()
    seconds.append(time.perf_counter() - begin)
    print(f"  {what:<42} {seconds[-1]:7.2f} s", flush=True)
    return result


def main() -> None:
    """Generate and sign a day, reconcile it from memory and from its files, stage by stage; print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--cards", type=int, default=30_000)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="forked TAC processes")
    parser.add_argument("--folder", type=Path, help="where to write the CSV files (default: a temporary folder)")
    args = parser.parse_args()
    keys, cities = IssuerKeyStore.test_set(), read_cities()
    cards = min(args.cards, max(args.records // 10, 3))
    print(f"one day: {args.records:,} records, {cards:,} cards of 3 cities; {os.cpu_count()} CPUs")
    took: list[float] = []
    records = timed("generate (numpy)", took, lambda: generate(args.records, cards))
    records = replace(records, tac=timed("sign TACs (batched)", took, lambda: sign_tacs(keys, records)))
    ledgers = ledgers_of(records)
    print(f"  ledger rows {sum(len(x.records) for x in ledgers):,} (other cities' cards are in two ledgers)")
    stages = {
        "checks only (no TAC)": Options(cities),
        "checks, then TACs in this process": Options(cities, keys, jobs=1),
        f"checks beside TACs in {args.jobs} forked proc.": Options(cities, keys, jobs=args.jobs),
    }
    findings: list[int] = []
    figures: dict[str, float] = {}
    print("ledgers in memory (algorithm and key version known, as from a database):")
    for name, options in stages.items():
        findings.append(len(timed(name, took, partial(reconcile, ledgers, options)).findings))
        figures[f"memory: {name}"] = took[-1]
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.folder or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        files = timed("write the clearing files (CSV)", took, lambda: write_files(records, folder))
        size = sum(path.stat().st_size for path, _ in files) / 2**20
        print(f"the {len(files)} clearing files ({size:,.0f} MiB):")
        timed("import pyarrow (once per command)", took, lambda: importlib.import_module("pyarrow.csv"))
        timed("read by the line reader (before)", took, lambda: [read_clearing_file(*f, columnar=False) for f in files])
        figures["files: read, line reader (before)"] = took[-1]
        read = timed("read by the columnar reader", took, lambda: [read_clearing_file(*f) for f in files])
        figures["files: read, columnar reader"] = took[-1]
        for name, options in stages.items():
            findings.append(len(timed(name, took, partial(reconcile, read, options)).findings))
            figures[f"files: {name}"] = took[-1]
        print("the whole command, end to end (a new process: start, read, reconcile, write the reports):")
        command = [str(f if holder is None else f"{holder}={f}") for f, holder in files]
        timed(f"yikatong audit reconcile --jobs {args.jobs}", took, partial(run_command, command, args.jobs, folder))
        figures["files: yikatong audit reconcile (whole)"] = took[-1]
    print(f"findings {max(findings)} (every run: {findings})")
    print(f"{'':<52}{'seconds':>9} {'records/s':>12}")
    for name, seconds in figures.items():
        print(f"{name:<52}{seconds:9.2f} {args.records / seconds:12,.0f}")
    before, after = figures["files: read, line reader (before)"], figures["files: read, columnar reader"]
    checks, tacs = figures["files: checks only (no TAC)"], figures["files: checks, then TACs in this process"]
    print(
        f"read: columnar {before / after:.1f}x the line reader | TACs alone (in this process) {tacs - checks:.2f} s "
        f"| whole command {figures['files: yikatong audit reconcile (whole)']:.1f} s (aim < 5 s)"
    )


def run_command(files: list[str], jobs: int, folder: Path) -> None:
    """``yikatong audit reconcile FILES`` in a new Python process, its reports into ``folder``."""
    reports = ["--json", str(folder / "audit-reconcile.json"), "--html", str(folder / "audit-reconcile.html")]
    argv = ["audit", "reconcile", *files, "--jobs", str(jobs), *reports]
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from yikatong.cli import main; sys.exit(main(sys.argv[1:]))", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode not in (0, 1):  # 1: findings (none expected)
        raise RuntimeError(f"audit reconcile exited {done.returncode}: {done.stderr}")


if __name__ == "__main__":
    main()
