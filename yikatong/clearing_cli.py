"""``yikatong clearing ...``: run a city's clearing service, settle a day and export the clearing files,
manage the hotlist, migrate and inspect the database."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING

from clearing.defaults import ACK_WAIT, DEFAULT_GRACE, HEALTH_EVERY, QUARANTINE_CAP
from terminals.limits import MAX_DEPTH, MAX_PAYLOAD, MAX_RECORDS, MAX_STRING
from yikatong.argtypes import (
    Subcommands,
    broker_options,
    city_code,
    command_group,
    database_url,
    file_path,
    interval,
    load_keys,
    positive,
    session_expiry,
    tcp_port,
)
from yikatong.errors import CliError
from yikatong.process import setup_logging, stop_on_sigterm

# the database, MQTT and message layers are imported by the commands that use them: --help and the other
# commands start without them
if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from clearing.hotlist import Published
    from clearing.identity import Identities
    from clearing.intake import Intake
    from clearing.jetstream import JetStreamSource
    from clearing.ledger import HotlistAdded, HotlistHead, ListedCard
    from clearing.service import ClearingStats
    from clearing.settlement import Settlement
    from terminals.mqtt import BrokerUrl

log = logging.getLogger("yikatong.clearing")
DEFAULT_DB = "sqlite:///clearing.sqlite"


def register(groups: Subcommands) -> None:
    """Add the ``clearing`` command group."""
    sub = command_group(
        groups,
        "clearing",
        help_text="run a city's clearing (verify, store once, ack, forward), settle, hotlist",
        description="The clearing receives the terminals' records over MQTT, verifies them, stores each once, "
        "acks them, forwards other cities' cards to their issuer, settles between cities and publishes the hotlist.",
    )

    serve = sub.add_parser(
        "serve",
        help="run the clearing service of one city until Ctrl-C",
        description="Subscribe to the city's terminal topics and its interop topics, verify each record (schema, "
        "sender, issuer, hotlist, TAC), store it once, commit, then ack. Refused records go to the quarantine "
        "with their reason and are acked as rejected. Several workers of one city can share the load with "
        "--shared (MQTT 5 shared subscription, e.g. on Mosquitto) and one PostgreSQL database, or on a NATS "
        "cluster with --jetstream (the city's JetStream stream, each record acked to the stream after the commit; "
        "docs/cluster.md).",
        epilog="Examples: yikatong clearing serve --city 4510 --broker mqtt://127.0.0.1:1883 "
        "--db postgresql+asyncpg://postgres@127.0.0.1/test --shared --worker a | on a NATS cluster "
        "(scripts/nats-cluster.sh start): yikatong clearing serve --city 4510 --broker "
        "'mqtt://127.0.0.1:MQTT_PORT?mqtt=3.1.1' --jetstream nats://127.0.0.1:P1,nats://127.0.0.1:P2,"
        "nats://127.0.0.1:P3 --db postgresql+asyncpg://postgres@127.0.0.1/test --worker a",
    )
    serve.add_argument("--city", type=city_code, required=True, help="the city this clearing serves (4510, ...)")
    broker_options(serve, required=True)
    _db_option(serve)
    serve.add_argument("--keys", type=file_path, help="issuer key file (default: the published TEST keys)")
    serve.add_argument(
        "--shared", action="store_true", help="MQTT 5 shared subscription $share/clearing-CITY/... (several workers)"
    )
    serve.add_argument("--worker", default="1", help="worker name, unique per city (MQTT client id; default 1)")
    serve.add_argument("--batch", type=positive, default=500, help="most messages per commit (default 500)")
    serve.add_argument(
        "--forward-interval",
        type=interval,
        default=10.0,
        help="seconds before an unanswered forward is sent again (default 10)",
    )
    serve.add_argument(
        "--report-every", type=float, default=10.0, help="seconds between progress lines (default 10; 0: none)"
    )
    serve.add_argument(
        "--session-expiry",
        type=session_expiry,
        metavar="SECONDS",
        help="connect with MQTT 5 and let the broker forget this worker's session that long after it went away "
        "(default: an MQTT 3.1.1 session kept until the worker comes back; --shared: an hour)",
    )
    serve.add_argument(
        "--max-payload",
        type=positive,
        default=MAX_PAYLOAD,
        metavar="BYTES",
        help=f"larger messages are quarantined unread (default {MAX_PAYLOAD}; limits on records per batch "
        f"({MAX_RECORDS}), JSON depth ({MAX_DEPTH}) and string length ({MAX_STRING}) apply too)",
    )
    serve.add_argument(
        "--quarantine-cap",
        type=positive,
        default=QUARANTINE_CAP,
        metavar="N",
        help=f"refused messages kept per sender and day; past it they are only counted (default {QUARANTINE_CAP})",
    )
    serve.add_argument(
        "--health-every",
        type=interval,
        default=HEALTH_EVERY,
        metavar="SECONDS",
        help=f"seconds between retained health messages on yikatong/CITY/clearing/health (default {HEALTH_EVERY:g})",
    )
    serve.add_argument(
        "--metrics-port",
        type=tcp_port,
        metavar="PORT",
        help="serve Prometheus metrics on http://127.0.0.1:PORT/metrics (0: a free port, printed at start): records "
        "in/stored/quarantined/forwarded, batch commit seconds, queue depth, ack lag (docs/clearing-choices.md)",
    )
    _identity_options(serve)
    _jetstream_options(serve)
    serve.set_defaults(run=_serve)

    settle = sub.add_parser(
        "settle",
        help="settle one day between cities and write the daily clearing files (CSV)",
        description="For the day (00:00-24:00 +08:00) and each pair of cities: gross purchases of the issuer's "
        "cards at the acquirer's terminals, the interchange fee (per record, half-even) and what the issuer owes; "
        "then each city's net position (they sum to 0). A record of a card on its issuer's hotlist taken after "
        "that list version's publish time + grace is the acquirer's loss, before it the issuer's (both amounts "
        "per pair, each such record listed). Writes clearing-ACQUIRER-DAY.csv per acquirer and "
        "settlement-DAY.json into --out.",
        epilog="Example: yikatong clearing settle --day 2026-11-24 --out clearing-files/",
    )
    settle.add_argument("--day", type=_day, required=True, help="settlement day, YYYY-MM-DD")
    _db_option(settle)
    settle.add_argument("--city", type=city_code, help="only this acquirer city (default: every city in --db)")
    settle.add_argument("--out", type=file_path, default=Path(), help="folder for the files (default: here)")
    settle.add_argument(
        "--rate",
        type=_percent,
        default=Decimal("0.005"),
        help="interchange rate in percent for every pair (default 0.5)",
    )
    settle.add_argument(
        "--pair-rate",
        type=_pair_rate,
        action="append",
        default=[],
        metavar="ACQUIRER:ISSUER=PERCENT",
        help="the rate of one city pair, e.g. 4510:4560=0.4 (repeatable)",
    )
    settle.add_argument(
        "--hotlist-grace",
        type=_grace,
        action="append",
        default=[],
        metavar="SECONDS|ACQUIRER:ISSUER=SECONDS",
        help=f"seconds after an issuer published a hotlist version from which a record of a card on it is the "
        f"acquirer's loss: for every pair, or one pair, e.g. 4510:4560=300 (repeatable; default {DEFAULT_GRACE})",
    )
    settle.set_defaults(run=_settle)

    hotlist = sub.add_parser("hotlist", help="put cards on a city's hotlist and publish it (retained)")
    hot = hotlist.add_subparsers(dest="hotlist_command", metavar="ACTION", required=True)
    add = hot.add_parser(
        "add",
        help="add cards and publish the new hotlist version",
        description="Add cards (20-digit CPU serial or 8-hex-digit M1 UID) to the city's hotlist in the database "
        "as a new version and publish it, retained, to every terminal of the network: a small delta on "
        "yikatong/CITY/hotlist/delta, or a new full snapshot (compressed, in chunks) on "
        "yikatong/CITY/hotlist/snapshot/# when the changes since the last one are too many for a delta. The "
        "terminals refuse (and block) those cards; the clearing rejects their records.",
        epilog="Example: yikatong clearing hotlist add 45100000000000000001 --city 4510 --broker mqtt://127.0.0.1",
    )
    add.add_argument("serial", nargs="*", type=_card_id, metavar="SERIAL", help="card serial or M1 UID")
    add.add_argument(
        "--file",
        type=file_path,
        metavar="PATH",
        help="also the cards in this text file, one serial or UID a line (blank lines are skipped)",
    )
    add.add_argument(
        "--snapshot",
        action="store_true",
        help="publish a new full snapshot even when a delta would do (terminals far behind catch up from it)",
    )
    add.add_argument("--city", type=city_code, required=True, help="whose hotlist")
    broker_options(add, required=True)
    _db_option(add)
    add.set_defaults(run=_hotlist_add)
    show = hot.add_parser(
        "list",
        help="print a city's hotlist from the database",
        description="The city's hotlist version and its cards, each with the version that added it and when "
        "that version was first published to the broker (liability for its records counts from then).",
    )
    show.add_argument("--city", type=city_code, required=True)
    _db_option(show)
    show.set_defaults(run=_hotlist_list)

    status = sub.add_parser(
        "status",
        help="what the clearing database holds",
        description="Rows per city: ledger, quarantine "
        "(with the commonest reasons), flagged cards, forward status, hotlist version.",
    )
    _db_option(status)
    status.add_argument("--city", type=city_code, required=True)
    status.set_defaults(run=_status)

    mig = sub.add_parser(
        "migrate",
        help="create or upgrade the clearing database schema (serve does it too)",
        description="Bring the database to the newest schema revision (Alembic).",
    )
    _db_option(mig)
    mig.set_defaults(run=_migrate)


def _identity_options(serve: argparse.ArgumentParser) -> None:
    """``serve``'s --require-identity and --crl."""
    identity = serve.add_argument_group("terminal identity, over mqtts:// (docs/terminal-identity.md)")
    identity.add_argument(
        "--require-identity",
        action=argparse.BooleanOptionalAction,
        help="refuse (quarantine) a terminal message that is not signed with the certificate of the topic's "
        "terminal (default: on with an mqtts:// --broker; signed messages are checked either way, against the CA "
        "of --tls-dir/--ca and the CA that issued this clearing's certificate)",
    )
    identity.add_argument(
        "--crl", type=file_path, metavar="FILE", help="the PKI's crl.pem: certificates it revokes sign nothing"
    )


