"""No input can stop or fool the clearing: limits before parsing, per-record and per-message isolation,
a bounded quarantine, database trouble told apart from bad data, and the ack defects found earlier (a topic
segment no terminal owns on PostgreSQL, a forged seq reported as rejected)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import signal
import sqlite3
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from clearing_corpus import CITY, TERMINAL, corpus, good_records
from clearing_support import HOST, fresh_db
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mqtt_support import MOSQUITTO, require_mosquitto
from sqlalchemy import select, text
from sqlalchemy.exc import OperationalError

import clearing.intake
import clearing.ledger
import clearing.verify
from clearing.db import migrate, open_engine
from clearing.intake import Intake, Refused, Topic, settlement_day
from clearing.ledger import LEDGER, QUARANTINE, QUARANTINE_KEEP, TALLY, Ledger, Received, database_trouble
from terminals.messages import (
    CHINA,
    MAX_PAYLOAD,
    Limits,
    MessageError,
    batch_payload,
    load_json,
    parse_record,
    parse_uplink,
    parse_uplink_records,
    txn_topic,
)
from yikatong import cli

INTAKE = Intake(CITY, HOST)
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def received(payload: bytes, terminal: str = TERMINAL) -> Received:
    topic = txn_topic(CITY, terminal)
    parsed = Topic.parse(topic, CITY)
    assert parsed is not None
    return Received(topic, terminal, INTAKE.message(parsed, payload, frozenset()), payload)


@pytest.fixture(params=BACKENDS)
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    async with fresh_db(request.param, tmp_path) as url:
        engine = open_engine(url)
        await migrate(engine)
        yield Ledger(engine, CITY)
        await engine.dispose()


async def rows(ledger: Ledger, table: Any) -> list[Any]:
    async with ledger.engine.connect() as db:
        return list((await db.execute(select(table).where(table.c.city == CITY))).all())


# --- limits before parsing -----------------------------------------------------------------------------------


def _record_doc(**changes: object) -> dict[str, object]:
    return {**json.loads(good_records()[0].to_json()), **changes}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"[" * 200_000 + b"]" * 200_000, "exceeds 262144"),
        (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 8 levels"),
        (b'{"a":' * 9 + b"1" + b"}" * 9, "nested deeper than 8 levels"),
        (b'{"schema":"yikatong.txn/1","seq":' + b"9" * 5000 + b"}", "a number of 5000 digits is out of range"),
        (json.dumps(_record_doc(seq=10**30)).encode(), "a number of 31 digits"),
        (json.dumps(_record_doc(psam="A" * 300)).encode(), "a string of 300 characters exceeds 256"),
        # 100 characters written as 600 of JSON: under the limit, refused by the field's own rule
        (json.dumps(_record_doc(psam="P")).replace('"P"', '"' + "\\u0041" * 100 + '"').encode(), "psam: String should"),
        (json.dumps(_record_doc(card={"issuer": "4560", "serial": "\ud800"})).encode(), "lone UTF-16 surrogate"),
        (b'{"schema":"yikatong.txn/1","seq":NaN}', "NaN is not JSON"),
        (b"\xff\xfe", "not UTF-8 JSON"),
        (json.dumps(_record_doc(time="0001-01-01T00:00:00+14:00")).encode(), "between the years 1970 and 9998"),
        (json.dumps(_record_doc(time="9999-12-31T23:59:59-12:00")).encode(), "between the years 1970 and 9998"),
    ],
    ids=lambda value: value[:24].decode(errors="replace") if isinstance(value, bytes) else value,
)
def test_hostile_payloads_are_refused_with_a_reason(payload: bytes, reason: str) -> None:
    (verdict,) = INTAKE.message(Topic("terminal", TERMINAL), payload, frozenset())
    assert isinstance(verdict, Refused)
    assert reason in verdict.reason


def test_batch_and_payload_limits_are_settings() -> None:
    record = good_records()[0].to_json()
    batch = batch_payload(["{}"] * 1001)
    with pytest.raises(MessageError, match="a batch of 1001 records exceeds 1000"):
        parse_uplink(batch)
    assert len(parse_uplink(batch, Limits(max_records=2000))) == 1001
    many = batch_payload([record] * 1000)  # 1,000 real records pass the records limit, not the size limit
    assert len(parse_uplink(many, Limits(max_payload=len(many)))) == 1000
    with pytest.raises(MessageError, match=f"payload of {len(record)} bytes exceeds 100"):
        load_json(record, Limits(max_payload=100))
    assert load_json('{"a":"' + "x" * 256 + '"}') == {"a": "x" * 256}  # at the limit: accepted


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=600),
        JSON.map(lambda doc: json.dumps(doc).encode()),
        JSON.map(lambda doc: json.dumps({**_record_doc(), "line": doc}).encode()),
        st.dictionaries(st.sampled_from(list(_record_doc())), JSON, max_size=6).map(
            lambda changes: json.dumps(_record_doc(**changes)).encode()
        ),
        st.lists(JSON, max_size=5).map(
            lambda docs: json.dumps({"schema": "yikatong.batch/1", "records": docs}).encode()
        ),
    )
)
def test_the_intake_never_raises(payload: bytes) -> None:
    verdicts = INTAKE.message(Topic("terminal", TERMINAL), payload, frozenset())
    assert verdicts
    assert all(v.reason for v in verdicts if isinstance(v, Refused))


def test_an_unforeseen_error_in_a_check_costs_that_record_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    records = good_records()[:3]
    poisoned = records[1].seq

    def tac_problem(host: object, record: Any) -> str | None:
        if record.seq == poisoned:
            raise ZeroDivisionError("a bug nobody foresaw")
        return None

    def tac_problems(host: object, records: Any) -> list[str | None]:
        return [tac_problem(host, record) for record in records]  # the batch trips on the poisoned record

    monkeypatch.setattr(clearing.intake, "tac_problem", tac_problem)
    monkeypatch.setattr(clearing.intake, "tac_problems", tac_problems)
    verdicts = INTAKE.message(
        Topic("terminal", TERMINAL), batch_payload([r.to_json() for r in records]).encode(), frozenset()
    )
    assert [isinstance(v, Refused) for v in verdicts] == [False, True, False]
    refusal = verdicts[1]
    assert isinstance(refusal, Refused)
    assert refusal.seq == poisoned
    assert refusal.reason == "internal error while checking: ZeroDivisionError: a bug nobody foresaw"


def test_the_tacs_of_many_messages_are_verified_in_one_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A forged TAC and a bad record among good ones: one ``tac_problems`` call for every message, and the same
    verdicts as message by message."""
    good = good_records()
    forged = json.loads(good[1].to_json()) | {"tac": "00000000" if good[1].tac != "00000000" else "11111111"}
    payloads = [
        good[0].to_json().encode(),
        batch_payload([json.dumps(forged), good[2].to_json(), "{}"]).encode(),
        good[3].to_json().encode(),
    ]
    topic = Topic("terminal", TERMINAL)
    one_by_one = [INTAKE.message(topic, payload, frozenset()) for payload in payloads]
    calls: list[int] = []
    real = clearing.verify.tac_problems

    def counted(host: Any, records: Any) -> list[str | None]:
        calls.append(len(records))
        return real(host, records)

    monkeypatch.setattr(clearing.intake, "tac_problems", counted)
    together = INTAKE.messages([(topic, payload) for payload in payloads], frozenset())
    assert calls == [4]  # the record "{}" fails its schema before any TAC is looked at
    assert together == one_by_one
    assert [[isinstance(v, Refused) for v in m] for m in together] == [[False], [True, False, True], [False]]
    assert "TAC does not verify" in str(getattr(together[1][0], "reason", ""))


