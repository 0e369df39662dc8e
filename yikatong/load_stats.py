"""What a load generator counts, in a form that crosses processes: ack latency in HDR histograms (``hdrh``: a fixed
relative error, encoded in a few hundred bytes, added up exactly across workers), the rates and the generator's
lateness per second of the run, and the same per phase (the whole run, or each step of a sweep).

Latencies are recorded in microseconds from each tap's intended moment to the ack that covers its record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypedDict

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]  # no stubs

LOWEST_US = 1
HIGHEST_US = 3_600_000_000  # an hour: a record waiting longer is recorded as an hour
DIGITS = 3  # significant digits of the run's and each phase's histogram (0.1 %)
SECOND_DIGITS = 2  # the per-second histograms only draw the latency chart (1 %, a tenth of the memory)
PERCENTILES = (("p50", 50.0), ("p90", 90.0), ("p95", 95.0), ("p99", 99.0), ("p99.9", 99.9))

Percentiles = dict[str, float | None]
"""``p50`` ... ``p99.9`` and ``max`` in milliseconds (None when nothing was timed)."""


def histogram(digits: int = DIGITS) -> HdrHistogram:
    """An empty latency histogram (microseconds)."""
    return HdrHistogram(LOWEST_US, HIGHEST_US, digits)


def record(into: HdrHistogram, seconds: float) -> None:
    """One latency, clamped into the histogram's range."""
    into.record_value(min(HIGHEST_US, max(LOWEST_US, round(seconds * 1_000_000))))


def percentiles(of: HdrHistogram) -> Percentiles:
    """The percentiles and the maximum in milliseconds, to 0.1 ms."""
    if of.get_total_count() == 0:
        return dict.fromkeys([*(name for name, _ in PERCENTILES), "max"])
    values = {name: int(of.get_value_at_percentile(p)) for name, p in PERCENTILES} | {"max": int(of.get_max_value())}
    return {name: round(us / 1000, 1) for name, us in values.items()}


def _decode(encoded: bytes, digits: int) -> HdrHistogram:
    into = histogram(digits)
    into.decode_and_add(encoded)
    return into


@dataclass
class Counts:
    """Taps due, records made, acked and rejected, taps made late and the worst lateness, latencies: of one second
    or one phase of a run."""

    offered: int = 0  # taps due by the timetable
    generated: int = 0
    acked: int = 0
    rejected: int = 0
    late: int = 0  # taps made more than load_schedule.LATE after their moment
    lag: float = 0.0  # the most a tap was made after its moment, seconds
    latency: HdrHistogram = field(default_factory=histogram)

    def made(self, records: int, lag: float, late: bool) -> None:
        """A tap made ``lag`` seconds after its moment (``records``: 0 when refused, 2 with a top-up)."""
        self.generated += records
        self.late += late
        self.lag = max(self.lag, lag)

    def add(self, other: Counts) -> None:
        """Fold another worker's counts of the same second or phase into these."""
        self.offered += other.offered
        self.generated += other.generated
        self.acked += other.acked
        self.rejected += other.rejected
        self.late += other.late
        self.lag = max(self.lag, other.lag)
        self.latency.add(other.latency)

    def to_wire(self) -> CountsWire:
        """A plain, picklable copy (the histogram encoded)."""
        return {
            "offered": self.offered,
            "generated": self.generated,
            "acked": self.acked,
            "rejected": self.rejected,
            "late": self.late,
            "lag": self.lag,
            "latency": self.latency.encode(),
        }

    @classmethod
    def from_wire(cls, wire: CountsWire, digits: int = DIGITS) -> Counts:
        """The counts ``to_wire`` gave."""
        return cls(
            wire["offered"],
            wire["generated"],
            wire["acked"],
            wire["rejected"],
            wire["late"],
            wire["lag"],
            _decode(wire["latency"], digits),
        )


class CountsWire(TypedDict):
    """``Counts`` as plain data."""

    offered: int
    generated: int
    acked: int
    rejected: int
    late: int
    lag: float
    latency: bytes


class TallyWire(TypedDict):
    """``Tally`` as plain data."""

    seconds: list[CountsWire]
    phases: dict[int, CountsWire]


@dataclass
class Tally:
    """A run's counts per second (from the run's start: records made by when they were made, acks and their
    latencies by when they came, lateness by the second the tap was due) and per phase (by the phase of the tap:
    0 for a whole run, the step of a sweep)."""

    seconds: list[Counts] = field(default_factory=list)
    phases: dict[int, Counts] = field(default_factory=dict)

    def second(self, index: int) -> Counts:
        """The counts of second ``index`` of the run (negative: the first)."""
        index = max(0, index)
        while len(self.seconds) <= index:
            self.seconds.append(Counts(latency=histogram(SECOND_DIGITS)))
        return self.seconds[index]

    def phase(self, label: int) -> Counts:
        """The counts of phase ``label``."""
        if label not in self.phases:  # not setdefault: a histogram is too dear to build on every call
            self.phases[label] = Counts()
        return self.phases[label]

    def due(self, label: int, seconds: list[int], offset: int) -> None:
        """Taps of phase ``label`` are due: ``seconds[i]`` of them in second ``offset + i`` of the run."""
        for index, count in enumerate(seconds):
            self.second(offset + index).offered += count
        self.phase(label).offered += sum(seconds)

    def made(self, second: int, due_second: int, label: int, records: int, lag: float, late: bool) -> None:
        """A tap made in ``second`` that was due in ``due_second``."""
        self.second(second).generated += records
        due = self.second(due_second)
        due.late += late
        due.lag = max(due.lag, lag)
        self.phase(label).made(records, lag, late)

    def acked(self, second: int, acked: int, rejected: int) -> None:
        """An ack in ``second`` covered ``acked`` records taken and ``rejected`` refused."""
        counts = self.second(second)
        counts.acked += acked
        counts.rejected += rejected

    def timed(self, second: int, label: int, latency: float, rejected: bool) -> None:
        """A record of phase ``label`` acked (or rejected) in ``second``, ``latency`` seconds after its tap was due
        (records an earlier run left in a state file have no moment: they count in the seconds, in no phase)."""
        record(self.second(second).latency, latency)
        phase = self.phase(label)
        record(phase.latency, latency)
        phase.rejected += rejected
        phase.acked += not rejected

    def add(self, other: Tally) -> None:
        """Fold another worker's tally into this one."""
        for index, counts in enumerate(other.seconds):
            self.second(index).add(counts)
        for label, counts in other.phases.items():
            self.phase(label).add(counts)

    def total(self) -> Counts:
        """Every phase together."""
        out = Counts()
        for counts in self.phases.values():
            out.add(counts)
        return out

    def to_wire(self) -> TallyWire:
        """A plain, picklable copy."""
        return {
            "seconds": [c.to_wire() for c in self.seconds],
            "phases": {label: c.to_wire() for label, c in self.phases.items()},
        }

    @classmethod
    def from_wire(cls, wire: TallyWire) -> Tally:
        """The tally ``to_wire`` gave."""
        return cls(
            [Counts.from_wire(c, SECOND_DIGITS) for c in wire["seconds"]],
            {label: Counts.from_wire(c) for label, c in wire["phases"].items()},
        )
