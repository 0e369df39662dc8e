"""A simulated terminal's uplink for the load generator: the same rules as a real terminal's ``Uplink``
(``terminals.uplink_policy.UplinkPolicy`` decides what to publish, what an ack frees, when to resend and how long
to back off), carried out over one plain asyncio connection per terminal with the few MQTT packets of
``yikatong.load_mqtt``.

A real terminal has a core of its own; 10,000 simulated ones share one. ``terminals.uplink`` runs each over an
aiomqtt client (paho in a thread-safe wrapper: every packet out wakes the loop through its self-pipe, and each
client wakes once a second for its keepalive), which costs this process about 0.6 ms of CPU a tap and a quarter
of a core for 10,000 idle clients: the generator, not the clearing, set the pace. Here each connection is a
protocol object fed by the loop's selector, and one ``LinkTimer`` a process looks after every connection's
keepalive, publish timeout and resend once a second.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable

from terminals.messages import HOTLIST_FILTERS, Ack
from terminals.mqtt import BrokerUrl, connection_error
from terminals.signing import Signer
from terminals.uplink import Sender
from terminals.uplink_policy import (
    FIRST_RESUBSCRIBE,
    ApplyAck,
    OfferHotlist,
    Publication,
    Resubscribe,
    UplinkPolicy,
    UplinkStats,
)
from yikatong import load_mqtt as mqtt

log = logging.getLogger(__name__)

KEEPALIVE = 60  # seconds asked for, as aiomqtt's default (an MQTT 5 broker may say another: Server Keep Alive)
CONNECTING = 100  # connections a process opens at once
TIMEOUT = 10.0  # seconds for CONNACK, SUBACK and each PUBACK (aiomqtt's default), else the connection is dropped


class LinkError(Exception):
    """The connection cannot go on: refused, timed out, or the broker sent what no broker should."""


class _Connection(asyncio.Protocol):
    """One TCP connection to the broker: packets in go to the uplink, ``closed`` is done when it ends."""

    def __init__(self, uplink: LeanUplink, version: int) -> None:
        self.uplink = uplink
        self.decoder = mqtt.Decoder(version)
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:  # small packets both ways: Nagle's algorithm would hold them for delayed ACKs
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.decoder.feed(data)
        except mqtt.ProtocolError as err:
            self.close(f"broker sent bad MQTT: {err}")
            return
        for packet in packets:  # whole packets before bad bytes in the same read are taken first
            try:
                self.uplink.received(packet)
            except Exception as err:  # the outbox or hotlist book failing: this connection ends, not the loop
                log.exception("uplink to %s: taking a %s failed", self.uplink.broker, type(packet).__name__)
                self.close(f"taking a {type(packet).__name__} failed: {err!r}")
                return
        if self.decoder.error is not None:
            self.close(f"broker sent bad MQTT: {self.decoder.error}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(str(exc) if exc else "connection closed by the broker")

    def send(self, data: bytes) -> None:
        """Write a packet unless the connection is going."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
            self.uplink.sent_at = time.monotonic()

    def close(self, reason: str) -> None:
        """End the connection at once (what is not sent yet is dropped)."""
        if not self.closed.done():
            self.closed.set_result(reason)
            self.uplink.link_closed(reason)
        if self.transport is not None:
            self.transport.abort()

    def goodbye(self) -> None:
        """DISCONNECT, then close once it is sent: the broker keeps the session (as aiomqtt's leaving does)."""
        self.send(mqtt.DISCONNECT_PACKET)
        if not self.closed.done():
            self.closed.set_result("stopped")
        if self.transport is not None:
            self.transport.close()


