"""The clearing's intake and ledger without a broker: exactly-once storage, conflicts, gap-free acks, the
bad-input corpus, settlement arithmetic and the daily clearing file."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiomqtt
import aiosqlite
import asyncpg
import pytest
from clearing_corpus import CITY, TERMINAL, Case, corpus, good_records
from clearing_support import HOST, fresh_db, signed_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, select

from clearing.db import migrate, open_engine
from clearing.hotlist import SNAPSHOT_AFTER_VERSIONS, Published, iso, publish_hotlist, send_snapshot, snapshot_reason
from clearing.intake import Intake, Topic
from clearing.ledger import (
    QUARANTINE,
    HotlistAdded,
    HotlistHead,
    Ledger,
    ListedCard,
    Outcome,
    Received,
    VersionTimes,
    database_trouble,
)
from clearing.schema import LEDGER, FlaggedCard
from clearing.settlement import CSV_HEADER, export_day, fee, settle, settle_day
from terminals.hotlist import CardSet, decode_chunks
from terminals.messages import (
    DELTA_SCHEMA,
    MAX_DELTA_CARDS,
    HotlistChunk,
    HotlistDelta,
    HotlistSnapshot,
    TxnRecord,
    batch_payload,
    hotlist_chunk_topic,
    hotlist_delta_topic,
    hotlist_snapshot_topic,
    parse_hotlist_message,
    txn_topic,
)

INTAKE = Intake(CITY, HOST)


class Desk:
    """An intake and a ledger of CITY over one database: ``send`` is what the service does per message."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    async def send(self, payload: bytes | str, terminal: str = TERMINAL) -> Outcome:
        raw = payload.encode() if isinstance(payload, str) else payload
        topic = txn_topic(CITY, terminal)
        parsed = Topic.parse(topic, CITY)
        assert parsed is not None
        verdicts = INTAKE.message(parsed, raw, await self.ledger.hotlist())
        return await self.ledger.store([Received(topic, terminal, verdicts)])


@pytest.fixture
async def desk(tmp_path: Path):  # type: ignore[no-untyped-def]
    async with fresh_db("sqlite", tmp_path) as url:
        engine = open_engine(url)
        await migrate(engine)
        yield Desk(Ledger(engine, CITY))
        await engine.dispose()


def _ack(outcome: Outcome) -> tuple[int, list[tuple[int, str]]]:
    (ack,) = outcome.terminal_acks
    return ack.acked_through, ack.rejected


async def test_the_same_record_three_times_is_one_row_and_acked_each_time(desk: Desk) -> None:
    record = good_records()[0]
    outcomes = [await desk.send(record.to_json()) for _ in range(3)]
    assert [(o.stored, o.duplicates) for o in outcomes] == [(1, 0), (0, 1), (0, 1)]
    assert [_ack(o) for o in outcomes] == [(1, [])] * 3
    assert (await desk.ledger.counts())["ledger"] == 1


async def test_copies_inside_one_batch_are_stored_once(desk: Desk) -> None:
    records = [r.to_json() for r in good_records()]
    outcome = await desk.send(batch_payload(records + records[:2]))
    assert (outcome.stored, outcome.duplicates, outcome.quarantined) == (4, 2, 0)
    assert _ack(outcome) == (4, [])


async def test_ack_covers_only_a_gap_free_run_of_seqs(desk: Desk) -> None:
    one, two, three, four = (r.to_json() for r in good_records())
    assert _ack(await desk.send(batch_payload([three, four]))) == (0, [])
    assert _ack(await desk.send(two)) == (0, [])
    assert _ack(await desk.send(one)) == (4, [])


async def test_a_conflict_is_quarantined_and_the_card_flagged(desk: Desk) -> None:
    cases = {c.name: c for c in corpus()}
    original = good_records()[0]
    await desk.send(original.to_json())
    outcome = await desk.send(cases["replayed-counter"].payload)
    assert outcome.conflicts == 1
    async with desk.ledger.engine.connect() as db:
        flagged = (await db.execute(select(FlaggedCard.card, FlaggedCard.record_id))).all()
    assert flagged == [(original.card.id, original.record_id)]
    assert (await desk.ledger.counts())["ledger"] == 1  # the first copy stays, never merged


