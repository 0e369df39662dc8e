"""``clearing serve``: the MQTT side of a city's clearing. Receives terminal records and forwarded records,
hands them to the intake and the ledger in batches (one transaction per batch), and only after the commit
publishes the acks, the interop acks and the forwards. Unanswered forwards are sent again.

Two stages: while a batch commits, what arrives meanwhile is taken from MQTT and verified (a big batch's checks
in a worker thread, so the event loop goes on receiving and answering), gathering into the next batch, which the
commit stage takes whole when it is done; each batch's acks wait for its own commit.

The loop never stops for bad input: every payload ends in the ledger or the quarantine (or is counted, past a
sender's daily quarantine cap), whatever it raises. A database failure leaves the batch unacked (the terminals
send it again) and the service goes on. A task that dies of anything else ends ``run`` with the error: the
process exits and its supervisor restarts it, never a half-alive service.

Backpressure: one queue between MQTT and the database writer, aiomqtt's own (the writer takes whole batches from
it), holds at most ``MAX_BACKLOG_MESSAGES`` messages and ``max_backlog_bytes``; past that a message is dropped
and counted. Dropping is safe: a terminal resends every record until the clearing's ack covers it, an acquirer
resends unanswered forwards, and an issuer answers a forward again when it comes again.

On a NATS cluster (``source``: clearing/jetstream.py) the records are pulled from the city's JetStream stream
instead, as many as the next batch has room for, and each is acked to the stream after its batch's commit (nakked
when the database failed it, or when the MQTT connection that carries the answers is lost).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiomqtt
from sqlalchemy.exc import SQLAlchemyError

from clearing.defaults import HEALTH_EVERY
from clearing.hotlist import publish_hotlist
from clearing.intake import Intake, Refused, Topic, unexpected
from clearing.jetstream import Delivery, JetStreamSource
from clearing.ledger import Ledger, Outcome, Received, TerminalAck, database_trouble
from clearing.metrics import ClearingMetrics, Counts
from clearing.now_and_then import warn_now_and_then
from terminals.messages import (
    ACK_SCHEMA,
    CHINA,
    HEALTH_SCHEMA,
    INTEROP_ACK_SCHEMA,
    TERMINAL_NO,
    Ack,
    Health,
    InteropAck,
    InteropRejection,
    MessageError,
    Rejection,
    TxnRecord,
    ack_topic,
    batch_payload,
    health_topic,
    interop_ack_topic,
    interop_txn_topic,
    parse_interop_ack,
    txn_topic,
)
from terminals.mqtt import BrokerUrl, LinkStats, stop_if_cancelled

log = logging.getLogger(__name__)
# aiomqtt logs every dropped message; the service counts them and logs a summary instead
_QUIET_DROPS = logging.getLogger("clearing.mqtt")
_QUIET_DROPS.setLevel(logging.ERROR)
FORWARD_CHUNK = 200
HOTLIST_REFRESH = 1.0
MAX_BACKLOG_BYTES = 32 * 1024 * 1024
MAX_UNCONFIRMED = 1000  # answers published and not yet confirmed by the broker
MAX_BACKLOG_MESSAGES = 10_000  # a small message costs ~1 KiB of Python objects: bound the count too
CATCH_UP = 0.05  # seconds before terminals acked up to a gap are acked again (another worker filled it meanwhile)
FINISH_COMMIT = 30.0  # seconds a commit under way may take to finish when its task is cancelled
OFFLOAD_BYTES = 32 * 1024  # payload bytes of a batch from which its checks pay a worker thread's hand-over


@dataclass
class ClearingStats(LinkStats):
    """What the service has done since it started."""

    messages: int = 0
    records: int = 0  # records taken from MQTT (a message that is no record list counts one)
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    conflicts: int = 0
    acks: int = 0
    forwarded: int = 0
    interop_answers: int = 0
    batches: int = 0
    failed_batches: int = 0
    dropped: int = 0  # received while the backlog was full (the senders resend them)
    quarantine_overflow: int = 0  # refused past a sender's daily quarantine cap (counted only)
    poisoned: int = 0  # messages that raised while being stored (quarantined whole)
    unconfirmed: int = 0  # answers the broker never confirmed (their receivers ask again)
    last_commit: float | None = None  # epoch seconds


class IncomingQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's queue of received messages, bounded by their payload bytes as well as their number: a message
    that would pass ``limit`` is refused (``QueueFull``: aiomqtt drops it) and ``on_drop`` is called. It notes
    when each message arrived (``taken`` hands those times over, in the order the messages were taken)."""

    def __init__(self, maxsize: int = 0, *, limit: int, on_drop: Callable[[], None]) -> None:
        super().__init__(maxsize)
        self.limit = limit
        self.bytes = 0
        self._on_drop = on_drop
        self._arrivals: deque[float] = deque()
        self._taken: list[float] = []

    def put_nowait(self, item: aiomqtt.Message) -> None:
        """Queue a message, or refuse it when the queue is full in number or bytes (one message always fits)."""
        size = _size(item)
        if self.full() or (self.bytes + size > self.limit and not self.empty()):
            self._on_drop()
            raise asyncio.QueueFull
        super().put_nowait(item)
        self.bytes += size
        self._arrivals.append(time.monotonic())

    def get_nowait(self) -> aiomqtt.Message:
        """The oldest message."""
        item = super().get_nowait()
        self.bytes -= _size(item)
        self._taken.append(self._arrivals.popleft())
        return item

    def taken(self) -> list[float]:
        """When each message taken since the last call arrived (``time.monotonic``), in the order taken."""
        times, self._taken = self._taken, []
        return times


