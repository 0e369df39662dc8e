"""The uplink's decisions without I/O: which records to publish next and how to batch them, when to send the
unacked ones again, what an ack from the clearing may drop, how long to wait before reconnecting, and what the
uplink has done so far.

``UplinkPolicy`` is fed events (connected, connection lost, published, a message on a subscribed topic, an ack
applied to the outbox, time passing) and answers with what to do; it never touches the network, the outbox or
a clock (``now`` is passed in), so every rule can be tested with fake time. ``terminals.uplink`` carries its
answers out over aiomqtt.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from terminals.messages import Ack, MessageError, ack_topic, batch_payload, hotlist_issuer, parse_ack, txn_topic
from terminals.mqtt import LinkStats

log = logging.getLogger(__name__)

FIRST_BACKOFF = 0.2  # seconds before the first reconnect; doubled after each failure up to max_backoff


@dataclass
class UplinkStats(LinkStats):
    """What the uplink has done so far (published counts resends too)."""

    published: int = 0
    resends: int = 0
    acked: int = 0
    rejected: int = 0
    last_error: str | None = None


@dataclass(frozen=True)
class Publication:
    """One message to publish: a single record as stored, or several as one batch."""

    payload: str
    through: int  # the highest seq in it
    count: int


@dataclass(frozen=True)
class OfferHotlist:
    """A message on an issuer's hotlist topics: hand it to the terminal."""

    topic: str
    payload: bytes | str


@dataclass(frozen=True)
class ApplyAck:
    """A valid ack for this terminal (cut down to what was published): apply it to the outbox, then report the
    counts with ``UplinkPolicy.ack_applied``."""

    ack: Ack


class UplinkPolicy:
    """The rules of one terminal's uplink. Not thread-safe: feed it from one event loop."""

    def __init__(
        self,
        city: str,
        terminal: str,
        *,
        now: float,
        batch: int = 100,
        ack_timeout: float = 10.0,
        max_backoff: float = 10.0,
    ) -> None:
        self.terminal = terminal
        self.txn_topic = txn_topic(city, terminal)
        self.ack_topic = ack_topic(city, terminal)
        self.batch = batch
        self.ack_timeout = ack_timeout
        self.max_backoff = max_backoff
        self.stats = UplinkStats()
        self.sent_through = 0  # records up to this seq went out on this connection (0: send everything unacked)
        self._published_max = 0  # the highest seq this uplink has ever published (only grows)
        self._last_traffic = now
        self._backoff = FIRST_BACKOFF
        self._hotlist_traffic: float | None = None  # when the hotlist filters were subscribed or last delivered

    # --- the connection ------------------------------------------------------------------------------------

    def connected(self) -> None:
        """A connection is up: count it, reset the backoff, and send everything not yet acked again."""
        self.stats.connected, self._backoff = True, FIRST_BACKOFF
        self.stats.connections += 1
        self.sent_through = 0
        self._hotlist_traffic = None

    def lost(self, error: str) -> bool:
        """The connection failed or went away with ``error``; whether that is news worth a warning (not the same
        failure again while offline)."""
        news = self.stats.connected or self.stats.last_error != error
        self.stats.connected, self.stats.last_error = False, error
        return news

    def retry_delay(self) -> float:
        """Seconds to wait before the next connection attempt (doubles each time, up to ``max_backoff``)."""
        delay = self._backoff
        self._backoff = min(delay * 2, self.max_backoff)
        return delay

    # --- publishing ----------------------------------------------------------------------------------------

    def window(self) -> tuple[int, int]:
        """Which records to read from the outbox next: (after this seq, at most this many)."""
        return self.sent_through, self.batch

    @staticmethod
    def publication(rows: list[tuple[int, str]]) -> Publication | None:
        """The message for the (seq, JSON) rows read from the outbox, or None when there is nothing to send."""
        if not rows:
            return None
        payload = rows[0][1] if len(rows) == 1 else batch_payload([record for _, record in rows])
        return Publication(payload, rows[-1][0], len(rows))

    def published(self, publication: Publication, now: float) -> None:
        """The broker has the message (PUBACK)."""
        self.sent_through = publication.through
        self._published_max = max(self._published_max, publication.through)
        self.stats.published += publication.count
        self._last_traffic = now

    @property
    def idle_wait(self) -> float:
        """How long to wait for new records or an ack before checking whether a resend is due."""
        return self.ack_timeout / 2

    def resend_due(self, now: float) -> bool:
        """No traffic for ``ack_timeout``: the unacked records (if any) should go out again."""
        return now - self._last_traffic >= self.ack_timeout

    def resend(self, now: float) -> None:
        """Send every unacked record again, from the oldest (the same bytes, the same seqs)."""
        log.info("no ack for %.0f s: sending the unacked records again", now - self._last_traffic)
        self.stats.resends += 1
        self.sent_through = 0

    def all_published(self, unsent: bool) -> bool:
        """Everything reached the broker on this connection, given whether the outbox holds records past
        ``sent_through``."""
        return self.stats.connected and not unsent

    @staticmethod
    def all_acked(queued: int) -> bool:
        """The clearing has acked everything, given how many records the outbox holds."""
        return queued == 0

    # --- incoming ------------------------------------------------------------------------------------------

    def subscribed(self, now: float) -> None:
        """The hotlist filters are subscribed on this connection: the broker sends the retained lists now."""
        self._hotlist_traffic = now

    def hotlist_offered(self, now: float) -> None:
        """A hotlist message was handed to the terminal."""
        self._hotlist_traffic = now

    def hotlists_quiet(self, now: float, quiet: float) -> bool:
        """Subscribed on this connection and no hotlist message for ``quiet`` seconds: the retained lists are in
        (the broker sends them right after the subscription, with no end marker)."""
        return self.stats.connected and self._hotlist_traffic is not None and now - self._hotlist_traffic >= quiet

    def received(self, topic: str, payload: bytes | str) -> ApplyAck | OfferHotlist | None:
        """What to do with a message on a subscribed topic (None: nothing, the reason is logged)."""
        if hotlist_issuer(topic) is not None:
            return OfferHotlist(topic, payload)
        if topic != self.ack_topic:
            return None
        try:
            ack = parse_ack(payload)
        except MessageError as err:
            log.warning("ack ignored: %s", err)
            return None
        if ack.terminal != self.terminal:
            log.warning("ack for terminal %s ignored (this is %s)", ack.terminal, self.terminal)
            return None
        if ack.acked_through > self._published_max:
            # an ack for records this terminal never sent (a forged seq on its topic, or a confused clearing):
            # dropping them would lose them, so the ack counts only up to what was really published
            log.warning(
                "ack through %d beyond the records sent (%d): counted up to %d",
                *(ack.acked_through, self._published_max, self._published_max),
            )
            ack = ack.model_copy(update={"acked_through": self._published_max})
        return ApplyAck(ack)

    def ack_applied(self, ack: Ack, acked: int, rejected: int, now: float) -> None:
        """The outbox dropped what ``ack`` covers: ``acked`` records taken, ``rejected`` refused."""
        self.stats.acked += acked
        self.stats.rejected += rejected
        for rejection in ack.rejected:
            log.warning("record %d rejected by the clearing: %s", rejection.seq, rejection.reason)
        self.sent_through = max(self.sent_through, ack.acked_through)
        self._last_traffic = now
