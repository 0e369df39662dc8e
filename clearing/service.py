"""``clearing serve``: the MQTT side of a city's clearing. Receives terminal records and forwarded records,
hands them to the intake and the ledger in batches (one transaction per batch), and only after the commit
publishes the acks, the interop acks and the forwards. Unanswered forwards are sent again.

The loop never stops for bad input: every payload ends in the ledger or the quarantine. A database failure
leaves the batch unacked (the terminals send it again) and the service goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import aiomqtt
from sqlalchemy.exc import SQLAlchemyError

from clearing.intake import Intake, Topic
from clearing.ledger import Ledger, Outcome, Received
from terminals.messages import (
    TERMINAL_NO,
    Ack,
    Hotlist,
    InteropAck,
    InteropRejection,
    MessageError,
    Rejection,
    TxnRecord,
    ack_topic,
    batch_payload,
    hotlist_topic,
    interop_ack_topic,
    interop_txn_topic,
    parse_interop_ack,
)
from terminals.mqtt import BrokerUrl

log = logging.getLogger(__name__)
FORWARD_CHUNK = 200
HOTLIST_REFRESH = 1.0


@dataclass
class ClearingStats:
    """What the service has done since it started."""

    connected: bool = False
    connections: int = 0
    messages: int = 0
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    conflicts: int = 0
    acks: int = 0
    forwarded: int = 0
    interop_answers: int = 0
    batches: int = 0
    failed_batches: int = 0


async def publish_hotlist(client: aiomqtt.Client, ledger: Ledger) -> int:
    """Publish the city's hotlist from the database (retained, QoS 1); its version (0: none, nothing sent)."""
    version, cards = await ledger.hotlist_state()
    if version:
        message = Hotlist(schema="yikatong.hotlist/1", version=version, cards=cards)
        await client.publish(hotlist_topic(ledger.city), message.to_json(), qos=1, retain=True)
    return version


