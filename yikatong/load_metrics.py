"""The clearing's Prometheus metrics as the load tool reads them (``clearing serve --metrics-port``): one scrape is
parsed into per-city figures (records in, stored, quarantined, forwarded; queue depth; the batch commit and ack
lag histograms), and the scrapes of a run become the report's ``clearing_metrics``: what each clearing did during
the run (differences from the first scrape, so a clearing that served before counts only this run), the queue
depth and stored rate over time, commit and ack-lag quantiles from the histogram buckets.

Parsing never raises anything but ``MetricsError``: a clearing answering nonsense costs the run its metrics, no
more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TypedDict

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "yikatong_clearing_"
COUNTERS = ("records_in", "records_stored", "records_quarantined", "records_forwarded")
HISTOGRAMS = ("batch_commit_seconds", "ack_lag_seconds")


class MetricsError(Exception):
    """A scrape that is not the clearing's metrics."""


@dataclass
class Buckets:
    """A Prometheus histogram: cumulative counts by upper bound (``inf`` last), the sum and count."""

    bounds: dict[float, float] = field(default_factory=dict)
    total: float = 0.0
    count: float = 0.0

    def minus(self, earlier: Buckets) -> Buckets:
        """What was observed since ``earlier``."""
        return Buckets(
            {le: n - earlier.bounds.get(le, 0.0) for le, n in self.bounds.items()},
            self.total - earlier.total,
            self.count - earlier.count,
        )

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile, linear within its bucket as Prometheus' histogram_quantile (the highest finite bound
        when it falls in the +Inf bucket); None when nothing was observed."""
        bounds = sorted(self.bounds.items())
        if not bounds or bounds[-1][1] <= 0:
            return None
        rank = q * bounds[-1][1]
        lower, below = 0.0, 0.0
        for le, cumulative in bounds:
            if cumulative >= rank:
                if math.isinf(le):
                    return lower
                inside = cumulative - below
                return lower + (le - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = le, cumulative
        return lower


@dataclass
class CityMetrics:
    """One clearing's figures in one scrape."""

    counters: dict[str, float] = field(default_factory=dict)  # COUNTERS -> value
    queue_depth: float = 0.0
    histograms: dict[str, Buckets] = field(default_factory=dict)  # HISTOGRAMS -> buckets


LARGEST = 1e15  # a count, depth or sum of the clearing's is far below; beyond, differences could overflow


def _number(text: str) -> float:
    try:
        bound = float(text)
    except ValueError:
        raise MetricsError(f"bucket bound {text!r} is not a number") from None
    if math.isnan(bound):
        raise MetricsError("bucket bound NaN")
    return bound


def _finite(name: str, value: float) -> float:
    """A sample's value; NaN, +-Inf (valid Prometheus text, but no figure of a clearing's) and absurd sizes are
    refused here rather than left to break the report's rounding at the end of the run."""
    if not math.isfinite(value) or abs(value) > LARGEST:
        raise MetricsError(f"{name} is {value!r}, not a finite number within +-{LARGEST:g}")
    return value


def read_metrics(text: str) -> dict[str, CityMetrics]:
    """The clearing figures of a scrape, by the ``city`` label; metrics of other names are skipped."""
    out: dict[str, CityMetrics] = {}
    try:
        families = list(text_string_to_metric_families(text))
    except (ValueError, TypeError, IndexError, KeyError) as err:  # what prometheus_client's parser raises
        raise MetricsError(f"not Prometheus text: {err}") from None
    for family in families:
        if not family.name.startswith(PREFIX):
            continue
        name = family.name.removeprefix(PREFIX)
        for sample in family.samples:
            city = sample.labels.get("city")
            if city is None or not isinstance(sample.value, int | float):
                continue
            figures = out.setdefault(city, CityMetrics())
            value = _finite(sample.name, float(sample.value))
            if name in COUNTERS and sample.name.endswith("_total"):
                figures.counters[name] = value
            elif name == "queue_depth":
                figures.queue_depth = value
            elif name in HISTOGRAMS:
                buckets = figures.histograms.setdefault(name, Buckets())
                if sample.name.endswith("_bucket") and "le" in sample.labels:
                    buckets.bounds[_number(sample.labels["le"])] = value
                elif sample.name.endswith("_sum"):
                    buckets.total = value
                elif sample.name.endswith("_count"):
                    buckets.count = value
    return out


