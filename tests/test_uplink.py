"""The uplink on real brokers: the machine's Mosquitto, a private Mosquitto that is stopped and restarted, and
the embedded amqtt broker. Records leave the outbox only on the clearing's ack; every issuer's hotlist follows the
broker, and ``terminal tap --broker`` takes the retained lists before it taps."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
from hotlist_support import Message, delta, snapshot
from mqtt_support import (
    MOSQUITTO,
    ScriptedBroker,
    StubClearing,
    eventually,
    private_mosquitto,
    require_mosquitto,
    running,
    unique_terminal,
)
from support import KEYS, new_card, new_state
from terminal_support import make_terminal

from cardsim.image import save_card
from cardsim.issuer import IssuerHost
from terminals.hotlist import Listing
from terminals.messages import ACK_SCHEMA, HOTLIST_FILTERS, Ack, hotlist_delta_topic, parse_record, parse_uplink
from terminals.mqtt import BrokerUrl, embedded_broker, stop_if_cancelled
from terminals.outbox import MemoryOutbox
from terminals.reader import InProcessReader
from terminals.terminal import Terminal
from terminals.uplink import Uplink
from terminals.uplink_policy import ApplyAck, Publication
from yikatong import load_mqtt as mqtt
from yikatong.loadgen import SimTerminal, TimedQueue
from yikatong.synthetic import synthetic_cards


def outbox_records(terminal: Terminal) -> dict[int, str]:
    return dict(terminal.outbox.unacked(0, 10_000))


def tap_n(terminal: Terminal, n: int, seed: int = 1) -> None:
    card = new_card(balance=100_000, seed=seed)
    for _ in range(n):
        assert terminal.tap(InProcessReader(card)).ok


async def _delivery_only_on_clearing_ack(broker: BrokerUrl, tmp_path: Path) -> None:
    term = make_terminal(tmp_path / "t.sqlite", terminal=unique_terminal())
    tap_n(term, 5)
    originals = outbox_records(term)
    uplink = Uplink(broker, term, batch=2, ack_timeout=2.0)
    async with running(uplink.run()):
        await eventually(uplink.all_published)
        await asyncio.sleep(0.5)
        assert term.outbox.counts().queued == 5, "PUBACK alone must not empty the outbox"
        clearing = StubClearing(broker)
        async with running(clearing.run()):
            await eventually(uplink.all_acked)  # resent after the ack timeout, then acked
            tap_n(term, 2, seed=2)  # new records while connected go out at once
            uplink.notify()
            await eventually(uplink.all_acked)
    received = clearing.distinct()
    assert sorted(received) == list(range(1, 8))
    for seq, doc in originals.items():
        assert json.loads(received[seq]) == json.loads(doc)
    assert uplink.stats.acked == 7 and uplink.stats.resends >= 1


async def test_mosquitto_records_leave_the_outbox_only_on_the_clearings_ack(tmp_path: Path) -> None:
    require_mosquitto()
    await _delivery_only_on_clearing_ack(MOSQUITTO, tmp_path)


async def test_amqtt_records_leave_the_outbox_only_on_the_clearings_ack(tmp_path: Path) -> None:
    async with embedded_broker() as broker:
        await _delivery_only_on_clearing_ack(broker, tmp_path)


async def test_uplink_speaks_mqtt5_to_mosquitto_and_falls_back_to_3_1_1_on_amqtt(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mosquitto answers the MQTT 5 CONNECT; amqtt 0.12 does not answer it at all (its URL here does not say
    ?mqtt=3.1.1), so the uplink gives up on MQTT 5 after its short wait and delivers over 3.1.1."""
    require_mosquitto()
    caplog.set_level(logging.INFO, logger="terminals")
    term = make_terminal(tmp_path / "t.sqlite", terminal=unique_terminal())
    tap_n(term, 1)
    to_mosquitto = Uplink(MOSQUITTO, term)
    assert await to_mosquitto.run_until(to_mosquitto.all_published, 20)
    assert to_mosquitto.policy.mqtt5 and not to_mosquitto.policy.probing
    async with embedded_broker() as amqtt:
        assert str(amqtt).endswith("?mqtt=3.1.1")
        unsaid = BrokerUrl(amqtt.host, amqtt.port)
        uplink = Uplink(unsaid, term)
        async with running(StubClearing(amqtt).run()):
            assert await uplink.run_until(uplink.all_acked, 30)
    assert not uplink.policy.mqtt5 and uplink.stats.connections == 1
    assert "the broker does not speak MQTT 5: MQTT 3.1.1 from now on (no reason codes on PUBACK)" in caplog.messages
    assert f"uplink connected to {unsaid} (MQTT 3.1.1)" in caplog.messages


