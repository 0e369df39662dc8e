"""A city's records from a NATS JetStream stream, shared by the city's clearing workers on a NATS cluster.

NATS maps MQTT topics to its subjects (``/`` -> ``.``): a terminal's QoS 1 publish on ``yikatong/4530/txn/T``
is also a plain NATS message on ``yikatong.4530.txn.T``, which a stream on that subject captures. One stream per
city (``YIKATONG_4530``: the city's terminal subjects, and the interop subjects addressed to it), replicated on
the cluster's nodes, work-queue retention, and one durable pull consumer (``clearing-4530``) that every worker of
the city pulls from: each message goes to one worker, which acks it only after its database commit; a message a
dead worker fetched and never acked goes to another after ``ack_wait``.

What NATS 2.9 does not promise (its MQTT layer, read in the source; docs/cluster.md): the broker's PUBACK to a
terminal covers NATS's own MQTT store, not this stream's capture, which a stream leader's election can miss. That
is why a terminal keeps a record until the clearing's ack, not the PUBACK: a record the stream missed is sent
again (wire.md "Delivery guarantees"), and one redelivered is a duplicate in the ledger.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from clearing.defaults import ACK_WAIT
from terminals.messages import interop_ack_topic, interop_txn_topic, txn_topic

if TYPE_CHECKING:  # nats-py is imported by the workers that use it: the rest of the clearing starts without it
    from nats.aio.client import Client as Nats
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

log = logging.getLogger(__name__)
FETCH_WAIT = 1.0  # seconds a pull waits for a first message before it asks again
GATHER = 0.01  # seconds a pull then gathers what else comes (while a commit runs, the batch grows anyway)
RETRY = 0.5  # seconds between tries while the cluster elects a leader or a node comes back


def stream_name(city: str) -> str:
    """The city's stream."""
    return f"YIKATONG_{city}"


def consumer_name(city: str) -> str:
    """The durable consumer the city's workers share."""
    return f"clearing-{city}"


def subject(topic: str) -> str:
    """The NATS subject of an MQTT topic or filter (``/`` -> ``.``, ``+`` -> ``*``, ``#`` -> ``>``)."""
    return topic.replace("/", ".").replace("+", "*").replace("#", ">")


def topic(subject_name: str) -> str:
    """The MQTT topic of a NATS subject. Our subjects have no empty levels (which NATS 2.9 writes ``./`` and
    ``/.``): anything odd comes out odd, and the intake refuses its topic."""
    return subject_name.replace(".", "/")


def city_subjects(city: str) -> list[str]:
    """What the city's clearing takes in: its terminals' records, records forwarded to it, and answers to its
    own forwards."""
    return [subject(t) for t in (txn_topic(city, "+"), interop_txn_topic(city), interop_ack_topic(city))]


@dataclass(frozen=True)
class JetStreamSettings:
    """Where the cluster is and how the city's stream and consumer are made."""

    servers: tuple[str, ...]  # nats://host:port of the nodes (the client moves to another when one dies)
    ack_wait: float = ACK_WAIT  # seconds before a fetched, unacked message goes to another worker
    replicas: int = 3  # the stream's copies (one per node of a 3-node cluster)
    max_ack_pending: int = 20_000  # messages fetched and not acked, over all of the city's workers

    @classmethod
    def parse(cls, text: str, **settings: float | int) -> JetStreamSettings:
        """``nats://h:p[,nats://h:p...]``; a ValueError says what is wrong."""
        servers = tuple(s.strip() for s in text.split(",") if s.strip())
        if not servers:
            raise ValueError("--jetstream: give the nodes as nats://host:port[,nats://host:port...]")
        for server in servers:
            if not server.startswith(("nats://", "tls://")):
                raise ValueError(f"--jetstream: {server!r} is not a nats://host:port address")
        return cls(servers, **settings)  # type: ignore[arg-type]


@dataclass(eq=False)  # each one is itself (a set of the ones outstanding holds them by identity)
class Delivery:
    """One message pulled from the stream: its MQTT topic and payload, when it came, and its handle."""

    topic: str
    payload: bytes
    arrived: float
    message: Msg = field(repr=False)


