"""`yikatong clearing ...` as users call it: migrate, status, settle (files and exit codes), hotlist add (the
retained message a real outside client sees), and clear errors for bad arguments and unusable databases."""

from __future__ import annotations

import asyncio
import csv
import json
import secrets
import subprocess
import tempfile
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from clearing_corpus import CITY, TERMINAL
from clearing_support import HOST, fresh_db, signed_records
from hypothesis import given, settings
from hypothesis import strategies as st
from mqtt_support import require_mosquitto
from support import yikatong

from clearing.db import async_url, migrate, open_engine
from clearing.intake import Intake, Topic
from clearing.ledger import Ledger, Received
from clearing.schema import Base
from terminals.hotlist import decode_chunks
from terminals.messages import (
    CARD_ID,
    HotlistChunk,
    HotlistDelta,
    HotlistSnapshot,
    batch_payload,
    hotlist_chunk_topic,
    hotlist_delta_topic,
    hotlist_snapshot_topic,
    parse_hotlist_message,
    txn_topic,
)
from yikatong.clearing_cli import _card_file
from yikatong.errors import CliError


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_migrated_schema_is_the_orm_schema(kind: str, tmp_path: Path) -> None:
    async with fresh_db(kind, tmp_path) as url:
        engine = open_engine(url)
        await migrate(engine)
        await migrate(engine)  # a second run changes nothing
        async with engine.connect() as conn:
            diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata))
            revision = await conn.run_sync(lambda c: MigrationContext.configure(c).get_current_revision())
        await engine.dispose()
    assert diff == []
    assert revision == "0003"


def test_database_urls() -> None:
    assert async_url("sqlite:///x.sqlite") == "sqlite+aiosqlite:///x.sqlite"
    assert async_url("postgresql://postgres@h/db") == "postgresql+asyncpg://postgres@h/db"
    for bad in ("mysql://u@h/db", "nonsense", "sqlite://", "postgresql+psycopg2://u@h/db"):
        with pytest.raises(ValueError, match="database"):
            async_url(bad)


async def _fill(url: str) -> list[str]:
    """A ledger of CITY with records of its own and of 4510's cards, the forwards answered by 4510."""
    engine = open_engine(url)
    await migrate(engine)
    ledger = Ledger(engine, CITY)
    records = signed_records(30, CITY, TERMINAL, issuers=("4560", "4510"), cards=6)
    topic = txn_topic(CITY, TERMINAL)
    parsed = Topic.parse(topic, CITY)
    assert parsed is not None
    payload = batch_payload([r.to_json() for r in records]).encode()
    outcome = await ledger.store([Received(topic, TERMINAL, Intake(CITY, HOST).message(parsed, payload, frozenset()))])
    await ledger.forward_done("4510", [r.record_id for r in outcome.to_forward], [])
    await engine.dispose()
    return [r.record_id for r in records]


def test_settle_writes_files_and_prints_positions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    ids = asyncio.run(_fill(url))
    out = tmp_path / "files"
    done = yikatong(
        "clearing", "settle", "--day", "2026-11-24", "--db", url, "--out", str(out), "--pair-rate", "4560:4510=0.4"
    )
    assert done.returncode == 0, done.stderr
    assert "sum of net positions: 0 fen" in done.stdout
    with (out / "clearing-4560-2026-11-24.csv").open() as f:
        assert [row["record_id"] for row in csv.DictReader(f)] == ids
    summary = json.loads((out / "settlement-2026-11-24.json").read_text())
    (pair,) = summary["pairs"]
    assert (pair["acquirer"], pair["issuer"], pair["rate"]) == ("4560", "4510", "0.004")
    assert summary["net_sum"] == 0 and summary["positions"]["4560"] == pair["issuer_owes_acquirer"] > 0
    status = yikatong("clearing", "status", "--db", url, "--city", CITY)
    assert status.returncode == 0 and "ledger" in status.stdout and "30" in status.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["clearing", "settle", "--day", "24.11.2026"], "is not a day like 2026-11-24"),
        (["clearing", "settle", "--day", "2026-11-24", "--rate", "abc"], "is not a percentage"),
        (["clearing", "settle", "--day", "2026-11-24", "--pair-rate", "4510-4560=1"], "ACQUIRER:ISSUER=PERCENT"),
        (["clearing", "settle", "--day", "2026-11-24", "--db", "mysql://x@y/z"], "only SQLite and PostgreSQL"),
        (["clearing", "serve", "--city", "45", "--broker", "mqtt://h"], "is not a 4-digit city code"),
        (["clearing", "serve", "--city", "4510", "--broker", "http://h"], "use mqtt://host"),
        (["clearing", "serve", "--city", "4510", "--broker", "mqtt://h", "--require-identity"], "need the network CA"),
        (["clearing", "serve", "--city", "4510", "--broker", "mqtt://h", "--crl", "crl.pem"], "need the network CA"),
        (["clearing", "hotlist", "add", "1234", "--city", "4510", "--broker", "mqtt://h"], "neither a 20-digit"),
        (["clearing", "hotlist", "add", "--city", "4510", "--broker", "mqtt://h"], "give the cards to hotlist"),
        (["clearing", "hotlist", "add", "--file", "/no/such", "--city", "4510", "--broker", "mqtt://h"], "/no/such"),
        (["clearing", "status", "--city", "4510", "--db", "postgresql://nobody@127.0.0.1:1/x"], "database"),
    ],
)
def test_bad_usage_exits_2_with_a_clear_message(args: list[str], message: str) -> None:
    done = yikatong(*args)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_refuses_a_city_without_keys(tmp_path: Path) -> None:
    done = yikatong(
        "clearing",
        "serve",
        "--city",
        "9999",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--db",
        f"sqlite:///{tmp_path / 'x.sqlite'}",
    )
    assert done.returncode == 2 and "holds no keys of city 9999" in done.stderr