def _compact(doc: object) -> str:
    return json.dumps(doc, separators=(",", ":"))


def _splice(text: str, at: int, cut: int, insert: str) -> bytes:
    at %= len(text) + 1
    return (text[:at] + insert + text[at + cut :]).encode("utf-8", "surrogatepass")


GOOD_BATCH = batch_payload([r.to_json() for r in good_records()[:2]])
GOOD_ONE = good_records()[0].to_json()
RECORD_KEYS = [*_record_doc(), "schema_", "line", "station", "extra"]
CHANGED = st.tuples(
    st.dictionaries(
        st.sampled_from(RECORD_KEYS), JSON | st.text(st.sampled_from('A\ud800\udc00é"\\'), max_size=3), max_size=3
    ),
    st.sets(st.sampled_from(RECORD_KEYS), max_size=2),
).map(lambda t: {k: v for k, v in _record_doc(**t[0]).items() if k not in t[1]})


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        # the fast path's own ground: compact text, one record or a batch with a record changed or missing fields
        CHANGED.map(lambda doc: batch_payload([GOOD_ONE, _compact(doc)]).encode()),
        CHANGED.map(lambda doc: _compact(doc).encode()),
        # and text a few characters away from a valid payload: escapes, duplicates, brackets, control characters
        st.tuples(
            st.sampled_from([GOOD_BATCH, GOOD_ONE]),
            st.integers(0, 2000),
            st.integers(0, 3),
            st.text(st.sampled_from('"\\{}[],:0123456789-.eE tnul\t\x00\x7fé\ud800schema_'), max_size=6),
        ).map(lambda t: _splice(*t)),
    )
)
def test_records_validated_from_the_text_are_those_of_the_checks(payload: bytes) -> None:
    """Whatever ``parse_uplink_records`` vouches for, the limits and the record checks accept as the same records."""
    fast = parse_uplink_records(payload)
    if fast is not None:
        assert fast == [parse_record(doc) for doc in parse_uplink(payload)]


