"""The terminal's durable state in one SQLite file: the outbox of records not yet acked by the clearing, the
journal of payments a card left in the middle of, every issuer's last hotlist, the PSAM's counters and the
terminal's identity.

Every change is one SQLite transaction with ``synchronous=FULL``: when ``append`` returns, the record survives a
power cut or SIGKILL, so the rider may go through. A record keeps the ``seq`` and JSON it was given the first
time; resending sends those same bytes.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

from pydantic import BaseModel

from terminals.hotlist import HotlistError, IssuerList
from terminals.messages import Ack, TxnFields, TxnRecord

log = logging.getLogger(__name__)

_Intent = TypeVar("_Intent", bound=BaseModel)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, record TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS pending (card TEXT PRIMARY KEY, intent TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS rejected (seq INTEGER PRIMARY KEY, record TEXT NOT NULL, reason TEXT NOT NULL,
                                     at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS refused (seq INTEGER PRIMARY KEY, reason TEXT NOT NULL, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS hotlist (issuer TEXT PRIMARY KEY, version INTEGER NOT NULL, published TEXT NOT NULL,
                                    cards BLOB NOT NULL);
"""

_QUEUED = "SELECT COUNT(*) FROM outbox WHERE seq NOT IN (SELECT seq FROM refused)"


class RecordQueue(Protocol):
    """What the uplink sends from: records by seq, dropped when an ack covers them, set aside (kept, not sent)
    when the broker refuses them; and the last connection failure, for ``terminal status``."""

    def unacked(self, after: int = 0, limit: int = 100) -> list[tuple[int, str]]: ...
    def apply_ack(self, ack: Ack) -> tuple[int, int]: ...
    def queued(self) -> int: ...
    def refuse(self, seqs: Sequence[int], reason: str) -> None: ...
    def note_link(self, error: str | None) -> None: ...


class MemoryOutbox:
    """An outbox in memory, for the load generator's thousands of simulated terminals: the same ``seq`` and ack
    rules as ``Outbox``, nothing on disk (a killed load process loses what was not yet acked)."""

    def __init__(self) -> None:
        self._records: dict[int, str] = {}
        self._refused: dict[int, str] = {}
        self.next_seq = 1
        self.link_error: str | None = None

    def append(self, fields: TxnFields) -> TxnRecord:
        """Give the record the next ``seq``, validate and keep it."""
        record = TxnRecord.numbered(self.next_seq, fields)
        self._records[self.next_seq] = record.to_json()
        self.next_seq += 1
        return record

    def unacked(self, after: int = 0, limit: int = 100) -> list[tuple[int, str]]:
        """Up to ``limit`` records with seq > ``after`` and not refused, oldest first (dicts keep insertion order)."""
        rows: list[tuple[int, str]] = []
        for seq, record in self._records.items():
            if seq > after and seq not in self._refused:
                rows.append((seq, record))
                if len(rows) == limit:
                    break
        return rows

    def apply_ack(self, ack: Ack) -> tuple[int, int]:
        """Drop what the ack covers; (acked, rejected) counts."""
        covered = [seq for seq in self._records if seq <= ack.acked_through]
        for seq in covered:
            del self._records[seq]
            self._refused.pop(seq, None)
        rejected = len({r.seq for r in ack.rejected} & set(covered))
        return len(covered) - rejected, rejected

    def queued(self) -> int:
        """How many records wait to be sent or acked (the refused ones wait for the operator)."""
        return len(self._records) - len(self._refused)

    def refuse(self, seqs: Sequence[int], reason: str) -> None:
        """The broker refused these records: keep them, unsent, with the reason."""
        self._refused.update((seq, reason) for seq in seqs if seq in self._records)

    def note_link(self, error: str | None) -> None:
        """The last connection failure (None: connected)."""
        self.link_error = error


class OutboxError(Exception):
    """The state file cannot be used (not ours, another terminal's, unreadable)."""


@dataclass(frozen=True)
class OutboxCounts:
    """How much is waiting: records to send or not yet acked, interrupted payments, records the clearing
    rejected, records the broker refused (still in the outbox, not sent)."""

    queued: int
    pending: int
    rejected: int
    next_seq: int
    refused: int = 0


