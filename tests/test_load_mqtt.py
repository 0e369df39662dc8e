"""The load generator's MQTT packets (yikatong.load_mqtt): what goes out has the bytes the standard gives, what
comes in is read whole however the stream is cut, and any bytes at all give packets or ProtocolError; the lean
uplink over them keeps the real uplink's rules against the embedded broker and a stand-in clearing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mqtt_support import ScriptedBroker, StubClearing, eventually, running
from support import KEYS

from cardsim.issuer import IssuerHost
from terminals.messages import ACK_SCHEMA, HOTLIST_FILTERS, Ack, ack_topic
from terminals.mqtt import BrokerUrl, embedded_broker
from terminals.outbox import MemoryOutbox
from yikatong import load_mqtt as mqtt
from yikatong.load_uplink import LeanUplink, LinkTimer, _Connection
from yikatong.loadgen import SimTerminal, TimedQueue
from yikatong.synthetic import synthetic_cards


def test_connect_is_the_standards_bytes() -> None:
    v4 = mqtt.connect("t1", version=mqtt.MQTT311, clean=False, keepalive=60)
    assert v4 == b"\x10\x0e\x00\x04MQTT\x04\x00\x00\x3c\x00\x02t1"
    v5 = mqtt.connect(
        "t1", version=mqtt.MQTT5, clean=True, keepalive=60, session_expiry=300, username="u", password="p"
    )
    # flags: user, password, clean start; properties: session expiry interval 300
    assert v5 == b"\x10\x1a\x00\x04MQTT\x05\xc2\x00\x3c\x05\x11\x00\x00\x01\x2c\x00\x02t1\x00\x01u\x00\x01p"


def test_subscribe_and_publish_are_the_standards_bytes() -> None:
    assert (
        mqtt.subscribe(7, ["a/b", "c/#"], 1, version=mqtt.MQTT311) == b"\x82\x0e\x00\x07\x00\x03a/b\x01\x00\x03c/#\x01"
    )
    assert mqtt.subscribe(7, ["a"], 1, version=mqtt.MQTT5) == b"\x82\x07\x00\x07\x00\x00\x01a\x01"
    assert mqtt.publish("t", b"xy", qos=1, packet_id=9, version=mqtt.MQTT311) == b"\x32\x07\x00\x01t\x00\x09xy"
    assert mqtt.publish("t", b"xy", qos=0, version=mqtt.MQTT5) == b"\x30\x06\x00\x01t\x00xy"
    assert mqtt.puback(258) == b"\x40\x02\x01\x02"
    big = mqtt.publish("t", bytes(200), qos=0, version=mqtt.MQTT311)
    assert big[:3] == b"\x30\xcb\x01"  # a remaining length of 203 takes two bytes


INCOMING = [
    (b"\x20\x02\x01\x00", mqtt.ConnAck(True, 0)),
    (b"\x90\x04\x00\x07\x01\x80", mqtt.SubAck(7, (1, 0x80))),
    (b"\x40\x02\x00\x09", mqtt.PubAck(9, 0)),
    (b"\xd0\x00", mqtt.PingResp()),
    (b"\x33\x07\x00\x01t\x00\x05hi", mqtt.Publish("t", b"hi", 1, 5, True)),
]


@pytest.mark.parametrize(("wire", "packet"), INCOMING)
def test_what_a_broker_sends_is_read(wire: bytes, packet: mqtt.Packet) -> None:
    assert mqtt.Decoder(mqtt.MQTT311).feed(wire) == [packet]


def test_mqtt5_properties_are_read_past() -> None:
    v5 = mqtt.Decoder(mqtt.MQTT5)
    assert v5.feed(b"\x20\x06\x00\x00\x03\x21\x00\x0a") == [mqtt.ConnAck(False, 0)]  # receive maximum 10
    assert v5.feed(b"\x30\x09\x00\x01t\x02\x01\x01hey") == [mqtt.Publish("t", b"hey", 0, 0, False)]  # format
    assert v5.feed(b"\x90\x07\x00\x02\x03\x1f\x00\x00\x01") == [mqtt.SubAck(2, (1,))]  # a reason string
    assert v5.feed(b"\x40\x03\x00\x02\x87") == [mqtt.PubAck(2, 0x87)]  # not authorised
    assert v5.feed(b"\xe0\x01\x8e") == [mqtt.Disconnect(0x8E)]  # session taken over


def test_the_servers_keep_alive_is_read_from_connack() -> None:
    v5 = mqtt.Decoder(mqtt.MQTT5)
    # a reason string, a user property, then Server Keep Alive 5 s
    props = b"\x1f\x00\x02ok" + b"\x26\x00\x01k\x00\x01v" + b"\x13\x00\x05"
    assert v5.feed(b"\x20" + bytes([3 + len(props)]) + b"\x01\x00" + bytes([len(props)]) + props) == [
        mqtt.ConnAck(True, 0, 5)
    ]
    assert v5.feed(b"\x20\x02\x00\x84") == [mqtt.ConnAck(False, 0x84)]  # a refusal without properties
    with pytest.raises(mqtt.ProtocolError, match="property 0x7f"):
        mqtt.Decoder(mqtt.MQTT5).feed(b"\x20\x05\x00\x00\x02\x7f\x00")
    assert mqtt.Decoder(mqtt.MQTT311).feed(b"\x20\x02\x00\x00") == [mqtt.ConnAck(False, 0, None)]


def test_packets_before_bad_bytes_in_one_read_are_returned_then_the_error() -> None:
    decoder = mqtt.Decoder(mqtt.MQTT311)
    assert decoder.feed(b"\xd0\x00" + b"\x40\x02\x00\x09" + b"\x10\x00") == [mqtt.PingResp(), mqtt.PubAck(9, 0)]
    assert decoder.error is not None and "not one a broker sends" in str(decoder.error)
    with pytest.raises(mqtt.ProtocolError, match="not one a broker sends"):
        decoder.feed(b"\xd0\x00")


def test_a_stream_cut_anywhere_gives_the_same_packets() -> None:
    stream = b"".join(wire for wire, _ in INCOMING) * 3
    whole = mqtt.Decoder(mqtt.MQTT311).feed(stream)
    assert whole == [packet for _, packet in INCOMING] * 3
    decoder = mqtt.Decoder(mqtt.MQTT311)
    assert [p for k in range(len(stream)) for p in decoder.feed(stream[k : k + 1])] == whole


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"\x34\x05\x00\x01t\x00\x01", "QoS 2"),
        (b"\x30\x04\x00\x02\xff\xfe", "UTF-8"),
        (b"\x30\x03\x00\x05t", "shorter"),
        (b"\x30\xff\xff\xff\xff\x01", "more than 4 bytes"),
        (b"\x30\xff\xff\xff\x7f", "at most"),
        (b"\x10\x00", "not one a broker sends"),
        (b"\x41\x02\x00\x01", "flags"),
        (b"\x90\x02\x00\x01", "without a code"),
    ],
)
def test_bytes_no_broker_should_send_are_refused(wire: bytes, reason: str) -> None:
    with pytest.raises(mqtt.ProtocolError, match=reason):
        mqtt.Decoder(mqtt.MQTT311).feed(wire)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([mqtt.MQTT311, mqtt.MQTT5]), st.lists(st.binary(max_size=40), max_size=8))
def test_any_bytes_give_packets_or_protocol_error(version: int, chunks: list[bytes]) -> None:
    decoder = mqtt.Decoder(version)
    with contextlib.suppress(mqtt.ProtocolError):
        for chunk in chunks:
            for packet in decoder.feed(chunk):
                assert isinstance(
                    packet, mqtt.ConnAck | mqtt.SubAck | mqtt.Publish | mqtt.PubAck | mqtt.PingResp | mqtt.Disconnect
                )


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=60), st.binary(max_size=3000), st.integers(1, 0xFFFF), st.booleans())
def test_a_publish_reads_back_as_written(topic: str, payload: bytes, packet_id: int, v5: bool) -> None:
    version = mqtt.MQTT5 if v5 else mqtt.MQTT311
    wire = mqtt.publish(topic, payload, qos=1, packet_id=packet_id, version=version)
    assert mqtt.Decoder(version).feed(wire) == [mqtt.Publish(topic, payload, 1, packet_id, False)]
    assert struct.unpack("!H", mqtt.puback(packet_id)[2:])[0] == packet_id


async def _lean_terminal_round_trip() -> tuple[int, int, int]:
    """Five records through a lean uplink, the embedded broker (MQTT 3.1.1) and a stub clearing."""
    host = IssuerHost(KEYS)
    terminal = SimTerminal(host, "4560", "4560ABCD0001", TimedQueue(MemoryOutbox()), 200)
    card = synthetic_cards(1, ["4560"])[0]
    timer = LinkTimer()
    acked: list[int] = []
    async with embedded_broker() as url:
        uplink = LeanUplink(url, terminal, timer, ack_timeout=2.0, on_ack=lambda _a, n, _r: acked.append(n))
        clearing = StubClearing(url)
        async with running(clearing.run()), running(uplink.run()), running(timer.run()):
            await eventually(lambda: uplink.stats.connected, 10)
            for _ in range(5):
                terminal.tap(card, 0.0)
                uplink.notify()
            await eventually(lambda: terminal.outbox.queued() == 0, 10)
    return sum(acked), len(clearing.distinct()), uplink.stats.connections


def test_a_lean_uplink_publishes_and_frees_what_the_clearing_acks() -> None:
    acked, distinct, connections = asyncio.run(_lean_terminal_round_trip())
    assert acked == 5 and distinct == 5 and connections == 1


class _Transport(asyncio.Transport):
    """A connection's far end in memory: keeps what is written, notes when it is closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.aborted = True


