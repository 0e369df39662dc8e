"""``yikatong load``: many simulated terminals in one process publishing signed records to the clearing over MQTT
at an offered rate, with live progress and, at the end, the achieved rate, ack latency and a plot."""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import random
import secrets
import sys
from collections.abc import Callable
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
from yikatong.process import setup_logging

# the load engine, MQTT and the database are imported by the command when it runs: --help and the other
# commands start without them
if TYPE_CHECKING:
    from cardsim.issuer import IssuerHost
    from terminals.mqtt import BrokerUrl
    from yikatong.load_report import HotlistDoc, LoadSummary
    from yikatong.loadgen import HotlistAdd, Plan, Progress, SimTerminal
    from yikatong.synthetic import SyntheticCard

CITIES = ["4510", "4560", "4530"]
SESSION_EXPIRY = 300  # seconds: a killed run rerun by hand with --state-dir finds its sessions; then they go


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be more than 0")
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
        description="Simulate N bus terminals in this process, each with its own MQTT connection, outbox and uplink "
        "(QoS 1, records kept until the clearing acks them). Taps are offered at --rate per second (open loop, "
        "following --profile) for --duration seconds, by M cards of the cities (a fifth of riders in another "
        "city); each record is signed with the test keys exactly as a PSAM would. Then the tool waits for the "
        "outstanding acks and prints the achieved rate, ack latency p50/p95/p99 and rejects, and writes "
        "load-summary.json and load-report.html (rate and latency over time) into --out. Without --broker an "
        "embedded broker runs in this process; unless --external-clearing, a clearing process per city is "
        "started on --db. Exit 0 when every record was acked and none rejected, 1 otherwise.",
        epilog="Example: yikatong load --terminals 10000 --cards 20000 --rate 500 --duration 60 "
        "--broker mqtt://127.0.0.1:1883 --profile rush-hour",
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
    load.add_argument("--broker", type=broker_url, help="mqtt://[user:password@]host[:port] (default: embedded)")
    load.add_argument(
        "--external-clearing",
        action="store_true",
        help="a clearing already serves the broker (yikatong clearing serve): start none",
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
        "sessions end with it",
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
    load.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the load; 0 when everything made was acked and nothing rejected."""
    import asyncio

    from cardsim.issuer import IssuerHost
    from yikatong.loadgen import Plan
    from yikatong.synthetic import synthetic_cards

    setup_logging(logging.ERROR)  # the uplinks' reconnect warnings would drown the progress line
    out: Path = args.out
    try:
        out.mkdir(parents=True, exist_ok=True)
        if args.state_dir is not None:
            args.state_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"cannot create {err.filename}: {err.strerror}") from err
    if args.hotlist_at is not None and args.hotlist_at >= args.duration:
        raise CliError(f"--hotlist-at {args.hotlist_at:g} is not within the --duration of {args.duration:g} s")
    if args.hotlist_at is not None and args.external_clearing and args.db is None:
        raise CliError("--hotlist-at with --external-clearing needs the clearing's --db: the hotlist is kept there")
    if args.hotlist_cards > args.cards:
        raise CliError(f"--hotlist-cards {args.hotlist_cards} is more than the run's {args.cards} cards")
    keys = load_keys(args.keys)
    missing = [c for c in args.cities if c not in {s.city for s in keys}]
    if missing:
        raise CliError(f"the key file holds no keys of city {', '.join(missing)}: records could not be signed")
    seed = args.seed if args.seed is not None else secrets.randbits(32)
    host = IssuerHost(keys)
    resumed = args.state_dir is not None and (args.state_dir / "terminals.json").exists()
    terminals = _terminals(args, host, seed)
    # cards keep their counters on the card, not in the state folder: a resumed run takes new cards, or the same
    # seed would replay the old cards' counters (clones, in the clearing's eyes)
    cards = synthetic_cards(args.cards, args.cities, secrets.randbits(32) if resumed else seed)
    by_city: dict[str, list[SyntheticCard]] = {}
    for card in cards:
        card.balance = 20_000
        by_city.setdefault(card.issuer, []).append(card)
    plan = Plan(args.rate, args.duration, args.profile)
    return asyncio.run(_run(args, terminals, by_city, plan, seed))


def _terminals(args: argparse.Namespace, host: IssuerHost, seed: int) -> list[SimTerminal]:
    """New terminals, or those of --state-dir's roster when it has one (so a rerun resumes them)."""
    from cardsim.files import write_text_atomic
    from terminals.outbox import OutboxError
    from yikatong.loadgen import SimTerminal, TimedQueue, open_outbox, terminal_numbers

    roster_path = args.state_dir / "terminals.json" if args.state_dir is not None else None
    if roster_path is not None and roster_path.exists():
        try:
            pairs = [(str(c), str(n)) for c, n in json.loads(roster_path.read_text())]
        except (OSError, ValueError, TypeError) as err:
            raise CliError(f"{roster_path}: not a terminal roster ({err})") from err
        if len(pairs) != args.terminals:
            raise CliError(f"{roster_path} holds {len(pairs)} terminals, not --terminals {args.terminals}")
    else:
        pairs = terminal_numbers(args.cities, args.terminals, random.Random(seed))
        if roster_path is not None:
            write_text_atomic(roster_path, json.dumps(pairs) + "\n")
    try:
        return [
            SimTerminal(host, city, number, TimedQueue(open_outbox(args.state_dir, number, city)), args.fare)
            for city, number in pairs
        ]
    except OutboxError as err:
        raise CliError(str(err)) from err


async def _run(
    args: argparse.Namespace, terminals: list[SimTerminal], cards: dict[str, list[SyntheticCard]], plan: Plan, seed: int
) -> int:
    import asyncio

    from cardsim.files import write_text_atomic
    from terminals.mqtt import given_or_embedded
    from yikatong.load_report import LoadSettings, render_html, summary
    from yikatong.loadgen import HotlistPlan, LoadRun
    from yikatong.process import clearing_processes

    # a given broker is shared and outlives the run: the terminals' sessions must expire there (MQTT 5); the
    # embedded amqtt speaks MQTT 3.1.1 only, and its sessions end with it at the end of the run
    expiry = None if args.broker is None else args.session_expiry
    if args.broker is not None:
        await _require_mqtt5(args.broker)
    async with given_or_embedded(args.broker) as broker:
        out: Path = args.out

        def database(city: str) -> str:
            return str(args.db) if args.db else f"sqlite:///{out / f'clearing-{city}.sqlite'}"

        hotlist = None
        if args.hotlist_at is not None:
            hotlist = HotlistPlan(
                args.hotlist_at, listed_cards(cards, args.hotlist_cards), hotlist_adder(broker, database)
            )
        load = LoadRun(broker, terminals, cards, plan, seed=seed, session_expiry=expiry, hotlist=hotlist)

        print(
            f"load: {len(terminals):,} terminals, {args.cards:,} cards, {plan.rate:g} taps/s ({plan.profile}) for "
            f"{plan.duration:g} s on {broker}" + ("" if args.external_clearing else "; starting the clearings"),
            flush=True,
        )
        stack = contextlib.ExitStack()
        try:
            if not args.external_clearing:
                # in a thread: the embedded broker in this loop must serve the clearings while they start and stop
                await asyncio.to_thread(
                    lambda: stack.enter_context(
                        clearing_processes(args.cities, broker, database, out, session_expiry=expiry)
                    )
                )
            printer = _Printer()
            await load.run(printer.show, connect_timeout=args.connect_timeout, drain_timeout=args.drain)
            printer.done()
        finally:
            await asyncio.to_thread(stack.close)
        settings: LoadSettings = {
            "terminals": args.terminals,
            "cards": args.cards,
            "rate": plan.rate,
            "duration": plan.duration,
            "profile": plan.profile,
            "broker": str(broker),
            "clearing": "external" if args.external_clearing else "started",
            "session_expiry": expiry,
            "seed": seed,
            "hotlist_at": args.hotlist_at,
            "hotlist_cards": args.hotlist_cards,
        }
        doc = summary(load, settings)
    write_text_atomic(args.out / "load-summary.json", json.dumps(doc, indent=1) + "\n")
    write_text_atomic(args.out / "load-report.html", render_html(doc))
    _print_summary(doc)
    print(f"wrote {args.out / 'load-summary.json'} and {args.out / 'load-report.html'}")
    # a listed card's record taken before its terminal held the list may be rejected: that is the add's doing
    expected = doc["hotlist"]["rejected"] if doc["hotlist"] is not None else 0
    return 0 if doc["unacked"] == 0 and doc["rejected"] == expected else 1


def listed_cards(cards: dict[str, list[SyntheticCard]], count: int) -> list[SyntheticCard]:
    """``count`` of the run's cards to hotlist, one city's after another's in turn."""
    turns = [card for group in itertools.zip_longest(*cards.values()) for card in group if card is not None]
    return turns[:count]


def hotlist_adder(broker: BrokerUrl, database: Callable[[str], str]) -> HotlistAdd:
    """The load's ``clearing hotlist add``: the cards go into the issuer's database (``database(issuer)``) as a
    new version, then the list is published to the broker the way the clearing publishes it. The database is
    one a clearing has migrated already (not done here: the add's time is the add's alone)."""
    import aiomqtt
    from sqlalchemy.exc import SQLAlchemyError

    from clearing.db import open_engine
    from clearing.hotlist import publish_hotlist
    from clearing.ledger import Ledger

    async def add(issuer: str, cards: list[str]) -> int:
        engine = open_engine(database(issuer))
        try:
            ledger = Ledger(engine, issuer)
            added = await ledger.add_to_hotlist(cards)
            async with broker.client(f"yikatong-hotlist-{issuer}-{secrets.token_hex(4)}", clean_session=True) as c:
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


class _Printer:
    """The live progress line: redrawn in place on a terminal, one line a second otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def show(self, p: Progress) -> None:
        if p.phase == "connecting":
            line = f"connecting {p.connected:,}/{p.terminals:,} terminals ({p.elapsed:.0f} s)"
        elif p.phase == "load":
            lat = p.last.latencies
            tail = f"  p95 {sorted(lat)[int(len(lat) * 0.95)] * 1000:.0f} ms" if lat else ""
            line = (
                f"{p.elapsed:4.0f} s  offered {p.last.offered:,.0f}/s  made {p.last.generated:,}/s  acked "
                f"{p.last.acked:,}/s{tail}  waiting {p.queued:,}  connected {p.connected:,}/{p.terminals:,}"
                f"  rejected {p.rejected:,}"
            )
        else:
            line = f"draining: {p.queued:,} records wait for their ack ({p.acked:,}/{p.generated:,} acked)"
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


def _print_summary(doc: LoadSummary) -> None:
    lat = doc["latency_ms"]
    ms = "  ".join(f"{k} {v if v is not None else '-'} ms" for k, v in lat.items())
    print()
    print(
        f"terminals        {doc['terminals']:,} ({doc['connected']:,} connected, {doc['connect_seconds']} s to connect)"
    )
    print(f"offered          {doc['offered']:,} taps")
    print(f"made             {doc['generated']:,} records ({doc['generated_per_second']:,}/s)")
    print(f"acked            {doc['acked']:,} records ({doc['acked_per_second']:,}/s during the load)")
    print(f"ack latency      {ms}")
    print(f"rejected         {doc['rejected']:,}")
    print(f"unacked at end   {doc['unacked']:,} (after {doc['drain_seconds']} s of draining)")
    if doc["hotlist"] is not None:
        _print_hotlist(doc["hotlist"])


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _print_hotlist(news: HotlistDoc) -> None:
    if news["at"] is None:
        print("hotlist          not added: the load ended before --hotlist-at")
        return
    lists = ", ".join(
        f"{issuer} version {version}, published in {_ms(news['published_ms'][issuer])}"
        for issuer, version in news["versions"].items()
    )
    held = news["holding_ms"]
    print(
        f"hotlist          {len(news['cards']):,} card(s) added at {news['at']:.1f} s ({lists}); "
        f"{news['holding']:,} terminals hold it, from the add: p50 {_ms(held['p50'])}  p99 {_ms(held['p99'])}"
    )
    refusals = "  ".join(
        f"{city} {_ms(first)} ({news['refusals'][city]:,} refused)" for city, first in news["first_refusal_ms"].items()
    )
    print(f"first refusal    {refusals}")
    print(
        f"listed cards     {news['taken']:,} record(s) taken after the add before the terminal held the list, "
        f"{news['rejected']:,} rejected by the clearing"
    )
    for issuer, version in news["ahead"].items():
        print(
            f"note: terminals held version {version} of {issuer}'s hotlist before the add made version "
            f"{news['versions'][issuer]}: a list retained on the broker by another database; they ignore the new one"
        )
