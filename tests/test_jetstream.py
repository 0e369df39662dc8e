"""The clearing's intake from a JetStream stream (clearing/jetstream.py) on a real nats-server with JetStream and
its MQTT listener: records published by an outside MQTT client (mosquitto_pub) reach the city's stream and are
stored once and acked to the stream only after the commit; a batch the database refused comes again; what a
worker took and never acked goes to another worker; the subject mapping and the settings parser under fuzz."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from clearing_support import clearing, signed_records, table_counts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.exc import OperationalError
from support import yikatong

from clearing.jetstream import (
    Delivery,
    JetStreamSettings,
    JetStreamSource,
    city_subjects,
    consumer_name,
    stream_name,
    subject,
    topic,
)
from terminals.messages import batch_payload, txn_topic
from terminals.mqtt import BrokerUrl
from yikatong.nats_cluster import NatsCluster

pytestmark = pytest.mark.cluster

CITY = "4510"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    """One nats-server with JetStream and an MQTT listener, for the module."""
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"), size=1)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def drop_stream(node: NatsCluster) -> None:
    """The city's stream and consumer gone."""
    client = await nats.connect(node.nats_urls)
    try:
        await client.jetstream().delete_stream(stream_name(CITY))
    except nats.js.errors.NotFoundError:
        pass
    finally:
        await client.close()


@pytest.fixture
async def fresh_stream(node: NatsCluster) -> AsyncIterator[None]:
    """The city's stream and consumer gone before and after a test (each test starts from an empty stream)."""
    await drop_stream(node)
    yield
    await drop_stream(node)


def js_settings(node: NatsCluster, ack_wait: float = 30.0) -> JetStreamSettings:
    return JetStreamSettings(tuple(node.nats_urls), ack_wait=ack_wait, replicas=1)


def mosquitto_pub(node: NatsCluster, topic_name: str, payload: str) -> None:
    """Publish QoS 1 with Mosquitto's own client, MQTT 3.1.1 (all NATS speaks)."""
    port = str(BrokerUrl.parse(node.mqtt_urls[0]).port)
    subprocess.run(
        ["mosquitto_pub", "-V", "mqttv311", "-p", port, "-q", "1", "-t", topic_name, "-s"],
        input=payload.encode(),
        check=True,
        timeout=20,
    )


async def stream_state(node: NatsCluster) -> tuple[int, int]:
    """(messages in the city's stream, messages taken and not acked)."""
    client = await nats.connect(node.nats_urls)
    try:
        js = client.jetstream()
        stream = await js.stream_info(stream_name(CITY))
        consumer = await js.consumer_info(stream_name(CITY), consumer_name(CITY))
        return int(stream.state.messages), int(consumer.num_ack_pending)
    finally:
        await client.close()


async def until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"not in {timeout:.0f} s: {what}"
        await asyncio.sleep(0.1)


async def test_records_from_mosquitto_pub_are_stored_once_and_acked_to_the_stream(
    node: NatsCluster, fresh_stream: None, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'clearing.sqlite'}"
    terminal = "0A0B0C0D0E01"
    records = signed_records(12, CITY, terminal, issuers=(CITY,))
    source = JetStreamSource(CITY, js_settings(node), "a")
    async with clearing(BrokerUrl.parse(node.mqtt_urls[0]), db, CITY, source=source) as service:
        # the same batch twice (a terminal that sent again): stored once, both acked
        for _ in range(2):
            mosquitto_pub(node, txn_topic(CITY, terminal), batch_payload([r.to_json() for r in records]))

        async def settled() -> bool:
            return service.stats.stored == 12 and service.stats.duplicates == 12 and await stream_state(node) == (0, 0)

        await until(settled, "12 stored, 12 duplicates, the stream empty and nothing unacked")
    assert (await table_counts(db, CITY))["ledger"] == 12


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(junk=st.lists(st.binary(max_size=400), min_size=1, max_size=15))
async def test_junk_in_the_stream_costs_only_itself(node: NatsCluster, tmp_path: Path, junk: list[bytes]) -> None:
    """Generated junk on a terminal's subject, between good records of another terminal: each junk message is
    quarantined and acked to the stream, every good record stored once, the worker goes on."""
    await drop_stream(node)
    db = f"sqlite:///{tmp_path / f'clearing-{secrets.token_hex(3)}.sqlite'}"
    good = signed_records(6, CITY, "0A0B0C0D0E05", issuers=(CITY,), seed=5)
    client = await nats.connect(node.nats_urls)
    source = JetStreamSource(CITY, js_settings(node), "a")
    try:
        async with clearing(BrokerUrl.parse(node.mqtt_urls[0]), db, CITY, source=source) as service:
            for i, payload in enumerate(junk):
                await client.publish(subject(txn_topic(CITY, "0A0B0C0D0EFF")), payload)
                if i < len(good):
                    await client.publish(subject(txn_topic(CITY, "0A0B0C0D0E05")), good[i].to_json().encode())
            for record in good[len(junk) :]:
                await client.publish(subject(txn_topic(CITY, "0A0B0C0D0E05")), record.to_json().encode())
            await client.flush()

            async def settled() -> bool:
                counted = (service.stats.stored, service.stats.quarantined) == (len(good), len(junk))
                return counted and await stream_state(node) == (0, 0)

            await until(settled, f"{len(good)} stored, {len(junk)} quarantined, the stream empty")
            assert service.stats.duplicates == 0
    finally:
        await client.close()
    await drop_stream(node)