def test_hotlist_add_publishes_a_retained_hotlist(tmp_path: Path) -> None:
    require_mosquitto()
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    # a city code of its own: every terminal follows every issuer's list; the retained list is cleared after
    city = f"49{secrets.randbelow(100):02d}"
    try:
        first = yikatong(
            "clearing",
            "hotlist",
            "add",
            "31044530000000000007",
            "--city",
            city,
            "--broker",
            "mqtt://127.0.0.1:1883",
            "--db",
            url,
        )
        assert first.returncode == 0, first.stderr
        second = yikatong(
            "clearing", "hotlist", "add", "a1b2c3d4", "--city", city, "--broker", "mqtt://127.0.0.1:1883", "--db", url
        )
        assert second.returncode == 0 and "version 2, 2 card(s)" in second.stdout
        head, chunk, delta = (_retained(topic) for topic in _hotlist_topics(city))
        assert isinstance(head, HotlistSnapshot) and isinstance(chunk, HotlistChunk)
        assert (head.version, head.cards) == (1, 1)  # the first add made the snapshot
        assert decode_chunks([chunk.data], head.sha256, head.cards)[0].cards() == ["31044530000000000007"]
        assert isinstance(delta, HotlistDelta) and (delta.base, delta.version) == (1, 2)
        assert [(c.version, c.add) for c in delta.changes] == [(2, ["A1B2C3D4"])]
        listed = yikatong("clearing", "hotlist", "list", "--city", city, "--db", url).stdout.splitlines()
        assert listed[0] == f"hotlist of {city}: version 2, 2 card(s)"
        assert [line.split()[:3] for line in listed[1:]] == [
            ["31044530000000000007", "version", "1"],
            ["A1B2C3D4", "version", "2"],
        ]
        assert all(" published 20" in line for line in listed[1:])
    finally:
        for topic in _hotlist_topics(city):
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-t", topic, "-r", "-n"], timeout=10)


def _hotlist_topics(city: str) -> list[str]:
    return [hotlist_snapshot_topic(city), hotlist_chunk_topic(city, 0), hotlist_delta_topic(city)]


def _retained(topic: str) -> HotlistSnapshot | HotlistChunk | HotlistDelta:
    seen = subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-t", topic, "-C", "1", "-W", "5"], capture_output=True, timeout=10
    )
    return parse_hotlist_message(seen.stdout.strip())


def test_hotlist_add_names_the_bad_line_of_a_card_file(tmp_path: Path) -> None:
    cards = tmp_path / "cards.txt"
    cards.write_text("31044530000000000007\n\nA1B2C3D4\n3104453000000000000X\n")
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    done = yikatong(
        "clearing", "hotlist", "add", "--file", str(cards), "--city", "4530", "--broker", "mqtt://h", "--db", url
    )
    assert done.returncode == 2 and f"{cards} line 4: '3104453000000000000X' is neither" in done.stderr
    listed = yikatong("clearing", "hotlist", "list", "--city", "4530", "--db", url)
    assert listed.stdout == "hotlist of 4530: version 0, 0 card(s)\n"  # nothing added


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.one_of(st.sampled_from(["31044530000000000007", " a1b2c3d4 ", "", "A1B2C3D"]), st.text(max_size=30)),
        max_size=8,
    )
)
def test_a_card_file_gives_card_ids_or_one_clear_error(lines: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cards.txt"
        path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
        try:
            cards = _card_file(path)
        except CliError as err:
            assert str(err).startswith(f"{path} line ") or "cannot read" in str(err)
            return
    assert all(CARD_ID.match(card) for card in cards)
    assert len(cards) == sum(1 for line in "\n".join(lines).splitlines() if line.strip())


def test_hotlist_add_with_the_broker_down_keeps_it_and_says_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    done = yikatong(
        "clearing",
        "hotlist",
        "add",
        "31044530000000000007",
        "--city",
        "4530",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--db",
        url,
    )
    assert done.returncode == 2 and "is stored" in done.stderr and "not published" in done.stderr
    listed = yikatong("clearing", "hotlist", "list", "--city", "4530", "--db", url)
    assert "31044530000000000007" in listed.stdout
