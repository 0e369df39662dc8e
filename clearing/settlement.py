"""Daily settlement between cities (wire.md) and the daily clearing files.

For one settlement day and each pair (acquirer A, issuer B ≠ A): gross is the sum of purchase amounts
(purchase, metro entry and metro exit) of B's cards at A's terminals; the fee is the interchange rate times
each record's amount, rounded half-even to whole fen per record and summed; B owes A gross - fee. A city's
net position is what it is owed minus what it owes, so the positions of all cities sum to exactly 0 fen.
Only records the issuer has acked (or that need no issuer: A = B) are settled.

Liability by time (issue 19): a debit of a card on its issuer's hotlist taken at time t, the card added by a list
version published at P, is the issuer's when t <= P + grace(A, B) (it stays in the gross) and the acquirer's loss
when t > P + grace (B owes nothing for it). A version never published is the issuer's. Each pair line states both
amounts; the settlement lists every such record (docs/clearing-choices.md).
"""

from __future__ import annotations

import csv
import datetime as dt
import enum
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Final, TypedDict

from sqlalchemy import and_, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.defaults import DEFAULT_GRACE
from clearing.schema import (
    FORWARD_ACKED,
    FORWARD_PENDING,
    FORWARD_REJECTED,
    HOTLIST,
    HOTLIST_VERSION,
    LEDGER,
    SOURCE_TERMINAL,
    VERSION_OF_CARD,
)
from terminals.messages import CHINA

SETTLEMENT_SCHEMA: Final = "yikatong.settlement/1"
"""Still /1: the hotlist fields are additions a reader of the first layout skips (docs/clearing-choices.md)."""
DEFAULT_RATE = Decimal("0.005")
DEBIT_KINDS = ("purchase", "metro_entry", "metro_exit")
CSV_HEADER = [
    "record_id",
    "acquirer",
    "issuer",
    "terminal",
    "terminal_seq",
    "card",
    "card_counter",
    "kind",
    "amount",
    "balance_before",
    "balance_after",
    "time",
    "tac",
]


