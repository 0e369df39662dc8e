"""Reconciliation of the cities' ledgers (spec audit.md, "Reconciliation checks"): pure, no I/O.

Input: ledgers, each what one holder city keeps (its terminals' records and, as the issuer of a card, the
records other cities forwarded), held as columns (``Records``). Output: a ``Report`` of kind ``reconcile``:
one finding per offending record with the ids of ``audit.findings.RECONCILE_RULES``, counts per check, the
recomputed settlement (with who bears each record of a hotlisted card) and the cards to hotlist.
docs/reconcile-choices.md explains the choices.

The structural checks work on numpy columns: every ledger's rows are put into one table sorted by record
identity and content, so duplicates, conflicts and missing sides are comparisons of neighbours, and the
per-card checks are one more sort. Python loops run only over offending rows. TACs are verified in batches,
the records of a card through one cipher context (clearing.verify), in forked worker processes
(``Options.jobs``) while this one runs the other checks.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib
import math
import multiprocessing
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from decimal import Decimal
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, Final, NamedTuple, TypeAlias, TypeVar

import numpy as np
from numpy.typing import ArrayLike, NDArray

from audit.findings import RECONCILE_RULES, Finding, Report, finding
from cardsim.files import JSONValue
from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from clearing.defaults import DEFAULT_GRACE
from clearing.settlement import (
    CSV_HEADER,
    DEBIT_KINDS,
    DEFAULT_RATE,
    Grace,
    Hotlisted,
    Liable,
    PairLine,
    Settlement,
    settle,
)
from clearing.verify import ALGS, KINDS, TXN_TYPES, TacColumns, expected_macs, local_bcd
from terminals.messages import CHINA

Ints = NDArray[np.int64]
Objects = NDArray[np.object_]
Column: TypeAlias = Sequence[object] | NDArray[np.generic]
"""One column as a loader gives it: text from a file, the values of a database row, or numbers already."""
Index: TypeAlias = NDArray[np.integer] | NDArray[np.bool_]
R = TypeVar("R")

LOAD: Final = KINDS.index("load")
CLONE_RULES: Final = frozenset(
    {"REC-CONFLICT", "REC-COUNTER-REPEAT", "REC-IMPOSSIBLE-TRAVEL", "REC-M1-TAMPER", "REC-TAC"}
)
"""Findings that suggest a cloned or forged card: their cards make the hotlist."""
TAC_KEYS_LEAST: Final = 3
"""An issuer with at least this many TACs checked and not one verifying gets one REC-TAC-KEYS finding (the key
file is wrong for it) instead of a REC-TAC per record."""

_US: Final = 1_000_000
_DAY_US: Final = 86_400 * _US
_CHINA_US: Final = round(CHINA.utcoffset(None).total_seconds()) * _US  # settlement days run 00:00-24:00 +08:00
_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_COUNTER_SPAN: Final = 0x10000  # card counters are 16 bits
_MIX: Final = np.uint64(0x9E3779B97F4A7C15)


class BadValue(ValueError):
    """A column value that cannot be used; ``index`` is its row (the loaders turn it into a file line)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def instants(times: Column) -> Ints:
    """ISO 8601 times with their UTC offset as microseconds since the epoch; BadValue names the first bad one.
    Each distinct text is parsed once (a busy city has many records in the same second)."""
    known: dict[object, int] = dict.fromkeys(times, 0)
    usual = _usual_instants([text for text in known if isinstance(text, str) and len(text) == len(_USUAL)])
    for text in known:
        if text in usual:
            known[text] = usual[text]
            continue
        moment = _time(text)
        if moment is None:
            why = f"{text!r} is not an ISO 8601 time such as 2026-11-24T08:15:02+08:00"
            raise BadValue(_index(times, text), why)
        if moment.utcoffset() is None:
            raise BadValue(_index(times, text), f"{text!r} has no UTC offset (+08:00)")
        delta = moment - _EPOCH
        known[text] = (delta.days * 86_400 + delta.seconds) * _US + delta.microseconds
    return np.fromiter(map(known.__getitem__, times), dtype=np.int64, count=len(times))


_USUAL: Final = "2026-11-24T08:15:02+08:00"
"""The form of almost every time: by arithmetic on all of them at once (each other text goes to fromisoformat)."""
_NUMBERS: Final = ((0, 4), (5, 2), (8, 2), (11, 2), (14, 2), (17, 2), (20, 2), (23, 2))  # (at, digits) in _USUAL
_SIGN: Final = 19
_MONTH_DAYS: Final = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


def _usual_instants(texts: list[str]) -> dict[str, int]:
    """The instant (microseconds since the epoch) of each text of the usual form (YYYY-MM-DDTHH:MM:SS+HH:MM) whose
    fields are in range, as datetime.fromisoformat gives it; the others are left out."""
    if not texts:
        return {}
    chars = np.array(texts, dtype=f"U{len(_USUAL)}").view(np.uint32).reshape(len(texts), len(_USUAL)).astype(np.int64)
    digit = np.zeros(len(_USUAL), dtype=bool)
    for at, width in _NUMBERS:
        digit[at : at + width] = True
    fixed = ~digit
    fixed[_SIGN] = False
    ok = ((chars[:, digit] >= ord("0")) & (chars[:, digit] <= ord("9"))).all(axis=1)
    ok &= (chars[:, fixed] == [ord(c) for c in np.array(list(_USUAL))[fixed]]).all(axis=1)
    ok &= (chars[:, _SIGN] == ord("+")) | (chars[:, _SIGN] == ord("-"))
    sign = np.where(chars[:, _SIGN] == ord("-"), -1, 1)
    year, month, day, hour, minute, second, off_hour, off_minute = (
        (chars[:, at : at + width] - ord("0")) @ 10 ** np.arange(width - 1, -1, -1) for at, width in _NUMBERS
    )
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    month_days = _MONTH_DAYS[np.clip(month, 0, 12)] + (leap & (month == 2))
    ok &= (year >= 1) & (month >= 1) & (month <= 12) & (day >= 1) & (day <= month_days)
    ok &= (hour <= 23) & (minute <= 59) & (second <= 59) & (off_hour <= 23) & (off_minute <= 59)
    # days from 1970-01-01 (proleptic Gregorian calendar; eras of 400 years counted from March)
    y = year - (month <= 2)
    era, year_of_era = y // 400, y % 400
    day_of_year = (153 * np.where(month > 2, month - 3, month + 9) + 2) // 5 + day - 1
    days = era * 146_097 + year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year - 719_468
    seconds = days * 86_400 + hour * 3600 + minute * 60 + second - sign * (off_hour * 3600 + off_minute * 60)
    values = (seconds * _US).tolist()
    return {text: value for text, value, good in zip(texts, values, ok.tolist(), strict=True) if good}


def _time(value: object) -> dt.datetime | None:
    """``value`` as a time, or None when it is not ISO 8601 text."""
    if not isinstance(value, str):
        return None
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        return None


def _index(values: Column, value: object) -> int:
    return next(i for i, x in enumerate(values) if x == value)


def _hex(values: Column) -> Ints:
    """Hex digits as numbers, each distinct text converted once."""
    known = {text: int(_text(text), 16) for text in dict.fromkeys(values)}
    return np.fromiter(map(known.__getitem__, values), dtype=np.int64, count=len(values))


