"""The clearing on real brokers and databases: embedded amqtt + SQLite, Mosquitto + PostgreSQL. Real terminals
publish through their outboxes; the acquirer forwards other cities' cards to the issuer's clearing; the ledger
holds every record once and the settlement sums to zero. Then the faults: SIGKILL mid-stream, the same record
three times, two workers on a shared subscription with one killed, and the bad-input corpus from an outsider."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from clearing_corpus import CITY, TERMINAL, corpus, good_records
from clearing_support import clearing, fresh_db, loaded_terminal, serve_process, signed_records, table_counts
from mqtt_support import MOSQUITTO, eventually, private_mosquitto, require_mosquitto, running, unique_terminal
from support import new_card
from terminal_support import m1_card, make_terminal

from clearing import intake as intake_module
from clearing.db import open_engine
from clearing.intake import Intake
from clearing.ledger import Ledger
from clearing.service import OFFLOAD_BYTES
from clearing.settlement import settle_day
from terminals.messages import (
    ack_topic,
    batch_payload,
    interop_ack_topic,
    interop_txn_topic,
    parse_ack,
    parse_interop_ack,
    parse_record,
    txn_topic,
)
from terminals.mqtt import BrokerUrl, embedded_broker
from terminals.reader import InProcessReader
from terminals.uplink import Uplink


@contextlib.asynccontextmanager
async def broker_of(kind: str) -> AsyncIterator[BrokerUrl]:
    if kind == "mosquitto":
        require_mosquitto()
        yield MOSQUITTO
    else:
        async with embedded_broker() as url:
            yield url


@pytest.mark.parametrize(
    ("broker_kind", "db_kind"),
    [
        pytest.param("amqtt", "sqlite", id="amqtt-sqlite"),
        pytest.param("mosquitto", "postgres", id="mosquitto-postgres", marks=pytest.mark.postgres),
    ],
)
async def test_records_in_rows_out_each_once_and_settlement_sums_to_zero(
    broker_kind: str, db_kind: str, tmp_path: Path
) -> None:
    async with (
        broker_of(broker_kind) as broker,
        fresh_db(db_kind, tmp_path) as acq_db,
        fresh_db(db_kind, tmp_path) as iss_db,
    ):
        term = make_terminal(tmp_path / "bus.sqlite", city="4560", terminal=unique_terminal("4560"))
        cpu_cards = [new_card(city="4560", seed=1, balance=90_000), new_card(city="4510", seed=2, balance=90_000)]
        chip = m1_card(city="4560", balance=90_000)
        for _ in range(12):
            for card in cpu_cards:
                assert term.tap(InProcessReader(card)).ok
            assert term.tap_m1(chip).ok
        taps = dict(term.outbox.unacked(0, 1000))
        records = [parse_record(json.loads(doc)) for doc in taps.values()]
        foreign = [r for r in records if r.card.issuer == "4510"]
        assert len(records) == 36 and len(foreign) == 12

        async with (
            clearing(broker, acq_db, "4560", forward_interval=1.0) as acquirer,
            clearing(broker, iss_db, "4510") as issuer,
        ):
            uplink = Uplink(broker, term, ack_timeout=2.0)
            assert await uplink.run_until(uplink.all_acked, 60), "the clearing did not ack every record"
            await eventually(lambda: acquirer.stats.interop_answers >= 1 and issuer.stats.stored == 12)
            for _ in range(100):
                if (await table_counts(acq_db, "4560")).get("forward_acked") == 12:
                    break
                await asyncio.sleep(0.1)

        acq = await table_counts(acq_db, "4560")
        assert (acq["ledger"], acq["distinct"], acq["quarantine"]) == (36, 36, 0)
        assert acq.get("forward_acked") == 12 and "forward_pending" not in acq
        iss = await table_counts(iss_db, "4510")
        assert (iss["ledger"], iss["quarantine"]) == (12, 0)
        assert term.outbox.counts().rejected == 0

        engine = open_engine(acq_db)
        settlement = await settle_day(engine, "2026-11-24", {})
        await engine.dispose()
        (line,) = settlement.lines
        assert (line.acquirer, line.issuer, line.records, line.gross) == (
            "4560",
            "4510",
            12,
            sum(r.amount for r in foreign),
        )
        assert sum(settlement.positions.values()) == 0 and settlement.positions["4560"] == line.owed > 0


async def _collect_acks(client: aiomqtt.Client, into: list[tuple[int, list[int]]]) -> None:
    async for message in client.messages:
        ack = parse_ack(message.payload)  # type: ignore[arg-type]
        into.append((ack.acked_through, [r.seq for r in ack.rejected]))


def _mosquitto_pub(topic: str, payload: bytes, folder: Path) -> None:
    path = folder / "payload.bin"
    path.write_bytes(payload)
    subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", "1883", "-q", "1", "-t", topic, "-f", str(path)],
        check=True,
        timeout=20,
    )


async def test_outsider_corpus_then_one_record_three_times_over_mosquitto(tmp_path: Path) -> None:
    """An outside client (mosquitto_pub) sends every bad payload of the corpus and then the same good record
    three times: each bad one is quarantined, the good one is stored once and acked each time."""
    require_mosquitto()
    cases = corpus()
    topic = f"yikatong/{CITY}/txn/{TERMINAL}"
    acks: list[tuple[int, list[int]]] = []
    async with fresh_db("sqlite", tmp_path) as db, clearing(MOSQUITTO, db, CITY) as service:
        async with MOSQUITTO.client(f"ack-watch-{os.getpid()}", clean_session=True) as watcher:
            await watcher.subscribe(ack_topic(CITY, TERMINAL), qos=1)
            async with running(_collect_acks(watcher, acks)):
                original = good_records()[0].to_json().encode()
                _mosquitto_pub(topic, original, tmp_path)
                await eventually(lambda: acks == [(1, [])])
                for case in cases:
                    _mosquitto_pub(f"yikatong/{CITY}/txn/{case.topic_terminal}", case.payload, tmp_path)
                await eventually(lambda: service.stats.quarantined == len(cases))
                await eventually(lambda: acks[-1] == (2, [2]))  # seq 2 (the last bad record) acked as rejected
                for n in range(3):
                    before = len(acks)
                    _mosquitto_pub(topic, original, tmp_path)
                    await eventually(lambda before=before: len(acks) > before)  # type: ignore[misc]
                    assert acks[-1] == (2, [2]), f"copy {n + 1}"
        assert service.stats.connected and service.stats.failed_batches == 0
        assert service.stats.duplicates == 3
    counts = await table_counts(db, CITY)
    assert (counts["ledger"], counts["quarantine"], counts["flagged"]) == (1, len(cases), 1)


# --- faults: separate `yikatong clearing serve` processes, killed with SIGKILL ---------------------------------


async def _ledger_size(db: str, city: str) -> int:
    return (await table_counts(db, city))["ledger"]


async def _wait_ledger(db: str, city: str, at_least: int, timeout: float = 60) -> int:
    async with asyncio.timeout(timeout):
        while (size := await _ledger_size(db, city)) < at_least:
            await asyncio.sleep(0.05)
    return size


async def test_clearing_killed_mid_stream_loses_nothing_and_doubles_nothing(tmp_path: Path) -> None:
    require_mosquitto()
    total = 3000
    term = loaded_terminal(tmp_path / "t.sqlite", "4560", total, ("4560",))
    uplink = Uplink(MOSQUITTO, term, batch=10, ack_timeout=2.0)
    worker = f"kill-{os.getpid()}"
    async with fresh_db("sqlite", tmp_path) as db:
        with serve_process(MOSQUITTO, db, "4560", worker, "--shared", "--batch", "5") as first:
            async with running(uplink.run()):
                at_kill = await _wait_ledger(db, "4560", 300)
                first.kill()
                assert at_kill < total, "the clearing had finished before the kill: nothing was tested"
                with serve_process(MOSQUITTO, db, "4560", worker, "--shared"):
                    await eventually(uplink.all_acked, timeout=90)
        counts = await table_counts(db, "4560")
    assert (counts["ledger"], counts["distinct"], counts["quarantine"]) == (total, total, 0)
    assert term.outbox.counts().rejected == 0


@pytest.mark.postgres
async def test_two_shared_workers_one_killed_the_other_finishes(tmp_path: Path) -> None:
    """Mosquitto spreads the city's terminal topics over two workers (MQTT 5 shared subscription) writing to
    one PostgreSQL database; worker a is SIGKILLed mid-stream and worker b clears everything exactly once."""
    require_mosquitto()
    total = 2400
    terminals = [loaded_terminal(tmp_path / f"t{i}.sqlite", "4560", total // 4, ("4560",), seed=i) for i in range(4)]
    uplinks = [Uplink(MOSQUITTO, t, batch=10, ack_timeout=2.0) for t in terminals]
    tag = os.getpid()
    async with fresh_db("postgres", tmp_path) as db:
        with (
            serve_process(MOSQUITTO, db, "4560", f"a-{tag}", "--shared", "--batch", "5") as a,
            serve_process(MOSQUITTO, db, "4560", f"b-{tag}", "--shared", "--batch", "5") as b,
        ):
            async with contextlib.AsyncExitStack() as stack:
                for uplink in uplinks:
                    await stack.enter_async_context(running(uplink.run()))
                at_kill = await _wait_ledger(db, "4560", 400)
                a.kill()
                assert at_kill < total, "the workers had finished before the kill: nothing was tested"
                await eventually(lambda: all(u.all_acked() for u in uplinks), timeout=90)
            stored_by_b = b.stop()
        counts = await table_counts(db, "4560")
    assert (counts["ledger"], counts["distinct"], counts["quarantine"]) == (total, total, 0)
    assert 0 < stored_by_b < total, "both workers must have stored part of the stream"


async def test_forwarded_records_that_fail_are_answered_by_id_or_quarantined(tmp_path: Path) -> None:
    """The issuer answers a forged forwarded record by its record id (also when it comes alone in a batch); a
    forwarded record that names no valid record id is quarantined unanswered, and the issuer goes on clearing."""
    record = signed_records(2, "4560", "4560C0C0C001", issuers=("4510",))[0]
    forged = record.model_copy(update={"tac": "00000000" if record.tac != "00000000" else "11111111"})
    bad = {
        "schema": "yikatong.txn/1",
        "seq": 1,
        "kind": "bogus",
        "card": {"issuer": "4510", "serial": "x"},
        "card_counter": 1,
        "acquirer": "4560",
    }
    answers: list[str] = []
    async with embedded_broker() as broker, fresh_db("sqlite", tmp_path) as db, clearing(broker, db, "4510") as issuer:
        async with broker.client("acquirer-4560", clean_session=True) as acquirer:
            await acquirer.subscribe(interop_ack_topic("4560"), qos=1)
            async with running(_collect_payloads(acquirer, answers)):
                await acquirer.publish(interop_txn_topic("4510"), batch_payload([forged.to_json()]), qos=1)
                await eventually(lambda: len(answers) == 1)
                answer = parse_interop_ack(answers[0])
                assert [(r.record_id, r.reason) for r in answer.rejected] == [(record.record_id, "TAC does not verify")]
                await acquirer.publish(interop_txn_topic("4510"), batch_payload([json.dumps(bad)] * 2), qos=1)
                await eventually(lambda: issuer.stats.quarantined == 3)
                good = signed_records(1, "4510", "4510C0C0C001", issuers=("4510",))[0]
                await acquirer.publish(txn_topic("4510", "4510C0C0C001"), good.to_json(), qos=1)
                await eventually(lambda: issuer.stats.acks == 1)
        assert issuer.stats.connections == 1 and issuer.stats.stored == 1 and len(answers) == 1


async def _collect_payloads(client: aiomqtt.Client, into: list[str]) -> None:
    async for message in client.messages:
        into.append(message.payload.decode())  # type: ignore[union-attr]


async def test_a_big_batch_is_checked_in_a_worker_thread_its_tacs_verified_on_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clearings of one process (the demo's three) share an issuer host whose cipher contexts are not
    thread-safe: a batch big enough is checked off the event loop, but every TAC is verified on it."""
    checked: set[str] = set()
    verified: set[str] = set()
    check, tac_problems = Intake.check, intake_module.tac_problems

    def check_here(intake: Intake, *args: Any) -> Any:
        checked.add(threading.current_thread().name)
        return check(intake, *args)

    def verify_here(*args: Any) -> list[str | None]:
        verified.add(threading.current_thread().name)
        return tac_problems(*args)

    monkeypatch.setattr(Intake, "check", check_here)
    monkeypatch.setattr(intake_module, "tac_problems", verify_here)
    records = [r.to_json() for r in signed_records(101, CITY, TERMINAL, issuers=(CITY,))]
    big = batch_payload(records[:100])
    assert len(big) >= OFFLOAD_BYTES
    async with (
        embedded_broker() as broker,
        fresh_db("sqlite", tmp_path) as db,
        clearing(broker, db, CITY) as service,
        broker.client(f"pub-{os.getpid()}", clean_session=True) as publisher,
    ):
        await publisher.publish(txn_topic(CITY, TERMINAL), big, qos=1)
        await eventually(lambda: service.stats.stored == 100)
        await publisher.publish(txn_topic(CITY, TERMINAL), records[100], qos=1)
        await eventually(lambda: service.stats.stored == 101)
    loop_thread = threading.main_thread().name
    assert verified == {loop_thread}
    assert loop_thread in checked and len(checked) == 2  # the small message on the loop, the big one not


