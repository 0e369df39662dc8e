"""A reconciliation fixture: one day of signed records of the three cities, written as the daily clearing files
of each acquirer (clearing-CITY-DAY.csv) and the issuer side of each city (issuer-CITY-DAY.csv, records of its
cards acquired elsewhere), with a settlement file; with ``plant=True`` one or more of every kind of problem
audit reconcile looks for is planted, and the exact findings it must report are returned. With ``hotlisted=True``
some cards are on their issuer's hotlist (a hotlist file), and the settlement charges their records to the issuer
or the acquirer by publish time + grace.

Deterministic for a seed. Records are signed with the published test keys, as a card and PSAM would sign them.
"""

from __future__ import annotations

import datetime as dt
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from audit.ledger_sources import clearing_row, write_clearing_file, write_hotlist_file
from audit.reconcile import HotlistEntry
from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from cardsim.personalise import application_serial
from clearing.settlement import DEBIT_KINDS, Grace, Hotlisted, settle
from clearing.verify import expected_tac
from terminals.messages import CHINA, TXN_SCHEMA, TxnRecord

DAY = "2026-11-24"
CITIES = ("4510", "4560", "4530")
_START = dt.datetime(2026, 11, 24, 7, 0, tzinfo=CHINA)
_STEP = dt.timedelta(minutes=130)  # longer than any trip between the cities: clean traffic never looks cloned


@dataclass
class _Card:
    issuer: str
    id: str
    alg: str
    balance: int = 20_000
    offline: int = 0
    online: int = 0

    @property
    def tech(self) -> str:
        return "m1" if len(self.id) == 8 else "cpu"


@dataclass
class _Traffic:
    """Signed records in the order they happen, and where each one is filed."""

    host: IssuerHost
    rnd: random.Random
    records: list[TxnRecord] = field(default_factory=list)
    seqs: dict[str, int] = field(default_factory=dict)
    dropped: set[int] = field(default_factory=set)  # in no file (a counter gap)
    not_at_issuer: set[int] = field(default_factory=set)
    not_at_acquirer: set[int] = field(default_factory=set)
    twice: set[int] = field(default_factory=set)  # a second copy in the acquirer's file

    def card(self, issuer: str, tech: str = "cpu", alg: str = "sm4") -> _Card:
        """A new card of ``issuer``."""
        if tech == "m1":
            return _Card(issuer, f"{self.rnd.getrandbits(32):08X}", "sm4")
        return _Card(issuer, application_serial(issuer, self.rnd.randrange(10**12)).hex(), alg)

    def tap(self, card: _Card, city: str, when: dt.datetime, kind: str = "purchase", amount: int = 0) -> int:
        """``card`` at a terminal of ``city``; the record's index. The card's balance and counter move on."""
        terminal = f"{city}{1 + self.rnd.randrange(3):08X}"
        seq = self.seqs[terminal] = self.seqs.get(terminal, 0) + 1
        amount = amount or 100 + 50 * self.rnd.randrange(8)
        load = kind == "load"
        after = card.balance + amount if load else card.balance - amount
        unsigned = TxnRecord.model_validate(
            {
                "schema": TXN_SCHEMA,
                "seq": seq,
                "kind": kind,
                "tech": card.tech,
                "card": {"issuer": card.issuer, "uid" if card.tech == "m1" else "serial": card.id},
                "card_counter": card.online if load else card.offline,
                "amount": amount,
                "balance_before": card.balance,
                "balance_after": after,
                "terminal": terminal,
                "terminal_seq": seq,
                "psam": "0000" + terminal,
                "acquirer": city,
                "time": when.isoformat(timespec="seconds"),
                "tac": "00000000",
                "key_version": 1,
                "alg": card.alg,
            }
        )
        self.records.append(self.sign(unsigned))
        card.balance = after
        if load:
            card.online += 1
        else:
            card.offline += 1
        return len(self.records) - 1

    def sign(self, record: TxnRecord) -> TxnRecord:
        """The record with the TAC (or M1 record MAC) its card and terminal would give it."""
        return record.model_copy(update={"tac": expected_tac(self.host, record).hex().upper()})

    def day(self, card: _Card, cities: list[str], first: dt.datetime) -> list[int]:
        """A clean day of ``card``: a load at home (CPU), then a purchase in each of ``cities``."""
        done = [self.tap(card, card.issuer, first, "load", 5000)] if card.tech == "cpu" else []
        for n, city in enumerate(cities, 1):
            done.append(self.tap(card, city, first + n * _STEP))
        return done

    def files(self, folder: Path) -> list[str]:
        """Write the acquirer files and the issuer-side files; the inputs as audit reconcile takes them."""
        acquired: dict[str, list[list[str]]] = {city: [] for city in CITIES}
        issued: dict[str, list[list[str]]] = {city: [] for city in CITIES}
        ordered = sorted(range(len(self.records)), key=lambda i: (self.records[i].terminal, self.records[i].seq))
        for i in ordered:
            record = self.records[i]
            if i in self.dropped:
                continue
            row = clearing_row(record)
            if i not in self.not_at_acquirer:
                acquired[record.acquirer] += [row, row] if i in self.twice else [row]
            if record.card.issuer != record.acquirer and i not in self.not_at_issuer:
                issued[record.card.issuer].append(row)
        inputs = []
        for city in CITIES:
            path = folder / f"clearing-{city}-{DAY}.csv"
            write_clearing_file(path, acquired[city])
            inputs.append(str(path))
            path = folder / f"issuer-{city}-{DAY}.csv"
            write_clearing_file(path, issued[city])
            inputs.append(f"{city}={path}")
        return inputs


