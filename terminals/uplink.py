"""The terminal's uplink: publish the outbox over MQTT (QoS 1, persistent session), drop records only when the
clearing's ack covers them, and keep the retained hotlist.

The broker's PUBACK only says the broker has the message; the record stays in the outbox until an ack from the
clearing. Records not acked within ``ack_timeout`` of the last traffic are sent again (the same bytes, the same
seq): the clearing stores each record once and acks duplicates again. Lost connections are retried with
backoff for as long as it takes; everything published while offline just waits in the outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import aiomqtt

from terminals.messages import MessageError, ack_topic, batch_payload, hotlist_topic, parse_ack, txn_topic
from terminals.mqtt import BrokerUrl
from terminals.outbox import RecordQueue

log = logging.getLogger(__name__)


@dataclass
class UplinkStats:
    """What the uplink has done so far (published counts resends too)."""

    connected: bool = False
    connections: int = 0
    published: int = 0
    resends: int = 0
    acked: int = 0
    rejected: int = 0
    last_error: str | None = None


class Sender(Protocol):
    """What the uplink needs of a terminal: its city, number, outbox and a taker for hotlists (a ``Terminal``,
    or a simulated terminal of the load generator)."""

    @property
    def city(self) -> str: ...
    @property
    def terminal_hex(self) -> str: ...
    @property
    def outbox(self) -> RecordQueue: ...
    def offer_hotlist(self, payload: bytes | str) -> bool: ...


class Uplink:
    """Publishes one terminal's outbox. Run ``run()`` as a task; ``notify()`` (from any thread) when a record
    was added, so it goes out at once."""

    def __init__(
        self,
        broker: BrokerUrl,
        terminal: Sender,
        *,
        batch: int = 100,
        ack_timeout: float = 10.0,
        max_backoff: float = 10.0,
        session_expiry: int | None = None,
    ) -> None:
        self.broker = broker
        self.terminal = terminal
        self.outbox = terminal.outbox
        city, number = terminal.city, terminal.terminal_hex
        self.number = number
        self.txn_topic = txn_topic(city, number)
        self.ack_topic = ack_topic(city, number)
        self.hotlist_topic = hotlist_topic(city)
        self.batch = batch
        self.ack_timeout = ack_timeout
        self.max_backoff = max_backoff
        # None: an MQTT 3.1.1 session that never expires (a real terminal's: the acks queued while it is offline
        # wait for it however long that is); seconds: MQTT 5, the broker drops the session that long after the
        # terminal went away (the load generator's terminals, which must leave nothing on a shared broker)
        self.session_expiry = session_expiry
        self.stats = UplinkStats()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sent_through = 0
        self._published_max = 0  # the highest seq this uplink has ever published (only grows)
        self._last_traffic = time.monotonic()

    def notify(self) -> None:
        """A record was added to the outbox (thread-safe)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._wake.set)

    async def run(self) -> None:
        """Connect, publish and listen until cancelled; reconnect with backoff whenever the broker goes away."""
        self._loop = asyncio.get_running_loop()
        backoff = 0.2
        while True:
            try:
                async with self._client() as client:
                    self.stats.connected, backoff = True, 0.2
                    self.stats.connections += 1
                    log.info("uplink connected to %s", self.broker)
                    await client.subscribe(self.ack_topic, qos=1)
                    await client.subscribe(self.hotlist_topic, qos=1)
                    self._sent_through = 0  # a new connection: send everything not yet acked
                    async with asyncio.TaskGroup() as tasks:
                        tasks.create_task(self._publish(client))
                        tasks.create_task(self._receive(client))
            except* aiomqtt.MqttError as group:
                error = group.exceptions[0]
                if self.stats.connected or self.stats.last_error != str(error):
                    log.warning("uplink to %s: %s; retrying", self.broker, error)
                self.stats.connected, self.stats.last_error = False, str(error)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    def _client(self) -> aiomqtt.Client:
        identifier = f"yikatong-terminal-{self.number}"
        if self.session_expiry is None:
            return self.broker.client(identifier)
        return self.broker.client(identifier, mqtt5=True, session_expiry=self.session_expiry)

    async def _publish(self, client: aiomqtt.Client) -> None:
        while True:
            rows = self.outbox.unacked(self._sent_through, self.batch)
            if rows:
                payload = rows[0][1] if len(rows) == 1 else batch_payload([record for _, record in rows])
                await client.publish(self.txn_topic, payload, qos=1)
                self._sent_through = rows[-1][0]
                self._published_max = max(self._published_max, self._sent_through)
                self.stats.published += len(rows)
                self._last_traffic = time.monotonic()
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.ack_timeout / 2)
            except TimeoutError:
                quiet = time.monotonic() - self._last_traffic
                if quiet >= self.ack_timeout and self.outbox.queued():
                    log.info("no ack for %.0f s: sending the unacked records again", quiet)
                    self.stats.resends += 1
                    self._sent_through = 0

    async def _receive(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            raw = message.payload
            payload = bytes(raw) if isinstance(raw, bytes | bytearray) else str(raw)
            if message.topic.value == self.ack_topic:
                self._on_ack(payload)
            elif message.topic.value == self.hotlist_topic:
                self.terminal.offer_hotlist(payload)

    def _on_ack(self, payload: bytes | str) -> None:
        try:
            ack = parse_ack(payload)
        except MessageError as err:
            log.warning("ack ignored: %s", err)
            return
        if ack.terminal != self.number:
            log.warning("ack for terminal %s ignored (this is %s)", ack.terminal, self.number)
            return
        if ack.acked_through > self._published_max:
            # an ack for records this terminal never sent (a forged seq on its topic, or a confused clearing):
            # dropping them would lose them, so the ack counts only up to what was really published
            log.warning(
                "ack through %d beyond the records sent (%d): counted up to %d",
                *(ack.acked_through, self._published_max, self._published_max),
            )
            ack = ack.model_copy(update={"acked_through": self._published_max})
        acked, rejected = self.outbox.apply_ack(ack)
        self.stats.acked += acked
        self.stats.rejected += rejected
        for rejection in ack.rejected:
            log.warning("record %d rejected by the clearing: %s", rejection.seq, rejection.reason)
        self._sent_through = max(self._sent_through, ack.acked_through)
        self._last_traffic = time.monotonic()
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

    def all_published(self) -> bool:
        """Every record in the outbox has reached the broker (PUBACK) at least once on this connection."""
        newest = self.outbox.unacked(self._sent_through, 1)
        return self.stats.connected and not newest

    def all_acked(self) -> bool:
        """The outbox is empty: the clearing has acked everything."""
        return self.outbox.queued() == 0