async def test_rejected_records_leave_the_outbox_into_the_rejected_table(tmp_path: Path) -> None:
    async with embedded_broker() as broker:
        term = make_terminal(tmp_path / "t.sqlite", terminal=unique_terminal())
        tap_n(term, 3)
        uplink = Uplink(broker, term)
        async with running(StubClearing(broker, reject={2}).run()):
            assert await uplink.run_until(uplink.all_acked, 20)
    assert [(seq, reason) for seq, reason, _ in term.outbox.rejected()] == [(2, "test rejection")]
    assert uplink.stats.acked == 2 and uplink.stats.rejected == 1


async def test_broker_down_for_a_while_records_queue_and_drain(tmp_path: Path) -> None:
    with private_mosquitto(tmp_path) as broker:
        term = make_terminal(tmp_path / "t.sqlite", terminal=unique_terminal())
        uplink = Uplink(broker.url, term, ack_timeout=2.0, max_backoff=0.5)
        clearing = StubClearing(broker.url)
        async with running(uplink.run()), running(clearing.run()):
            tap_n(term, 3)
            uplink.notify()
            await eventually(uplink.all_acked)
            broker.stop()
            await eventually(lambda: not uplink.stats.connected)
            tap_n(term, 4, seed=2)  # the terminal goes on working offline
            await asyncio.sleep(1.0)
            assert term.outbox.counts().queued == 4
            broker.start()
            await eventually(uplink.all_acked, timeout=30)
        received = clearing.distinct()
    assert sorted(received) == list(range(1, 8)), "none lost, none with a new identity"
    assert uplink.stats.connections >= 2


async def publish(broker: BrokerUrl, messages: list[Message], *, retain: bool = True) -> None:
    """Publish (topic, payload) messages in order, as an issuer's clearing does (QoS 1, retained)."""
    async with broker.client("test-publisher", clean_session=True) as pub:
        for topic, payload in messages:
            await pub.publish(topic, payload, qos=1, retain=retain)


CARD = "31044510000000000042"


async def test_every_issuers_hotlist_follows_the_broker_and_garbage_is_refused(tmp_path: Path) -> None:
    async with embedded_broker() as broker:
        term = make_terminal(tmp_path / "t.sqlite", city="4560", terminal=unique_terminal())
        await publish(
            broker, [*snapshot("4510", 2, [CARD], size=8), delta("4510", 2, []), delta("4530", 0, ["A1B2C3D4"])]
        )
        uplink = Uplink(broker, term)
        async with running(uplink.run()):
            await eventually(lambda: term.hotlists.versions() == {"4510": 3, "4530": 1})
            await publish(broker, [(hotlist_delta_topic("4510"), "garbage"), delta("4510", 2, [], ["A0A0A0A0"])])
            await eventually(lambda: term.hotlists.version("4510") == 4)
            assert uplink.hotlists_quiet(0.0) and term.hotlists.settled()
    assert term.hotlists.blocking(CARD) == Listing("4510", 4) and term.hotlists.blocking("A0A0A0A0") is not None
    restarted = make_terminal(tmp_path / "t.sqlite", city="4560", terminal=term.terminal_hex)
    assert restarted.hotlists.versions() == {"4510": 4, "4530": 1}


def _tap_args(image: Path, state: Path, broker: BrokerUrl, *more: str) -> list[str]:
    return _cli(
        "terminal",
        "tap",
        "--card",
        str(image),
        "--city",
        "4560",
        "--kind",
        "bus",
        "--fare",
        "100",
        "--state",
        str(state),
        "--broker",
        str(broker),  # with ?mqtt=3.1.1: the embedded amqtt speaks only that
        *more,
    )