@dataclass(frozen=True)
class Refused:
    """A record the broker refused: kept in the outbox, not sent again until ``Outbox.retry_refused``."""

    seq: int
    reason: str
    at: float  # time.time() of the refusal


class Outbox:
    """One terminal's state file. Safe to share between the tap thread and the uplink task (one lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as err:
            raise OutboxError(f"{path}: cannot open the terminal state file: {err}") from err
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close the file."""
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # --- identity and PSAM counters ------------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        """A stored setting, or None."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        """Store a setting durably."""
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def bind_terminal(self, terminal: str, city: str) -> None:
        """Tie the file to one terminal and city on first use; refuse a file that belongs to another."""
        for key, value in (("terminal", terminal), ("city", city)):
            stored = self.get_meta(key)
            if stored is None:
                self.set_meta(key, value)
            elif stored != value:
                raise OutboxError(
                    f"{self.path} belongs to {key} {stored}, not {value}: use that {key} or another --state file"
                )

    # --- records -------------------------------------------------------------------------------------

    def append(self, fields: TxnFields, done_pending: str | None = None) -> TxnRecord:
        """Give the record the next ``seq``, validate and store it, and (same transaction) clear the pending
        entry it completes. Returns the stored record (a ``TxnRecord`` passed as ``fields`` takes the new seq)."""
        with self._transaction() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            seq = 1 if row is None else int(row[0])
            record = TxnRecord.numbered(seq, fields)
            db.execute(
                "INSERT INTO outbox (seq, record, created) VALUES (?, ?, ?)", (seq, record.to_json(), time.time())
            )
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('next_seq', ?)", (str(seq + 1),))
            if done_pending is not None:
                db.execute("DELETE FROM pending WHERE card = ?", (done_pending,))
        return record

    def unacked(self, after: int = 0, limit: int = 100) -> list[tuple[int, str]]:
        """Up to ``limit`` stored records with seq > ``after`` and not refused by the broker, oldest first, as
        (seq, JSON)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, record FROM outbox WHERE seq > ? AND seq NOT IN (SELECT seq FROM refused) "
                "ORDER BY seq LIMIT ?",
                (after, limit),
            ).fetchall()
        return [(int(seq), str(record)) for seq, record in rows]

    def apply_ack(self, ack: Ack) -> tuple[int, int]:
        """Drop the records the ack covers; rejected ones move to the ``rejected`` table with the reason.
        Returns (acked, rejected) counts."""
        reasons = {r.seq: r.reason for r in ack.rejected if r.seq <= ack.acked_through}
        now = time.time()
        with self._transaction() as db:
            rows = db.execute("SELECT seq, record FROM outbox WHERE seq <= ?", (ack.acked_through,)).fetchall()
            for seq, record in rows:
                if seq in reasons:
                    db.execute(
                        "INSERT OR REPLACE INTO rejected (seq, record, reason, at) VALUES (?, ?, ?, ?)",
                        (seq, record, reasons[seq], now),
                    )
            db.execute("DELETE FROM outbox WHERE seq <= ?", (ack.acked_through,))
            db.execute("DELETE FROM refused WHERE seq <= ?", (ack.acked_through,))
        return len(rows) - sum(1 for seq, _ in rows if seq in reasons), sum(1 for seq, _ in rows if seq in reasons)

    def queued(self) -> int:
        """How many records wait to be sent or for the clearing's ack (the refused ones wait for the operator)."""
        with self._lock:
            return int(self._db.execute(_QUEUED).fetchone()[0])

    def refuse(self, seqs: Sequence[int], reason: str) -> None:
        """The broker refused these records: keep them in the outbox with the reason and the time, unsent."""
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO refused (seq, reason, at) SELECT seq, ?, ? FROM outbox WHERE seq = ?",
                [(reason, now, seq) for seq in seqs],
            )

    def refused(self) -> list[Refused]:
        """The records the broker refused, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT seq, reason, at FROM refused ORDER BY seq").fetchall()
        return [Refused(int(seq), str(reason), float(at)) for seq, reason, at in rows]

    def retry_refused(self) -> int:
        """Send the refused records again (the operator fixed what the broker refused): how many."""
        with self._transaction() as db:
            return db.execute("DELETE FROM refused").rowcount

    def link_error(self) -> tuple[str, float] | None:
        """The last connection failure the uplink kept and its time.time(), or None (connected since)."""
        error, at = self.get_meta("link_error"), self.get_meta("link_error_at")
        return None if error is None or at is None else (error, float(at))

    def note_link(self, error: str | None) -> None:
        """Keep the last connection failure for ``terminal status``, with its time; None (connected) clears it."""
        if error is None and self.get_meta("link_error") is None:
            return
        with self._transaction() as db:
            db.execute("DELETE FROM meta WHERE key IN ('link_error', 'link_error_at')")
            if error is not None:
                db.execute("INSERT INTO meta (key, value) VALUES ('link_error', ?)", (error,))
                db.execute("INSERT INTO meta (key, value) VALUES ('link_error_at', ?)", (repr(time.time()),))

    @property
    def next_seq(self) -> int:
        """The seq the next record will get."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        return 1 if row is None else int(row[0])

    def rejected(self) -> list[tuple[int, str, str]]:
        """Records the clearing refused: (seq, reason, JSON)."""
        with self._lock:
            rows = self._db.execute("SELECT seq, reason, record FROM rejected ORDER BY seq").fetchall()
        return [(int(s), str(r), str(j)) for s, r, j in rows]

    def counts(self) -> OutboxCounts:
        """What is waiting."""
        with self._lock:
            queued = self._db.execute(_QUEUED).fetchone()[0]
            refused = self._db.execute("SELECT COUNT(*) FROM refused").fetchone()[0]
            pending = self._db.execute("SELECT COUNT(*) FROM pending").fetchone()[0]
            rejected = self._db.execute("SELECT COUNT(*) FROM rejected").fetchone()[0]
            row = self._db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
        next_seq = 1 if row is None else int(row[0])
        return OutboxCounts(int(queued), int(pending), int(rejected), next_seq, int(refused))

    # --- interrupted payments --------------------------------------------------------------------------

    def set_pending(self, card: str, intent: BaseModel) -> None:
        """Journal a payment about to be sent to the card (before DEBIT or the first M1 write)."""
        # json.dumps of the plain dump: the same text as state files written before intents were models
        text = json.dumps(intent.model_dump(mode="json", exclude_none=True))
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO pending (card, intent, created) VALUES (?, ?, ?)", (card, text, time.time())
            )

    def pending(self, card: str, model: type[_Intent]) -> _Intent | None:
        """The journalled payment of a card, if one was interrupted, read as ``model``."""
        with self._lock:
            row = self._db.execute("SELECT intent FROM pending WHERE card = ?", (card,)).fetchone()
        return None if row is None else model.model_validate_json(row[0])

    def drop_pending(self, card: str) -> None:
        """Forget a journalled payment the card shows did not happen."""
        with self._transaction() as db:
            db.execute("DELETE FROM pending WHERE card = ?", (card,))

    def set_aside(self, card: str) -> None:
        """Keep a journalled payment the card can no longer settle, out of that card's way (it stays in the file
        and in ``counts().pending`` for the operator and the clearing's gap check)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE pending SET card = 'unsettled:' || card || ':' || CAST(created AS TEXT) WHERE card = ?", (card,)
            )

    # --- hotlists ----------------------------------------------------------------------------------------

    def hotlists(self) -> list[IssuerList]:
        """Every issuer's last hotlist (kept across restarts, so an offline terminal still refuses those cards). A
        row that cannot be read is logged and left out: that issuer's list comes again from the broker."""
        with self._lock:
            rows = self._db.execute("SELECT issuer, version, published, cards FROM hotlist ORDER BY issuer").fetchall()
        lists = []
        for issuer, version, published, cards in rows:
            try:
                lists.append(IssuerList.unpacked(str(issuer), int(version), str(published), bytes(cards)))
            except HotlistError as err:
                log.warning("%s: hotlist of %s version %s unreadable, left out: %s", self.path, issuer, version, err)
        return lists

    def save_hotlist(self, held: IssuerList) -> None:
        """Keep an issuer's newer hotlist in place of the one before."""
        packed = held.packed()
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO hotlist (issuer, version, published, cards) VALUES (?, ?, ?, ?)",
                (held.issuer, held.version, held.published, packed),
            )
