"""Storing verdicts: the ledger (once per record identity), the quarantine, flagged cards, and how far each
terminal's records are committed without a gap (what its ack may say).

Everything of one batch of messages goes into one transaction; the caller acks only after ``store`` returned,
that is after the commit. Several workers may write to one database at once: the unique constraint on the
record identity decides, and a record that lost the race is compared with the one that won.

A batch of 50 records or more goes in through the driver's bulk path (COPY on PostgreSQL, executemany on
SQLite); when that refuses it (a record already stored: COPY is all or nothing), the same records go in through
INSERT ... ON CONFLICT DO NOTHING RETURNING, so each record is still stored once: on PostgreSQL in the same
transaction (COPY runs inside a savepoint, rolled back on refusal), on SQLite in a new one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Insert,
    Select,
    String,
    Table,
    and_,
    bindparam,
    column,
    func,
    literal_column,
    select,
    tuple_,
    union,
    update,
    values,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from clearing.defaults import QUARANTINE_CAP
from clearing.intake import Accepted, Refused, Verdict, settlement_day, unexpected
from clearing.now_and_then import warn_now_and_then
from clearing.schema import (
    CITY_STATE,
    FLAGGED,
    FORWARD_ACKED,
    FORWARD_PENDING,
    FORWARD_REJECTED,
    HOTLIST,
    HOTLIST_VERSION,
    LEDGER,
    PROGRESS,
    QUARANTINE,
    SOURCE_INTEROP,
    SOURCE_TERMINAL,
    TALLY,
    VERSION_OF_CARD,
)
from terminals.hotlist import CardSet
from terminals.messages import CHINA, RECORD_ID, TERMINAL_NO, TxnRecord

log = logging.getLogger(__name__)
Identity = tuple[str, str, str, int]
_IDENTITY = (LEDGER.c.issuer, LEDGER.c.card, LEDGER.c.kind, LEDGER.c.card_counter)
ACK_CHUNK = 1000  # terminals per statement of the ack bookkeeping: 2-3 parameters each, far below the limits
IDENTITY_CHUNK = 5000  # identities per lookup statement: 4 parameters each (SQLite allows 32,766, PostgreSQL 65,535)
BULK_FROM = 50  # records in a batch from which the bulk insert pays (COPY has a fixed cost of its own)
QUARANTINE_KEEP = 64 * 1024  # bytes of a refused payload kept (with its length and SHA-256)
_SENDER_KEY = 64  # characters of a topic's terminal segment kept as the tally's sender
# SQLSTATE classes that blame the database, not the data: connection, rollback (deadlock, serialization),
# resources, operator intervention, system error, lock not available
_TROUBLE_STATES = ("08", "40", "53", "57", "58", "55P03")


@dataclass(frozen=True)
class HotlistAdded:
    """What one ``add_to_hotlist`` made: the new version, the cards new to the list, the cards now on it."""

    version: int
    added: int
    total: int


@dataclass(frozen=True)
class HotlistHead:
    """A city's current hotlist version and the version of its last full snapshot published (0: none)."""

    version: int
    snapshot: int


@dataclass(frozen=True)
class VersionTimes:
    """When a hotlist version was made and first published (epoch seconds; None: not published yet)."""

    version: int
    created: float
    published: float | None


@dataclass(frozen=True)
class ListedCard:
    """A card on the hotlist, the version that added it and when that version was first published."""

    card: str
    version: int
    published: float | None


@dataclass
class Received:
    """The verdicts of one MQTT message, with where it came from."""

    topic: str
    terminal: str | None  # the terminal of a terminal topic; None for a forwarded batch
    verdicts: list[Verdict]
    payload: bytes = b""  # the message as it came (quarantined whole when it cannot be stored at all)


@dataclass
class TerminalAck:
    """What to tell one terminal after the commit."""

    terminal: str
    acked_through: int
    rejected: list[tuple[int, str]]
    # records of the terminal stored above a gap: another worker may be committing the missing ones right now,
    # unseen by this transaction; asked again shortly (``Ledger.catch_up``) rather than left to the terminal's resend
    behind: bool = False


@dataclass
class InteropAnswer:
    """What to tell one acquiring city about the records it forwarded (record ids)."""

    acquirer: str
    acked: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Outcome:
    """What one ``store`` did."""

    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    conflicts: int = 0
    dropped: int = 0  # refused beyond the sender's daily quarantine cap: counted only
    poisoned: int = 0  # messages that could not be stored at all (quarantined whole, not acked)
    terminal_acks: list[TerminalAck] = field(default_factory=list)
    interop_answers: list[InteropAnswer] = field(default_factory=list)
    to_forward: list[TxnRecord] = field(default_factory=list)