async def test_tap_with_a_broker_takes_the_retained_lists_first(tmp_path: Path) -> None:
    state = new_state(city="4510")
    serial = state.public.application_serial.hex()
    image = tmp_path / "card.json"
    save_card(image, state)
    async with embedded_broker() as broker:
        await publish(broker, [*snapshot("4510", 5, [CARD, serial], size=8), delta("4510", 5)])
        tap = await asyncio.to_thread(
            subprocess.run, _tap_args(image, tmp_path / "t.sqlite", broker), capture_output=True, text=True
        )
    assert tap.returncode == 1, tap.stdout + tap.stderr
    assert tap.stdout == f"REFUSED  card {serial} is hotlisted by 4510 (list version 5): application blocked\n"
    assert tap.stderr == ""
    status = subprocess.run(
        _cli("terminal", "status", "--state", str(tmp_path / "t.sqlite")), capture_output=True, text=True, check=True
    )
    assert "hotlist    4510 version 5, 2 card(s), published 2026-11-24T08:05:00+08:00\n" in status.stdout


async def test_tap_with_a_broker_says_which_lists_it_could_not_take_and_taps_anyway(tmp_path: Path) -> None:
    image = tmp_path / "card.json"
    save_card(image, new_state(city="4510"))
    async with embedded_broker() as broker:
        *_, head = snapshot("4530", 2, [CARD], size=8)  # the head, its chunks never published
        await publish(broker, [head, delta("4510", 0, [CARD])])
        tap = await asyncio.to_thread(
            subprocess.run,
            _tap_args(image, tmp_path / "t.sqlite", broker, "--hotlist-wait", "1"),
            capture_output=True,
            text=True,
        )
    assert tap.returncode == 0 and tap.stdout.startswith("OK"), tap.stdout + tap.stderr
    assert tap.stderr == "hotlists not all taken within 1 s (incomplete: 4530): tapping with the lists held (4510 v1)\n"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "yikatong.cli", *args]


