"""``yikatong load``: many simulated terminals, spread over worker processes, publishing signed records to the
clearing over MQTT on a fixed timetable, with live progress and, at the end, the achieved rate, ack latency from
each tap's moment, whether the generator kept its timetable, and a plot; ``--sweep`` finds the highest rate that
keeps the p99 within an SLO."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import random
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from yikatong.argtypes import (
    Subcommands,
    broker_url,
    city_code,
    database_url,
    fen_amount,
    file_path,
    load_keys,
    positive,
    session_expiry,
)
from yikatong.errors import CliError
from yikatong.load_profiles import PROFILES
from yikatong.pki_devices import as_device, check_pki_options, issue_certificates, require_certificates
from yikatong.process import ClearingWorker, setup_logging, stop_on_sigterm

# the load engine, MQTT and the database are imported by the command when it runs: --help and the other
# commands start without them
if TYPE_CHECKING:
    from clearing.pki import Identity
    from terminals.mqtt import BrokerUrl
    from yikatong.load_coordinator import RunResult
    from yikatong.load_workers import WorkerSpec
    from yikatong.loadgen import HotlistAdd
    from yikatong.synthetic import SyntheticCard

CITIES = ["4510", "4560", "4530"]
CLUSTER_NODES = 3  # NATS nodes of --cluster
CLUSTER_WORKERS = 2  # clearing workers a city with --cluster
SESSION_EXPIRY = 300  # seconds: a killed run rerun by hand with --state-dir finds its sessions; then they go


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _factor(text: str) -> float:
    value = _positive_float(text)
    if value <= 1:
        raise argparse.ArgumentTypeError("must be more than 1")
    return value


def _cities(text: str) -> list[str]:
    cities = [city_code(part.strip()) for part in text.split(",") if part.strip()]
    if not cities or len(set(cities)) != len(cities):
        raise argparse.ArgumentTypeError(f"{text!r}: give distinct city codes, e.g. 4510,4560,4530")
    return cities


def register(groups: Subcommands) -> None:
    """Add the ``load`` command."""
    load = groups.add_parser(
        "load",
        help="drive many simulated terminals against a broker and clearing; rate, ack latency, plot",
        description="Simulate N bus terminals in --workers processes, each terminal with its own MQTT connection, "
        "outbox and uplink (QoS 1, records kept until the clearing acks them). Taps are offered on a fixed "
        "timetable at --rate per second (open loop, following --profile) for --duration seconds, by M cards of "
        "the cities (a fifth of riders in another city); each record is signed with the test keys exactly as a "
        "PSAM would. Ack latency runs from the moment each tap was due, so a generator that falls behind "
        "cannot hide it; when it does, the progress line, the summary and the report say by how much. Then the "
        "tool waits for the outstanding acks and prints the achieved rate, ack latency p50/p90/p95/p99/p99.9/max "
        "(HDR histograms) and rejects, and writes load-summary.json and load-report.html (rate, latency, lag and "
        "the clearings' queues over time) into --out. Without --broker an embedded broker runs in this process; "
        "unless --external-clearing, a clearing process per city is started on --db, and its metrics are "
        "scraped into the report. Exit 0 when every record was acked and none rejected (with --sweep: and a "
        "step held), 1 otherwise.",
        epilog="Examples: yikatong load --terminals 10000 --cards 20000 --rate 500 --duration 60 "
        "--broker mqtt://127.0.0.1:1883 --profile rush-hour;  yikatong load --sweep --rate 200 --slo-ms 1000",
    )
    load.add_argument("--terminals", type=positive, default=100, help="simulated terminals (default 100)")
    load.add_argument("--cards", type=positive, default=1000, help="simulated cards, spread over the cities (1000)")
    load.add_argument(
        "--rate", type=_positive_float, default=100.0, help="offered taps per second (at the profile's peak; 100)"
    )
    load.add_argument("--duration", type=_positive_float, default=30.0, help="seconds of load (default 30)")
    load.add_argument(
        "--profile",
        choices=sorted(PROFILES),
        default="flat",
        help="flat: --rate all along; rush-hour: a morning and an evening peak at --rate over a fifth of it",
    )
    load.add_argument(
        "--broker",
        type=broker_url,
        help="mqtt://[user:password@]host[:port], or mqtts://host[:port] with --pki (default: embedded, plain)",
    )
    load.add_argument(
        "--pki",
        type=file_path,
        metavar="DIR",
        help="a 'yikatong pki init' folder: over mqtts:// each simulated terminal connects with its own certificate "
        "from DIR/devices and signs every message with it; the started clearings connect with theirs, require the "
        "signatures and read DIR/crl.pem. Needs --seed (or --state-dir) so that the run's terminals are those "
        "--issue-certificates-only issued for. Dearer than plain: a TLS context a terminal (about 4 ms of CPU "
        "to make) and a handshake each; measured on 2 busy cores, 2,000 terminals took 18 s to connect (1 s "
        "plain), about 110 a second: give thousands a longer --connect-timeout",
    )
    load.add_argument(
        "--issue-certificates-only",
        action="store_true",
        help="issue into --pki the certificates this run's terminals (for --terminals, --cities and --seed, or "
        "--state-dir's roster) and its cities' clearings lack, keep the valid ones, and exit; then start the "
        "broker or send it SIGHUP (it reads the ACL then). Measured on 2 busy cores: 2,000 in 15 s",
    )
    load.add_argument(
        "--external-clearing",
        action="store_true",
        help="a clearing already serves the broker (yikatong clearing serve): start none",
    )
    load.add_argument(
        "--cluster",
        action="store_true",
        help="run on a 3-node NATS cluster started for the run in OUT/nats-cluster (JetStream, MQTT 3.1.1 on "
        "each node; stopped at the end): terminal i connects to node i %% 3's MQTT listener, and each city's "
        "--cluster-workers clearing workers share the city's JetStream stream (clearing serve --jetstream), "
        "worker w answering on node w %% 3. Not with --broker or --pki, nor --external-clearing (the cluster "
        "lives only as long as the run: for workers of your own, start one with 'python -m "
        "yikatong.nats_cluster start' and give a node's MQTT URL as --broker with --external-clearing)",
    )
    load.add_argument(
        "--cluster-workers",
        type=positive,
        metavar="N",
        help=f"with --cluster: clearing workers per city, each its own process (default {CLUSTER_WORKERS}); more "
        "than one needs a PostgreSQL --db (SQLite files would have the workers wait on each other's writes)",
    )
    load.add_argument(
        "--db",
        type=database_url,
        help="database for the started clearings (default: a SQLite file per city in --out; a PostgreSQL "
        "URL is shared by all cities)",
    )
    load.add_argument("--cities", type=_cities, default=CITIES, help="terminal and card cities (4510,4560,4530)")
    load.add_argument("--fare", type=fen_amount, default=200, help="bus fare in fen (default 200)")
    load.add_argument("--out", type=file_path, default=Path("run/load"), help="run folder (default %(default)s)")
    load.add_argument(
        "--state-dir",
        type=file_path,
        help="keep each terminal's outbox in a SQLite file here (survives a kill; a rerun with the same folder "
        "resumes those terminals and sends what they still hold); default: outboxes in memory",
    )
    load.add_argument(
        "--session-expiry",
        type=session_expiry,
        default=SESSION_EXPIRY,
        metavar="SECONDS",
        help="on a --broker, the terminals speak MQTT 5 and the broker drops each one's session (its "
        "subscriptions and the acks queued for it) this long after it disconnects, so runs leave no sessions "
        "behind; long enough for a killed run resumed with --state-dir to find them (default %(default)s; "
        "a later resume loses nothing: the terminals send again what was not acked). The embedded broker's "
        "sessions end with it; a --broker given ?mqtt=3.1.1 (a NATS node) gets MQTT 3.1.1 sessions, kept until "
        "the same terminals connect again",
    )
    load.add_argument("--seed", type=int, help="random seed for terminal numbers, cards and taps")
    load.add_argument("--connect-timeout", type=_positive_float, default=120.0, help="seconds to connect (120)")
    load.add_argument("--drain", type=_positive_float, default=60.0, help="seconds to wait for the last acks (60)")
    load.add_argument("--keys", type=file_path, help="issuer key file (default: the published TEST keys)")
    load.add_argument(
        "--hotlist-at",
        type=_positive_float,
        metavar="SECONDS",
        help="this many seconds into the load, put --hotlist-cards of the run's cards on their issuers' hotlists "
        "as 'clearing hotlist add' does (the issuer's database, then the list published to every terminal), "
        "and report how that reached the terminals: per city the time to the first refusal of a listed card "
        "(from the add on, each listed card is also tried at a terminal of every city until refused there), "
        "and the time to each terminal holding the new version (p50/p99). With --external-clearing give --db",
    )
    load.add_argument(
        "--hotlist-cards",
        type=positive,
        default=1,
        metavar="N",
        help="cards --hotlist-at lists, taken from each city in turn (default %(default)s)",
    )
    load.add_argument(
        "--workers",
        type=positive,
        default=os.cpu_count() or 1,
        metavar="N",
        help="worker processes sharing the terminals and the timetable, each on its own event loop "
        "(default: one per core, %(default)s here)",
    )
    load.add_argument(
        "--uplink",
        choices=("lean", "aiomqtt"),
        default="lean",
        help="each terminal's uplink: lean (the real uplink's rules, terminals.uplink_policy, over one light "
        "asyncio connection: a twentieth to a fiftieth of the CPU per idle terminal, ~1 µs a second against 20-50, "
        "and about half per tap) or aiomqtt (the real terminal's Uplink itself, an aiomqtt client each); "
        "default %(default)s",
    )
    sweeping = load.add_argument_group(
        "sweep",
        "--sweep offers flat steps from --rate up, each --step-seconds long and drained before the next, until a "
        "step's p99 ack latency passes --slo-ms (or a record stays unacked); the report gives every step and the "
        "highest rate that held",
    )
    sweeping.add_argument("--sweep", action="store_true", help="step the offered rate up until the SLO breaks")
    sweeping.add_argument(
        "--slo-ms", type=_positive_float, default=1000.0, help="p99 ack latency a step must keep (ms, 1000)"
    )
    sweeping.add_argument(
        "--sweep-factor",
        type=_factor,
        default=1.25,
        help="each step offers this many times the last (more than 1; default %(default)s)",
    )
    sweeping.add_argument(
        "--step-seconds", type=_positive_float, default=10.0, help="seconds of load per step (default 10)"
    )
    sweeping.add_argument("--sweep-steps", type=positive, default=20, help="steps at most (default 20)")
    load.add_argument(
        "--clearing-metrics",
        action="append",
        default=[],
        metavar="URL",
        help="with --external-clearing: a clearing's Prometheus endpoint (clearing serve --metrics-port) to scrape "
        "once a second into the report; repeat for each (the clearings load starts are scraped anyway)",
    )
    load.set_defaults(run=run)


def _check(args: argparse.Namespace) -> None:
    """Refuse argument combinations that cannot run."""
    if args.hotlist_at is not None and args.hotlist_at >= args.duration:
        raise CliError(f"--hotlist-at {args.hotlist_at:g} is not within the --duration of {args.duration:g} s")
    if args.hotlist_at is not None and args.external_clearing and args.db is None:
        raise CliError("--hotlist-at with --external-clearing needs the clearing's --db: the hotlist is kept there")
    if args.hotlist_cards > args.cards:
        raise CliError(f"--hotlist-cards {args.hotlist_cards} is more than the run's {args.cards} cards")
    if args.sweep and args.hotlist_at is not None:
        raise CliError("--sweep and --hotlist-at do not go together: a sweep's steps are drained one by one")
    if args.sweep and args.profile != "flat":
        raise CliError("--sweep offers flat steps: leave --profile out")
    if args.clearing_metrics and not args.external_clearing:
        raise CliError("--clearing-metrics is for an --external-clearing: the started clearings are scraped anyway")
    _check_cluster(args)
    check_pki_options(args)
    if args.pki is not None and args.seed is None and args.state_dir is None:
        raise CliError(
            "--pki needs --seed N (or --state-dir DIR): the run's terminals must be the ones its certificates were "
            "issued for"
        )


def _check_cluster(args: argparse.Namespace) -> None:
    """Refuse what --cluster and --cluster-workers cannot run with."""
    if not args.cluster:
        if args.cluster_workers is not None:
            raise CliError("--cluster-workers is for --cluster: the clearings on one broker are one a city")
        return
    if args.broker is not None or args.pki is not None:
        raise CliError(
            "--cluster starts its own NATS cluster and speaks plain MQTT 3.1.1 to it: leave --broker and --pki out"
        )
    if args.external_clearing:
        raise CliError(
            "--cluster with --external-clearing: the run's cluster ends with the run, so workers of your own could "
            "not be there first; start a cluster with 'python -m yikatong.nats_cluster start', your workers with "
            "clearing serve --jetstream, then load --broker NODE_MQTT_URL --external-clearing"
        )
    workers = args.cluster_workers or CLUSTER_WORKERS
    if workers > 1 and (args.db is None or str(args.db).startswith("sqlite")):
        raise CliError(
            f"--cluster with {workers} clearing workers a city needs a PostgreSQL --db (postgresql+asyncpg://...): "
            "on a SQLite file they would wait on each other's writes; or give --cluster-workers 1"
        )


def run(args: argparse.Namespace) -> int:
    """Run the load; 0 when everything made was acked and nothing rejected (and with --sweep, a step held)."""
    import asyncio

    from yikatong.synthetic import synthetic_cards

    setup_logging(logging.ERROR)  # the uplinks' reconnect warnings would drown the progress line
    _check(args)
    if args.cluster:  # a SIGTERM must stop the cluster's nodes too: they are not in this process group
        stop_on_sigterm()
    out: Path = args.out
    try:
        if not args.issue_certificates_only:
            out.mkdir(parents=True, exist_ok=True)
        if args.state_dir is not None:
            args.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"cannot create {err.filename}: {err.strerror}") from err
    keys = load_keys(args.keys)
    missing = [c for c in args.cities if c not in {s.city for s in keys}]
    if missing:
        raise CliError(f"the key file holds no keys of city {', '.join(missing)}: records could not be signed")
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    resumed = args.state_dir is not None and (args.state_dir / "terminals.json").exists()
    pairs = _roster(args, seed)
    if args.pki is not None:
        devices = _devices(args.cities, pairs)
        if args.issue_certificates_only:
            return issue_certificates(args.pki, devices, "the load's")
        issuing = (
            f"'yikatong load --pki {args.pki} --issue-certificates-only' with the same --terminals, --cities and "
            "--seed (or --state-dir)"
        )
        require_certificates(args.pki, devices, "the load's", issuing)
    # cards keep their counters on the card, not in the state folder: a resumed run takes new cards, or the same
    # seed would replay the old cards' counters (clones, in the clearing's eyes)
    cards = synthetic_cards(args.cards, args.cities, secrets.randbits(32) if resumed else seed)
    for card in cards:
        card.balance = 20_000
    return asyncio.run(_run(args, pairs, cards, seed))


def _roster(args: argparse.Namespace, seed: int) -> list[tuple[str, str]]:
    """New terminals (city, number), or those of --state-dir's roster when it has one (so a rerun resumes them)."""
    from cardsim.files import write_text_atomic
    from yikatong.loadgen import terminal_numbers

    roster_path = args.state_dir / "terminals.json" if args.state_dir is not None else None
    if roster_path is not None and roster_path.exists():
        try:
            pairs = [(str(c), str(n)) for c, n in json.loads(roster_path.read_text())]
        except (OSError, ValueError, TypeError) as err:
            raise CliError(f"{roster_path}: not a terminal roster ({err})") from err
        if len(pairs) != args.terminals:
            raise CliError(f"{roster_path} holds {len(pairs)} terminals, not --terminals {args.terminals}")
        return pairs
    pairs = terminal_numbers(args.cities, args.terminals, random.Random(seed))
    if roster_path is not None:
        write_text_atomic(roster_path, json.dumps(pairs) + "\n")
    return pairs