async def test_a_broker_lost_mid_commit_lets_the_commit_finish_and_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker goes away while a batch's transaction is open (the commit is slowed inside it): the commit is
    not cancelled with the connection's tasks, it finishes, and what the service counted is what the ledger holds."""
    require_mosquitto()
    inside, release = asyncio.Event(), asyncio.Event()
    acks = Ledger._terminal_acks

    async def slow_acks(ledger: Ledger, *args: Any) -> Any:
        inside.set()
        await release.wait()
        return await acks(ledger, *args)

    monkeypatch.setattr(Ledger, "_terminal_acks", slow_acks)
    records = [r.to_json() for r in signed_records(20, CITY, TERMINAL, issuers=(CITY,))]

    def taking() -> bool:
        names = (getattr(task.get_coro(), "__qualname__", "") for task in asyncio.all_tasks())
        return "ClearingService._take" in names

    with private_mosquitto(tmp_path) as broker:
        async with fresh_db("sqlite", tmp_path) as db, clearing(broker.url, db, CITY) as service:
            async with broker.url.client(f"pub-{os.getpid()}", clean_session=True) as publisher:
                await publisher.publish(txn_topic(CITY, TERMINAL), batch_payload(records), qos=1)
                await asyncio.wait_for(inside.wait(), 20)
            broker.stop()
            await eventually(lambda: not taking())  # the connection's tasks are being torn down
            await asyncio.sleep(0.2)
            release.set()
            await eventually(lambda: not service.stats.connected)
            counts = await table_counts(db, CITY)
    assert counts["ledger"] == service.stats.stored == len(records)
