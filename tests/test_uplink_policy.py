"""The uplink's rules without a broker and without sleeping: ``UplinkPolicy`` driven by hand over an in-memory
outbox, with a clock that moves only when a test says so."""

from __future__ import annotations

import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from terminals.messages import ACK_SCHEMA, BATCH_SCHEMA, Ack, Rejection
from terminals.outbox import MemoryOutbox
from terminals.uplink_policy import (
    PUBACK_REASONS,
    ApplyAck,
    OfferHotlist,
    Outcome,
    Publication,
    Refuse,
    Resubscribe,
    RetryAfter,
    UplinkPolicy,
    puback_outcome,
)

NUMBER = "451000000001"


@pytest.fixture(autouse=True)
def _policy_logs(caplog: pytest.LogCaptureFixture) -> None:
    """See the policy's lines whatever level an earlier in-process CLI run left on the ``terminals`` logger."""
    caplog.set_level(logging.INFO, logger="terminals")


class Drive:
    """What ``Uplink`` does with the policy's answers, by hand: an in-memory outbox of ``backlog`` records and a
    fake clock (``now``)."""

    def __init__(self, backlog: int, *, batch: int = 100) -> None:
        self.outbox = MemoryOutbox()
        for seq in range(1, backlog + 1):
            self.outbox._records[seq] = json.dumps({"seq": seq})
        self.now = 0.0
        self.policy = UplinkPolicy("4510", NUMBER, now=self.now, batch=batch, ack_timeout=10.0, max_backoff=10.0)
        self.policy.connected()

    def publish(self) -> Publication | None:
        """One turn of the publisher: read the window, publish it (PUBACK at once)."""
        publication = self.policy.publication(self.outbox.unacked(*self.policy.window()))
        if publication is not None:
            self.policy.published(publication, self.now)
        return publication

    def publish_all(self) -> list[int]:
        """Publish until nothing is left past the window; the record count of each message."""
        counts = []
        while (publication := self.publish()) is not None:
            counts.append(publication.count)
        return counts

    def ack(self, payload: bytes | str) -> ApplyAck | OfferHotlist | None:
        """An ack message arrives: applied to the outbox when the policy says so."""
        action = self.policy.received(self.policy.ack_topic, payload)
        if isinstance(action, ApplyAck):
            acked, rejected = self.outbox.apply_ack(action.ack)
            self.policy.ack_applied(action.ack, acked, rejected, self.now)
        return action

    def unsent(self) -> bool:
        return bool(self.outbox.unacked(self.policy.sent_through, 1))


def ack(through: int, rejected: dict[int, str] | None = None, terminal: str = NUMBER) -> str:
    reasons = [Rejection(seq=seq, reason=reason) for seq, reason in (rejected or {}).items()]
    return Ack(schema=ACK_SCHEMA, terminal=terminal, acked_through=through, rejected=reasons).to_json()


def test_first_send_publishes_one_record_as_stored_and_several_as_a_batch() -> None:
    one = Drive(1)
    assert one.policy.window() == (0, 100)
    publication = one.publish()
    assert publication == Publication('{"seq": 1}', through=1, count=1, seqs=(1,))
    assert one.policy.window() == (1, 100) and one.policy.stats.published == 1
    assert one.publish() is None

    three = Drive(3)
    publication = three.publish()
    assert publication is not None and (publication.through, publication.count) == (3, 3)
    doc = json.loads(publication.payload)
    assert doc == {"schema": BATCH_SCHEMA, "records": [{"seq": 1}, {"seq": 2}, {"seq": 3}]}


def test_a_big_backlog_goes_out_in_batches_oldest_first() -> None:
    drive = Drive(250, batch=100)
    assert drive.publish_all() == [100, 100, 50]
    assert drive.policy.sent_through == 250 and drive.policy.stats.published == 250
    assert drive.policy.all_published(drive.unsent())


def test_unacked_records_go_out_again_only_after_the_ack_timeout() -> None:
    drive = Drive(3)
    drive.publish_all()
    drive.now = 9.9
    assert not drive.policy.resend_due(drive.now)
    drive.now = 10.0
    assert drive.policy.resend_due(drive.now)
    drive.policy.resend(drive.now)
    assert drive.policy.stats.resends == 1 and drive.policy.window() == (0, 100)
    publication = drive.publish()
    assert publication is not None and publication.count == 3, "the same records again, from the oldest"
    assert drive.policy.stats.published == 6
    assert not drive.policy.resend_due(12.0), "the resend is traffic: the timeout starts again"