def _devices(cities: list[str], pairs: list[tuple[str, str]]) -> list[Identity]:
    """The run's clearings and terminals, as the PKI names them."""
    from clearing.pki import Identity

    return [Identity.clearing(city) for city in cities] + [Identity.terminal(number) for _, number in pairs]


async def _run(args: argparse.Namespace, pairs: list[tuple[str, str]], cards: list[SyntheticCard], seed: int) -> int:
    from cardsim.files import write_text_atomic
    from yikatong.load_console import print_summary
    from yikatong.load_report import LoadSettings, render_html, summary
    from yikatong.load_workers import SPARE_FILES, open_files, worker_specs

    # the embedded broker holds every terminal's connection in this process
    if args.broker is None and not args.cluster:
        open_files(len(pairs) + SPARE_FILES, "the embedded broker (this process)")
    # a given broker is shared and outlives the run: the terminals' sessions must expire there (MQTT 5); the
    # embedded amqtt speaks MQTT 3.1.1 only, and its sessions end with it at the end of the run; a broker given
    # ?mqtt=3.1.1 (a NATS node) keeps 3.1.1 sessions until the same terminals come back
    mqtt5 = args.broker is not None and args.broker.speaks_mqtt5 is not False
    expiry = args.session_expiry if mqtt5 else None
    if mqtt5:  # over mqtts:// as the first terminal, with its certificate
        await _require_mqtt5(_as_terminal(args, pairs[0][1]))
    by_city: dict[str, list[SyntheticCard]] = {}
    for card in cards:
        by_city.setdefault(card.issuer, []).append(card)
    listed = listed_cards(by_city, args.hotlist_cards) if args.hotlist_at is not None else []
    async with _network(args) as network:
        specs = worker_specs(
            args.workers,
            pairs,
            cards,
            network.brokers,
            keys=args.keys,
            fare=args.fare,
            seed=seed,
            connect_timeout=args.connect_timeout,
            state_dir=args.state_dir,
            session_expiry=expiry,
            hotlist_at=args.hotlist_at,
            hotlist_cards=listed,
            lean=args.uplink == "lean",
            pki=args.pki,
        )
        what = (
            f"a sweep from {args.rate:g} taps/s, x{args.sweep_factor:g} every {args.step_seconds:g} s until p99 > "
            f"{args.slo_ms:g} ms"
            if args.sweep
            else f"{args.rate:g} taps/s ({args.profile}) for {args.duration:g} s"
        )
        print(
            f"load: {len(pairs):,} terminals in {len(specs)} worker process(es), {args.cards:,} cards, {what} on "
            f"{network}" + ("" if args.external_clearing else f"; starting the clearings{network.clearings}"),
            flush=True,
        )
        result = await _conduct(args, network, specs, expiry, listed)
        settings: LoadSettings = {
            "terminals": args.terminals,
            "cards": args.cards,
            "rate": args.rate,
            "duration": args.duration,
            "profile": args.profile,
            "broker": str(network),
            "clearing": "external" if args.external_clearing else f"started{network.clearings}",
            "session_expiry": expiry,
            "seed": seed,
            "workers": len(specs),
            "hotlist_at": args.hotlist_at,
            "hotlist_cards": args.hotlist_cards,
            "sweep": None
            if not args.sweep
            else {
                "start": args.rate,
                "factor": args.sweep_factor,
                "step_seconds": args.step_seconds,
                "steps": args.sweep_steps,
                "slo_ms": args.slo_ms,
            },
        }
        doc = summary(result, settings)
    write_text_atomic(args.out / "load-summary.json", json.dumps(doc, indent=1) + "\n")
    write_text_atomic(args.out / "load-report.html", render_html(doc))
    print_summary(doc)
    print(f"wrote {args.out / 'load-summary.json'} and {args.out / 'load-report.html'}")
    # a listed card's record taken before its terminal held the list may be rejected: that is the add's doing
    expected = doc["hotlist"]["rejected"] if doc["hotlist"] is not None else 0
    clean = doc["unacked"] == 0 and doc["rejected"] == expected
    return 0 if clean and (doc["sweep"] is None or doc["sweep"]["held_rate"] is not None) else 1


