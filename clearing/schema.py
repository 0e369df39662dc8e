"""The clearing database: SQLAlchemy 2 typed ORM tables. One database may hold the ledgers of several cities
(the demo does that); every table is keyed by the clearing ``city`` that owns the row.

The schema is created and changed only by the Alembic migrations in ``clearing/migrations``; these classes
must match them (a test compares the migrated database with this metadata)."""

from __future__ import annotations

from typing import Final, cast

from sqlalchemy import BigInteger, Index, Integer, LargeBinary, MetaData, String, Table, Text, UniqueConstraint, and_
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base with stable constraint names (Alembic needs them to alter SQLite tables)."""

    metadata = MetaData(naming_convention=NAMING)


# forward status of a record of another city's card, kept by the acquirer
FORWARD_PENDING = "pending"
FORWARD_ACKED = "acked"
FORWARD_REJECTED = "rejected"

# where a ledger row came from
SOURCE_TERMINAL = "terminal"  # one of this city's terminals
SOURCE_INTEROP = "interop"  # forwarded by the acquiring city's clearing (this city issued the card)


class LedgerRow(Base):
    """One accepted transaction record, stored once per clearing city (unique on the record identity)."""

    __tablename__ = "ledger"
    __table_args__ = (
        UniqueConstraint("city", "issuer", "card", "kind", "card_counter"),
        Index(None, "city", "terminal", "seq"),
        Index(None, "city", "day"),
        Index(None, "city", "forward"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    city: Mapped[str] = mapped_column(String(4))
    issuer: Mapped[str] = mapped_column(String(4))
    card: Mapped[str] = mapped_column(String(20))
    kind: Mapped[str] = mapped_column(String(12))
    card_counter: Mapped[int] = mapped_column(Integer)
    tech: Mapped[str] = mapped_column(String(3))
    acquirer: Mapped[str] = mapped_column(String(4))
    terminal: Mapped[str] = mapped_column(String(12))
    seq: Mapped[int] = mapped_column(BigInteger)
    terminal_seq: Mapped[int] = mapped_column(BigInteger)
    amount: Mapped[int] = mapped_column(Integer)
    balance_before: Mapped[int] = mapped_column(Integer)
    balance_after: Mapped[int] = mapped_column(Integer)
    time: Mapped[str] = mapped_column(String(40))
    day: Mapped[str] = mapped_column(String(10))  # settlement day (+08:00), YYYY-MM-DD
    tac: Mapped[str] = mapped_column(String(8))
    source: Mapped[str] = mapped_column(String(8))
    forward: Mapped[str | None] = mapped_column(String(8))
    forward_reason: Mapped[str | None] = mapped_column(Text)
    record: Mapped[str] = mapped_column(Text)  # the record's canonical JSON (content compared for conflicts)
    received: Mapped[float] = mapped_column()


class QuarantineRow(Base):
    """A payload or record the clearing refused, with the reason, kept as it arrived."""

    __tablename__ = "quarantine"
    __table_args__ = (Index(None, "city", "terminal", "seq"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    city: Mapped[str] = mapped_column(String(4))
    topic: Mapped[str] = mapped_column(Text)
    terminal: Mapped[str | None] = mapped_column(Text)  # from the topic (who sent it)
    seq: Mapped[int | None] = mapped_column(BigInteger)  # when the record names one
    record_id: Mapped[str | None] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    payload: Mapped[bytes] = mapped_column(LargeBinary)  # raw bytes (the first 64 KiB; size says how big)
    size: Mapped[int] = mapped_column(Integer)
    received: Mapped[float] = mapped_column()
    sha256: Mapped[str | None] = mapped_column(String(64))  # of the whole payload (rows before 0002: none)


class QuarantineTally(Base):
    """Refusals per sender (a topic's terminal segment, or ``interop``) and day (+08:00): how many were kept in
    the quarantine and how many only counted once the sender passed its daily cap."""

    __tablename__ = "quarantine_tally"

    city: Mapped[str] = mapped_column(String(4), primary_key=True)
    sender: Mapped[str] = mapped_column(String(64), primary_key=True)
    day: Mapped[str] = mapped_column(String(10), primary_key=True)
    kept: Mapped[int] = mapped_column(BigInteger, default=0)
    dropped: Mapped[int] = mapped_column(BigInteger, default=0)


class FlaggedCard(Base):
    """A card with conflicting records (a clone or a forgery): for the reviewer and the hotlist."""

    __tablename__ = "flagged_card"
    __table_args__ = (UniqueConstraint("city", "issuer", "card", "record_id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    city: Mapped[str] = mapped_column(String(4))
    issuer: Mapped[str] = mapped_column(String(4))
    card: Mapped[str] = mapped_column(String(20))
    record_id: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    received: Mapped[float] = mapped_column()


class HotlistCard(Base):
    """A card on a city's hotlist, with the hotlist version that added it."""

    __tablename__ = "hotlist_card"
    __table_args__ = (UniqueConstraint("city", "card"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    city: Mapped[str] = mapped_column(String(4))
    card: Mapped[str] = mapped_column(String(20))
    added: Mapped[float] = mapped_column()
    version: Mapped[int] = mapped_column(Integer, server_default="0")


class HotlistVersion(Base):
    """One version of a city's hotlist: when it was made and when it was first published to a broker (epoch
    seconds; None until then). Liability for a hotlisted card's records counts from ``published``."""

    __tablename__ = "hotlist_version"

    city: Mapped[str] = mapped_column(String(4), primary_key=True)
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    created: Mapped[float] = mapped_column()
    published: Mapped[float | None] = mapped_column()


class CityState(Base):
    """Per-city counters: the hotlist version, and the version of the last full snapshot published (0: none) with
    its chunk count (the chunk topics a later, smaller snapshot must clear)."""

    __tablename__ = "city_state"

    city: Mapped[str] = mapped_column(String(4), primary_key=True)
    hotlist_version: Mapped[int] = mapped_column(Integer, default=0)
    snapshot_version: Mapped[int] = mapped_column(Integer, server_default="0")
    snapshot_chunks: Mapped[int] = mapped_column(Integer, server_default="0")


class TerminalProgress(Base):
    """How far each terminal's records are committed without a gap (what the last ack said)."""

    __tablename__ = "terminal_progress"

    city: Mapped[str] = mapped_column(String(4), primary_key=True)
    terminal: Mapped[str] = mapped_column(String(12), primary_key=True)
    acked_through: Mapped[int] = mapped_column(BigInteger, default=0)


def _table(model: type[Base]) -> Table:
    """A model's Core table, for the bulk statements (the declarative ``__table__`` is typed as any FromClause)."""
    return cast(Table, model.__table__)


LEDGER = _table(LedgerRow)
QUARANTINE = _table(QuarantineRow)
TALLY = _table(QuarantineTally)
FLAGGED = _table(FlaggedCard)
HOTLIST = _table(HotlistCard)
HOTLIST_VERSION = _table(HotlistVersion)
VERSION_OF_CARD: Final = and_(HOTLIST_VERSION.c.city == HOTLIST.c.city, HOTLIST_VERSION.c.version == HOTLIST.c.version)
"""Joins a hotlisted card to the list version that added it."""
CITY_STATE = _table(CityState)
PROGRESS = _table(TerminalProgress)
