"""Reliability under faults: the broker restarted mid-load, a clearing SIGKILLed, the load generator's terminals
SIGKILLed and resumed, a terminal cut off the network, floods of duplicates and of malformed messages from an
outsider. Terminals are a `yikatong load` process (its outboxes in state files) or a real in-process terminal;
the clearings are `yikatong clearing serve` processes or in-process services; the broker is a private Mosquitto.

After each scenario the ledger equals the set of records the terminals completed (seq 1 up to each outbox's
next seq): none lost, none doubled. Each prints the counts it checked."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import signal
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
from clearing_support import DAY_START, HOST, ServeProcess, clearing, fresh_db, serve_process
from hostile_stream import garbage_line
from mqtt_support import mosquitto_pub_file, mosquitto_pub_lines, running, unique_terminal
from reliability_support import (
    CuttableLink,
    DurableMosquitto,
    LedgerView,
    LoadProcess,
    Outboxes,
    Tally,
    completed,
    cpu_card,
    durable_mosquitto,
    interop_check,
    ledger_size,
    ledger_view,
    read_outboxes,
    session_survives_restart,
    start_load,
    tally,
    wait_for,
)
from terminal_support import make_terminal

from cardsim.crypto import Algorithm
from clearing.schema import FORWARD_PENDING
from terminals.messages import MAX_PAYLOAD, batch_payload, parse_ack, parse_uplink
from terminals.mqtt import BrokerUrl
from terminals.reader import InProcessReader
from terminals.uplink import Uplink
from yikatong.synthetic import SyntheticTerminal, synthetic_cards

pytestmark = pytest.mark.reliability

CITIES = ("4510", "4560")
TERMINALS = 20
FAR = 10**12  # seqs no terminal of these tests reaches: what an outsider's forged records carry


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[DurableMosquitto]:
    """A private Mosquitto of this test, persistence on (sessions survive a graceful restart)."""
    with durable_mosquitto(tmp_path / "broker") as mosquitto:
        yield mosquitto


class Clearings:
    """A `yikatong clearing serve` process per city, each on its own SQLite file; killed and started again at
    will (the same worker name: the same persistent MQTT session)."""

    def __init__(self, broker: BrokerUrl, folder: Path, stack: contextlib.ExitStack, cities: tuple[str, ...]) -> None:
        self.broker = broker
        self.stack = stack
        self.dbs = {city: f"sqlite:///{folder / f'clearing-{city}.sqlite'}" for city in cities}
        self.procs: dict[str, ServeProcess] = {}
        self.kills = 0
        for city in cities:
            self.start(city)

    def start(self, city: str) -> None:
        extra = ("--forward-interval", "2")
        self.procs[city] = self.stack.enter_context(serve_process(self.broker, self.dbs[city], city, "w1", *extra))

    def kill(self, city: str) -> None:
        """SIGKILL the city's clearing."""
        self.procs[city].kill()
        self.kills += 1

    async def size(self) -> int:
        """Records of the cities' own terminals in their ledgers."""
        return sum([await ledger_size(db, city) for city, db in self.dbs.items()])

    async def views(self) -> dict[str, LedgerView]:
        return {city: await ledger_view(db, city) for city, db in self.dbs.items()}

    async def forwards_answered(self) -> bool:
        views = await self.views()
        return not any(r.forward == FORWARD_PENDING for view in views.values() for r in view.rows)


def two_city_load(
    stack: contextlib.ExitStack[bool | None],
    broker: BrokerUrl,
    state: Path,
    out: Path,
    *,
    rate: float,
    duration: float,
    seed: int,
) -> LoadProcess:
    """`yikatong load` of TERMINALS terminals in CITIES, killed at the end of ``stack`` if still running."""
    cities = ",".join(CITIES)
    run = start_load(broker, state, out, terminals=TERMINALS, cities=cities, rate=rate, duration=duration, seed=seed)
    return stack.enter_context(run)


@dataclass
class Outcome:
    """What a two-city scenario ends with."""

    boxes: Outboxes
    result: Tally
    forwarded: int
    quarantined: int


async def outcome(clear: Clearings, state: Path) -> Outcome:
    """Once every forward is answered: the terminals' records against the ledgers, and the forwards."""
    await wait_for(clear.forwards_answered, "every forward answered by the issuer city")
    views = await clear.views()
    boxes = read_outboxes(state)
    return Outcome(
        boxes, tally(boxes.all(), views.values()), interop_check(views), sum(len(v.quarantine) for v in views.values())
    )


