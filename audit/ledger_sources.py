"""Where ledgers come from for ``audit reconcile``: daily clearing files (CSV, wire.md), clearing databases
(SQLite or PostgreSQL, the ``ledger`` table), a settlement file, and the cities table (travel times).

Every problem with an input is a ``LedgerInputError`` naming the file and line (or the database) and what is
wrong, so the command can say it in one line and write nothing. Clearing files are read column by column:
each column is checked by one regular expression over the whole column, and only when that fails is the
column searched for the first bad value (its line goes into the message).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import gc
import io
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import Table, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from audit.reconcile import (
    KINDS,
    BadValue,
    Cities,
    CityLedger,
    ClaimedPair,
    ClaimedSettlement,
    Records,
    Source,
    day_number,
)
from cardsim.files import read_json
from cardsim.resources import fixture_path
from clearing.db import DatabaseUrlError, open_engine
from clearing.schema import LEDGER
from clearing.settlement import CSV_HEADER
from terminals.messages import CARD_ID, CITY_CODE, TERMINAL_NO, TxnRecord


class LedgerInputError(ValueError):
    """An input that cannot be reconciled; the message names the file and line, or the database."""


def _field(pattern: re.Pattern[str]) -> str:
    """A field pattern of terminals.messages (``^...$`` alternatives) without its anchors."""
    return f"(?:{pattern.pattern.replace('^', '').replace('$', '')})"


_NUMBER = "[0-9]{1,10}"
_CARD = _field(CARD_ID)
_KIND = f"(?:{'|'.join(KINDS)})"
_FIELDS: Final = {  # CSV_HEADER order
    "record_id": f"(?P<issuer>[0-9]{{4}})-(?P<card>{_CARD})-(?P<kind>{_KIND})-(?P<counter>[0-9]{{1,5}})",
    "acquirer": _field(CITY_CODE),
    "issuer": _field(CITY_CODE),
    "terminal": _field(TERMINAL_NO),
    "terminal_seq": _NUMBER,
    "card": _CARD,
    "card_counter": "[0-9]{1,5}",
    "kind": _KIND,
    "amount": _NUMBER,
    "balance_before": _NUMBER,
    "balance_after": _NUMBER,
    "time": "[^,]+",  # ISO 8601 with an offset: datetime.fromisoformat decides
    "tac": "[0-9A-F]{8}",
}
# A whole row at once (one C call per line): the record id's parts must be the issuer, card, kind and counter
# columns, by back-reference.
_SAME = {"issuer": "(?P=issuer)", "card": "(?P=card)", "kind": "(?P=kind)", "card_counter": "(?P=counter)"}
_ROW = re.compile(",".join(_SAME.get(name, pattern) for name, pattern in _FIELDS.items()))
_LIMITS: Final = {  # the ranges of the wire record (terminals.messages.TxnRecord)
    "terminal_seq": 0xFFFFFFFF,
    "card_counter": 0xFFFF,
    "amount": 2**31 - 1,
    "balance_before": 2**31 - 1,
    "balance_after": 2**31 - 1,
}
_WHAT: Final = {
    "record_id": "issuer-card-kind-card_counter",
    "acquirer": "a 4-digit city code",
    "issuer": "a 4-digit city code",
    "terminal": "12 upper-case hex digits",
    "card": "a 20-digit card serial or an 8-hex-digit M1 UID",
    "kind": "one of " + ", ".join(KINDS),
    "time": "a time",
    "tac": "8 upper-case hex digits",
}
_FILE_NAME = re.compile(r"clearing-([0-9]{4})-[0-9]{4}-[0-9]{2}-[0-9]{2}\.csv")


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of small lists and strings are made: none of them
    form cycles, and the collector's passes over them would take longer than the parsing (restored after)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- clearing files --------------------------------------------------------------------------------------


def _lines(path: Path, text: str) -> tuple[list[list[str]], list[str], NDArray[np.int64]]:
    """The header row, the data rows as comma-joined lines, and their line numbers."""
    if '"' not in text and "\r" not in text:
        # nothing quoted: splitting at line breaks and commas is all the csv module would do, at a third of its cost
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        header = [lines[0].split(",")] if lines else []
        return header, lines[1:], np.arange(2, len(lines) + 1, dtype=np.int64)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    rows, numbers = [], []
    try:
        for row in reader:
            rows.append(row)
            numbers.append(reader.line_num)
    except csv.Error as err:
        raise LedgerInputError(f"{path} line {reader.line_num + 1}: not CSV ({err})") from None
    # a value holding a comma or a line break matches no column's pattern: joining keeps it visible
    return rows[:1], [",".join(row) for row in rows[1:]], np.asarray(numbers[1:], dtype=np.int64)


def _diagnose(line: str) -> str:
    """What is wrong with a line that is not a valid row."""
    cells = line.split(",")
    if len(cells) != len(CSV_HEADER):
        return f"{len(cells)} columns, expected {len(CSV_HEADER)}"
    for name, value in zip(_FIELDS, cells, strict=True):
        if not re.fullmatch(_FIELDS[name], value):
            what = _WHAT.get(name, f"a whole number (0..{_LIMITS.get(name, 0)})")
            return f"column {name}: {value[:40]!r} is not {what}"
    issuer, card, kind, counter = (cells[CSV_HEADER.index(n)] for n in ("issuer", "card", "kind", "card_counter"))
    return f"record_id {cells[0]!r} is not issuer-card-kind-card_counter ({issuer}-{card}-{kind}-{counter})"


def read_clearing_file(path: Path, holder: str | None = None) -> CityLedger:
    """A daily clearing file (wire.md) as the ledger of ``holder``: by default the city in its acquirer column
    (one city per file), or in its name clearing-CITY-DAY.csv when it has no rows. A file with rows of other
    acquirers is the issuer side of ``holder``."""
    text = _utf8(path)
    with _no_gc():
        columns, numbers = _read_columns(path, text)
        try:
            records = Records.from_columns({**columns, "line": numbers})
        except BadValue as err:
            raise LedgerInputError(f"{path} line {numbers[err.index]}: column time: {err}") from None
    _check_limits(path, records, numbers)
    acquirers = sorted(set(columns["acquirer"]))
    if holder is None:
        holder = _holder(path, acquirers)
    return CityLedger(holder, (Source(str(path)),), records, issuer_side=any(a != holder for a in acquirers))


def _utf8(path: Path) -> str:
    """The file's text (a byte order mark dropped)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise LedgerInputError(f"{path}: {err.strerror}") from err
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise LedgerInputError(f"{path} line {line}: not UTF-8") from None