async def _conduct(
    args: argparse.Namespace,
    network: Network,
    specs: list[WorkerSpec],
    expiry: int | None,
    listed: list[SyntheticCard],
) -> RunResult:
    """The clearings started (unless external), the workers connected, the load offered (or swept), merged."""
    import asyncio

    from yikatong.load_console import Printer
    from yikatong.load_coordinator import Coordinator, Hotlist
    from yikatong.load_schedule import Plan, Sweep
    from yikatong.load_workers import WorkerPool
    from yikatong.loadgen import HotlistPlan
    from yikatong.process import clearing_processes

    out: Path = args.out

    def database(city: str) -> str:
        return str(args.db) if args.db else f"sqlite:///{out / f'clearing-{city}.sqlite'}"

    broker = network.brokers[0]
    workers = [] if args.external_clearing else network.clearing_workers(args.cities)
    endpoints = {w.label: f"http://127.0.0.1:{w.metrics_port}/metrics" for w in workers}
    endpoints |= {f"external-{i}": url for i, url in enumerate(args.clearing_metrics)}
    stack = contextlib.ExitStack()
    printer = Printer()
    try:
        if workers:
            # in a thread: the embedded broker in this loop must serve the clearings while they start and stop
            await asyncio.to_thread(
                lambda: stack.enter_context(
                    clearing_processes(workers, database, out, session_expiry=expiry, pki=args.pki)
                )
            )
        async with WorkerPool(specs) as pool:
            coordinator = Coordinator(pool, printer.show, endpoints)
            async with coordinator.watching():
                await coordinator.connect()
                if args.sweep:
                    sweep = Sweep(args.rate, args.sweep_factor, args.step_seconds, args.sweep_steps, args.slo_ms / 1000)
                    await coordinator.sweep(sweep, args.drain)
                else:
                    hotlist = None
                    if args.hotlist_at is not None:
                        hotlist = Hotlist(
                            HotlistPlan(args.hotlist_at, listed), hotlist_adder(broker, database, args.pki)
                        )
                    await coordinator.run(Plan(args.rate, args.duration, args.profile), args.drain, hotlist)
                return await coordinator.finish()
    finally:
        printer.done()
        await asyncio.to_thread(stack.close)