def test_an_ack_is_traffic_and_delays_the_resend() -> None:
    drive = Drive(4)
    drive.publish_all()
    drive.now = 8.0
    drive.ack(ack(2))
    assert not drive.policy.resend_due(15.0)
    assert drive.policy.resend_due(18.0)


def test_a_partial_ack_drops_only_what_it_covers() -> None:
    drive = Drive(5)
    drive.publish_all()
    action = drive.ack(ack(3))
    assert isinstance(action, ApplyAck) and action.ack.acked_through == 3
    assert [seq for seq, _ in drive.outbox.unacked(0, 10)] == [4, 5]
    assert drive.policy.stats.acked == 3
    assert drive.policy.window() == (5, 100), "an ack below what went out does not send it again"
    assert not drive.policy.all_acked(drive.outbox.queued())
    drive.ack(ack(5))
    assert drive.policy.all_acked(drive.outbox.queued()) and drive.policy.stats.acked == 5


def test_duplicate_and_out_of_order_acks_count_once() -> None:
    drive = Drive(5)
    drive.publish_all()
    drive.ack(ack(4))
    drive.ack(ack(4))
    drive.ack(ack(2))
    assert drive.policy.stats.acked == 4 and drive.policy.stats.rejected == 0
    assert [seq for seq, _ in drive.outbox.unacked(0, 10)] == [5]
    assert drive.policy.sent_through == 5


def test_an_ack_after_a_resend_moves_the_window_past_what_it_covers() -> None:
    drive = Drive(250, batch=100)
    drive.publish_all()
    drive.now = 10.0
    drive.policy.resend(drive.now)
    drive.ack(ack(150))
    assert drive.policy.window() == (150, 100), "what the clearing has is not sent again"
    assert drive.publish_all() == [100]


def test_rejections_are_counted_apart_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    drive = Drive(3)
    drive.publish_all()
    drive.ack(ack(3, {2: "bad TAC"}))
    assert (drive.policy.stats.acked, drive.policy.stats.rejected) == (2, 1)
    assert "record 2 rejected by the clearing: bad TAC" in caplog.text
    assert drive.outbox.queued() == 0


@pytest.mark.parametrize("junk", [b"", b"nope", b"\xff\xfe", b'{"schema":"yikatong.ack/1","terminal":"X"}', b"[]"])
def test_junk_on_the_ack_topic_is_ignored(junk: bytes, caplog: pytest.LogCaptureFixture) -> None:
    drive = Drive(2)
    drive.publish_all()
    assert drive.ack(junk) is None
    assert "ack ignored" in caplog.text
    assert drive.outbox.queued() == 2 and drive.policy.stats.acked == 0


def test_an_ack_for_another_terminal_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    drive = Drive(2)
    drive.publish_all()
    assert drive.ack(ack(2, terminal="451000000002")) is None
    assert "ack for terminal 451000000002 ignored (this is 451000000001)" in caplog.text
    assert drive.outbox.queued() == 2


def test_an_ack_beyond_what_was_published_counts_only_up_to_it(caplog: pytest.LogCaptureFixture) -> None:
    drive = Drive(5, batch=2)
    drive.publish()  # seqs 1 and 2 went out
    action = drive.ack(ack(5))
    assert isinstance(action, ApplyAck) and action.ack.acked_through == 2
    assert [seq for seq, _ in drive.outbox.unacked(0, 10)] == [3, 4, 5]
    assert drive.policy.stats.acked == 2
    assert "ack through 5 beyond the records sent (2): counted up to 2" in caplog.text


def test_every_issuers_hotlist_topics_are_offered_to_the_terminal_and_other_topics_ignored() -> None:
    policy = UplinkPolicy("4510", NUMBER, now=0.0)
    for topic in ("yikatong/4510/hotlist/delta", "yikatong/4560/hotlist/snapshot", "yikatong/4530/hotlist/snapshot/3"):
        assert policy.received(topic, b"anything") == OfferHotlist(topic, b"anything")
    assert policy.received("yikatong/interop/4510/txn", b"{}") is None
    assert policy.received("yikatong/4510/ack/451000000002", ack(1, terminal="451000000002")) is None
    assert policy.received(policy.txn_topic, b"{}") is None