def _insert(connection: AsyncConnection, table: Table) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that can say ON CONFLICT DO NOTHING on either backend."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def ledger_row(city: str, accepted: Accepted, source: str, now: float) -> dict[str, object]:
    """The ledger row of an accepted record (column -> value), received at ``now`` from ``source``."""
    record = accepted.record
    forward = FORWARD_PENDING if accepted.forward and source == SOURCE_TERMINAL else None
    return {
        "city": city,
        "issuer": record.card.issuer,
        "card": record.card.id,
        "kind": record.kind,
        "card_counter": record.card_counter,
        "tech": record.tech,
        "acquirer": record.acquirer,
        "terminal": record.terminal,
        "seq": record.seq,
        "terminal_seq": record.terminal_seq,
        "amount": record.amount,
        "balance_before": record.balance_before,
        "balance_after": record.balance_after,
        "time": record.time,
        "day": settlement_day(record),
        "tac": record.tac,
        "source": source,
        "forward": forward,
        "forward_reason": None,
        "record": accepted.canonical,
        "received": now,
    }


class _BulkRefused(Exception):
    """The bulk insert did not go through (a record already stored, on PostgreSQL, or anything the driver
    refused that does not blame the database): the records go in through the statement path."""


async def bulk_insert(db: AsyncConnection, rows: list[dict[str, object]]) -> int:
    """Insert ledger rows through the driver's fastest path; how many were new. PostgreSQL: COPY (several
    times cheaper on the server than INSERT ... ON CONFLICT), all or nothing, so one stored identity refuses
    it; it runs in a savepoint, so a refusal leaves the transaction as it was. SQLite: one prepared INSERT ...
    ON CONFLICT DO NOTHING run for every row (executemany); a refusal leaves the rows before it inserted.
    Database trouble propagates (the driver's own error); any other error raises ``_BulkRefused``."""
    columns = list(rows[0])
    values = [tuple(row.values()) for row in rows]
    driver = (await db.get_raw_connection()).driver_connection
    try:
        if driver is None:
            raise RuntimeError("the connection has no driver connection")
        if db.dialect.name == "postgresql":
            async with db.begin_nested():  # SAVEPOINT (and so the batch's BEGIN) before the COPY
                await driver.copy_records_to_table(LEDGER.name, records=values, columns=columns)
            return len(values)
        insert = _insert(db, LEDGER).on_conflict_do_nothing().compile(dialect=db.dialect, column_keys=columns)
        order = [columns.index(name) for name in insert.positiontup or ()]
        cursor = await driver.executemany(str(insert), [tuple(row[i] for i in order) for row in values])
        try:
            return int(cursor.rowcount)
        finally:
            await cursor.close()
    except Exception as err:
        if database_trouble(err):
            raise  # the batch stays unacked, as on the statement path
        raise _BulkRefused(f"{type(err).__name__}: {err}") from err


def database_trouble(err: BaseException) -> bool:
    """Whether an error blames the database (down, locked, deadlocked, out of resources) rather than the data
    being written: such a batch is left unacked and comes again; any other error is the data's fault. The
    drivers' own errors (the bulk insert's) are read as SQLAlchemy would wrap them."""
    if isinstance(err, DBAPIError):
        if err.connection_invalidated or isinstance(err, OperationalError | InterfaceError):
            return True
        return _trouble_state(err.orig) is True
    if isinstance(err, sqlite3.OperationalError):  # locked, busy, I/O: SQLAlchemy's OperationalError
        return True
    if type(err).__module__.startswith("asyncpg"):
        import asyncpg  # loaded already (the error is its own); a clearing on SQLite never pays its import

        # a lost or closed connection, with or without a SQLSTATE: SQLAlchemy's InterfaceError once wrapped
        if isinstance(err, asyncpg.PostgresConnectionError | asyncpg.InterfaceError):
            return True
    return _trouble_state(err) or isinstance(err, DisconnectionError | OSError | TimeoutError)


def _trouble_state(err: BaseException | None) -> bool | None:
    """Whether the SQLSTATE an error (or its cause) carries blames the database; None when it carries none."""
    while err is not None:
        state = getattr(err, "sqlstate", None) or getattr(err, "pgcode", None)
        if isinstance(state, str):
            return state.startswith(_TROUBLE_STATES)
        err = err.__cause__
    return None


def _merge(into: Outcome, part: Outcome) -> None:
    for name in ("stored", "duplicates", "quarantined", "conflicts", "dropped", "poisoned"):
        setattr(into, name, getattr(into, name) + getattr(part, name))
    acks = {ack.terminal: ack for ack in into.terminal_acks}
    for ack in part.terminal_acks:  # one ack per terminal: the later mark, every rejection
        if ack.terminal in acks:
            first = acks[ack.terminal]
            first.acked_through = max(first.acked_through, ack.acked_through)
            first.rejected = sorted(set(first.rejected) | set(ack.rejected))
        else:
            into.terminal_acks.append(ack)
    into.interop_answers += part.interop_answers
    into.to_forward += part.to_forward