def fee(amount: int, rate: Decimal) -> int:
    """The interchange fee of one record in whole fen, rounded half-even."""
    return int((Decimal(amount) * rate).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def record_id(issuer: str, card: str, kind: str, counter: int) -> str:
    """A record's id (wire.md) from its identity columns."""
    return f"{issuer}-{card}-{kind}-{counter}"


class Liable(enum.StrEnum):
    """Who bears a debit of a hotlisted card."""

    ISSUER = "issuer"  # within publish time + grace: settled as any record
    ACQUIRER = "acquirer"  # after it: the acquirer's terminals could have refused the card


@dataclass(frozen=True)
class Grace:
    """Seconds from a hotlist version's publish time until acquirer A's terminals are expected to enforce issuer
    B's list: ``pairs[(A, B)]``, else ``default``."""

    default: int = DEFAULT_GRACE
    pairs: Mapping[tuple[str, str], int] = field(default_factory=dict)

    def of(self, acquirer: str, issuer: str) -> int:
        """The grace of one pair, in seconds."""
        return self.pairs.get((acquirer, issuer), self.default)


@dataclass(frozen=True)
class Hotlisted:
    """A debit of a card on its issuer's hotlist: the record, and the list version that added the card with its
    publish time (None: never published)."""

    record_id: str
    acquirer: str
    issuer: str
    time: str  # the record's time as the terminal wrote it (ISO 8601 with offset)
    amount: int
    version: int
    published: dt.datetime | None

    def liable(self, grace: int) -> Liable:
        """The acquirer's when the record was taken after publish time + ``grace`` seconds; else the issuer's."""
        if self.published is None:
            return Liable.ISSUER
        late = dt.datetime.fromisoformat(self.time) > self.published + dt.timedelta(seconds=grace)
        return Liable.ACQUIRER if late else Liable.ISSUER


@dataclass(frozen=True)
class Liability:
    """A hotlisted debit judged with its pair's grace."""

    record: Hotlisted
    grace: int
    liable: Liable


def published_text(moment: dt.datetime | None) -> str | None:
    """A publish time as the settlement file writes it (ISO 8601, +08:00, to the microsecond)."""
    return None if moment is None else moment.astimezone(CHINA).isoformat()


class PairDoc(TypedDict):
    """One pair of cities in the settlement file. ``records``, ``gross`` and ``fee`` cover what the issuer pays
    for: records of hotlisted cards on the issuer's side of the grace period are in them (and in
    ``hotlisted_issuer_fen``), those past it are not (``hotlisted_acquirer_fen``: the acquirer's loss)."""

    acquirer: str
    issuer: str
    records: int
    gross: int
    fee: int
    rate: str
    issuer_owes_acquirer: int
    hotlist_grace_seconds: int
    hotlisted_issuer_fen: int
    hotlisted_acquirer_fen: int


class HotlistedDoc(TypedDict):
    """One debit of a hotlisted card in the settlement file, with whom it is charged to."""

    record_id: str
    acquirer: str
    issuer: str
    time: str
    amount: int
    version: int
    published: str | None
    grace_seconds: int
    liable: str


class SettlementDoc(TypedDict):
    """The settlement file, ``settlement-DAY.json``. ``hotlist_versions``: the newest version of each issuer's
    hotlist that the settlement knew (0: none), so a reader sees which lists the liability rule was applied with."""

    schema: str
    day: str
    pairs: list[PairDoc]
    positions: dict[str, int]
    net_sum: int
    unsettled: dict[str, int]
    hotlisted: list[HotlistedDoc]
    hotlist_versions: dict[str, int]


@dataclass(frozen=True)
class PairLine:
    """What issuer ``issuer`` owes acquirer ``acquirer`` for the day."""

    acquirer: str
    issuer: str
    records: int
    gross: int
    fee: int
    rate: Decimal
    grace: int = DEFAULT_GRACE
    hotlisted_issuer: int = 0  # fen of hotlisted cards' records in the gross (the issuer's liability)
    hotlisted_acquirer: int = 0  # fen of hotlisted cards' records left out (the acquirer's loss)

    @property
    def owed(self) -> int:
        """gross - fee: what the issuer pays the acquirer."""
        return self.gross - self.fee

    @property
    def hotlisted(self) -> tuple[int, int]:
        """(fen the issuer bears, fen the acquirer bears) of hotlisted cards' records."""
        return self.hotlisted_issuer, self.hotlisted_acquirer


@dataclass
class Settlement:
    """One day's settlement."""

    day: str
    lines: list[PairLine]
    unsettled: dict[str, int] = field(default_factory=dict)  # forward status -> records left out
    hotlisted: list[Liability] = field(default_factory=list)
    hotlist_versions: dict[str, int] = field(default_factory=dict)

    @property
    def positions(self) -> dict[str, int]:
        """Net position per city (owed - owes), in fen."""
        net: dict[str, int] = defaultdict(int)
        for line in self.lines:
            net[line.acquirer] += line.owed
            net[line.issuer] -= line.owed
        return dict(sorted(net.items()))

    def to_json(self) -> SettlementDoc:
        """A JSON-ready summary."""
        return {
            "schema": SETTLEMENT_SCHEMA,
            "day": self.day,
            "pairs": [
                {
                    "acquirer": x.acquirer,
                    "issuer": x.issuer,
                    "records": x.records,
                    "gross": x.gross,
                    "fee": x.fee,
                    "rate": str(x.rate),
                    "issuer_owes_acquirer": x.owed,
                    "hotlist_grace_seconds": x.grace,
                    "hotlisted_issuer_fen": x.hotlisted_issuer,
                    "hotlisted_acquirer_fen": x.hotlisted_acquirer,
                }
                for x in self.lines
            ],
            "positions": self.positions,
            "net_sum": sum(self.positions.values()),
            "unsettled": self.unsettled,
            "hotlisted": [
                {
                    "record_id": x.record.record_id,
                    "acquirer": x.record.acquirer,
                    "issuer": x.record.issuer,
                    "time": x.record.time,
                    "amount": x.record.amount,
                    "version": x.record.version,
                    "published": published_text(x.record.published),
                    "grace_seconds": x.grace,
                    "liable": x.liable.value,
                }
                for x in self.hotlisted
            ],
            "hotlist_versions": self.hotlist_versions,
        }


@dataclass
class _Total:
    records: int = 0
    gross: int = 0
    fee: int = 0
    hotlisted_issuer: int = 0
    hotlisted_acquirer: int = 0

    def line(self, acquirer: str, issuer: str, rate: Decimal, grace: int) -> PairLine:
        return PairLine(
            acquirer,
            issuer,
            self.records,
            self.gross,
            self.fee,
            rate,
            grace,
            self.hotlisted_issuer,
            self.hotlisted_acquirer,
        )


def settle(
    day: str,
    debits: Iterable[tuple[str, str, int, int]],
    rates: Mapping[tuple[str, str], Decimal],
    default: Decimal = DEFAULT_RATE,
    hotlisted: Iterable[Hotlisted] = (),
    grace: Grace = Grace(),
) -> Settlement:
    """Settle debits of other cities' cards given as (acquirer, issuer, amount, how many records of that
    amount); ``rates`` per pair, else ``default``. The fee is rounded per record, so equal amounts share it.
    ``hotlisted``: each debit of a card on its issuer's hotlist (not also in ``debits``), judged with ``grace``:
    the issuer's are settled like the others, the acquirer's are only counted."""
    totals: dict[tuple[str, str], _Total] = defaultdict(_Total)

    def debit(pair: tuple[str, str], amount: int, count: int) -> _Total:
        total = totals[pair]
        total.records += count
        total.gross += amount * count
        total.fee += fee(amount, rates.get(pair, default)) * count
        return total

    for acquirer, issuer, amount, count in debits:
        debit((acquirer, issuer), amount, count)
    judged = []
    for record in hotlisted:
        pair = (record.acquirer, record.issuer)
        liability = Liability(record, grace.of(*pair), record.liable(grace.of(*pair)))
        judged.append(liability)
        if liability.liable is Liable.ISSUER:
            debit(pair, record.amount, 1).hotlisted_issuer += record.amount
        else:
            totals[pair].hotlisted_acquirer += record.amount
    lines = [t.line(a, i, rates.get((a, i), default), grace.of(a, i)) for (a, i), t in sorted(totals.items())]
    return Settlement(day, lines, hotlisted=sorted(judged, key=lambda x: (x.record.acquirer, x.record.record_id)))


def publish_moment(epoch: float | None) -> dt.datetime | None:
    """A stored publish time (epoch seconds, NULL: never published) as a time in +08:00."""
    return None if epoch is None else dt.datetime.fromtimestamp(epoch, CHINA)


async def settle_day(
    engine: AsyncEngine,
    day: str,
    rates: Mapping[tuple[str, str], Decimal],
    default: Decimal = DEFAULT_RATE,
    acquirer: str | None = None,
    grace: Grace = Grace(),
) -> Settlement:
    """Settle a day from the acquirers' ledgers in this database (all cities in it, or one acquirer). The
    issuers' hotlist history is read from the same database: an issuer whose lists are not in it has none."""
    where = [
        LEDGER.c.day == day,
        LEDGER.c.source == SOURCE_TERMINAL,
        LEDGER.c.issuer != LEDGER.c.acquirer,
        LEDGER.c.kind.in_(DEBIT_KINDS),
    ]
    if acquirer is not None:
        where.append(LEDGER.c.acquirer == acquirer)
    # only the card's own issuer's list counts: a card another city blocked is refused at that city's intake
    listed = and_(HOTLIST.c.city == LEDGER.c.issuer, HOTLIST.c.card == LEDGER.c.card)
    async with engine.connect() as db:
        rows = await db.execute(
            select(LEDGER.c.acquirer, LEDGER.c.issuer, LEDGER.c.amount, func.count())
            .where(*where, LEDGER.c.forward == FORWARD_ACKED, ~select(HOTLIST.c.id).where(listed).exists())
            .group_by(LEDGER.c.acquirer, LEDGER.c.issuer, LEDGER.c.amount)
        )
        debits = [(str(a), str(i), int(amount), int(n)) for a, i, amount, n in rows.all()]
        hot = await db.execute(
            select(
                LEDGER.c.issuer,
                LEDGER.c.card,
                LEDGER.c.kind,
                LEDGER.c.card_counter,
                LEDGER.c.acquirer,
                LEDGER.c.time,
                LEDGER.c.amount,
                HOTLIST.c.version,
                HOTLIST_VERSION.c.published,
            )
            .select_from(LEDGER.join(HOTLIST, listed).outerjoin(HOTLIST_VERSION, VERSION_OF_CARD))
            .where(*where, LEDGER.c.forward == FORWARD_ACKED)
        )
        hotlisted = [
            Hotlisted(record_id(i, card, kind, counter), a, i, time, amount, v, publish_moment(published))
            for i, card, kind, counter, a, time, amount, v, published in hot.all()
        ]
        settlement = settle(day, debits, rates, default, hotlisted, grace)
        left = await db.execute(
            select(LEDGER.c.forward, func.count())
            .where(*where, LEDGER.c.forward.in_((FORWARD_PENDING, FORWARD_REJECTED)))
            .group_by(LEDGER.c.forward)
        )
        settlement.unsettled = {str(status): int(n) for status, n in left.all()}
        newest = await db.execute(
            select(HOTLIST_VERSION.c.city, func.max(HOTLIST_VERSION.c.version)).group_by(HOTLIST_VERSION.c.city)
        )
        known = {str(city): int(v) for city, v in newest.all()}
    settlement.hotlist_versions = {i: known.get(i, 0) for i in sorted({x.issuer for x in settlement.lines})}
    return settlement


async def export_day(engine: AsyncEngine, day: str, folder: Path, acquirer: str | None = None) -> dict[str, int]:
    """Write ``clearing-{acquirer}-{day}.csv`` for every acquirer with records that day (issuer-rejected
    forwards left out). Each file is written to a temporary name and renamed, so none is ever half-written.
    Returns records per file name."""
    folder.mkdir(parents=True, exist_ok=True)
    where = [
        LEDGER.c.day == day,
        LEDGER.c.source == SOURCE_TERMINAL,
        LEDGER.c.forward.is_distinct_from(FORWARD_REJECTED),
    ]
    if acquirer is not None:
        where.append(LEDGER.c.acquirer == acquirer)
    columns = [LEDGER.c[name] for name in CSV_HEADER[1:] if name != "card"]
    written: dict[str, int] = {}
    async with engine.connect() as db:
        acquirers = (await db.execute(select(LEDGER.c.acquirer).where(*where).distinct())).scalars().all()
        for city in sorted(acquirers):
            name = f"clearing-{city}-{day}.csv"
            temp = folder / f".{name}.part"
            count = 0
            with temp.open("w", newline="", encoding="utf-8") as out:
                writer = csv.writer(out)
                writer.writerow(CSV_HEADER)
                rows = await db.stream(
                    select(LEDGER.c.card, *columns)
                    .where(*where, LEDGER.c.acquirer == city)
                    .order_by(LEDGER.c.terminal, LEDGER.c.seq)
                )
                async for row in rows:
                    values = dict(row._mapping)
                    values["record_id"] = record_id(
                        values["issuer"], values["card"], values["kind"], values["card_counter"]
                    )
                    writer.writerow([values[name] for name in CSV_HEADER])
                    count += 1
                out.flush()
                os.fsync(out.fileno())
            temp.replace(folder / name)
            written[name] = count
    return written
