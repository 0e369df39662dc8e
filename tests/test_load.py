"""`yikatong load`: simulated terminals offer records at a rate; every record made reaches the clearing's ledger
once and is acked; the summary, the plot and bad arguments; on a shared broker the terminals' sessions expire."""

from __future__ import annotations

import datetime as dt
import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hdrh.histogram import HdrHistogram
from mqtt_support import private_mosquitto, require_mosquitto
from support import KEYS

from cardsim.issuer import IssuerHost
from terminals.messages import Ack, Rejection
from terminals.outbox import MemoryOutbox
from yikatong.cli import main
from yikatong.load_cli import listed_cards
from yikatong.load_profiles import rush_hour
from yikatong.load_schedule import Plan
from yikatong.loadgen import TimedQueue
from yikatong.synthetic import SyntheticTerminal, synthetic_cards

CITIES = ("4510", "4560", "4530")


def _terminal_rows(out: Path) -> list[tuple[str, int]]:
    """(terminal, seq) of every record the acquirers stored from their terminals, over the per-city files."""
    rows: list[tuple[str, int]] = []
    for city in CITIES:
        with sqlite3.connect(out / f"clearing-{city}.sqlite") as db:
            rows += db.execute("SELECT terminal, seq FROM ledger WHERE source = 'terminal'").fetchall()
    return rows