@dataclass
class _Verified:
    """A batch of messages verified and waiting for its commit, with when each arrived."""

    received: list[Received] = field(default_factory=list)
    arrived: list[float] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)  # from a JetStream stream: acked after the commit
    failed: bool = False  # not verified (the hotlist could not be read): nothing of it may be acked


class _Handover:
    """The verified messages waiting for the commit stage, at most ``most`` of them. The taking stage adds to
    them while a commit runs, so the next commit gets all that arrived meanwhile (not just what came first)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self._ready = _Verified()
        self._changed = asyncio.Condition()

    def room(self) -> int:
        """How many more messages the waiting batch may take."""
        return self.most - len(self._ready.received)

    async def until_room(self) -> None:
        """Wait until the waiting batch may take more."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.room() > 0)

    async def add(self, verified: _Verified) -> None:
        """Add verified messages to the waiting batch."""
        async with self._changed:
            self._ready.received += verified.received
            self._ready.arrived += verified.arrived
            self._ready.deliveries += verified.deliveries
            self._changed.notify_all()

    async def take(self) -> _Verified:
        """The waiting batch, once it holds a message."""
        async with self._changed:
            await self._changed.wait_for(lambda: bool(self._ready.received))
            batch, self._ready = self._ready, _Verified()
            self._changed.notify_all()
            return batch


def _topic_payload(message: aiomqtt.Message) -> tuple[str, bytes]:
    payload = message.payload
    return message.topic.value, payload if isinstance(payload, bytes) else str(payload).encode()


def _size(message: aiomqtt.Message) -> int:
    return len(message.payload) if isinstance(message.payload, bytes | bytearray | str) else 0