@pytest.mark.parametrize("case", corpus(), ids=lambda c: c.name)
async def test_bad_input_is_quarantined_with_its_reason(desk: Desk, case: Case) -> None:
    await desk.send(good_records()[0].to_json())  # the original the replay case conflicts with
    outcome = await desk.send(case.payload, case.topic_terminal)
    assert outcome.quarantined == 1 and outcome.stored == 0
    async with desk.ledger.engine.connect() as db:
        (reason, payload, size, seq), *more = (
            await db.execute(select(QUARANTINE.c.reason, QUARANTINE.c.payload, QUARANTINE.c.size, QUARANTINE.c.seq))
        ).all()
    assert not more
    assert case.reason in reason
    assert size == len(case.payload) and payload == case.payload[: len(payload)]
    assert seq == case.seq
    rejected = [seq for ack in outcome.terminal_acks for seq, _ in ack.rejected]
    assert rejected == ([case.seq] if case.seq is not None and case.topic_terminal == TERMINAL else [])
    # the desk goes on: a good record after the bad one is stored
    assert (await desk.send(good_records()[1].to_json())).stored == 1


async def test_one_bad_record_does_not_sink_its_batch(desk: Desk) -> None:
    good = [r.to_json() for r in good_records()]
    bad = good[2].replace('"tac":"', '"tac":"0')[:-1] + "}"  # a 9-digit TAC
    outcome = await desk.send(batch_payload([good[0], good[1], bad, good[3]]))
    assert (outcome.stored, outcome.quarantined) == (3, 1)
    through, rejected = _ack(outcome)
    assert through == 4 and [seq for seq, _ in rejected] == [3]


async def test_hotlisted_cards_are_refused(desk: Desk) -> None:
    first, second = good_records()[:2]
    await desk.ledger.add_to_hotlist([second.card.id])
    assert (await desk.send(first.to_json())).stored == 1
    outcome = await desk.send(second.to_json())
    assert _ack(outcome) == (2, [(2, f"card {second.card.id} is hotlisted")])


def _cards(start: int, count: int) -> list[str]:
    return [f"3104{n:016d}" for n in range(start, start + count)]