def _text(value: object) -> str:
    """``value`` when it is text; TypeError otherwise (what ``int(value, 16)`` would raise)."""
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not text")
    return value


def day_number(day: str) -> int:
    """Days from 1970-01-01 to a settlement day YYYY-MM-DD (ValueError when it is not one)."""
    return (dt.date.fromisoformat(day) - _EPOCH.date()).days


def _day_text(number: int) -> str:
    return (_EPOCH.date() + dt.timedelta(days=number)).isoformat()


def _ints(values: ArrayLike | Column) -> Ints:
    return np.asarray(values, dtype=np.int64)


@dataclass(frozen=True)
class Records:
    """CityLedger rows as columns, one entry per row, as the loaders read them. Money in fen."""

    issuer: Ints  # city code as a number (4510)
    acquirer: Ints
    card: Objects  # 20-digit serial (CPU) or 8-hex-digit UID (M1)
    kind: Ints  # index into KINDS
    counter: Ints
    terminal: Ints  # the 12 hex digits as a number
    terminal_seq: Ints
    amount: Ints
    balance_before: Ints
    balance_after: Ints
    time: Objects  # as the record gives it (the TAC covers local date and time)
    time_us: Ints  # the instant, microseconds since the epoch
    tac: Ints  # the 8 hex digits as a number
    alg: Ints  # index into ALGS; -1 when the source does not say (clearing files)
    key_version: Ints  # -1 when the source does not say
    source: Ints  # index into the ledger's sources
    line: Ints  # line of a file, row id of a database table

    def __len__(self) -> int:
        return len(self.issuer)

    @classmethod
    def from_columns(cls, columns: Mapping[str, Column], source: int = 0) -> Records:
        """Rows from value lists named like the wire record: issuer, acquirer (city codes), card, kind,
        card_counter, terminal (hex), terminal_seq, amount, balance_before, balance_after, time (ISO 8601),
        tac (hex), and optionally alg, key_version and line. Values must already be valid (the loaders check
        them); a bad time raises BadValue."""
        count = len(columns["card"])
        kinds: dict[object, int] = {name: i for i, name in enumerate(KINDS)}
        algs: dict[object, int] = {name: i for i, name in enumerate(ALGS)}
        time = np.array(columns["time"], dtype=object)
        return cls(
            issuer=_ints(columns["issuer"]),
            acquirer=_ints(columns["acquirer"]),
            card=np.array(columns["card"], dtype=object),
            kind=_ints([kinds[x] for x in columns["kind"]]),
            counter=_ints(columns["card_counter"]),
            terminal=_hex(columns["terminal"]),
            terminal_seq=_ints(columns["terminal_seq"]),
            amount=_ints(columns["amount"]),
            balance_before=_ints(columns["balance_before"]),
            balance_after=_ints(columns["balance_after"]),
            time=time,
            time_us=instants(columns["time"]),
            tac=_hex(columns["tac"]),
            alg=_ints([algs[x] for x in columns["alg"]]) if "alg" in columns else np.full(count, -1, np.int64),
            key_version=_ints(columns["key_version"]) if "key_version" in columns else np.full(count, -1, np.int64),
            source=np.full(count, source, np.int64),
            line=_ints(columns["line"]) if "line" in columns else np.arange(1, count + 1, dtype=np.int64),
        )

    @classmethod
    def concat(cls, parts: Sequence[Records]) -> Records:
        """All rows of ``parts``, in order."""
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})

    def take(self, index: Index) -> Records:
        """The rows at ``index`` (integer positions or a boolean mask)."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})


class _Rows:
    """The rows of ``records`` at ``index``, each column taken when first read: a check reads a few of the
    columns of most rows, and taking them all would copy the rest for nothing."""

    def __init__(self, records: Records, index: Index) -> None:
        self._records, self._index = records, index
        self._taken: dict[str, NDArray[Any]] = {}

    def __getattr__(self, name: str) -> NDArray[Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        if name not in self._taken:
            self._taken[name] = getattr(self._records, name)[self._index]
        return self._taken[name]


@dataclass(frozen=True)
class Source:
    """Where rows came from: a file (rows numbered by ``line``) or a database (by ledger row ``id``)."""

    name: str
    unit: str = "line"


@dataclass(frozen=True)
class CityLedger:
    """The rows one holder city keeps. ``issuer_side``: the rows include what the city holds as the cards'
    issuer (records forwarded by acquiring cities), so a record of its cards acquired elsewhere must be here."""

    city: str
    sources: tuple[Source, ...]
    records: Records
    issuer_side: bool


PAIR_FIELDS: Final = (
    "records",
    "gross",
    "fee",
    "issuer_owes_acquirer",
    "hotlisted_issuer_fen",
    "hotlisted_acquirer_fen",
)
"""The figures of a settlement pair line that the records must give (the rate and the hotlist grace are the
file's: records carry none)."""


@dataclass(frozen=True)
class HotlistEntry:
    """A card on its issuer's hotlist: the version that added it and when that version was first published
    (None: never)."""

    version: int
    published: dt.datetime | None


HotlistHistory: TypeAlias = Mapping[tuple[str, str], HotlistEntry]
"""The issuers' hotlists by (issuer, card): only a card's own issuer's list makes a liability."""


@dataclass(frozen=True)
class ClaimedPair:
    """One pair line of a settlement file as the file states it (fields named like its JSON keys; money in fen).
    The hotlist fields are None in a file written before settlements had them."""

    records: int
    gross: int
    fee: int
    rate: Decimal
    issuer_owes_acquirer: int
    hotlist_grace_seconds: int | None = None
    hotlisted_issuer_fen: int | None = None
    hotlisted_acquirer_fen: int | None = None

    @classmethod
    def of(cls, line: PairLine) -> ClaimedPair:
        """What a settled pair line (clearing.settlement) would state."""
        return cls(line.records, line.gross, line.fee, line.rate, line.owed, line.grace, *line.hotlisted)


@dataclass(frozen=True)
class ClaimedHotlisted:
    """One record of a hotlisted card as the settlement file lists it."""

    record_id: str
    issuer: str
    card: str
    version: int
    published: dt.datetime | None
    liable: Liable


@dataclass(frozen=True)
class ClaimedSettlement:
    """A settlement file (``yikatong.settlement/1``) as far as reconciliation checks it."""

    source: str
    day: str
    positions: dict[str, int]
    pairs: dict[tuple[str, str], ClaimedPair]  # by (acquirer, issuer)
    net_sum: int | None = None  # the file's own total of its positions, when it states one
    hotlisted: dict[str, ClaimedHotlisted] | None = None  # by record id; None: a file from before the list

    @property
    def rates(self) -> dict[tuple[str, str], Decimal]:
        """The interchange rate of each pair in the file."""
        return {pair: line.rate for pair, line in self.pairs.items()}

    @property
    def graces(self) -> dict[tuple[str, str], int]:
        """The hotlist grace of each pair in the file that states one."""
        return {pair: x.hotlist_grace_seconds for pair, x in self.pairs.items() if x.hotlist_grace_seconds is not None}

    @property
    def history(self) -> dict[tuple[str, str], HotlistEntry]:
        """The hotlist entries the file's own list of hotlisted records implies."""
        return {(x.issuer, x.card): HotlistEntry(x.version, x.published) for x in (self.hotlisted or {}).values()}


@dataclass(frozen=True)
class Cities:
    """City names and the least travel time in minutes between two cities (fixtures/cities.json)."""

    names: dict[str, str] = field(default_factory=dict)
    travel_minutes: dict[frozenset[str], int] = field(default_factory=dict)


@dataclass(frozen=True)
class Options:
    """What to check beyond the ledgers themselves."""

    cities: Cities = field(default_factory=Cities)
    keys: IssuerKeyStore | None = None  # None: TACs are not checked
    claimed: ClaimedSettlement | None = None
    day: str | None = None  # only records of this settlement day
    jobs: int = 1  # forked processes verifying TACs beside the other checks
    min_parallel: int = 20_000  # fewer TACs than this are verified in this process, after the other checks
    default_rate: Decimal = DEFAULT_RATE
    default_grace: int = DEFAULT_GRACE  # seconds, for a pair the settlement file states no grace for
    hotlists: HotlistHistory | None = None  # the issuers' lists; None: none given (the settlement file's are used)
    key_file: str = "the given key file"  # how findings name where ``keys`` came from
    key_hint: str = ""  # what to try when no TAC of an issuer verifies (e.g. the command's --keys)


# --- the table -------------------------------------------------------------------------------------------


class _Table:
    """Every ledger's rows in one table sorted by (identity, content, holder), and what follows from that."""

    def __init__(self, holders: Sequence[_Holder]) -> None:
        self.ledgers = holders
        parts = [part for h in holders for part in h.parts] or [Records.from_columns({key: [] for key in CSV_HEADER})]
        sizes = [sum(len(part) for part in h.parts) for h in holders] or [0]
        holder = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
        columns = {f.name: np.concatenate([getattr(part, f.name) for part in parts]) for f in fields(Records)}
        rows = Records(**columns)
        card_no, m1 = _factorize(rows.issuer, rows.card)
        identity = (card_no * len(KINDS) + rows.kind) * _COUNTER_SPAN + rows.counter
        # Identical copies must be neighbours: sort by a content hash (its high bits, the holder in the low ones;
        # a collision between two different contents could only split a run of copies) and compare neighbours
        # exactly below.
        bits = np.uint64(max(len(sizes) - 1, 1).bit_length())
        content = _content_hash(rows) >> bits << bits | holder.astype(np.uint64)
        order = np.lexsort((content, identity))
        del rows
        for name in list(columns):  # one column at a time: each unsorted one is freed for the next to reuse
            columns[name] = columns[name][order]
        self.r, self.holder = Records(**columns), holder[order]
        self.card_no, self.identity, self.m1 = card_no[order], identity[order], m1[order]
        n = len(self.r)
        first = np.ones(n, dtype=bool)
        first[1:] = self.identity[1:] != self.identity[:-1]
        same = ~first
        for column in _CONTENT:
            values = getattr(self.r, column)
            same[1:] &= values[1:] == values[:-1]
        self.version_start = ~same  # first row of each distinct content of an identity
        self.copy = same & np.concatenate(([False], self.holder[1:] == self.holder[:-1]))
        self.starts = np.flatnonzero(first)
        self.group = np.cumsum(first) - 1  # identity group of each row
        self.cities = [h.city for h in holders]

    def rid(self, i: int) -> str:
        """The record id (wire.md) of row ``i``."""
        r = self.r
        return f"{int(r.issuer[i]):04d}-{r.card[i]}-{KINDS[int(r.kind[i])]}-{int(r.counter[i])}"

    def where(self, i: int) -> str:
        """Which city's ledger holds row ``i``, and where in its source."""
        ledger = self.ledgers[int(self.holder[i])]
        source = ledger.sources[int(self.r.source[i])]
        return f"{ledger.city}: {source.name} {source.unit} {int(self.r.line[i])}"

    def rows_of(self, i: int) -> range:
        """All rows with the identity of row ``i``."""
        g = int(self.group[i])
        end = int(self.starts[g + 1]) if g + 1 < len(self.starts) else len(self.r)
        return range(int(self.starts[g]), end)

    def describe(self, i: int) -> str:
        """A record's content in one line."""
        r = self.r
        return (
            f"{KINDS[int(r.kind[i])]} at terminal {int(r.terminal[i]):012X} #{int(r.terminal_seq[i])} of "
            f"{int(r.acquirer[i]):04d}, {r.time[i]}, {int(r.amount[i])} fen "
            f"({int(r.balance_before[i])} -> {int(r.balance_after[i])}), TAC {int(r.tac[i]):08X}"
        )

    def finding(self, rule: str, i: int, evidence: list[str], city: str | None = None, **details: JSONValue) -> Finding:
        """A finding about the record of row ``i`` (its card's issuer city unless ``city`` is given)."""
        issuer = f"{int(self.r.issuer[i]):04d}"
        tech = "m1" if self.m1[i] else "cpu"
        card = str(self.r.card[i])
        return finding(rule, self.rid(i), tech, city or issuer, evidence, card=card, **details)


# what makes two copies of one record identity the same record (the clearing file's columns; see the docs)
_CONTENT = ("acquirer", "terminal", "terminal_seq", "amount", "balance_before", "balance_after", "time_us", "tac")


def _factorize(issuer: Ints, card: Objects) -> tuple[Ints, NDArray[np.bool_]]:
    """A number per distinct (issuer, card), in order of first appearance; and whether each row's card is an M1
    UID (8 characters, not a 20-digit serial)."""
    texts = card.tolist()
    known = dict.fromkeys(texts, 0)  # each distinct text hashed once, then looked up
    for n, text in enumerate(known):
        known[text] = n
    codes = np.fromiter(map(known.__getitem__, texts), dtype=np.int64, count=len(texts))
    m1 = np.array([len(text) == 8 for text in known], dtype=bool)[codes]
    distinct, first, inverse = np.unique(issuer * len(known) + codes, return_index=True, return_inverse=True)
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(distinct))
    return rank[inverse], m1