def test_usual_payloads_take_the_fast_path_and_refusals_keep_their_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compact batches and single records are validated from the text; a record refused later (hotlist, TAC) is
    quarantined as its payload when alone in it, else as its own JSON, as when the records are decoded first."""
    good = good_records()
    forged = json.loads(good[1].to_json()) | {"tac": "00000000" if good[1].tac != "00000000" else "11111111"}
    payloads = [good[0].to_json(), batch_payload([_compact(forged), good[2].to_json(), good[3].to_json()])]
    items = [(Topic("terminal", TERMINAL), payload.encode()) for payload in payloads]
    assert all(parse_uplink_records(payload) for _, payload in items)
    hotlist = frozenset({good[2].card.id})  # the card of records 1 and 3
    fast = INTAKE.messages(items, hotlist)
    monkeypatch.setattr(clearing.intake, "parse_uplink_records", lambda payload, limits: None)
    assert fast == INTAKE.messages(items, hotlist)
    refused = [(v.seq, v.reason.split()[-1], v.raw) for m in fast for v in m if isinstance(v, Refused)]
    assert refused == [
        (1, "hotlisted", items[0][1]),
        (2, "verify", _compact(forged).encode()),
        (3, "hotlisted", good[2].to_json().encode()),
    ]


def _week_date(moment: dt.datetime) -> str:
    year, week, day = moment.isocalendar()
    return f"{year:04d}-W{week:02d}-{day}T{moment.timetz().isoformat()}"


@settings(max_examples=400, deadline=None)
@given(
    st.datetimes(dt.datetime(1970, 1, 2), dt.datetime(9998, 12, 30), timezones=st.sampled_from([CHINA, dt.UTC]))
    | st.datetimes(dt.datetime(1970, 1, 2), dt.datetime(9998, 12, 30), timezones=st.timezones()),
    st.sampled_from([dt.datetime.isoformat, partial(dt.datetime.isoformat, timespec="seconds"), _week_date]),
)
def test_the_settlement_day_read_from_the_time_is_the_calendars(moment: dt.datetime, form: Any) -> None:
    record = good_records()[0].model_copy(update={"time": form(moment)})
    assert settlement_day(record) == record.moment.astimezone(CHINA).date().isoformat()


# --- isolation at the database ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bulk_from", [1, 10**9], ids=["bulk", "statement"])
async def test_a_message_the_database_refuses_costs_itself_alone(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch, bulk_from: int
) -> None:
    ledger.bulk_from = bulk_from
    records = good_records()
    poison = records[2]
    real_row = clearing.ledger.ledger_row

    def row(city: str, accepted: Any, source: str, now: float) -> dict[str, Any]:
        out = real_row(city, accepted, source, now)
        if accepted.record.seq == poison.seq:
            # what each database's driver really refuses: a TAC too long for VARCHAR(8) (PostgreSQL), an
            # integer beyond 64 bits (SQLite stores any text)
            out.update(tac="X" * 5000, amount=2**70)
        return out

    monkeypatch.setattr(clearing.ledger, "ledger_row", row)
    messages = [received(r.to_json().encode()) for r in records]
    outcome = await ledger.store(messages)
    assert outcome.poisoned == 1
    assert outcome.stored == len(records) - 1
    stored = {row.seq for row in await rows(ledger, LEDGER)}
    assert stored == {r.seq for r in records} - {poison.seq}
    (quarantined,) = await rows(ledger, QUARANTINE)
    assert quarantined.reason.startswith("internal error while storing: ")
    assert quarantined.payload == poison.to_json().encode()
    assert quarantined.seq is None  # not acked as rejected: the terminal sends it again
    (ack,) = outcome.terminal_acks
    assert ack.acked_through == poison.seq - 1


@pytest.mark.parametrize("fresh", [True, False], ids=["bulk-attempt", "known-resend"])
async def test_duplicates_and_conflicts_in_a_bulk_batch_are_counted_exactly(ledger: Ledger, fresh: bool) -> None:
    """A batch that repeats a stored record and replays a stored card counter with other content: through the
    bulk path (COPY collides on PostgreSQL, SQLite inserts fewer rows than given) or, for a worker that acked
    the repeat itself, straight through the statement path: the same outcome either way."""
    ledger.bulk_from = 1
    good = good_records()
    (clone,) = [case for case in corpus() if case.name == "replayed-counter"]  # good[0]'s card and counter
    first = await ledger.store([received(batch_payload([good[0].to_json(), good[1].to_json()]).encode())])
    assert (first.stored, first.duplicates) == (2, 0)
    again = Ledger(ledger.engine, CITY, bulk_from=1) if fresh else ledger
    second = await again.store(
        [received(batch_payload([r.to_json() for r in (good[0], good[2], good[3])]).encode()), received(clone.payload)]
    )
    assert (second.stored, second.duplicates, second.conflicts, second.quarantined) == (2, 1, 1, 1)
    assert sorted(row.seq for row in await rows(ledger, LEDGER)) == [1, 2, 3, 4]
    (ack,) = second.terminal_acks
    assert ack.acked_through == 4


@pytest.mark.parametrize("bulk_from", [1, 10**9], ids=["bulk", "statement"])
async def test_database_trouble_leaves_the_batch_unacked(tmp_path: Path, bulk_from: int) -> None:
    """A locked SQLite database is the database's fault, not the data's: nothing is quarantined, the error
    reaches the service (which leaves the batch unacked)."""
    url = f"sqlite:///{tmp_path / 'locked.sqlite'}"
    engine = open_engine(url)
    await migrate(engine)
    await engine.dispose()
    locked = open_engine(url)
    impatient = Ledger(open_engine(url + "?timeout=0.2"), CITY, bulk_from=bulk_from)
    try:
        async with locked.connect() as holder:
            await holder.execute(text("BEGIN EXCLUSIVE"))
            with pytest.raises((OperationalError, sqlite3.OperationalError)) as raised:  # the bulk path's: raw
                await impatient.store([received(good_records()[0].to_json().encode())])
            assert database_trouble(raised.value)
            await holder.execute(text("ROLLBACK"))
        assert await rows(impatient, QUARANTINE) == []
        assert await rows(impatient, LEDGER) == []
    finally:
        await locked.dispose()
        await impatient.engine.dispose()


# --- the quarantine is bounded ----------------------------------------------------------------------------------


async def test_the_quarantine_keeps_64_kib_with_length_and_sha256(ledger: Ledger) -> None:
    huge = b'{"schema":"yikatong.batch/1","records":["' + b"x" * (MAX_PAYLOAD + 10) + b'"]}'
    await ledger.store([received(huge)])
    (row,) = await rows(ledger, QUARANTINE)
    assert row.payload == huge[:QUARANTINE_KEEP]
    assert row.size == len(huge)
    assert row.sha256 == hashlib.sha256(huge).hexdigest()
    assert "exceeds 262144" in row.reason


async def test_past_the_daily_cap_junk_is_only_counted(ledger: Ledger) -> None:
    ledger.quarantine_cap = 5
    junk = [received(b"junk %d" % i) for i in range(8)]
    first = await ledger.store(junk[:4])
    second = await ledger.store([*junk[4:], received(b"more", "4560C0C0C0FF")])
    assert (first.quarantined, first.dropped) == (4, 0)
    assert (second.quarantined, second.dropped) == (2, 3)  # one more of TERMINAL, then counted; the other kept
    assert len(await rows(ledger, QUARANTINE)) == 6
    tally = {(r.sender, r.kept, r.dropped) for r in await rows(ledger, TALLY)}
    assert tally == {(TERMINAL, 5, 3), ("4560C0C0C0FF", 1, 0)}
    # a genuine record of the flooding terminal is still stored
    stored = await ledger.store([received(good_records()[0].to_json().encode())])
    assert stored.stored == 1


# --- ack defects ------------------------------------------------------------------------------------------------


async def test_a_topic_segment_no_terminal_owns_poisons_nothing(ledger: Ledger) -> None:
    """On PostgreSQL the progress row's terminal is VARCHAR(12): a longer segment with a seq used to fail the
    whole batch on every redelivery."""
    record = good_records()[0]
    long_segment = "4560C0C0C001-and-then-some"
    outcome = await ledger.store(
        [received(record.to_json().encode(), long_segment), received(record.to_json().encode())]
    )
    assert outcome.stored == 1
    assert [a.terminal for a in outcome.terminal_acks] == [TERMINAL]
    (quarantined,) = await rows(ledger, QUARANTINE)
    assert quarantined.terminal == long_segment
    assert "published on the topic of terminal" in quarantined.reason


async def test_a_forged_copy_of_a_stored_seq_is_never_acked_as_rejected(ledger: Ledger) -> None:
    first, second = good_records()[:2]
    await ledger.store([received(first.to_json().encode())])
    forged = json.dumps({**json.loads(first.to_json()), "tac": "00000000" if first.tac != "00000000" else "11111111"})
    outcome = await ledger.store([received(forged.encode()), received(second.to_json().encode())])
    (ack,) = outcome.terminal_acks
    assert ack.acked_through == second.seq
    assert ack.rejected == []  # seq 1 is in the ledger: the forgery is quarantined, but not reported as a refusal
    assert len(await rows(ledger, QUARANTINE)) == 1


async def test_many_poisoned_messages_in_one_batch_each_cost_only_themselves(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = good_records()
    real = clearing.ledger.settlement_day

    def day(record: Any) -> str:
        if record.seq % 2 == 0:
            raise RuntimeError("unexpected")
        return real(record)

    monkeypatch.setattr(clearing.ledger, "settlement_day", day)
    outcome = await ledger.store([received(r.to_json().encode()) for r in records])
    assert outcome.poisoned == 2
    assert {row.seq for row in await rows(ledger, LEDGER)} == {r.seq for r in records if r.seq % 2}


# --- supervision ------------------------------------------------------------------------------------------------


def test_a_dead_task_ends_clearing_serve_with_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a long-running task (here the health task's database count) must end the process with a
    non-zero exit and say why, never leave it half-alive (the old serve slept on with --report-every 0)."""
    require_mosquitto()

    async def broken(self: Ledger) -> int:
        raise RuntimeError("a bug in a task")

    monkeypatch.setattr(Ledger, "count_pending_forwards", broken)
    argv = ["clearing", "serve", "--city", CITY, "--broker", str(MOSQUITTO), "--worker", "dies"]
    argv += ["--db", f"sqlite:///{tmp_path / 'c.sqlite'}", "--report-every", "0"]
    previous = signal.signal(signal.SIGALRM, _interrupt)
    signal.alarm(30)  # a serve that lingers is interrupted (SIGALRM → Ctrl-C → exit 0) and the test fails
    try:
        code = cli.main(argv)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert code == 1
    assert (
        "clearing 4560 stopped: RuntimeError: a bug in a task; exiting 1 so that a supervisor restarts it"
        in caplog.text
    )


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt
