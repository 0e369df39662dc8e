"""The clearing under a generated hostile stream, end to end: a real `yikatong clearing serve` process on the
machine's Mosquitto, on SQLite and on PostgreSQL, fed by `mosquitto_pub` (an outside client) with thousands of
hostile messages and genuine records interleaved. Afterwards the ledger holds exactly the genuine records, each
once; every other message is in the quarantine with a reason (or, past a sender's daily cap, counted); the
process is alive, acks one more genuine record within 2 s and says so in its retained health message.

`-m soak` runs the same with 100,000 messages and prints the counts and the process's peak RSS."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from clearing_support import fresh_db, serve_process, signed_records
from hostile_stream import Message, Stream, file_messages, hostile_stream
from mqtt_support import MOSQUITTO, mosquitto_pub_file, mosquitto_pub_lines, require_mosquitto, unique_terminal
from sqlalchemy import func, select

from clearing.db import open_engine
from clearing.ledger import LEDGER, QUARANTINE, TALLY
from clearing.schema import SOURCE_TERMINAL
from terminals.messages import health_topic, parse_ack, parse_health

CITY = "4560"
CHUNK = 800  # below the 1,000 messages Mosquitto queues for a subscriber that is behind
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


async def publish(stream: list[Message], folder: Path) -> None:
    """One `mosquitto_pub -l` per topic, all at once: on each topic the messages keep the stream's order (the
    genuine records among the junk on their terminal's topic), and the topics interleave at the broker."""
    by_topic: dict[str, list[bytes]] = {}
    for message in stream:
        by_topic.setdefault(message.topic, []).append(message.payload)
    await asyncio.gather(
        *(asyncio.to_thread(mosquitto_pub_lines, MOSQUITTO.port, t, lines, folder) for t, lines in by_topic.items())
    )


