"""Where ledgers come from for ``audit reconcile``: daily clearing files (CSV, wire.md), clearing databases
(SQLite or PostgreSQL, the ``ledger`` table), a settlement file, the cities table (travel times), and the issuers'
hotlists (a hotlist file, or the hotlist tables of a clearing database).

Every problem with an input is a ``LedgerInputError`` naming the file and line (or the database) and what is
wrong, so the command can say it in one line and write nothing. Clearing files are read column by column by
pyarrow's CSV reader and checked column by column; a file it refuses or a value that fails is read again line
by line, where each column is checked by one regular expression over the whole column and only when that fails
searched for the first bad value (its line goes into the message).
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import gc
import io
import json
import mmap
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Final, TypeVar

import numpy as np
from numpy.typing import NDArray

from audit.reconcile import (
    BadValue,
    Cities,
    CityLedger,
    ClaimedHotlisted,
    ClaimedPair,
    ClaimedSettlement,
    HotlistEntry,
    HotlistHistory,
    Records,
    Source,
    day_number,
    instants,
)
from cardsim.files import read_json
from cardsim.resources import fixture_path
from clearing.settlement import CSV_HEADER, SETTLEMENT_SCHEMA, Liable, publish_moment
from clearing.verify import KINDS
from terminals.limits import MAX_FEN
from terminals.messages import CARD_ID, CITY_CODE, RECORD_ID, TERMINAL_NO, TxnRecord

if TYPE_CHECKING:  # pyarrow and the database layers load when a file or a database is read
    import pyarrow as pa
    from sqlalchemy.ext.asyncio import AsyncEngine

T = TypeVar("T")
Ints = NDArray[np.int64]


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
    "amount": MAX_FEN,
    "balance_before": MAX_FEN,
    "balance_after": MAX_FEN,
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


def read_clearing_file(path: Path, holder: str | None = None, *, columnar: bool = True) -> CityLedger:
    """A daily clearing file (wire.md) as the ledger of ``holder``: by default the city in its acquirer column
    (one city per file), or in its name clearing-CITY-DAY.csv when it has no rows. A file with rows of other
    acquirers is the issuer side of ``holder``. ``columnar``: read a plain file (ASCII, no carriage returns)
    with pyarrow's multithreaded CSV reader; any file it refuses, or any value that fails a check (a quoted
    value fails them all), is read again line by line (``columnar=False``), which names the first problem."""
    read = _columnar(path) if columnar else None
    records, acquirers = read or _by_lines(path, _file_bytes(path))
    _check_limits(path, records, records.line)
    if holder is None:
        holder = _holder(path, acquirers)
    return CityLedger(holder, (Source(str(path)),), records, issuer_side=any(a != holder for a in acquirers))


def _file_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise LedgerInputError(f"{path}: {err.strerror}") from err


def _utf8(path: Path, data: bytes) -> str:
    """A file's text (a byte order mark dropped)."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise LedgerInputError(f"{path} line {line}: not UTF-8") from None


def _by_lines(path: Path, data: bytes) -> tuple[Records, list[str]]:
    """The rows of a clearing file and its acquirers, line by line: each column checked by one regular expression
    over the whole column, and only when that fails searched for the first bad value (its line in the message)."""
    text = _utf8(path, data)
    with _no_gc():
        columns, numbers = _read_columns(path, text)
        try:
            records = Records.from_columns({**columns, "line": numbers})
        except BadValue as err:
            raise LedgerInputError(f"{path} line {numbers[err.index]}: column time: {err}") from None
    return records, sorted(set(columns["acquirer"]))


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


class _Refused(Exception):
    """The columnar reader cannot vouch for a file: the line reader reads it again."""


_CHECKS: Final = {name: re.compile(_FIELDS[name]) for name in ("acquirer", "issuer", "terminal", "card", "kind")}
_NIBBLE: Final = np.full(256, 0xFF, dtype=np.uint8)  # hex digit -> its value; anything else -> FF
_NIBBLE[np.frombuffer(b"0123456789ABCDEF", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)


def _columnar(path: Path) -> tuple[Records, list[str]] | None:
    """The rows of a plain clearing file and its acquirers, read by pyarrow (multithreaded) and checked column
    by column: few-valued columns by their patterns on each distinct value, numbers by length and digits, the
    record id as the join of its parts. None when the file cannot be mapped, is not plain or anything fails.
    Quotes need no test: no pattern lets one through."""
    try:
        with path.open("rb") as file:  # mapped, not read: its pages are the page cache's
            data = mmap.mmap(file.fileno(), 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)
    except (OSError, ValueError):  # ValueError: an empty file
        return None
    if data.find(b"\r") >= 0 or np.frombuffer(data, dtype=np.uint8).max() >= 0x80:
        return None  # other line breaks, a byte order mark or text beyond ASCII: the line reader's
    import pyarrow as pa
    import pyarrow.csv as pa_csv

    try:
        table = pa_csv.read_csv(
            pa.py_buffer(data),
            parse_options=pa_csv.ParseOptions(quote_char=False, newlines_in_values=False, ignore_empty_lines=False),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(CSV_HEADER, pa.string()),
                null_values=[],
                strings_can_be_null=False,
                check_utf8=False,  # ASCII
            ),
        )
        if table.column_names != CSV_HEADER:
            return None
        return _checked(table)
    except (pa.ArrowException, _Refused, BadValue):
        return None


