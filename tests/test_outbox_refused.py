"""Records the broker refused (MQTT 5 PUBACK reason code): kept in the outbox, marked with the reason and the time,
never read for sending, not counted as queued, dropped when an ack covers them, sent again after
``retry_refused``; the same rules in memory (the load generator's outbox) and in the state file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from clearing_corpus import good_records
from hypothesis import given, settings
from hypothesis import strategies as st

from terminals.messages import ACK_SCHEMA, Ack
from terminals.outbox import MemoryOutbox, Outbox

RECORD = good_records()[0]
TERMINAL = RECORD.terminal

# an operation on both outboxes: ("refuse", seqs) or ("ack", through)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("refuse"), st.lists(st.integers(1, 12), max_size=5)),
        st.tuples(st.just("ack"), st.integers(0, 12)),
    ),
    max_size=8,
)


def _ack(through: int) -> Ack:
    return Ack(schema=ACK_SCHEMA, terminal=TERMINAL, acked_through=through, rejected=[])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10), _OPS)
def test_refused_records_are_kept_unsent_alike_in_memory_and_on_disk(count: int, ops: list[tuple[str, object]]) -> None:
    memory = MemoryOutbox()
    with tempfile.TemporaryDirectory() as folder:
        disk = Outbox(Path(folder) / "t.sqlite")
        for _ in range(count):
            memory.append(RECORD)
            disk.append(RECORD)
        refused: set[int] = set()
        held = set(range(1, count + 1))
        for op, arg in ops:
            if op == "refuse":
                assert isinstance(arg, list)
                for outbox in (memory, disk):
                    outbox.refuse(arg, "PUBACK 135 not authorized")
                refused |= set(arg) & held
            else:
                assert isinstance(arg, int)
                assert memory.apply_ack(_ack(arg)) == disk.apply_ack(_ack(arg))
                held = {seq for seq in held if seq > arg}
                refused &= held
            sendable = sorted(held - refused)
            for outbox in (memory, disk):
                assert [seq for seq, _ in outbox.unacked(0, 100)] == sendable
                assert outbox.queued() == len(sendable)
            assert [r.seq for r in disk.refused()] == sorted(refused)
            assert disk.counts().refused == len(refused) and disk.counts().queued == len(sendable)
        disk.close()


def test_refusals_survive_a_restart_with_reason_and_time_and_retry_brings_them_back(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "t.sqlite")
    for _ in range(3):
        outbox.append(RECORD)
    outbox.refuse([2, 3, 9], "PUBACK 135 not authorized")  # 9 is no record: nothing to mark
    outbox.close()
    again = Outbox(tmp_path / "t.sqlite")
    [first, second] = again.refused()
    assert (first.seq, first.reason, second.seq) == (2, "PUBACK 135 not authorized", 3)
    assert first.at > 1_700_000_000  # a time.time()
    assert [seq for seq, _ in again.unacked(0, 10)] == [1] and again.queued() == 1
    assert again.retry_refused() == 2
    assert [seq for seq, _ in again.unacked(0, 10)] == [1, 2, 3] and again.counts().refused == 0


def test_the_last_connection_failure_is_kept_until_a_connection_clears_it(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "t.sqlite")
    assert outbox.link_error() is None
    outbox.note_link("broker refused the TLS handshake: certificate revoked")
    outbox.close()
    again = Outbox(tmp_path / "t.sqlite")
    link = again.link_error()
    assert link is not None and link[0] == "broker refused the TLS handshake: certificate revoked"
    again.note_link(None)
    assert again.link_error() is None