@dataclass(frozen=True)
class Fixture:
    """What was written: the command's inputs, the settlement file, and what it must find."""

    inputs: list[str]  # positional arguments of audit reconcile (FILE or CITY=FILE)
    settlement: Path
    expected: set[tuple[str, str]]  # (rule id, subject) of every finding, nothing more
    hotlist: list[str]
    hotlists: Path | None = None  # the issuers' hotlist file (``hotlisted=True``)
    liable: dict[str, str] = field(default_factory=dict)  # record id of a hotlisted card's debit -> who bears it


HOTLIST_GRACE = Grace(600, {("4510", "4530"): 120})
"""The fixture's grace: the default, but two minutes for Zibo's cards at Jinan's terminals."""


def write_fixture(
    folder: Path, seed: int = 1, plant: bool = True, keys: IssuerKeyStore | None = None, hotlisted: bool = False
) -> Fixture:
    """Write the fixture into ``folder`` (created); ``plant=False`` gives the same kind of day with no problems."""
    folder.mkdir(parents=True, exist_ok=True)
    traffic = _Traffic(IssuerHost(keys or IssuerKeyStore.test_set()), random.Random(seed))
    others = {city: [c for c in CITIES if c != city] for city in CITIES}
    for n, (city, tech, alg) in enumerate((c, t, a) for c in CITIES for t, a in _FLEET):
        card = traffic.card(city, tech, alg)
        away = others[city][n % 2]
        plan = [city, city, away, away] if n % 3 == 0 else [city, city, city]
        traffic.day(card, plan, _START + dt.timedelta(minutes=3 * n))
    expected: set[tuple[str, str]] = set()
    hotlist: set[str] = set()
    if plant:
        _plant(traffic, expected, hotlist)
    history = _on_hotlists(traffic) if hotlisted else {}
    inputs = traffic.files(folder)
    debits = [
        r
        for i, r in enumerate(traffic.records)
        if r.kind in DEBIT_KINDS and r.acquirer != r.card.issuer and i not in traffic.dropped | traffic.not_at_issuer
    ]
    listed = [(r, history[(r.card.issuer, r.card.id)]) for r in debits if (r.card.issuer, r.card.id) in history]
    settled = [(r.acquirer, r.card.issuer, r.amount, 1) for r in debits if (r.card.issuer, r.card.id) not in history]
    hot = [
        Hotlisted(r.record_id, r.acquirer, r.card.issuer, r.time, r.amount, e.version, e.published) for r, e in listed
    ]
    settlement = settle(DAY, settled, {}, hotlisted=hot, grace=HOTLIST_GRACE)
    doc = settlement.to_json()
    if plant:  # a settlement that does not sum to zero: Yantai's position is 100 fen too high
        doc["positions"]["4560"] += 100
        doc["net_sum"] = sum(doc["positions"].values())
        expected |= {("REC-SETTLEMENT", DAY), ("REC-SETTLEMENT", "4560")}
    path = folder / f"settlement-{DAY}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    hotlists = folder / f"hotlists-{DAY}.csv" if hotlisted else None
    if hotlists:
        write_hotlist_file(hotlists, history)
    liable = {x.record.record_id: x.liable.value for x in settlement.hotlisted}
    return Fixture(inputs, path, expected, sorted(hotlist), hotlists, liable)


def _on_hotlists(t: _Traffic) -> dict[tuple[str, str], HotlistEntry]:
    """Cards on their issuer's hotlist, each on a card of its own: the issuers' lists (with one card another city
    listed, which makes no liability)."""
    base = _START + dt.timedelta(minutes=2)

    def at(i: int) -> dt.datetime:
        return dt.datetime.fromisoformat(t.records[i].time)

    history: dict[tuple[str, str], HotlistEntry] = {}
    # Jinan's card in Yantai twice: published 5 minutes before the first purchase (within the 10 minutes of grace,
    # the issuer's), the second comes 130 minutes later (the acquirer's)
    card = t.card("4510")
    ids = t.day(card, ["4560", "4560"], base)
    history[("4510", card.id)] = HotlistEntry(1, at(ids[1]) - dt.timedelta(minutes=5))
    # Yantai's card in Zibo, on a version Yantai never published: the issuer's however late
    card = t.card("4560", alg="3des")
    ids = t.day(card, ["4530"], base)
    history[("4560", card.id)] = HotlistEntry(1, None)
    # Zibo's card in Jinan, published 5 minutes before: past the pair's 2-minute grace, the acquirer's
    card = t.card("4530")
    ids = t.day(card, ["4510"], base)
    history[("4530", card.id)] = HotlistEntry(2, at(ids[1]) - dt.timedelta(minutes=5))
    # a Jinan card on Zibo's list (not its issuer's): settled as any other record
    card = t.card("4510", "m1")
    ids = t.day(card, ["4530"], base)
    history[("4530", card.id)] = HotlistEntry(2, at(ids[0]) - dt.timedelta(hours=1))
    return history