async def test_terminal_killed_with_records_unsent_sends_them_after_restart(tmp_path: Path) -> None:
    require_mosquitto()
    number = unique_terminal()
    state, image = tmp_path / "t.sqlite", tmp_path / "card.json"
    subprocess.run(
        _cli("card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "9000", "--out", str(image)), check=True
    )
    for _ in range(3):  # offline taps: records wait in the outbox
        tap = subprocess.run(
            _cli(
                "terminal",
                "tap",
                "--card",
                str(image),
                "--city",
                "4560",
                "--kind",
                "bus",
                "--fare",
                "100",
                "--terminal",
                number,
                "--state",
                str(state),
            ),
            capture_output=True,
            text=True,
        )
        assert tap.returncode == 0 and tap.stdout.startswith("OK"), tap.stdout + tap.stderr
    seen: list[bytes] = []

    async def watch() -> None:
        async with MOSQUITTO.client(f"watch-{number}", clean_session=True) as client:
            await client.subscribe(f"yikatong/4560/txn/{number}", qos=1)
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                seen.append(message.payload)

    async with running(watch()):
        await asyncio.sleep(0.3)
        sync = subprocess.Popen(
            _cli("terminal", "sync", "--state", str(state), "--broker", "mqtt://127.0.0.1:1883", "--timeout", "60"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        await eventually(lambda: len(seen) >= 1)  # published, but no clearing acks: it keeps waiting
        os.kill(sync.pid, signal.SIGKILL)
        sync.wait(10)
    first = [parse_record(doc) for payload in seen for doc in parse_uplink(payload)]
    assert [r.seq for r in first] == [1, 2, 3]
    clearing = StubClearing(MOSQUITTO)
    async with running(clearing.run()):
        await asyncio.sleep(0.3)
        again = await asyncio.to_thread(
            subprocess.run,
            _cli("terminal", "sync", "--state", str(state), "--broker", "mqtt://127.0.0.1:1883", "--timeout", "60"),
            capture_output=True,
            text=True,
        )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 acked" in again.stdout and "0 left" in again.stdout
    received = clearing.distinct()
    assert sorted(received) == [1, 2, 3]
    for record in first:  # the same records: same seq, same content, same identity
        assert parse_record(json.loads(received[record.seq])) == record


@pytest.mark.parametrize("garbage", [b"", b"nope", b'{"schema":"yikatong.ack/1","terminal":"X"}'])
async def test_malformed_acks_are_ignored(tmp_path: Path, garbage: bytes) -> None:
    async with embedded_broker() as broker:
        term = make_terminal(tmp_path / "t.sqlite", terminal=unique_terminal())
        tap_n(term, 2)
        uplink = Uplink(broker, term)
        async with running(uplink.run()):
            await eventually(uplink.all_published)
            async with broker.client("test-publisher", clean_session=True) as pub:
                await pub.publish(f"yikatong/4560/ack/{term.terminal_hex}", garbage, qos=1)
            await asyncio.sleep(0.3)
            assert term.outbox.counts().queued == 2


def test_an_ack_beyond_what_was_published_drops_only_what_was_published() -> None:
    """A forged ack (anyone may publish garbage with seqs on a terminal's topic) must not drop unsent records."""
    from terminals.messages import Ack
    from terminals.outbox import MemoryOutbox

    class Sender:
        city, terminal_hex = "4510", "451000000001"

        def __init__(self) -> None:
            self.outbox = MemoryOutbox()

        def offer_hotlist(self, topic: str, payload: bytes | str) -> bool:
            return False

    sender = Sender()
    for i in range(5):
        sender.outbox._records[i + 1] = "{}"  # five records waiting
    uplink = Uplink(MOSQUITTO, sender, in_thread=False)
    uplink.policy.published(Publication("{}", through=2, count=2), now=0.0)  # only seqs 1 and 2 went out
    forged = Ack(schema="yikatong.ack/1", terminal="451000000001", acked_through=5, rejected=[]).to_json()
    action = uplink.policy.received(uplink.policy.ack_topic, forged)
    assert isinstance(action, ApplyAck)
    asyncio.run(uplink._apply(action.ack))
    assert [seq for seq, _ in sender.outbox.unacked(0, 10)] == [3, 4, 5]
    assert uplink.stats.acked == 2


async def test_a_refused_subscription_is_asked_again_on_the_same_connection_until_granted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """NATS's MQTT layer refuses a subscription when it cannot make the JetStream consumer (a cluster node down):
    the terminal publishes all the same, asks again after the policy's delay (twice refused here: 135 not
    authorized), and once granted the clearing's acks free its records; all on one connection."""
    broker = ScriptedBroker(mqtt.MQTT5, b"\x20\x03\x00\x00\x00", lambda n, _topic: 0x87 if n < 2 else 1)
    server = await asyncio.start_server(broker.serve, "127.0.0.1", 0)
    url = BrokerUrl("127.0.0.1", server.sockets[0].getsockname()[1], speaks_mqtt5=True)
    terminal = SimTerminal(IssuerHost(KEYS), "4560", "4560ABCD0005", TimedQueue(MemoryOutbox()), 200)
    card = synthetic_cards(1, ["4560"])[0]
    for _ in range(3):
        terminal.tap(card, 0.0)
    uplink = Uplink(url, terminal, in_thread=False, resubscribe_after=0.1)
    caplog.set_level(logging.INFO, logger="terminals.uplink_policy")
    async with server, running(uplink.run()):
        await eventually(lambda: uplink.stats.published == 3, 10)  # refused, yet the records go out
        await eventually(lambda: len(broker.subscriptions) == 3, 10)
        await eventually(lambda: "granted the subscription" in caplog.text, 10)
        ack = Ack(schema=ACK_SCHEMA, terminal=terminal.terminal_hex, acked_through=3)
        broker.send(mqtt.publish(uplink.policy.ack_topic, ack.to_json().encode(), qos=0, version=mqtt.MQTT5))
        await eventually(lambda: terminal.outbox.queued() == 0, 10)
        await asyncio.sleep(0.3)  # time for a fourth SUBSCRIBE, were one to come
    topics = [uplink.policy.ack_topic, *HOTLIST_FILTERS]
    assert broker.subscriptions == [topics] * 3 and broker.connections == 1 and uplink.stats.acked == 3
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "terminals.uplink_policy"]
    assert [level for level, _ in said] == [logging.WARNING, logging.INFO], said  # the second refusal: debug
    assert "135 not authorized" in said[0][1] and "asking again in 0.1 s" in said[0][1]
    assert said[1][1].endswith("after 2 refusal(s)")


async def test_a_cancel_that_comes_with_the_brokers_answer_is_not_lost() -> None:
    """asyncio.wait_for of Python 3.11 returns an answer that came in the same turn as the cancel and drops the
    cancel: a client waiting for a CONNACK (or PUBACK) would go on as if never asked to stop."""
    client = BrokerUrl("127.0.0.1", 1).client("cancel-test")
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    waiting = asyncio.create_task(client._wait_for(answer, timeout=None))
    await asyncio.sleep(0)  # the task waits for the answer
    answer.set_result("CONNACK")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def _cancelled_within(task: asyncio.Task[None], seconds: float) -> bool:
    """Whether the task ended cancelled within ``seconds`` (a bound for a hang, not a timing)."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    if not done:
        task.cancel()  # once more, so that the test leaves nothing running
        await asyncio.wait({task}, timeout=seconds)
    return bool(done) and task.cancelled()


async def test_an_uplink_woken_as_it_is_cancelled_stops(tmp_path: Path) -> None:
    """A record's wake-up in the same turn as the cancel (the demo stops its uplinks as the last acks come)."""
    async with embedded_broker() as broker:
        term = make_terminal(tmp_path / "t.sqlite", terminal=unique_terminal())
        uplink = Uplink(broker, term)
        task = asyncio.create_task(uplink.run())
        await eventually(lambda: uplink.stats.connections == 1)
        await asyncio.sleep(0.2)  # the publisher waits for a record
        uplink.notify()
        task.cancel()
        assert await _cancelled_within(task, 15)


async def test_an_uplink_stops_when_its_disconnect_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled while connected, aiomqtt waits for the disconnect and, when the broker does not confirm it in
    time, raises MqttError in place of the CancelledError: the uplink must not take it for a lost connection."""
    import aiomqtt

    from terminals.mqtt import ReasonedClient

    async def slow_broker(self: ReasonedClient, *exc: object) -> None:
        await ReasonedClient.__base__.__aexit__(self, *exc)  # type: ignore[union-attr]
        raise aiomqtt.MqttError("Operation timed out")  # what aiomqtt raises when the disconnect is not confirmed

    monkeypatch.setattr(ReasonedClient, "__aexit__", slow_broker)  # before connecting: ``async with`` looks it up then
    async with embedded_broker() as broker:
        term = make_terminal(tmp_path / "t.sqlite", terminal=unique_terminal())
        uplink = Uplink(broker, term, max_backoff=0.1)
        task = asyncio.create_task(uplink.run())
        await eventually(lambda: uplink.stats.connections == 1)
        task.cancel()
        assert await _cancelled_within(task, 15)


async def _wait_for_broker(limit: float) -> None:
    """As ReasonedClient._wait_for does it when the broker does not answer within ``limit`` seconds."""
    try:
        async with asyncio.timeout(limit):
            await asyncio.sleep(10)
    except TimeoutError:
        raise aiomqtt.MqttError("Operation timed out") from None


async def _timed_out_error(limit: float) -> aiomqtt.MqttError:
    """The MqttError that a wait for the broker raises, as its caller catches it."""
    try:
        await _wait_for_broker(limit)
    except aiomqtt.MqttError as error:
        return error
    raise AssertionError("no time-out")


def _replacing_a_cancel() -> aiomqtt.MqttError:
    """An MqttError raised while a cancel was being handled (aiomqtt's __aexit__ that timed out)."""
    try:
        try:
            raise asyncio.CancelledError
        except asyncio.CancelledError:
            raise aiomqtt.MqttError("Operation timed out") from None
    except aiomqtt.MqttError as error:
        return error


async def test_a_plain_time_out_is_a_lost_connection_and_one_replacing_a_cancel_is_the_cancel() -> None:
    """stop_if_cancelled tells a broker that did not answer (the uplink reconnects: asyncio.timeout's own
    CancelledError under the TimeoutError is no cancel) from an MqttError that took a cancel's place (it stops)."""
    stop_if_cancelled(BaseExceptionGroup("lost", [await _timed_out_error(0.01)]))  # returns
    with pytest.raises(asyncio.CancelledError):
        stop_if_cancelled(BaseExceptionGroup("lost", [_replacing_a_cancel()]))
