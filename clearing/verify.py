"""Checking records' TACs (CPU cards) or terminal MACs (M1 cards) with the issuer's keys, one or many at once.

Both ways share the key of a record (``_card_key``), the layouts of ``cardsim.crypto`` and its CBC chain
(``BlockKey.cbc_macs``). Many records go as columns (``TacColumns``): neighbouring records of one card key form
a run whose key is derived once (IssuerHost caches it per card), the data of every MAC is laid out for all
records at once, and each run goes through one ECB call per chaining step. numpy costs
~60 us per batch whatever its size, so a few records go one by one (``tac_problems``).
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Final, NamedTuple, get_args

import numpy as np
from numpy.typing import NDArray

from cardsim import crypto
from cardsim.bcd import bcd_date, bcd_time
from cardsim.crypto import MAC_SIZE, Algorithm, BlockKey
from cardsim.issuer import HostRefusal, IssuerHost
from cardsim.purse import TYPE_COMPOUND, TYPE_LOAD, TYPE_PURCHASE
from terminals.messages import TxnAlg, TxnKind, TxnRecord

Ints = NDArray[np.int64]
Objects = NDArray[np.object_]

ALGS: Final[tuple[TxnAlg, ...]] = get_args(TxnAlg)
KINDS: Final[tuple[str, ...]] = get_args(TxnKind)
_TXN_TYPE: Final = {
    "purchase": TYPE_PURCHASE,
    "metro_entry": TYPE_COMPOUND,
    "metro_exit": TYPE_COMPOUND,
    "load": TYPE_LOAD,
}
TXN_TYPES: Final = np.array([_TXN_TYPE[kind] for kind in KINDS], dtype=np.int64)
"""The transaction type byte of each kind, by index into KINDS."""
_SM4: Final = ALGS.index(Algorithm.SM4.value)
_MISMATCH: Final = ("TAC does not verify", "M1 record MAC does not verify")  # by m1

_LAYOUTS: Final = (crypto.PURCHASE_TAC, crypto.LOAD_TAC, crypto.M1_RECORD)
_AS_BYTES: Final = frozenset({"uid", "terminal", "date", "time"})  # given as bytes of their width, one by one


class DoesNotFit(ValueError):
    """A record's number is negative or too large for its field of the MAC data: no TAC or MAC covers it."""


def _unfit(name: str, value: int, width: int) -> str:
    return f"{name} {value} does not fit the MAC data's {width} bytes"


@dataclass(frozen=True)
class TacColumns:
    """Records to verify, as columns (one entry per record): what picks the card key, what the MAC covers, and
    the MAC the record carries."""

    m1: NDArray[np.bool_]
    issuer: Ints  # city code as a number (4510)
    card: Objects  # the 20-digit serial (CPU) or 8-hex-digit UID (M1)
    alg: Ints  # index into ALGS (an M1 record MAC is SM4 whatever the record says)
    key_version: Ints
    txn_type: Ints  # TYPE_PURCHASE, TYPE_COMPOUND or TYPE_LOAD
    counter: Ints
    amount: Ints
    balance_before: Ints
    balance_after: Ints
    terminal: Ints  # the 6 bytes as a number
    terminal_seq: Ints
    date: Ints  # the local date as BCD YYYYMMDD, a number (0x20261124)
    time: Ints  # the local time as BCD HHMMSS (0x081502)
    tac: Ints  # the TAC or record MAC the record carries

    def __len__(self) -> int:
        return len(self.m1)

    def take(self, index: NDArray[np.integer] | NDArray[np.bool_]) -> TacColumns:
        """The records at ``index`` (positions or a mask)."""
        return replace(self, **{f.name: getattr(self, f.name)[index] for f in fields(self)})

    @classmethod
    def of_records(cls, records: Sequence[TxnRecord]) -> TacColumns:
        """The columns of wire records."""
        numbers = np.array(
            [
                (
                    r.tech == "m1",
                    int(r.card.issuer),
                    ALGS.index(r.alg),
                    r.key_version,
                    _TXN_TYPE[r.kind],
                    r.card_counter,
                    r.amount,
                    r.balance_before,
                    r.balance_after,
                    int(r.terminal, 16),
                    r.terminal_seq,
                    int(r.tac, 16),
                )
                for r in records
            ],
            dtype=np.int64,
        ).reshape(-1, 12)
        date, time = local_bcd([r.time for r in records])
        card = np.empty(len(records), dtype=object)
        card[:] = [r.card.id for r in records]
        m1, issuer, alg, version, txn_type, counter, amount, before, after, terminal, seq, tac = numbers.T
        return cls(
            m1.astype(bool),
            issuer,
            card,
            alg,
            version,
            txn_type,
            counter,
            amount,
            before,
            after,
            terminal,
            seq,
            date,
            time,
            tac,
        )