def check_outcome(end: Outcome, summary: str) -> None:
    """None lost, none doubled, nothing quarantined, nothing left in or rejected into the outboxes."""
    print(summary)
    end.result.check(summary)
    assert end.quarantined == 0, f"{summary}: quarantine not empty"
    assert end.boxes.queued == 0 and end.boxes.rejected == 0, (
        f"{summary}; outboxes: {end.boxes.queued} queued, {end.boxes.rejected} rejected"
    )


async def grown_to(clearings: Clearings, size: int) -> bool:
    return await clearings.size() >= size


async def stored_at_least(db: str, city: str, size: int) -> bool:
    return await ledger_size(db, city) >= size


# --- broker restart ---------------------------------------------------------------------------------------


async def test_broker_restart_mid_load_every_record_in_the_ledger_once(
    broker: DurableMosquitto, tmp_path: Path
) -> None:
    """20 terminals of two cities tap at 60/s; mid-load the broker is SIGKILLed (everything it held in memory
    is gone) and started again, later stopped gracefully (sessions saved) and started again. The terminals'
    uplinks reconnect with backoff and resend what was not acked; the run ends with everything acked."""
    state = tmp_path / "state"
    with contextlib.ExitStack() as stack:
        clear = Clearings(broker.url, tmp_path, stack, CITIES)
        load = two_city_load(stack, broker.url, state, tmp_path / "run", rate=60, duration=12, seed=1)
        await wait_for(lambda: grown_to(clear, 60), "60 records stored before the first restart")
        assert load.running(), f"the load ended before the broker restart: nothing was tested\n{load.tail()}"
        before_kill = await clear.size()
        await asyncio.to_thread(broker.restart, graceful=False)
        await wait_for(lambda: grown_to(clear, before_kill + 60), "60 more records stored after the SIGKILL restart")
        assert load.running(), f"the load ended before the second restart: nothing was tested\n{load.tail()}"
        kept = await session_survives_restart(broker)
        assert kept, "a persistent session did not survive the graceful restart: Mosquitto persistence is off"
        doc = await load.finish()
        end = await outcome(clear, state)
    summary = end.result.line(
        "broker restart",
        TERMINALS,
        f"{broker.restarts} restarts (SIGKILL, then SIGTERM keeping the sessions)",
        f"{end.forwarded} forwarded to the issuer city once each",
        f"{end.quarantined} quarantined",
    )
    check_outcome(end, summary)
    assert doc["generated"] == doc["acked"] == end.result.records and doc["rejected"] == 0, f"{summary}; load: {doc}"


# --- clearing SIGKILL -------------------------------------------------------------------------------------


async def test_clearing_sigkill_mid_load_a_new_one_on_the_same_db_stores_each_record_once(
    broker: DurableMosquitto, tmp_path: Path
) -> None:
    """Mid-load the clearing of 4510 is SIGKILLed and a new one started on the same database; then the same
    happens to 4560 (the issuer of the records 4510 forwards). Records the dead process had taken but not
    committed come again (broker session, terminal resends); those it had committed but not acked are
    duplicates, acked again."""
    state = tmp_path / "state"
    with contextlib.ExitStack() as stack:
        clear = Clearings(broker.url, tmp_path, stack, CITIES)
        load = two_city_load(stack, broker.url, state, tmp_path / "run", rate=60, duration=12, seed=2)
        size = 0
        for city in CITIES:
            await wait_for(partial(grown_to, clear, size + 60), f"60 more records stored before killing {city}")
            assert load.running(), f"the load ended before the kill of {city}: nothing was tested\n{load.tail()}"
            clear.kill(city)
            await asyncio.sleep(1.0)  # the terminals go on; the broker queues for the dead clearing's session
            clear.start(city)
            size = await clear.size()
        doc = await load.finish()
        end = await outcome(clear, state)
    summary = end.result.line(
        "clearing SIGKILL",
        TERMINALS,
        f"{clear.kills} clearings killed and restarted",
        f"{end.forwarded} forwarded to the issuer city once each",
        f"{end.quarantined} quarantined",
    )
    check_outcome(end, summary)
    assert doc["generated"] == doc["acked"] == end.result.records and doc["rejected"] == 0, f"{summary}; load: {doc}"


# --- terminal SIGKILL -------------------------------------------------------------------------------------