def _identity_in(identities: Iterable[Identity]) -> ColumnElement[bool]:
    return tuple_(*_IDENTITY).in_(list(identities))


def _lowest_seqs(messages: Sequence[Received]) -> dict[str, int]:
    """The lowest seq each terminal sent in these messages (accepted or refused alike)."""
    lowest: dict[str, int] = {}
    for message in messages:
        if message.terminal is None or not TERMINAL_NO.match(message.terminal):
            continue  # a topic no terminal can own has nobody to ack (and no progress row to keep)
        seqs = [v.record.seq if isinstance(v, Accepted) else v.seq for v in message.verdicts]
        known = [s for s in seqs if s is not None]
        if known:
            lowest[message.terminal] = min(lowest.get(message.terminal, known[0]), *known)
    return lowest


class _AboveMarks:
    """Per terminal, as of one moment: its stored mark, the seqs above it in the ledger or the quarantine, and
    those of them in the quarantine."""

    def __init__(self, terminals: Sequence[str]) -> None:
        self.stored: dict[str, int] = {}
        self.seqs: dict[str, set[int]] = {t: set() for t in terminals}
        self.quarantined: dict[str, set[int]] = {t: set() for t in terminals}

    def gap_free(self, terminal: str, mark: int) -> int:
        """How far the terminal's seqs run on from ``mark`` without a gap."""
        through = mark
        while through + 1 in self.seqs[terminal]:
            through += 1
        return through

    def reasons_wanted(self, terminal: str, low: int, through: int) -> bool:
        """Whether the ack of seqs ``low``..``through`` must read rejection reasons: quarantined seqs above the
        stored mark are known; the range needs them when it holds one, or reaches at or below the stored mark
        (a resend)."""
        if low > through:
            return False
        return low <= self.stored.get(terminal, low) or any(low <= s <= through for s in self.quarantined[terminal])


