"""``yikatong demo``: the whole pipe on one machine. Issue a fleet for Jinan, Yantai and Zibo, run a day of riders
through the terminals of the three cities (real APDU and Crypto-1 flows, PSAMs, durable outboxes), publish every
record over MQTT to the three clearings, settle the day, audit the chips and reconcile the ledgers; print a summary
and write one HTML report.

Defaults need nothing but pip: an embedded MQTT broker in this process and SQLite files in the run folder.
``--broker`` and ``--db`` put the same run onto Mosquitto and PostgreSQL; ``--broker mqtts://... --pki DIR`` runs
it over TLS, each terminal and clearing with its own certificate from the PKI folder (issued beforehand with
``--issue-certificates-only``: the broker reads its ACL at start and on SIGHUP). ``--cluster`` runs it on a 3-node
NATS cluster started in the run folder: the terminals spread over the nodes' MQTT listeners, the clearings as
JetStream workers (two a city on different nodes), the cluster stopped when the pipe ends, however it ends.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import secrets
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

from yikatong.argtypes import Subcommands, broker_url, database_url, file_path, load_keys, positive
from yikatong.errors import CliError
from yikatong.pki_devices import as_device, check_pki_options, issue_certificates, require_certificates

# the whole product runs in a demo; its layers are imported by the phases that use them, so that the other
# commands (which import this module for its options) start without them
if TYPE_CHECKING:
    import asyncio

    from sqlalchemy.ext.asyncio import AsyncEngine

    from audit.findings import Report
    from audit.reconcile import Cities
    from cardsim.keys import IssuerKeyStore
    from clearing.identity import Identities
    from clearing.pki import Identity
    from clearing.service import ClearingService
    from clearing.settlement import Settlement
    from terminals.metro import FareTable
    from terminals.mqtt import BrokerUrl
    from terminals.terminal import TapResult, Terminal, TerminalConfig
    from yikatong.demo_world import Day, DemoCard
    from yikatong.nats_cluster import Node

DEFAULT_KEYS = "keys/fleet-keys.json"  # issuer keys that are not the published test keys: the audit tells them apart
RUN_FILES = ["cards", "terminals", "clearing-files", "clearing.sqlite", "report.html"]
RUN_FILES += ["audit-chips.json", "audit-reconcile.json"]
M1_RECOVERY_SECONDS = 20.0  # a card's key-recovery budget in the demo (a weak-PRNG card falls in about 10 s)
STOP_SECONDS = 30.0  # terminals and clearings stop well within it: each one's disconnect is bounded by 10 s
M1_FLEET_SECONDS = 35.0  # all M1 cards together: the demo stays under a minute on a busy machine, and says so
CLUSTER_FOLDER = "nats-cluster"  # --cluster: the nodes' configs, logs, JetStream stores and cluster.json, in --out
CLUSTER_START_SECONDS = 60.0  # three nodes are ready in about a second; a busy machine gets time
# --cluster: clearing workers a city, on different nodes, sharing one engine (SQLite's too: its writes wait their
# turn under the busy timeout; no run of 1,600 taps lost or doubled a record)
CLUSTER_WORKERS = 2


def register(groups: Subcommands) -> None:
    """Add the ``demo`` command."""
    demo = groups.add_parser(
        "demo",
        help="run the whole pipeline (cards, terminals, MQTT, clearing, settlement, audit) and print a summary",
        description="Issue a fleet for Jinan 4510, Yantai 4560 and Zibo 4530 (CPU 3DES and SM4 purses, legacy M1 "
        "cards, plus a planted clone, a tampered M1 card and three weak chips), run a day of riders through bus, metro "
        "and top-up terminals of the three cities (some riders take the train to another city), publish the "
        "records over MQTT to the three clearings, settle the day, audit the chips and reconcile the ledgers. "
        "Prints a summary table and writes report.html, the reports' JSON, the clearing files and the card images "
        "into --out. Exit 0 when every record was cleared and the settlement balances, 1 otherwise.",
        epilog="Examples: yikatong demo | yikatong demo --cluster | yikatong demo --broker mqtt://127.0.0.1:1883 "
        "--db postgresql+asyncpg://postgres@127.0.0.1/demo | over TLS (README): yikatong demo --pki pki "
        "--issue-certificates-only, (re)start Mosquitto, then yikatong demo --broker mqtts://127.0.0.1:8883 --pki pki",
    )
    demo.add_argument("--out", type=file_path, default=Path("run/demo"), help="run folder (default %(default)s)")
    demo.add_argument(
        "--broker",
        type=broker_url,
        help="mqtt://[user:password@]host[:port], or mqtts://host[:port] with --pki (default: embedded, plain)",
    )
    demo.add_argument(
        "--pki",
        type=file_path,
        metavar="DIR",
        help="a 'yikatong pki init' folder: over mqtts:// each of the demo's terminals and clearings connects with "
        "its own certificate from DIR/devices, signs or checks records with it, and the clearings read DIR/crl.pem",
    )
    demo.add_argument(
        "--issue-certificates-only",
        action="store_true",
        help="issue into --pki the certificates the demo's terminals and clearings (for this --seed and --cards) "
        "lack, keep the valid ones, and exit; then start the broker or send it SIGHUP (it reads the ACL then)",
    )
    demo.add_argument(
        "--cluster",
        action="store_true",
        help=f"run on a 3-node NATS cluster (nats-server) started in OUT/{CLUSTER_FOLDER} and stopped at the end: "
        "terminal i on node i %% 3 over MQTT 3.1.1, each city's clearing workers taking its records from a "
        "JetStream stream replicated on the three nodes, two workers a city on different nodes sharing the "
        "database (the SQLite file or --db); the summary names each worker's stored records. Not with --broker or "
        "--pki",
    )
    demo.add_argument(
        "--db",
        type=database_url,
        help="clearing database: sqlite:///FILE or postgresql+asyncpg://... (default: clearing.sqlite in --out)",
    )
    demo.add_argument("--cards", type=positive, default=3, help="cards per city of each kind (default 3)")
    demo.add_argument("--rides", type=positive, default=240, help="riders' taps over the day (default 240)")
    demo.add_argument("--seed", type=int, default=2009, help="random seed, for a repeatable day (default 2009)")
    demo.add_argument("--keys", type=file_path, help=f"issuer key file (default: fixtures/{DEFAULT_KEYS})")
    demo.set_defaults(run=run)


class Bar:
    """A progress bar on stderr, redrawn in place on a terminal; a line per phase (and per quarter) otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.started = time.monotonic()

    def phase(self, text: str) -> None:
        """A new phase begins."""
        self._write(f"[{time.monotonic() - self.started:5.1f} s] {text}", final=True)

    def step(self, label: str, done: int, total: int) -> None:
        """Progress within a phase."""
        if self.tty:
            filled = 30 * done // max(1, total)
            self._write(f"  {label} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total}", final=done == total)
        elif done == total or (4 * done // total) != (4 * (done - 1) // total):
            self._write(f"  {label} {done}/{total}", final=True)

    def _write(self, text: str, final: bool) -> None:
        if self.tty:
            sys.stderr.write("\r\033[K" + text + ("\n" if final else ""))
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()


@dataclass
class Cleared:
    """What the pipe did: tap outcomes per city, records per city, the settlement, what is still waiting."""

    taps: Counter[tuple[str, str]] = field(default_factory=Counter)  # (city, status)
    records: dict[str, int] = field(default_factory=dict)
    flagged: int = 0
    quarantined: int = 0
    unacked: int = 0
    unforwarded: int = 0
    settlement: Settlement | None = None
    cluster: str = ""  # --cluster: the cluster, in words
    workers: dict[str, int] = field(default_factory=dict)  # --cluster: records each clearing worker stored


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every record was cleared and the settlement sums to zero."""
    from audit.chips import audit_fleet
    from audit.cpu_audit import KeySource
    from audit.fleet import FleetCard
    from audit.html import render_combined
    from audit.ledger_sources import LedgerInputError, read_cities
    from audit.m1_audit import KeyRecovery
    from cardsim.files import write_text_atomic
    from cardsim.image import save_card
    from cardsim.keys import IssuerKeyStore
    from cardsim.resources import fixture_path
    from terminals.metro import FareTable
    from yikatong.demo_world import issue_fleet, plan_day, terminals

    out: Path = args.out
    keys = load_keys(args.keys or fixture_path(DEFAULT_KEYS))
    _check_options(args)
    bar = Bar()
    rng = random.Random(args.seed)
    bar.phase(f"issuing the fleet ({args.cards} cards of each kind per city, plus the planted ones)")
    try:
        cities = read_cities()
    except LedgerInputError as err:
        raise CliError(str(err)) from err
    fares = FareTable.load()
    fleet = issue_fleet(keys, args.cards, rng)
    configs = terminals(fares, rng)  # after the fleet: the same seed and --cards give the same terminal numbers
    if args.issue_certificates_only:
        return issue_certificates(args.pki, _demo_devices(configs), "the demo's")
    if args.pki is not None:
        issuing = f"'yikatong demo --pki {args.pki} --issue-certificates-only' with the same --seed and --cards"
        require_certificates(args.pki, _demo_devices(configs), "the demo's", issuing)
    db_url = _prepare_run(out, args.db)
    day = plan_day(fleet, configs, args.rides, rng, cities.travel_minutes)
    cards = day.cards
    cleared = _cleared(args, _Run(keys, fares, day, out, bar, rng, args.pki), db_url)
    for card in cards:
        save_card(out / "cards" / f"{card.name}.json", card.state)
    bar.phase("auditing the chips (through each card's own interface)")
    sources = [
        KeySource("published test keys", IssuerKeyStore.test_set(), True),
        KeySource("issuer keys", keys, keys.test_keys),
    ]
    chips = audit_fleet(
        # the issuer's records name each card's city: the report shows it for M1 cards whose block 1 stays unread
        [FleetCard(card.name, card.state, issued_for=card.home) for card in cards],
        sources,
        [f"demo fleet ({len(cards)} cards)"],
        active=False,
        # every M1 card through the whole key-recovery chain, a bounded time each (the report says when it ran out)
        recovery=KeyRecovery(max_seconds=M1_RECOVERY_SECONDS, fleet_seconds=M1_FLEET_SECONDS),
    )
    bar.phase("reconciling the three cities' ledgers")
    recon = _reconcile(db_url, keys, cities, out)
    page = render_combined("yikatong demo: chip audit and reconciliation", [chips, recon])
    write_text_atomic(out / "report.html", page)
    write_text_atomic(out / "audit-chips.json", json.dumps(chips.to_json(), indent=1) + "\n")
    write_text_atomic(out / "audit-reconcile.json", json.dumps(recon.to_json(), indent=1) + "\n")
    bar.phase("done")
    _summary(day, cleared, chips, recon, out)
    balanced = cleared.settlement is not None and sum(cleared.settlement.positions.values()) == 0
    return 0 if balanced and cleared.unacked == 0 and cleared.unforwarded == 0 else 1


def _check_options(args: argparse.Namespace) -> None:
    """CliError for options that do not go together."""
    if args.cluster and (args.broker is not None or args.pki is not None):
        raise CliError("--cluster runs on its own NATS cluster: not with --broker or --pki")
    check_pki_options(args)


def _cleared(args: argparse.Namespace, run: _Run, db_url: str) -> Cleared:
    """The pipe on a NATS cluster (--cluster), on the --broker, or on an embedded broker."""
    import asyncio

    if args.cluster:
        return _on_cluster(run, db_url)
    return asyncio.run(_pipe(run, [args.broker] if args.broker else [], db_url))


def _demo_devices(configs: list[TerminalConfig]) -> list[Identity]:
    """The demo's clearings and terminals, as the PKI names them."""
    from clearing.pki import Identity
    from yikatong.demo_world import CITIES

    clearings = [Identity.clearing(city) for city in CITIES]
    return clearings + [Identity.terminal(config.terminal.hex().upper()) for config in configs]


def _identities(pki: Path | None, city: str) -> Identities | None:
    """A demo clearing's signature checks over TLS: its city's CA, the PKI's CRL; unsigned records refused."""
    from clearing.identity import Identities, IdentityError
    from clearing.pki import Identity
    from terminals.mqtt import TlsFiles

    if pki is None:
        return None
    folder = pki / "devices" / Identity.clearing(city).folder
    try:
        return Identities.of(city, TlsFiles.folder(folder), crl=pki / "crl.pem")
    except IdentityError as err:
        raise CliError(str(err)) from err


def _prepare_run(out: Path, db: str | None) -> str:
    """A fresh run folder, and the database URL: --db, or a SQLite file in the folder."""
    _fresh_run_folder(out)
    db_url = db or f"sqlite:///{out / 'clearing.sqlite'}"
    try:
        database_url(db_url)  # --db was checked by argparse; the default one names --out, which may not do
    except argparse.ArgumentTypeError as err:
        raise CliError(f"--out {out}: {err}") from err
    return db_url


def _fresh_run_folder(out: Path) -> None:
    """Create the run folder; remove what an earlier demo left there (only the demo's own files)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for sub in ("cards", "terminals", "clearing-files"):
            (out / sub).mkdir()
    except OSError as err:
        raise CliError(f"cannot prepare the run folder {out}: {err.strerror}") from err


@dataclass(frozen=True)
class _Run:
    """What every phase of the run works with."""

    keys: IssuerKeyStore
    fares: FareTable
    day: Day
    out: Path
    bar: Bar
    rng: random.Random
    pki: Path | None  # over mqtts://: the PKI folder of the devices' certificates


def _on_cluster(run: _Run, db_url: str) -> Cleared:
    """The pipe on a fresh 3-node NATS cluster in the run folder, stopped when the pipe ends however it ends
    (an error, Ctrl-C): its nodes run in their own sessions, so nothing else would stop them."""
    import asyncio

    from terminals.mqtt import BrokerUrl
    from yikatong.nats_cluster import CLUSTER_NAME, ClusterError, NatsCluster
    from yikatong.process import stop_on_sigterm

    stop_on_sigterm()  # a kill stops the cluster too, as Ctrl-C does
    folder = run.out / CLUSTER_FOLDER
    cluster = NatsCluster(folder, size=3)
    try:
        run.bar.phase(f"starting a 3-node NATS cluster in {folder} (JetStream, MQTT 3.1.1)")
        # fresh: no stream, consumer or MQTT session of an earlier run; a start that fails stops what it started
        cluster.start(timeout=CLUSTER_START_SECONDS, fresh=True)
        try:
            brokers = [BrokerUrl.parse(url) for url in cluster.mqtt_urls]
            cleared = asyncio.run(_pipe(run, brokers, db_url, cluster.nodes))
        finally:
            cluster.stop()
    except ClusterError as err:
        raise CliError(f"NATS cluster: {err}") from err
    nodes = ", ".join(f"{n.name} {n.nats_url} mqtt :{n.mqtt_port}" for n in cluster.nodes)
    cleared.cluster = f"NATS cluster {CLUSTER_NAME!r} in {folder} ({nodes}), stopped"
    return cleared


async def _pipe(run: _Run, given: list[BrokerUrl], db_url: str, nodes: Sequence[Node] = ()) -> Cleared:
    """Clearings and terminals over MQTT, the day's taps, then the settlement. ``given``: the brokers (none: an
    embedded one), the terminals spread over them; ``nodes``: a NATS cluster's, whose MQTT listeners ``given``
    are: the clearings then take their cities' records from JetStream, ``CLUSTER_WORKERS`` a city."""
    import asyncio

    from sqlalchemy.exc import SQLAlchemyError

    from cardsim.files import write_text_atomic
    from clearing.db import DatabaseUrlError, migrate, open_engine
    from clearing.settlement import export_day, settle_day
    from terminals.mqtt import given_or_embedded
    from yikatong.demo_world import CITIES, DAY

    try:
        engine = open_engine(db_url)
    except DatabaseUrlError as err:
        raise CliError(str(err)) from err
    cleared = Cleared()
    try:
        await migrate(engine)
        await _require_empty(engine, db_url)
        async with given_or_embedded(given[0] if given else None) as first:
            brokers = [first, *given[1:]]
            workers = CLUSTER_WORKERS if nodes else 1
            where = f"the cluster's {len(nodes)} nodes, {workers} a city" if nodes else str(first)
            run.bar.phase(f"starting the three clearings on {where} (database {db_url.partition('://')[0]})")
            placed = _clearings(run, brokers, nodes, engine, workers)
            services = [service for service, _ in placed]
            tasks = [asyncio.create_task(s.run(), name=f"clearing {s.city} {s.worker}") for s in services]
            try:
                await _until(lambda: all(s.stats.connected for s in services), 30, "the clearings to connect")
                await _ride(run, brokers, cleared)
                run.bar.phase("settling the day between the cities")
                cleared.records = {city: sum(s.stats.stored for s in services if s.city == city) for city in CITIES}
                if nodes:
                    cleared.workers = {f"{s.city} {s.worker} on {nodes[at].name}": s.stats.stored for s, at in placed}
                cleared.quarantined = sum(s.stats.quarantined for s in services)
                cleared.flagged = sum(s.stats.conflicts for s in services)
                # one worker a city: a city's workers share its ledger
                one_a_city = list({s.city: s for s in services}.values())
                cleared.unforwarded = await _unanswered_forwards(one_a_city, timeout=30)
            finally:
                await _stop(tasks)
        cleared.settlement = await settle_day(engine, DAY.isoformat(), {}, Decimal("0.005"))
        await export_day(engine, DAY.isoformat(), run.out / "clearing-files")
        settlement_file = run.out / "clearing-files" / f"settlement-{DAY.isoformat()}.json"
        write_text_atomic(settlement_file, json.dumps(cleared.settlement.to_json(), indent=2) + "\n")
    except (SQLAlchemyError, OSError) as err:
        raise CliError(f"database {db_url}: {str(err).splitlines()[0]}") from err
    finally:
        await engine.dispose()
    return cleared