async def test_a_batch_the_database_refused_comes_again(
    node: NatsCluster, fresh_stream: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = f"sqlite:///{tmp_path / 'clearing.sqlite'}"
    terminal = "0A0B0C0D0E02"
    records = signed_records(5, CITY, terminal, issuers=(CITY,), seed=2)
    source = JetStreamSource(CITY, js_settings(node), "a")
    async with clearing(BrokerUrl.parse(node.mqtt_urls[0]), db, CITY, source=source) as service:
        store = service.ledger.store
        failures = [OperationalError("INSERT", {}, Exception("database is locked"))]

        async def failing_once(*args: Any, **kwargs: Any) -> Any:
            if failures:
                raise failures.pop()
            return await store(*args, **kwargs)

        monkeypatch.setattr(service.ledger, "store", failing_once)
        mosquitto_pub(node, txn_topic(CITY, terminal), batch_payload([r.to_json() for r in records]))

        async def stored() -> bool:
            return service.stats.stored == 5 and await stream_state(node) == (0, 0)

        # nakked, not left for ack_wait (30 s here): it comes again at once
        await until(stored, "the refused batch stored on its next delivery", timeout=15)
        assert service.stats.failed_batches == 1


async def test_what_a_dead_worker_took_goes_to_another_after_ack_wait(node: NatsCluster, fresh_stream: None) -> None:
    dead = JetStreamSource(CITY, js_settings(node, ack_wait=1.0), "dead")
    await dead.open()
    try:
        mosquitto_pub(node, txn_topic(CITY, "0A0B0C0D0E03"), "one")
        await pulled(dead)
    finally:
        await dead.close()  # never acked: as if the process died
    assert (await stream_state(node))[1] == 1
    live = JetStreamSource(CITY, js_settings(node, ack_wait=1.0), "live")
    await live.open()
    try:
        again = await pulled(live, tries=10)
        assert [(d.topic, d.payload) for d in again] == [(txn_topic(CITY, "0A0B0C0D0E03"), b"one")]
        await live.ack(again)
        await until(lambda: _equal(stream_state(node), (0, 0)), "acked by the live worker")
    finally:
        await live.close()


async def test_what_a_worker_releases_goes_to_another_at_once(node: NatsCluster, fresh_stream: None) -> None:
    """A worker that lost its MQTT connection (it cannot answer) naks what it holds: no ack_wait (30 s) to sit out."""
    cut_off = JetStreamSource(CITY, js_settings(node), "cut-off")
    await cut_off.open()
    try:
        mosquitto_pub(node, txn_topic(CITY, "0A0B0C0D0E04"), "two")
        await pulled(cut_off)
        await cut_off.release()
        await cut_off.release()  # nothing left to release: a no-op
    finally:
        await cut_off.close()
    live = JetStreamSource(CITY, js_settings(node), "live")
    await live.open()
    try:
        again = await pulled(live, tries=5)  # five pulls of at most a second each: well inside ack_wait
        assert [d.payload for d in again] == [b"two"]
        await live.ack(again)
    finally:
        await live.close()


async def pulled(source: JetStreamSource, tries: int | None = None) -> list[Delivery]:
    """What ``source`` pulls: until it gets something, or at most ``tries`` pulls of up to a second each."""
    got: list[Delivery] = []
    attempts = itertools.count() if tries is None else range(tries)
    for _ in attempts:
        got = await source.fetch(10)
        if got:
            break
    return got


async def _equal(state: Any, wanted: tuple[int, int]) -> bool:
    return bool(await state == wanted)


def test_the_city_subjects_cover_its_terminals_and_interop() -> None:
    assert city_subjects("4530") == ["yikatong.4530.txn.*", "yikatong.interop.4530.txn", "yikatong.interop.4530.ack"]


LEVEL = st.text(st.characters(codec="utf-8", exclude_characters="./+# \x00"), min_size=1, max_size=12)


@given(st.lists(LEVEL, min_size=1, max_size=6))
def test_topic_and_subject_map_back_and_forth(levels: list[str]) -> None:
    name = "/".join(levels)
    assert topic(subject(name)) == name


@given(st.text(max_size=80))
def test_the_settings_parser_takes_node_lists_or_says_what_is_wrong(text: str) -> None:
    try:
        parsed = JetStreamSettings.parse(text)
    except ValueError as err:
        assert "--jetstream" in str(err)
    else:
        assert parsed.servers and all(s.startswith(("nats://", "tls://")) for s in parsed.servers)


def test_serve_refuses_bad_jetstream_arguments(tmp_path: Path) -> None:
    serve = ["clearing", "serve", "--city", CITY, "--broker", "mqtt://127.0.0.1:1?mqtt=3.1.1"]
    serve += ["--db", f"sqlite:///{tmp_path / 'c.sqlite'}"]
    bad = yikatong(*serve, "--jetstream", "x")
    assert bad.returncode != 0 and "'x' is not a nats://host:port address" in bad.stderr, bad.stderr
    both = yikatong(*serve, "--shared", "--jetstream", "nats://127.0.0.1:1")
    assert both.returncode != 0 and "--shared and --jetstream" in both.stderr, both.stderr
    assert not (tmp_path / "c.sqlite").exists()  # refused before anything was opened