@dataclass(frozen=True)
class Network:
    """The brokers of a run: one (given or embedded), or the MQTT listeners of a NATS cluster's nodes, with the
    cluster's NATS URLs (``jetstream``: where the clearing workers take the records) and the workers a city."""

    brokers: list[BrokerUrl]
    jetstream: list[str] = field(default_factory=list)  # empty: no cluster
    workers: int = 1  # clearing workers a city

    def __str__(self) -> str:
        if not self.jetstream:
            return str(self.brokers[0])
        return f"a {len(self.brokers)}-node NATS cluster ({', '.join(map(str, self.brokers))})"

    @property
    def clearings(self) -> str:
        """How the started clearings take the records, said after "started" ("" for one a city on one broker)."""
        return f": {self.workers} worker(s) a city sharing its JetStream stream" if self.jetstream else ""

    def clearing_workers(self, cities: list[str]) -> list[ClearingWorker]:
        """The clearing processes to start, each with a metrics port: one a city on the broker, or on a cluster
        ``workers`` a city, worker w answering on node w % nodes (a city's workers on different nodes)."""
        from terminals.mqtt import free_port

        if not self.jetstream:
            return [ClearingWorker(city, self.brokers[0], metrics_port=free_port()) for city in cities]
        nodes = ("--jetstream", ",".join(self.jetstream))
        return [
            ClearingWorker(city, self.brokers[w % len(self.brokers)], f"w{w + 1}", free_port(), nodes)
            for city in cities
            for w in range(self.workers)
        ]