def test_all_published_needs_a_connection_and_nothing_past_the_window() -> None:
    drive = Drive(3, batch=2)
    assert not drive.policy.all_published(drive.unsent())
    drive.publish()
    assert not drive.policy.all_published(drive.unsent())
    drive.publish()
    assert drive.policy.all_published(drive.unsent())
    drive.policy.lost("gone")
    assert not drive.policy.all_published(drive.unsent()), "offline: nothing is published"
    drive.policy.connected()
    assert not drive.policy.all_published(drive.unsent()), "a new connection sends everything unacked again"
    assert drive.policy.window() == (0, 2)


def test_reconnects_back_off_and_warn_once_per_failure() -> None:
    policy = UplinkPolicy("4510", NUMBER, now=0.0, max_backoff=1.0)
    assert [policy.retry_delay() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    assert policy.lost("refused") and not policy.lost("refused") and policy.lost("timed out")
    policy.connected()
    assert policy.stats.connections == 1 and policy.stats.connected and policy.retry_delay() == 0.2
    assert policy.lost("timed out"), "losing a live connection is news even with the same error as before"
    assert policy.stats.last_error == "timed out" and not policy.stats.connected


def test_the_retained_hotlists_are_in_once_subscribed_and_quiet_for_a_moment() -> None:
    policy = UplinkPolicy("4510", NUMBER, now=0.0)
    assert not policy.hotlists_quiet(5.0, 0.3), "not connected"
    policy.connected()
    assert not policy.hotlists_quiet(5.0, 0.3), "not subscribed yet"
    policy.subscribed(5.0)
    assert not policy.hotlists_quiet(5.2, 0.3)
    policy.hotlist_offered(5.25)
    assert not policy.hotlists_quiet(5.5, 0.3) and policy.hotlists_quiet(5.6, 0.3)
    policy.lost("gone")
    assert not policy.hotlists_quiet(9.0, 0.3)
    policy.connected()
    assert not policy.hotlists_quiet(9.0, 0.3), "a new connection subscribes again"


# --- what the broker's PUBACK says (MQTT 5 reason codes) ---------------------------------------------------------


def test_a_refusing_puback_marks_the_records_refused_once_and_they_are_not_sent_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    drive = Drive(3, batch=2)
    first = drive.policy.publication(drive.outbox.unacked(*drive.policy.window()))
    assert first is not None and first.seqs == (1, 2)
    action = drive.policy.acknowledged(first, 0x87, drive.now)
    assert action == Refuse((1, 2), "PUBACK 135 not authorized")
    drive.outbox.refuse(action.seqs, action.reason)
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == [
        "record(s) 1-2 refused by the broker (PUBACK 135 not authorized): kept in the outbox, not sent again until "
        "terminal sync --retry-refused"
    ]
    assert drive.policy.stats.refused == 2 and drive.policy.stats.published == 0
    assert drive.publish_all() == [1]  # seq 3 still goes out
    drive.now += 10
    assert drive.policy.resend_due(drive.now) and drive.outbox.queued() == 1  # only seq 3 waits
    drive.policy.resend(drive.now)
    assert [seq for seq, _ in drive.outbox.unacked(*drive.policy.window())] == [3]


def test_a_transient_puback_is_sent_again_after_a_growing_backoff() -> None:
    drive = Drive(1)
    publication = drive.policy.publication(drive.outbox.unacked(*drive.policy.window()))
    assert publication is not None
    delays = []
    for _ in range(8):
        action = drive.policy.acknowledged(publication, 0x97, drive.now)
        assert isinstance(action, RetryAfter)
        delays.append(action.delay)
        assert drive.policy.window() == (0, 100)  # the same records go again
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0] and drive.policy.stats.declined == 8
    assert drive.policy.acknowledged(publication, 0x10, drive.now) is None  # no subscribers: the broker has it
    assert drive.policy.window() == (1, 100) and drive.policy.stats.published == 1
    action = drive.policy.acknowledged(publication, 0x80, drive.now)
    assert action == RetryAfter(0.2)  # the backoff started again after a success