def _iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, CHINA).isoformat(timespec="seconds")


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
        session_expiry: int | None = None,
        health_every: float = HEALTH_EVERY,
        max_backlog_bytes: int = MAX_BACKLOG_BYTES,
        terminal_topics: Sequence[str] | None = None,
        source: JetStreamSource | None = None,
    ) -> None:
        self.broker = broker
        self.ledger = ledger
        self.intake = intake
        self.city = ledger.city
        self.shared = shared
        self.worker = worker
        self.identifier = f"yikatong-clearing-{self.city}-{worker}"
        self.health_every = health_every
        self.max_backlog_bytes = max_backlog_bytes
        self._incoming: IncomingQueue | None = None
        self._unanswered = 0
        self._unconfirmed: set[asyncio.Task[None]] = set()
        self.batch = batch
        self.forward_interval = forward_interval
        self.max_backoff = max_backoff
        self.persistent = persistent
        self.session_expiry = session_expiry  # seconds: MQTT 5, the broker forgets the session that long after
        self.stats = ClearingStats()
        self.metrics = ClearingMetrics(self.city, self._counts)
        # on a NATS cluster the records come from the city's JetStream stream; MQTT then only carries the answers
        self.source = source
        self._pending: int | None = None  # the stream's messages no worker has taken (JetStream only)
        self._behind: dict[str, int] = {}  # terminal -> first seq not acked, whose ack stopped below a gap
        prefix = f"$share/clearing-{self.city}/" if shared else ""
        # ``terminal_topics`` narrows the terminal side to those topics (the demo shares a broker with others)
        terminal_side = terminal_topics if terminal_topics is not None else [txn_topic(self.city, "+")]
        self.subscriptions = (
            []
            if source is not None
            else [
                *(prefix + topic for topic in terminal_side),
                prefix + interop_txn_topic(self.city),
                prefix + interop_ack_topic(self.city),
            ]
        )
        self._interop_ack = interop_ack_topic(self.city)
        self._hotlist_read: tuple[float, int, frozenset[str]] | None = None  # (when, version, cards)

    async def run(self) -> None:
        """Connect, subscribe, clear; reconnect with backoff whenever the broker goes away. Another error of
        any of its tasks ends it (raised): the caller exits so that a supervisor restarts the service. With a
        JetStream ``source`` the records come from it (its NATS connection moves between nodes by itself) and
        MQTT only carries the answers."""
        if self.source is None:
            await self._run()
            return
        await self.source.open()
        try:
            await self._run()
        finally:
            await self.source.close()

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                # a shared-subscription worker keeps no session: the broker would go on queueing a share of the
                # city's records for a dead worker; the terminals resend what is not acked to the live ones. A
                # JetStream worker subscribes to nothing over MQTT: no session to keep either
                clean = self.shared or not self.persistent or self.source is not None
                client = self.broker.client(
                    self.identifier,
                    mqtt5=(self.shared or self.session_expiry is not None) and self.source is None,
                    clean_session=clean,
                    **({} if self.session_expiry is None else {"session_expiry": self.session_expiry}),
                    queue_type=self._incoming_queue,
                    max_queued_incoming_messages=MAX_BACKLOG_MESSAGES,
                    logger=_QUIET_DROPS,
                )
                async with client:
                    for topic in self.subscriptions:
                        await client.subscribe(topic, qos=1)
                    # the broker may have lost its retained copy (a restart without persistence): send it all
                    published = await publish_hotlist(client, self.ledger, restore=True)
                    if published.version:
                        log.info("clearing %s: hotlist version %d published", self.city, published.version)
                    self.stats.connected, backoff = True, 0.2
                    self.stats.connections += 1
                    takes = ", ".join(self.subscriptions) or f"records from the JetStream stream of {self.city}"
                    log.info("clearing %s connected to %s (%s)", self.city, self.broker, takes)
                    verified = _Handover(self.batch)
                    async with asyncio.TaskGroup() as tasks:
                        if self.source is None:
                            tasks.create_task(self._take(client, verified))
                        else:
                            tasks.create_task(self._pull(self.source, verified))
                            tasks.create_task(self._watch(client))
                        tasks.create_task(self._commit(client, verified))
                        tasks.create_task(self._reforward(client))
                        tasks.create_task(self._catch_up(client))
                        tasks.create_task(self._health(client))
            except* aiomqtt.MqttError as group:
                stop_if_cancelled(group)
                log.warning("clearing %s: broker %s: %s; retrying", self.city, self.broker, group.exceptions[0])
                self.stats.connected = False
            finally:  # answers still in flight on the old connection are lost; their receivers ask again
                for task in list(self._unconfirmed):
                    task.cancel()
                if self.source is not None:  # what it took and cannot answer now goes to another worker at once
                    await self.source.release()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.max_backoff)

    def _incoming_queue(self, maxsize: int = 0) -> IncomingQueue:
        """aiomqtt's queue type: bounded by bytes, drops counted."""
        self._incoming = IncomingQueue(maxsize, limit=self.max_backlog_bytes, on_drop=self._dropped)
        return self._incoming

    def _dropped(self) -> None:
        self.stats.dropped += 1
        warn_now_and_then(
            log,
            self.stats.dropped,
            "clearing %s: backlog full (database behind): %d messages dropped so far; their senders resend them",
            self.city,
            self.stats.dropped,
        )

    @property
    def backlog(self) -> int:
        """Messages received and not yet taken into a batch; on JetStream, those in the city's stream that no
        worker has taken yet (as of the last health message)."""
        if self.source is not None:
            return self._pending or 0
        return self._incoming.qsize() if self._incoming is not None else 0

    def _counts(self) -> Counts:
        stats = self.stats
        return Counts(
            stats.records, stats.stored, stats.quarantined, stats.forwarded, self.backlog, self.ledger.bulk_fallbacks
        )

    async def _take(self, client: aiomqtt.Client, verified: _Handover) -> None:
        """Take batches from aiomqtt's queue: the first message through its iterator (which raises when the
        connection is lost), the rest of the batch straight from the queue in the same turn of the event loop,
        however hard the broker pushes (a reader task moving one message per turn starved the writer). Each is
        verified while the one before commits, and joins the batch waiting for the commit stage."""
        incoming = self._incoming
        if incoming is None:
            raise RuntimeError("the MQTT client was made without the clearing's incoming queue")
        messages = client.messages
        while True:
            await verified.until_room()
            batch = [await anext(messages)]
            while len(batch) < verified.room() and not incoming.empty():
                batch.append(incoming.get_nowait())
            ready = await self._verify([_topic_payload(m) for m in batch], incoming.taken())
            if ready.received:
                await verified.add(ready)

    async def _pull(self, source: JetStreamSource, verified: _Handover) -> None:
        """Take batches from the city's JetStream stream, as many as the waiting batch has room for (the
        stream keeps the rest: backpressure without dropping). A batch that needs no commit (answers to
        forwards, recorded as they are read; topics nobody serves) is acked at once."""
        while True:
            await verified.until_room()
            deliveries = await source.fetch(verified.room())
            if not deliveries:
                continue
            ready = await self._verify([(d.topic, d.payload) for d in deliveries], [d.arrived for d in deliveries])
            ready.deliveries = deliveries
            if ready.failed:
                await source.nak(deliveries)
            elif ready.received:
                await verified.add(ready)
            else:
                await source.ack(deliveries)

    async def _watch(self, client: aiomqtt.Client) -> None:
        """Raise when the MQTT connection that carries the answers is lost (nothing arrives on it: a JetStream
        worker subscribes to nothing), so that ``run`` connects again."""
        async for message in client.messages:
            log.debug("clearing %s: unexpected MQTT message on %s ignored", self.city, message.topic.value)

    async def _verify(self, messages: list[tuple[str, bytes]], arrived: list[float]) -> _Verified:
        """The verdicts on a batch of messages, each its topic and payload (none, marked failed, when the
        hotlist cannot be read: the batch stays unacked). Bad input costs only its own message."""
        self.stats.messages += len(messages)
        try:
            hotlist = await self._hotlist()
        except SQLAlchemyError as err:
            self.stats.failed_batches += 1
            log.error("clearing %s: hotlist not readable (%s); %d messages stay unacked", self.city, err, len(messages))
            return _Verified(failed=True)
        ready = _Verified()
        to_check: list[tuple[Topic, bytes]] = []
        places: list[int] = []  # where each message to check sits in ready.received
        for (topic_name, payload), when in zip(messages, arrived, strict=True):
            if topic_name == self._interop_ack:
                refusal = await self._on_interop_ack(payload)
                if refusal is not None:  # junk on the interop ack topic is quarantined like any other
                    ready.received.append(Received(topic_name, None, [refusal], payload))
                    ready.arrived.append(when)
                continue
            topic = Topic.parse(topic_name, self.city)
            if topic is None:
                log.warning("message on unexpected topic %r ignored", topic_name)
                continue
            places.append(len(ready.received))
            to_check.append((topic, payload))
            ready.received.append(Received(topic_name, topic.terminal, [], payload))
            ready.arrived.append(when)
        if to_check:
            # a big batch is checked off the event loop (MQTT keeps flowing, the previous batch's commit goes on);
            # the TACs on it: the issuer host's cipher contexts are not thread-safe, and a process's clearings may
            # share a host
            if sum(len(payload) for _, payload in to_check) >= OFFLOAD_BYTES:
                checked = await asyncio.to_thread(self.intake.check, to_check, hotlist)
            else:
                checked = self.intake.check(to_check, hotlist)
            verdicts = self.intake.verify(checked)
            for index, message_verdicts in zip(places, verdicts, strict=True):
                ready.received[index].verdicts = message_verdicts
        self.stats.records += sum(len(r.verdicts) for r in ready.received)
        return ready

    async def _commit(self, client: aiomqtt.Client, verified: _Handover) -> None:
        """Commit each verified batch, then ack and forward. A commit under way is not cancelled with this task
        (the broker went away, or the service stops): it finishes and is counted first (at most
        ``FINISH_COMMIT`` seconds waited for), its answers lost with the connection (their senders resend, and
        are acked as duplicates). Cancelling a driver mid-transaction is fragile, and a commit the database made
        after its task was cancelled would never be counted."""
        while True:
            batch = await verified.take()
            storing = asyncio.create_task(self._store(batch))
            try:
                outcome = await asyncio.shield(storing)
            except asyncio.CancelledError:
                done, _ = await asyncio.wait({storing}, timeout=FINISH_COMMIT)
                if done:
                    storing.result()  # a bug it raised goes to the supervisor as it would have
                raise
            if outcome is None:
                if self.source is not None:
                    await self.source.nak(batch.deliveries)
                continue
            await self._answer(client, outcome)
            if self.source is not None:
                await self.source.ack(batch.deliveries)
            answered = time.monotonic()
            for when in batch.arrived:
                self.metrics.ack_lag.observe(answered - when)

    async def _store(self, batch: _Verified) -> Outcome | None:
        """Store a batch and count what it did; None when the database failed it (it stays unacked: the senders
        resend it)."""
        started = time.perf_counter()
        try:
            outcome = await self.ledger.store(batch.received)
        except Exception as err:
            if not database_trouble(err):
                raise  # ledger.store isolates the data's faults: anything else is a bug, for the supervisor
            self.stats.failed_batches += 1
            log.error(
                "clearing %s: batch of %d messages not stored (%s); they stay unacked",
                self.city,
                len(batch.received),
                err,
            )
            return None
        self.metrics.commit_seconds.observe(time.perf_counter() - started)
        self.stats.last_commit = time.time()
        self._count(outcome)
        return outcome

    async def _health(self, client: aiomqtt.Client) -> None:
        """Publish the retained health message every ``health_every`` seconds, whatever the database does."""
        while True:
            try:
                # not asyncio.wait_for: in Python 3.11 it loses a cancel that comes with the count
                async with asyncio.timeout(max(1.0, self.health_every / 2)):
                    self._unanswered = await self.ledger.count_pending_forwards()
                    if self.source is not None:
                        self._pending = await self.source.pending()
            except (SQLAlchemyError, TimeoutError) as err:
                log.debug("clearing %s: pending forwards not counted for the health message: %s", self.city, err)
            await self._send(client, health_topic(self.city), self.health().to_json(), retain=True)
            await asyncio.sleep(self.health_every)

    def health(self) -> Health:
        """The health message as of now."""
        stats = self.stats
        return Health(
            schema=HEALTH_SCHEMA,
            city=self.city,
            worker=self.worker,
            time=_iso(time.time()),
            last_commit=_iso(stats.last_commit) if stats.last_commit is not None else None,
            backlog=self.backlog,
            stored=stats.stored,
            quarantined=stats.quarantined,
            forwarded_unanswered=self._unanswered,
            dropped=stats.dropped,
            quarantine_overflow=stats.quarantine_overflow,
        )

    async def _hotlist(self) -> frozenset[str]:
        """The hotlist: its version checked at most once a second (``hotlist add`` runs in another process), its
        cards read again only when the version moved (a province list is large)."""
        now = time.monotonic()
        read = self._hotlist_read
        if read is None or now - read[0] > HOTLIST_REFRESH:
            version = (await self.ledger.hotlist_head()).version
            cards = read[2] if read is not None and read[1] == version else await self.ledger.hotlist()
            self._hotlist_read = read = (now, version, cards)
        return read[2]

    def _count(self, outcome: Outcome) -> None:
        self.stats.batches += 1
        self.stats.stored += outcome.stored
        self.stats.duplicates += outcome.duplicates
        self.stats.quarantined += outcome.quarantined
        self.stats.conflicts += outcome.conflicts
        self.stats.quarantine_overflow += outcome.dropped
        self.stats.poisoned += outcome.poisoned

    async def _answer(self, client: aiomqtt.Client, outcome: Outcome) -> None:
        await self._ack_terminals(client, outcome.terminal_acks)
        for ack in outcome.terminal_acks:
            if ack.behind and TERMINAL_NO.match(ack.terminal):
                first = ack.acked_through + 1
                self._behind[ack.terminal] = min(self._behind.get(ack.terminal, first), first)
        for answer in outcome.interop_answers:
            interop = InteropAck(
                schema=INTEROP_ACK_SCHEMA,
                issuer=self.city,
                acked=answer.acked,
                rejected=[InteropRejection(record_id=r, reason=why) for r, why in answer.rejected],
            )
            await self._send(client, interop_ack_topic(answer.acquirer), interop.to_json())
        await self._forward(client, outcome.to_forward)

    async def _catch_up(self, client: aiomqtt.Client) -> None:
        """Ack again, a moment later, the terminals whose ack stopped below a gap: with several workers, the
        records in the gap were being committed by another worker, unseen by this one's transaction (each worker
        acks what its own commit can see); without this they would wait for the terminal's resend."""
        while True:
            await asyncio.sleep(CATCH_UP)
            if not self._behind:
                continue
            behind, self._behind = self._behind, {}
            try:
                acks = await self.ledger.catch_up(behind)
            except SQLAlchemyError as err:  # the terminals resend and are acked then
                log.debug("clearing %s: catch-up acks not read: %s", self.city, err)
                continue
            await self._ack_terminals(client, [a for a in acks if a.acked_through >= behind[a.terminal]])

    async def _ack_terminals(self, client: aiomqtt.Client, acks: Sequence[TerminalAck]) -> None:
        for ack in acks:
            if not TERMINAL_NO.match(ack.terminal):
                continue  # a topic no terminal can own: nobody to answer
            message = Ack(
                schema=ACK_SCHEMA,
                terminal=ack.terminal,
                acked_through=ack.acked_through,
                rejected=[Rejection(seq=seq, reason=reason) for seq, reason in ack.rejected],
            )
            await self._send(client, ack_topic(self.city, ack.terminal), message.to_json())
            self.stats.acks += 1

    async def _send(self, client: aiomqtt.Client, topic: str, payload: str, *, retain: bool = False) -> None:
        """Publish an answer (QoS 1) without waiting for the broker's PUBACK: under a flood that PUBACK queues
        behind every message the broker is pushing to us, and waiting for it would stall the writer. An answer
        the broker never confirms is safe to lose: terminals resend what is not acked (and are acked again),
        acquirers resend unanswered forwards, unanswered forwards are sent again, the health message comes again
        in a few seconds. At most ``MAX_UNCONFIRMED`` answers are in flight; past that, the writer waits."""
        while len(self._unconfirmed) >= MAX_UNCONFIRMED:
            await asyncio.wait(self._unconfirmed, return_when=asyncio.FIRST_COMPLETED)
        task = asyncio.create_task(client.publish(topic, payload, qos=1, retain=retain))
        self._unconfirmed.add(task)
        task.add_done_callback(self._confirmed)

    def _confirmed(self, task: asyncio.Task[None]) -> None:
        self._unconfirmed.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.stats.unconfirmed += 1
            warn_now_and_then(
                log,
                self.stats.unconfirmed,
                "clearing %s: %d answers not confirmed by the broker so far (%s); their receivers ask again",
                self.city,
                self.stats.unconfirmed,
                task.exception(),
            )

    async def _forward(self, client: aiomqtt.Client, records: list[TxnRecord]) -> None:
        by_issuer: dict[str, list[str]] = defaultdict(list)
        for record in records:
            by_issuer[record.card.issuer].append(record.to_json())
        for issuer, docs in by_issuer.items():
            for start in range(0, len(docs), FORWARD_CHUNK):
                chunk = docs[start : start + FORWARD_CHUNK]
                await self._send(client, interop_txn_topic(issuer), batch_payload(chunk))
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

    async def _on_interop_ack(self, payload: bytes) -> Refused | None:
        """Record an issuer city's answer; a payload that is no answer comes back refused (for the quarantine)."""
        try:
            answer = parse_interop_ack(payload, self.intake.limits)
        except MessageError as err:
            return Refused(f"interop ack: {err}", payload)
        except Exception as err:  # isolation: an unforeseen parser error costs this message alone
            return Refused(unexpected("decoding an interop ack", err), payload)
        rejected = [(r.record_id, r.reason) for r in answer.rejected]
        try:
            await self.ledger.forward_done(answer.issuer, list(answer.acked), rejected)
        except Exception as err:  # the forwards stay pending and are sent again: the issuer answers again
            log.error("clearing %s: interop ack from %s not recorded: %s", self.city, answer.issuer, err)
            return None
        self.stats.interop_answers += 1
        for record_id, reason in rejected:
            log.warning("issuer %s rejected forwarded record %s: %s", answer.issuer, record_id, reason)
        return None