_FLEET = (("cpu", "sm4"), ("cpu", "3des"), ("cpu", "sm4"), ("m1", "sm4"))


def _plant(t: _Traffic, expected: set[tuple[str, str]], hotlist: set[str]) -> None:
    """One or more of every problem, each on a card of its own so that none causes another."""

    def rid(i: int) -> str:
        return t.records[i].record_id

    base = _START + dt.timedelta(minutes=1)
    # missing on the issuer side (4560 never got Jinan's forward) and on the acquirer side (Zibo lost one)
    ids = t.day(t.card("4560"), ["4560", "4510"], base)
    t.not_at_issuer.add(ids[-1])
    ids = t.day(t.card("4510", alg="3des"), ["4510", "4530"], base)
    t.not_at_acquirer.add(ids[-1])
    # the same row twice in Zibo's file
    ids = t.day(t.card("4530"), ["4530", "4530"], base)
    t.twice.add(ids[-1])
    expected |= {("REC-MISSING", rid(x)) for x in (t.not_at_issuer | t.not_at_acquirer)}
    expected.add(("REC-DUPLICATE", rid(ids[-1])))

    # an M1 clone in Yantai: the same record (counter) written by a second card with the same UID
    m1 = t.card("4560", "m1")
    ids = t.day(m1, ["4560", "4560"], base)
    twin = t.records[ids[-1]]
    clone_time = dt.datetime.fromisoformat(twin.time) + dt.timedelta(minutes=10)
    t.records.append(t.sign(twin.model_copy(update={"terminal": "456000000009", "time": clone_time.isoformat()})))
    expected.add(("REC-CONFLICT", twin.record_id))
    hotlist.add(m1.id)

    # a counter gap: the second purchase of a card reached no clearing
    ids = t.day(t.card("4510"), ["4510", "4510", "4510"], base)
    t.dropped.add(ids[2])
    expected.add(("REC-COUNTER-GAP", rid(ids[3])))

    # a counter repeat: a copy of a CPU card's state pays a metro exit with the counter the card used an hour ago
    cpu = t.card("4530", alg="3des")
    ids = t.day(cpu, ["4530"], base)
    state = replace(cpu, balance=t.records[ids[-1]].balance_before, offline=t.records[ids[-1]].card_counter)
    clone = t.tap(
        state, "4530", dt.datetime.fromisoformat(t.records[ids[-1]].time) + dt.timedelta(hours=1), "metro_exit"
    )
    t.tap(cpu, "4530", base + 3 * _STEP)
    expected.add(("REC-COUNTER-REPEAT", rid(clone)))
    hotlist.add(cpu.id)

    # a balance break: the card's last record starts 100 fen below where the one before it ended
    ids = t.day(t.card("4560", alg="3des"), ["4560", "4560"], base)
    last = t.records[ids[-1]]
    shifted = {"balance_before": last.balance_before - 100, "balance_after": last.balance_after - 100}
    t.records[ids[-1]] = t.sign(last.model_copy(update=shifted))
    expected.add(("REC-BALANCE", rid(ids[-1])))

    # TACs that do not verify: a CPU purchase in Jinan of a Zibo card, an M1 record in Zibo
    for card, city in ((t.card("4530"), "4510"), (t.card("4530", "m1"), "4530")):
        ids = t.day(card, [card.issuer, city], base)
        bad = t.records[ids[-1]]
        t.records[ids[-1]] = bad.model_copy(update={"tac": f"{int(bad.tac, 16) ^ 1:08X}"})
        expected.add(("REC-TAC", rid(ids[-1])))
        hotlist.add(card.id)

    # an M1 value block raised by 45 yuan between two purchases
    m1 = t.card("4510", "m1")
    ids = t.day(m1, ["4510"], base)
    m1.balance += 4500
    tampered = t.tap(m1, "4510", base + 2 * _STEP)
    expected.add(("REC-M1-TAMPER", rid(tampered)))
    hotlist.add(m1.id)

    # an M1 UID in Jinan, then half an hour later in Yantai (the trip takes two hours)
    m1 = t.card("4510", "m1")
    ids = t.day(m1, ["4510"], base)
    far = t.tap(m1, "4560", base + _STEP + dt.timedelta(minutes=30))
    expected.add(("REC-IMPOSSIBLE-TRAVEL", rid(far)))
    hotlist.add(m1.id)