async def test_terminals_sigkilled_mid_load_resume_from_their_state_files(
    broker: DurableMosquitto, tmp_path: Path
) -> None:
    """The `yikatong load` process (20 terminals) is SIGKILLed mid-load while records wait for their acks (the
    4510 clearing is paused with SIGSTOP for a second before, so some surely do). A rerun with the same state
    folder resumes the same terminals, resends what their outboxes hold and makes new records after them.

    The rerun uses another seed: the simulated cards' counters are not kept in the state folder, so the same
    seed would replay the same cards' counters (clones, refused as conflicts)."""
    state = tmp_path / "state"
    with contextlib.ExitStack() as stack:
        clear = Clearings(broker.url, tmp_path, stack, CITIES)
        first = two_city_load(stack, broker.url, state, tmp_path / "run-1", rate=60, duration=60, seed=3)
        await wait_for(lambda: grown_to(clear, 120), "120 records stored before the kill")
        paused = clear.procs["4510"].proc
        paused.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(1.0)
            assert first.running(), f"the load ended before the kill: nothing was tested\n{first.tail()}"
            first.kill()
        finally:
            paused.send_signal(signal.SIGCONT)
        at_kill = read_outboxes(state)
        assert at_kill.queued > 0, "no record waited for its ack at the kill: nothing was tested"
        second = two_city_load(stack, broker.url, state, tmp_path / "run-2", rate=30, duration=3, seed=4)
        doc = await second.finish()
        end = await outcome(clear, state)
    summary = end.result.line(
        "terminal SIGKILL",
        TERMINALS,
        f"1 kill with {at_kill.records} completed and {at_kill.queued} unacked",
        f"rerun: {doc['acked'] - doc['generated']} resumed and {doc['generated']} new records acked",
        f"{end.forwarded} forwarded to the issuer city once each",
        f"{end.quarantined} quarantined",
    )
    check_outcome(end, summary)
    assert end.result.records == at_kill.records + doc["generated"], f"{summary}; rerun: {doc}"
    assert doc["acked"] == at_kill.queued + doc["generated"] and doc["rejected"] == 0, f"{summary}; rerun: {doc}"


# --- network cut of a terminal ----------------------------------------------------------------------------


async def test_network_cut_terminal_outbox_grows_then_drains(broker: DurableMosquitto, tmp_path: Path) -> None:
    """A real terminal (CPU cards, PSAM, state file) reaches the broker through a link the test cuts: every
    connection dropped, reconnects refused. While cut, taps go on and the outbox grows by one record per tap;
    when the link is back it drains to 0. The second cut comes right after a burst of taps (records in flight)."""
    city = "4510"
    terminal = make_terminal(tmp_path / "t.sqlite", city=city, terminal=unique_terminal(city))
    cards = [cpu_card(1), cpu_card(2, Algorithm.DES3)]
    link = CuttableLink(broker.url)
    await link.restore()
    uplink = Uplink(link.url, terminal, batch=5, ack_timeout=2.0, max_backoff=0.5)
    taps = 0

    def tap() -> None:
        nonlocal taps
        result = terminal.tap(InProcessReader(cards[taps % 2]))
        assert result.ok, f"tap {taps + 1}: {result}"
        taps += 1
        uplink.notify()

    growth: list[int] = []
    async with fresh_db("sqlite", tmp_path) as db:
        async with clearing(broker.url, db, city), running(uplink.run()):
            for _ in range(10):
                tap()
            await wait_for(uplink.all_acked, "the first 10 records acked", 30)

            await link.cut()
            await wait_for(lambda: not uplink.stats.connected, "the uplink notices the cut", 30)
            for n in range(15):
                tap()
                growth.append(terminal.outbox.counts().queued)
                assert growth[-1] == n + 1, f"cut: {n + 1} taps made, outbox holds {growth[-1]}"
            await asyncio.sleep(1.5)  # reconnects are refused meanwhile
            assert not uplink.stats.connected and terminal.outbox.counts().queued == 15, uplink.stats
            await link.restore()
            await wait_for(uplink.all_acked, "the outbox drains after the first cut", 60)

            for _ in range(20):  # a burst, then the cut while it is on the wire
                tap()
            await link.cut()
            for _ in range(5):
                tap()
            held = terminal.outbox.counts().queued
            assert held >= 5, f"second cut: {held} records held"
            await link.restore()
            await wait_for(uplink.all_acked, "the outbox drains after the second cut", 60)
        view = await ledger_view(db, city)
    result = tally(completed(terminal), [view])
    summary = result.line(
        "network cut",
        1,
        f"{link.cuts} cuts",
        f"outbox grew {growth[0]}..{growth[-1]} with the 15 taps of the first cut, {held} held at the second",
        f"drained to {terminal.outbox.counts().queued}",
        f"{uplink.stats.connections} connections",
        f"{len(view.quarantine)} quarantined",
    )
    print(summary)
    result.check(summary)
    assert result.records == taps == 50, summary
    assert growth == list(range(1, 16)), f"{summary}; outbox during the cut: {growth}"
    assert uplink.stats.connections >= 3 and not view.quarantine, summary
    assert terminal.outbox.counts().rejected == 0, summary


