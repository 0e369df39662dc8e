"""`yikatong demo`: the whole pipe (cards, terminals, MQTT, clearings, settlement, chip audit, reconciliation) runs
to its summary on the embedded defaults and on Mosquitto + PostgreSQL, and the planted cards are caught."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from clearing_support import fresh_db
from mqtt_support import private_mosquitto, require_mosquitto
from support import yikatong

from yikatong.cli import main


def _check_run(out: Path, printed: str) -> None:
    assert "net positions sum to 0 fen; 0 records unacked, 0 forwards unanswered" in printed
    taps = [int(m) for m in re.findall(r"^\d{4} \w+ +(\d+) +(?:\d+)", printed, re.MULTILINE)]
    assert len(taps) == 3 and all(n > 30 for n in taps), printed
    chips = json.loads((out / "audit-chips.json").read_text())
    by_card: dict[str, set[str]] = {}
    for f in chips["findings"]:
        by_card.setdefault(f["subject"], set()).add(f["id"])
    names = {s["source"]: s["subject"] for s in chips["subjects"]}
    assert "CPU-WEAK-RANDOM" in by_card[names["4510-sm4-weak-random"]]
    assert "M1-DEFAULT-KEY" in by_card[names["4530-m1-factory-keys"]]
    # the chip that ignores its maximum balance, found without --active (a load asked for, none made)
    assert by_card[names["4530-sm4-1"]] == {"CPU-SM4", "CPU-LOAD-ABOVE-MAX"}
    assert re.search(r"^  high +CPU-LOAD-ABOVE-MAX +1 card +4530-sm4-1$", printed, re.MULTILINE), printed
    assert "4530-sm4-1 (loads past its maximum balance)" in printed
    assert by_card[names["4560-sm4-1"]] == {"CPU-SM4"}  # an ordinary card: only its algorithm
    # every M1 card's keys recovered, or the reason it stopped said in the report
    for m1 in (s for s in chips["subjects"] if s["tech"] == "m1"):
        stopped = [line for line in chips["skipped"] if line.startswith(f"{m1['subject']}: key recovery")]
        assert m1["keys known"] == "32 of 32" or stopped, m1
    assert "M1 key recovery:" in printed, printed  # (a machine too busy for the budget gets the reasons instead)
    recon = json.loads((out / "audit-reconcile.json").read_text())
    rules = {f["id"] for f in recon["findings"]}
    clone_serial = names["4510-sm4-1"]
    tampered_uid = names["4560-m1-1"]
    assert {"REC-COUNTER-REPEAT", "REC-M1-TAMPER"} <= rules, rules
    assert clone_serial in recon["hotlist"] and tampered_uid in recon["hotlist"]
    assert not rules & {"REC-MISSING", "REC-TAC", "REC-SETTLEMENT", "REC-BALANCE"}, rules  # the pipe lost nothing
    page = (out / "report.html").read_text()
    assert page.count("<main") == 2 and "<script" not in page
    assert len(list((out / "cards").glob("*.json"))) == len(chips["subjects"]) == 30  # 27 issued, 3 planted


def test_demo_on_embedded_defaults_runs_to_its_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    _check_run(out, printed)
    with sqlite3.connect(out / "clearing.sqlite") as db:
        terminal_rows = db.execute("SELECT COUNT(*) FROM ledger WHERE source = 'terminal'").fetchone()[0]
    ok = sum(int(m) for m in re.findall(r"^\d{4} \w+ +\d+ +(\d+)", printed, re.MULTILINE))
    assert terminal_rows == ok  # every tap the terminals completed is one acquirer row


@pytest.mark.postgres
async def test_demo_on_mosquitto_and_postgresql(tmp_path: Path) -> None:
    """As a child process with a time limit: a run that hangs fails this test alone, with nothing left running
    (a demo in a thread of the test process would outlive its test and hold up the suite's end)."""
    require_mosquitto()
    async with fresh_db("postgresql", tmp_path) as url:
        args = ["demo", "--out", str(tmp_path / "run"), "--broker", "mqtt://127.0.0.1:1883", "--db", url]
        first = await asyncio.to_thread(yikatong, *args, timeout=420)
        assert first.returncode == 0, first.stderr[-3000:]
        _check_run(tmp_path / "run", first.stdout)
        # a second run on a database that holds records is refused, naming it
        second = await asyncio.to_thread(yikatong, *args, timeout=120)
        assert second.returncode == 2 and "already holds records" in second.stderr, second.stderr


async def test_demo_over_tls_on_mosquitto_with_a_certificate_per_device(tmp_path: Path) -> None:
    """The operator's steps (README): a PKI, the broker's certificate, the demo's devices issued before the broker
    starts (it reads the ACL then); the demo runs to its summary over mqtts://, every terminal signing its records
    and every clearing checking them: each completed tap is one ledger row, nothing quarantined, nothing unacked."""
    require_mosquitto()
    pki = tmp_path / "pki"
    assert yikatong("pki", "init", "--out", str(pki)).returncode == 0
    assert yikatong("pki", "issue", "--server", "127.0.0.1", "--pki", str(pki)).returncode == 0
    refused = yikatong("demo", "--out", str(tmp_path / "run"), "--broker", "mqtts://127.0.0.1:1", "--pki", str(pki))
    assert refused.returncode == 2 and "--issue-certificates-only" in refused.stderr, refused.stderr
    issued = yikatong("demo", "--pki", str(pki), "--issue-certificates-only")
    assert issued.returncode == 0 and "issued 24 certificates" in issued.stdout, issued.stdout + issued.stderr
    again = yikatong("demo", "--pki", str(pki), "--issue-certificates-only")
    assert again.returncode == 0 and "issued 0 certificates" in again.stdout and "kept 24" in again.stdout
    (tmp_path / "broker").mkdir()
    with private_mosquitto(tmp_path / "broker", tls=pki) as broker:
        args = ["demo", "--out", str(tmp_path / "run"), "--broker", str(broker.url), "--pki", str(pki)]
        done = await asyncio.to_thread(_demo_or_where_it_hangs, args, 420)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"starting the three clearings on mqtts://127.0.0.1:{broker.port}" in done.stderr, done.stderr
    _check_run(tmp_path / "run", done.stdout)
    with sqlite3.connect(tmp_path / "run" / "clearing.sqlite") as db:
        terminal_rows = db.execute("SELECT COUNT(*) FROM ledger WHERE source = 'terminal'").fetchone()[0]
        reasons = [row[0] for row in db.execute("SELECT reason FROM quarantine")]
    ok = sum(int(m) for m in re.findall(r"^\d{4} \w+ +\d+ +(\d+)", done.stdout, re.MULTILINE))
    assert terminal_rows == ok and not [r for r in reasons if r.startswith("identity")], reasons


async def test_demo_ends_with_its_summary_when_the_broker_stops_answering_during_the_ride(tmp_path: Path) -> None:
    """The broker stopped (SIGSTOP: connections open, nothing answered) from the first tap to the end of the run:
    the demo waits its minute for the acks, stops its terminals and clearings, settles what reached the ledgers
    and prints its summary with the records still unacked, exit 1; it does not hang."""
    (tmp_path / "broker").mkdir()
    out = tmp_path / "run"
    with private_mosquitto(tmp_path / "broker") as broker:
        assert broker.proc is not None
        args = ["demo", "--out", str(out), "--broker", str(broker.url)]
        demo = asyncio.create_task(asyncio.to_thread(_demo_or_where_it_hangs, args, 300))
        try:
            while not list((out / "terminals").glob("*.sqlite")) and not demo.done():
                await asyncio.sleep(0.05)  # the ride begins with the terminals' outboxes
            broker.proc.send_signal(signal.SIGSTOP)
            done = await demo
        finally:
            broker.proc.send_signal(signal.SIGCONT)
    assert done.returncode == 1, done.stderr[-3000:]
    unacked = re.search(r"net positions sum to 0 fen; (\d+) records unacked", done.stdout)
    assert unacked is not None and int(unacked[1]) > 0, done.stdout
    assert "report:" in done.stdout


def _demo_or_where_it_hangs(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """``yikatong ARGS`` as a child process; one still running after ``timeout`` seconds is made to print where
    each of its threads is (SIGABRT with PYTHONFAULTHANDLER), and the test fails with that."""
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    command = [sys.executable, "-m", "yikatong.cli", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate(timeout=30)
            pytest.fail(f"yikatong {' '.join(args)} still ran after {timeout:.0f} s; its threads then:\n{err[-8000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def test_demo_over_tls_needs_its_pki(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--broker", "mqtts://127.0.0.1:1"]) == 2
    assert "need --pki DIR" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path), "--pki", str(tmp_path)]) == 2
    assert "--pki is for an mqtts:// --broker" in capsys.readouterr().err