def _content_hash(rows: Records) -> NDArray[np.uint64]:
    digest = np.zeros(len(rows), dtype=np.uint64)
    for column in _CONTENT:
        digest = (digest ^ getattr(rows, column).view(np.uint64)) * _MIX
        digest ^= digest >> np.uint64(29)
    return digest


def _pairs(order: Ints, *keys: Ints) -> tuple[Ints, Ints]:
    """Neighbours (previous, next) in ``order`` that agree on every key."""
    same = np.ones(max(len(order) - 1, 0), dtype=bool)
    for key in keys:
        k = key[order]
        same &= k[1:] == k[:-1]
    where = np.flatnonzero(same)
    return order[where], order[where + 1]


# --- the checks ------------------------------------------------------------------------------------------


def _duplicates(t: _Table) -> list[Finding]:
    """REC-DUPLICATE: the same content more than once in one holder's ledger (one finding per ledger)."""
    found = []
    for i in np.flatnonzero(t.copy & ~np.concatenate((t.copy[1:], [False]))).tolist():
        copies = [j for j in t.rows_of(i) if t.holder[j] == t.holder[i] and _same_content(t, j, i)]
        city = t.cities[int(t.holder[i])]
        evidence = [f"{len(copies)} copies in the ledger of {city}: " + "; ".join(t.where(j) for j in copies)]
        found.append(t.finding("REC-DUPLICATE", i, evidence, city=city, copies=len(copies)))
    return found


