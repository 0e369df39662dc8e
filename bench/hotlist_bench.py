"""Benchmark: how fast one new blocked card reaches a network of terminals, and what a province list costs one.

(a) Propagation. 10,000 simulated terminals of three cities (``yikatong.loadgen``'s engine, as ``yikatong load``
    and bench/load_bench.py run it: a ``SimTerminal`` with its ``HotlistBook``, an outbox and an ``Uplink`` per
    terminal, one MQTT connection each, all in this process) tap at a low rate against a tiny acker; once every
    terminal is connected and has taken the retained lists, one card is put on its issuer's hotlist through the
    clearing's own path (its database, then the snapshot/delta publishing of ``clearing hotlist add``). Figures:
    from that add to each terminal holding the new version (p50, p99 over terminals, and how many got it), and
    to the first refusal of the card at a terminal of each city (the listed card is presented in every city at
    each pacing step until refused there).
(b) Memory for a 1,000,000-card province list: three issuers' lists of realistic CPU serials (``3104`` + city +
    a 12-digit issue sequence, as ``cardsim.personalise.application_serial``; each city issued some millions of
    cards in sequence and a random share of them is blocked), held as ``terminals.hotlist.CardSet`` (its
    ``nbytes`` and what tracemalloc sees), beside a naive ``frozenset[str]`` of the same ids, and the compressed
    snapshot a terminal downloads (zlib, and as the base64 chunks on the wire).

    python3 bench/hotlist_bench.py [--broker private|mqtt://127.0.0.1:1883] [--terminals 10000]
        [--listed 10] [--cards 1000000] [--skip-propagation] [--skip-memory]

Not a test: it prints figures and asserts nothing. The broker is a private Mosquitto by default (see
bench/load_bench.py, whose broker, acker and session clean-up it reuses).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import random
import secrets
import sys
import tempfile
import time
import tracemalloc
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cardsim.personalise import application_serial
from clearing.db import migrate, open_engine
from terminals.hotlist import CardSet, HotlistBook, encode_chunks
from terminals.mqtt import BrokerUrl
from terminals.outbox import MemoryOutbox
from yikatong.load_cli import hotlist_adder
from yikatong.load_report import percentiles_ms
from yikatong.loadgen import HotlistPlan, LoadRun, Plan, SimTerminal, TimedQueue, terminal_numbers
from yikatong.process import setup_logging

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))  # the clearing's messages, as the tests make them
sys.path.insert(0, str(Path(__file__).parent))
from hotlist_support import snapshot
from load_bench import CITIES, HOST, _cards, acker_process, broker_for, forget_sessions

ISSUED = {"4510": 9_000_000, "4560": 7_000_000, "4530": 4_000_000}
"""Cards each city issued (its sequences 0..n-1): about one per inhabitant of Jinan, Yantai and Zibo."""
MIB = 1024 * 1024


# --- (b) memory of a province list ------------------------------------------------------------------------


def province_list(total: int, seed: int = 19) -> list[str]:
    """``total`` blocked CPU serials over the three issuers, in proportion to the cards each issued."""
    rng = np.random.default_rng(seed)
    issued = sum(ISSUED.values())
    cards: list[str] = []
    for city, count in ISSUED.items():
        share = total * count // issued if city != CITIES[-1] else total - len(cards)
        sequences = rng.choice(count, size=share, replace=False)
        cards += [application_serial(city, int(s)).hex() for s in sequences]
    return cards


def traced(make: Callable[[], object]) -> tuple[object, int, int]:
    """(what ``make`` returns, bytes it still holds, peak bytes while it ran), as tracemalloc sees them."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        made = make()
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return made, held - before, peak - before


def _take(messages: list[tuple[str, str]]) -> HotlistBook:
    book = HotlistBook()
    for topic, payload in messages:
        book.offer(topic, payload)
    return book