# --- floods -----------------------------------------------------------------------------------------------


@dataclass
class Tap:
    """Everything published on the city's terminal and ack topics, as an outsider subscribed to them sees it."""

    records: list[tuple[str, bytes]] = field(default_factory=list)  # (topic, payload)
    acks: list[tuple[str, int, int]] = field(default_factory=list)  # (terminal, acked_through, rejected count)
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, broker: BrokerUrl, city: str) -> None:
        async with broker.client(f"watcher-{secrets.token_hex(3)}", clean_session=True) as client:
            await client.subscribe(f"yikatong/{city}/txn/+", qos=1)
            await client.subscribe(f"yikatong/{city}/ack/+", qos=1)
            self.ready.set()
            async for message in client.messages:
                payload = message.payload
                assert isinstance(payload, bytes)
                if "/txn/" in message.topic.value:
                    self.records.append((message.topic.value, payload))
                else:
                    ack = parse_ack(payload)
                    self.acks.append((ack.terminal, ack.acked_through, len(ack.rejected)))


async def replay(broker: BrokerUrl, messages: list[tuple[str, bytes]]) -> int:
    """Publish the messages again (QoS 1, one client); how many records they hold."""
    async with broker.client(f"replayer-{secrets.token_hex(3)}", clean_session=True) as client:
        for topic, payload in messages:
            await client.publish(topic, payload, qos=1)
    return sum(len(parse_uplink(payload)) for _, payload in messages)


async def test_duplicate_flood_changes_nothing_and_is_acked_again(broker: DurableMosquitto, tmp_path: Path) -> None:
    """What the load's terminals published is replayed many times: the first 40 messages ten times while the
    load goes on, then every message eight times with an aiomqtt client and once more with `mosquitto_pub -l`
    after it ended. Not one row is added; every replayed record is counted as a duplicate, each terminal is
    acked again through its last record, and the quarantine stays empty."""
    city, terminals = "4510", 10
    state = tmp_path / "state"
    seen = Tap()
    async with fresh_db("sqlite", tmp_path) as db, clearing(broker.url, db, city) as service:
        async with running(seen.run(broker.url, city)), contextlib.AsyncExitStack() as stack:
            await wait_for(seen.ready.is_set, "the watcher subscribed", 20)
            load = stack.enter_context(
                start_load(
                    broker.url, state, tmp_path / "run", terminals=terminals, cities=city, rate=40, duration=6, seed=5
                )
            )
            await wait_for(lambda: len(seen.records) >= 40, "40 messages of the terminals seen")
            assert load.running(), f"the load ended before the flood: nothing was tested\n{load.tail()}"
            during = await replay(broker.url, list(seen.records) * 10)
            flooded_while_loading = load.running()
            doc = await load.finish()
            # quiet: the clearing has handled every message published on the terminal topics (the watcher saw
            # them too, replays included), so what is counted from now on is the second flood's alone
            await wait_for(lambda: service.stats.messages == len(seen.records), "the clearing caught up", 60)
            assert service.stats.duplicates >= during, f"{during} replayed, {service.stats.duplicates} duplicates"
            before = await ledger_view(db, city)
            stored, duplicates, acks_before = service.stats.stored, service.stats.duplicates, len(seen.acks)
            messages = list(dict.fromkeys(seen.records))  # each distinct message the terminals or the replay sent
            after = await replay(broker.url, messages * 8)
            by_topic: dict[str, list[bytes]] = {}
            for topic, payload in messages:
                by_topic.setdefault(topic, []).append(payload)
            await asyncio.gather(
                *(
                    asyncio.to_thread(mosquitto_pub_lines, broker.port, topic, payloads, tmp_path)
                    for topic, payloads in by_topic.items()
                )
            )
            after += sum(len(parse_uplink(payload)) for _, payload in messages)
            await wait_for(
                lambda: service.stats.duplicates - duplicates >= after, f"{after} replayed records counted", 90
            )
            await wait_for(lambda: service.stats.messages == len(seen.records), "the clearing caught up again", 60)
            boxes = read_outboxes(state)
            last: dict[str, int] = {}
            for number, seq in boxes.all():
                last[number] = max(last.get(number, 0), seq)
            flooded = {topic.rsplit("/", 1)[1] for topic in by_topic}

            def acked_again() -> set[str]:
                return {
                    t for t, through, rejected in seen.acks[acks_before:] if through == last.get(t) and not rejected
                }

            await wait_for(lambda: acked_again() == flooded, "every flooded terminal acked again through its last seq")
        view = await ledger_view(db, city)
    result = tally(boxes.all(), [view])
    counted = service.stats.duplicates - duplicates
    summary = result.line(
        "duplicate flood",
        terminals,
        f"{during} records replayed {'during' if flooded_while_loading else 'partly after'} the load",
        f"{after} after it ({len(messages)} messages x 9)",
        f"{counted} duplicates counted after it, {service.stats.stored - stored} stored",
        f"acked again: {len(acked_again())}/{len(flooded)} terminals",
        f"{len(view.quarantine)} quarantined",
    )
    print(summary)
    result.check(summary)
    assert Counter(view.rows) == Counter(before.rows), f"{summary}: the ledger changed under the flood"
    assert counted == after and service.stats.stored == stored, summary
    assert flooded == set(last), f"{summary}; flooded {sorted(flooded)}, terminals with records {sorted(last)}"
    assert not view.quarantine and service.stats.failed_batches == 0, summary
    assert doc["generated"] == doc["acked"] == result.records and doc["rejected"] == 0, f"{summary}; load: {doc}"