@contextlib.asynccontextmanager
async def _network(args: argparse.Namespace) -> AsyncIterator[Network]:
    """``--broker`` or an embedded broker; with ``--cluster`` a NATS cluster started in OUT/nats-cluster and
    stopped on the way out whatever happened (its nodes run in sessions of their own: no Ctrl-C reaches them)."""
    from terminals.mqtt import BrokerUrl, given_or_embedded

    if not args.cluster:
        async with given_or_embedded(args.broker) as broker:
            yield Network([broker])
        return
    from yikatong.nats_cluster import ClusterError, NatsCluster

    cluster = NatsCluster(args.out / "nats-cluster", size=CLUSTER_NODES)
    try:
        try:  # on the loop, blocking: nothing else runs yet, and a Ctrl-C meanwhile lands after it, in the finally
            cluster.start()
        except ClusterError as err:
            raise CliError(f"--cluster: {err}") from err
        brokers = [BrokerUrl.parse(url) for url in cluster.mqtt_urls]
        yield Network(brokers, cluster.nats_urls, args.cluster_workers or CLUSTER_WORKERS)
    finally:
        cluster.stop()


def listed_cards(cards: dict[str, list[SyntheticCard]], count: int) -> list[SyntheticCard]:
    """``count`` of the run's cards to hotlist, one city's after another's in turn."""
    turns = [card for group in itertools.zip_longest(*cards.values()) for card in group if card is not None]
    return turns[:count]