def _clearings(
    run: _Run, brokers: list[BrokerUrl], nodes: Sequence[Node], engine: AsyncEngine, workers: int
) -> list[tuple[ClearingService, int]]:
    """``workers`` clearing workers a city, each with the index of its broker (and node): worker j of the n-th
    city on broker n + j, so that a city's workers are on different nodes."""
    from cardsim.issuer import IssuerHost
    from clearing.intake import Intake
    from clearing.jetstream import JetStreamSettings, JetStreamSource
    from clearing.ledger import Ledger
    from clearing.pki import Identity
    from clearing.service import ClearingService
    from terminals.messages import txn_topic
    from yikatong.demo_world import CITIES

    host = IssuerHost(run.keys)
    run_id = secrets.token_hex(3)  # a fresh MQTT identity: no session of an earlier run is resumed
    placed = []
    for n, city in enumerate(CITIES):
        for j in range(workers):
            at = (n + j) % len(brokers)
            worker = f"demo-{run_id}-{j + 1}"
            service = ClearingService(
                as_device(brokers[at], run.pki, Identity.clearing(city)),
                Ledger(engine, city),
                Intake(city, host, identities=_identities(run.pki, city)),
                worker=worker,
                persistent=False,
                # only the demo's own terminals: a shared broker carries other traffic too
                terminal_topics=[txn_topic(city, t.terminal.hex().upper()) for t in run.day.terminals_of(city)],
                # only its own node's address: the worker starts there, and nats-py learns the others from the
                # cluster (to move to one when its node dies)
                source=JetStreamSource(city, JetStreamSettings((nodes[at].nats_url,)), worker) if nodes else None,
            )
            placed.append((service, at))
    return placed