def _same_content(t: _Table, a: int, b: int) -> bool:
    return all(getattr(t.r, column)[a] == getattr(t.r, column)[b] for column in _CONTENT)


def _conflicts(t: _Table) -> list[Finding]:
    """REC-CONFLICT: one record identity with different contents (within a ledger or between sides)."""
    versions = np.add.reduceat(t.version_start.astype(np.int64), t.starts) if len(t.starts) else t.starts
    found = []
    for start in t.starts[versions > 1].tolist():
        rows = t.rows_of(start)
        heads = [i for i in rows if t.version_start[i]]
        evidence = []
        for number, head in enumerate(heads, 1):
            holders = [t.where(j) for j in rows if _same_content(t, j, head)]
            evidence.append(f"version {number}: {t.describe(head)}; held by " + "; ".join(holders))
        found.append(t.finding("REC-CONFLICT", start, evidence, versions=len(heads)))
    return found


def _missing(t: _Table) -> tuple[list[Finding], NDArray[np.bool_]]:
    """REC-MISSING: a record absent from the acquirer's ledger, or from the issuer's when that ledger holds
    the issuer side. Also returns, per identity, whether the issuer's ledger lacks it (not settled)."""
    if not len(t.starts):
        return [], np.zeros(0, dtype=bool)
    acquirer, issuer = t.r.acquirer[t.starts], t.r.issuer[t.starts]  # of each identity
    holder = np.array([int(ledger.city) for ledger in t.ledgers], dtype=np.int64)[t.holder]
    at_acquirer = np.logical_or.reduceat(holder == acquirer[t.group], t.starts)
    at_issuer = np.logical_or.reduceat(holder == issuer[t.group], t.starts)
    present, issuer_side = np.zeros(10_000, dtype=bool), np.zeros(10_000, dtype=bool)  # by city code
    for ledger in t.ledgers:
        present[int(ledger.city)] = True
        issuer_side[int(ledger.city)] |= ledger.issuer_side
    lacks = {
        "acquirer": present[acquirer] & ~at_acquirer,
        "issuer": issuer_side[issuer] & ~at_issuer & (issuer != acquirer),
    }
    found = []
    for g in np.flatnonzero(lacks["acquirer"] | lacks["issuer"]).tolist():
        i = int(t.starts[g])
        held = "; ".join(t.where(j) for j in t.rows_of(i))
        for side, lacking in lacks.items():
            if lacking[g]:
                city = f"{int((acquirer if side == 'acquirer' else issuer)[g]):04d}"
                evidence = [f"not in the ledger of {city} ({side} side)", f"held by {held}"]
                found.append(t.finding("REC-MISSING", i, evidence, city=city, side=side))
    return found, lacks["issuer"]


def _sequences(t: _Table) -> list[Finding]:
    """Per card: counter gaps and repeats (ordered by counter, CPU offline and online counters apart), then
    balance continuity (M1 by counter, CPU by time) and M1 value-block tampering."""
    c = t.starts
    r = _Rows(t.r, c)
    card, m1 = t.card_no[c], t.m1[c]
    sequence = np.where(~m1 & (r.kind == LOAD), 1, 0)  # CPU loads count on the online counter
    found: list[Finding] = []

    counters = (card * 2 + sequence) * _COUNTER_SPAN + r.counter  # card, then counter, then counter value
    by_counter = np.lexsort((r.time_us, counters))
    prev, nxt = _pairs(by_counter, card, sequence)
    step = r.counter[nxt] - r.counter[prev]
    forked = np.zeros(len(c), dtype=bool)
    forked[prev[step == 0]] = forked[nxt[step == 0]] = True
    gaps: dict[int, list[tuple[int, int]]] = defaultdict(list)  # card -> (time before, time after) of each gap
    for a, b in zip(prev[step > 1].tolist(), nxt[step > 1].tolist(), strict=True):
        gaps[int(card[a])].append((int(r.time_us[a]), int(r.time_us[b])))
        missing = int(r.counter[b] - r.counter[a]) - 1
        evidence = [
            f"counter {int(r.counter[a])} ({t.rid(int(c[a]))}) is followed by {int(r.counter[b])}: "
            f"{missing} record(s) missing",
            t.where(int(c[b])),
        ]
        found.append(t.finding("REC-COUNTER-GAP", int(c[b]), evidence, missing=missing))
    for a, b in zip(prev[step == 0].tolist(), nxt[step == 0].tolist(), strict=True):
        evidence = [
            f"counter {int(r.counter[b])} used by {t.rid(int(c[a]))} and {t.rid(int(c[b]))}",
            *(f"{t.rid(int(c[x]))}: {t.describe(int(c[x]))}; {t.where(int(c[x]))}" for x in (a, b)),
        ]
        found.append(t.finding("REC-COUNTER-REPEAT", int(c[b]), evidence, other=t.rid(int(c[a]))))

    problems: dict[int, list[str]] = defaultdict(list)  # row in r -> balance evidence
    expected_after = np.where(r.kind == LOAD, r.balance_before + r.amount, r.balance_before - r.amount)
    for i in np.flatnonzero(r.balance_after != expected_after).tolist():
        sign = "+" if int(r.kind[i]) == LOAD else "-"
        problems[i].append(
            f"balance_after {int(r.balance_after[i])} != balance_before {int(r.balance_before[i])} "
            f"{sign} amount {int(r.amount[i])}"
        )
    first_key = np.where(m1, r.counter, r.time_us)
    second_key = np.where(m1, r.time_us, sequence * _COUNTER_SPAN + r.counter)
    prev, nxt = _pairs(np.lexsort((second_key, first_key, card)), card)
    breaks = (r.balance_before[nxt] != r.balance_after[prev]) & ~forked[prev] & ~forked[nxt]
    tampered: list[tuple[int, int]] = []
    for a, b in zip(prev[breaks].tolist(), nxt[breaks].tolist(), strict=True):
        if m1[b]:
            if int(r.counter[b] - r.counter[a]) != 1:
                continue  # records are missing between them: the gap is reported
            if r.balance_before[b] > r.balance_after[a]:
                tampered.append((a, b))
                continue
        elif any(before <= r.time_us[b] and after >= r.time_us[a] for before, after in gaps[int(card[b])]):
            continue  # a missing record may sit between them: the gap is reported
        problems[b].append(
            f"balance_before {int(r.balance_before[b])} != balance_after {int(r.balance_after[a])} "
            f"of the card's previous record {t.rid(int(c[a]))}"
        )
    for i, lines in sorted(problems.items()):
        found.append(t.finding("REC-BALANCE", int(c[i]), [*lines, t.where(int(c[i]))]))
    for a, b in tampered:
        rise = int(r.balance_before[b] - r.balance_after[a])
        evidence = [
            f"balance rose by {rise} fen with no load: {t.rid(int(c[a]))} left {int(r.balance_after[a])}, "
            f"the next record starts from {int(r.balance_before[b])}",
            t.where(int(c[b])),
        ]
        found.append(t.finding("REC-M1-TAMPER", int(c[b]), evidence, rise=rise))
    return found


