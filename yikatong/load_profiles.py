"""The load tool's rate profiles: how the offered rate moves over a run. Plain functions, importable without the
load engine so that the command line can list them."""

from __future__ import annotations

import math
from collections.abc import Callable


def _peak(x: float, centre: float, width: float) -> float:
    return math.exp(-(((x - centre) / width) ** 2) / 2)


def rush_hour(x: float) -> float:
    """A day compressed into the run: a morning and an evening peak (full rate) over a quiet base (a fifth)."""
    return 0.2 + 0.8 * max(_peak(x, 0.3, 0.07), _peak(x, 0.75, 0.07))


PROFILES: dict[str, Callable[[float], float]] = {"flat": lambda _x: 1.0, "rush-hour": rush_hour}
"""Offered rate as a share of ``--rate``, by the fraction of the run gone (0..1)."""