def _read_columns(path: Path, text: str) -> tuple[dict[str, list[str]], NDArray[np.int64]]:
    """The CSV_HEADER columns of a clearing file's text, every value checked by its column's pattern, and the
    line number of each row."""
    header, lines, numbers = _lines(path, text)
    if not header or header[0] != CSV_HEADER:
        missing = [name for name in CSV_HEADER if name not in (header[0] if header else [])]
        why = f"missing columns {', '.join(missing)}" if missing else "columns out of order or unknown"
        raise LedgerInputError(f"{path} line 1: not a clearing file header ({why}); expected {','.join(CSV_HEADER)}")
    if not all(map(_ROW.fullmatch, lines)):
        bad = next(i for i, line in enumerate(lines) if not _ROW.fullmatch(line))
        raise LedgerInputError(f"{path} line {numbers[bad]}: {_diagnose(lines[bad])}")
    flat = ",".join(lines).split(",") if lines else []
    return {name: flat[k :: len(CSV_HEADER)] for k, name in enumerate(CSV_HEADER)}, numbers


def _check_limits(path: Path, records: Records, numbers: NDArray[np.int64]) -> None:
    """Refuse the first number beyond the range of the wire record (the patterns only bound its digits)."""
    for name, most in _LIMITS.items():
        values = getattr(records, "counter" if name == "card_counter" else name)
        if len(values) and values.max() > most:
            at = int(np.argmax(values > most))
            raise LedgerInputError(f"{path} line {numbers[at]}: column {name}: {values[at]} exceeds {most}")


def _holder(path: Path, acquirers: list[str]) -> str:
    """Whose ledger a file is when the command does not say: its one acquirer, or the city in its name."""
    named = _FILE_NAME.fullmatch(path.name)
    if len(acquirers) > 1:
        raise LedgerInputError(
            f"{path}: rows of several acquirers ({', '.join(acquirers)}): name the holder city as CITY={path}"
        )
    if not acquirers and named is None:
        raise LedgerInputError(f"{path}: no rows to tell whose ledger it is: name the holder city as CITY={path}")
    return acquirers[0] if acquirers else str(named[1] if named else "")


def clearing_row(record: TxnRecord) -> list[str]:
    """A wire record as a row of the daily clearing file (CSV_HEADER order)."""
    values = {**record.model_dump(), "record_id": record.record_id}
    values.update(issuer=record.card.issuer, card=record.card.id)
    return [str(values[name]) for name in CSV_HEADER]


def write_clearing_file(path: Path, rows: Iterable[Sequence[object]]) -> None:
    """Write a daily clearing file: the header, then ``rows`` (CSV_HEADER order)."""
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        writer.writerows(rows)


# --- databases -------------------------------------------------------------------------------------------


_SELECT: Final = ("id", "city", *CSV_HEADER[1:], "record")


