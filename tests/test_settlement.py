"""Settlement with liability by time (issue 19): a record of a card on its issuer's hotlist is the issuer's when
taken up to publish time + grace, the acquirer's loss after it; per pair grace; a version never published; the
issuer's tables in the clearing database and the `clearing settle --hotlist-grace` option."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from clearing_support import HOST, fresh_db, signed_records

from clearing.db import migrate, open_engine
from clearing.intake import Intake, Topic
from clearing.ledger import Ledger, Received
from clearing.schema import HOTLIST, HOTLIST_VERSION
from clearing.settlement import DEFAULT_GRACE, Grace, Hotlisted, Liable, fee, settle, settle_day
from terminals.messages import CHINA, TxnRecord, batch_payload, txn_topic

DAY = "2026-11-24"
T0 = dt.datetime(2026, 11, 24, 9, 0, tzinfo=CHINA)


def _hot(n: int, acquirer: str, at: dt.datetime, published: dt.datetime | None, amount: int = 200) -> Hotlisted:
    return Hotlisted(
        f"4510-451000000000000000{n:02d}-purchase-{n}", acquirer, "4510", at.isoformat(), amount, 3, published
    )


def test_a_record_after_publish_plus_grace_is_the_acquirers_loss_and_before_it_the_issuers() -> None:
    published = T0
    before = _hot(1, "4560", published + dt.timedelta(seconds=DEFAULT_GRACE - 1), published, 300)
    edge = _hot(2, "4560", published + dt.timedelta(seconds=DEFAULT_GRACE), published, 250)
    after = _hot(3, "4560", published + dt.timedelta(seconds=DEFAULT_GRACE + 1), published, 400)
    never = _hot(4, "4560", published + dt.timedelta(days=1), None, 150)
    settlement = settle(DAY, [("4560", "4510", 1000, 2)], {}, hotlisted=[after, before, never, edge])
    (line,) = settlement.lines
    # the issuer's records are settled like any other (in records, gross and fee), the acquirer's are not
    assert (line.records, line.gross) == (2 + 3, 2000 + 300 + 250 + 150)
    assert line.fee == sum(fee(amount, Decimal("0.005")) for amount in (1000, 1000, 300, 250, 150))
    assert (line.hotlisted_issuer, line.hotlisted_acquirer, line.grace) == (300 + 250 + 150, 400, DEFAULT_GRACE)
    assert sum(settlement.positions.values()) == 0 and settlement.positions["4560"] == line.owed
    liable = {x.record.record_id: x.liable for x in settlement.hotlisted}
    assert liable == {
        before.record_id: Liable.ISSUER,
        edge.record_id: Liable.ISSUER,
        after.record_id: Liable.ACQUIRER,
        never.record_id: Liable.ISSUER,
    }
    doc = settlement.to_json()
    (pair,) = doc["pairs"]
    assert (pair["hotlisted_issuer_fen"], pair["hotlisted_acquirer_fen"], pair["hotlist_grace_seconds"]) == (
        700,
        400,
        600,
    )
    listed = {x["record_id"]: x for x in doc["hotlisted"]}
    assert listed[after.record_id]["liable"] == "acquirer"
    assert listed[after.record_id]["published"] == "2026-11-24T09:00:00+08:00"
    assert listed[never.record_id]["published"] is None and listed[never.record_id]["liable"] == "issuer"
    assert doc["net_sum"] == 0


def test_the_grace_of_one_pair_can_differ() -> None:
    at = T0 + dt.timedelta(minutes=5)
    records = [_hot(1, "4560", at, T0), _hot(2, "4530", at, T0)]
    settlement = settle(DAY, [], {}, hotlisted=records, grace=Grace(DEFAULT_GRACE, {("4530", "4510"): 120}))
    by_pair = {(x.acquirer, x.issuer): x for x in settlement.lines}
    assert by_pair[("4560", "4510")].hotlisted == (200, 0) and by_pair[("4560", "4510")].grace == 600
    assert by_pair[("4530", "4510")].hotlisted == (0, 200) and by_pair[("4530", "4510")].grace == 120
    # a pair with only the acquirer's losses still has its line, owing nothing
    assert (by_pair[("4530", "4510")].records, by_pair[("4530", "4510")].owed) == (0, 0)
    assert sum(settlement.positions.values()) == 0


def test_without_hotlisted_records_the_settlement_is_as_before() -> None:
    settlement = settle(DAY, [("4560", "4510", 300, 3), ("4510", "4560", 150, 1)], {})
    assert [(x.records, x.gross, x.hotlisted) for x in settlement.lines] == [(1, 150, (0, 0)), (3, 900, (0, 0))]
    assert settlement.to_json()["hotlisted"] == []


# --- from a clearing database ---------------------------------------------------------------------------


def _topic(topic: str, city: str) -> Topic:
    parsed = Topic.parse(topic, city)
    assert parsed is not None
    return parsed


async def _acquired(url: str) -> list[TxnRecord]:
    """Yantai's terminal takes 4510 and 4560 cards; Jinan acks every forward. Returns the records."""
    engine = open_engine(url)
    await migrate(engine)
    terminal = "456000000001"
    records = signed_records(24, "4560", terminal, issuers=("4560", "4510"), cards=6)
    topic = txn_topic("4560", terminal)
    payload = batch_payload([r.to_json() for r in records]).encode()
    verdicts = Intake("4560", HOST).message(_topic(topic, "4560"), payload, frozenset())
    outcome = await Ledger(engine, "4560").store([Received(topic, terminal, verdicts)])
    await Ledger(engine, "4560").forward_done("4510", [r.record_id for r in outcome.to_forward], [])
    await engine.dispose()
    return records