def _run_load(out: Path, *extra: str) -> tuple[int, dict[str, object]]:
    command = [sys.executable, "-m", "yikatong.cli", "load", "--out", str(out), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert "Traceback" not in done.stderr, done.stderr
    summary = json.loads((out / "load-summary.json").read_text()) if done.returncode in (0, 1) else {}
    return done.returncode, summary


def test_embedded_run_every_record_made_is_in_the_ledger_once_and_acked(tmp_path: Path) -> None:
    code, doc = _run_load(tmp_path, "--terminals", "30", "--cards", "60", "--rate", "40", "--duration", "4")
    assert code == 0, doc
    made = doc["generated"]
    assert isinstance(made, int) and 150 <= made <= 175  # 160 taps offered, plus the top-ups some needed
    assert doc["acked"] == made and doc["rejected"] == 0 and doc["unacked"] == 0
    rows = _terminal_rows(tmp_path)
    assert len(rows) == made and len(set(rows)) == made  # none lost, none doubled
    schedule = doc["schedule"]
    assert isinstance(schedule, dict) and schedule["taps"] == 160 and 0 < schedule["cpu_busy"] <= 1  # /proc/stat
    latency = doc["latency_ms"]
    assert isinstance(latency, dict)
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
    page = (tmp_path / "load-report.html").read_text()
    assert page.count("<svg") >= 4 and "<script" not in page and "http" not in page.replace("http://www.w3", "")
    # the started clearings' metrics, scraped over HTTP during the run: what each stored is in its ledger
    metrics = doc["clearing_metrics"]
    assert isinstance(metrics, dict) and metrics["errors"] == [] and metrics["scrapes"] >= 3
    for city in CITIES:
        with sqlite3.connect(tmp_path / f"clearing-{city}.sqlite") as db:
            (rows,) = db.execute("SELECT count(*) FROM ledger").fetchone()
        figures = metrics["cities"][city]
        assert figures["records_stored"] == rows > 0 and figures["records_quarantined"] == 0
        assert figures["batch_commit_ms"]["count"] > 0 and figures["ack_lag_ms"]["p99"] is not None
    assert [set(s["queue_depth"]) for s in metrics["timeline"]] == [set(CITIES)] * len(metrics["timeline"])
    assert "Clearing queue depth" in page


SWEEP = ("--sweep", "--rate", "20", "--sweep-factor", "2", "--step-seconds", "1.5", "--sweep-steps", "3")


def test_a_sweep_on_the_embedded_broker_steps_up_and_reports_the_highest_rate_that_held(tmp_path: Path) -> None:
    """Three flat steps (20, 40, 80 taps/s) over two worker processes: a generous SLO holds at each, so the sweep
    runs out of steps; each step's taps are all acked, and the workers' histograms add up to the run's."""
    code, doc = _run_load(tmp_path, *SWEEP, "--terminals", "12", "--cards", "30", "--workers", "2")
    assert code == 0, doc
    sweep = doc["sweep"]
    assert isinstance(sweep, dict) and doc["workers"] == 2
    assert [(s["rate"], s["offered"], s["held"]) for s in sweep["steps"]] == [
        (20, 30, True),
        (40, 60, True),
        (80, 120, True),
    ]
    assert all(s["acked"] == s["generated"] >= s["offered"] and s["unacked"] == 0 for s in sweep["steps"])
    assert sweep["held_rate"] == 80 and sweep["slo_ms"] == 1000 and "ran out" in sweep["limit"]
    timeline = doc["timeline"]
    assert isinstance(timeline, list) and sum(s["offered"] for s in timeline) == doc["offered"] == 210
    assert isinstance(doc["latency_hdr"], str)
    merged = HdrHistogram.decode(doc["latency_hdr"])
    assert merged.get_total_count() == doc["acked"] == sum(s["acked"] for s in sweep["steps"])
    page = (tmp_path / "load-report.html").read_text()
    assert "<h2>Sweep</h2>" in page and "highest offered rate that held" in page
    assert "a sweep: flat steps of 1.5 s from 20.0 taps/s, x2 each, at most 3, until p99 &gt; 1,000.0 ms" in page


def test_a_sweep_whose_first_step_misses_the_slo_holds_no_rate_and_exits_1(tmp_path: Path) -> None:
    code, doc = _run_load(tmp_path, *SWEEP, "--slo-ms", "0.001", "--terminals", "6", "--cards", "12")
    assert code == 1
    sweep = doc["sweep"]
    assert isinstance(sweep, dict) and sweep["held_rate"] is None
    assert [s["held"] for s in sweep["steps"]] == [False]  # the first step that does not hold ends the sweep
    assert sweep["limit"].startswith("the step at 20 taps/s missed the SLO (p99 ")
    assert doc["unacked"] == 0 and doc["acked"] == doc["generated"]  # drained all the same


def test_rush_hour_on_mosquitto_offers_peaks_over_a_quiet_base(tmp_path: Path) -> None:
    """On a private Mosquitto: the machine's may carry other runs' records, which this run's clearings would
    store too."""
    with private_mosquitto(tmp_path) as broker:
        code, doc = _run_load(
            tmp_path / "out",
            *("--terminals", "200", "--cards", "400", "--rate", "60", "--duration", "10"),
            *("--profile", "rush-hour", "--broker", str(broker.url), "--session-expiry", "0"),
        )
    assert code == 0, doc
    timeline = doc["timeline"]
    assert isinstance(timeline, list)
    offered = [s["offered"] for s in timeline[:10]]
    assert max(offered) > 2.5 * min(offered)  # peaks at 3 s and 7.5 s over a fifth of the rate
    assert offered.index(max(offered)) in (2, 3, 7)
    assert sum(offered) == doc["offered"]  # every tap of the timetable falls in a second of the run
    assert len(set(_terminal_rows(tmp_path / "out"))) == doc["acked"] == doc["generated"]


def test_a_card_hotlisted_during_the_run_is_refused_in_every_city_and_the_propagation_reported(
    tmp_path: Path,
) -> None:
    """On Mosquitto (a private one: the three cities' retained lists of other tests and runs stay out of it), a
    card put on its issuer's hotlist 2 s into the load reaches every terminal of the three cities: each holds the
    new version, and terminals of every city refuse the card; the run still ends clean (a record of the card
    taken before its terminal held the list may be rejected by the clearing, and is counted as such)."""
    with private_mosquitto(tmp_path) as broker:
        code, doc = _run_load(
            tmp_path / "out",
            *("--terminals", "30", "--cards", "60", "--rate", "40", "--duration", "5", "--hotlist-at", "2"),
            *("--broker", str(broker.url), "--session-expiry", "0"),
        )
    assert code == 0, doc
    news = doc["hotlist"]
    assert isinstance(news, dict)
    assert list(news["cards"].values()) == ["4510"] and news["versions"] == {"4510": 1} and not news["ahead"]
    assert news["at"] == pytest.approx(2.0, abs=0.2)
    assert news["holding"] == 30  # every terminal got the new version
    held = news["holding_ms"]
    assert 0 < held["p50"] <= held["p99"] < 3000
    assert set(news["first_refusal_ms"]) == set(CITIES)
    for city in CITIES:
        first = news["first_refusal_ms"][city]
        assert first is not None and held["p50"] * 0.5 <= first < 3000, (city, news)
        assert news["refusals"][city] >= 1
    assert news["rejected"] <= news["taken"]
    assert doc["rejected"] == news["rejected"]  # nothing else was rejected


def test_the_cards_to_hotlist_come_from_each_city_in_turn() -> None:
    cards = {city: synthetic_cards(2, [city], seed=i) for i, city in enumerate(CITIES)}
    picked = listed_cards(cards, 4)
    assert [c.issuer for c in picked] == ["4510", "4560", "4530", "4510"]
    assert picked[0] is cards["4510"][0] and picked[3] is cards["4510"][1]


SESSION_EXPIRY = 5  # seconds: more than the ~1 s from the terminals' disconnect to the load process's exit


def _queue_probe(city: str, number: str) -> None:
    """An outside client puts a QoS 1 message on the terminal's ack topic: a session of that terminal keeps it."""
    topic = f"yikatong/{city}/ack/{number}"
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-q", "1", "-t", topic, "-m", "probe"], timeout=10, check=True)


def _queue_clearing_probe(city: str) -> None:
    """An outside client puts a QoS 1 message on a topic the city's clearing subscribes to."""
    topic = f"yikatong/interop/{city}/ack"
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-q", "1", "-t", topic, "-m", "probe"], timeout=10, check=True)


def _sessions_present(numbers: list[str], prefix: str = "yikatong-terminal-") -> list[str]:
    """The clients ``prefix + number`` that still have a session on the machine's Mosquitto, seen by an outside
    client (mosquitto_sub) connecting as each of them with clean start off: a session still there hands it the
    probe queued for it. The outside client asks for a session expiry of 0, so it leaves none behind itself."""
    command = ["mosquitto_sub", "-h", "127.0.0.1", "-V", "5", "-c", "-x", "0", "-t", "yikatong-test/nothing"]
    command += ["-q", "1", "-C", "1", "-W", "2"]
    procs = {
        number: subprocess.Popen(
            [*command, "-i", prefix + number], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for number in numbers
    }
    present = []
    for number, proc in procs.items():
        out, err = proc.communicate(timeout=10)
        if proc.returncode == 0 and out.strip() == "probe":
            present.append(number)
        else:  # anything but "no message within 2 s" (say, no connection) proves nothing: fail, not pass
            assert "Timed out" in err, f"mosquitto_sub as {number}: exit {proc.returncode}, {out!r} {err!r}"
    return present


def test_on_mosquitto_the_terminals_sessions_expire_after_the_run(tmp_path: Path) -> None:
    """The terminals keep a session across a disconnect (a killed run resumed with --state-dir finds the acks
    queued for it), yet --session-expiry after the run Mosquitto holds none of this run's sessions."""
    require_mosquitto()
    state = tmp_path / "state"
    code, doc = _run_load(
        tmp_path / "out",
        *("--terminals", "6", "--cards", "20", "--rate", "12", "--duration", "1"),
        *("--broker", "mqtt://127.0.0.1:1883", "--state-dir", str(state), "--session-expiry", str(SESSION_EXPIRY)),
    )
    ended = time.monotonic()
    assert code == 0, doc  # every record acked: the clearings' acks reach the terminals over MQTT 5
    settings = doc["settings"]
    assert isinstance(settings, dict) and settings["session_expiry"] == SESSION_EXPIRY
    pairs = [(str(city), str(number)) for city, number in json.loads((state / "terminals.json").read_text())]
    for city, number in pairs:
        _queue_probe(city, number)
    first, *others = [number for _, number in pairs]
    # within the expiry the session is still there (and this probe ends it): the observation can see one
    assert _sessions_present([first]) == [first], "no session right after the run: the probe sees nothing"
    time.sleep(max(0.0, ended + SESSION_EXPIRY + 2 - time.monotonic()))  # Mosquitto expires them once a second
    kept = _sessions_present(others)
    assert not kept, f"{len(kept)} of the run's {len(others)} terminals still have a session on Mosquitto: {kept}"
    # nor the clearing processes the run started (their worker names are the run's own)
    workers = {
        city: re.findall(r"\(worker (run-[0-9a-f]+)\)", log.read_text())[0]
        for log in (tmp_path / "out").glob("clearing-*.log")
        for city in re.findall(r"clearing-(\d{4})\.log", log.name)
    }
    assert workers, "no clearing logs: the run started no clearing"
    for city in workers:
        _queue_clearing_probe(city)
    clearings = [f"{city}-{worker}" for city, worker in workers.items()]
    assert not _sessions_present(clearings, "yikatong-clearing-"), "the run's clearings left sessions behind"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rate", "0"], "more than 0"),
        (["--duration", "abc"], "not a number"),
        (["--cities", "4510,4510"], "distinct city codes"),
        (["--cities", "4511"], "no keys of city 4511"),
        (["--broker", "http://x"], "use mqtt://"),
        (["--terminals", "0"], "at least 1"),
        (["--session-expiry", "-1"], "whole seconds"),
        (["--session-expiry", "4294967295"], "whole seconds"),
        (["--hotlist-at", "30"], "not within the --duration"),
        (["--hotlist-at", "0"], "more than 0"),
        (["--hotlist-cards", "1001"], "more than the run's 1000 cards"),
        (["--hotlist-at", "5", "--external-clearing"], "needs the clearing's --db"),
        (["--workers", "0"], "at least 1"),
        (["--sweep", "--hotlist-at", "5"], "do not go together"),
        (["--sweep", "--profile", "rush-hour"], "flat steps"),
        (["--sweep-factor", "1"], "more than 1"),
        (["--slo-ms", "0"], "more than 0"),
        (["--clearing-metrics", "http://127.0.0.1:1/metrics"], "for an --external-clearing"),
    ],
)
def test_bad_arguments_exit_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    try:
        code = main(["load", "--out", str(tmp_path / "out"), *args])
    except SystemExit as err:  # argparse's usage errors
        code = int(str(err.code))
    assert code == 2
    assert message in capsys.readouterr().err