def _travel(t: _Table, cities: Cities, skipped: list[str]) -> list[Finding]:
    """REC-IMPOSSIBLE-TRAVEL: one card at two cities' terminals faster than the trip between them (every
    distinct version of a record counts: a clone's copy is an appearance of the card)."""
    v = np.flatnonzero(t.version_start)
    r, card = _Rows(t.r, v), t.card_no[v]
    prev, nxt = _pairs(np.lexsort((r.time_us, card)), card)
    moved = r.acquirer[prev] != r.acquirer[nxt]
    prev, nxt = prev[moved], nxt[moved]
    codes = np.unique(r.acquirer)
    minutes = np.full((len(codes), len(codes)), -1, dtype=np.int64)
    for x, a in enumerate(codes.tolist()):
        for y, b in enumerate(codes.tolist()):
            minutes[x, y] = cities.travel_minutes.get(frozenset((f"{a:04d}", f"{b:04d}")), -1)
    need = minutes[np.searchsorted(codes, r.acquirer[prev]), np.searchsorted(codes, r.acquirer[nxt])]
    unknown = Counter(
        "-".join(sorted((f"{a:04d}", f"{b:04d}")))
        for a, b in zip(r.acquirer[prev[need < 0]].tolist(), r.acquirer[nxt[need < 0]].tolist(), strict=True)
    )
    for pair, count in sorted(unknown.items()):
        skipped.append(f"travel time between {pair} unknown: {count} change(s) of city not checked")
    fast = (need >= 0) & (r.time_us[nxt] - r.time_us[prev] < need * 60 * _US)
    found = []
    for a, b, least in zip(prev[fast].tolist(), nxt[fast].tolist(), need[fast].tolist(), strict=True):
        x, y = int(v[a]), int(v[b])
        gap = int(r.time_us[b] - r.time_us[a]) / (60 * _US)
        evidence = [
            f"{t.rid(x)} in {int(r.acquirer[a]):04d} at {r.time[a]}, then {t.rid(y)} in {int(r.acquirer[b]):04d} "
            f"at {r.time[b]}: {gap:.0f} min apart, the trip takes at least {least} min",
            t.where(y),
        ]
        found.append(t.finding("REC-IMPOSSIBLE-TRAVEL", y, evidence, minutes=round(gap, 1), least=least))
    return found


Try: TypeAlias = tuple[str, int]  # (algorithm, key version) to verify a TAC with


class _TacOutcome(NamedTuple):
    failed: list[tuple[int, str]]  # (position, why)
    unchecked: dict[str, int]  # why not -> records
    checked: dict[str, int]  # issuer -> records whose TAC was checked

    @classmethod
    def of(cls, parts: Sequence[_TacOutcome]) -> _TacOutcome:
        """The outcome of all the parts."""
        unchecked: Counter[str] = Counter()
        checked: Counter[str] = Counter()
        for part in parts:
            unchecked.update(part.unchecked)
            checked.update(part.checked)
        return cls([x for part in parts for x in part.failed], dict(unchecked), dict(checked))


def tac_columns(r: Records) -> TacColumns:
    """The rows as clearing.verify takes them, with the algorithm and key version they state (-1: unknown)."""
    date, time = local_bcd(r.time.tolist())
    m1 = np.fromiter(map(len, r.card.tolist()), dtype=np.int64, count=len(r)) == 8
    return TacColumns(
        m1,
        r.issuer,
        r.card,
        r.alg,
        r.key_version,
        TXN_TYPES[r.kind],
        r.counter,
        r.amount,
        r.balance_before,
        r.balance_after,
        r.terminal,
        r.terminal_seq,
        date,
        time,
        r.tac,
    )


def _verify_tacs(keys: IssuerKeyStore, table: Records, positions: Ints) -> _TacOutcome:
    """Verify the TAC (CPU) or record MAC (M1) of the rows of ``table`` at ``positions`` (the rows of a card
    together), in batches (clearing.verify.expected_macs). A clearing file does not say the card's algorithm or
    key version: every one the key store holds for the issuer is tried in turn, the one that verified the card's
    first record first."""
    host, rows = IssuerHost(keys), tac_columns(table.take(positions))
    new = np.zeros(len(rows), dtype=bool)  # runs of rows of one card, stated algorithm and key version
    new[:1] = True
    for column in (rows.issuer, rows.card, rows.alg, rows.key_version):
        new[1:] |= column[1:] != column[:-1]
    starts = np.flatnonzero(new)
    orders = _Orders()
    every = _every_try(keys)
    run_order = np.array([orders.number(_tries(keys, every, rows, i)) for i in starts.tolist()], dtype=np.int64)
    # the first row of a card that has a choice finds what verifies it; all its rows then try that first
    choice = orders.longer_than(1)[run_order]
    found, _ = _in_turn(host, rows.take(starts[choice]), run_order[choice], orders)
    for run, at in zip(np.flatnonzero(choice).tolist(), found.tolist(), strict=True):
        if at > 0:
            run_order[run] = orders.first(int(run_order[run]), at)
    order = np.repeat(run_order, np.diff(np.append(starts, len(rows))))
    checked = orders.longer_than(0)[order]
    index = np.flatnonzero(checked)
    found, why = _in_turn(host, rows if len(index) == len(rows) else rows.take(index), order[index], orders)
    verified = np.zeros(len(rows), dtype=bool)
    verified[index[found >= 0]] = True
    why = {int(index[j]): text for j, text in why.items()}
    failed = []
    for i in np.flatnonzero(checked & ~verified).tolist():
        if i not in why:
            mac = "M1 record MAC" if rows.m1[i] else "TAC"
            tried = ", ".join(f"{a} v{v}" for a, v in orders.tries[order[i]])
            why[i] = f"{mac} does not verify with the keys of issuer {rows.issuer[i]:04d} ({tried})"
        failed.append((int(positions[i]), why[i]))
    codes, counts = np.unique(rows.issuer[checked], return_counts=True)
    lacking, lacks = np.unique(np.stack((rows.issuer, rows.key_version))[:, ~checked], axis=1, return_counts=True)
    unchecked = {
        f"no keys of issuer {x:04d}" + (f" version {v}" if v >= 0 else ""): n
        for (x, v), n in zip(lacking.T.tolist(), lacks.tolist(), strict=True)
    }
    return _TacOutcome(failed, unchecked, {f"{x:04d}": n for x, n in zip(codes.tolist(), counts.tolist(), strict=True)})


class _Orders:
    """The distinct orders in which rows try algorithms and key versions, numbered."""

    def __init__(self) -> None:
        self.tries: list[tuple[Try, ...]] = []
        self._number: dict[tuple[Try, ...], int] = {}

    def number(self, tries: tuple[Try, ...]) -> int:
        """The number of an order of tries."""
        if tries not in self._number:
            self._number[tries] = len(self.tries)
            self.tries.append(tries)
        return self._number[tries]

    def first(self, number: int, at: int) -> int:
        """The order ``number`` with its try ``at`` moved to the front."""
        old = self.tries[number]
        return self.number((old[at], *old[:at], *old[at + 1 :]))

    def longer_than(self, least: int) -> NDArray[np.bool_]:
        """By number: whether the order holds more than ``least`` tries."""
        return np.array([len(t) > least for t in self.tries], dtype=bool)

    def table(self) -> tuple[Ints, Ints]:
        """Every order as rows of algorithm (index into ALGS; -1 past its end) and key version."""
        width = max((len(t) for t in self.tries), default=0)
        algs = np.full((len(self.tries), width), -1, dtype=np.int64)
        versions = np.zeros((len(self.tries), width), dtype=np.int64)
        for n, tries in enumerate(self.tries):
            for k, (alg, version) in enumerate(tries):
                algs[n, k], versions[n, k] = ALGS.index(alg), version
        return algs, versions