class _BrokenOutbox(TimedQueue):
    """An outbox whose acks fail (a full disk, a bug): the connection must end, not the event loop's handling."""

    def apply_ack(self, ack: Ack) -> tuple[int, int]:
        raise OSError("disk I/O error")


def _ack_publish(terminal: SimTerminal, through: int) -> bytes:
    ack = Ack(schema=ACK_SCHEMA, terminal=terminal.terminal_hex, acked_through=through)
    topic = ack_topic(terminal.city, terminal.terminal_hex)
    return mqtt.publish(topic, ack.to_json().encode(), qos=0, version=mqtt.MQTT311)


async def _fed(outbox: TimedQueue, data: bytes) -> tuple[str, SimTerminal, list[object]]:
    """Three records published by a lean uplink over a connection in memory, then ``data`` from the broker (after
    the PUBACK of that publication): the reason the connection closed, the terminal, what the loop was told of
    errors."""
    loop = asyncio.get_running_loop()
    told: list[object] = []
    loop.set_exception_handler(lambda _loop, context: told.append(context))
    terminal = SimTerminal(IssuerHost(KEYS), "4560", "4560ABCD0002", outbox, 200)
    card = synthetic_cards(1, ["4560"])[0]
    for _ in range(3):
        terminal.tap(card, 0.0)
    uplink = LeanUplink(BrokerUrl("127.0.0.1", 1), terminal, LinkTimer())
    link = _Connection(uplink, mqtt.MQTT311)
    link.connection_made(_Transport())
    uplink.policy.connected()
    uplink.policy.subscribed(time.monotonic())
    uplink._link, uplink._ready = link, True  # as after the handshake
    uplink.notify()
    link.data_received(mqtt.puback(1) + data)
    await asyncio.sleep(0)
    assert link.closed.done()
    return link.closed.result(), terminal, told