async def _require_empty(engine: AsyncEngine, db_url: str) -> None:
    """CliError when the database already holds records: the demo needs an empty one."""
    from sqlalchemy import func, select

    from clearing.schema import LEDGER

    async with engine.connect() as db:
        if (await db.execute(select(func.count()).select_from(LEDGER))).scalar_one():
            raise CliError(f"database {db_url} already holds records: the demo needs an empty one")


async def _ride(run: _Run, brokers: list[BrokerUrl], cleared: Cleared) -> None:
    """Every tap of the day at its terminal, records published as they are made (terminal i over broker
    i mod the brokers); then wait for every ack."""
    import asyncio

    from cardsim.issuer import IssuerHost
    from clearing.pki import Identity
    from terminals.outbox import Outbox
    from terminals.terminal import Terminal
    from terminals.uplink import Uplink
    from yikatong.demo_world import tamper

    now = [run.day.taps[0].when if run.day.taps else dt.datetime.now()]
    host = IssuerHost(run.keys)
    by_number: dict[bytes, tuple[Terminal, Uplink]] = {}
    for i, config in enumerate(run.day.terminals):
        outbox = Outbox(
            run.out / "terminals" / f"{config.city}-{config.kind.value}-{config.terminal.hex().upper()}.sqlite"
        )
        terminal = Terminal(config, outbox, run.keys, fares=run.fares, host=host, clock=lambda: now[0])
        device = as_device(brokers[i % len(brokers)], run.pki, Identity.terminal(config.terminal.hex().upper()))
        by_number[config.terminal] = (terminal, Uplink(device, terminal, ack_timeout=3.0, max_backoff=2.0))
    tasks = [asyncio.create_task(u.run(), name=f"terminal {u.number}") for _, u in by_number.values()]
    try:
        run.bar.phase(f"riding: {len(run.day.taps)} taps at {len(run.day.terminals)} terminals of 3 cities")
        for i, tap in enumerate(run.day.taps):
            if i == run.day.tamper_at:
                tamper(run.day.fleet.tampered)
            terminal, uplink = by_number[tap.terminal.terminal]
            now[0] = tap.when
            result = _tap(terminal, tap.card, run.rng)
            cleared.taps[(tap.terminal.city, result.status)] += 1
            uplink.notify()
            run.bar.step("taps", i + 1, len(run.day.taps))
            await asyncio.sleep(0)  # let the uplinks and clearings work while riders tap
        run.bar.phase("waiting for the clearings' acks")
        uplinks = [u for _, u in by_number.values()]
        await _until(lambda: all(u.all_acked() for u in uplinks), 60, "the acks", quiet=True)
        cleared.unacked = sum(t.outbox.queued() for t, _ in by_number.values())
    finally:
        await _stop(tasks)
        for terminal, _ in by_number.values():
            terminal.outbox.close()