def _every_try(keys: IssuerKeyStore) -> dict[tuple[str, bool], tuple[Try, ...]]:
    """Per issuer and technology (M1 or not): every algorithm and key version of the key store, newest first."""
    versions: dict[str, list[int]] = defaultdict(list)
    for key_set in keys:
        versions[key_set.city].append(key_set.version)
    return {
        (city, m1): tuple((a, v) for v in sorted(vs, reverse=True) for a in (("sm4",) if m1 else ALGS))
        for city, vs in versions.items()
        for m1 in (False, True)  # the M1 record MAC is SM4 whatever the record says
    }


def _tries(
    keys: IssuerKeyStore, every: Mapping[tuple[str, bool], tuple[Try, ...]], rows: TacColumns, i: int
) -> tuple[Try, ...]:
    """What to verify row ``i`` with: the algorithm and key version it states (none when the key store lacks
    that version), else every one of its issuer."""
    issuer, alg, version = f"{rows.issuer[i]:04d}", int(rows.alg[i]), int(rows.key_version[i])
    if alg < 0:
        return every.get((issuer, bool(rows.m1[i])), ())
    return ((ALGS[alg], version),) if keys.get(issuer, version) else ()


def _in_turn(host: IssuerHost, rows: TacColumns, order: Ints, orders: _Orders) -> tuple[Ints, dict[int, str]]:
    """For each row: which try of its order (by number) is the first that verifies it (-1: none); and, by row, why
    the keys of a try could not be made (the row is not tried further)."""
    algs, versions = orders.table()
    found = np.full(len(rows), -1, dtype=np.int64)
    refused: dict[int, str] = {}
    pending = np.arange(len(rows))
    for k in range(algs.shape[1]):
        pending = pending[algs[order[pending], k] >= 0]
        if not len(pending):
            break
        trying = rows if len(pending) == len(rows) else rows.take(pending)
        trial = replace(trying, alg=algs[order[pending], k], key_version=versions[order[pending], k])
        expected = expected_macs(host, trial)
        done = expected.macs == trial.tac
        found[pending[done]] = k
        for j, why in expected.refused.items():
            refused[int(pending[j])] = why
            done[j] = True
        pending = pending[~done]
    return found, refused


def _start_tacs(t: _Table, keys: IssuerKeyStore, options: Options) -> Callable[[], _TacOutcome]:
    """Start verifying the TAC of every distinct version of every record, the rows of a card together: in
    ``options.jobs`` forked processes, which see the table without it being sent and verify while this process
    runs the other checks; in this process when it is one job or few rows. The returned function waits."""
    versions = np.flatnonzero(t.version_start)
    versions = versions[np.argsort(t.card_no[versions], kind="stable")]
    if options.jobs <= 1 or len(versions) < options.min_parallel:
        return partial(_verify_tacs, keys, t.r, versions)
    cards = t.card_no[versions]
    cuts = np.searchsorted(cards, cards[np.linspace(0, len(cards), options.jobs + 1, dtype=np.int64)[1:-1]])
    # the parts end at a change of card
    waiting = [_forked(partial(_verify_tacs, keys, t.r, part)) for part in np.split(versions, cuts)]
    return lambda: _TacOutcome.of([wait() for wait in waiting])


def _forked(work: Callable[[], R]) -> Callable[[], R]:
    """``work()`` in a forked child process (it sees this process's memory: nothing is sent but the result);
    the returned function waits for its result, or raises what it raised."""
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)
    child = context.Process(target=_send_result, args=(sending, work), daemon=True)
    child.start()
    sending.close()

    def result() -> R:
        try:
            done, value = receiving.recv()
            answer: R = value
        except EOFError:
            raise RuntimeError(f"a TAC worker process ended with exit code {child.exitcode}") from None
        finally:
            receiving.close()
            child.join()
        if not done:
            raise value
        return answer

    return result


def _send_result(sending: Connection, work: Callable[[], object]) -> None:
    try:
        outcome: tuple[bool, object] = (True, work())
    except Exception as err:
        outcome = (False, err)
    sending.send(outcome)
    sending.close()


def _tac_findings(t: _Table, outcome: _TacOutcome, options: Options, skipped: list[str]) -> list[Finding]:
    """REC-TAC for each record whose TAC does not verify. An issuer none of whose TACs verifies (at least
    TAC_KEYS_LEAST of them) gets one REC-TAC-KEYS finding instead."""
    failed: dict[str, list[tuple[int, str]]] = defaultdict(list)  # issuer -> (row, why)
    for i, why in outcome.failed:
        failed[f"{int(t.r.issuer[i]):04d}"].append((i, why))
    found: list[Finding] = []
    for issuer, rows in sorted(failed.items()):
        if len(rows) == outcome.checked.get(issuer, 0) >= TAC_KEYS_LEAST:
            found.append(_wrong_keys(t, issuer, rows, options))
            continue
        for i, why in rows:
            holders = "; ".join(t.where(j) for j in t.rows_of(i) if _same_content(t, j, i))
            found.append(t.finding("REC-TAC", i, [why, t.describe(i), f"held by {holders}"]))
    for why, count in sorted(outcome.unchecked.items()):
        skipped.append(f"TAC of {count} record(s) not checked: {why}")
    return found


def _wrong_keys(t: _Table, issuer: str, rows: list[tuple[int, str]], options: Options, shown: int = 5) -> Finding:
    """REC-TAC-KEYS: not one TAC of ``issuer`` verifies (``rows``: every one checked, with why it failed). One
    finding for the issuer, the first ``shown`` records as samples: a wrong key file, not a fleet of forgeries."""
    samples = rows[:shown]
    hint = f" ({options.key_hint})" if options.key_hint else ""
    more = f"; and {len(rows) - len(samples)} more" if len(rows) > len(samples) else ""
    evidence = [
        f"none of the {len(rows)} TACs of issuer {issuer} verifies with the keys in {options.key_file}: "
        f"wrong key file?{hint}",
        f"for example {t.rid(samples[0][0])}: {samples[0][1]}",
        "records: " + "; ".join(f"{t.rid(i)} ({t.where(i)})" for i, _ in samples) + more,
    ]
    ids: list[JSONValue] = [t.rid(i) for i, _ in samples]
    return finding(
        "REC-TAC-KEYS", issuer, "", issuer, evidence, records=len(rows), key_file=options.key_file, samples=ids
    )


# --- settlement ------------------------------------------------------------------------------------------