def test_demo_bad_database_url_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--db", "mysql://x"]) == 2
    assert "error" in capsys.readouterr().err


async def test_stopping_cancels_again_a_task_that_lost_its_cancel() -> None:
    from yikatong.demo import _stop

    async def deaf_once() -> None:
        # as asyncio.wait_for of Python 3.11 does with a cancel that comes with the answer
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(3600)
        await asyncio.sleep(3600)

    task = asyncio.create_task(deaf_once())
    await asyncio.sleep(0)
    await _stop([task])
    assert task.cancelled()


async def test_stopping_gives_up_on_a_task_that_ignores_every_cancel_and_names_it() -> None:
    from yikatong.demo import _stop
    from yikatong.errors import CliError

    async def deaf() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(3600)

    task = asyncio.create_task(deaf(), name="terminal 451000000001")
    await asyncio.sleep(0)
    with pytest.raises(CliError, match=r"gave up stopping 1 tasks after 2 s: terminal 451000000001"):
        await _stop([task], timeout=2)
    task.cancel()  # the test leaves nothing running: a last cancel from outside it, then the loop drops it
    task.get_coro().close()


def test_demo_on_a_nats_cluster_with_two_jetstream_workers_a_city(tmp_path: Path) -> None:
    """``--cluster``: the day on a 3-node NATS cluster started in the run folder, terminals spread over its nodes,
    two JetStream clearing workers a city on different nodes sharing the SQLite file; everything cleared, each
    worker named with its share, and no nats-server of the run left afterwards."""
    out = tmp_path / "run"
    done = yikatong("demo", "--cluster", "--out", str(out), timeout=420)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "starting a 3-node NATS cluster in" in done.stderr, done.stderr
    _check_run(out, done.stdout)
    assert f"NATS cluster 'yikatong' in {out / 'nats-cluster'} (n1 nats://127.0.0.1:" in done.stdout, done.stdout
    workers = re.findall(r"(\d{4}) demo-\w+-\d on (n\d) (\d+)", done.stdout)
    assert len(workers) == 6, done.stdout
    for city in ("4510", "4560", "4530"):
        assert len({node for c, node, _ in workers if c == city}) == 2  # a city's two workers on two nodes
    ledger_rows = sum(int(m) for m in re.findall(r"^\d{4} \w+ +\d+ +\d+ +\d+ +(\d+)", done.stdout, re.MULTILINE))
    assert sum(int(n) for *_, n in workers) == ledger_rows
    cluster = json.loads((out / "nats-cluster" / "cluster.json").read_text())
    pids = [node["pid"] for node in cluster["nodes"]]
    assert len(pids) == 3 and not [pid for pid in pids if _runs(pid, out)], pids
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True)
    assert left.stdout == "", left.stdout


def _runs(pid: int, folder: Path) -> bool:
    """Whether process ``pid`` runs a nats-server of ``folder`` (not a zombie, not another process on the pid)."""
    try:
        return str(folder).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.parametrize("other", [["--broker", "mqtt://127.0.0.1:1883"], ["--pki", "pki"]])
def test_demo_on_a_cluster_refuses_a_broker_or_a_pki(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], other: list[str]
) -> None:
    assert main(["demo", "--cluster", "--out", str(tmp_path), *other]) == 2
    err = capsys.readouterr().err
    assert "--cluster runs on its own NATS cluster: not with --broker or --pki" in err, err
    assert not (tmp_path / "nats-cluster").exists()
