"""The terminal's uplink: publish the outbox over MQTT (QoS 1, persistent session), drop records only when the
clearing's ack covers them, and follow every issuer's retained hotlist.

The broker's PUBACK only says the broker has the message; the record stays in the outbox until an ack from the
clearing. Records not acked within ``ack_timeout`` of the last traffic are sent again (the same bytes, the same
seq): the clearing stores each record once and acks duplicates again. Lost connections are retried with
backoff for as long as it takes; everything published while offline just waits in the outbox.

The rules are ``terminals.uplink_policy``'s; this module carries them out over aiomqtt, with the outbox's
calls (SQLite commits with synchronous=FULL) in a worker thread so that they do not stall the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

import aiomqtt

from terminals.messages import HOTLIST_FILTERS, Ack
from terminals.mqtt import BrokerUrl
from terminals.outbox import RecordQueue
from terminals.signing import Signer
from terminals.uplink_policy import ApplyAck, OfferHotlist, UplinkPolicy, UplinkStats

log = logging.getLogger(__name__)

_P = ParamSpec("_P")
_T = TypeVar("_T")


class Sender(Protocol):
    """What the uplink needs of a terminal: its city, number, outbox and a taker for hotlist messages (a
    ``Terminal``, or a simulated terminal of the load generator). What ``offer_hotlist`` returns is the terminal's
    own business: the uplink does not look at it."""

    @property
    def city(self) -> str: ...
    @property
    def terminal_hex(self) -> str: ...
    @property
    def outbox(self) -> RecordQueue: ...
    def offer_hotlist(self, topic: str, payload: bytes | str) -> object: ...


class Uplink:
    """Publishes one terminal's outbox. Run ``run()`` as a task; ``notify()`` (from any thread) when a record
    was added, so it goes out at once. ``on_ack`` is called (on the event loop) after each ack the outbox
    applied, with the ack and the (acked, rejected) counts. ``in_thread=False`` keeps the outbox's calls on the
    event loop: for an outbox that is not thread-safe and never blocks (an in-memory one)."""

    def __init__(
        self,
        broker: BrokerUrl,
        terminal: Sender,
        *,
        batch: int = 100,
        ack_timeout: float = 10.0,
        max_backoff: float = 10.0,
        session_expiry: int | None = None,
        on_ack: Callable[[Ack, int, int], None] | None = None,
        in_thread: bool = True,
    ) -> None:
        self.broker = broker
        self.terminal = terminal
        self.outbox = terminal.outbox
        self.number = terminal.terminal_hex
        self.policy = UplinkPolicy(
            terminal.city,
            self.number,
            now=time.monotonic(),
            batch=batch,
            ack_timeout=ack_timeout,
            max_backoff=max_backoff,
        )
        # None: an MQTT 3.1.1 session that never expires (a real terminal's: the acks queued while it is offline
        # wait for it however long that is); seconds: MQTT 5, the broker drops the session that long after the
        # terminal went away (the load generator's terminals, which must leave nothing on a shared broker)
        self.session_expiry = session_expiry
        self.on_ack = on_ack
        self.in_thread = in_thread
        # a terminal with a certificate signs what it publishes: the clearing learns who did (terminals/signing.py)
        self.signer = None if broker.tls is None else Signer.of(broker.tls)
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stats(self) -> UplinkStats:
        """What the uplink has done so far."""
        return self.policy.stats

    def notify(self) -> None:
        """A record was added to the outbox (thread-safe)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Connect, publish and listen until cancelled; reconnect with backoff whenever the broker goes away."""
        self._loop = asyncio.get_running_loop()
        while True:
            try:
                async with self._client() as client:
                    self.policy.connected()
                    log.info("uplink connected to %s", self.broker)
                    await client.subscribe(self.policy.ack_topic, qos=1)
                    await client.subscribe([(topic, 1) for topic in HOTLIST_FILTERS])
                    self.policy.subscribed(time.monotonic())
                    async with asyncio.TaskGroup() as tasks:
                        tasks.create_task(self._publish(client))
                        tasks.create_task(self._receive(client))
            except* aiomqtt.MqttError as group:
                error = group.exceptions[0]
                if self.policy.lost(str(error)):
                    log.warning("uplink to %s: %s; retrying", self.broker, error)
            await asyncio.sleep(self.policy.retry_delay())

    def _client(self) -> aiomqtt.Client:
        identifier = f"yikatong-terminal-{self.number}"
        if self.session_expiry is None:
            return self.broker.client(identifier)
        return self.broker.client(identifier, mqtt5=True, session_expiry=self.session_expiry)

    async def _store(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """An outbox call, in a worker thread unless ``in_thread`` is off (the outbox takes its own lock: the tap
        thread writes to it too)."""
        if self.in_thread:
            return await asyncio.to_thread(call, *args, **kwargs)
        return call(*args, **kwargs)

    async def _publish(self, client: aiomqtt.Client) -> None:
        while True:
            publication = self.policy.publication(await self._store(self.outbox.unacked, *self.policy.window()))
            if publication is not None:
                payload = publication.payload if self.signer is None else self.signer.seal(publication.payload)
                await client.publish(self.policy.txn_topic, payload, qos=1)
                self.policy.published(publication, time.monotonic())
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.policy.idle_wait)
            except TimeoutError:
                if self.policy.resend_due(time.monotonic()) and await self._store(self.outbox.queued) > 0:
                    self.policy.resend(time.monotonic())

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            raw = message.payload
            payload = bytes(raw) if isinstance(raw, bytes | bytearray) else str(raw)
            match self.policy.received(message.topic.value, payload):
                case ApplyAck(ack):
                    await self._apply(ack)
                case OfferHotlist(topic, hotlist):
                    # in the worker thread: a snapshot is decoded and the list saved (synchronous=FULL) there
                    await self._store(self.terminal.offer_hotlist, topic, hotlist)
                    self.policy.hotlist_offered(time.monotonic())

    async def _apply(self, ack: Ack) -> None:
        """Drop what the ack covers from the outbox, then count it and wake the publisher."""
        applying = asyncio.ensure_future(self._store(self.outbox.apply_ack, ack))
        try:
            acked, rejected = await asyncio.shield(applying)
        except asyncio.CancelledError:
            # the commit cannot be stopped once the thread runs it: count it before going, or the stats would
            # miss records that have left the outbox
            self._applied(ack, *await applying)
            raise
        self._applied(ack, acked, rejected)

    def _applied(self, ack: Ack, acked: int, rejected: int) -> None:
        self.policy.ack_applied(ack, acked, rejected, time.monotonic())
        if self.on_ack is not None:
            self.on_ack(ack, acked, rejected)
        self._wake.set()

    async def run_until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Run the uplink until ``done()`` holds (checked every 50 ms) or ``timeout`` passes; whether it held."""
        task = asyncio.create_task(self.run())
        try:
            deadline = time.monotonic() + timeout
            while not done():
                if time.monotonic() > deadline:
                    return False
                await asyncio.sleep(0.05)
            return True
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def hotlists_quiet(self, quiet: float = 0.3) -> bool:
        """Subscribed, and no hotlist message for ``quiet`` seconds: the retained lists have come."""
        return self.policy.hotlists_quiet(time.monotonic(), quiet)

    def all_published(self) -> bool:
        """Every record in the outbox has reached the broker (PUBACK) at least once on this connection."""
        return self.policy.all_published(bool(self.outbox.unacked(self.policy.sent_through, 1)))

    def all_acked(self) -> bool:
        """The outbox is empty: the clearing has acked everything."""
        return self.policy.all_acked(self.outbox.queued())