async def _read_ledgers(engine: AsyncEngine, name: str, day: str | None) -> list[CityLedger]:
    table: Table = LEDGER
    async with engine.connect() as db:
        if not await db.run_sync(lambda sync: inspect(sync).has_table(table.name)):
            raise LedgerInputError(f"database {name}: no clearing ledger table (not a yikatong clearing database)")
        query = select(*(table.c[column] for column in _SELECT)).order_by(table.c.city, table.c.id)
        if day is not None:
            query = query.where(table.c.day == day)
        result = await db.execute(query)
        rows = result.all()
    by_city: dict[str, list[Sequence[object]]] = {}
    for row in rows:
        by_city.setdefault(row.city, []).append(row)
    ledgers = []
    for city, city_rows in by_city.items():
        columns = {column: [r[k] for r in city_rows] for k, column in enumerate(_SELECT)}
        stated = [_signed_with(text) for text in columns.pop("record")]
        columns["alg"] = [alg for alg, _ in stated]
        columns["key_version"] = [version for _, version in stated]
        columns["line"] = columns.pop("id")
        records = Records.from_columns(columns)
        # a city's database ledger holds both sides: its terminals' records and its cards' forwarded records
        ledgers.append(CityLedger(city, (Source(name, "ledger id"),), records, issuer_side=True))
    return ledgers


def _signed_with(stored: object) -> tuple[object, object]:
    """The algorithm and key version a stored record (JSON text) says: the ledger's columns do not."""
    if not isinstance(stored, str | bytes):
        raise TypeError(f"stored record {stored!r} is not JSON text")
    doc = json.loads(stored)
    return doc["alg"], doc["key_version"]


def read_database(url: str, day: str | None = None) -> list[CityLedger]:
    """The ledger of every city in a clearing database (``ledger.city`` is the holder); only ``day`` when given.
    Never creates or changes a database."""
    try:
        name = make_url(url).render_as_string(hide_password=True)
        engine = open_engine(url)
    except (DatabaseUrlError, SQLAlchemyError, ValueError) as err:
        raise LedgerInputError(str(err) if isinstance(err, DatabaseUrlError) else f"database {url!r}: {err}") from None
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and not (database and Path(database).is_file()):
        raise LedgerInputError(f"database {name}: no such SQLite file")

    async def work() -> list[CityLedger]:
        try:
            return await _read_ledgers(engine, name, day)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(work())
    except (SQLAlchemyError, OSError) as err:
        raise LedgerInputError(f"database {name}: {str(err).splitlines()[0]}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise LedgerInputError(f"database {name}: a ledger row cannot be read ({err!r})") from None


# --- settlement file, cities -----------------------------------------------------------------------------


def _whole(value: object, unit: str = "fen") -> int:
    """A JSON whole number (not a bool, not a float); TypeError names what it should be."""
    if type(value) is not int:
        raise TypeError(f"{value!r} is not a whole number of {unit}")
    return value


def _pair(doc: Mapping[str, object]) -> tuple[tuple[str, str], ClaimedPair]:
    """One pair line of a settlement file: (acquirer, issuer) and what the line states (another shape of JSON
    fails with TypeError or AttributeError, which the caller reports)."""
    rate = Decimal(str(doc["rate"]))
    if not rate.is_finite():
        raise ValueError(f"rate {doc['rate']!r} is not a number")
    line = ClaimedPair(
        _whole(doc["records"], "records"),
        _whole(doc["gross"]),
        _whole(doc["fee"]),
        rate,
        _whole(doc["issuer_owes_acquirer"]),
    )
    return (str(doc["acquirer"]), str(doc["issuer"])), line


def read_settlement(path: Path) -> ClaimedSettlement:
    """A settlement file as ``yikatong clearing settle`` writes it (clearing.settlement.Settlement.to_json): every
    pair line (a pair listed twice is refused), the positions and the net sum as the file states them."""
    doc = read_json(path, LedgerInputError)
    try:
        if doc["schema"] != "yikatong.settlement/1":
            raise ValueError("not a yikatong.settlement/1 document")
        day = str(doc["day"])
        day_number(day)
        positions = {str(city): _whole(n) for city, n in doc["positions"].items()}
        pairs: dict[tuple[str, str], ClaimedPair] = {}
        for entry in doc["pairs"]:
            pair, line = _pair(entry)
            if pair in pairs:
                raise ValueError(f"the pair acquirer {pair[0]}, issuer {pair[1]} is listed twice")
            pairs[pair] = line
        net_sum = None if doc.get("net_sum") is None else _whole(doc["net_sum"])
    except (KeyError, TypeError, AttributeError, ValueError, InvalidOperation) as err:
        raise LedgerInputError(f"{path}: not a settlement file ({type(err).__name__}: {err})") from None
    return ClaimedSettlement(str(path), day, positions, pairs, net_sum)


def read_cities(path: Path | None = None) -> Cities:
    """City names and travel times (``travel_minutes``) from fixtures/cities.json, or another such file."""
    path = path or fixture_path("cities.json")
    doc = read_json(path, LedgerInputError)
    try:
        names = {str(c["code"]): str(c["name"]) for c in doc["cities"]}
        travel = {frozenset(map(str, t["between"])): int(t["minutes"]) for t in doc.get("travel_minutes", [])}
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise LedgerInputError(f"{path}: not a cities table ({type(err).__name__}: {err})") from None
    return Cities(names, travel)
