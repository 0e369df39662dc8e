"""The load generator's MQTT packets (yikatong.load_mqtt): what goes out has the bytes the standard gives, what
comes in is read whole however the stream is cut, and any bytes at all give packets or ProtocolError; the lean
uplink over them keeps the real uplink's rules against the embedded broker and a stand-in clearing."""

from __future__ import annotations

import asyncio
import contextlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mqtt_support import StubClearing, eventually, running
from support import KEYS

from cardsim.issuer import IssuerHost
from terminals.mqtt import embedded_broker
from terminals.outbox import MemoryOutbox
from yikatong import load_mqtt as mqtt
from yikatong.load_uplink import LeanUplink, LinkTimer
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