def _as_terminal(args: argparse.Namespace, number: str) -> BrokerUrl:
    """``--broker`` as the terminal ``number`` reaches it (over mqtts://, with its certificate from --pki)."""
    from clearing.pki import Identity

    assert args.broker is not None
    return as_device(args.broker, args.pki, Identity.terminal(number))


def hotlist_adder(broker: BrokerUrl, database: Callable[[str], str], pki: Path | None = None) -> HotlistAdd:
    """The load's ``clearing hotlist add``: the cards go into the issuer's database (``database(issuer)``) as a
    new version, then the list is published to the broker the way the clearing publishes it (over mqtts://, with
    the issuer's clearing certificate from ``pki``). The database is one a clearing has migrated already (not
    done here: the add's time is the add's alone)."""
    import aiomqtt
    from sqlalchemy.exc import SQLAlchemyError

    from clearing.db import open_engine
    from clearing.hotlist import publish_hotlist
    from clearing.ledger import Ledger
    from clearing.pki import Identity

    async def add(issuer: str, cards: list[str]) -> int:
        engine = open_engine(database(issuer))
        try:
            ledger = Ledger(engine, issuer)
            added = await ledger.add_to_hotlist(cards)
            issuer_broker = as_device(broker, pki, Identity.clearing(issuer))
            async with issuer_broker.client(
                f"yikatong-hotlist-{issuer}-{secrets.token_hex(4)}", clean_session=True
            ) as c:
                await publish_hotlist(c, ledger)
        except (aiomqtt.MqttError, SQLAlchemyError, OSError) as err:
            raise CliError(f"--hotlist-at: the hotlist of {issuer} could not be added and published ({err})") from err
        finally:
            await engine.dispose()
        return added.version

    return add


async def _require_mqtt5(broker: BrokerUrl, timeout: float = 10.0) -> None:
    """One MQTT 5 connection (clean, no session left) so that a broker the terminals cannot use is said at once,
    not as terminals that never connect."""
    import asyncio

    import aiomqtt

    try:
        async with asyncio.timeout(timeout):
            async with broker.client(f"yikatong-load-probe-{secrets.token_hex(4)}", clean_session=True, mqtt5=True):
                pass
    except (aiomqtt.MqttError, TimeoutError) as err:
        detail = str(err) or f"no answer in {timeout:g} s"
        raise CliError(
            f"no MQTT 5 connection to {broker}: {detail} (the load's terminals speak "
            "MQTT 5 on a given broker so that their sessions expire; Mosquitto 2 does; without --broker an "
            "embedded broker is used)"
        ) from err