def mosquitto_sub(topic: str, *, wait: float, count: int = 1) -> subprocess.Popen[bytes]:
    """An outside subscriber printing ``count`` messages (one per line) within ``wait`` seconds."""
    binary = shutil.which("mosquitto_sub") or "/usr/bin/mosquitto_sub"
    command = [binary, "-h", "127.0.0.1", "-p", str(MOSQUITTO.port), "-t", topic, "-q", "1"]
    command += ["-C", str(count), "-W", str(int(wait) + 1)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


async def db_state(db: str) -> tuple[list[tuple[str, int]], Counter[str], list[tuple[str, str, bytes, int, str]], int]:
    """(ledger (terminal, seq) rows, quarantine rows by topic, quarantine rows, counted past the cap)."""
    engine = open_engine(db)
    try:
        async with engine.connect() as conn:
            # rows from terminals (forwards from other cities' clearings on the shared broker are theirs)
            from_terminals = select(LEDGER.c.terminal, LEDGER.c.seq).where(LEDGER.c.source == SOURCE_TERMINAL)
            ledger = [(t, int(s)) for t, s in (await conn.execute(from_terminals)).all()]
            rows = (
                await conn.execute(
                    select(
                        QUARANTINE.c.topic,
                        QUARANTINE.c.reason,
                        QUARANTINE.c.payload,
                        QUARANTINE.c.size,
                        QUARANTINE.c.sha256,
                    )
                )
            ).all()
            dropped = (await conn.execute(select(func.coalesce(func.sum(TALLY.c.dropped), 0)))).scalar_one()
    finally:
        await engine.dispose()
    return ledger, Counter(r[0] for r in rows), [tuple(r) for r in rows], int(dropped)  # type: ignore[misc]


async def run_hostile_stream(kind: str, tmp_path: Path, junk: int, *extra: str) -> str:
    require_mosquitto()
    terminal = unique_terminal(CITY)
    genuine = signed_records(max(20, junk // 50) + 1, CITY, terminal, issuers=(CITY,), cards=8, seed=5)
    last = genuine.pop()
    stream = hostile_stream(CITY, terminal, genuine, junk)
    files = file_messages(CITY, terminal)
    async with fresh_db(kind, tmp_path) as db:
        worker = f"fuzz-{secrets.token_hex(3)}"
        with serve_process(MOSQUITTO, db, CITY, worker, "--health-every", "1", *extra) as serve:
            started = time.monotonic()
            # in chunks the clearing takes in before the next: Mosquitto holds at most 1,000 messages for a client
            # that is behind (max_queued_messages) and drops the rest, which real terminals would resend
            for start in range(0, len(stream.messages), CHUNK):
                await publish(stream.messages[start : start + CHUNK], tmp_path)
                await _all_refusals_in(db, sum(Stream(stream.messages[: start + CHUNK]).rows_by_topic().values()), 120)
            for message in files:
                await asyncio.to_thread(mosquitto_pub_file, MOSQUITTO.port, message.topic, message.payload, tmp_path)
            expected = Stream([*stream.messages, *files]).rows_by_topic()
            await _all_refusals_in(db, sum(expected.values()), 120)
            flood_seconds = time.monotonic() - started
            assert serve.proc.poll() is None, f"clearing serve died: {serve.log.read_text()[-3000:]}"

            out, err, acked_after = await _publish_and_wait_for_ack(terminal, last.to_json().encode(), tmp_path)
            # the retained health message, then two fresh ones (published every second here)
            health_sub = mosquitto_sub(health_topic(CITY), wait=15, count=3)
            health_out, _ = await asyncio.to_thread(health_sub.communicate, timeout=20)
            ledger, by_topic, rows, dropped = await db_state(db)
            peak_kib = _peak_rss_kib(serve.proc.pid)
            assert serve.proc.poll() is None, f"clearing serve died: {serve.log.read_text()[-3000:]}"
        log = serve.log.read_text()

    summary = (
        f"hostile stream on {kind}: {len(stream.messages) + len(files)} messages ({len(stream.genuine)} genuine), "
        f"{len(ledger)} in the ledger, {len(rows)} quarantined, {dropped} counted past the cap, "
        f"{flood_seconds:.1f} s to take it all, next genuine record acked after {acked_after:.2f} s, "
        f"peak RSS {peak_kib / 1024:.0f} MiB"
    )
    print(summary)
    genuine_seqs = sorted([r.seq for r in genuine] + [last.seq])
    assert sorted(seq for t, seq in ledger if t == terminal) == genuine_seqs, summary
    assert len(ledger) == len(genuine_seqs), f"{summary}: the ledger holds more than the genuine records"
    kept = {sha for *_, sha in rows}
    whole = [
        m for m in [*stream.messages, *files] if m.rows == 1 and not m.payload.startswith(b'{"schema":"yikatong.batch')
    ]
    if dropped == 0:
        missing = [m.payload[:80] for m in whole if hashlib.sha256(m.payload).hexdigest() not in kept]
        assert not missing, f"{summary}; not in the quarantine: {missing[:3]}"
    if dropped == 0:
        odd = Counter(r[1][:60] for r in rows if r[0] in (by_topic - expected) or r[0] in (expected - by_topic))
        assert by_topic == expected, (
            f"{summary}; by topic: extra {by_topic - expected}, missing {expected - by_topic}: {odd}"
        )
    else:
        assert len(rows) + dropped == sum(expected.values()), summary
    bugs = [reason for _, reason, _, _, _ in rows if not reason or reason.startswith("internal error")]
    assert not bugs, f"{summary}; no reason, or an unforeseen error reached the isolation: {bugs[:3]}"
    assert all(len(payload) <= 64 * 1024 for _, _, payload, _, _ in rows), summary
    ack = parse_ack(out.strip().splitlines()[-1]) if out.strip() else None
    assert ack is not None and ack.acked_through == last.seq, f"{summary}; ack: {out!r} {err!r}"
    assert acked_after <= 2.0, summary
    health = parse_health(health_out.strip().splitlines()[-1])
    assert health.city == CITY and health.worker == worker, health
    assert health.stored >= len(ledger) and health.last_commit is not None and health.backlog == 0, health
    assert health.quarantined == len(rows), health
    assert "Traceback" not in log, log[-3000:]
    return summary


async def _publish_and_wait_for_ack(terminal: str, record: bytes, folder: Path) -> tuple[bytes, bytes, float]:
    """Publish one record with `mosquitto_pub`; the ack `mosquitto_sub` saw, and the seconds it took."""
    ack_sub = mosquitto_sub(f"yikatong/{CITY}/ack/{terminal}", wait=10)
    await asyncio.sleep(0.5)  # let it subscribe
    sent = time.monotonic()
    await asyncio.to_thread(mosquitto_pub_lines, MOSQUITTO.port, f"yikatong/{CITY}/txn/{terminal}", [record], folder)
    out, err = await asyncio.to_thread(ack_sub.communicate, timeout=15)
    return out, err, time.monotonic() - sent


async def _all_refusals_in(db: str, rows: int, timeout: float) -> None:
    """Until every refusal is in (kept or counted past the cap), or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, _, kept, dropped = await db_state(db)
        if len(kept) + dropped >= rows:
            return
        await asyncio.sleep(0.5)


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")


@pytest.mark.parametrize("kind", BACKENDS)
async def test_a_hostile_stream_costs_only_itself(kind: str, tmp_path: Path) -> None:
    await run_hostile_stream(kind, tmp_path, junk=2000)


@pytest.mark.soak
@pytest.mark.parametrize("kind", BACKENDS)
async def test_soak_100k_hostile_messages(kind: str, tmp_path: Path) -> None:
    await run_hostile_stream(kind, tmp_path, junk=100_000)
