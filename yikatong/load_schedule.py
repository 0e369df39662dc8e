"""The load's timetable, without I/O: the moment each tap is due, which worker makes it, and how far behind its
timetable a generator is.

A plan's taps are fixed before the run starts: tap ``i`` is due when the profile's cumulative offered count
reaches ``i + 1/2`` (the middle of its slot), so a flat 500 taps/s puts one every 2 ms, and a rush-hour profile
crowds them into its peaks. Worker ``k`` of ``n`` makes taps ``k, k + n, k + 2n, ...``: together the workers make
exactly the plan's taps, each at its own moment. Latency is measured from that moment, not from when the tap was
actually made, so a generator that stalls cannot hide the wait it caused (no coordinated omission); a tap made
more than ``LATE`` after its moment is late, and the run says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from yikatong.load_profiles import PROFILES

LATE = 0.1  # seconds: a tap made this long after its moment counts as late (the generator is behind)
GRID = 10_000  # points the profile is integrated over (a flat profile is exact at any size)

Moments = npt.NDArray[np.float64]
"""Seconds from the start of a plan, ascending."""


@dataclass(frozen=True)
class Plan:
    """What to offer: ``rate`` taps/s at the profile's peak for ``duration`` seconds."""

    rate: float
    duration: float
    profile: str = "flat"

    def rate_at(self, elapsed: float) -> float:
        """The offered rate at ``elapsed`` seconds."""
        return self.rate * PROFILES[self.profile](min(elapsed, self.duration) / self.duration)


class Timetable:
    """Every tap of a plan at its own moment (seconds from the plan's start)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self._t = np.linspace(0.0, plan.duration, GRID + 1)
        rates = np.array([plan.rate_at(float(t)) for t in self._t])
        steps = (rates[1:] + rates[:-1]) / 2 * np.diff(self._t)  # trapezoids
        self._cumulative = np.concatenate(([0.0], np.cumsum(steps)))
        self.taps = round(float(self._cumulative[-1]))

    def moments(self, share: int = 0, shares: int = 1) -> Moments:
        """The moments of worker ``share``'s taps when ``shares`` workers split the plan."""
        if not 0 <= share < shares:
            raise ValueError(f"share {share} of {shares}")
        wanted = np.arange(share, self.taps, shares, dtype=np.float64) + 0.5
        # the cumulative count is flat where the profile offers nothing: interp takes the first such moment
        return np.asarray(np.interp(wanted, self._cumulative, self._t), dtype=np.float64)


def per_second(moments: Moments, shift: float = 0.0) -> list[int]:
    """Taps due in each whole second (the offered rate as scheduled), the moments counted from ``shift`` seconds
    into a second: a plan started part-way through a second of the run."""
    if not len(moments):
        return []
    return [int(n) for n in np.bincount(np.floor(moments + shift).astype(np.int64))]


class Pacer:
    """Walks one worker's moments against the clock (``start`` is the plan's second 0 on that clock)."""

    def __init__(self, moments: Moments, start: float) -> None:
        self._due = moments + start
        self._next = 0
        self.start = start

    def take(self, now: float) -> float | None:
        """The moment (on the clock) of the oldest tap due by ``now`` and not handed out before, now handed out;
        None when no tap is due (one at a time: the caller reads its clock again for each)."""
        if self._next >= len(self._due) or self._due[self._next] > now:
            return None
        self._next += 1
        return float(self._due[self._next - 1])

    def wait(self, now: float) -> float | None:
        """Seconds until the next tap is due (0 when one is due already); None when every tap was handed out."""
        if self._next >= len(self._due):
            return None
        return max(0.0, float(self._due[self._next]) - now)

    def lag(self, now: float) -> float:
        """How far behind its timetable the generator is at ``now``: the age of the oldest tap due and not yet
        handed out (0 when none is)."""
        if self._next >= len(self._due) or self._due[self._next] > now:
            return 0.0
        return now - float(self._due[self._next])


@dataclass(frozen=True)
class Sweep:
    """Offered rates stepped up: ``start`` taps/s, then each step ``factor`` times the last, ``seconds`` each, at
    most ``steps`` steps; a step holds when its p99 ack latency is within ``slo`` seconds."""

    start: float
    factor: float
    seconds: float
    steps: int
    slo: float

    def rates(self) -> list[float]:
        """The offered rate of each step, in order (the sweep stops at the first step that does not hold)."""
        return [self.start * self.factor**k for k in range(self.steps)]