class LinkTimer:
    """Once a second, every lean uplink of this process checks its timeouts (one task, not one per terminal); and
    at most ``CONNECTING`` of them connect at once (thousands of SYNs at one moment overflow the broker's accept
    queue, and the kernel retries the rest after 1, 3, 7 s)."""

    def __init__(self) -> None:
        self.uplinks: list[LeanUplink] = []
        self.connecting = asyncio.Semaphore(CONNECTING)
        # subscription news already logged ("refused", "granted"): once a process, as all its terminals ask alike
        self.told: set[str] = set()

    async def run(self) -> None:
        """Tick the uplinks until cancelled."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for uplink in self.uplinks:
                uplink.tick(now)


class LeanUplink:
    """Publishes one terminal's outbox as ``terminals.uplink.Uplink`` does (QoS 1, one message in flight, records
    dropped only on the clearing's ack, everything unacked sent again on each connection and after
    ``ack_timeout`` without traffic; the terminal follows every issuer's hotlist). Run ``run()`` as a task;
    ``notify()`` when a record was added; ``on_ack`` is called after each ack the outbox applied. The outbox is
    used on the event loop. With ``session_expiry`` MQTT 5 and a session that long after a disconnect,
    otherwise an MQTT 3.1.1 persistent session; ``timer`` checks keepalive, timeouts and resends."""

    def __init__(
        self,
        broker: BrokerUrl,
        terminal: Sender,
        timer: LinkTimer,
        *,
        batch: int = 100,
        ack_timeout: float = 10.0,
        max_backoff: float = 10.0,
        session_expiry: int | None = None,
        on_ack: Callable[[Ack, int, int], None] | None = None,
        resubscribe_after: float = FIRST_RESUBSCRIBE,
    ) -> None:
        self.broker = broker
        self.terminal = terminal
        self.outbox = terminal.outbox
        self.policy = UplinkPolicy(
            terminal.city,
            terminal.terminal_hex,
            now=time.monotonic(),
            batch=batch,
            ack_timeout=ack_timeout,
            max_backoff=max_backoff,
            resubscribe_after=resubscribe_after,
            told=timer.told,
        )
        # over mqtts:// the terminal's own certificate: its TLS context (made once; each connection a handshake)
        # and its signature on every message, as terminals.uplink does
        self.tls = None if broker.tls is None else broker.tls.context()
        self.signer = None if broker.tls is None else Signer.of(broker.tls)
        self.session_expiry = session_expiry
        self.version = mqtt.MQTT311 if session_expiry is None else mqtt.MQTT5
        self.on_ack = on_ack
        self.timer = timer
        self.sent_at = 0.0  # when a packet last went out (keepalive)
        self.keepalive = KEEPALIVE  # seconds, as the broker last said (0: none)
        self._heard_at = 0.0  # when a packet last came in
        self._link: _Connection | None = None
        self._ready = False  # subscribed: records may go out
        self._next_id = 0
        self._inflight: tuple[int, Publication, float] | None = None  # packet id, what, when sent
        self._again: tuple[Resubscribe, float] | None = None  # refused filters to ask for again, and when
        self._resubscribing: tuple[int, tuple[str, ...], float] | None = None  # a later SUBSCRIBE: id, what, when
        self._waiting: dict[type, asyncio.Future[mqtt.Packet]] = {}
        timer.uplinks.append(self)

    @property
    def stats(self) -> UplinkStats:
        """What the uplink has done so far."""
        return self.policy.stats

    def notify(self) -> None:
        """A record was added to the outbox (on the event loop)."""
        self._pump()

    def _packet_id(self) -> int:
        self._next_id = self._next_id % 0xFFFF + 1
        return self._next_id

    async def run(self) -> None:
        """Connect, publish and listen until cancelled; reconnect with backoff whenever the connection ends."""
        loop = asyncio.get_running_loop()
        while True:
            link: _Connection | None = None
            try:
                async with self.timer.connecting:
                    _, made = await asyncio.wait_for(
                        loop.create_connection(
                            lambda: _Connection(self, self.version), self.broker.host, self.broker.port, ssl=self.tls
                        ),
                        TIMEOUT,
                    )
                    link = self._link = made
                    self._heard_at = time.monotonic()
                    filters, codes = await self._handshake(made)
                self.policy.connected()
                self._granted(filters, codes)
                self._ready = True
                self._pump()
                raise LinkError(await made.closed)
            except (OSError, LinkError, TimeoutError) as err:  # ssl.SSLError is an OSError
                if self.policy.lost(connection_error(err)):
                    log.warning("uplink to %s: %s; retrying", self.broker, err)
            finally:
                self._ready, self._inflight, self._link = False, None, None
                self._again = self._resubscribing = None
                self.link_closed("stopped")
                if link is not None:
                    link.goodbye()  # after a lost connection a no-op; when cancelled, a clean leave
            await asyncio.sleep(self.policy.retry_delay())

    async def _expect(self, kind: type) -> mqtt.Packet:
        """The broker's next packet of ``kind`` (LinkError when the connection ends first or it takes too long)."""
        waiter: asyncio.Future[mqtt.Packet] = asyncio.get_running_loop().create_future()
        self._waiting[kind] = waiter
        try:
            return await asyncio.wait_for(waiter, TIMEOUT)
        except TimeoutError:
            raise LinkError(f"no {kind.__name__} from the broker in {TIMEOUT:g} s") from None

    def link_closed(self, reason: str) -> None:
        """The connection ended: whoever waits for an answer on it gets the reason."""
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_exception(LinkError(reason))
        self._waiting.clear()

    async def _handshake(self, link: _Connection) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """CONNECT, then one SUBSCRIBE to the terminal's ack topic and every issuer's hotlist (QoS 1): the filters
        and the SUBACK's codes."""
        link.send(
            mqtt.connect(
                f"yikatong-terminal-{self.terminal.terminal_hex}",
                version=self.version,
                clean=False,
                keepalive=KEEPALIVE,
                session_expiry=self.session_expiry,
                username=self.broker.username,
                password=self.broker.password,
            )
        )
        answer = await self._expect(mqtt.ConnAck)
        assert isinstance(answer, mqtt.ConnAck)
        if answer.code != 0:
            raise LinkError(f"the broker refused the connection (CONNACK code {answer.code})")
        self.keepalive = KEEPALIVE if answer.keepalive is None else answer.keepalive  # as paho does
        filters = (self.policy.ack_topic, *HOTLIST_FILTERS)
        link.send(mqtt.subscribe(self._packet_id(), list(filters), 1, version=self.version))
        granted = await self._expect(mqtt.SubAck)
        assert isinstance(granted, mqtt.SubAck)
        return filters, granted.codes

    def _granted(self, filters: tuple[str, ...], codes: tuple[int, ...]) -> None:
        """A SUBACK: as the real uplink, publish all the same, and ask again later for what was refused."""
        self.policy.subscribed(time.monotonic())  # the broker sends the retained hotlists of those granted now
        again = self.policy.subscription_granted(filters, codes)
        self._again = None if again is None else (again, time.monotonic() + again.delay)

    def _pump(self) -> None:
        """Publish the next message if none is in flight (the policy says which records)."""
        link = self._link
        if link is None or not self._ready or self._inflight is not None:
            return
        publication = self.policy.publication(self.outbox.unacked(*self.policy.window()))
        if publication is None:
            return
        packet_id = self._packet_id()
        self._inflight = (packet_id, publication, time.monotonic())
        payload = (publication.payload if self.signer is None else self.signer.seal(publication.payload)).encode()
        link.send(mqtt.publish(self.policy.txn_topic, payload, qos=1, packet_id=packet_id, version=self.version))

    def received(self, packet: mqtt.Packet) -> None:
        """A packet from the broker."""
        now = self._heard_at = time.monotonic()
        match packet:
            case mqtt.PubAck(packet_id=packet_id) if self._inflight is not None and self._inflight[0] == packet_id:
                # a refusal (MQTT 5 code >= 0x80, e.g. an ACL) frees nothing: the record waits for the clearing's
                # ack like any other and goes out again, as with aiomqtt, which does not tell the two apart
                self.policy.published(self._inflight[1], now)
                self._inflight = None
                self._pump()
            case mqtt.Publish(topic=topic, payload=payload, qos=qos, packet_id=packet_id):
                self._deliver(topic, payload)
                if qos and self._link is not None:
                    self._link.send(mqtt.puback(packet_id))
            case mqtt.SubAck(packet_id=packet_id, codes=codes) if (
                self._resubscribing is not None and self._resubscribing[0] == packet_id
            ):
                filters, self._resubscribing = self._resubscribing[1], None
                self._granted(filters, codes)
            case mqtt.ConnAck() | mqtt.SubAck():
                waiter = self._waiting.pop(type(packet), None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(packet)
            case mqtt.Disconnect(code=code) if self._link is not None:
                self._link.close(f"the broker disconnected (reason {code:#x})")

    def _deliver(self, topic: str, payload: bytes) -> None:
        match self.policy.received(topic, payload):
            case ApplyAck(ack):
                acked, rejected = self.outbox.apply_ack(ack)
                self.policy.ack_applied(ack, acked, rejected, time.monotonic())
                if self.on_ack is not None:
                    self.on_ack(ack, acked, rejected)
                self._pump()
            case OfferHotlist(topic, hotlist):
                self.terminal.offer_hotlist(topic, hotlist)
                self.policy.hotlist_offered(time.monotonic())

    def tick(self, now: float) -> None:
        """Once a second: a PUBACK or SUBACK overdue or a silent broker ends the connection; keepalive; a refused
        subscription asked for again when due; resend when due."""
        link = self._link
        if link is None or not self._ready:
            return
        if self._again is not None and now >= self._again[1]:
            filters, self._again = self._again[0].filters, None
            self._resubscribing = (self._packet_id(), filters, now)
            link.send(mqtt.subscribe(self._resubscribing[0], list(filters), 1, version=self.version))
        if self._inflight is not None and now - self._inflight[2] > TIMEOUT:
            link.close("Operation timed out")
        elif self._resubscribing is not None and now - self._resubscribing[2] > TIMEOUT:
            link.close(f"no SubAck from the broker in {TIMEOUT:g} s")
        elif self.keepalive and now - self._heard_at > self.keepalive * 1.5:
            link.close("no word from the broker within the keepalive")
        elif self.keepalive and now - self.sent_at >= self.keepalive * 0.9:
            link.send(mqtt.PINGREQ_PACKET)
        if self._inflight is None and self.policy.resend_due(now) and self.outbox.queued() > 0:
            self.policy.resend(now)
            self._pump()