def _jetstream_options(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "NATS cluster (docs/cluster.md)",
        "With --jetstream the records come from the city's JetStream stream (made when missing: the city's "
        "terminal subjects and interop subjects, work-queue, one durable consumer clearing-CITY that the city's "
        "workers share); --broker, a node's MQTT listener (?mqtt=3.1.1: NATS speaks no MQTT 5), carries only the "
        "answers (acks, forwards, hotlist, health).",
    )
    group.add_argument(
        "--jetstream",
        metavar="URLS",
        help="the cluster's nodes, nats://host:port[,nats://host:port...] (the worker moves to another when one dies)",
    )
    group.add_argument(
        "--ack-wait",
        type=interval,
        default=ACK_WAIT,
        metavar="SECONDS",
        help="a record this worker took and did not ack (it died, or its node did with the record on the way) goes "
        f"to another worker this long after (default {ACK_WAIT:g}; set when the city's consumer is made: the first "
        "worker's value holds)",
    )
    group.add_argument(
        "--replicas",
        type=positive,
        default=3,
        metavar="N",
        help="copies of the city's stream on the cluster's nodes (default 3; 1 for a single node)",
    )


def _db_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db",
        type=database_url,
        default=DEFAULT_DB,
        help=f"sqlite:///FILE or postgresql+asyncpg://user@host/db (default {DEFAULT_DB})",
    )