def _garbage_lines(rng: random.Random, count: int) -> list[bytes]:
    return [garbage_line(rng, 120) for _ in range(count)]


def _forged(terminal: str, city: str, seqs: list[int], seed: int) -> list[str]:
    """Well-formed records of ``terminal`` with these seqs whose TAC does not verify."""
    card = synthetic_cards(1, [city], seed)[0]
    maker = SyntheticTerminal(HOST, city, terminal, DAY_START)
    out = []
    for seq in seqs:
        record = maker.purchase(card, 100)
        bad = "00000000" if record.tac != "00000000" else "11111111"
        out.append(record.model_copy(update={"seq": seq, "tac": bad}).to_json())
    return out


@dataclass
class Flood:
    """The outsider's messages by topic, and how many quarantine rows each topic must end with."""

    lines: dict[str, list[bytes]] = field(default_factory=dict)
    files: list[tuple[str, bytes]] = field(default_factory=list)
    rows: Counter[str] = field(default_factory=Counter)

    def add(self, topic: str, payload: bytes | str, rows: int = 1) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self.lines.setdefault(topic, []).append(data)
        self.rows[topic] += rows

    def add_file(self, topic: str, payload: bytes) -> None:
        self.files.append((topic, payload))
        self.rows[topic] += 1

    @property
    def messages(self) -> int:
        return sum(len(v) for v in self.lines.values()) + len(self.files)


