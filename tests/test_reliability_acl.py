"""Reliability with broker security: a private Mosquitto with password auth and an ACL that lets each terminal
publish only on its own topic (username = terminal number) and read only its own acks and every issuer's hotlist;
the clearing logs in as ``clearing``. Real terminals tap real cards, publish through their outboxes to an
in-process clearing, and the ledger ends up holding exactly the records the terminals completed: none lost,
none doubled. A terminal's credentials used on another terminal's topic are refused by the broker (the record
never reaches the clearing), and a client without the right password does not get in at all. The main scenario
runs over TLS too, each device with its own certificate (``yikatong pki``; tests/test_tls_broker.py has the
certificate refusals)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
from clearing_support import clearing, fresh_db
from mqtt_support import PrivateMosquitto, eventually, private_mosquitto, running, unique_terminal
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from reliability_support import completed, cpu_card, ledger_view
from support import yikatong
from terminal_support import make_terminal

from cardsim.crypto import Algorithm
from clearing.pki import Identity, Pki
from terminals.messages import ack_topic, txn_topic
from terminals.mqtt import BrokerUrl, TlsFiles
from terminals.reader import InProcessReader
from terminals.uplink import Uplink

pytestmark = pytest.mark.reliability

CITY = "4510"
CLEARING_USER = "clearing"
NOT_AUTHORIZED = 135  # MQTT 5 reason code of a PUBACK for a publish the ACL denies
# Mosquitto 2 ACL file: topic lines after "user" are that user's; "pattern" lines apply to every user, with %u
# the username (Mosquitto warns that the hotlist pattern has no %u/%c: it is meant for everyone)
ACL = f"""user {CLEARING_USER}
topic readwrite yikatong/#

pattern write yikatong/+/txn/%u
pattern read yikatong/+/ack/%u
pattern read yikatong/+/hotlist/#
"""


@dataclass
class AclBroker:
    """The private Mosquitto, its terminal users and how each logs in: a password, or over TLS (``tls_dirs``) the
    certificate ``yikatong pki issue`` made for it, its CN the username and the PKI's ACL in force."""

    url: BrokerUrl  # without credentials
    terminals: list[str]
    passwords: dict[str, str]
    tls_dirs: dict[str, Path] | None = None
    mosquitto: PrivateMosquitto | None = None  # (password mode) to change its ACL file and reload it

    def login(self, user: str, password: str | None = None) -> BrokerUrl:
        """The broker URL with ``user``'s credentials (or another ``password``)."""
        if self.tls_dirs is not None:
            return self.url.with_tls(TlsFiles.folder(self.tls_dirs[user]))
        return BrokerUrl(self.url.host, self.url.port, user, self.passwords[user] if password is None else password)


def write_password_file(path: Path, passwords: dict[str, str]) -> None:
    """A Mosquitto password file (hashed by ``mosquitto_passwd``) holding these users."""
    binary = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
    for n, (user, password) in enumerate(passwords.items()):
        create = ["-c"] if n == 0 else []
        subprocess.run([binary, "-b", *create, str(path), user, password], check=True, capture_output=True, timeout=20)


@contextlib.contextmanager
def password_acl_broker(folder: Path) -> Iterator[AclBroker]:
    """A private Mosquitto with ``allow_anonymous false``, a password per terminal (three) and the ACL."""
    terminals = [unique_terminal(CITY) for _ in range(3)]
    passwords = {user: secrets.token_hex(8) for user in [CLEARING_USER, *terminals]}
    folder.mkdir()
    write_password_file(folder / "passwords", passwords)
    (folder / "acl").write_text(ACL)
    with private_mosquitto(folder, password_file=folder / "passwords", acl_file=folder / "acl") as broker:
        yield AclBroker(broker.url, terminals, passwords, mosquitto=broker)


@contextlib.contextmanager
def tls_acl_broker(folder: Path) -> Iterator[AclBroker]:
    """The same over TLS: a certificate per terminal (three) and for the clearing, from ``yikatong pki``, whose
    ACL gives each terminal its own topics (docs/terminal-identity.md)."""
    terminals = [unique_terminal(CITY) for _ in range(3)]
    pki = Pki.create(folder / "pki", [CITY])
    pki.issue(Identity.server("127.0.0.1"))
    dirs = {number: pki.issue(Identity.terminal(number))[1] for number in terminals}
    dirs[CLEARING_USER] = pki.issue(Identity.clearing(CITY))[1]
    with private_mosquitto(folder, tls=pki.folder) as broker:
        yield AclBroker(broker.url, terminals, {}, dirs)


