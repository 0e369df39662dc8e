"""``yikatong load --cluster``: a 3-node NATS cluster started for the run, terminals spread over its nodes, two
clearing workers a city on the city's JetStream stream; and the argument combinations it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import asyncpg
import pytest

from tests.clearing_support import PG_ADMIN, fresh_db
from tests.support import yikatong
from yikatong.cli import main


def _nats_servers_in(folder: Path) -> list[int]:
    """Pids of nats-server processes whose command line names ``folder`` (the run's cluster)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:  # not a process, or gone meanwhile
            continue
        if b"nats-server" in cmdline and str(folder).encode() in cmdline:
            pids.append(int(proc.name))
    return pids


async def _ledger_rows(url: str) -> tuple[int, int]:
    """(rows, distinct (terminal, seq)) of the records the acquirers stored from their terminals."""
    conn = await asyncpg.connect(**{**PG_ADMIN, "database": url.rsplit("/", 1)[1]})
    try:
        query = "SELECT count(*), count(DISTINCT (terminal, seq)) FROM ledger WHERE source = 'terminal'"
        row = await conn.fetchrow(query)
    finally:
        await conn.close()
    assert row is not None
    return int(row[0]), int(row[1])


@pytest.mark.postgres
async def test_a_cluster_run_acks_every_record_stores_each_once_and_leaves_no_node(tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with fresh_db("postgres", tmp_path) as url:
        run = ["load", "--cluster", "--terminals", "6", "--rate", "20", "--duration", "5", "--db", url]
        done = yikatong(*run, "--out", str(out), "--workers", "2", "--seed", "21", timeout=240)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        doc = json.loads((out / "load-summary.json").read_text())
        made = doc["generated"]
        assert made >= 100 and doc["acked"] == made and doc["rejected"] == 0 and doc["unacked"] == 0
        assert await _ledger_rows(url) == (made, made)  # none lost, none doubled
    assert "3-node NATS cluster" in doc["settings"]["broker"] and "3-node NATS cluster" in done.stdout
    # two workers a city, each scraped on its own: both took a share of the city's stream
    stored = {name: figures["records_stored"] for name, figures in doc["clearing_metrics"]["cities"].items()}
    assert set(stored) == {f"{city}-w{w}" for city in ("4510", "4560", "4530") for w in (1, 2)}
    assert all(count > 0 for count in stored.values()), stored
    assert (out / "nats-cluster" / "cluster.json").exists()
    assert _nats_servers_in(out / "nats-cluster") == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cluster", "--broker", "mqtt://127.0.0.1:1"], "leave --broker and --pki out"),
        (["--cluster", "--external-clearing"], "python -m yikatong.nats_cluster start"),
        (["--cluster"], "needs a PostgreSQL --db"),
        (["--cluster", "--cluster-workers", "3", "--db", "sqlite:///x.sqlite"], "needs a PostgreSQL --db"),
        (["--cluster-workers", "2"], "--cluster-workers is for --cluster"),
    ],
)
def test_cluster_arguments_that_cannot_run_exit_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert main(["load", "--out", str(tmp_path / "out"), *args]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything started
