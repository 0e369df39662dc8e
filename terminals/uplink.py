"""The terminal's uplink: publish the outbox over MQTT (QoS 1, persistent session), drop records only when the
clearing's ack covers them, and follow every issuer's retained hotlist.

The broker's PUBACK only says the broker has the message; the record stays in the outbox until an ack from the
clearing. Records not acked within ``ack_timeout`` of the last traffic are sent again (the same bytes, the same
seq): the clearing stores each record once and acks duplicates again. Lost connections are retried with
backoff for as long as it takes; everything published while offline just waits in the outbox.

The uplink speaks MQTT 5 where the broker does (and 3.1.1 where it does not, e.g. the embedded amqtt), so that
the broker can say no: a PUBACK reason code that refuses a message (135 "not authorized": the ACL denies the
topic) marks its records refused in the outbox with the reason, logs one line, and they are not sent again until
the operator says so (``terminal sync --retry-refused``); a transient one (quota exceeded) is retried after a
backoff. A connection the broker refuses (a revoked certificate's TLS alert, a bad password) is told in words in
the log and kept in the state file for ``terminal status``. A subscription the broker refuses (SUBACK 0x80 up:
NATS's MQTT layer does when it cannot make the JetStream consumer while a cluster node is down) is asked for again
on the same connection after a delay, until granted; the terminal publishes meanwhile.

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
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.reasoncodes import ReasonCode

from terminals.messages import HOTLIST_FILTERS, Ack
from terminals.mqtt import (
    NEVER_EXPIRES,
    BrokerUrl,
    ConnectRefused,
    ReasonedClient,
    connection_error,
    stop_if_cancelled,
    tls_refusal,
)
from terminals.outbox import RecordQueue
from terminals.signing import Signer
from terminals.uplink_policy import (
    FIRST_RESUBSCRIBE,
    ApplyAck,
    OfferHotlist,
    Refuse,
    Resubscribe,
    RetryAfter,
    UplinkPolicy,
    UplinkStats,
)

log = logging.getLogger(__name__)

# seconds to wait for the CONNACK to a first MQTT 5 CONNECT: a 3.1.1-only broker may not answer it at all (amqtt
# 0.12 waits for the rest of a packet it misreads), and then the terminal falls back to 3.1.1
MQTT5_PROBE = 3.0

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
    event loop: for an outbox that is not thread-safe and never blocks (an in-memory one). A subscription the broker
    refuses is asked for again after ``resubscribe_after`` seconds, then less often, until granted."""

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
        resubscribe_after: float = FIRST_RESUBSCRIBE,
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
            mqtt5=broker.speaks_mqtt5,
            resubscribe_after=resubscribe_after,
        )
        # None: a session that never expires (a real terminal's: the acks queued while it is offline
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
            connected = again_now = False
            try:
                async with self._client() as client:
                    connected = True
                    self.policy.connected()
                    log.info("uplink connected to %s (MQTT %s)", self.broker, "5" if self.policy.mqtt5 else "3.1.1")
                    await self._store(self.outbox.note_link, None)
                    again = await self._subscribe(client, (self.policy.ack_topic, *HOTLIST_FILTERS))
                    async with asyncio.TaskGroup() as tasks:
                        tasks.create_task(self._publish(client))
                        tasks.create_task(self._receive(client))
                        if again is not None:
                            tasks.create_task(self._resubscribe(client, again))
            except* aiomqtt.MqttError as group:
                stop_if_cancelled(group)
                again_now = await self._failed(group.exceptions[0], connected)
            if not again_now:
                await asyncio.sleep(self.policy.retry_delay())

    async def _failed(self, error: BaseException, connected: bool) -> bool:
        """A connection attempt failed or a connection was lost: fall back to MQTT 3.1.1 when the broker says it
        does not speak MQTT 5 (True: try again at once), else log the failure in words when it is news and keep it
        in the state file."""
        if not connected and self.session_expiry is None and _speaks_no_mqtt5(error) and self.policy.fall_back():
            return True
        text = connection_error(error)
        if self.policy.lost(text):
            log.warning("uplink to %s: %s; retrying", self.broker, text)
            await self._store(self.outbox.note_link, text)
        return False

    def _client(self) -> ReasonedClient:
        identifier = f"yikatong-terminal-{self.number}"
        if self.session_expiry is not None:  # the load generator's terminals: MQTT 5, to make the session end
            return self.broker.client(identifier, mqtt5=True, session_expiry=self.session_expiry)
        probe = MQTT5_PROBE if self.policy.probing else None
        return self.broker.client(
            identifier, mqtt5=self.policy.mqtt5, session_expiry=NEVER_EXPIRES, connect_timeout=probe
        )

    async def _store(self, call: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """An outbox call, in a worker thread unless ``in_thread`` is off (the outbox takes its own lock: the tap
        thread writes to it too)."""
        if self.in_thread:
            return await asyncio.to_thread(call, *args, **kwargs)
        return call(*args, **kwargs)

    async def _subscribe(self, client: ReasonedClient, filters: tuple[str, ...]) -> Resubscribe | None:
        """One SUBSCRIBE (QoS 1) to ``filters``; what the policy makes of the SUBACK."""
        granted = await client.subscribe([(topic, 1) for topic in filters])
        self.policy.subscribed(time.monotonic())  # the broker sends the retained hotlists of those granted now
        return self.policy.subscription_granted(filters, _suback_codes(granted))

    async def _resubscribe(self, client: ReasonedClient, again: Resubscribe | None) -> None:
        """Ask again for what the broker refused, after the policy's delay, until it is granted: the terminal
        publishes meanwhile, and without the ack topic its records would never leave the outbox."""
        while again is not None:
            await asyncio.sleep(again.delay)
            again = await self._subscribe(client, again.filters)

    async def _publish(self, client: ReasonedClient) -> None:
        while True:
            publication = self.policy.publication(await self._store(self.outbox.unacked, *self.policy.window()))
            if publication is not None:
                payload = publication.payload if self.signer is None else self.signer.seal(publication.payload)
                reason = await client.publish_for_reason(self.policy.txn_topic, payload, qos=1)
                match self.policy.acknowledged(publication, reason.value, time.monotonic()):
                    case Refuse(seqs, why):
                        await self._store(self.outbox.refuse, seqs, why)
                    case RetryAfter(delay):
                        await asyncio.sleep(delay)
                continue
            self._wake.clear()
            try:
                # not asyncio.wait_for: in Python 3.11 it loses a cancel that comes with the wake-up
                async with asyncio.timeout(self.policy.idle_wait):
                    await self._wake.wait()
            except TimeoutError:
                if self.policy.resend_due(time.monotonic()) and await self._store(self.outbox.queued) > 0:
                    self.policy.resend(time.monotonic())

    async def _receive(self, client: ReasonedClient) -> None:
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
        """Nothing waits in the outbox for the clearing's ack (records the broker refused wait for the operator)."""
        return self.policy.all_acked(self.outbox.queued())


def _speaks_no_mqtt5(error: BaseException) -> bool:
    """Whether a failed MQTT 5 connection attempt says that the broker does not speak MQTT 5: a CONNACK with
    "unsupported protocol version" (NATS), the connection closed before any CONNACK without a TLS alert, or no
    CONNACK at all within ``MQTT5_PROBE`` (aiomqtt's "Operation timed out")."""
    if isinstance(error, MqttConnectError):
        return getattr(error.rc, "value", error.rc) in (1, 0x84)  # 3.1.1 return code 1; MQTT 5 reason 0x84
    if isinstance(error, ConnectRefused):
        return tls_refusal(str(error)) is None
    return str(error) == "Operation timed out"


def _suback_codes(granted: tuple[int, ...] | list[ReasonCode]) -> list[int]:
    """aiomqtt's subscribe result as numbers: granted QoS (0-2) or, over MQTT 5, reason codes (0x80 up: refused)."""
    return [code if isinstance(code, int) else code.value for code in granted]