def _settlement(
    t: _Table, at_issuer: NDArray[np.bool_], options: Options, skipped: list[str]
) -> tuple[Settlement, list[Finding]]:
    """Settle the records again (clearing.settlement.settle: cross-city debits, one per record identity; a
    record the issuer's ledger lacks is left out, as the clearing settles only what the issuer acked; a record
    of a card on its issuer's hotlist judged by publish time + grace) and compare with the settlement file."""
    claimed = options.claimed
    r = _Rows(t.r, t.starts)
    days = (r.time_us + _CHINA_US) // _DAY_US
    debit = np.isin(r.kind, [KINDS.index(k) for k in DEBIT_KINDS]) & (r.issuer != r.acquirer)
    day = claimed.day if claimed else options.day
    if day is not None:
        debit &= days == day_number(day)
        label = day
    elif debit.any():
        first, last = _day_text(int(days[debit].min())), _day_text(int(days[debit].max()))
        label = first if first == last else f"{first}..{last}"
    else:
        label = ""
    left_out = int((debit & at_issuer).sum())
    debit &= ~at_issuer
    hotlisted = _hotlisted(t, r, debit, _history(options, skipped))
    debit[list(hotlisted)] = False  # settled apart, by who bears them
    # one number per (acquirer, issuer, amount): city codes have 4 digits, amounts 31 bits (the wire record's)
    keys = (r.acquirer[debit] * 10_000 + r.issuer[debit]) << 31 | r.amount[debit]
    groups, counts = np.unique(keys, return_counts=True)
    debits = [
        (f"{pair // 10_000:04d}", f"{pair % 10_000:04d}", amount, n)
        for pair, amount, n in zip(
            (groups >> 31).tolist(), (groups & (2**31 - 1)).tolist(), counts.tolist(), strict=True
        )
    ]
    grace = Grace(options.default_grace, claimed.graces if claimed else {})
    rates = claimed.rates if claimed else {}
    settlement = settle(label, debits, rates, options.default_rate, hotlisted.values(), grace)
    if left_out:
        settlement.unsettled = {"missing at issuer": left_out}
    return settlement, _settlement_findings(settlement, claimed) if claimed else []


def _history(options: Options, skipped: list[str]) -> HotlistHistory:
    """The issuers' hotlists given; else the one the settlement file's list of hotlisted records implies (said in
    ``skipped``: a hotlisted record the file leaves out cannot be found then)."""
    if options.hotlists is not None:
        return options.hotlists
    claimed = options.claimed
    if claimed is None or not claimed.hotlisted:
        return {}
    skipped.append(
        f"hotlisted cards: no issuers' hotlists given (--hotlists FILE or a clearing database); the "
        f"{len(claimed.hotlisted)} record(s) {claimed.source} lists were judged again, a hotlisted record it "
        "leaves out is not found"
    )
    return claimed.history


def _hotlisted(t: _Table, r: _Rows, debit: NDArray[np.bool_], history: HotlistHistory) -> dict[int, Hotlisted]:
    """The debits of cards on their own issuer's hotlist, by identity (``r`` holds one row per identity)."""
    found: dict[int, Hotlisted] = {}
    listed = {card for _, card in history}  # a set lookup per debit first: most cards are on no list
    rows = np.flatnonzero(debit).tolist() if history else []
    for g in (g for g, card in zip(rows, r.card[rows].tolist(), strict=True) if card in listed):
        issuer = f"{int(r.issuer[g]):04d}"
        entry = history.get((issuer, str(r.card[g])))
        if entry is not None:
            acquirer, time, amount = f"{int(r.acquirer[g]):04d}", str(r.time[g]), int(r.amount[g])
            record_id = t.rid(int(t.starts[g]))
            found[g] = Hotlisted(record_id, acquirer, issuer, time, amount, entry.version, entry.published)
    return found


def _settlement_findings(settlement: Settlement, claimed: ClaimedSettlement) -> list[Finding]:
    """REC-SETTLEMENT: the settlement file against the records and against its own arithmetic."""
    return [
        *_net_sum_findings(claimed),
        *_position_findings(settlement, claimed),
        *_pair_findings(settlement, claimed),
        *_liability_findings(settlement, claimed),
    ]


def _net_sum_findings(claimed: ClaimedSettlement) -> list[Finding]:
    """The file's positions must sum to 0 fen, and its net_sum must be their sum (subject: the day)."""
    total = sum(claimed.positions.values())
    evidence = []
    if total:
        shown = ", ".join(f"{c} {n:+}" for c, n in sorted(claimed.positions.items()))
        evidence.append(f"{claimed.source}: net positions sum to {total:+} fen, not 0 ({shown})")
    if claimed.net_sum is not None and claimed.net_sum != total:
        evidence.append(
            f"{claimed.source}: net_sum {claimed.net_sum} fen in the file, but its positions sum to {total:+} fen"
        )
    if not evidence:
        return []
    return [finding("REC-SETTLEMENT", claimed.day, "", "", evidence, net_sum=total, stated_net_sum=claimed.net_sum)]


def _position_findings(settlement: Settlement, claimed: ClaimedSettlement) -> list[Finding]:
    """Each city's position in the file must be what the records give, and what the file's own pairs give
    (what the city is owed as acquirer minus what it owes as issuer). One finding per city (subject: the city)."""
    own: dict[str, int] = defaultdict(int)
    for (acquirer, issuer), line in claimed.pairs.items():
        own[acquirer] += line.issuer_owes_acquirer
        own[issuer] -= line.issuer_owes_acquirer
    ours = settlement.positions
    found = []
    for city in sorted(set(ours) | set(claimed.positions) | set(own)):
        says, gives, pairs = claimed.positions.get(city, 0), ours.get(city, 0), own.get(city, 0)
        evidence = []
        if says != gives:
            difference = f"({says - gives:+})"
            evidence.append(
                f"{claimed.source}: position {says:+} fen in the file, the records give {gives:+} fen {difference}"
            )
        if says != pairs:
            evidence.append(
                f"{claimed.source}: position {says:+} fen in the file, but its own pairs give {pairs:+} fen "
                "(owed to the city as acquirer - owed by it as issuer)"
            )
        if evidence:
            found.append(
                finding("REC-SETTLEMENT", city, "", city, evidence, claimed=says, recomputed=gives, from_pairs=pairs)
            )
    return found


def _pair_findings(settlement: Settlement, claimed: ClaimedSettlement) -> list[Finding]:
    """Every pair line of the file against the records: a pair in only one of them (subject ``A:I``, acquirer and
    issuer), and each field that differs (subject ``A:I field``). Each line's own arithmetic: the issuer owes
    gross - fee, and the fee is the rate times the gross within half a fen of rounding per record."""
    ours = {(x.acquirer, x.issuer): ClaimedPair.of(x) for x in settlement.lines}
    found = [
        _pair_finding(
            pair, [f"{claimed.source} has no line for {_pair_name(pair)}; the records give {_figures(gives)}"]
        )
        for pair, gives in sorted(ours.items())
        if pair not in claimed.pairs
    ]
    for pair, says in sorted(claimed.pairs.items()):
        gives = ours.get(pair)
        where = f"{claimed.source}: {_pair_name(pair)}"
        if gives is None:
            found.append(
                _pair_finding(pair, [f"{where} ({_figures(says)}) in the file; the records give no such pair"])
            )
        problems: dict[str, list[str]] = defaultdict(list)
        for name in PAIR_FIELDS:
            stated, recomputed = getattr(says, name), getattr(gives, name, None)
            if stated is not None and recomputed is not None and stated != recomputed:
                problems[name].append(
                    f"{where}: {name} {_money(name, stated)} in the file, the records give {_money(name, recomputed)} "
                    f"({stated - recomputed:+})"
                )
        for name, why in _arithmetic(says):
            problems[name].append(f"{where}: {why}")
        for name in PAIR_FIELDS:
            if problems[name]:
                values = {"field": name, "claimed": getattr(says, name), "recomputed": getattr(gives, name, None)}
                found.append(_pair_finding(pair, problems[name], **values))
    return found