class ClearingService:
    """One clearing worker of one city. Run ``run()`` as a task (it reconnects until cancelled)."""

    def __init__(
        self,
        broker: BrokerUrl,
        ledger: Ledger,
        intake: Intake,
        *,
        shared: bool = False,
        worker: str = "1",
        batch: int = 500,
        forward_interval: float = 10.0,
        max_backoff: float = 10.0,
        persistent: bool = True,
    ) -> None:
        self.broker = broker
        self.ledger = ledger
        self.intake = intake
        self.city = ledger.city
        self.shared = shared
        self.identifier = f"yikatong-clearing-{self.city}-{worker}"
        self.batch = batch
        self.forward_interval = forward_interval
        self.max_backoff = max_backoff
        self.persistent = persistent
        self.stats = ClearingStats()
        prefix = f"$share/clearing-{self.city}/" if shared else ""
        self.subscriptions = [
            prefix + f"yikatong/{self.city}/txn/+",
            prefix + interop_txn_topic(self.city),
            prefix + interop_ack_topic(self.city),
        ]
        self._interop_ack = interop_ack_topic(self.city)
        self._hotlist_read: tuple[float, frozenset[str]] | None = None

    async def run(self) -> None:
        """Connect, subscribe, clear; reconnect with backoff whenever the broker goes away."""
        backoff = 0.2
        while True:
            try:
                # a shared-subscription worker keeps no session: the broker would go on queueing a share of the
                # city's records for a dead worker; the terminals resend what is not acked to the live ones
                clean = self.shared or not self.persistent
                client = self.broker.client(self.identifier, mqtt5=self.shared, clean_session=clean)
                async with client:
                    for topic in self.subscriptions:
                        await client.subscribe(topic, qos=1)
                    await publish_hotlist(client, self.ledger)
                    self.stats.connected, backoff = True, 0.2
                    self.stats.connections += 1
                    log.info("clearing %s connected to %s (%s)", self.city, self.broker, ", ".join(self.subscriptions))
                    queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
                    async with asyncio.TaskGroup() as tasks:
                        tasks.create_task(self._receive(client, queue))
                        tasks.create_task(self._process(client, queue))
                        tasks.create_task(self._reforward(client))
            except* aiomqtt.MqttError as group:
                log.warning("clearing %s: broker %s: %s; retrying", self.city, self.broker, group.exceptions[0])
                self.stats.connected = False
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    @staticmethod
    async def _receive(client: aiomqtt.Client, queue: asyncio.Queue[aiomqtt.Message]) -> None:
        async for message in client.messages:
            queue.put_nowait(message)

    async def _process(self, client: aiomqtt.Client, queue: asyncio.Queue[aiomqtt.Message]) -> None:
        while True:
            batch = [await queue.get()]
            while len(batch) < self.batch and not queue.empty():
                batch.append(queue.get_nowait())
            await self.handle(client, batch)

    async def handle(self, client: aiomqtt.Client, messages: list[aiomqtt.Message]) -> None:
        """Clear one batch of messages: verify, commit, then ack and forward."""
        self.stats.messages += len(messages)
        hotlist = await self._hotlist()
        received: list[Received] = []
        for message in messages:
            topic_name = message.topic.value
            payload = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
            if topic_name == self._interop_ack:
                await self._on_interop_ack(payload)
                continue
            topic = Topic.parse(topic_name, self.city)
            if topic is None:
                log.warning("message on unexpected topic %r ignored", topic_name)
                continue
            received.append(Received(topic_name, topic.terminal, self.intake.message(topic, payload, hotlist)))
        if not received:
            return
        try:
            outcome = await self.ledger.store(received)
        except SQLAlchemyError as err:
            self.stats.failed_batches += 1
            log.error(
                "clearing %s: batch of %d messages not stored (%s); they stay unacked", self.city, len(received), err
            )
            return
        self._count(outcome)
        await self._answer(client, outcome)

    async def _hotlist(self) -> frozenset[str]:
        """The hotlist, read again at most once a second (``hotlist add`` runs in another process)."""
        now = time.monotonic()
        if self._hotlist_read is None or now - self._hotlist_read[0] > HOTLIST_REFRESH:
            self._hotlist_read = (now, await self.ledger.hotlist())
        return self._hotlist_read[1]

    def _count(self, outcome: Outcome) -> None:
        self.stats.batches += 1
        self.stats.stored += outcome.stored
        self.stats.duplicates += outcome.duplicates
        self.stats.quarantined += outcome.quarantined
        self.stats.conflicts += outcome.conflicts

    async def _answer(self, client: aiomqtt.Client, outcome: Outcome) -> None:
        for ack in outcome.terminal_acks:
            if not TERMINAL_NO.match(ack.terminal):
                continue  # a topic no terminal can own: nobody to answer
            message = Ack(
                schema="yikatong.ack/1",
                terminal=ack.terminal,
                acked_through=ack.acked_through,
                rejected=[Rejection(seq=seq, reason=reason) for seq, reason in ack.rejected],
            )
            await client.publish(ack_topic(self.city, ack.terminal), message.to_json(), qos=1)
            self.stats.acks += 1
        for answer in outcome.interop_acks:
            interop = InteropAck(
                schema="yikatong.interop-ack/1",
                issuer=self.city,
                acked=answer.acked,
                rejected=[InteropRejection(record_id=r, reason=why) for r, why in answer.rejected],
            )
            await client.publish(interop_ack_topic(answer.acquirer), interop.to_json(), qos=1)
        await self._forward(client, outcome.to_forward)

    async def _forward(self, client: aiomqtt.Client, records: list[TxnRecord]) -> None:
        by_issuer: dict[str, list[str]] = defaultdict(list)
        for record in records:
            by_issuer[record.card.issuer].append(record.to_json())
        for issuer, docs in by_issuer.items():
            for start in range(0, len(docs), FORWARD_CHUNK):
                chunk = docs[start : start + FORWARD_CHUNK]
                await client.publish(interop_txn_topic(issuer), batch_payload(chunk), qos=1)
                self.stats.forwarded += len(chunk)

    async def _reforward(self, client: aiomqtt.Client) -> None:
        while True:
            await asyncio.sleep(self.forward_interval)
            try:
                pending = await self.ledger.pending_forwards(older_than=time.time() - self.forward_interval)
            except SQLAlchemyError as err:
                log.error("clearing %s: cannot read pending forwards: %s", self.city, err)
                continue
            if pending:
                log.info("clearing %s: %d forwarded records still unanswered; sending again", self.city, len(pending))
                await self._forward(client, pending)

    async def _on_interop_ack(self, payload: bytes) -> None:
        try:
            answer = parse_interop_ack(payload)
        except MessageError as err:
            log.warning("interop ack ignored: %s", err)
            return
        rejected = [(r.record_id, r.reason) for r in answer.rejected]
        try:
            await self.ledger.forward_done(answer.issuer, list(answer.acked), rejected)
        except SQLAlchemyError as err:
            log.error("clearing %s: interop ack from %s not recorded: %s", self.city, answer.issuer, err)
            return
        self.stats.interop_answers += 1
        for record_id, reason in rejected:
            log.warning("issuer %s rejected forwarded record %s: %s", answer.issuer, record_id, reason)