@pytest.fixture(params=["password", "tls"])
def acl_broker(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[AclBroker]:
    """The ACL broker with passwords, and over TLS with client certificates."""
    with (password_acl_broker if request.param == "password" else tls_acl_broker)(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[AclBroker]:
    with password_acl_broker(tmp_path / "broker") as broker:
        yield broker


async def listen(broker: BrokerUrl, topics: list[str], into: list[str], ready: asyncio.Event) -> None:
    """Subscribe to ``topics`` and append the topic of every message delivered."""
    async with broker.client(f"listener-{secrets.token_hex(3)}", clean_session=True) as client:
        for topic in topics:
            await client.subscribe(topic, qos=1)
        ready.set()
        async for message in client.messages:
            into.append(message.topic.value)


def puback_reason_v5(broker: BrokerUrl, topic: str, payload: str) -> int:
    """Publish once at QoS 1 over MQTT 5 and return the reason code of the broker's PUBACK. With paho itself:
    aiomqtt's ``publish`` discards the PUBACK reason code (no exception for a denied publish)."""
    connacks: queue.Queue[int] = queue.Queue()
    pubacks: queue.Queue[int] = queue.Queue()

    def on_connect(
        _client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _properties: Properties | None
    ) -> None:
        connacks.put(reason.value)

    def on_publish(
        _client: paho.Client, _userdata: Any, _mid: int, reason: ReasonCode, _properties: Properties | None
    ) -> None:
        pubacks.put(reason.value)

    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"probe-v5-{secrets.token_hex(3)}", protocol=paho.MQTTv5
    )
    if broker.tls is not None:
        client.tls_set_context(broker.tls.context())
    else:
        client.username_pw_set(broker.username, broker.password)
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert connacks.get(timeout=10) == 0, f"{broker.username} could not connect over MQTT 5"
        client.publish(topic, payload, qos=1)
        return pubacks.get(timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()


@contextlib.asynccontextmanager
async def uplinks_running(uplinks: list[Uplink]) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for uplink in uplinks:
            await stack.enter_async_context(running(uplink.run()))
        yield


async def test_acl_each_terminal_only_on_its_own_topic_ledger_holds_each_completed_record_once(
    acl_broker: AclBroker, tmp_path: Path
) -> None:
    """Three terminals tap 10 times each through the password + ACL broker; then terminal A's credentials put a
    validly signed record of A on terminal B's topic (MQTT 5: PUBACK 135; MQTT 3.1.1: dropped without a word):
    it never reaches the clearing. The same record then comes from A's own uplink on A's topic and is stored."""
    numbers = acl_broker.terminals
    a, b = numbers[0], numbers[1]
    terminals = [make_terminal(tmp_path / f"t{n}.sqlite", city=CITY, terminal=t) for n, t in enumerate(numbers)]
    cards = [[cpu_card(10 * n + 1), cpu_card(10 * n + 2, Algorithm.DES3)] for n in range(len(terminals))]
    uplinks = [Uplink(acl_broker.login(t.terminal_hex), t, batch=4, ack_timeout=2.0) for t in terminals]
    seen_by_a: list[str] = []  # what a client with A's credentials may read of everyone's records and acks
    spy_ready = asyncio.Event()
    spy = listen(acl_broker.login(a), ["yikatong/+/txn/+", "yikatong/+/ack/+"], seen_by_a, spy_ready)

    async with fresh_db("sqlite", tmp_path) as db:
        async with clearing(acl_broker.login(CLEARING_USER), db, CITY) as service, running(spy):
            await eventually(spy_ready.is_set)
            async with uplinks_running(uplinks):
                for tap in range(10):  # taps while the uplinks publish
                    for terminal, uplink, its_cards in zip(terminals, uplinks, cards, strict=True):
                        result = terminal.tap(InProcessReader(its_cards[tap % 2]))
                        assert result.ok, f"{terminal.terminal_hex} tap {tap + 1}: {result}"
                        uplink.notify()
                    await asyncio.sleep(0.01)
                await eventually(lambda: all(u.all_acked() for u in uplinks), timeout=30)
            assert all(u.stats.connections >= 1 for u in uplinks)

            # A's uplink is down; A completes one more record, and its credentials publish it on B's topic
            assert terminals[0].tap(InProcessReader(cards[0][0])).ok
            ((seq, record),) = terminals[0].outbox.unacked(0, 10)
            messages_before, stored_before = service.stats.messages, service.stats.stored
            acks_read_before = seen_by_a.count(ack_topic(CITY, a))
            reason = await asyncio.to_thread(puback_reason_v5, acl_broker.login(a), txn_topic(CITY, b), record)
            assert reason == NOT_AUTHORIZED, f"MQTT 5 publish of A's record on B's topic: PUBACK {reason}, not 135"
            async with acl_broker.login(a).client(f"foreign-{secrets.token_hex(3)}", clean_session=True) as client:
                await client.publish(txn_topic(CITY, b), record, qos=1)  # MQTT 3.1.1: PUBACKed, silently dropped
            foreign_refused = 2
            await asyncio.sleep(2.0)
            arrived = service.stats.messages - messages_before
            assert arrived == 0, f"{foreign_refused} foreign publishes refused by the ACL, yet {arrived} reached it"

            # the pipe is alive: the very same record on A's own topic is stored and acked
            assert await uplinks[0].run_until(uplinks[0].all_acked, 20), f"A's seq {seq} was not acked"
            assert service.stats.stored == stored_before + 1
            assert service.stats.failed_batches == 0
            await eventually(lambda: seen_by_a.count(ack_topic(CITY, a)) > acks_read_before)  # A reads its acks
        view = await ledger_view(db, CITY)
    rows, quarantined = [(r.terminal, r.seq) for r in view.rows], len(view.quarantine)
    done = set().union(*(completed(t) for t in terminals))
    records = len(done)
    mode = "tls" if acl_broker.tls_dirs else "password"
    summary = (
        f"acl ({mode}): {len(terminals)} terminals, {records} records completed, {len(rows)} in ledger, "
        f"{view.doubled} doubled, {quarantined} quarantined, {foreign_refused} foreign publishes refused "
        f"(MQTT 5 PUBACK {reason}, MQTT 3.1.1 dropped), "
        f"A's credentials read {len(seen_by_a)} messages on {len(set(seen_by_a))} topic(s)"
    )
    print(summary)
    assert records == 31 and seq == 11, summary
    lost, extra = sorted(done - set(rows)), sorted(set(rows) - done)
    assert not lost and not extra, f"{summary}; lost: {lost}, extra: {extra}"
    assert view.doubled == 0 and len(rows) == records, summary
    assert quarantined == 0, f"{summary}: the foreign record reached the clearing's quarantine"
    assert all(t.outbox.counts().queued == 0 and t.outbox.counts().rejected == 0 for t in terminals), summary
    assert set(seen_by_a) == {ack_topic(CITY, a)}, f"{summary}; A's credentials read: {sorted(set(seen_by_a))}"


async def test_acl_wrong_or_no_credentials_cannot_connect_and_the_terminal_keeps_its_records(
    password_broker: AclBroker, tmp_path: Path
) -> None:
    """No password or a wrong one: the broker refuses the connection (aiomqtt, mosquitto_pub). A terminal with
    a wrong password keeps its records in the outbox; with the right one they reach the ledger, each once."""
    number = password_broker.terminals[0]
    topic = txn_topic(CITY, number)
    refused = 0
    for url in (password_broker.url, password_broker.login(number, "wrong-password")):
        with pytest.raises(aiomqtt.MqttError):
            async with url.client(f"intruder-{secrets.token_hex(3)}", clean_session=True):
                pass
        refused += 1
    for credentials in ([], ["-u", number, "-P", "wrong-password"]):
        command = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(password_broker.url.port), "-q", "1", "-t", topic]
        pub = subprocess.run([*command, "-m", "x", *credentials], capture_output=True, text=True, timeout=20)
        assert pub.returncode != 0, f"mosquitto_pub {' '.join(credentials) or '(anonymous)'} got in: {pub.stderr}"
        refused += 1

    terminal = make_terminal(tmp_path / "t.sqlite", city=CITY, terminal=number)
    card = cpu_card(1)
    for _ in range(3):
        assert terminal.tap(InProcessReader(card)).ok
    async with fresh_db("sqlite", tmp_path) as db:
        async with clearing(password_broker.login(CLEARING_USER), db, CITY) as service:
            locked_out = Uplink(
                password_broker.login(number, "wrong-password"), terminal, ack_timeout=2.0, max_backoff=0.2
            )
            assert not await locked_out.run_until(locked_out.all_acked, 1.5), "acked with a wrong password"
            assert locked_out.stats.connections == 0 and "authori" in (locked_out.stats.last_error or "").lower(), (
                f"wrong password: {locked_out.stats}"
            )
            queued = terminal.outbox.counts().queued
            assert queued == 3 and service.stats.messages == 0, f"{queued} queued, {service.stats.messages} arrived"
            uplink = Uplink(password_broker.login(number), terminal, ack_timeout=2.0)
            assert await uplink.run_until(uplink.all_acked, 20), "not acked with the right password"
        view = await ledger_view(db, CITY)
    rows, quarantined = [(r.terminal, r.seq) for r in view.rows], len(view.quarantine)
    summary = (
        f"acl credentials: {refused} connections refused, 3 records kept while locked out, "
        f"{len(rows)} in ledger, {view.doubled} doubled, {quarantined} quarantined"
    )
    print(summary)
    assert set(rows) == completed(terminal) == {(number, 1), (number, 2), (number, 3)}, summary
    assert len(rows) == 3 and view.doubled == 0 and quarantined == 0, summary


async def test_a_terminal_on_a_topic_it_may_not_use_sees_its_records_refused_and_the_others_lose_nothing(
    password_broker: AclBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A terminal set up with another terminal's login (A's) publishes on its own topic, which the ACL gives only
    to its own user: over MQTT 5 the broker answers PUBACK 135, and at the first publish its two records are kept
    in the outbox marked refused with the reason, one log line says so, they are not sent again (no resend, no
    second refusal) and ``terminal status`` shows them. Three honest terminals tap meanwhile and lose nothing.
    Once the ACL allows the topic (and the broker reloaded it), ``terminal sync --retry-refused`` delivers them."""
    caplog.set_level(logging.WARNING, logger="terminals")
    numbers, port = password_broker.terminals, password_broker.url.port
    misplaced = unique_terminal(CITY)
    terminals = [make_terminal(tmp_path / f"t{n}.sqlite", city=CITY, terminal=t) for n, t in enumerate(numbers)]
    wrong = make_terminal(tmp_path / "misplaced.sqlite", city=CITY, terminal=misplaced)
    for n in range(2):
        assert wrong.tap(InProcessReader(cpu_card(90 + n))).ok
    cards = [cpu_card(n + 1) for n in range(len(terminals))]
    uplinks = [Uplink(password_broker.login(t.terminal_hex), t, batch=4, ack_timeout=2.0) for t in terminals]
    refused_uplink = Uplink(password_broker.login(numbers[0]), wrong, batch=4, ack_timeout=2.0)

    async with fresh_db("sqlite", tmp_path) as db:
        async with clearing(password_broker.login(CLEARING_USER), db, CITY):
            async with uplinks_running([*uplinks, refused_uplink]):
                for _ in range(5):
                    for terminal, uplink, card in zip(terminals, uplinks, cards, strict=True):
                        assert terminal.tap(InProcessReader(card)).ok
                        uplink.notify()
                    await asyncio.sleep(0.01)
                await eventually(lambda: wrong.outbox.counts().refused == 2, timeout=30)
                refused_at = time.monotonic()
                await eventually(lambda: all(u.all_acked() for u in uplinks), timeout=30)
                # two ack timeouts more: an uplink that resent refused records would have done so by now
                await eventually(lambda: time.monotonic() - refused_at > 2 * refused_uplink.policy.ack_timeout)
                stats = refused_uplink.stats
            assert (stats.refused, stats.published, stats.resends) == (2, 0, 0), stats
            lines = [r.getMessage() for r in caplog.records if "refused by the broker" in r.getMessage()]
            assert lines == [
                "record(s) 1-2 refused by the broker (PUBACK 135 not authorized): kept in the outbox, not sent "
                "again until terminal sync --retry-refused"
            ], lines
            assert wrong.outbox.counts().queued == 0 and [r.seq for r in wrong.outbox.refused()] == [1, 2]
            status = yikatong("terminal", "status", "--state", str(tmp_path / "misplaced.sqlite"))
            assert "refused    2 record(s) the broker refused, kept unsent" in status.stdout, status.stdout
            for seq in (1, 2):
                line = rf"^  seq {seq} at \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\dZ: PUBACK 135 not authorized$"
                assert re.search(line, status.stdout, re.MULTILINE), status.stdout
            honest_done = set().union(*(completed(t) for t in terminals))
            assert len(honest_done) == 15
            assert {(r.terminal, r.seq) for r in (await ledger_view(db, CITY)).rows} == honest_done

            # the operator gives A's login that terminal's topics too; the retry delivers what was refused
            assert password_broker.mosquitto is not None
            acl = tmp_path / "broker" / "acl"
            topics = f"topic write {txn_topic(CITY, misplaced)}\ntopic read {ack_topic(CITY, misplaced)}\n"
            acl.write_text(acl.read_text() + f"\nuser {numbers[0]}\n{topics}")
            password_broker.mosquitto.reload()
            a = password_broker.login(numbers[0])
            await eventually(lambda: puback_reason_v5(a, txn_topic(CITY, misplaced), "not a record") == 0)
            broker = f"mqtt://{numbers[0]}:{password_broker.passwords[numbers[0]]}@127.0.0.1:{port}"
            sync = ["terminal", "sync", "--state", str(tmp_path / "misplaced.sqlite"), "--broker", broker]
            done = await asyncio.to_thread(yikatong, *sync, "--retry-refused", "--timeout", "30")
            assert done.returncode == 0, done.stdout + done.stderr
            assert "2 refused record(s) to send again" in done.stdout and "done: 2 acked" in done.stdout, done.stdout
        view = await ledger_view(db, CITY)
    assert {(r.terminal, r.seq) for r in view.rows} == honest_done | completed(wrong)
    assert view.doubled == 0
