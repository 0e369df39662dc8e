"""The clearing metrics as ``yikatong load`` reads them: a scrape parsed by city, histogram quantiles from the
buckets, the run's view (differences from the first scrape, queue depth and stored rate over time), and any text
at all answered with ``MetricsError`` or figures, never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from yikatong.load_metrics import Buckets, MetricsError, MetricsSeries, read_metrics


def scrape(city: str, stored: float, depth: float, commits: dict[float, float], total: float = 0.5) -> str:
    """A clearing's answer with the names and labels of the contract (what clearing serve --metrics-port says)."""
    buckets = "".join(
        f'yikatong_clearing_batch_commit_seconds_bucket{{city="{city}",le="{le}"}} {n}\n' for le, n in commits.items()
    )
    count = max(commits.values())
    return f"""# HELP yikatong_clearing_records_in_total Records received.
# TYPE yikatong_clearing_records_in_total counter
yikatong_clearing_records_in_total{{city="{city}"}} {stored + 5}
# TYPE yikatong_clearing_records_stored_total counter
yikatong_clearing_records_stored_total{{city="{city}"}} {stored}
# TYPE yikatong_clearing_records_quarantined_total counter
yikatong_clearing_records_quarantined_total{{city="{city}"}} 5.0
# TYPE yikatong_clearing_records_forwarded_total counter
yikatong_clearing_records_forwarded_total{{city="{city}"}} 2.0
# TYPE yikatong_clearing_queue_depth gauge
yikatong_clearing_queue_depth{{city="{city}"}} {depth}
# TYPE yikatong_clearing_batch_commit_seconds histogram
{buckets}yikatong_clearing_batch_commit_seconds_sum{{city="{city}"}} {total}
yikatong_clearing_batch_commit_seconds_count{{city="{city}"}} {count}
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{{generation="0"}} 12.0
"""


def test_a_scrape_is_read_by_city() -> None:
    figures = read_metrics(scrape("4510", 100, 7, {0.01: 3, 0.1: 9, float("inf"): 10}))
    assert set(figures) == {"4510"}
    city = figures["4510"]
    assert city.counters == {
        "records_in": 105,
        "records_stored": 100,
        "records_quarantined": 5,
        "records_forwarded": 2,
    }
    assert city.queue_depth == 7
    commit = city.histograms["batch_commit_seconds"]
    assert commit.bounds == {0.01: 3, 0.1: 9, float("inf"): 10} and commit.count == 10 and commit.total == 0.5


def test_quantiles_are_interpolated_within_their_bucket() -> None:
    buckets = Buckets({0.01: 50, 0.1: 90, 1.0: 100, float("inf"): 100}, 5.0, 100)
    assert buckets.quantile(0.5) == pytest.approx(0.01)
    assert buckets.quantile(0.7) == pytest.approx(0.01 + 0.09 * 0.5)
    assert buckets.quantile(0.99) == pytest.approx(0.1 + 0.9 * 0.9)
    assert Buckets({0.5: 1, float("inf"): 4}).quantile(0.99) == 0.5  # in the +Inf bucket: the highest bound
    assert Buckets().quantile(0.5) is None and Buckets({float("inf"): 0}).quantile(0.5) is None


def test_the_runs_view_counts_from_the_first_scrape() -> None:
    series = MetricsSeries({"4510": "http://127.0.0.1:1/metrics"})
    series.add(0.0, read_metrics(scrape("4510", 1000, 0, {0.01: 10, float("inf"): 10}, 0.05)))
    series.add(1.0, read_metrics(scrape("4510", 1400, 250, {0.01: 12, float("inf"): 20}, 0.3)))
    series.add(2.0, read_metrics(scrape("4510", 1500, 20, {0.01: 14, float("inf"): 30}, 0.6)))
    series.failed("http://127.0.0.1:1/metrics at 3.0 s: connection refused")
    doc = series.doc()
    city = doc["cities"]["4510"]
    assert city["records_stored"] == 500 and city["records_in"] == 500 and city["records_quarantined"] == 0
    assert city["queue_depth_max"] == 250
    commit = city["batch_commit_ms"]
    assert commit["count"] == 20 and commit["mean"] == pytest.approx(27.5)
    assert commit["p50"] == pytest.approx(10.0)  # 4 of the 20 new commits under 10 ms, the rest above: the bound
    assert [s["stored_per_second"]["4510"] for s in doc["timeline"]] == [400, 100]
    assert [s["queue_depth"]["4510"] for s in doc["timeline"]] == [250, 20]
    assert doc["scrapes"] == 3 and doc["errors"] == ["http://127.0.0.1:1/metrics at 3.0 s: connection refused"]


@pytest.mark.parametrize(
    "text",
    [
        "yikatong_clearing_queue_depth{city=",
        "# TYPE yikatong_clearing_batch_commit_seconds histogram\n"
        'yikatong_clearing_batch_commit_seconds_bucket{city="4510",le="soon"} 1\n',
        'yikatong_clearing_queue_depth{city="4510"} many\n',
        "\x00",
    ],
)
def test_a_scrape_that_is_not_metrics_is_refused_with_the_reason(text: str) -> None:
    with pytest.raises(MetricsError):
        read_metrics(text)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400) | st.builds(lambda a, b: a + b, st.just(scrape("4560", 3, 1, {1.0: 1})), st.text()))
def test_any_text_gives_figures_or_metrics_error(text: str) -> None:
    try:
        figures = read_metrics(text)
    except MetricsError:
        return
    for city in figures.values():
        for buckets in city.histograms.values():
            for q in (0.5, 0.99):
                value = buckets.quantile(q)
                assert value is None or isinstance(value, float)


NON_FINITE = st.sampled_from(["NaN", "+Inf", "-Inf", "nan", "inf"])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 8), NON_FINITE)
def test_a_value_that_is_not_finite_is_refused_not_left_to_break_the_report(line: int, value: str) -> None:
    """NaN and +-Inf are valid Prometheus values, but no count, depth or sum of the clearing's: one would make the
    report's rounding raise at the end of the run and lose the report."""
    lines = scrape("4510", 100, 7, {0.01: 3, float("inf"): 10}).splitlines()
    samples = [k for k, text in enumerate(lines) if text.startswith("yikatong_clearing")]
    at = samples[line % len(samples)]
    lines[at] = lines[at].rsplit(" ", 1)[0] + " " + value
    with pytest.raises(MetricsError, match="not a finite number"):
        read_metrics("\n".join(lines) + "\n")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=400) | st.builds(lambda a, b: a + b, st.just(scrape("4560", 3, 1, {1.0: 1})), st.text()))
def test_any_scrape_that_reads_makes_a_report(text: str) -> None:
    try:
        figures = read_metrics(text)
    except MetricsError:
        return
    series = MetricsSeries({"4560": "http://127.0.0.1:1/metrics"})
    series.add(0.0, {})
    series.add(1.0, figures)
    series.doc()