def _checked(table: pa.Table) -> tuple[Records, list[str]]:
    """Records from the text columns of a clearing file; _Refused or BadValue when a value fails its check."""
    import pyarrow.compute as pc

    column = {name: table.column(name) for name in CSV_HEADER}
    count = table.num_rows
    acquirers, acquirer = _few(column["acquirer"], _CHECKS["acquirer"])
    issuers, issuer = _few(column["issuer"], _CHECKS["issuer"])
    kinds, kind = _few(column["kind"], _CHECKS["kind"])
    cards, card = _few(column["card"], _CHECKS["card"])
    terminals, terminal = _few(column["terminal"], _CHECKS["terminal"])
    times, time = _few(column["time"], None)
    numbers = {name: _digits(column[name], 5 if name == "card_counter" else 10) for name in _LIMITS}
    parts = (column["issuer"], column["card"], column["kind"], column["card_counter"])
    if count and not pc.all(pc.equal(pc.binary_join_element_wise(*parts, "-"), column["record_id"])).as_py():
        raise _Refused("record_id")
    as_int = np.array([int(x) for x in acquirers], dtype=np.int64)
    records = Records(
        issuer=np.array([int(x) for x in issuers], dtype=np.int64)[issuer],
        acquirer=as_int[acquirer],
        card=_objects(cards)[card],
        kind=np.array([KINDS.index(x) for x in kinds], dtype=np.int64)[kind],
        counter=numbers["card_counter"],
        terminal=np.array([int(x, 16) for x in terminals], dtype=np.int64)[terminal],
        terminal_seq=numbers["terminal_seq"],
        amount=numbers["amount"],
        balance_before=numbers["balance_before"],
        balance_after=numbers["balance_after"],
        time=_objects(times)[time],
        time_us=instants(times)[time],
        tac=_hex(column["tac"], 8),
        alg=np.full(count, -1, dtype=np.int64),
        key_version=np.full(count, -1, dtype=np.int64),
        source=np.zeros(count, dtype=np.int64),
        line=np.arange(2, count + 2, dtype=np.int64),  # plain: one row a line, after the header
    )
    return records, sorted(acquirers)


def _objects(texts: list[str]) -> NDArray[np.object_]:
    column = np.empty(len(texts), dtype=object)
    column[:] = texts
    return column


def _few(column: pa.ChunkedArray, pattern: re.Pattern[str] | None) -> tuple[list[str], NDArray[np.intp]]:
    """A column of few distinct values: those values (each matching ``pattern``, else _Refused) and the index
    of each row's value among them."""
    import pyarrow.compute as pc

    distinct = pc.unique(column)
    texts: list[str] = distinct.to_pylist()
    if pattern is not None and not all(map(pattern.fullmatch, texts)):
        raise _Refused(pattern.pattern)
    return texts, pc.index_in(column, value_set=distinct).to_numpy().astype(np.intp)