def memory(total: int) -> None:
    """Part (b)."""
    print(
        f"(b) memory of a {total:,}-card province list ({', '.join(f'{c}: {n:,} issued' for c, n in ISSUED.items())})"
    )
    cards = province_list(total)
    began = time.perf_counter()
    compact, compact_held, compact_peak = traced(lambda: CardSet.of(cards))
    build = time.perf_counter() - began
    assert isinstance(compact, CardSet)
    # from the text a v1 list came in, so that the set's own strings are counted (not those of ``cards``)
    text = json.dumps(cards)
    naive, naive_held, naive_peak = traced(lambda: frozenset(json.loads(text)))
    assert isinstance(naive, frozenset)
    sha, chunks = encode_chunks(compact)
    wire = sum(len(c) for c in chunks)
    compressed = len(zlib.compress(compact.canonical(), 6))
    # what a terminal holds after taking the three issuers' snapshots off the wire, as they come (chunks, then head)
    messages = [m for city in CITIES for m in snapshot(city, 1, (c for c in cards if c[4:8] == city))]
    began = time.perf_counter()
    book, book_held, book_peak = traced(lambda: _take(messages))
    take = time.perf_counter() - began
    assert isinstance(book, HotlistBook) and len(book.versions()) == len(CITIES)
    probe = cards[len(cards) // 2]
    began = time.perf_counter()
    for _ in range(10_000):
        _ = probe in compact
    lookup_us = (time.perf_counter() - began) / 10_000 * 1e6
    rows = [
        ("CardSet.nbytes (arrays)", compact.nbytes, ""),
        ("CardSet, tracemalloc held", compact_held, f"peak {compact_peak / MIB:.1f} MiB while built ({build:.1f} s)"),
        ("HotlistBook.nbytes", book.nbytes, "the three issuers' lists a terminal took off the wire"),
        ("HotlistBook, tracemalloc held", book_held, f"peak {book_peak / MIB:.1f} MiB while taken ({take:.1f} s)"),
        ("frozenset[str], tracemalloc held", naive_held, f"peak {naive_peak / MIB:.1f} MiB"),
        ("snapshot, zlib", compressed, f"{len(compact.canonical()) / MIB:.1f} MiB canonical"),
        ("snapshot on the wire (base64)", wire, f"{len(chunks)} chunks, sha256 {sha[:12]}…"),
    ]
    for name, size, note in rows:
        print(f"  {name:<34} {size / MIB:>8.2f} MiB  {size / total:>6.1f} B/card  {note}")
    print(f"  {len(compact.groups)} serial groups; a lookup takes {lookup_us:.1f} µs")


# --- (a) propagation to 10,000 terminals --------------------------------------------------------------------


async def propagation(broker: BrokerUrl, private: bool, terminals: int, folder: Path, before: int) -> None:
    """Part (a); each issuer's list holds ``before`` cards when the terminals connect."""
    seed = secrets.randbits(32)
    pairs = terminal_numbers(CITIES, terminals, random.Random(seed))
    sims = [SimTerminal(HOST, c, n, TimedQueue(MemoryOutbox()), 200) for c, n in pairs]
    roster = folder / f"terminals-{terminals}.txt"
    roster.write_text("\n".join(n for _, n in pairs) + "\n")
    cards = _cards(2 * terminals, seed)
    listed = cards[CITIES[0]][0]  # the clearing's own path (its database, then publishing), as yikatong load

    def database(city: str) -> str:
        return f"sqlite:///{folder / f'clearing-{city}.sqlite'}"

    add = hotlist_adder(broker, database)
    for city in CITIES:  # what a clearing does at start; the add is timed from the hotlist add on
        engine = open_engine(database(city))
        await migrate(engine)
        await engine.dispose()
        # lists in place before (a snapshot each, taken at connect), so that the one new card goes as a delta
        await add(city, [application_serial(city, 10**11 + i).hex() for i in range(before)])
    # the add comes 60 s after the taps start, when every terminal holds the retained lists (checked below): this
    # one process takes the 10,000 terminals' nine retained messages one after the other, ~0.3 ms each
    load = LoadRun(broker, sims, cards, Plan(20.0, 75.0), seed=seed, hotlist=HotlistPlan(60.0, [listed], add))
    print(
        f"(a) propagation of one new blocked card ({listed.issuer} {listed.serial}) to {terminals:,} terminals, "
        f"{before:,} cards on each city's list before"
    )
    try:
        with acker_process(broker, roster):
            await load.run(lambda _p: None, connect_timeout=180, drain_timeout=10)
    finally:
        if not private:
            await forget_sessions(broker, [f"yikatong-terminal-{n}" for _, n in pairs])
    news = load.propagation
    added = news.added if news.added is not None else float("inf")
    ready = sum(1 for t in sims if all((t.held_since(city, 1) or added) < added for city in CITIES))
    print(f"  at the add, {ready:,} of {terminals:,} terminals held the three lists from their snapshots")
    holding = news.holding(load.terminals)
    held = percentiles_ms(holding)
    published = ", ".join(f"{i} version {v} in {news.published[i] * 1000:.0f} ms" for i, v in news.versions.items())
    print(f"  connected in {load.connect_seconds:.1f} s; stored and published (PUBACK): {published}")
    print(
        f"  holding the new version: {len(holding):,} of {terminals:,} terminals, "
        f"p50 {held['p50']} ms  p99 {held['p99']} ms  (from the add)"
    )
    firsts = "  ".join(f"{city} {news.first_refusal[city] * 1000:.0f} ms" for city in sorted(news.first_refusal))
    print(f"  first refusal of the card: {firsts or '-'}")


def main(args: argparse.Namespace) -> None:
    setup_logging(logging.ERROR)
    print(f"hotlist bench on {os.cpu_count()} cores\n")
    if not args.skip_memory:
        memory(args.cards)
        print()
    if not args.skip_propagation:
        folder = Path(tempfile.mkdtemp(prefix="hotlist-bench-"))
        with broker_for(args.broker, folder) as (broker, pid):
            asyncio.run(propagation(broker, pid is not None, args.terminals, folder, args.listed))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", default="private", help="private (a Mosquitto of the bench's own) or a URL")
    parser.add_argument("--terminals", type=int, default=10_000, help="part (a) terminals over three cities")
    parser.add_argument("--listed", type=int, default=10, help="part (a) cards on each list before the add")
    parser.add_argument("--cards", type=int, default=1_000_000, help="part (b) cards on the province list")
    parser.add_argument("--skip-propagation", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    main(parser.parse_args())