class FakeBroker:
    """Keeps retained messages as a broker does (an empty payload clears one) and the order they came in; the
    publish numbered ``fail_at`` raises, as when the broker goes away."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.retained: dict[str, bytes] = {}
        self.sent: list[str] = []
        self.fail_at = fail_at

    async def publish(self, topic: str, payload: str | bytes, qos: int, retain: bool) -> None:
        assert qos == 1 and retain
        if len(self.sent) == self.fail_at:
            raise aiomqtt.MqttError("broker gone")
        self.sent.append(topic)
        raw = payload.encode() if isinstance(payload, str) else payload
        if raw:
            self.retained[topic] = raw
        else:
            self.retained.pop(topic, None)

    def get(self, topic: str) -> HotlistSnapshot | HotlistChunk | HotlistDelta:
        return parse_hotlist_message(self.retained[topic])


SNAPSHOT, CHUNK0, DELTA = hotlist_snapshot_topic(CITY), hotlist_chunk_topic(CITY, 0), hotlist_delta_topic(CITY)


async def test_each_hotlist_add_is_a_version_tagging_the_cards_it_added(desk: Desk) -> None:
    ledger = desk.ledger
    assert await ledger.hotlist_head() == HotlistHead(0, 0)
    assert await ledger.add_to_hotlist(["A1B2C3D4", *_cards(1, 1)]) == HotlistAdded(1, 2, 2)
    assert await ledger.add_to_hotlist(["A1B2C3D4", *_cards(2, 1)]) == HotlistAdded(2, 1, 3)  # one was listed
    assert await ledger.hotlist_added(after=0) == {1: [*_cards(1, 1), "A1B2C3D4"], 2: _cards(2, 1)}
    assert await ledger.hotlist_added(after=1) == {2: _cards(2, 1)}
    assert (await ledger.hotlist_cards(1)).cards() == [*_cards(1, 1), "A1B2C3D4"]
    assert [v.published for v in await ledger.hotlist_versions()] == [None, None]
    await ledger.mark_published(1, 1000.0)
    await ledger.mark_published(2, 2000.0)
    await ledger.mark_published(2, 3000.0, snapshot=True)  # a later publish keeps the first publish time
    assert [(v.version, v.published) for v in await ledger.hotlist_versions()] == [(1, 1000.0), (2, 2000.0)]
    assert await ledger.hotlist_entries() == [
        ListedCard(_cards(1, 1)[0], 1, 1000.0),
        ListedCard(_cards(2, 1)[0], 2, 2000.0),
        ListedCard("A1B2C3D4", 1, 1000.0),
    ]
    assert await ledger.hotlist_head() == HotlistHead(2, 2)


async def test_publishing_sends_a_snapshot_first_then_deltas_since_it(desk: Desk) -> None:
    ledger, broker = desk.ledger, FakeBroker()
    assert await publish_hotlist(broker, ledger) == Published(0) and broker.sent == []
    await ledger.add_to_hotlist(["A1B2C3D4"])
    assert await publish_hotlist(broker, ledger) == Published(1, "no snapshot yet", 1)
    assert broker.sent == [CHUNK0, SNAPSHOT, DELTA]  # chunks before the head that names them
    head, chunk, delta = broker.get(SNAPSHOT), broker.get(CHUNK0), broker.get(DELTA)
    assert isinstance(head, HotlistSnapshot) and isinstance(chunk, HotlistChunk)
    assert decode_chunks([chunk.data], head.sha256, head.cards)[0].cards() == ["A1B2C3D4"]
    (first,) = await ledger.hotlist_versions()
    assert first.published is not None and head.published == iso(first.published)
    assert delta == HotlistDelta(schema=DELTA_SCHEMA, issuer=CITY, base=1, version=1, changes=[])
    await ledger.add_to_hotlist(_cards(1, 2))
    await ledger.add_to_hotlist(_cards(3, 1))
    broker.sent.clear()
    assert await publish_hotlist(broker, ledger) == Published(3)
    assert broker.sent == [DELTA]
    delta = broker.get(DELTA)
    assert isinstance(delta, HotlistDelta) and (delta.base, delta.version) == (1, 3)
    times = {v.version: v.published for v in await ledger.hotlist_versions()}
    assert [(c.version, c.add, c.published) for c in delta.changes] == [
        (2, _cards(1, 2), iso(times[2] or 0)),
        (3, _cards(3, 1), iso(times[3] or 0)),
    ]
    assert await ledger.hotlist_head() == HotlistHead(3, 1)


@pytest.mark.parametrize(
    ("versions", "cards", "asked", "reason"),
    [
        (3, MAX_DELTA_CARDS, False, None),
        (3, MAX_DELTA_CARDS + 1, False, "more than a delta holds"),
        (SNAPSHOT_AFTER_VERSIONS, 10, False, None),
        (SNAPSHOT_AFTER_VERSIONS + 1, 10, False, "versions since snapshot"),
        (1, 1, True, "asked for"),
    ],
)
def test_a_new_snapshot_when_the_delta_would_grow_too_large(
    versions: int, cards: int, asked: bool, reason: str | None
) -> None:
    pending = [VersionTimes(v, 0.0, None) for v in range(5, 5 + versions)]
    found = snapshot_reason(HotlistHead(4 + versions, 4), pending, cards, asked=asked)
    assert found is None if reason is None else reason in str(found)
    assert snapshot_reason(HotlistHead(9, 0), pending, 1, asked=False) == "no snapshot yet"
    assert "not all in the database" in str(snapshot_reason(HotlistHead(9, 4), pending[1:], 1, asked=False))


async def test_more_cards_than_a_delta_holds_make_a_new_snapshot(desk: Desk) -> None:
    ledger, broker = desk.ledger, FakeBroker()
    await ledger.add_to_hotlist(_cards(0, 1))
    await publish_hotlist(broker, ledger)
    await ledger.add_to_hotlist(_cards(1, MAX_DELTA_CARDS + 1))
    published = await publish_hotlist(broker, ledger)
    assert published.version == 2 and "more than a delta holds" in str(published.snapshot_reason)
    head = broker.get(SNAPSHOT)
    assert isinstance(head, HotlistSnapshot) and (head.version, head.cards) == (2, MAX_DELTA_CARDS + 2)
    assert broker.get(DELTA) == HotlistDelta(schema=DELTA_SCHEMA, issuer=CITY, base=2, version=2, changes=[])
    assert await ledger.hotlist_head() == HotlistHead(2, 2)


async def test_a_version_is_published_only_once_the_broker_confirmed_all_of_it(desk: Desk) -> None:
    ledger = desk.ledger
    await ledger.add_to_hotlist(_cards(0, 3))
    with pytest.raises(aiomqtt.MqttError):
        await publish_hotlist(FakeBroker(fail_at=1), ledger)  # the chunk went out, the head did not
    assert [v.published for v in await ledger.hotlist_versions()] == [None]
    assert await ledger.hotlist_head() == HotlistHead(1, 0)
    assert await publish_hotlist(FakeBroker(), ledger) == Published(1, "no snapshot yet", 3)
    assert [v.published is not None for v in await ledger.hotlist_versions()] == [True]


async def test_a_restore_sends_the_snapshot_again_with_its_first_publish_time(desk: Desk) -> None:
    ledger, broker = desk.ledger, FakeBroker()
    await ledger.add_to_hotlist(_cards(0, 2))
    await publish_hotlist(broker, ledger)
    await ledger.add_to_hotlist(_cards(2, 1))
    await publish_hotlist(broker, ledger)
    before = dict(broker.retained)
    empty = FakeBroker()  # a broker that lost its retained messages
    assert await publish_hotlist(empty, ledger, restore=True) == Published(2)
    assert empty.sent == [CHUNK0, SNAPSHOT, DELTA] and empty.retained == before


async def test_a_smaller_snapshot_clears_the_chunks_the_larger_one_left(desk: Desk) -> None:
    broker = FakeBroker()
    for index in range(3):
        broker.retained[hotlist_chunk_topic(CITY, index)] = b"old"
    await send_snapshot(broker, CITY, 1, CardSet.of(_cards(0, 5)), 0.0, stale=3)
    assert broker.sent[-2:] == [hotlist_chunk_topic(CITY, 1), hotlist_chunk_topic(CITY, 2)]
    assert sorted(broker.retained) == [SNAPSHOT, CHUNK0]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(str.encode)))
async def test_fuzzed_payloads_always_end_in_ledger_or_quarantine(desk: Desk, payload: bytes) -> None:
    outcome = await desk.send(payload)
    assert outcome.stored + outcome.quarantined >= 1


async def test_other_cities_cards_are_stored_and_forwarded_not_verified_here(desk: Desk) -> None:
    records = signed_records(6, CITY, TERMINAL, issuers=("4560", "4510"), cards=2)
    outcome = await desk.send(batch_payload([r.to_json() for r in records]))
    assert outcome.stored == 6
    assert sorted(r.seq for r in outcome.to_forward) == [r.seq for r in records if r.card.issuer == "4510"]


# --- acks of many terminals in one batch ------------------------------------------------------------------


def _fleet_records(terminals: int) -> dict[str, list[str]]:
    """Six signed records (seqs 1..6) for each of ``terminals`` terminals, cards of their own: terminal -> JSON."""
    out = {}
    for i in range(terminals):
        terminal = f"{CITY}C0D0{i:04X}"
        out[terminal] = [r.to_json() for r in signed_records(6, CITY, terminal, issuers=(CITY,), cards=2, seed=100 + i)]
    return out


def _forged(doc: str) -> str:
    fields = json.loads(doc)
    fields["tac"] = "00000000" if fields["tac"] != "00000000" else "11111111"
    return json.dumps(fields)


def _received(messages: list[tuple[str, str]]) -> list[Received]:
    """(terminal, payload) messages as the intake hands them to the ledger."""
    received = []
    for terminal, payload in messages:
        topic = txn_topic(CITY, terminal)
        parsed = Topic.parse(topic, CITY)
        assert parsed is not None
        received.append(Received(topic, terminal, INTAKE.message(parsed, payload.encode(), frozenset())))
    return received


async def _store_batch(ledger: Ledger, messages: list[tuple[str, str]]) -> dict[str, tuple[int, list[int]]]:
    """One ``store`` of (terminal, payload) messages; terminal -> (acked through, rejected seqs), after checking
    that every rejection says why (a forged TAC here) and the acks come in terminal order."""
    acks = (await ledger.store(_received(messages))).terminal_acks
    assert [a.terminal for a in acks] == sorted(a.terminal for a in acks)
    assert all("TAC does not verify" in reason for a in acks for _, reason in a.rejected)
    return {a.terminal: (a.acked_through, [seq for seq, _ in a.rejected]) for a in acks}


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_one_batch_of_many_terminals_acks_each_its_own_gap_free_run(kind: str, tmp_path: Path) -> None:
    """Forty terminals in every batch, four patterns of ten: in order; a forged record inside the run; a gap
    filled by the next batch; a forged record above a gap. Resends of acked and quarantined seqs name the
    rejections again; a terminal whose message names no seq gets no ack."""
    fleet = _fleet_records(40)
    kinds = {terminal: i % 4 for i, terminal in enumerate(fleet)}
    first = {0: ([1, 2, 3], set()), 1: ([1, 2, 3], {2}), 2: ([2, 3], set()), 3: ([1, 3, 4], {4})}
    second = {0: ([2, 5], set()), 1: ([2, 4], {2}), 2: ([1], set()), 3: ([2], set())}
    acked_first = {0: (3, []), 1: (3, [2]), 2: (0, []), 3: (1, [])}
    acked_second = {0: (3, []), 1: (4, [2]), 2: (3, []), 3: (4, [4])}

    def messages(plan: dict[int, tuple[list[int], set[int]]]) -> list[tuple[str, str]]:
        out = []
        for terminal, docs in reversed(fleet.items()):  # not in terminal order
            seqs, forged = plan[kinds[terminal]]
            payloads = [_forged(docs[s - 1]) if s in forged else docs[s - 1] for s in seqs]
            out.append((terminal, payloads[0]))  # a single record, then a batch of the rest
            if payloads[1:]:
                out.append((terminal, batch_payload(payloads[1:])))
        return [*out, (f"{CITY}C0D0FFFF", "not json")]

    async with fresh_db(kind, tmp_path) as url:
        engine = open_engine(url)
        await migrate(engine)
        try:
            ledger = Ledger(engine, CITY)
            assert await _store_batch(ledger, messages(first)) == {t: acked_first[k] for t, k in kinds.items()}
            assert await _store_batch(ledger, messages(second)) == {t: acked_second[k] for t, k in kinds.items()}
            # a worker that starts afresh (no marks remembered) reads the same marks from the database
            again = await _store_batch(Ledger(engine, CITY), messages(second))
            assert again == {t: acked_second[k] for t, k in kinds.items()}
        finally:
            await engine.dispose()


@pytest.mark.postgres
async def test_two_workers_move_the_marks_of_the_same_terminals_at_once(tmp_path: Path) -> None:
    """Two ledgers on one PostgreSQL database store batches of the same 40 terminals at the same moment (odd
    seqs to one, even to the other, in opposite message orders): no deadlock, and the marks end where they must."""
    fleet = _fleet_records(40)
    async with fresh_db("postgres", tmp_path) as url:
        engines = [open_engine(url), open_engine(url)]
        await migrate(engines[0])
        try:
            ledgers = [Ledger(engine, CITY) for engine in engines]
            for seq in (1, 3, 5):
                odd = [(t, docs[seq - 1]) for t, docs in fleet.items()]
                even = [(t, docs[seq]) for t, docs in reversed(fleet.items())]
                await asyncio.gather(_store_batch(ledgers[0], odd), _store_batch(ledgers[1], even))
            assert await _store_batch(ledgers[1], [(t, docs[5]) for t, docs in fleet.items()]) == {
                t: (6, []) for t in fleet
            }
        finally:
            for engine in engines:
                await engine.dispose()


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_an_ack_stopped_below_a_gap_is_caught_up_once_another_worker_filled_it(kind: str, tmp_path: Path) -> None:
    """Each worker acks what its own transaction sees: worker A stores seq 2 of four terminals, acks them through
    0 and marks them behind (the gap at seq 1 may be another worker's commit under way). Worker B then stores
    seq 1 of three of them. A's catch-up acks those three through 2; the fourth, whose gap nobody filled, stays
    where it was, still behind (its terminal sends seq 1 again)."""
    fleet = _fleet_records(4)
    terminals = list(fleet)
    async with fresh_db(kind, tmp_path) as url:
        engine = open_engine(url)
        await migrate(engine)
        try:
            worker_a, worker_b = Ledger(engine, CITY), Ledger(engine, CITY)
            first = (await worker_a.store(_received([(t, docs[1]) for t, docs in fleet.items()]))).terminal_acks
            assert [(x.acked_through, x.behind) for x in first] == [(0, True)] * 4
            await worker_b.store(_received([(t, fleet[t][0]) for t in terminals[:3]]))
            caught = await worker_a.catch_up({x.terminal: x.acked_through + 1 for x in first})
            assert {x.terminal: (x.acked_through, x.behind) for x in caught} == {
                **{t: (2, False) for t in terminals[:3]},
                terminals[3]: (0, True),
            }
        finally:
            await engine.dispose()


@pytest.mark.parametrize("bulk_from", [1, 10**9], ids=["bulk", "statement"])
async def test_ack_bookkeeping_costs_the_same_statements_for_3_or_60_terminals(
    tmp_path: Path, bulk_from: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The statements a batch hands to the database driver do not grow with the terminals in it (first contact
    and after), the records inserted in bulk or by a statement alike. Counted at the driver (each execute or
    executemany aiosqlite hands to its thread), which SQLAlchemy's statements and the bulk path's raw
    executemany both pass: SQLAlchemy's cursor events would not see the latter."""
    fleet = _fleet_records(63)
    statements = 0
    handed: Callable[..., Awaitable[Any]] = aiosqlite.Connection._execute

    async def counted(connection: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal statements
        if getattr(fn, "__name__", "") in ("execute", "executemany"):
            statements += 1
        return await handed(connection, fn, *args, **kwargs)

    monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
    async with fresh_db("sqlite", tmp_path) as url:
        engine = open_engine(url)
        await migrate(engine)
        try:
            ledger = Ledger(engine, CITY, bulk_from=bulk_from)
            costs = []
            for seq in (1, 2):
                for terminals in (list(fleet)[:3], list(fleet)[3:]):
                    statements = 0
                    acks = await _store_batch(ledger, [(t, fleet[t][seq - 1]) for t in terminals])
                    assert acks == {t: (seq, []) for t in terminals}
                    costs.append(statements)
        finally:
            await engine.dispose()
    assert costs[0] == costs[1] and costs[2] == costs[3], costs
    assert min(costs) > 0  # the counting sees the batch's statements


@pytest.mark.postgres
async def test_a_refused_copy_falls_back_inside_its_transaction_counted_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that did not ack a resend itself (another worker's records, a lost ack) sends it to COPY, which
    collides: the batch goes through the statement path in the same transaction (one BEGIN), the fallback is
    counted and logged, and the outcome is exact."""
    fleet = _fleet_records(3)
    async with fresh_db("postgres", tmp_path) as url:
        engine = open_engine(url)
        await migrate(engine)
        begins = 0

        def begun(*_args: object) -> None:
            nonlocal begins
            begins += 1

        event.listen(engine.sync_engine, "begin", begun)
        try:
            await _store_batch(Ledger(engine, CITY, bulk_from=1), [(t, docs[0]) for t, docs in fleet.items()])
            other = Ledger(engine, CITY, bulk_from=1)  # no marks of these terminals: the resends go to COPY
            begins = 0
            with caplog.at_level(logging.WARNING, "clearing.ledger"):
                acks = await _store_batch(other, [(t, d) for t, docs in fleet.items() for d in docs[:2]])
            assert acks == {t: (2, []) for t in fleet}
            assert begins == 1
            assert other.bulk_fallbacks == 1
            assert "bulk insert refused (UniqueViolationError" in caplog.text
            async with engine.connect() as db:
                assert (await db.execute(select(func.count()).select_from(LEDGER))).scalar_one() == 6
        finally:
            await engine.dispose()


def test_the_drivers_connection_errors_are_database_trouble() -> None:
    """asyncpg's errors for a lost or closed connection (some carry no SQLSTATE) blame the database; a unique
    violation blames the data."""
    assert database_trouble(asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"))
    assert database_trouble(asyncpg.InterfaceError("cannot perform operation: connection is closed"))
    assert not database_trouble(asyncpg.UniqueViolationError("duplicate key value"))


# --- settlement -------------------------------------------------------------------------------------------


def test_fee_rounds_half_even_per_record() -> None:
    assert [fee(a, Decimal("0.005")) for a in (100, 300, 500, 700, 99, 101)] == [0, 2, 2, 4, 0, 1]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["4510", "4560", "4530"]),
            st.sampled_from(["4510", "4560", "4530"]),
            st.integers(0, 100_000),
        ),
        max_size=200,
    )
)
def test_net_positions_always_sum_to_zero(debits: list[tuple[str, str, int]]) -> None:
    foreign = [d for d in debits if d[0] != d[1]]
    result = settle("2026-11-24", [(a, i, n, 1) for a, i, n in foreign], {("4510", "4560"): Decimal("0.004")})
    assert sum(result.positions.values()) == 0
    assert sum(x.gross for x in result.lines) == sum(a for _, _, a in foreign)


async def test_settle_day_and_clearing_file(desk: Desk, tmp_path: Path) -> None:
    records = signed_records(12, CITY, TERMINAL, issuers=("4560", "4510"), cards=4)
    outcome = await desk.send(batch_payload([r.to_json() for r in records]))
    forwarded = [r.record_id for r in outcome.to_forward]
    assert await desk.ledger.forward_done("4510", forwarded, []) == len(forwarded)
    settlement = await settle_day(desk.ledger.engine, "2026-11-24", {})
    (line,) = settlement.lines
    foreign = [r for r in records if r.card.issuer == "4510"]
    assert (line.acquirer, line.issuer, line.records) == (CITY, "4510", len(foreign))
    assert line.gross == sum(r.amount for r in foreign)
    assert line.fee == sum(fee(r.amount, Decimal("0.005")) for r in foreign)
    assert settlement.positions == {CITY: line.owed, "4510": -line.owed}
    files = await export_day(desk.ledger.engine, "2026-11-24", tmp_path / "out")
    assert files == {f"clearing-{CITY}-2026-11-24.csv": 12}
    with (tmp_path / "out" / f"clearing-{CITY}-2026-11-24.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_HEADER
    assert [r["record_id"] for r in rows] == [r.record_id for r in records]
    assert [int(r["amount"]) for r in rows] == [r.amount for r in records]
    assert not list((tmp_path / "out").glob(".*"))  # no temporary file left
    assert (await settle_day(desk.ledger.engine, "2026-11-23", {})).lines == []


def test_settlement_day_is_the_china_day() -> None:
    record = good_records()[0]
    late = TxnRecord.model_validate({**record.model_dump(by_alias=True), "time": "2026-11-24T17:30:00+00:00"})
    from clearing.intake import settlement_day

    assert settlement_day(late) == "2026-11-25"
    assert settlement_day(record) == dt.date(2026, 11, 24).isoformat()