def test_plan_integrates_the_profile() -> None:
    flat = Plan(100, 10)
    assert flat.rate_at(3) == 100 and flat.rate_at(12) == 100  # after the end: as at the end
    assert rush_hour(0.3) == pytest.approx(1.0) and rush_hour(0.75) == pytest.approx(1.0)
    assert rush_hour(0.0) == pytest.approx(0.2, abs=0.01) and rush_hour(0.52) < 0.3


def test_timed_queue_hands_out_the_moments_an_ack_covers_once() -> None:
    queue = TimedQueue(MemoryOutbox())
    maker = SyntheticTerminal(IssuerHost(KEYS), "4510", "451000000001", dt.datetime(2026, 11, 24, 8))
    card = synthetic_cards(1, ["4510"])[0]
    for k in range(5):
        queue.append(maker.purchase(card, 200), moment=100.0 + k, label=k % 2)
    assert [seq for seq, _ in queue.unacked(2, 10)] == [3, 4, 5]
    ack = Ack(
        schema="yikatong.ack/1", terminal="451000000001", acked_through=3, rejected=[Rejection(seq=2, reason="x")]
    )
    assert queue.apply_ack(ack) == (2, 1)
    assert queue.covered(3) == [(1, 100.0, 0), (2, 101.0, 1), (3, 102.0, 0)] and queue.queued() == 2
    assert queue.covered(3) == []  # the same ack again covers nothing new
    assert queue.covered(5) == [(4, 103.0, 1), (5, 104.0, 0)]