async def _stop(tasks: list[asyncio.Task[None]], timeout: float = STOP_SECONDS) -> None:
    """Cancel the tasks and wait until they have ended (what they raise no longer matters: the run is over).
    Those still running are cancelled again every second: a cancel can be lost in code this one does not own (an
    answer that comes in the same turn of the event loop); CliError naming them after ``timeout`` seconds."""
    import asyncio

    deadline = time.monotonic() + timeout
    running = set(tasks)
    while running:
        if time.monotonic() > deadline:
            names = ", ".join(sorted(task.get_name() for task in running))
            raise CliError(f"gave up stopping {len(running)} tasks after {timeout:.0f} s: {names}")
        for task in running:
            task.cancel()
        _, running = await asyncio.wait(running, timeout=1)
    for task in tasks:  # retrieved, so that asyncio does not log them as never retrieved
        if not task.cancelled():
            task.exception()


async def _unanswered_forwards(services: list[ClearingService], timeout: float) -> int:
    """Wait until every forwarded record has its issuer's answer (they come after the terminals' acks); how many
    are still unanswered when ``timeout`` runs out."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        waiting = 0
        for service in services:
            waiting += len(await service.ledger.pending_forwards(older_than=time.time() + 1))
        if not waiting or time.monotonic() > deadline:
            return waiting
        await asyncio.sleep(0.1)


def _tap(terminal: Terminal, card: DemoCard, rng: random.Random) -> TapResult:
    from cardsim.mifare import M1Card, M1State
    from cardsim.purse import PurseCard
    from terminals.reader import InProcessReader

    if isinstance(card.state, M1State):
        chip = M1Card(card.state, rng.randbytes)
        chip.power_on()
        return terminal.tap_m1(chip)
    return terminal.tap(InProcessReader(PurseCard(card.state, rng.randbytes), card.name))


async def _until(done: Callable[[], bool], timeout: float, what: str, *, quiet: bool = False) -> None:
    import asyncio

    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            if quiet:
                return  # the summary says what is still waiting
            raise CliError(f"gave up waiting for {what} after {timeout:.0f} s")
        await asyncio.sleep(0.05)


def _reconcile(db_url: str, keys: IssuerKeyStore, cities: Cities, out: Path) -> Report:
    from audit.ledger_sources import LedgerInputError, read_database, read_settlement
    from audit.reconcile import Options, reconcile
    from yikatong.demo_world import DAY

    try:
        ledgers = read_database(db_url, DAY.isoformat())
        claimed = read_settlement(out / "clearing-files" / f"settlement-{DAY.isoformat()}.json")
        return reconcile(ledgers, Options(cities, keys, claimed, DAY.isoformat()))
    except LedgerInputError as err:
        raise CliError(str(err)) from err


def _summary(day: Day, cleared: Cleared, chips: Report, recon: Report, out: Path) -> None:
    """Print what the run did: per city, the settlement, the planted cards, what the audits found, the files."""
    print()
    _print_cities(cleared)
    print(f"planted: {'; '.join(f'{c.name} ({c.planted})' for c in day.cards if c.planted)}")
    print()
    _print_chip_audit(chips)
    counts = ", ".join(f"{rule} {n}" for rule, n in recon.checks.items() if n)
    print(f"reconciliation: findings {counts or 'none'}")
    print(f"  hotlist ({len(recon.hotlist)}): {' '.join(recon.hotlist) or '-'}")
    print()
    print(f"report: {out / 'report.html'}  (JSON: audit-chips.json, audit-reconcile.json)")
    print(f"clearing files: {out / 'clearing-files'}; card images: {out / 'cards'}")


def _print_cities(cleared: Cleared) -> None:
    """A row per city (taps, ledger rows, net position), then the settlement and what is left waiting."""
    from terminals.inspect import yuan
    from yikatong.demo_world import CITIES, DAY

    positions = cleared.settlement.positions if cleared.settlement else {}
    print(f"{'city':<12} {'taps':>5} {'ok':>5} {'refused':>8} {'ledger rows':>12} {'net position (yuan)':>20}")
    for code, name in CITIES.items():
        taps = sum(n for (city, _), n in cleared.taps.items() if city == code)
        ok = cleared.taps[(code, "ok")]
        net = positions.get(code, 0)
        signed = yuan(net) if net >= 0 else "-" + yuan(-net)
        print(f"{code} {name:<7} {taps:>5} {ok:>5} {taps - ok:>8} {cleared.records.get(code, 0):>12} {signed:>20}")
    total = sum(positions.values())
    print(
        f"settlement {DAY.isoformat()}: net positions sum to {total} fen; {cleared.unacked} records unacked, "
        f"{cleared.unforwarded} forwards unanswered, {cleared.quarantined} quarantined, {cleared.flagged} conflicts"
    )
    if cleared.cluster:
        print(cleared.cluster)
        print("clearing workers' stored records: " + ", ".join(f"{w} {n}" for w, n in cleared.workers.items()))


def _print_chip_audit(chips: Report) -> None:
    """The counts by severity, then per rule at or above medium the cards it found (three named)."""
    from audit.findings import Severity

    counts = ", ".join(f"{label} {n}" for label, n in chips.counts().items() if n)
    print(f"chip audit: {len(chips.subjects)} cards; findings by severity: {counts or 'none'}")
    names = {str(s.get("subject")): str(s.get("source")) for s in chips.subjects}
    by_rule: dict[str, list[str]] = {}
    for f in chips.findings:
        if f.severity >= Severity.MEDIUM:
            by_rule.setdefault(f"{f.severity.label:<8} {f.id}", []).append(names.get(f.subject, f.subject))
    for rule, subjects in by_rule.items():
        cards = sorted(set(subjects))
        shown = ", ".join(cards[:3]) + (", ..." if len(cards) > 3 else "")
        print(f"  {rule:<32} {len(cards):>3} card{'s' if len(cards) > 1 else ' '}  {shown}")
    m1 = [s for s in chips.subjects if s.get("tech") == "m1"]
    if m1:
        whole = sum(s.get("keys known") == "32 of 32" for s in m1)
        broken: dict[str, int] = {}
        for s in m1:
            for part in str(s.get("keys broken by") or "").split(", "):
                if part:
                    how, n = part.rsplit(" ", 1)
                    broken[how] = broken.get(how, 0) + int(n)
        seconds = sum(float(str(s.get("recovery seconds") or 0)) for s in m1)
        attacks = ", ".join(f"{how} {n} keys" for how, n in sorted(broken.items())) or "no attack needed"
        print(
            f"M1 key recovery: {whole} of {len(m1)} cards with all 32 keys ({attacks}; the rest from the public "
            f"dictionary or keys broken on another card), {seconds:.1f} s"
        )
