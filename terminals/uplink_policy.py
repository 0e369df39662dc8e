"""The uplink's decisions without I/O: which records to publish next and how to batch them, when to send the
unacked ones again, what an ack from the clearing may drop, how long to wait before reconnecting, and what the
uplink has done so far.

``UplinkPolicy`` is fed events (connected, connection lost, published, a message on a subscribed topic, an ack
applied to the outbox, time passing) and answers with what to do; it never touches the network, the outbox or
a clock (``now`` is passed in), so every rule can be tested with fake time. ``terminals.uplink`` carries its
answers out over aiomqtt.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from terminals.messages import Ack, MessageError, ack_topic, batch_payload, hotlist_issuer, parse_ack, txn_topic
from terminals.mqtt import LinkStats

log = logging.getLogger(__name__)

FIRST_BACKOFF = 0.2  # seconds before the first reconnect; doubled after each failure up to max_backoff
# seconds before asking again for a subscription the broker refused (NATS's MQTT layer refuses one when it cannot
# make the JetStream consumer while a cluster node is down): doubled after each refusal up to MAX_RESUBSCRIBE
FIRST_RESUBSCRIBE = 2.0
MAX_RESUBSCRIBE = 30.0


class Outcome(enum.Enum):
    """What a PUBACK reason code means for the records in the message."""

    DELIVERED = "delivered"  # the broker has them: wait for the clearing's ack
    RETRY = "retry"  # the broker cannot take them now: the same message again after a backoff
    REFUSED = "refused"  # the broker will not take them: kept in the outbox as refused, not sent again


# MQTT 5 PUBACK reason codes (MQTT 5.0, 3.4.2.1), all of them, and what the uplink does (docs/terminal-identity.md)
PUBACK_REASONS: dict[int, tuple[str, Outcome]] = {
    0x00: ("success", Outcome.DELIVERED),
    0x10: ("no matching subscribers", Outcome.DELIVERED),  # taken; the clearing's persistent session gets it
    0x80: ("unspecified error", Outcome.RETRY),
    0x83: ("implementation specific error", Outcome.REFUSED),  # "valid, but not willing to accept it"
    0x87: ("not authorized", Outcome.REFUSED),  # the ACL denies this client the topic
    0x90: ("topic name invalid", Outcome.REFUSED),
    0x91: ("packet identifier in use", Outcome.RETRY),
    0x97: ("quota exceeded", Outcome.RETRY),
    0x99: ("payload format invalid", Outcome.REFUSED),
}


def puback_outcome(code: int) -> tuple[str, Outcome]:
    """The name of a PUBACK reason code and what to do: a code the table lacks is a success below 0x80 (as MQTT 5
    says of every reason code) and a refusal from 0x80 on (shown to the operator rather than resent blindly)."""
    if code in PUBACK_REASONS:
        return PUBACK_REASONS[code]
    return f"reason code 0x{code:02X}", Outcome.DELIVERED if code < 0x80 else Outcome.REFUSED


@dataclass
class UplinkStats(LinkStats):
    """What the uplink has done so far (published counts resends too)."""

    published: int = 0
    resends: int = 0
    acked: int = 0
    rejected: int = 0
    refused: int = 0  # records the broker refused (PUBACK reason code)
    declined: int = 0  # messages the broker could not take for now (a transient reason code), sent again
    last_error: str | None = None


@dataclass(frozen=True)
class Publication:
    """One message to publish: a single record as stored, or several as one batch."""

    payload: str
    through: int  # the highest seq in it
    count: int
    seqs: tuple[int, ...] = ()  # every seq in it, oldest first


@dataclass(frozen=True)
class Refuse:
    """The broker refused a message: mark its records refused (with ``reason``) in the outbox."""

    seqs: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class RetryAfter:
    """The broker cannot take the message now: wait ``delay`` seconds, then send it again."""

    delay: float


@dataclass(frozen=True)
class Resubscribe:
    """The broker refused a subscription: ask for ``filters`` again (QoS 1, on the same connection) after ``delay``
    seconds, and feed its SUBACK to ``UplinkPolicy.subscription_granted`` again."""

    filters: tuple[str, ...]
    delay: float


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
        mqtt5: bool | None = None,
        resubscribe_after: float = FIRST_RESUBSCRIBE,
        told: set[str] | None = None,
    ) -> None:
        """``told``: kinds of subscription news already logged, shared by the uplinks of one process that should
        say each once (the load generator's thousands of terminals); None: said once per connection."""
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
        # the protocol of the next connection; None: MQTT 5 until the broker shows that it speaks only 3.1.1
        self.mqtt5 = mqtt5 is not False
        self._may_fall_back = mqtt5 is None
        self._mqtt5_connected = False
        self._decline_backoff = FIRST_BACKOFF
        self._first_resubscribe = resubscribe_after
        self._resubscribe_backoff = resubscribe_after
        self._refusals = 0  # refused SUBACKs on this connection
        self._told = told
        self._told_here: set[str] = set()  # the same, for this connection (when ``told`` is None)

    # --- the connection ------------------------------------------------------------------------------------

    def connected(self) -> None:
        """A connection is up: count it, reset the backoff, and send everything not yet acked again."""
        self.stats.connected, self._backoff = True, FIRST_BACKOFF
        self._mqtt5_connected |= self.mqtt5
        self.stats.connections += 1
        self.sent_through = 0
        self._hotlist_traffic = None
        self._resubscribe_backoff, self._refusals = self._first_resubscribe, 0
        self._told_here.clear()

    def lost(self, error: str) -> bool:
        """The connection failed or went away with ``error``; whether that is news worth a warning (not the same
        failure again while offline)."""
        news = self.stats.connected or self.stats.last_error != error
        self.stats.connected, self.stats.last_error = False, error
        return news

    def fall_back(self) -> bool:
        """An MQTT 5 connection attempt was refused in a way that says the broker does not speak it (CONNACK
        "unsupported protocol version", or closed before any CONNACK): speak MQTT 3.1.1 from now on, unless MQTT 5
        connections have worked before (then it was something else). Whether it switched."""
        if not self.probing:
            return False
        self.mqtt5 = False
        log.info("the broker does not speak MQTT 5: MQTT 3.1.1 from now on (no reason codes on PUBACK)")
        return True

    @property
    def probing(self) -> bool:
        """Trying MQTT 5 on a broker not yet known to speak it (the CONNACK wait is kept short)."""
        return self._may_fall_back and self.mqtt5 and not self._mqtt5_connected

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
        return Publication(payload, rows[-1][0], len(rows), tuple(seq for seq, _ in rows))

    def acknowledged(self, publication: Publication, code: int, now: float) -> Refuse | RetryAfter | None:
        """The broker's PUBACK for ``publication`` came with reason ``code`` (always 0 over MQTT 3.1.1): None when
        it took the records (``published`` is done), else what to do. One log line per refused message."""
        name, outcome = puback_outcome(code)
        if outcome is Outcome.DELIVERED:
            self._decline_backoff = FIRST_BACKOFF
            self.published(publication, now)
            return None
        self._last_traffic = now
        seqs = _seq_ranges(publication.seqs)
        if outcome is Outcome.RETRY:
            delay, self._decline_backoff = self._decline_backoff, min(self._decline_backoff * 2, self.max_backoff)
            self.stats.declined += 1
            log.warning("broker declined record(s) %s for now (PUBACK %d %s): again in %.1f s", seqs, code, name, delay)
            return RetryAfter(delay)
        reason = f"PUBACK {code} {name}"
        self.stats.refused += publication.count
        self.sent_through = max(self.sent_through, publication.through)
        log.warning(
            "record(s) %s refused by the broker (%s): kept in the outbox, not sent again until "
            "terminal sync --retry-refused",
            *(seqs, reason),
        )
        return Refuse(publication.seqs, reason)

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

    def subscription_granted(self, filters: Sequence[str], codes: Sequence[int]) -> Resubscribe | None:
        """The broker's SUBACK for ``filters`` (the ack topic, the hotlist filters), one code each: None when all
        were granted; else which to ask for again on this connection and after how long (a refusal, 0x80 up, e.g.
        135 not authorized or 151 quota exceeded, may be transient: a NATS cluster with a node down). Meanwhile
        the terminal publishes all the same; its records wait in the outbox until an ack can come. The first
        refusal on a connection is a warning, a grant after refusals an info line, the rest debug."""
        refused = [(topic, code) for topic, code in zip(filters, codes, strict=False) if code >= 0x80]
        if not refused:
            if self._refusals:
                self._tell(
                    "granted",
                    logging.INFO,
                    "broker granted the subscription to %s after %d refusal(s)",
                    *(", ".join(filters), self._refusals),
                )
            self._resubscribe_backoff, self._refusals = self._first_resubscribe, 0
            return None
        self._refusals += 1
        delay = self._resubscribe_backoff
        self._resubscribe_backoff = min(delay * 2, max(MAX_RESUBSCRIBE, self._first_resubscribe))
        topics = ", ".join(topic for topic, _ in refused)
        names = ", ".join(f"{code} {puback_outcome(code)[0]}" for _, code in refused)
        meanwhile = "no ack can come until it is granted" if any(t == self.ack_topic for t, _ in refused) else ""
        self._tell(
            "refused",
            logging.WARNING,
            "broker refused the subscription to %s (SUBACK %s): publishing all the same%s; asking again in %.1f s, "
            "then less often (up to %.0f s), until granted%s",
            *(topics, names, f", {meanwhile}" if meanwhile else "", delay, MAX_RESUBSCRIBE),
            " (not said again for other terminals of this process)" if self._told is not None else "",
        )
        return Resubscribe(tuple(topic for topic, _ in refused), delay)

    def _tell(self, kind: str, level: int, message: str, *args: object) -> None:
        """Log ``message`` the first time ``kind`` happens (on this connection, or in this process with
        ``told``); debug after that."""
        told = self._told_here if self._told is None else self._told
        if kind in told:
            level = logging.DEBUG
        told.add(kind)
        log.log(level, message, *args)

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


def _seq_ranges(seqs: tuple[int, ...]) -> str:
    """Seqs for a log line: "7", "3-5", "3-5, 9"."""
    runs: list[list[int]] = []
    for seq in seqs:
        if runs and seq == runs[-1][-1] + 1:
            runs[-1].append(seq)
        else:
            runs.append([seq])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