def test_an_ack_before_bad_bytes_in_one_read_is_applied_then_the_connection_ends() -> None:
    outbox = TimedQueue(MemoryOutbox())
    probe = SimTerminal(IssuerHost(KEYS), "4560", "4560ABCD0002", TimedQueue(MemoryOutbox()), 200)
    reason, terminal, told = asyncio.run(_fed(outbox, _ack_publish(probe, 2) + b"\x10\x00"))
    assert "bad MQTT" in reason and "not one a broker sends" in reason
    assert terminal.outbox.queued() == 1  # records 1 and 2 freed by the ack read before the bad bytes
    assert told == []


def test_an_outbox_failing_on_an_ack_ends_the_connection_with_the_reason() -> None:
    probe = SimTerminal(IssuerHost(KEYS), "4560", "4560ABCD0002", TimedQueue(MemoryOutbox()), 200)
    reason, terminal, told = asyncio.run(_fed(_BrokenOutbox(MemoryOutbox()), _ack_publish(probe, 2)))
    assert "taking a Publish failed" in reason and "disk I/O error" in reason
    assert terminal.outbox.queued() == 3 and told == []  # nothing lost; the loop's fatal-error path not taken


async def _against(
    broker: ScriptedBroker, session_expiry: int | None, timer: LinkTimer | None = None
) -> tuple[LeanUplink, SimTerminal]:
    server = await asyncio.start_server(broker.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    terminal = SimTerminal(IssuerHost(KEYS), "4560", "4560ABCD0003", TimedQueue(MemoryOutbox()), 200)
    uplink = LeanUplink(
        BrokerUrl("127.0.0.1", port), terminal, timer or LinkTimer(), session_expiry=session_expiry, resubscribe_after=0
    )
    return uplink, terminal


async def _refused_hotlists() -> tuple[int, int, int]:
    # the ack topic granted, the hotlists refused every time
    broker = ScriptedBroker(
        mqtt.MQTT311, b"\x20\x02\x00\x00", lambda _n, topic: 0x80 if topic in HOTLIST_FILTERS else 1
    )
    uplink, terminal = await _against(broker, None)
    card = synthetic_cards(1, ["4560"])[0]
    async with running(uplink.run()):
        await eventually(lambda: uplink.stats.connected, 10)
        terminal.tap(card, 0.0)
        uplink.notify()
        await eventually(lambda: mqtt.PUBLISH in broker.kinds, 10)
        await asyncio.sleep(0.2)  # a reconnect would show now
    return broker.connections, uplink.stats.connections, broker.kinds.count(mqtt.PUBLISH)


def test_a_refused_subscription_is_logged_once_and_records_still_go_out(caplog: pytest.LogCaptureFixture) -> None:
    """As the real uplink: the terminal publishes without its hotlists (and asks for them again, see below)."""
    with caplog.at_level(logging.WARNING, logger="terminals.uplink_policy"):
        broker_connections, connections, published = asyncio.run(_refused_hotlists())
    assert broker_connections == connections == 1 and published == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and all(f in warnings[0] for f in HOTLIST_FILTERS)
    assert "publishing all the same" in warnings[0] and "asking again" in warnings[0]


async def _refused_then_granted() -> tuple[list[list[str]], list[int], int, int]:
    """NATS with a node down: the first SUBSCRIBE refused whole (MQTT 5 quota exceeded), the next granted."""
    broker = ScriptedBroker(mqtt.MQTT5, b"\x20\x03\x00\x00\x00", lambda n, _topic: 0x97 if n == 0 else 1)
    timer = LinkTimer()
    uplink, terminal = await _against(broker, 0, timer)
    card = synthetic_cards(1, ["4560"])[0]
    async with running(uplink.run()), running(timer.run()):
        await eventually(lambda: uplink.stats.connected, 10)
        for _ in range(2):
            terminal.tap(card, 0.0)
        uplink.notify()
        await eventually(lambda: uplink.stats.published == 2, 10)  # refused, yet the records go out
        await eventually(lambda: len(broker.subscriptions) == 2, 10)  # on the next tick
        await eventually(lambda: "granted" in timer.told, 10)
        ack = Ack(schema=ACK_SCHEMA, terminal=terminal.terminal_hex, acked_through=2)
        broker.send(mqtt.publish(uplink.policy.ack_topic, ack.to_json().encode(), qos=0, version=mqtt.MQTT5))
        await eventually(lambda: terminal.outbox.queued() == 0, 10)
        await asyncio.sleep(1.1)  # another tick: nothing more to ask for
    return broker.subscriptions, broker.kinds, broker.connections, uplink.stats.acked


def test_a_refused_subscription_is_asked_again_on_the_same_connection_and_acks_then_arrive(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="terminals.uplink_policy"):
        subscriptions, kinds, connections, acked = asyncio.run(_refused_then_granted())
    ack = ack_topic("4560", "4560ABCD0003")
    assert subscriptions == [[ack, *HOTLIST_FILTERS]] * 2 and connections == 1 and acked == 2
    assert kinds.index(mqtt.PUBLISH) < [n for n, k in enumerate(kinds) if k == mqtt.SUBSCRIBE][1]
    said = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in said] == [logging.WARNING, logging.INFO]
    assert "151 quota exceeded" in said[0][1] and "no ack can come until it is granted" in said[0][1]
    assert said[1][1] == f"broker granted the subscription to {ack}, {', '.join(HOTLIST_FILTERS)} after 1 refusal(s)"


async def _server_keep_alive() -> tuple[int, list[int]]:
    # MQTT 5 CONNACK: session not present, accepted, Server Keep Alive 2 s
    broker = ScriptedBroker(mqtt.MQTT5, b"\x20\x06\x00\x00\x03\x13\x00\x02", lambda _n, _topic: 1)
    uplink, _ = await _against(broker, 0)
    async with running(uplink.run()):
        await eventually(lambda: uplink.stats.connected, 10)
        await eventually(lambda: mqtt.SUBSCRIBE in broker.kinds, 10)
        kinds = len(broker.kinds)
        uplink.tick(uplink.sent_at + 1.85)  # past 0.9 of 2 s (it would wait 54 s with the 60 it asked for)
        await eventually(lambda: mqtt.PINGREQ in broker.kinds[kinds:], 10)
        return uplink.keepalive, broker.kinds


def test_the_brokers_keep_alive_is_the_one_kept() -> None:
    keepalive, kinds = asyncio.run(_server_keep_alive())
    assert keepalive == 2 and kinds[:2] == [mqtt.CONNECT, mqtt.SUBSCRIBE] and mqtt.PINGREQ in kinds