def local_bcd(times: Iterable[str]) -> tuple[Ints, Ints]:
    """The local date and time (BCD, as numbers) of ISO 8601 times with their offset, as a TAC covers them;
    each distinct text is parsed once, each distinct day converted once."""
    texts = list(times)
    days: dict[dt.date, int] = {}
    known: dict[str, int] = {}  # date and time as one number: BCD YYYYMMDDHHMMSS
    for text in dict.fromkeys(texts):
        moment = dt.datetime.fromisoformat(text)
        day = moment.date()
        if day not in days:
            days[day] = int.from_bytes(bcd_date(day)) << 24
        known[text] = days[day] | int.from_bytes(bcd_time(moment))
    both = np.fromiter(map(known.__getitem__, texts), dtype=np.int64, count=len(texts))
    return both >> 24, both & 0xFFFFFF


class Expected(NamedTuple):
    """What the records must carry: each one's MAC (-1 where the keys cannot make it), and why not, by row."""

    macs: Ints
    refused: dict[int, str]


def expected_macs(host: IssuerHost, rows: TacColumns) -> Expected:
    """The TAC (CPU) or M1 record MAC each record must carry, with the issuer keys of ``host``. Neighbouring
    records of one card key share its derivation and its ECB calls: give the records of a card together."""
    count = len(rows)
    macs = np.full(count, -1, dtype=np.int64)
    refused: dict[int, str] = {}
    new = np.ones(count, dtype=bool)  # the first row of each run
    new[1:] = rows.card[1:] != rows.card[:-1]
    for column in (rows.m1, rows.issuer, rows.alg, rows.key_version):  # the rest of what picks the key
        new[1:] |= column[1:] != column[:-1]
    starts = np.flatnonzero(new).tolist()
    keys: dict[int, BlockKey] = {}  # by run
    for r, i in enumerate(starts):
        try:
            keys[r] = _card_key(
                host,
                bool(rows.m1[i]),
                f"{rows.issuer[i]:04d}",
                str(rows.card[i]),
                ALGS[rows.alg[i]],
                int(rows.key_version[i]),
            )
        except HostRefusal as err:
            refused.update(dict.fromkeys(range(i, starts[r + 1] if r + 1 < len(starts) else count), str(err)))
    run = np.cumsum(new) - 1  # the run of each row
    # class: the layout (purchase or compound, load, M1) and the block size (SM4 and M1 16 bytes, else 8)
    wide = rows.m1 | (rows.alg == _SM4)
    kind = np.where(rows.m1, 2, (rows.txn_type == TYPE_LOAD).astype(np.int64)) * 2 + wide
    if refused:
        kind[list(refused)] = -1
    for number in set(kind.tolist()) - {-1}:
        index = np.flatnonzero(kind == number)
        layout = _LAYOUTS[number // 2]
        unfit = _unfitting(rows, index, layout)
        if unfit:  # refused, as one by one (each number of a row would be cut to its field's width below)
            refused.update(unfit)
            index = index[~np.isin(index, list(unfit))]
        if len(index):
            size = 16 if number % 2 else 8
            macs[index] = _macs(_lay_out(rows, index, layout, size), size, run[index], keys)
    return Expected(macs, refused)


def _unfitting(rows: TacColumns, index: Ints, layout: crypto.Layout) -> dict[int, str]:
    """The rows at ``index`` with a number outside its field of ``layout``, with the reason ``tac_problem`` gives
    (for the first such field)."""
    out: dict[int, str] = {}
    for name, width in layout:
        if name not in _AS_BYTES:
            values = getattr(rows, name)[index]
            for i in np.flatnonzero((values < 0) | (values >= 1 << 8 * width)).tolist():
                out.setdefault(int(index[i]), _unfit(name, int(values[i]), width))
    return out


def _lay_out(rows: TacColumns, index: Ints, layout: crypto.Layout, size: int) -> NDArray[np.uint8]:
    """The MAC data of the records at ``index``, one row each: ``layout``'s fields big-endian, then
    ``crypto.pad80``'s padding for blocks of ``size``."""
    width = sum(w for _, w in layout)
    padding = crypto.pad80(bytes(width), size)[width:]
    data = np.empty((len(index), width + len(padding)), dtype=np.uint8)
    at = 0
    for name, w in layout:
        if name == "uid":
            values = np.array([int(card, 16) for card in rows.card[index].tolist()], dtype=np.int64)
        else:
            values = getattr(rows, name)[index]
        data[:, at : at + w] = values.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - w :]
        at += w
    data[:, at:] = np.frombuffer(padding, dtype=np.uint8)
    return data