async def _hotlist(url: str, city: str, version: int, cards: list[str], published: dt.datetime | None) -> None:
    """Put ``cards`` on ``city``'s list as ``version`` (the clearing-side tables, written directly)."""
    engine = open_engine(url)
    async with engine.begin() as db:
        stamp = published.timestamp() if published else None
        await db.execute(
            HOTLIST_VERSION.insert(), {"city": city, "version": version, "created": 0.0, "published": stamp}
        )
        await db.execute(HOTLIST.insert(), [{"city": city, "card": c, "added": 0.0, "version": version} for c in cards])
    await engine.dispose()


def _jinan_cards(records: list[TxnRecord]) -> dict[str, list[TxnRecord]]:
    by_card: dict[str, list[TxnRecord]] = {}
    for r in records:
        if r.card.issuer == "4510":
            by_card.setdefault(r.card.id, []).append(r)
    return by_card


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_settle_day_reads_the_issuers_hotlist_history(kind: str, tmp_path: Path) -> None:
    async with fresh_db(kind, tmp_path) as url:
        records = await _acquired(url)
        plain = await settle_day(open_engine(url), DAY, {})
        (cut, unpublished, blocked_by_acquirer, *_) = _jinan_cards(records).values()
        # version 1 published so that the card's second record falls after the grace, its first before
        published = dt.datetime.fromisoformat(cut[1].time) - dt.timedelta(seconds=DEFAULT_GRACE + 1)
        assert dt.datetime.fromisoformat(cut[0].time) <= published + dt.timedelta(seconds=DEFAULT_GRACE)
        await _hotlist(url, "4510", 1, [cut[0].card.id], published)
        await _hotlist(url, "4510", 2, [unpublished[0].card.id], None)
        # Yantai's own list holding a Jinan card does not make Jinan's liability (only the issuer's list counts)
        await _hotlist(url, "4560", 1, [blocked_by_acquirer[0].card.id], published - dt.timedelta(days=1))
        engine = open_engine(url)
        settlement = await settle_day(engine, DAY, {})
        strict = await settle_day(engine, DAY, {}, grace=Grace(DEFAULT_GRACE, {("4560", "4510"): 0}))
        await engine.dispose()
    (before,) = plain.lines
    (line,) = settlement.lines
    late = sum(r.amount for r in cut[1:])
    assert line.hotlisted_acquirer == late and line.gross == before.gross - late
    assert line.hotlisted_issuer == cut[0].amount + sum(r.amount for r in unpublished)
    assert line.records == before.records - len(cut[1:])
    assert sum(settlement.positions.values()) == 0
    assert {x.record.record_id: x.liable.value for x in settlement.hotlisted} == {
        **{r.record_id: "issuer" for r in [cut[0], *unpublished]},
        **{r.record_id: "acquirer" for r in cut[1:]},
    }
    assert settlement.hotlist_versions == {"4510": 2}
    # a grace of 0 for the pair: every record of the card after its publish time is the acquirer's
    (line,) = strict.lines
    assert line.hotlisted_acquirer == sum(r.amount for r in cut) and line.grace == 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "yikatong.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_clearing_settle_takes_the_grace_per_pair_and_prints_both_amounts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    records = asyncio.run(_acquired(url))
    (card, *_) = _jinan_cards(records).values()
    first = dt.datetime.fromisoformat(card[0].time)
    asyncio.run(_hotlist(url, "4510", 1, [card[0].card.id], first - dt.timedelta(seconds=30)))
    out = tmp_path / "files"
    base = ["clearing", "settle", "--day", DAY, "--db", url, "--out", str(out)]
    done = _cli(*base, "--hotlist-grace", "3600", "--hotlist-grace", "4560:4510=10")
    assert done.returncode == 0, done.stderr
    doc = json.loads((out / f"settlement-{DAY}.json").read_text())
    (pair,) = doc["pairs"]
    amount = sum(r.amount for r in card)
    assert (pair["hotlist_grace_seconds"], pair["hotlisted_acquirer_fen"], pair["hotlisted_issuer_fen"]) == (
        10,
        amount,
        0,
    )
    assert f"0 fen the issuer's (in the gross), {amount:,} fen the acquirer's loss" in done.stdout
    assert "issuers' hotlists in the database: 4510 v1" in done.stdout
    assert {x["liable"] for x in doc["hotlisted"]} == {"acquirer"} and doc["net_sum"] == 0
    # the pair's own grace wins over the one for every pair; without it, 3600 s covers the card's records
    done = _cli(*base, "--hotlist-grace", "3600")
    (pair,) = json.loads((out / f"settlement-{DAY}.json").read_text())["pairs"]
    assert (pair["hotlist_grace_seconds"], pair["hotlisted_issuer_fen"]) == (3600, amount)


@pytest.mark.parametrize("bad", ["-5", "4510-4560=3", "4510:4560=", "ten", "4510:4560=1.5"])
def test_a_bad_grace_is_refused_with_the_expected_form(bad: str, tmp_path: Path) -> None:
    done = _cli(
        "clearing", "settle", "--day", DAY, "--db", f"sqlite:///{tmp_path / 'c.sqlite'}", "--hotlist-grace", bad
    )
    assert done.returncode == 2 and "SECONDS nor ACQUIRER:ISSUER=SECONDS" in done.stderr