@given(st.integers(0, 255))
def test_every_puback_reason_code_has_a_name_and_an_outcome(code: int) -> None:
    name, outcome = puback_outcome(code)
    assert name
    if code < 0x80:
        assert outcome is Outcome.DELIVERED
    elif code in (0x80, 0x91, 0x97):
        assert outcome is Outcome.RETRY
    else:
        assert outcome is Outcome.REFUSED
    assert (code in PUBACK_REASONS) == (name != f"reason code 0x{code:02X}")


def test_mqtt5_falls_back_to_3_1_1_only_while_undecided() -> None:
    undecided = UplinkPolicy("4510", NUMBER, now=0.0)
    assert undecided.mqtt5 and undecided.probing
    assert undecided.fall_back() and not undecided.mqtt5 and not undecided.probing
    assert not undecided.fall_back()
    worked = UplinkPolicy("4510", NUMBER, now=0.0)
    worked.connected()
    worked.lost("gone")
    assert not worked.probing and not worked.fall_back() and worked.mqtt5  # MQTT 5 worked: something else failed
    said = UplinkPolicy("4510", NUMBER, now=0.0, mqtt5=True)  # ?mqtt=5
    assert not said.probing and not said.fall_back() and said.mqtt5
    old = UplinkPolicy("4510", NUMBER, now=0.0, mqtt5=False)  # ?mqtt=3.1.1
    assert not old.mqtt5 and not old.probing


ACK = f"yikatong/4510/ack/{NUMBER}"


def test_a_refused_ack_subscription_is_logged_once_a_connection_and_its_grant_told(
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = UplinkPolicy("4510", NUMBER, now=0.0)
    policy.connected()
    assert policy.subscription_granted([ACK, "h/#"], [1, 1]) is None
    assert not caplog.records
    assert policy.subscription_granted([ACK, "h/#"], [0x87, 1]) == Resubscribe((ACK,), 2.0)
    assert policy.subscription_granted([ACK], [0x80]) == Resubscribe((ACK,), 4.0)
    assert policy.subscription_granted([ACK], [1]) is None
    assert caplog.messages[0] == (
        f"broker refused the subscription to {ACK} (SUBACK 135 not authorized): publishing all the same, no ack can "
        "come until it is granted; asking again in 2.0 s, then less often (up to 30 s), until granted"
    )
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.INFO]  # the second refusal: debug
    assert caplog.messages[1] == f"broker granted the subscription to {ACK} after 2 refusal(s)"
    policy.lost("gone")
    policy.connected()  # a new connection: said again, from the first delay
    assert policy.subscription_granted([ACK], [0x97]) == Resubscribe((ACK,), 2.0)
    assert caplog.records[-1].levelno == logging.WARNING and "151 quota exceeded" in caplog.messages[-1]


@pytest.mark.parametrize("code", [0x80, 0x83, 0x87, 0x8F, 0x97, 0xA2])
def test_any_refusing_suback_code_is_asked_again_doubling_up_to_30_s_until_granted(code: int) -> None:
    policy = UplinkPolicy("4510", NUMBER, now=0.0)
    policy.connected()
    delays = []
    for _ in range(7):
        again = policy.subscription_granted([ACK], [code])
        assert again is not None and again.filters == (ACK,)
        delays.append(again.delay)
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    assert policy.subscription_granted([ACK], [0]) is None
    assert policy.subscription_granted([ACK], [code]) == Resubscribe((ACK,), 2.0), "a grant starts over"


def test_refused_hotlist_filters_are_asked_again_too_and_the_delay_is_injectable() -> None:
    policy = UplinkPolicy("4510", NUMBER, now=0.0, resubscribe_after=0.5)
    policy.connected()
    assert policy.subscription_granted([ACK, "a/#", "b/#"], [1, 0x80, 1]) == Resubscribe(("a/#",), 0.5)


def test_uplinks_sharing_what_was_told_say_each_subscription_news_once(caplog: pytest.LogCaptureFixture) -> None:
    told: set[str] = set()
    policies = [UplinkPolicy("4510", f"45100000000{n}", now=0.0, told=told) for n in range(3)]
    for policy in policies:
        policy.connected()
        assert policy.subscription_granted([policy.ack_topic], [0x80]) is not None
        assert policy.subscription_granted([policy.ack_topic], [1]) is None
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert [r.levelno for r in loud] == [logging.WARNING, logging.INFO]
    assert loud[0].getMessage().endswith("(not said again for other terminals of this process)")