def _liability_findings(settlement: Settlement, claimed: ClaimedSettlement) -> list[Finding]:
    """Each record of a hotlisted card that the file charges to another party than the records give, or that only
    one of them lists (subject: the record id). A file from before the list is not checked."""
    if claimed.hotlisted is None:
        return []
    ours = {x.record.record_id: x for x in settlement.hotlisted}
    found = []
    for record_id in sorted(set(ours) | set(claimed.hotlisted)):
        says, gives = claimed.hotlisted.get(record_id), ours.get(record_id)
        if says is not None and gives is not None and says.liable is gives.liable:
            continue
        where = f"{claimed.source}: {record_id}"
        if gives is None:
            why = f"{where} is listed as a record of a hotlisted card; the records give no such debit that day"
        else:
            x = gives.record
            published = x.published.isoformat() if x.published else "never published"
            judged = (
                f"taken by {x.acquirer} at {x.time}; {x.issuer}'s list version {x.version}, {published}, grace "
                f"{gives.grace} s: the {gives.liable.value}'s"
            )
            stated = f"the file charges it to the {says.liable.value}" if says else "the file does not list it"
            why = f"{where}: {stated}; the records give {judged}"
        city = says.issuer if says else gives.record.issuer if gives else ""
        found.append(
            finding(
                "REC-SETTLEMENT",
                record_id,
                "",
                city,
                [why],
                claimed=says.liable.value if says else None,
                recomputed=gives.liable.value if gives else None,
            )
        )
    return found


def _pair_finding(pair: tuple[str, str], evidence: list[str], **details: JSONValue) -> Finding:
    """A REC-SETTLEMENT finding about a pair line (the field that is wrong, if any, in ``details``)."""
    subject = ":".join(pair) + (f" {details['field']}" if "field" in details else "")
    return finding("REC-SETTLEMENT", subject, "", "", evidence, acquirer=pair[0], issuer=pair[1], **details)


def _pair_name(pair: tuple[str, str]) -> str:
    return f"acquirer {pair[0]}, issuer {pair[1]}"


def _arithmetic(line: ClaimedPair) -> list[tuple[str, str]]:
    """What is wrong with a pair line on its own, as (field, why): the issuer owes gross - fee; the fee is the
    rate times each record's amount rounded to whole fen, so within half a fen per record of rate x gross."""
    wrong = []
    if line.issuer_owes_acquirer != line.gross - line.fee:
        wrong.append(
            (
                "issuer_owes_acquirer",
                f"issuer_owes_acquirer {line.issuer_owes_acquirer} fen in the file, but its gross - fee is "
                f"{line.gross} - {line.fee} = {line.gross - line.fee} fen",
            )
        )
    exact, slack = line.rate * line.gross, Decimal(line.records) / 2
    least, most = math.ceil(exact - slack), math.floor(exact + slack)
    if not least <= line.fee <= most:
        wrong.append(
            (
                "fee",
                f"fee {line.fee} fen in the file, but at its rate {line.rate} on gross {line.gross} fen "
                f"({_plain(exact)} fen), rounded half-even per record over {line.records} record(s), the fee lies "
                f"within {least}..{most} fen",
            )
        )
    return wrong


def _money(name: str, value: int) -> str:
    return str(value) if name == "records" else f"{value} fen"


def _figures(line: ClaimedPair) -> str:
    return (
        f"{line.records} record(s), gross {line.gross} fen, fee {line.fee} fen, "
        f"issuer_owes_acquirer {line.issuer_owes_acquirer} fen"
    )


def _plain(number: Decimal) -> str:
    """A decimal without trailing zeros or an exponent (8.000 -> 8, 1E+2 -> 100)."""
    return f"{number.normalize():f}"


# --- the whole job ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Holder:
    """One holder city's ledgers merged: their sources, and their rows in parts (one per ledger, sources numbered
    on): the table concatenates every part once."""

    city: str
    sources: tuple[Source, ...]
    parts: tuple[Records, ...]
    issuer_side: bool


def _merge(ledgers: Sequence[CityLedger], day: str | None) -> list[_Holder]:
    """One holder per city (sources of the same city merged), only rows of ``day`` when given."""
    by_city: dict[str, list[CityLedger]] = defaultdict(list)
    for ledger in ledgers:
        by_city[ledger.city].append(ledger)
    merged = []
    for city in sorted(by_city):
        sources: list[Source] = []
        parts = []
        for ledger in by_city[city]:
            records = replace(ledger.records, source=ledger.records.source + len(sources))
            if day is not None:
                records = records.take((records.time_us + _CHINA_US) // _DAY_US == day_number(day))
            parts.append(records)
            sources.extend(ledger.sources)
        merged.append(_Holder(city, tuple(sources), tuple(parts), any(x.issuer_side for x in by_city[city])))
    return merged


def reconcile(ledgers: Sequence[CityLedger], options: Options) -> Report:
    """Reconcile the holders' ledgers: every check of audit.md, findings by RECONCILE_RULES ids."""
    with _small_pages():
        return _reconcile(ledgers, options)


@contextlib.contextmanager
def _small_pages() -> Iterator[None]:
    """numpy asks for transparent huge pages for its big arrays (where the kernel gives them on request): a fresh
    one costs the zeroing of 2 MB, and once the TAC workers have forked, every huge page either side writes is
    copied whole. With 4 KB pages reconcile spends half the system time (bench/reconcile_bench.py, 1M records).
    numpy's own switch (numpy._core.multiarray._set_madvise_hugepage), set back after."""
    multiarray = importlib.import_module("numpy._core.multiarray")
    switch: Callable[[bool], bool] | None = getattr(multiarray, "_set_madvise_hugepage", None)
    if switch is None:
        yield
        return
    before = switch(False)
    try:
        yield
    finally:
        switch(before)


def _reconcile(ledgers: Sequence[CityLedger], options: Options) -> Report:
    merged = _merge(ledgers, options.day)
    table = _Table(merged)
    tacs = None if options.keys is None else _start_tacs(table, options.keys, options)
    skipped: list[str] = []
    missing, at_issuer = _missing(table)
    findings = [*_duplicates(table), *_conflicts(table), *missing, *_sequences(table)]
    findings += _travel(table, options.cities, skipped)
    if tacs is None:
        skipped.append("TAC verification not run (--no-tac)")
    else:
        findings += _tac_findings(table, tacs(), options, skipped)
    settlement, settled = _settlement(table, at_issuer, options, skipped)
    findings += settled
    rank = {rule: n for n, rule in enumerate(RECONCILE_RULES)}
    findings.sort(key=lambda f: (rank[f.id], f.subject, f.city))
    by_rule = Counter(f.id for f in findings)
    return Report(
        kind="reconcile",
        inputs=[s.name for ledger in merged for s in ledger.sources]
        + ([options.claimed.source] if options.claimed else []),
        findings=findings,
        subjects=[
            {
                "city": ledger.city,
                "name": options.cities.names.get(ledger.city, ""),
                "records": sum(len(part) for part in ledger.parts),
                "issuer_side": ledger.issuer_side,
                "sources": [s.name for s in ledger.sources],
            }
            for ledger in merged
        ],
        checks={rule: by_rule.get(rule, 0) for rule in RECONCILE_RULES},
        skipped=skipped,
        settlement=settlement.to_json(),
        hotlist=sorted({str(f.details["card"]) for f in findings if f.id in CLONE_RULES}),
    )