class Ledger:
    """One city's clearing tables."""

    def __init__(
        self, engine: AsyncEngine, city: str, quarantine_cap: int = QUARANTINE_CAP, bulk_from: int = BULK_FROM
    ) -> None:
        self.engine = engine
        self.city = city
        self.quarantine_cap = quarantine_cap
        self.bulk_from = bulk_from
        self.bulk_fallbacks = 0  # batches the bulk insert refused (stored through the statement path instead)
        self._marks: dict[str, int] = {}  # terminal -> gap-free mark last seen (a lower bound)

    async def hotlist(self) -> frozenset[str]:
        """The cards on this city's hotlist."""
        async with self.engine.connect() as db:
            rows = await db.execute(select(HOTLIST.c.card).where(HOTLIST.c.city == self.city))
            return frozenset(rows.scalars())

    async def store(self, messages: Sequence[Received]) -> Outcome:
        """Store every verdict of these messages, in one transaction when nothing goes wrong; what to ack and
        forward afterwards. A message whose data the database refuses (or that raises anything else) costs
        itself alone: the batch is split until it stands alone, and it is quarantined whole with the error.
        Errors that blame the database itself (``database_trouble``) propagate: the batch stays unacked."""
        try:
            return await self._store(messages)
        except Exception as err:
            if database_trouble(err):
                raise
            if len(messages) > 1:
                middle = len(messages) // 2
                outcome = await self.store(messages[:middle])
                _merge(outcome, await self.store(messages[middle:]))
                return outcome
            return await self._poisoned(messages[0], err)

    async def _poisoned(self, message: Received, err: Exception) -> Outcome:
        """Quarantine a message that cannot be stored (no seq: it is not acked, its sender may send it again)."""
        refusal = Refused(unexpected("storing", err), message.payload)
        outcome = Outcome(poisoned=1)
        async with self.engine.begin() as db:
            await self._quarantine(db, [(refusal, message)], outcome, time.time())
        return outcome

    async def _store(self, messages: Sequence[Received]) -> Outcome:
        """One transaction, through the bulk path when it fits; if the bulk insert refuses the batch, through the
        statement path, which sorts it out (PostgreSQL: in the same transaction; SQLite: once more from scratch,
        in a new one)."""
        try:
            return await self._store_once(messages, self._bulk_fits(messages))
        except _BulkRefused:
            return await self._store_once(messages, bulk=False)

    def _bulk_refused(self, refusal: _BulkRefused) -> None:
        """Count a bulk insert's refusal and say so now and then: a stored identity (a resend another worker
        or a lost ack made) is expected; anything else there may be a bug the statement path hides."""
        self.bulk_fallbacks += 1
        warn_now_and_then(
            log,
            self.bulk_fallbacks,
            "clearing %s: bulk insert refused (%s); %d batches stored through the statement path so far",
            self.city,
            refusal,
            self.bulk_fallbacks,
        )

    def _bulk_fits(self, messages: Sequence[Received]) -> bool:
        """Whether the batch is worth a bulk insert: enough records, and none that this worker already acked
        (a resend: sure to collide with its stored copy)."""
        records = 0
        for message in messages:
            mark = self._marks.get(message.terminal, 0) if message.terminal is not None else 0
            for verdict in message.verdicts:
                if isinstance(verdict, Accepted):
                    if verdict.record.seq <= mark:
                        return False
                    records += 1
        return records >= self.bulk_from

    async def _store_once(self, messages: Sequence[Received], bulk: bool) -> Outcome:
        now = time.time()
        outcome = Outcome()
        accepted: dict[Identity, tuple[Accepted, Received]] = {}
        later: list[tuple[Accepted, Received]] = []  # further copies of an identity in this batch
        refused: list[tuple[Refused, Received]] = []
        for message in messages:
            for verdict in message.verdicts:
                if isinstance(verdict, Refused):
                    refused.append((verdict, message))
                elif verdict.record.identity in accepted:
                    later.append((verdict, message))
                else:
                    accepted[verdict.record.identity] = (verdict, message)
        async with self.engine.begin() as db:
            lost, in_ledger = (
                await self._insert_records(db, accepted, refused, outcome, now, bulk) if accepted else (set(), {})
            )
            # a later copy is judged against what the ledger now holds (a replay of the stored record is a
            # duplicate even when an earlier copy in this batch was a conflict)
            for copy, message in later:
                canonical = in_ledger[copy.record.identity]
                if canonical == copy.canonical:
                    outcome.duplicates += 1
                else:
                    refused.append((self._conflict(copy, TxnRecord.model_validate_json(canonical)), message))
            await self._quarantine(db, refused, outcome, now)
            outcome.terminal_acks = await self._terminal_acks(db, _lowest_seqs(messages))
        self._remember(outcome.terminal_acks)  # only after the commit: a rolled-back mark must not be remembered
        kept = [(a, m) for identity, (a, m) in accepted.items() if identity not in lost]
        outcome.interop_answers = self._interop_answers(kept, refused)
        outcome.to_forward = [a.record for a, m in kept if a.forward and m.terminal is not None]
        return outcome

    def _conflict(self, record: Accepted, stored: TxnRecord) -> Refused:
        where = f"terminal {stored.terminal} seq {stored.seq}"
        return Refused(
            f"conflict: record {record.record.record_id} is already in the ledger with other content ({where})",
            record.canonical.encode(),
            record.record.seq,
            record.record.record_id,
            record.record.acquirer,
            conflict=True,
        )

    async def _insert_records(
        self,
        db: AsyncConnection,
        accepted: dict[Identity, tuple[Accepted, Received]],
        refused: list[tuple[Refused, Received]],
        outcome: Outcome,
        now: float,
        bulk: bool,
    ) -> tuple[set[Identity], dict[Identity, str]]:
        """Insert what is new; a record whose identity is already stored is a duplicate when the content is the
        same, else a conflict (added to ``refused``). Returns the identities that were conflicts, and the
        canonical record the ledger holds for each identity."""
        rows = [
            ledger_row(self.city, a, SOURCE_TERMINAL if m.terminal is not None else SOURCE_INTEROP, now)
            for a, m in accepted.values()
        ]
        if bulk:
            try:
                stored = await bulk_insert(db, rows)
            except _BulkRefused as refusal:
                self._bulk_refused(refusal)
                if db.dialect.name != "postgresql":
                    raise  # rows before the refused one are in this transaction: a new one, from scratch
                bulk = False  # the savepoint rolled back: the transaction is as it was
            else:
                unsure = list(accepted) if stored < len(rows) else []  # which of them are new: the ledger says
        if not bulk:
            stmt: Insert = _insert(db, LEDGER).on_conflict_do_nothing().returning(*_IDENTITY)
            inserted = {tuple(r) for r in (await db.execute(stmt, rows)).all()}
            stored = len(inserted)
            unsure = [identity for identity in accepted if identity not in inserted]
        outcome.stored += stored
        new_among_unsure = stored - (len(accepted) - len(unsure))
        lost: set[Identity] = set()
        in_ledger = {identity: a.canonical for identity, (a, _) in accepted.items()}
        if not unsure:
            return lost, in_ledger
        same = 0
        for start in range(0, len(unsure), IDENTITY_CHUNK):
            found = await db.execute(
                select(*_IDENTITY, LEDGER.c.record).where(
                    LEDGER.c.city == self.city, _identity_in(unsure[start : start + IDENTITY_CHUNK])
                )
            )
            for issuer, card, kind, counter, canonical in found.all():
                mine, message = accepted[(issuer, card, kind, counter)]
                in_ledger[(issuer, card, kind, counter)] = canonical
                if canonical == mine.canonical:
                    same += 1
                else:
                    refused.append((self._conflict(mine, TxnRecord.model_validate_json(canonical)), message))
                    lost.add((issuer, card, kind, counter))
        outcome.duplicates += same - new_among_unsure
        return lost, in_ledger

    async def _quarantine(
        self, db: AsyncConnection, refused: list[tuple[Refused, Received]], outcome: Outcome, now: float
    ) -> None:
        """Keep each refusal (its first ``QUARANTINE_KEEP`` bytes, length and SHA-256) up to the sender's daily
        cap; beyond it only count it, so a flood cannot fill the disk. Conflicts flag their card either way."""
        if not refused:
            return
        day = dt.datetime.fromtimestamp(now, CHINA).date().isoformat()
        by_sender = [(r, m, _sender(m)) for r, m in refused]
        senders = sorted({sender for _, _, sender in by_sender})
        kept_before = dict(
            (
                await db.execute(
                    select(TALLY.c.sender, TALLY.c.kept).where(
                        TALLY.c.city == self.city, TALLY.c.day == day, TALLY.c.sender.in_(senders)
                    )
                )
            ).all()
        )
        kept = {sender: 0 for sender in senders}
        dropped = dict(kept)
        rows = []
        for r, m, sender in by_sender:
            if kept_before.get(sender, 0) + kept[sender] >= self.quarantine_cap:
                dropped[sender] += 1
                continue
            kept[sender] += 1
            rows.append(
                {
                    "city": self.city,
                    "topic": _text(m.topic),
                    "terminal": _text(m.terminal),
                    "seq": r.seq,
                    "record_id": _text(r.record_id),
                    "reason": _text(r.reason),
                    "payload": r.raw[:QUARANTINE_KEEP],
                    "size": len(r.raw),
                    "sha256": hashlib.sha256(r.raw).hexdigest(),
                    "received": now,
                }
            )
        tally = _insert(db, TALLY).values(
            [{"city": self.city, "sender": s, "day": day, "kept": kept[s], "dropped": dropped[s]} for s in senders]
        )
        await db.execute(
            tally.on_conflict_do_update(
                index_elements=[TALLY.c.city, TALLY.c.sender, TALLY.c.day],
                set_={"kept": TALLY.c.kept + tally.excluded.kept, "dropped": TALLY.c.dropped + tally.excluded.dropped},
            )
        )
        outcome.dropped += sum(dropped.values())
        if rows:
            await db.execute(QUARANTINE.insert(), rows)
        outcome.quarantined += len(rows)
        conflicts = [(r, parse_record_id(r.record_id)) for r, _ in refused if r.conflict and r.record_id]
        flags = [
            {
                "city": self.city,
                "issuer": identity[0],
                "card": identity[1],
                "record_id": r.record_id,
                "reason": r.reason,
                "received": now,
            }
            for r, identity in conflicts
            if identity is not None
        ]
        outcome.conflicts += len(flags)
        if flags:
            await db.execute(_insert(db, FLAGGED).on_conflict_do_nothing(), flags)

    async def catch_up(self, lowest: dict[str, int]) -> list[TerminalAck]:
        """The acks of terminals whose last ack stopped below a gap (``TerminalAck.behind``), as of now: the
        other workers' commits that filled it are visible by now. ``lowest``: the first seq each was not acked."""
        async with self.engine.begin() as db:
            acks = await self._terminal_acks(db, lowest)
        self._remember(acks)
        return acks

    def _remember(self, acks: Sequence[TerminalAck]) -> None:
        """The committed marks of these acks, as a safe start for the next (marks only grow)."""
        for ack in acks:
            self._marks[ack.terminal] = max(self._marks.get(ack.terminal, 0), ack.acked_through)

    async def _terminal_acks(self, db: AsyncConnection, lowest: dict[str, int]) -> list[TerminalAck]:
        """Per terminal: the new gap-free mark, and the quarantined seqs from the lowest seq it just sent
        (``lowest``) up to the mark (it still holds those; lower ones were acked before). A handful of statements
        per batch (per ``ACK_CHUNK`` terminals), however many terminals it holds."""
        terminals = sorted(lowest)  # one order for every worker: no deadlock on the progress rows
        new = [{"city": self.city, "terminal": t, "acked_through": 0} for t in terminals if t not in self._marks]
        if new:
            await db.execute(_insert(db, PROGRESS).on_conflict_do_nothing(), new)
        found = await self._above_marks(db, terminals)
        acks: list[TerminalAck] = []
        moved: list[tuple[str, int]] = []
        ask: list[tuple[str, int, int]] = []
        for terminal in terminals:
            # the mark only grows, so the one remembered here is a safe start even when other workers moved it on
            mark = max(self._marks.get(terminal, 0), found.stored.get(terminal, 0))
            through = found.gap_free(terminal, mark)
            if through > mark:
                moved.append((terminal, through))
            if found.reasons_wanted(terminal, lowest[terminal], through):
                ask.append((terminal, lowest[terminal], through))
            acks.append(TerminalAck(terminal, through, [], behind=any(s > through for s in found.seqs[terminal])))
        await self._move_marks(db, moved)
        rejected = await self._rejected(db, ask)
        for ack in acks:
            ack.rejected = sorted(rejected.get(ack.terminal, {}).items())
        return acks

    async def _move_marks(self, db: AsyncConnection, moved: Sequence[tuple[str, int]]) -> None:
        """Raise the terminals' stored marks (never lower one another worker raised further meanwhile)."""
        if not moved:
            return
        await db.execute(
            update(PROGRESS)
            .where(
                PROGRESS.c.city == self.city,
                PROGRESS.c.terminal == bindparam("b_terminal"),
                PROGRESS.c.acked_through < bindparam("b_through"),
            )
            .values(acked_through=bindparam("b_through")),
            [{"b_terminal": terminal, "b_through": through} for terminal, through in moved],
        )

    async def _above_marks(self, db: AsyncConnection, terminals: Sequence[str]) -> _AboveMarks:
        """The terminals' stored marks, the seqs above them in the ledger or the quarantine, and those of them in
        the quarantine. Marks and seqs come from one statement (per chunk), so from one moment."""

        def above(table: Table, in_quarantine: str, chunk: Sequence[str]) -> Select[str, int, int | None, str]:
            joined = PROGRESS.outerjoin(
                table,
                and_(
                    table.c.city == PROGRESS.c.city,
                    table.c.terminal == PROGRESS.c.terminal,
                    table.c.seq > PROGRESS.c.acked_through,
                ),
            )
            return (
                select(PROGRESS.c.terminal, PROGRESS.c.acked_through, table.c.seq, literal_column(in_quarantine))
                .select_from(joined)
                .where(PROGRESS.c.city == self.city, PROGRESS.c.terminal.in_(chunk))
            )

        found = _AboveMarks(terminals)
        for start in range(0, len(terminals), ACK_CHUNK):
            chunk = terminals[start : start + ACK_CHUNK]
            rows = await db.execute(union(above(LEDGER, "0", chunk), above(QUARANTINE, "1", chunk)))
            for terminal, mark, seq, in_quarantine in rows.all():
                found.stored[terminal] = int(mark)
                if seq is not None:
                    found.seqs[terminal].add(int(seq))
                    if in_quarantine:
                        found.quarantined[terminal].add(int(seq))
        return found

    async def _rejected(self, db: AsyncConnection, ranges: Sequence[tuple[str, int, int]]) -> dict[str, dict[int, str]]:
        """Quarantined seq -> reason per terminal, for the (terminal, lowest seq, highest seq) ranges."""
        out: dict[str, dict[int, str]] = {}
        for start in range(0, len(ranges), ACK_CHUNK):
            wanted = (
                values(column("terminal", String), column("low", BigInteger), column("high", BigInteger), name="wanted")
                .data(list(ranges[start : start + ACK_CHUNK]))
                .cte("wanted")
            )
            in_ledger = (
                select(LEDGER.c.id)
                .where(
                    LEDGER.c.city == self.city,
                    LEDGER.c.terminal == QUARANTINE.c.terminal,
                    LEDGER.c.seq == QUARANTINE.c.seq,
                )
                .exists()
            )
            rows = await db.execute(
                select(QUARANTINE.c.terminal, QUARANTINE.c.seq, QUARANTINE.c.reason)
                .join(
                    wanted,
                    and_(
                        QUARANTINE.c.city == self.city,
                        QUARANTINE.c.terminal == wanted.c.terminal,
                        QUARANTINE.c.seq.between(wanted.c.low, wanted.c.high),
                    ),
                )
                .where(~in_ledger)  # a forged copy of a stored seq must not make the terminal think it was refused
                .order_by(QUARANTINE.c.terminal, QUARANTINE.c.seq, QUARANTINE.c.id)  # the last reason of a seq
            )
            for terminal, seq, reason in rows.all():
                out.setdefault(str(terminal), {})[int(seq)] = str(reason)
        return out

    @staticmethod
    def _interop_answers(
        kept: list[tuple[Accepted, Received]], refused: list[tuple[Refused, Received]]
    ) -> list[InteropAnswer]:
        acks: dict[str, InteropAnswer] = {}
        for accepted, message in kept:
            if message.terminal is None:
                record = accepted.record
                acks.setdefault(record.acquirer, InteropAnswer(record.acquirer)).acked.append(record.record_id)
        for refusal, message in refused:
            # a record without a valid id or acquirer cannot be named to anyone: it stays in the quarantine
            named = refusal.record_id is not None and RECORD_ID.match(refusal.record_id)
            if message.terminal is None and named and refusal.acquirer is not None:
                answer = acks.setdefault(refusal.acquirer, InteropAnswer(refusal.acquirer))
                answer.rejected.append((str(refusal.record_id), refusal.reason))
        return list(acks.values())

    async def forward_done(self, issuer: str, acked: list[str], rejected: list[tuple[str, str]]) -> int:
        """Record the issuer city's answer on forwarded records (ids of other issuers are ignored); how many
        rows changed. The acked ones in one statement; each rejection carries its own reason."""

        def identity(record_id: str) -> Identity | None:
            found = parse_record_id(record_id)
            return found if found is not None and found[0] == issuer else None

        mine = (LEDGER.c.city == self.city, LEDGER.c.source == SOURCE_TERMINAL)
        changed = 0
        async with self.engine.begin() as db:
            ok = [i for i in map(identity, acked) if i is not None]
            if ok:
                result = await db.execute(
                    update(LEDGER).where(*mine, _identity_in(ok)).values(forward=FORWARD_ACKED, forward_reason=None)
                )
                changed += result.rowcount
            for record_id, reason in rejected:
                refused = identity(record_id)
                if refused is not None:
                    result = await db.execute(
                        update(LEDGER)
                        .where(*mine, _identity_in([refused]))
                        .values(forward=FORWARD_REJECTED, forward_reason=_text(reason))
                    )
                    changed += result.rowcount
        return changed

    async def pending_forwards(self, older_than: float, limit: int = 1000) -> list[TxnRecord]:
        """Records received before ``older_than`` (epoch seconds) still waiting for their issuer's answer."""
        async with self.engine.connect() as db:
            rows = await db.execute(
                select(LEDGER.c.record)
                .where(LEDGER.c.city == self.city, LEDGER.c.forward == FORWARD_PENDING, LEDGER.c.received < older_than)
                .order_by(LEDGER.c.id)
                .limit(limit)
            )
            return [TxnRecord.model_validate_json(r) for r in rows.scalars()]

    async def count_pending_forwards(self) -> int:
        """Forwarded records still waiting for their issuer's answer."""
        async with self.engine.connect() as db:
            found = await db.execute(
                select(func.count())
                .select_from(LEDGER)
                .where(LEDGER.c.city == self.city, LEDGER.c.forward == FORWARD_PENDING)
            )
            return int(found.scalar_one())

    async def counts(self) -> dict[str, int]:
        """Rows per table (and forward status) for this city."""
        async with self.engine.connect() as db:
            out: dict[str, int] = {}
            for name, table in (("ledger", LEDGER), ("quarantine", QUARANTINE), ("flagged", FLAGGED)):
                out[name] = int(
                    (
                        await db.execute(select(func.count()).select_from(table).where(table.c.city == self.city))
                    ).scalar_one()
                )
            status = await db.execute(
                select(LEDGER.c.forward, func.count())
                .where(LEDGER.c.city == self.city, LEDGER.c.forward.is_not(None))
                .group_by(LEDGER.c.forward)
            )
            for name, count in status.all():
                out[f"forward_{name}"] = int(count)
            return out

    async def quarantine_reasons(self, most: int = 10) -> list[tuple[str, int]]:
        """The commonest quarantine reasons with their counts."""
        async with self.engine.connect() as db:
            rows = await db.execute(
                select(QUARANTINE.c.reason, func.count().label("n"))
                .where(QUARANTINE.c.city == self.city)
                .group_by(QUARANTINE.c.reason)
                .order_by(func.count().desc())
                .limit(most)
            )
            return [(str(reason), int(n)) for reason, n in rows.all()]

    async def add_to_hotlist(self, cards: Sequence[str]) -> HotlistAdded:
        """Put cards on the hotlist as a new version (created now, not yet published), in one transaction: the
        version row and the cards new to the list, tagged with it (cards already listed keep their version)."""
        now = time.time()
        async with self.engine.begin() as db:
            await db.execute(
                _insert(db, CITY_STATE).on_conflict_do_nothing(),
                {"city": self.city, "hotlist_version": 0, "snapshot_version": 0},
            )
            # the UPDATE takes the city's row lock (PostgreSQL): concurrent adds get one version each
            version = (
                await db.execute(
                    update(CITY_STATE)
                    .where(CITY_STATE.c.city == self.city)
                    .values(hotlist_version=CITY_STATE.c.hotlist_version + 1)
                    .returning(CITY_STATE.c.hotlist_version)
                )
            ).scalar_one()
            await db.execute(
                HOTLIST_VERSION.insert(), {"city": self.city, "version": version, "created": now, "published": None}
            )
            if cards:
                await db.execute(
                    _insert(db, HOTLIST).on_conflict_do_nothing(),
                    [{"city": self.city, "card": card, "added": now, "version": version} for card in cards],
                )
            counts = await db.execute(
                select(func.count(), func.count().filter(HOTLIST.c.version == version)).where(
                    HOTLIST.c.city == self.city
                )
            )
            total, added = counts.one()
        return HotlistAdded(int(version), int(added), int(total))

    async def hotlist_head(self) -> HotlistHead:
        """The current hotlist version and that of the last snapshot published (0 and 0: never hotlisted)."""
        async with self.engine.connect() as db:
            found = await db.execute(
                select(CITY_STATE.c.hotlist_version, CITY_STATE.c.snapshot_version).where(
                    CITY_STATE.c.city == self.city
                )
            )
            row = found.one_or_none()
        return HotlistHead(0, 0) if row is None else HotlistHead(int(row[0]), int(row[1]))

    async def snapshot_chunks(self) -> int:
        """How many chunk topics the last full snapshot published filled (0: none yet)."""
        async with self.engine.connect() as db:
            found = await db.execute(select(CITY_STATE.c.snapshot_chunks).where(CITY_STATE.c.city == self.city))
            return int(found.scalar_one_or_none() or 0)

    async def hotlist_versions(self, after: int = 0) -> list[VersionTimes]:
        """The versions above ``after`` with when each was made and first published, oldest first."""
        async with self.engine.connect() as db:
            rows = await db.execute(
                select(HOTLIST_VERSION.c.version, HOTLIST_VERSION.c.created, HOTLIST_VERSION.c.published)
                .where(HOTLIST_VERSION.c.city == self.city, HOTLIST_VERSION.c.version > after)
                .order_by(HOTLIST_VERSION.c.version)
            )
            return [VersionTimes(int(v), float(c), None if p is None else float(p)) for v, c, p in rows.all()]

    async def hotlist_added(self, after: int) -> dict[int, list[str]]:
        """The cards each version above ``after`` added (sorted), by version."""
        async with self.engine.connect() as db:
            rows = await db.execute(
                select(HOTLIST.c.version, HOTLIST.c.card)
                .where(HOTLIST.c.city == self.city, HOTLIST.c.version > after)
                .order_by(HOTLIST.c.version, HOTLIST.c.card)
            )
            added: dict[int, list[str]] = {}
            for version, card in rows.all():
                added.setdefault(int(version), []).append(str(card))
            return added

    async def hotlist_cards(self, through: int) -> CardSet:
        """The list as of version ``through``: every card a version up to it added."""
        async with self.engine.connect() as db:
            rows = await db.execute(
                select(HOTLIST.c.card).where(HOTLIST.c.city == self.city, HOTLIST.c.version <= through)
            )
            return CardSet.of(rows.scalars())

    async def hotlist_entries(self) -> list[ListedCard]:
        """Every card on the list with the version that added it and when that version was first published."""
        async with self.engine.connect() as db:
            joined = HOTLIST.outerjoin(HOTLIST_VERSION, VERSION_OF_CARD)
            rows = await db.execute(
                select(HOTLIST.c.card, HOTLIST.c.version, HOTLIST_VERSION.c.published)
                .select_from(joined)
                .where(HOTLIST.c.city == self.city)
                .order_by(HOTLIST.c.card)
            )
            return [ListedCard(str(c), int(v), None if p is None else float(p)) for c, v, p in rows.all()]

    async def mark_published(self, version: int, when: float, *, snapshot: bool = False, chunks: int = 0) -> None:
        """The broker confirmed the list through ``version``: each version up to it not yet published was
        published at ``when``; with ``snapshot``, a full snapshot of ``version`` in ``chunks`` chunks is out (never
        lowered)."""
        async with self.engine.begin() as db:
            await db.execute(
                update(HOTLIST_VERSION)
                .where(
                    HOTLIST_VERSION.c.city == self.city,
                    HOTLIST_VERSION.c.version <= version,
                    HOTLIST_VERSION.c.published.is_(None),
                )
                .values(published=when)
            )
            if snapshot:
                await db.execute(
                    update(CITY_STATE)
                    .where(CITY_STATE.c.city == self.city, CITY_STATE.c.snapshot_version < version)
                    .values(snapshot_version=version, snapshot_chunks=chunks)
                )


def _text(value: str | None, most: int = 2000) -> str | None:
    """Text a hostile payload made, fit for any database: NUL (PostgreSQL text cannot hold it) and lone
    surrogates (not UTF-8) kept visible as escapes, and cut at ``most`` characters."""
    if value is None:
        return None
    return value[:most].replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()


def _sender(message: Received) -> str:
    """Whom a refusal is counted against: the topic's terminal segment (whatever it is), or the interop topic."""
    return str(_text(message.terminal, _SENDER_KEY)) if message.terminal is not None else "interop"


def parse_record_id(record_id: str) -> Identity | None:
    """``issuer-card-kind-counter`` as an identity tuple; None when it is not one."""
    parts = record_id.split("-")
    if len(parts) != 4 or not parts[3].isdigit():
        return None
    return parts[0], parts[1], parts[2], int(parts[3])
