"""The load run's summary: the ``yikatong.load-summary/2`` JSON document (rates, ack latency percentiles from the
merged HDR histogram, whether the generator kept its timetable, the sweep's steps, the clearings' metrics, the
per-second timeline) and one self-contained HTML page with the rates, latency, lag and clearing queues over time
as inline SVG (no script, nothing fetched)."""

from __future__ import annotations

import html
import itertools
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from yikatong.load_metrics import MetricsDoc
from yikatong.load_schedule import LATE
from yikatong.load_stats import PERCENTILES, Counts, Percentiles, percentiles

if TYPE_CHECKING:
    from yikatong.load_coordinator import RunResult, StepResult

SUMMARY_SCHEMA = "yikatong.load-summary/2"
LATENCY_KEYS = [name for name, _ in PERCENTILES] + ["max"]
RED, GREEN = "#c00", "#080"

SecondDoc = dict[str, float | None]
"""One second of the timeline: ``second``, ``offered`` (taps due), ``generated``, ``acked``, ``rejected``, ``late``
(taps due this second and made late), ``lag_s`` (the most one was late) and the latency percentiles of the acks
that came in it, flat."""


def percentiles_ms(latencies: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 of a few latencies given in seconds, in milliseconds (None when there are none): for small
    samples such as one per terminal (ack latencies go into HDR histograms instead)."""
    points = (50, 95, 99)
    if not latencies:
        return {f"p{p}": None for p in points}
    values = np.percentile(np.asarray(latencies) * 1000.0, points)
    return {f"p{p}": round(float(v), 1) for p, v in zip(points, values, strict=True)}


class LoadSettings(TypedDict):
    """What the run was asked to do."""

    terminals: int
    cards: int
    rate: float
    duration: float
    profile: str
    broker: str
    clearing: str  # "external", or "started" (and how, on a cluster)
    session_expiry: int | None
    seed: int
    workers: int
    hotlist_at: float | None  # seconds into the load when cards went on a hotlist (None: none did)
    hotlist_cards: int
    sweep: SweepSettings | None  # --sweep's steps (rate, duration and profile then do not apply)


class SweepSettings(TypedDict):
    """What ``--sweep`` was asked to do: flat steps from ``start`` taps/s, each ``factor`` times the last."""

    start: float
    factor: float
    step_seconds: float
    steps: int
    slo_ms: float


class HotlistDoc(TypedDict):
    """How a hotlist add during the run reached the terminals (times from the moment the add began)."""

    at: float | None  # seconds into the load the add began (None: the load ended first)
    cards: dict[str, str]  # card id -> its issuer
    versions: dict[str, int]  # issuer -> the version the add made
    published_ms: dict[str, float]  # issuer -> from the add to its version stored and published (broker's PUBACK)
    ahead: dict[str, int]  # issuer -> a version at least as high the terminals held before (a stale retained list)
    holding: int  # terminals holding every new version at the end
    holding_ms: dict[str, float | None]  # from the add to each of them holding it
    first_refusal_ms: dict[str, float | None]  # terminal city -> first refusal of a listed card there
    refusals: dict[str, int]  # terminal city -> taps of listed cards refused
    taken: int  # records of listed cards made after the add, before their terminal held the list
    rejected: int  # records of listed cards the clearing rejected (not counted against the run)


class ScheduleDoc(TypedDict):
    """Whether the generator made its taps at their moments."""

    late_after_ms: float  # a tap made later than this after its moment is late
    taps: int  # taps due by the timetables
    late: int  # of those, made late
    max_lag_s: float  # the most a tap was made after its moment
    behind: bool  # any tap late: the latency includes the generator's own delay (it runs from each moment)
    cpu_busy: float | None  # share of the machine's CPU busy while taps were offered (None: unknown)
    cores: int  # the machine's


class StepDoc(TypedDict):
    """One step of a sweep (its taps by their moment, wherever their acks came)."""

    rate: float
    seconds: float
    offered: int
    generated: int
    acked: int
    rejected: int
    unacked: int
    late: int
    max_lag_s: float
    latency_ms: Percentiles
    held: bool
    cpu_busy: float | None  # share of the machine's CPU busy while the step's taps were offered


class SweepDoc(TypedDict):
    """``--sweep``: the steps, and the highest offered rate whose p99 stayed within the SLO."""

    slo_ms: float
    held_rate: float | None  # None: not even the first step held
    limit: str  # why the sweep stopped
    steps: list[StepDoc]


class LoadSummary(TypedDict):
    """The ``yikatong.load-summary/2`` document."""

    schema: str
    settings: LoadSettings
    workers: int
    terminals: int
    connected: int
    connect_seconds: float
    offered: int
    generated: int
    resent: int  # publications beyond one per record made (no ack within the uplink's ack timeout, reconnects)
    acked: int
    rejected: int
    unacked: int
    generated_per_second: float
    acked_per_second: float  # acks in the seconds taps were due in, per such second
    drain_seconds: float
    latency_ms: Percentiles
    latency_hdr: str  # the run's ack latency histogram (µs), HdrHistogram.encode(): merge runs with decode/add
    schedule: ScheduleDoc
    hotlist: HotlistDoc | None
    sweep: SweepDoc | None
    clearing_metrics: MetricsDoc | None
    timeline: list[SecondDoc]


def _schedule(counts: Counts, busy: float | None) -> ScheduleDoc:
    return {
        "late_after_ms": LATE * 1000,
        "taps": counts.offered,
        "late": counts.late,
        "max_lag_s": round(counts.lag, 3),
        "behind": counts.late > 0,
        "cpu_busy": None if busy is None else round(busy, 3),
        "cores": os.cpu_count() or 1,
    }


def _step(step: StepResult) -> StepDoc:
    counts = step.counts
    return {
        "rate": round(step.rate, 1),
        "seconds": step.seconds,
        "offered": counts.offered,
        "generated": counts.generated,
        "acked": counts.acked,
        "rejected": counts.rejected,
        "unacked": step.unacked,
        "late": counts.late,
        "max_lag_s": round(counts.lag, 3),
        "latency_ms": percentiles(counts.latency),
        "held": step.held,
        "cpu_busy": None if step.busy is None else round(step.busy, 3),
    }


def _sweep(steps: list[StepResult]) -> SweepDoc | None:
    if not steps:
        return None
    held = [step for step in steps if step.held]
    last = steps[-1]
    if last.held:
        limit = f"every step held, up to {last.rate:,.0f} taps/s: the sweep's steps ran out before the SLO broke"
    else:
        p99 = percentiles(last.counts.latency)["p99"]
        why = f"{last.unacked:,} records unacked after its drain" if last.unacked else f"p99 {p99:,} ms"
        limit = f"the step at {last.rate:,.0f} taps/s missed the SLO ({why})"
        if last.counts.late:
            busy = f", the machine's CPU {last.busy:.0%} busy" if last.busy is not None else ""
            limit += (
                f"; the generator was behind its timetable there ({last.counts.late:,} taps late, up to "
                f"{last.counts.lag:.2f} s{busy}): the limit may be this machine's, which the generator shares with "
                "what it tests (more --workers, the generator on another machine)"
            )
    return {
        "slo_ms": steps[0].slo * 1000,
        "held_rate": round(held[-1].rate, 1) if held else None,
        "limit": limit,
        "steps": [_step(step) for step in steps],
    }


def _second(index: int, counts: Counts) -> SecondDoc:
    doc: SecondDoc = {
        "second": index,
        "offered": counts.offered,
        "generated": counts.generated,
        "acked": counts.acked,
        "rejected": counts.rejected,
        "late": counts.late,
        "lag_s": round(counts.lag, 3),
    }
    doc.update(percentiles(counts.latency))
    return doc


def summary(run: RunResult, settings: LoadSettings) -> LoadSummary:
    """The whole run as one JSON document: settings, totals, percentiles, schedule, sweep, metrics, timeline."""
    total = run.tally.total()
    seconds = run.tally.seconds
    loaded = [s for s in seconds if s.offered]  # the seconds taps were due in (a sweep drains between steps)
    return {
        "schema": SUMMARY_SCHEMA,
        "settings": settings,
        "workers": run.workers,
        "terminals": run.terminals,
        "connected": run.connected,
        "connect_seconds": round(run.connect_seconds, 2),
        "offered": total.offered,
        "generated": run.generated,
        "resent": max(0, run.published - run.generated),
        "acked": run.acked,
        "rejected": run.rejected,
        "unacked": run.unacked,
        "generated_per_second": round(run.generated / run.duration, 1) if run.duration else 0.0,
        "acked_per_second": round(sum(s.acked for s in loaded) / max(1, len(loaded)), 1),
        "drain_seconds": round(run.drain_seconds, 2),
        "latency_ms": percentiles(total.latency),
        "latency_hdr": total.latency.encode().decode("ascii"),  # HdrHistogram's own base64 text
        "schedule": _schedule(total, run.busy),
        "hotlist": _hotlist(run, settings),
        "sweep": _sweep(run.steps),
        "clearing_metrics": run.metrics,
        "timeline": [_second(i, s) for i, s in enumerate(seconds)],
    }


def _hotlist(run: RunResult, settings: LoadSettings) -> HotlistDoc | None:
    """The run's hotlist propagation (None when it had no hotlist add)."""
    news = run.propagation
    if news is None or settings["hotlist_at"] is None:
        return None
    cities = run.cities
    return {
        "at": None if news.at is None else round(news.at, 3),
        "cards": run.listed,
        "versions": news.versions,
        "published_ms": {issuer: round(seconds * 1000, 1) for issuer, seconds in news.published.items()},
        "ahead": news.ahead,
        "holding": len(run.holding),
        "holding_ms": percentiles_ms(run.holding),
        "first_refusal_ms": {
            city: None if city not in news.first_refusal else round(news.first_refusal[city] * 1000, 1)
            for city in cities
        },
        "refusals": {city: news.refusals.get(city, 0) for city in cities},
        "taken": len(news.records),
        "rejected": news.rejected,
    }


def _polyline(points: list[tuple[float, float]], colour: str) -> str:
    if not points:
        return ""
    text = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{text}"/>'


def _chart(
    title: str, unit: str, series: list[tuple[str, str, list[float | None]]], xs: list[float] | None = None
) -> str:
    """A line chart, one line per series (None values leave a gap); x is the second of the run (``xs``: the
    second of each value, when they are not one a second)."""
    width, height, left, bottom, top = 760, 260, 70, 30, 20
    length = max((len(values) for _, _, values in series), default=1)
    span = max(xs[-1] if xs else length - 1, 1)
    top_value = max((v for _, _, values in series for v in values if v is not None), default=1.0) or 1.0
    plot_w, plot_h = width - left - 20, height - bottom - top

    def at(i: int, v: float) -> tuple[float, float]:
        x = xs[i] if xs else i
        return left + plot_w * x / span, top + plot_h * (1 - v / top_value)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(f"<title>{html.escape(title)}</title>")
    for k in range(5):
        value = top_value * k / 4
        y = top + plot_h * (1 - k / 4)
        parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{value:,.4g}</text>')
    for k in range(0, int(span) + 1, max(1, int(span) // 10)):
        x = left + plot_w * k / span
        parts.append(f'<text x="{x:.1f}" y="{height - 10}" text-anchor="middle" font-size="11">{k}s</text>')
    for _, colour, values in series:
        run: list[tuple[float, float]] = []
        for i, v in enumerate(values):
            if v is None:
                parts.append(_polyline(run, colour))
                run = []
            else:
                run.append(at(i, v))
        parts.append(_polyline(run, colour))
    parts.append("</svg>")
    legend = " ".join(f'<span style="color:{colour}">&#9632; {html.escape(name)}</span>' for name, colour, _ in series)
    return f"<h2>{html.escape(title)} ({html.escape(unit)})</h2><p>{legend}</p>{''.join(parts)}"


PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _metrics_charts(metrics: MetricsDoc | None) -> str:
    """Queue depth and stored rate of each clearing over the run (nothing without metrics)."""
    if metrics is None or not metrics["timeline"]:
        return ""
    timeline = metrics["timeline"]
    xs = [max(0.0, s["second"]) for s in timeline]
    cities = sorted(metrics["cities"])
    colours = dict(zip(cities, itertools.cycle(PALETTE), strict=False))  # a cluster's workers may outnumber it
    depth = [(city, colours[city], [s["queue_depth"].get(city) for s in timeline]) for city in cities]
    stored = [(city, colours[city], [s["stored_per_second"].get(city) for s in timeline]) for city in cities]
    return _chart("Clearing queue depth", "messages waiting, per clearing", depth, xs) + _chart(
        "Clearing stored", "records per second, per clearing", stored, xs
    )


def _hotlist_rows(news: HotlistDoc | None) -> list[tuple[str, str, str]]:
    """The report's rows on the hotlist add (none without one)."""
    if news is None or news["at"] is None:
        return []
    held = news["holding_ms"]
    firsts = news["first_refusal_ms"]
    return [
        ("hotlist add", f"{len(news['cards'])} card(s) at {news['at']} s: {news['versions']}", ""),
        ("terminals holding it", f"{news['holding']:,}, from the add p50 {held['p50']} ms p99 {held['p99']} ms", ""),
        ("first refusal", " ".join(f"{city} {ms} ms" for city, ms in firsts.items()), ""),
    ]


def schedule_line(schedule: ScheduleDoc) -> str:
    """One sentence on whether the generator kept its timetable (and how busy the machine was meanwhile)."""
    busy = schedule["cpu_busy"]
    cpu = "" if busy is None else f"; the machine's {schedule['cores']} cores {busy:.0%} busy during the load"
    if not schedule["behind"]:
        return (
            f"on schedule: every one of {schedule['taps']:,} taps made within {schedule['late_after_ms']:.0f} ms{cpu}"
        )
    share = schedule["late"] / max(1, schedule["taps"])
    return (
        f"BEHIND its timetable: {schedule['late']:,} of {schedule['taps']:,} taps ({share:.1%}) made more than "
        f"{schedule['late_after_ms']:.0f} ms after their moment, up to {schedule['max_lag_s']:.2f} s late "
        f"(the latency counts from each tap's moment, so it includes this delay){cpu}"
    )


def _metrics_rows(metrics: MetricsDoc | None) -> list[tuple[str, str, str]]:
    if metrics is None:
        return []
    rows = []
    for city, doc in metrics["cities"].items():
        commit, lag = doc["batch_commit_ms"], doc["ack_lag_ms"]
        rows.append(
            (
                f"clearing {city}",
                f"in {doc['records_in']:,}, stored {doc['records_stored']:,}, quarantined "
                f"{doc['records_quarantined']:,}, forwarded {doc['records_forwarded']:,}; queue depth max "
                f"{doc['queue_depth_max']:,.0f}; batch commit p50 {commit['p50']} ms p99 {commit['p99']} ms "
                f"({commit['count']:,} commits); ack lag p50 {lag['p50']} ms p99 {lag['p99']} ms",
                "",
            )
        )
    if metrics["errors"]:
        rows.append(("metrics scrapes failed", "; ".join(metrics["errors"]), RED))
    return rows


def _sweep_table(sweep: SweepDoc | None) -> str:
    if sweep is None:
        return ""
    head = "".join(
        f"<th>{h}</th>" for h in ("offered/s", "taps", "records", "acked", "unacked", "late", "lag s", "CPU busy")
    )
    head += "".join(f"<th>{k} ms</th>" for k in LATENCY_KEYS) + "<th>held</th>"
    rows = []
    for step in sweep["steps"]:
        lat = step["latency_ms"]
        late = _colour(RED if step["late"] else "")
        cells = [
            f"<td>{step['rate']:,.0f}</td><td>{step['offered']:,}</td><td>{step['generated']:,}</td>",
            f"<td>{step['acked']:,}</td><td>{step['unacked']:,}</td><td{late}>{step['late']:,}</td>",
            f"<td{late}>{step['max_lag_s']}</td>",
            f"<td>{'-' if step['cpu_busy'] is None else format(step['cpu_busy'], '.0%')}</td>",
            *(f"<td>{lat[k]}</td>" for k in LATENCY_KEYS),
            f'<td style="color:{GREEN if step["held"] else RED}">{"yes" if step["held"] else "no"}</td>',
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    held = sweep["held_rate"]
    verdict = (
        f"highest offered rate that held (p99 &le; {sweep['slo_ms']:,.0f} ms): <b>{held:,.0f} taps/s</b>"
        if held is not None
        else f'<span style="color:{RED}">no step held p99 &le; {sweep["slo_ms"]:,.0f} ms</span>'
    )
    return (
        f"<h2>Sweep</h2><p>{verdict}; {html.escape(sweep['limit'])}</p>"
        f"<table border=1 cellspacing=0 cellpadding=3><tr>{head}</tr>{''.join(rows)}</table>"
    )


def _offered(settings: LoadSettings) -> str:
    sweep = settings["sweep"]
    if sweep is None:
        return f"{settings['rate']:,} taps/s peak, {settings['profile']}, {settings['duration']} s"
    return (
        f"a sweep: flat steps of {sweep['step_seconds']:g} s from {sweep['start']:,} taps/s, x{sweep['factor']:g} "
        f"each, at most {sweep['steps']}, until p99 > {sweep['slo_ms']:,} ms"
    )


def _colour(colour: str) -> str:
    return f' style="color:{colour}"' if colour else ""


def render_html(doc: LoadSummary) -> str:
    """The load report page."""
    timeline = doc["timeline"]
    settings = doc["settings"]
    rates = _chart(
        "Rate",
        "per second",
        [
            ("offered (taps due)", "#999", [s["offered"] for s in timeline]),
            ("generated (records)", "#1f77b4", [s["generated"] for s in timeline]),
            ("acked", "#2ca02c", [s["acked"] for s in timeline]),
        ],
    )
    colours = {"p50": "#2ca02c", "p99": "#ff7f0e", "p99.9": "#d62728"}
    latency = _chart(
        "Ack latency from each tap's moment",
        "ms, of the acks in each second of the run",
        [(key, colour, [s[key] for s in timeline]) for key, colour in colours.items()],
    )
    schedule = doc["schedule"]
    lag = ""
    if schedule["behind"]:
        lag = _chart(
            "Generator behind its timetable",
            "s, most a tap due that second was late",
            [("lag", RED, [s["lag_s"] for s in timeline])],
        )
    lat = doc["latency_ms"]
    rows: list[tuple[str, str, str]] = [
        ("terminals", f"{doc['terminals']:,} ({doc['connected']:,} connected in {doc['connect_seconds']} s)", ""),
        ("workers", f"{doc['workers']} process(es)", ""),
        ("offered", _offered(settings), ""),
        ("schedule", schedule_line(schedule), RED if schedule["behind"] else GREEN),
        ("generated", f"{doc['generated']:,} records ({doc['generated_per_second']:,}/s)", ""),
        ("acked", f"{doc['acked']:,} records ({doc['acked_per_second']:,}/s during the load)", ""),
        ("sent again", f"{doc['resent']:,} (no ack in time, or a reconnect)", RED if doc["resent"] else ""),
        ("rejected", f"{doc['rejected']:,}", ""),
        ("unacked at the end", f"{doc['unacked']:,}", RED if doc["unacked"] else ""),
        ("ack latency", " ".join(f"{k} {v} ms" for k, v in lat.items()), ""),
        ("broker", str(settings["broker"]), ""),
        ("clearing", str(settings["clearing"]), ""),
        *_hotlist_rows(doc["hotlist"]),
        *_metrics_rows(doc["clearing_metrics"]),
    ]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td{_colour(c)}>{html.escape(v)}</td></tr>" for k, v, c in rows)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>yikatong load run</title>"
        "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}</style></head>"
        f"<body><h1>yikatong load run</h1><table>{table}</table>{_sweep_table(doc['sweep'])}{rates}{latency}{lag}"
        f"{_metrics_charts(doc['clearing_metrics'])}</body></html>\n"
    )