def _card_key(host: IssuerHost, m1: bool, issuer: str, card: str, alg: str, version: int) -> BlockKey:
    """The key of a record's TAC (CPU) or record MAC (M1); HostRefusal when the issuer keys cannot make it."""
    if m1:
        return host.m1_record_key(issuer, version, bytes.fromhex(card))
    serial = bytes.fromhex(card)[2:]
    if serial[:2].hex() != issuer:
        raise HostRefusal(f"card serial does not belong to issuer {issuer}")
    return host.tac_key(serial, version, Algorithm(alg))


def _macs(data: NDArray[np.uint8], size: int, run: Ints, keys: dict[int, BlockKey]) -> Ints:
    """The MACs of padded data (one row a record, one block size), each run of one key through one ECB call per
    step."""
    steps = [data[:, k : k + size].tobytes() for k in range(0, data.shape[1], size)]
    bounds = np.flatnonzero(np.concatenate(([True], run[1:] != run[:-1], [True]))).tolist()
    chains = []
    for start, end in itertools.pairwise(bounds):
        chains.append(keys[run[start]].cbc_macs([step[start * size : end * size] for step in steps]))
    last = np.frombuffer(b"".join(chains), dtype=np.uint8).reshape(-1, size)[:, :MAC_SIZE]
    return last.copy().view(">u4")[:, 0].astype(np.int64)


def expected_tac(host: IssuerHost, record: TxnRecord) -> bytes:
    """The TAC (CPU) or M1 record MAC the record must carry; HostRefusal when the keys are missing, DoesNotFit
    when a number of the record does not fit its field of the MAC data."""
    when = record.moment
    m1, card = record.tech == "m1", record.card.id
    values: dict[str, int | bytes] = {
        "uid": bytes.fromhex(card),
        "counter": record.card_counter,
        "amount": record.amount,
        "balance_before": record.balance_before,
        "balance_after": record.balance_after,
        "txn_type": _TXN_TYPE[record.kind],
        "terminal": bytes.fromhex(record.terminal),
        "terminal_seq": record.terminal_seq,
        "date": bcd_date(when),
        "time": bcd_time(when),
    }
    key = _card_key(host, m1, record.card.issuer, card, record.alg, record.key_version)
    layout = _LAYOUTS[2 if m1 else int(values["txn_type"] == TYPE_LOAD)]
    for name, width in layout:
        value = values[name]
        if isinstance(value, int) and not 0 <= value < 1 << 8 * width:
            raise DoesNotFit(_unfit(name, value, width))
    return key.mac(crypto.pack(layout, *(values[name] for name, _ in layout)))


def tac_problem(host: IssuerHost, record: TxnRecord) -> str | None:
    """None when the record's TAC (or M1 record MAC) verifies with the issuer keys, else the reason."""
    try:
        expected = expected_tac(host, record)
    except (HostRefusal, DoesNotFit) as err:
        return str(err)
    return None if expected.hex().upper() == record.tac else _MISMATCH[record.tech == "m1"]


BATCH_LEAST: Final = 32
"""From this many records on, tac_problems verifies them as columns (bench/verify_bench.py: the crossover)."""


def tac_problems(host: IssuerHost, records: Sequence[TxnRecord]) -> list[str | None]:
    """``tac_problem`` for many records at once, verdict for verdict in the same order."""
    if len(records) < BATCH_LEAST:
        return [tac_problem(host, record) for record in records]
    rows = TacColumns.of_records(records)
    expected = expected_macs(host, rows)
    wrong = (expected.macs != rows.tac).tolist()
    return [
        expected.refused[i] if i in expected.refused else _MISMATCH[m1] if bad else None
        for i, (bad, m1) in enumerate(zip(wrong, rows.m1.tolist(), strict=True))
    ]