def _digits(column: pa.ChunkedArray, most: int) -> Ints:
    """A column of 1 to ``most`` decimal digits as numbers (else _Refused)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(column):
        lengths = pc.min_max(pc.binary_length(column)).as_py()
        if lengths["min"] < 1 or lengths["max"] > most or not pc.all(pc.ascii_is_decimal(column)).as_py():
            raise _Refused(f"[0-9]{{1,{most}}}")
    return np.asarray(pc.cast(column, pa.int64()).to_numpy(), dtype=np.int64)


def _hex(column: pa.ChunkedArray, width: int) -> Ints:
    """A column of ``width`` upper-case hex digits as numbers (else _Refused), from the strings' bytes."""
    raw = []
    for chunk in column.chunks:
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32, count=len(chunk) + 1, offset=chunk.offset * 4)
        if (np.diff(offsets) != width).any():
            raise _Refused(f"[0-9A-F]{{{width}}}")
        if len(chunk):
            raw.append(np.frombuffer(chunk.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]])
    nibbles = _NIBBLE[np.concatenate(raw)] if raw else np.zeros(0, dtype=np.uint8)
    if (nibbles == 0xFF).any():
        raise _Refused(f"[0-9A-F]{{{width}}}")
    packed = (nibbles[0::2] << 4 | nibbles[1::2]).reshape(-1, width // 2)  # two digits a byte, big-endian
    return np.pad(packed, ((0, 0), (8 - width // 2, 0))).view(">u8")[:, 0].astype(np.int64)


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
    from sqlalchemy import inspect, select

    from clearing.schema import LEDGER

    table = LEDGER
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
    return _on_database(url, "a ledger row", lambda engine, name: _read_ledgers(engine, name, day))


async def _read_hotlists(engine: AsyncEngine, name: str) -> dict[tuple[str, str], HotlistEntry]:
    from sqlalchemy import inspect, select

    from clearing.schema import HOTLIST, HOTLIST_VERSION, VERSION_OF_CARD

    async with engine.connect() as db:
        if not await db.run_sync(lambda sync: inspect(sync).has_table(HOTLIST_VERSION.name)):
            return {}  # a database from before hotlist versions (migration 0003): no list has a publish time
        rows = await db.execute(
            select(HOTLIST.c.city, HOTLIST.c.card, HOTLIST.c.version, HOTLIST_VERSION.c.published).select_from(
                HOTLIST.outerjoin(HOTLIST_VERSION, VERSION_OF_CARD)
            )
        )
        return {(city, card): HotlistEntry(int(v), publish_moment(published)) for city, card, v, published in rows}


def read_database_hotlists(url: str) -> dict[tuple[str, str], HotlistEntry]:
    """Every city's hotlist in a clearing database, with the version that added each card and its publish time.
    Never creates or changes a database."""
    return _on_database(url, "a hotlist row", _read_hotlists)


def _on_database(url: str, what: str, work: Callable[[AsyncEngine, str], Awaitable[T]]) -> T:
    """``work(engine, name)`` on the clearing database at ``url`` (``name``: the URL without its password);
    LedgerInputError naming the database when it is not there or cannot be read."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from clearing.db import DatabaseUrlError, open_engine

    try:
        name = make_url(url).render_as_string(hide_password=True)
        engine = open_engine(url)
    except (DatabaseUrlError, SQLAlchemyError, ValueError) as err:
        raise LedgerInputError(str(err) if isinstance(err, DatabaseUrlError) else f"database {url!r}: {err}") from None
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and not (database and Path(database).is_file()):
        raise LedgerInputError(f"database {name}: no such SQLite file")

    async def run() -> T:
        try:
            return await work(engine, name)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except (SQLAlchemyError, OSError) as err:
        raise LedgerInputError(f"database {name}: {str(err).splitlines()[0]}") from None
    except (KeyError, TypeError, ValueError) as err:
        raise LedgerInputError(f"database {name}: {what} cannot be read ({err!r})") from None


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
        _optional(doc, "hotlist_grace_seconds", "seconds"),
        _optional(doc, "hotlisted_issuer_fen"),
        _optional(doc, "hotlisted_acquirer_fen"),
    )
    return (str(doc["acquirer"]), str(doc["issuer"])), line


def _optional(doc: Mapping[str, object], key: str, unit: str = "fen") -> int | None:
    """A whole number the file may leave out (a settlement file from before the field): None then."""
    value = doc.get(key)
    return None if value is None else _whole(value, unit)


def _aware(value: object) -> dt.datetime:
    """ISO 8601 text with a UTC offset as a time; ValueError otherwise."""
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a time")
    moment = dt.datetime.fromisoformat(value)
    if moment.utcoffset() is None:
        raise ValueError(f"{value!r} has no UTC offset (+08:00)")
    return moment


def _hotlisted(doc: Mapping[str, object]) -> ClaimedHotlisted:
    """One entry of a settlement file's list of hotlisted records."""
    record_id = doc["record_id"]
    if not isinstance(record_id, str) or not RECORD_ID.match(record_id):
        raise ValueError(f"record_id {record_id!r} is not issuer-card-kind-card_counter")
    issuer, card, *_ = record_id.split("-")
    published = doc["published"]
    return ClaimedHotlisted(
        record_id,
        issuer,
        card,
        _whole(doc["version"], "version"),
        None if published is None else _aware(published),
        Liable(str(doc["liable"])),
    )


def read_settlement(path: Path) -> ClaimedSettlement:
    """A settlement file as ``yikatong clearing settle`` writes it (clearing.settlement.Settlement.to_json): every
    pair line (a pair listed twice is refused), the positions and the net sum as the file states them."""
    doc = read_json(path, LedgerInputError)
    try:
        if doc["schema"] != SETTLEMENT_SCHEMA:
            raise ValueError(f"not a {SETTLEMENT_SCHEMA} document")
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
        listed = doc.get("hotlisted")  # None in a file from before the list
        hotlisted: dict[str, ClaimedHotlisted] = {}
        for entry in listed or []:
            record = _hotlisted(entry)
            if record.record_id in hotlisted:
                raise ValueError(f"the hotlisted record {record.record_id} is listed twice")
            hotlisted[record.record_id] = record
    except (KeyError, TypeError, AttributeError, ValueError, InvalidOperation) as err:
        raise LedgerInputError(f"{path}: not a settlement file ({type(err).__name__}: {err})") from None
    return ClaimedSettlement(str(path), day, positions, pairs, net_sum, None if listed is None else hotlisted)


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


# --- hotlist files ---------------------------------------------------------------------------------------

HOTLIST_HEADER: Final = ["issuer", "card", "version", "published"]
"""A hotlist file: one row per card on an issuer's list, the version that added it and when that version was first
published (ISO 8601 with offset; empty: never)."""


def read_hotlist_file(path: Path) -> dict[tuple[str, str], HotlistEntry]:
    """The issuers' hotlists in a hotlist file, by (issuer, card); a card listed twice by one issuer is refused."""
    text = _utf8(path, _file_bytes(path))
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    found: dict[tuple[str, str], HotlistEntry] = {}
    try:
        header = next(reader, [])
        if header != HOTLIST_HEADER:
            raise LedgerInputError(f"{path} line 1: not a hotlist file header; expected {','.join(HOTLIST_HEADER)}")
        for row in reader:
            if not row:
                continue
            key, entry = _hotlist_row(path, reader.line_num, row)
            if key in found:
                raise LedgerInputError(f"{path} line {reader.line_num}: card {key[1]} of {key[0]} is listed twice")
            found[key] = entry
    except csv.Error as err:
        raise LedgerInputError(f"{path} line {reader.line_num + 1}: not CSV ({err})") from None
    return found


def _hotlist_row(path: Path, line: int, row: list[str]) -> tuple[tuple[str, str], HotlistEntry]:
    if len(row) != len(HOTLIST_HEADER):
        raise LedgerInputError(f"{path} line {line}: {len(row)} columns, expected {len(HOTLIST_HEADER)}")
    issuer, card, version, published = row
    if not CITY_CODE.match(issuer):
        raise LedgerInputError(f"{path} line {line}: column issuer: {issuer[:40]!r} is not a 4-digit city code")
    if not CARD_ID.match(card):
        why = "a 20-digit card serial or an 8-hex-digit M1 UID"
        raise LedgerInputError(f"{path} line {line}: column card: {card[:40]!r} is not {why}")
    if not re.fullmatch("[0-9]{1,9}", version):
        raise LedgerInputError(f"{path} line {line}: column version: {version[:40]!r} is not a whole number")
    try:
        moment = _aware(published) if published else None
    except ValueError as err:
        raise LedgerInputError(f"{path} line {line}: column published: {err}") from None
    return (issuer, card), HotlistEntry(int(version), moment)


def write_hotlist_file(path: Path, history: HotlistHistory) -> None:
    """Write a hotlist file: the header, then one row per (issuer, card) in order."""
    with path.open("w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(HOTLIST_HEADER)
        for (issuer, card), entry in sorted(history.items()):
            published = entry.published.isoformat() if entry.published else ""
            writer.writerow([issuer, card, entry.version, published])


def merge_hotlists(sources: Iterable[tuple[str, HotlistHistory]]) -> dict[tuple[str, str], HotlistEntry]:
    """The hotlists of several sources (name, history) in one; a card two of them list differently is refused."""
    merged: dict[tuple[str, str], HotlistEntry] = {}
    seen: dict[tuple[str, str], str] = {}
    for name, history in sources:
        for key, entry in history.items():
            if key in merged and merged[key] != entry:
                raise LedgerInputError(
                    f"card {key[1]} of {key[0]}: {seen[key]} says version {merged[key].version} published "
                    f"{merged[key].published}, {name} version {entry.version} published {entry.published}"
                )
            merged[key], seen[key] = entry, name
    return merged