class QuantilesDoc(TypedDict):
    """Observations since the run began: how many, their mean and quantiles, in milliseconds."""

    count: int
    mean: float | None
    p50: float | None
    p99: float | None


class CityDoc(TypedDict):
    """One clearing over the run."""

    records_in: int
    records_stored: int
    records_quarantined: int
    records_forwarded: int
    queue_depth_max: float
    batch_commit_ms: QuantilesDoc
    ack_lag_ms: QuantilesDoc


class MetricsSecond(TypedDict):
    """One scrape: seconds into the run, each city's queue depth and records stored per second since the last."""

    second: float
    queue_depth: dict[str, float]
    stored_per_second: dict[str, float]


class MetricsDoc(TypedDict):
    """``clearing_metrics`` of the load summary."""

    endpoints: dict[str, str]  # city -> URL scraped
    scrapes: int
    errors: list[str]  # the first few failed scrapes, with their reason
    cities: dict[str, CityDoc]
    timeline: list[MetricsSecond]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


def _quantiles(buckets: Buckets) -> QuantilesDoc:
    return {
        "count": round(buckets.count),
        "mean": _ms(buckets.total / buckets.count) if buckets.count > 0 else None,
        "p50": _ms(buckets.quantile(0.5)),
        "p99": _ms(buckets.quantile(0.99)),
    }


@dataclass
class MetricsSeries:
    """The scrapes of a run, by city: (seconds into the run, figures)."""

    endpoints: dict[str, str]
    scrapes: list[tuple[float, dict[str, CityMetrics]]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, second: float, figures: dict[str, CityMetrics]) -> None:
        """The cities' figures scraped ``second`` seconds into the run."""
        self.scrapes.append((second, figures))

    def failed(self, reason: str) -> None:
        """A scrape that could not be taken (the first few reasons are kept)."""
        if len(self.errors) < 5:
            self.errors.append(reason)

    def doc(self) -> MetricsDoc:
        """The report's view of the scrapes."""
        cities: dict[str, CityDoc] = {}
        if self.scrapes:
            first, last = self.scrapes[0][1], self.scrapes[-1][1]
            for city, figures in sorted(last.items()):
                depths = [scrape.get(city, CityMetrics()).queue_depth for _, scrape in self.scrapes]
                cities[city] = _city_doc(figures, first.get(city, CityMetrics()), max(depths))
        return {
            "endpoints": self.endpoints,
            "scrapes": len(self.scrapes),
            "errors": self.errors,
            "cities": cities,
            "timeline": [_second(*pair) for pair in zip(self.scrapes, self.scrapes[1:], strict=False)],
        }


def _stored(figures: CityMetrics) -> float:
    return figures.counters.get("records_stored", 0.0)


def _city_doc(figures: CityMetrics, before: CityMetrics, depth: float) -> CityDoc:
    """One clearing from the first scrape to the last."""
    counted = {n: round(figures.counters.get(n, 0.0) - before.counters.get(n, 0.0)) for n in COUNTERS}
    seen = {n: figures.histograms.get(n, Buckets()).minus(before.histograms.get(n, Buckets())) for n in HISTOGRAMS}
    return {
        "records_in": counted["records_in"],
        "records_stored": counted["records_stored"],
        "records_quarantined": counted["records_quarantined"],
        "records_forwarded": counted["records_forwarded"],
        "queue_depth_max": depth,
        "batch_commit_ms": _quantiles(seen["batch_commit_seconds"]),
        "ack_lag_ms": _quantiles(seen["ack_lag_seconds"]),
    }


def _second(
    earlier: tuple[float, dict[str, CityMetrics]], later: tuple[float, dict[str, CityMetrics]]
) -> MetricsSecond:
    """The queue depths of a scrape, and the records stored per second since the one before."""
    (was, before), (second, now) = earlier, later
    span = max(second - was, 1e-9)
    rates = {city: round((_stored(f) - _stored(before.get(city, f))) / span, 1) for city, f in now.items()}
    return {
        "second": round(second, 2),
        "queue_depth": {city: f.queue_depth for city, f in now.items()},
        "stored_per_second": rates,
    }
