"""Daily settlement between cities (wire.md) and the daily clearing files.

For one settlement day and each pair (acquirer A, issuer B ≠ A): gross is the sum of purchase amounts
(purchase, metro entry and metro exit) of B's cards at A's terminals; the fee is the interchange rate times
each record's amount, rounded half-even to whole fen per record and summed; B owes A gross - fee. A city's
net position is what it is owed minus what it owes, so the positions of all cities sum to exactly 0 fen.
Only records the issuer has acked (or that need no issuer: A = B) are settled.
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Final, TypedDict

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.schema import FORWARD_ACKED, FORWARD_PENDING, FORWARD_REJECTED, LEDGER, SOURCE_TERMINAL

SETTLEMENT_SCHEMA: Final = "yikatong.settlement/1"
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


class PairDoc(TypedDict):
    """One pair of cities in the settlement file."""

    acquirer: str
    issuer: str
    records: int
    gross: int
    fee: int
    rate: str
    issuer_owes_acquirer: int


class SettlementDoc(TypedDict):
    """The settlement file, ``settlement-DAY.json``."""

    schema: str
    day: str
    pairs: list[PairDoc]
    positions: dict[str, int]
    net_sum: int
    unsettled: dict[str, int]


@dataclass(frozen=True)
class PairLine:
    """What issuer ``issuer`` owes acquirer ``acquirer`` for the day."""

    acquirer: str
    issuer: str
    records: int
    gross: int
    fee: int
    rate: Decimal

    @property
    def owed(self) -> int:
        """gross - fee: what the issuer pays the acquirer."""
        return self.gross - self.fee


@dataclass
class Settlement:
    """One day's settlement."""

    day: str
    lines: list[PairLine]
    unsettled: dict[str, int] = field(default_factory=dict)  # forward status -> records left out

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
                }
                for x in self.lines
            ],
            "positions": self.positions,
            "net_sum": sum(self.positions.values()),
            "unsettled": self.unsettled,
        }


def settle(
    day: str,
    debits: Iterable[tuple[str, str, int, int]],
    rates: Mapping[tuple[str, str], Decimal],
    default: Decimal = DEFAULT_RATE,
) -> Settlement:
    """Settle debits of other cities' cards given as (acquirer, issuer, amount, how many records of that
    amount); ``rates`` per pair, else ``default``. The fee is rounded per record, so equal amounts share it."""
    totals: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for acquirer, issuer, amount, count in debits:
        rate = rates.get((acquirer, issuer), default)
        total = totals[(acquirer, issuer)]
        total[0] += count
        total[1] += amount * count
        total[2] += fee(amount, rate) * count
    lines = [
        PairLine(a, i, n, gross, fees, rates.get((a, i), default))
        for (a, i), (n, gross, fees) in sorted(totals.items())
    ]
    return Settlement(day, lines)


async def settle_day(
    engine: AsyncEngine,
    day: str,
    rates: Mapping[tuple[str, str], Decimal],
    default: Decimal = DEFAULT_RATE,
    acquirer: str | None = None,
) -> Settlement:
    """Settle a day from the acquirers' ledgers in this database (all cities in it, or one acquirer)."""
    where = [
        LEDGER.c.day == day,
        LEDGER.c.source == SOURCE_TERMINAL,
        LEDGER.c.issuer != LEDGER.c.acquirer,
        LEDGER.c.kind.in_(DEBIT_KINDS),
    ]
    if acquirer is not None:
        where.append(LEDGER.c.acquirer == acquirer)
    async with engine.connect() as db:
        rows = await db.execute(
            select(LEDGER.c.acquirer, LEDGER.c.issuer, LEDGER.c.amount, func.count())
            .where(*where, LEDGER.c.forward == FORWARD_ACKED)
            .group_by(LEDGER.c.acquirer, LEDGER.c.issuer, LEDGER.c.amount)
        )
        debits = ((str(a), str(i), int(amount), int(n)) for a, i, amount, n in rows.all())
        settlement = settle(day, debits, rates, default)
        left = await db.execute(
            select(LEDGER.c.forward, func.count())
            .where(*where, LEDGER.c.forward.in_((FORWARD_PENDING, FORWARD_REJECTED)))
            .group_by(LEDGER.c.forward)
        )
        settlement.unsettled = {str(status): int(n) for status, n in left.all()}
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
                    values["record_id"] = (
                        f"{values['issuer']}-{values['card']}-{values['kind']}-{values['card_counter']}"
                    )
                    writer.writerow([values[name] for name in CSV_HEADER])
                    count += 1
                out.flush()
                os.fsync(out.fileno())
            temp.replace(folder / name)
            written[name] = count
    return written
