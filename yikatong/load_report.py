"""The load run's summary: figures from the per-second timeline (rates, ack latency percentiles), the
``yikatong.load-summary/1`` JSON document, and one self-contained HTML page with the rate and latency over time
as inline SVG (no script, nothing fetched)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TypedDict

import numpy as np

from yikatong.loadgen import LoadRun

SUMMARY_SCHEMA = "yikatong.load-summary/1"
PERCENTILES = (50, 95, 99)

Percentiles = dict[str, float | None]
"""``p50``, ``p95``, ``p99`` in milliseconds (None when nothing was timed)."""
SecondDoc = dict[str, float | None]
"""One second of the timeline: ``second``, ``offered``, ``generated``, ``acked``, ``rejected`` and the
percentiles, flat."""


class LoadSettings(TypedDict):
    """What the run was asked to do."""

    terminals: int
    cards: int
    rate: float
    duration: float
    profile: str
    broker: str
    clearing: str  # "started" or "external"
    session_expiry: int | None
    seed: int
    hotlist_at: float | None  # seconds into the load when cards went on a hotlist (None: none did)
    hotlist_cards: int


class HotlistDoc(TypedDict):
    """How a hotlist add during the run reached the terminals (times from the moment the add began)."""

    at: float | None  # seconds into the load the add began (None: the load ended first)
    cards: dict[str, str]  # card id -> its issuer
    versions: dict[str, int]  # issuer -> the version the add made
    published_ms: dict[str, float]  # issuer -> from the add to its version stored and published (broker's PUBACK)
    ahead: dict[str, int]  # issuer -> a version at least as high the terminals held before (a stale retained list)
    holding: int  # terminals holding every new version at the end
    holding_ms: Percentiles  # from the add to each of them holding it
    first_refusal_ms: dict[str, float | None]  # terminal city -> first refusal of a listed card there
    refusals: dict[str, int]  # terminal city -> taps of listed cards refused
    taken: int  # records of listed cards made after the add, before their terminal held the list
    rejected: int  # records of listed cards the clearing rejected (not counted against the run)


class LoadSummary(TypedDict):
    """The ``yikatong.load-summary/1`` document."""

    schema: str
    settings: LoadSettings
    terminals: int
    connected: int
    connect_seconds: float
    offered: int
    generated: int
    acked: int
    rejected: int
    unacked: int
    generated_per_second: float
    acked_per_second: float
    drain_seconds: float
    latency_ms: Percentiles
    hotlist: HotlistDoc | None
    timeline: list[SecondDoc]


def percentiles_ms(latencies: Sequence[float]) -> Percentiles:
    """p50/p95/p99 of latencies given in seconds, in milliseconds (None when there are none)."""
    if not latencies:
        return {f"p{p}": None for p in PERCENTILES}
    values = np.percentile(np.asarray(latencies) * 1000.0, PERCENTILES)
    return {f"p{p}": round(float(v), 1) for p, v in zip(PERCENTILES, values, strict=True)}


def summary(run: LoadRun, settings: LoadSettings) -> LoadSummary:
    """The whole run as one JSON document: settings, totals, percentiles and the timeline."""
    latencies = [x for second in run.timeline for x in second.latencies]
    duration = run.plan.duration
    queued = run.queued()
    timeline: list[SecondDoc] = [
        {
            "second": i,
            "offered": round(s.offered, 1),
            "generated": s.generated,
            "acked": s.acked,
            "rejected": s.rejected,
            **percentiles_ms(s.latencies),
        }
        for i, s in enumerate(run.timeline)
    ]
    return {
        "schema": SUMMARY_SCHEMA,
        "settings": settings,
        "terminals": len(run.terminals),
        "connected": run.connected(),
        "connect_seconds": round(run.connect_seconds, 2),
        "offered": round(run.offered),
        "generated": run.generated,
        "acked": run.acked,
        "rejected": run.rejected,
        "unacked": queued,
        "generated_per_second": round(run.generated / duration, 1),
        "acked_per_second": round(sum(s.acked for s in run.timeline[: int(duration)]) / duration, 1),
        "drain_seconds": round(run.drain_seconds, 2),
        "latency_ms": percentiles_ms(latencies),
        "hotlist": _hotlist(run),
        "timeline": timeline,
    }


def _hotlist(run: LoadRun) -> HotlistDoc | None:
    """The run's hotlist propagation (None when it had no hotlist plan)."""
    if run.hotlist is None:
        return None
    news = run.propagation
    holding = news.holding(run.terminals)
    cities = sorted({t.city for t in run.terminals})
    return {
        "at": None if news.at is None else round(news.at, 3),
        "cards": {card.serial: card.issuer for card in run.hotlist.cards},
        "versions": news.versions,
        "published_ms": {issuer: round(seconds * 1000, 1) for issuer, seconds in news.published.items()},
        "ahead": news.ahead,
        "holding": len(holding),
        "holding_ms": percentiles_ms(holding),
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


def _chart(title: str, unit: str, series: list[tuple[str, str, list[float | None]]]) -> str:
    """A line chart: x = second of the run, one line per series (None values leave a gap)."""
    width, height, left, bottom, top = 760, 260, 60, 30, 20
    length = max((len(values) for _, _, values in series), default=1)
    top_value = max((v for _, _, values in series for v in values if v is not None), default=1.0) or 1.0
    plot_w, plot_h = width - left - 20, height - bottom - top

    def at(i: int, v: float) -> tuple[float, float]:
        return left + plot_w * i / max(1, length - 1), top + plot_h * (1 - v / top_value)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">']
    parts.append(f"<title>{html.escape(title)}</title>")
    for k in range(5):
        value = top_value * k / 4
        _, y = at(0, value)
        parts.append(f'<line x1="{left}" x2="{width - 20}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="11">{value:,.0f}</text>')
    for k in range(0, length, max(1, length // 10)):
        x, _ = at(k, 0)
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


def _hotlist_rows(news: HotlistDoc | None) -> list[tuple[str, str]]:
    """The report's rows on the hotlist add (none without one)."""
    if news is None or news["at"] is None:
        return []
    held = news["holding_ms"]
    firsts = news["first_refusal_ms"]
    return [
        ("hotlist add", f"{len(news['cards'])} card(s) at {news['at']} s: {news['versions']}"),
        ("terminals holding it", f"{news['holding']:,}, from the add p50 {held['p50']} ms p99 {held['p99']} ms"),
        ("first refusal", " ".join(f"{city} {ms} ms" for city, ms in firsts.items())),
    ]


def render_html(doc: LoadSummary) -> str:
    """The load report page."""
    timeline = doc["timeline"]
    settings = doc["settings"]
    rates = _chart(
        "Rate",
        "records per second",
        [
            ("offered", "#999", [s["offered"] for s in timeline]),
            ("generated", "#1f77b4", [s["generated"] for s in timeline]),
            ("acked", "#2ca02c", [s["acked"] for s in timeline]),
        ],
    )
    colours = dict(zip(PERCENTILES, ("#2ca02c", "#ff7f0e", "#d62728"), strict=True))
    latency = _chart(
        "Ack latency",
        "ms, per second of the run",
        [(f"p{p}", colours[p], [s[f"p{p}"] for s in timeline]) for p in PERCENTILES],
    )
    lat = doc["latency_ms"]
    rows = [
        ("terminals", f"{doc['terminals']:,} ({doc['connected']:,} connected in {doc['connect_seconds']} s)"),
        ("offered", f"{settings['rate']:,} taps/s peak, {settings['profile']}, {settings['duration']} s"),
        ("generated", f"{doc['generated']:,} records ({doc['generated_per_second']:,}/s)"),
        ("acked", f"{doc['acked']:,} records ({doc['acked_per_second']:,}/s during the load)"),
        ("rejected", f"{doc['rejected']:,}"),
        ("unacked at the end", f"{doc['unacked']:,}"),
        ("ack latency", " ".join(f"{k} {v} ms" for k, v in lat.items())),
        ("broker", html.escape(str(settings["broker"]))),
        *_hotlist_rows(doc["hotlist"]),
    ]
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>yikatong load run</title>"
        "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}</style></head>"
        f"<body><h1>yikatong load run</h1><table>{table}</table>{rates}{latency}</body></html>\n"
    )