def malformed_flood(city: str, real: list[str], rounds: int = 3) -> Flood:
    """Garbage on the terminal topics of ``city``: on the real terminals' topics only what names no seq they
    could reach (a forged record naming the seq a terminal is about to use would be acked to it as rejected:
    only the broker's ACL keeps outsiders off a terminal's topic, see test_reliability_acl); on made-up
    terminals' topics anything, low seqs included; and on a topic no terminal number can have."""
    rng = random.Random(7)
    flood = Flood()
    made_up = [unique_terminal(city) for _ in range(3)]
    odd = f"yikatong/{city}/txn/not-a-terminal"
    for n in range(rounds):
        for number in [*real, *made_up]:
            topic = f"yikatong/{city}/txn/{number}"
            seqs = [FAR + 10 * n + k for k in range(4)] if number in real else [1 + 10 * n + k for k in range(4)]
            for line in _garbage_lines(rng, 6):
                flood.add(topic, line)
            for doc in ('{"hello":"world"}', "[1,2,3]", '"record"', "null", '{"schema":"yikatong.txn/2","seq":1}'):
                flood.add(topic, doc)  # JSON, but neither a record nor a batch: no seq
            flood.add(topic, json.dumps({"schema": "yikatong.txn/1", "seq": seqs[0], "kind": "purchase"}))
            flood.add(topic, _forged(number, city, seqs[1:2], seed=100 + n)[0])  # bad TAC
            flood.add(topic, '{"schema":"yikatong.batch/1","records":[]}')  # an empty batch
            bad_batch = [json.dumps({"schema": "yikatong.txn/1", "seq": seqs[2]}), "{}"]
            bad_batch += _forged(number, city, seqs[3:4], seed=200 + n)
            flood.add(topic, batch_payload(bad_batch), rows=3)  # each record of a batch on its own
        for line in _garbage_lines(rng, 5):
            flood.add(odd, line)
        flood.add(odd, json.dumps({"schema": "yikatong.txn/1", "seq": 1}))
    big = b'{"schema":"yikatong.batch/1","records":["' + b"x" * (MAX_PAYLOAD + 50_000) + b'"]}'
    flood.add_file(f"yikatong/{city}/txn/{real[0]}", big)
    flood.add_file(f"yikatong/{city}/txn/{made_up[0]}", big)
    return flood


async def test_malformed_flood_from_an_outsider_is_quarantined_and_the_load_unharmed(
    broker: DurableMosquitto, tmp_path: Path
) -> None:
    """While 10 terminals tap at 40/s, `mosquitto_pub` processes flood the terminal topics with non-JSON bytes,
    JSON that is no record, records that fail the schema, forged TACs, empty and bad batches, and payloads over
    256 KiB. Every legit record is in the ledger once, every flooded message (or record of a flooded batch) is
    in the quarantine, and nothing else is."""
    city, terminals = "4510", 10
    state = tmp_path / "state"
    async with (
        fresh_db("sqlite", tmp_path) as db,
        clearing(broker.url, db, city) as service,
        contextlib.AsyncExitStack() as stack,
    ):
        load = stack.enter_context(
            start_load(
                broker.url, state, tmp_path / "run", terminals=terminals, cities=city, rate=40, duration=8, seed=6
            )
        )
        await wait_for(lambda: stored_at_least(db, city, 40), "40 records stored before the flood")
        assert load.running(), f"the load ended before the flood: nothing was tested\n{load.tail()}"
        real = [number for _, number in json.loads((state / "terminals.json").read_text())]
        flood = malformed_flood(city, real)
        senders = [
            asyncio.to_thread(mosquitto_pub_lines, broker.port, topic, lines, tmp_path)
            for topic, lines in flood.lines.items()
        ]
        senders += [asyncio.to_thread(mosquitto_pub_file, broker.port, t, p, tmp_path) for t, p in flood.files]
        await asyncio.gather(*senders)
        flood_done_while_loading = load.running()
        doc = await load.finish()
        expected = sum(flood.rows.values())
        await wait_for(lambda: service.stats.quarantined >= expected, f"{expected} quarantine rows from the flood", 90)
        await asyncio.sleep(1.0)  # anything beyond the flood would show now
        view = await ledger_view(db, city)
    boxes = read_outboxes(state)
    result = tally(boxes.all(), [view])
    got = Counter(q.topic for q in view.quarantine)
    oversized = sum(1 for q in view.quarantine if q.size > MAX_PAYLOAD)
    summary = result.line(
        "malformed flood",
        terminals,
        f"{flood.messages} garbage messages from mosquitto_pub on {len(flood.rows)} topics",
        f"{len(view.quarantine)} quarantined of {expected} expected ({oversized} oversized)",
        f"flood {'sent during' if flood_done_while_loading else 'finished after'} the load",
        f"{service.stats.failed_batches} failed batches",
    )
    print(summary)
    result.check(summary)
    assert got == flood.rows, f"{summary}; quarantine by topic differs: {got - flood.rows} / {flood.rows - got}"
    assert oversized == len(flood.files), summary
    real_topics = {f"yikatong/{city}/txn/{number}" for number in real}
    near = [q for q in view.quarantine if q.topic in real_topics and q.seq is not None and q.seq < FAR]
    assert not near, f"{summary}; quarantined with a terminal's own seqs: {near[:3]}"
    assert service.stats.failed_batches == 0 and boxes.queued == 0 and boxes.rejected == 0, summary
    assert doc["generated"] == doc["acked"] == result.records and doc["rejected"] == 0, f"{summary}; load: {doc}"
