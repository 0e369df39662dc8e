"""The load generator's timetable and accounting without a broker: each tap has a fixed moment, the workers'
shares make exactly the plan's taps, a stalled event loop is charged to the taps that were due while it stalled
(latency runs from the moment, not from when the tap was made), the generator's lateness is counted and shown in
red, and HDR histograms add up across workers exactly."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys

import numpy as np
import pytest
from support import KEYS

from cardsim.issuer import IssuerHost
from terminals.messages import ACK_SCHEMA, Ack
from terminals.mqtt import BrokerUrl
from terminals.outbox import MemoryOutbox
from yikatong.load_console import Printer
from yikatong.load_coordinator import RunResult, StepResult
from yikatong.load_report import LoadSettings, render_html, schedule_line, summary
from yikatong.load_schedule import LATE, Pacer, Plan, Sweep, Timetable, per_second
from yikatong.load_stats import Counts, Tally, percentiles, record
from yikatong.loadgen import LoadRun, Progress, SimTerminal, TimedQueue
from yikatong.synthetic import SyntheticCard, synthetic_cards

HOST = IssuerHost(KEYS)


def test_a_flat_timetable_puts_each_tap_in_the_middle_of_its_slot() -> None:
    moments = Timetable(Plan(500, 60)).moments()
    assert len(moments) == 30_000
    assert moments[0] == pytest.approx(0.001) and moments[-1] == pytest.approx(59.999)
    assert np.allclose(np.diff(moments), 0.002)
    assert per_second(moments) == [500] * 60
    assert per_second(moments[:3], 0.9985) == [1, 2]  # started late in a second: the third tap is in the next


def test_the_workers_shares_make_exactly_the_plans_taps() -> None:
    table = Timetable(Plan(333, 7.5, "rush-hour"))
    shares = [table.moments(k, 3) for k in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == table.moments().tolist()
    assert [len(s) for s in shares] == [len(table.moments()[k::3]) for k in range(3)]
    with pytest.raises(ValueError, match="share 3 of 3"):
        table.moments(3, 3)


def test_a_rush_hour_timetable_follows_the_profile() -> None:
    plan = Plan(100, 100, "rush-hour")
    table = Timetable(plan)
    counts = per_second(table.moments())
    assert sum(counts) == table.taps and len(counts) == 100
    assert table.taps == pytest.approx(sum(plan.rate_at(s + 0.5) for s in range(100)), rel=0.01)
    for second in (10, 30, 50, 75, 95):
        assert counts[second] == pytest.approx(plan.rate_at(second + 0.5), abs=2)
    assert per_second(table.moments()[:0]) == []


def test_the_pacer_hands_out_what_is_due_and_says_how_late_it_is() -> None:
    pacer = Pacer(np.array([0.1, 0.2, 0.3, 0.4]), start=10.0)
    assert pacer.wait(10.0) == pytest.approx(0.1) and pacer.lag(10.0) == 0.0 and pacer.take(10.0) is None
    assert pacer.take(10.15) == pytest.approx(10.1) and pacer.take(10.15) is None
    assert pacer.lag(10.35) == pytest.approx(0.15)  # the tap due at 10.2 is not made yet
    assert [pacer.take(10.35), pacer.take(10.35), pacer.take(10.35)] == [pytest.approx(10.2), pytest.approx(10.3), None]
    assert pacer.wait(10.35) == pytest.approx(0.05)
    assert pacer.take(11.0) == pytest.approx(10.4) and pacer.wait(11.0) is None and pacer.lag(11.0) == 0.0


def test_the_sweep_steps_up_by_its_factor() -> None:
    assert Sweep(100, 1.5, 10, 4, 1.0).rates() == [100, 150, 225, 337.5]


class FakeTime:
    """The run's clock and sleep in fake time, so the tests assert what the generator does, not how fast the machine
    running them is: sleeping moves the clock (and lets the loop run the stand-in clearing); when the clock passes
    ``stall_at`` it jumps ``stall`` seconds (the loop was blocked that long); each tap costs ``tap`` seconds."""

    def __init__(self, start: float, stall_at: float | None = None, stall: float = 0.0, tap: float = 0.0) -> None:
        self.now, self.stall_at, self.stall, self.tap = start, stall_at, stall, tap

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(0)  # the clearing acks what was made before the clock moves on
        self.now += seconds
        if self.stall_at is not None and self.now >= self.stall_at:
            self.now += self.stall
            self.stall_at = None


class CostlyTerminal(SimTerminal):
    """A simulated terminal whose taps take time on a fake clock."""

    def __init__(self, clock: FakeTime, number: str) -> None:
        super().__init__(HOST, "4510", number, TimedQueue(MemoryOutbox()), 200)
        self.clock = clock

    def tap(self, card: SyntheticCard, moment: float, label: int = 0) -> int:
        self.clock.now += self.clock.tap
        return super().tap(card, moment, label)


def _run(clock: FakeTime) -> LoadRun:
    # no broker: the uplinks never run, the test acks by hand through each uplink's on_ack
    terminals = [CostlyTerminal(clock, f"4510{k:08X}") for k in range(4)]
    cards = {"4510": synthetic_cards(40, ["4510"])}
    return LoadRun([BrokerUrl("127.0.0.1", 1)], terminals, cards, seed=7, clock=clock, sleep=clock.sleep)


async def _ack_everything(run: LoadRun) -> None:
    """The clearing of these tests: acks every record as soon as the loop runs it (the same fake moment)."""
    while True:
        for terminal, uplink in zip(run.terminals, run.uplinks, strict=True):
            inner = terminal.outbox.inner
            assert isinstance(inner, MemoryOutbox)
            if inner.queued():
                ack = Ack(schema=ACK_SCHEMA, terminal=terminal.terminal_hex, acked_through=inner.next_seq - 1)
                assert uplink.on_ack is not None
                uplink.on_ack(ack, *terminal.outbox.apply_ack(ack))
        await asyncio.sleep(0)


async def _offer(plan: Plan, stall_at: float | None = None, stall: float = 0.0, tap: float = 0.0) -> LoadRun:
    """Offer ``plan`` from second 1,000 of a fake clock, the loop blocked for ``stall`` s at ``stall_at`` s."""
    clock = FakeTime(1000.0, None if stall_at is None else 1000.0 + stall_at, stall, tap)
    run = _run(clock)
    acker = asyncio.create_task(_ack_everything(run))
    try:
        await run.offer(plan, 1000.0)
        await asyncio.sleep(0)
    finally:
        acker.cancel()
    return run


def test_a_stalled_loop_is_charged_to_the_taps_due_while_it_stalled() -> None:
    """200 taps/s for 2 s; the loop blocks for 0.5 s at 0.6 s. The 100 taps due meanwhile are made only after
    it, and acked at once: from their moments, they waited up to 0.5 s (the 80 due more than 0.1 s before the
    stall ended are late); the others did not wait."""
    run = asyncio.run(_offer(Plan(200, 2.0), 0.6, 0.498))  # not 0.5: no tap exactly 0.1 s late
    total = run.tally.total()
    assert total.offered == 400 and total.generated == total.acked == 400  # 20,000 fen cards: no top-ups
    assert total.late == 80 and total.lag == pytest.approx(0.498)  # the taps due at 0.6025 s to 0.9975 s
    lat = percentiles(total.latency)
    assert lat["max"] == pytest.approx(498, rel=0.001)  # from the moment: the stall is in the latency
    assert lat["p50"] == 0  # the taps outside the stall were acked at once
    assert total.latency.get_count_at_value(1) == 300  # 1 µs: the lowest the histogram holds
    # the lateness is charged to the seconds the taps were due in, the acks to when they came
    assert [s.offered for s in run.tally.seconds[:2]] == [200, 200]
    assert [s.late for s in run.tally.seconds] == [80, 0]


def test_taps_made_in_a_burst_are_timed_as_made_and_let_the_acks_in() -> None:
    """1,000 taps/s for 2 s, the loop blocked for 0.5 s at 0.6 s, each tap costing 0.4 ms: the 500 taps due
    meanwhile take 0.2 s to make, so the last of them is made 0.2 s after the first, and is late by as much (a
    clock read once for the burst would say it was on time); taps keep being late until the generator has
    caught up (the tap due at t s is made at 1.1 + 0.4 (t - 0.6) s: late before 1.267 s). The acks for the first
    taps of the burst come while it goes on, not 0.2 s later at its end."""
    run = asyncio.run(_offer(Plan(1000, 2.0), 0.6, 0.5, tap=0.0004))
    total = run.tally.total()
    assert total.offered == total.generated == total.acked == 2000
    assert total.late == pytest.approx(667, abs=3)
    lat = percentiles(total.latency)
    assert lat["max"] is not None and 499 <= lat["max"] <= 500 + 0.4 * 16 + 1  # acked within a burst of taps


def test_a_loop_that_keeps_up_makes_every_tap_on_time() -> None:
    run = asyncio.run(_offer(Plan(200, 1.0)))
    total = run.tally.total()
    assert total.offered == total.generated == total.acked == 200
    assert total.late == 0 and total.lag < 1e-9 < LATE
    assert percentiles(total.latency)["max"] == 0


def _result(tally: Tally, steps: list[StepResult] | None = None) -> RunResult:
    counts = tally.total()
    return RunResult(
        workers=2,
        terminals=4,
        cities=["4510"],
        connected=4,
        connect_seconds=0.1,
        drain_seconds=0.1,
        duration=2.0,
        generated=counts.generated,
        published=counts.generated,
        acked=counts.acked,
        rejected=0,
        unacked=0,
        tally=tally,
        steps=steps or [],
    )


SETTINGS: LoadSettings = {
    "terminals": 4,
    "cards": 40,
    "rate": 200,
    "duration": 2.0,
    "profile": "flat",
    "broker": "mqtt://127.0.0.1:1",
    "clearing": "external",
    "session_expiry": None,
    "seed": 7,
    "workers": 2,
    "hotlist_at": None,
    "hotlist_cards": 1,
    "sweep": None,
}


def test_a_generator_behind_its_timetable_is_reported_in_red() -> None:
    run = asyncio.run(_offer(Plan(200, 2.0), 0.6, 0.5))
    doc = summary(_result(run.tally), SETTINGS)
    schedule = doc["schedule"]
    assert schedule["behind"] and schedule["late"] == run.tally.total().late and schedule["max_lag_s"] >= 0.45
    assert schedule_line(schedule).startswith("BEHIND its timetable")
    page = render_html(doc)
    assert '<td style="color:#c00">BEHIND its timetable' in page and "Generator behind its timetable" in page
    assert any(s["late"] for s in doc["timeline"])
    live = Progress(1.5, "load", 4, 4, 300, 250, 0, 50, 0.4, 80, run.tally.seconds[0])
    stream = io.StringIO()
    Printer(stream).show(live)
    assert "!BEHIND SCHEDULE by 0.40 s (80 taps late so far)!" in stream.getvalue()  # red on a terminal
    on_time = asyncio.run(_offer(Plan(200, 1.0)))
    calm = summary(_result(on_time.tally), SETTINGS)
    assert not calm["schedule"]["behind"] and "BEHIND" not in render_html(calm)


def test_histograms_add_up_across_workers_exactly() -> None:
    rng = np.random.default_rng(3)
    values = rng.lognormal(-3, 1.2, 5000)
    whole, parts = Tally(), [Tally(), Tally(), Tally()]
    for k, seconds in enumerate(values):
        for tally in (whole, parts[k % 3]):
            tally.made(int(k / 1000), int(k / 1000), k % 2, 1, 0.0, False)
            tally.timed(int(k / 1000), k % 2, float(seconds), rejected=False)
    merged = Tally()
    for part in parts:
        merged.add(Tally.from_wire(part.to_wire()))  # as the workers send theirs
    assert percentiles(merged.total().latency) == percentiles(whole.total().latency)
    assert merged.total().latency.get_total_count() == 5000 == merged.total().acked
    for label in (0, 1):
        assert percentiles(merged.phases[label].latency) == percentiles(whole.phases[label].latency)
    assert [s.generated for s in merged.seconds] == [s.generated for s in whole.seconds]
    exact = np.percentile(values * 1000, [50, 99, 99.9])
    hdr = percentiles(merged.total().latency)
    assert [hdr["p50"], hdr["p99"], hdr["p99.9"]] == pytest.approx(exact, rel=0.01)


def test_a_sweep_step_holds_only_with_every_record_acked_within_the_slo() -> None:
    fast, slow = Counts(), Counts()
    for _ in range(100):
        record(fast.latency, 0.2)
        record(slow.latency, 1.5)
    assert StepResult(100, 10, fast, 0, 1.0).held
    assert not StepResult(100, 10, fast, 3, 1.0).held  # records left unacked
    assert not StepResult(200, 10, slow, 0, 1.0).held
    assert not StepResult(200, 10, Counts(), 0, 1.0).held  # nothing timed: nothing held
    doc = summary(_result(Tally(), [StepResult(100, 10, fast, 0, 1.0), StepResult(125, 10, slow, 0, 1.0)]), SETTINGS)
    sweep = doc["sweep"]
    assert sweep is not None and sweep["held_rate"] == 100 and [s["held"] for s in sweep["steps"]] == [True, False]
    assert sweep["limit"].startswith("the step at 125 taps/s missed the SLO (p99 1,50")  # HDR: within 0.1 %


def test_a_worker_raises_its_open_files_limit_or_says_what_to_do() -> None:
    """In a child process (the limit is the process's): the soft limit goes up to what the terminals need, and
    past the hard limit the error names it and the way out."""
    script = """
import resource
from yikatong.errors import CliError
from yikatong.load_workers import open_files
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 512))
open_files(400, "load worker 0")
print(resource.getrlimit(resource.RLIMIT_NOFILE))
try:
    open_files(1000, "load worker 0")
except CliError as err:
    print(err)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.splitlines() == [
        "(400, 512)",
        "load worker 0 needs 1,000 open files (a socket per terminal) but may hold 512 (ulimit -Hn): raise the "
        "limit, or spread the terminals over more --workers",
    ]