def _day(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day like 2026-11-24") from None


def _percent(text: str) -> Decimal:
    try:
        value = Decimal(text.strip().removesuffix("%"))
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage such as 0.5") from None
    if not value.is_finite() or not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and 100 percent")
    return value / 100


def _pair_rate(text: str) -> tuple[tuple[str, str], Decimal]:
    match = re.fullmatch(r"([0-9]{4}):([0-9]{4})=(.+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not ACQUIRER:ISSUER=PERCENT, e.g. 4510:4560=0.4")
    return (match[1], match[2]), _percent(match[3])


def _grace(text: str) -> tuple[tuple[str, str] | None, int]:
    """``SECONDS`` (every pair: None) or ``ACQUIRER:ISSUER=SECONDS``."""
    match = re.fullmatch(r"(?:([0-9]{4}):([0-9]{4})=)?([0-9]{1,9})", text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is neither SECONDS nor ACQUIRER:ISSUER=SECONDS, e.g. 4510:4560=300")
    return ((match[1], match[2]) if match[1] else None), int(match[3])


def _card_id(text: str) -> str:
    from terminals.messages import CARD_ID

    card = text.strip().upper()
    if not CARD_ID.match(card):
        raise argparse.ArgumentTypeError(f"{text!r} is neither a 20-digit card serial nor an 8-hex-digit M1 UID")
    return card


@contextlib.asynccontextmanager
async def _database(url: str, *, upgrade: bool = True) -> AsyncIterator[AsyncEngine]:
    """The engine, migrated; every database failure becomes a CliError naming the database."""
    from sqlalchemy.exc import SQLAlchemyError

    from clearing.db import DatabaseUrlError, migrate, open_engine

    try:
        engine = open_engine(url)
    except DatabaseUrlError as err:
        raise CliError(str(err)) from err
    try:
        if upgrade:
            await migrate(engine)
        yield engine
    except (SQLAlchemyError, OSError) as err:
        raise CliError(f"database {url}: {str(err).splitlines()[0]}") from err
    finally:
        await engine.dispose()


# --- serve ----------------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import gc

    from cardsim.issuer import IssuerHost
    from clearing.intake import Intake
    from terminals.messages import Limits

    setup_logging(logging.INFO)
    keys = load_keys(args.keys)
    limits = Limits(max_payload=args.max_payload)
    try:
        intake = Intake(args.city, IssuerHost(keys), limits, _identities(args))
    except ValueError as err:
        raise CliError(str(err)) from err
    source = _source(args)
    stop_on_sigterm()
    # a batch holds thousands of records at once, and the collector's default thresholds made the service spend
    # a quarter of its CPU walking them; they are freed by reference counting, cycles are rare
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    try:
        return asyncio.run(_serve_async(args, intake, source))
    except KeyboardInterrupt:
        return 0


def _identities(args: argparse.Namespace) -> Identities | None:
    """The signature checks of ``serve``: with an mqtts:// broker (its TLS files name the network CA), required
    unless --no-require-identity; none over plain mqtt://, where --require-identity and --crl are refused."""
    from clearing.identity import Identities

    tls = args.broker.tls
    if tls is None:
        if args.require_identity or args.crl is not None:
            raise CliError("--require-identity and --crl need the network CA: an mqtts:// --broker with --tls-dir")
        return None
    if args.crl is not None and not args.crl.is_file():
        raise CliError(f"--crl {args.crl}: no such file")
    required = args.require_identity is not False
    return Identities.of(args.city, tls, crl=args.crl, required=required)


def _source(args: argparse.Namespace) -> JetStreamSource | None:
    """The city's JetStream stream as this worker's source of records (--jetstream), or None (MQTT)."""
    if args.jetstream is None:
        return None
    from clearing.jetstream import JetStreamSettings, JetStreamSource

    if args.shared:
        raise CliError("--shared and --jetstream: on a NATS cluster the workers share the stream, not MQTT")
    try:
        settings = JetStreamSettings.parse(args.jetstream, ack_wait=args.ack_wait, replicas=args.replicas)
    except ValueError as err:
        raise CliError(str(err)) from err
    return JetStreamSource(args.city, settings, args.worker)


async def _serve_async(args: argparse.Namespace, intake: Intake, source: JetStreamSource | None) -> int:
    """Run the service until Ctrl-C (exit 0) or until one of its tasks dies (logged, exit 1)."""
    import asyncio

    from clearing.ledger import Ledger
    from clearing.service import ClearingService

    async with _database(args.db) as engine:
        ledger = Ledger(engine, args.city, quarantine_cap=args.quarantine_cap)
        service = ClearingService(
            args.broker,
            ledger,
            intake,
            shared=args.shared,
            worker=args.worker,
            batch=args.batch,
            forward_interval=args.forward_interval,
            health_every=args.health_every,
            session_expiry=args.session_expiry,
            source=source,
        )
        where = f"{args.broker}" + ("" if source is None else f" + JetStream {','.join(source.settings.servers)}")
        print(f"clearing {args.city} (worker {args.worker}) on {where}, database {args.db}", flush=True)
        try:
            metrics = None if args.metrics_port is None else service.metrics.serve(args.metrics_port)
        except OSError as err:  # the port is taken, or not ours to bind
            raise CliError(f"--metrics-port {args.metrics_port}: {err.strerror or err}") from err
        if metrics is not None:
            print(f"clearing {args.city} metrics on http://127.0.0.1:{metrics.port}/metrics", flush=True)
        task = asyncio.create_task(service.run())
        reporter = asyncio.create_task(_report(service.stats, args.city, args.report_every))
        try:
            await task  # run() only returns by raising: a dead task ends the process, never half-alive
        except Exception as err:
            log.critical("clearing %s: a task died", args.city, exc_info=err)
            log.critical(
                "clearing %s stopped: %s; exiting 1 so that a supervisor restarts it (nothing committed is lost; "
                "unacked records are sent again)",
                args.city,
                _first(err),
            )
            return 1
        finally:
            reporter.cancel()
            task.cancel()
            await asyncio.gather(task, reporter, return_exceptions=True)
            if metrics is not None:
                metrics.close()
            _print_stats(args.city, service.stats, "stopped")
    return 0


def _first(err: BaseException) -> str:
    """The first real error of a (nested) exception group, as ``Type: text``."""
    while isinstance(err, BaseExceptionGroup) and err.exceptions:
        err = err.exceptions[0]
    return f"{type(err).__name__}: {err}"


async def _report(stats: ClearingStats, city: str, every: float) -> None:
    import asyncio

    if every <= 0:
        return
    last, last_time = 0, time.monotonic()
    while True:
        await asyncio.sleep(every)
        if stats.messages != last:
            now = time.monotonic()
            rate = (stats.stored - last) / (now - last_time) if now > last_time else 0.0
            _print_stats(city, stats, f"{rate:,.0f} stored/s")
            last, last_time = stats.stored, now


def _print_stats(city: str, stats: ClearingStats, tail: str) -> None:
    print(
        f"clearing {city}: {stats.stored:,} stored, {stats.duplicates:,} duplicates, {stats.quarantined:,} "
        f"quarantined ({stats.conflicts:,} conflicts), {stats.forwarded:,} forwarded, {stats.acks:,} acks"
        + (f", {stats.dropped:,} dropped (backlog full)" if stats.dropped else "")
        + (f", {stats.quarantine_overflow:,} past the quarantine cap" if stats.quarantine_overflow else "")
        + f"; {tail}",
        flush=True,
    )


# --- settle ---------------------------------------------------------------------------------------------


def _settle(args: argparse.Namespace) -> int:
    import asyncio

    from clearing.settlement import Grace, export_day, settle_day

    rates = dict(args.pair_rate)
    every = [seconds for pair, seconds in args.hotlist_grace if pair is None]
    grace = Grace(every[-1] if every else DEFAULT_GRACE, {p: s for p, s in args.hotlist_grace if p is not None})

    async def work() -> tuple[Settlement, dict[str, int]]:
        async with _database(args.db) as engine:
            settlement = await settle_day(engine, args.day, rates, args.rate, args.city, grace)
            try:
                files = await export_day(engine, args.day, args.out, args.city)
            except OSError as err:
                raise CliError(f"cannot write the clearing files into {args.out}: {err}") from err
            return settlement, files

    settlement, files = asyncio.run(work())
    summary = args.out / f"settlement-{args.day}.json"
    try:
        summary.write_text(json.dumps(settlement.to_json(), indent=2) + "\n", encoding="utf-8")
    except OSError as err:
        raise CliError(f"cannot write {summary}: {err}") from err
    _print_settlement(settlement)
    for name, count in files.items():
        print(f"wrote {args.out / name} ({count:,} records)")
    print(f"wrote {summary}")
    return 0 if sum(settlement.positions.values()) == 0 else 1


def _print_settlement(settlement: Settlement) -> None:
    print(f"settlement {settlement.day} (fen)")
    print(f"{'acquirer':>8} {'issuer':>6} {'records':>9} {'gross':>12} {'fee':>9} {'rate':>7} {'issuer owes':>12}")
    for x in settlement.lines:
        rate = f"{x.rate * 100:.2f}%"
        print(f"{x.acquirer:>8} {x.issuer:>6} {x.records:>9,} {x.gross:>12,} {x.fee:>9,} {rate:>7} {x.owed:>12,}")
    if not settlement.lines:
        print("  (no purchases of other cities' cards that day)")
    print("net positions: " + ", ".join(f"{c} {n:+,}" for c, n in settlement.positions.items()))
    print(f"sum of net positions: {sum(settlement.positions.values())} fen")
    for status, count in settlement.unsettled.items():
        print(f"note: {count:,} forwarded record(s) {status} by the issuer are not settled")
    for x in settlement.lines:
        if x.hotlisted_issuer or x.hotlisted_acquirer:
            print(
                f"hotlisted cards, acquirer {x.acquirer} issuer {x.issuer}: {x.hotlisted_issuer:,} fen the issuer's "
                f"(in the gross), {x.hotlisted_acquirer:,} fen the acquirer's loss (after publish + {x.grace} s)"
            )
    if settlement.hotlist_versions:
        known = ", ".join(f"{c} v{v}" if v else f"{c} none" for c, v in settlement.hotlist_versions.items())
        print(f"issuers' hotlists in the database: {known}")


# --- hotlist, status, migrate ---------------------------------------------------------------------------


def _hotlist_add(args: argparse.Namespace) -> int:
    import asyncio

    import aiomqtt

    from clearing.hotlist import publish_hotlist
    from clearing.ledger import Ledger

    broker: BrokerUrl = args.broker
    cards = [*args.serial, *(_card_file(args.file) if args.file is not None else [])]
    if not cards:
        raise CliError("give the cards to hotlist: SERIAL arguments, --file PATH, or both")

    async def work() -> tuple[HotlistAdded, Published]:
        async with _database(args.db) as engine:
            ledger = Ledger(engine, args.city)
            added = await ledger.add_to_hotlist(cards)
            try:
                async with broker.client(f"yikatong-hotlist-{args.city}-{time.time_ns()}", clean_session=True) as c:
                    published = await publish_hotlist(c, ledger, snapshot=args.snapshot)
            except aiomqtt.MqttError as err:
                raise CliError(
                    f"hotlist version {added.version} is stored in {args.db} but not published ({broker}: {err}); "
                    "the next 'clearing serve' of this city publishes it"
                ) from err
            return added, published

    added, published = asyncio.run(work())
    print(f"hotlist of {args.city}: version {added.version}, {added.total} card(s), published retained to {broker}")
    if published.snapshot_reason is not None:
        print(f"new snapshot of version {published.version} ({published.snapshot_reason})")
    return 0


def _card_file(path: Path) -> list[str]:
    """The card ids of a file, one a line; CliError naming the first line that holds none."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise CliError(f"cannot read the cards from {path}: {err}") from err
    cards = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                cards.append(_card_id(line))
            except argparse.ArgumentTypeError as err:
                raise CliError(f"{path} line {number}: {err}") from err
    return cards


def _hotlist_list(args: argparse.Namespace) -> int:
    import asyncio

    from clearing.hotlist import iso
    from clearing.ledger import Ledger

    async def work() -> tuple[HotlistHead, list[ListedCard]]:
        async with _database(args.db) as engine:
            ledger = Ledger(engine, args.city)
            return await ledger.hotlist_head(), await ledger.hotlist_entries()

    head, entries = asyncio.run(work())
    print(f"hotlist of {args.city}: version {head.version}, {len(entries)} card(s)")
    for entry in entries:
        published = "not published yet" if entry.published is None else f"published {iso(entry.published)}"
        print(f"{entry.card}  version {entry.version}  {published}")
    return 0


def _status(args: argparse.Namespace) -> int:
    import asyncio

    from clearing.ledger import Ledger

    async def work() -> tuple[dict[str, int], list[tuple[str, int]], int]:
        async with _database(args.db, upgrade=False) as engine:
            ledger = Ledger(engine, args.city)
            return await ledger.counts(), await ledger.quarantine_reasons(), (await ledger.hotlist_head()).version

    counts, reasons, version = asyncio.run(work())
    print(f"clearing {args.city} in {args.db}")
    for name, count in counts.items():
        print(f"  {name:<18} {count:>10,}")
    print(f"  {'hotlist version':<18} {version:>10}")
    for reason, count in reasons:
        print(f"  quarantined {count:>6,} x {reason}")
    return 0


def _migrate(args: argparse.Namespace) -> int:
    import asyncio

    from clearing.db import revision

    async def work() -> tuple[str | None, str | None]:
        async with _database(args.db) as engine:
            return await revision(engine)

    current, head = asyncio.run(work())
    print(f"{args.db}: schema revision {current} (newest {head})")
    return 0