class JetStreamSource:
    """The city's stream and shared consumer, as a source of batches for one worker. Call ``open`` once;
    ``fetch`` then pulls; ``ack`` after the commit, ``nak`` when the batch was not stored."""

    def __init__(self, city: str, settings: JetStreamSettings, worker: str) -> None:
        self.city = city
        self.settings = settings
        self.worker = worker
        self._nats: Nats | None = None
        self._js: JetStreamContext | None = None
        self._subscription: JetStreamContext.PullSubscription | None = None
        self._outstanding: set[Delivery] = set()  # fetched, neither acked nor nakked yet
        self.troubles = 0  # fetches that failed (no leader, node gone): counted, retried

    async def open(self) -> None:
        """Connect to the cluster (reconnecting for ever, to any node), make the stream and the consumer when
        they are missing, and bind this worker to the consumer."""
        import nats

        self._nats = await nats.connect(
            servers=list(self.settings.servers),
            name=f"yikatong-clearing-{self.city}-{self.worker}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=RETRY,
            connect_timeout=5,
            allow_reconnect=True,
        )
        self._js = self._nats.jetstream()
        while True:
            try:
                await self._ensure()
                break
            except Exception as err:  # no leader yet, a node just died: the cluster settles in seconds
                log.warning("clearing %s: stream %s not ready (%s); retrying", self.city, stream_name(self.city), err)
                await asyncio.sleep(RETRY)

    async def _ensure(self) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        js = self._require()
        name = stream_name(self.city)
        wanted = StreamConfig(
            name=name,
            subjects=city_subjects(self.city),
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
            num_replicas=self.settings.replicas,
        )
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            await js.add_stream(wanted)
        else:
            if sorted(info.config.subjects or []) != sorted(city_subjects(self.city)):
                await js.update_stream(wanted)
        durable = consumer_name(self.city)
        config = ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.settings.ack_wait,
            max_deliver=-1,
            max_ack_pending=self.settings.max_ack_pending,
        )
        try:
            await js.consumer_info(name, durable)
        except NotFoundError:
            await js.add_consumer(name, config)
        self._subscription = await js.pull_subscribe_bind(durable, stream=name)

    def _require(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("JetStreamSource.open() was not called")
        return self._js

    async def fetch(self, most: int) -> list[Delivery]:
        """Up to ``most`` messages: waits up to a second for the first, then ``GATHER`` seconds for more (one
        pull of ``most`` would wait its whole time for the batch to fill, holding a lone record that long); none
        when the cluster has none or cannot answer now (a node died, a leader is being elected: counted, and
        asked again)."""
        from nats.errors import Error as NatsError
        from nats.errors import TimeoutError as NatsTimeout

        if self._subscription is None:
            raise RuntimeError("JetStreamSource.open() was not called")
        messages: list[Msg] = []
        try:
            messages += await self._subscription.fetch(1, timeout=FETCH_WAIT)
            if most > 1:
                messages += await self._subscription.fetch(most - 1, timeout=GATHER)
        except (NatsTimeout, TimeoutError):
            pass
        except NatsError as err:
            self.troubles += 1
            log.debug("clearing %s: pull failed (%s); again", self.city, err)
            if not messages:
                await asyncio.sleep(RETRY)
        now = time.monotonic()
        deliveries = [Delivery(topic(m.subject), m.data, now, m) for m in messages]
        self._outstanding.update(deliveries)
        return deliveries

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        """Done with these (their batch is committed): the stream forgets them. An ack lost on the way only
        brings the message again, to be acked as a duplicate."""
        await self._settle(deliveries, done=True)

    async def nak(self, deliveries: Sequence[Delivery]) -> None:
        """Not stored (the database failed): give them to a worker again now, not after ``ack_wait``."""
        await self._settle(deliveries, done=False)

    async def release(self) -> None:
        """Nak everything fetched and not yet settled: this worker lost its MQTT connection (it cannot answer
        them) or stops, so another worker takes them now rather than after ``ack_wait``. One whose commit was
        under way may come again: a duplicate, acked as such."""
        await self._settle(list(self._outstanding), done=False)

    async def _settle(self, deliveries: Sequence[Delivery], *, done: bool) -> None:
        from nats.errors import Error as NatsError

        self._outstanding.difference_update(deliveries)
        for delivery in deliveries:
            try:
                await (delivery.message.ack() if done else delivery.message.nak())
            except NatsError as err:  # the connection is down: the message comes again after ack_wait
                log.debug("clearing %s: %s not sent (%s)", self.city, "ack" if done else "nak", err)

    async def pending(self) -> int | None:
        """Messages in the stream no worker has taken yet (None when the cluster cannot say now)."""
        try:
            info = await self._require().consumer_info(stream_name(self.city), consumer_name(self.city))
        except Exception as err:  # only for the health message: never worth stopping for
            log.debug("clearing %s: consumer info: %s", self.city, err)
            return None
        return int(info.num_pending or 0)

    async def close(self) -> None:
        """Leave the cluster (what was fetched and not acked goes to another worker after ``ack_wait``)."""
        if self._nats is not None:
            try:
                await self._nats.close()
            except Exception as err:  # closing a connection to a dead node: nothing left to save
                log.debug("clearing %s: closing the NATS connection: %s", self.city, err)
            self._nats = None
