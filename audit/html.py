"""The audit report for people: one self-contained HTML page (inline CSS, inline SVG chart, no script, no
external resource), printable. Every string taken from the report is escaped; evidence may contain anything.

Sections: a header (title by kind, generated time, inputs), the counts by severity (cells ``count-<severity>``
with ``data-count``), a chart of findings by card technology and city, then per kind: the cards audited and
their findings (chips), or the checks, the findings grouped by rule (at most ``FINDINGS_PER_RULE`` rows each),
the hotlist and the settlement (reconciliation); the probes skipped. Money is integer fen, shown as fen and yuan.
"""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import Final

from audit.findings import CHIP_RULES, RECONCILE_RULES, TOOL, Finding, Report, Severity
from audit.fleet import ALGORITHM_NAMES, CityView, FleetView, fleet_view

FINDINGS_PER_RULE: Final = 200  # rows shown per rule in the reconciliation findings; the rest are counted
EVIDENCE_VISIBLE: Final = 6  # evidence lines shown before the rest folds into <details>

TITLES: Final = MappingProxyType({"chips": "Chip security audit", "reconcile": "Inter-city reconciliation"})

# severity -> (fill colour, text colour on it): a scale from dark red (critical) to green (pass)
_COLOURS: Final = MappingProxyType(
    {
        Severity.CRITICAL: ("#7f1d1d", "#ffffff"),
        Severity.HIGH: ("#dc2626", "#ffffff"),
        Severity.MEDIUM: ("#f97316", "#1c1917"),
        Severity.LOW: ("#facc15", "#1c1917"),
        Severity.INFO: ("#2563eb", "#ffffff"),
        Severity.PASS: ("#15803d", "#ffffff"),
    }
)
_ORDER: Final = tuple(sorted(Severity, reverse=True))  # most severe first
_TECH_NAMES: Final = MappingProxyType({"cpu": "CPU", "m1": "M1", "": "other"})
_LABELS: Final = MappingProxyType(
    {
        "issuer_owes_acquirer": "issuer owes",
        "net_sum": "net sum",
        "hotlist_grace_seconds": "hotlist grace, s",
        "hotlisted_issuer_fen": "hotlisted, issuer bears",
        "hotlisted_acquirer_fen": "hotlisted, acquirer's loss",
    }
)
_MONEY_KEYS: Final = frozenset(
    {
        "gross",
        "fee",
        "issuer_owes_acquirer",
        "owed",
        "net",
        "amount",
        "net_sum",
        "hotlisted_issuer_fen",
        "hotlisted_acquirer_fen",
    }
)

_CSS_BASE: Final = """
:root { --ink: #111827; --muted: #4b5563; --line: #d1d5db; --soft: #f3f4f6; --accent: #1e3a8a; }
* { box-sizing: border-box; }
html { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
body { margin: 0; color: var(--ink); background: #fff; line-height: 1.45; font-size: 15px;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "Noto Sans CJK SC", "PingFang SC",
    "Microsoft YaHei", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 48px; }
header.top { border-bottom: 3px solid var(--accent); padding-bottom: 12px; margin-bottom: 8px; }
header.top h1 { margin: 0 0 4px; font-size: 1.75rem; color: var(--accent); letter-spacing: -0.01em; }
header.top .sub { color: var(--muted); margin: 0; }
dl.meta { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 12px 0 0; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; }
nav.toc { margin: 12px 0 4px; font-size: 0.9rem; display: flex; flex-wrap: wrap; gap: 4px 14px; }
nav.toc a { color: var(--accent); text-decoration: none; }
h2 { font-size: 1.25rem; margin: 32px 0 10px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 1.05rem; margin: 22px 0 8px; }
p.none { color: var(--muted); font-style: italic; margin: 4px 0; }
p.note { color: var(--muted); font-size: 0.9rem; margin: 4px 0 8px; }
code, pre, .mono { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size: 0.86em; }
pre { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
.table-wrap { overflow-x: auto; margin: 6px 0 12px; }
table { border-collapse: collapse; width: 100%; font-size: 0.92rem; }
th, td { text-align: left; vertical-align: top; padding: 5px 9px; border-bottom: 1px solid var(--line); }
thead th { background: var(--soft); font-weight: 600; border-bottom: 2px solid var(--line); white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fafafa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tfoot td { font-weight: 600; border-top: 2px solid var(--line); }
table.narrow { width: auto; min-width: 50%; }
.nowrap { white-space: nowrap; }
p.more { color: #78350f; background: #fffbeb; border-left: 4px solid #f59e0b; padding: 6px 10px; }
table.summary { width: auto; min-width: 60%; }
table.summary th, table.summary td { text-align: center; padding: 6px 14px; }
table.summary td.count { font-size: 1.6rem; font-weight: 700; font-variant-numeric: tabular-nums; }
table.summary td.zero { color: #9ca3af; font-weight: 400; }
.badge { display: inline-block; min-width: 4.6em; text-align: center; padding: 1px 8px; border-radius: 999px;
  font-size: 0.78rem; font-weight: 700; letter-spacing: 0.02em; text-transform: uppercase; white-space: nowrap; }
.status-ok { color: #15803d; font-weight: 600; }
.status-bad { color: #b91c1c; font-weight: 600; }
figure.chart { margin: 6px 0 12px; overflow-x: auto; }
figure.chart svg { width: 100%; height: auto; max-width: 900px; min-width: 600px; display: block; }
figure.chart figcaption { color: var(--muted); font-size: 0.85rem; }
section.card { border: 1px solid var(--line); border-radius: 6px; padding: 4px 16px 12px; margin: 14px 0; }
section.card > h3 { display: flex; flex-wrap: wrap; gap: 10px; align-items: baseline; }
section.card > h3 .meta { color: var(--muted); font-weight: 400; font-size: 0.9rem; }
article.finding { border-left: 5px solid var(--line); background: #fcfcfd; padding: 8px 12px; margin: 10px 0; }
article.finding > header { display: flex; flex-wrap: wrap; gap: 8px; align-items: baseline; }
article.finding > header .title { font-weight: 600; }
p.remediation { margin: 0; }
.label { color: var(--muted); font-size: 0.8rem; text-transform: uppercase; letter-spacing: 0.04em;
  margin: 8px 0 2px; }
.evidence pre { background: var(--soft); border: 1px solid #e5e7eb; border-radius: 4px; padding: 6px 8px; }
td pre { background: none; border: 0; padding: 0; min-width: 16em; }
td code, td pre { font-size: 0.84rem; }
details > summary { cursor: pointer; color: var(--accent); font-size: 0.88rem; margin: 4px 0; }
details.group { border: 1px solid var(--line); border-radius: 6px; padding: 4px 14px; margin: 12px 0; }
details.group > summary { font-size: 1rem; color: var(--ink); display: flex; gap: 10px; align-items: baseline;
  flex-wrap: wrap; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 2px 0; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; overflow-wrap: anywhere; }
ul.plain { margin: 4px 0; padding-left: 20px; }
ul.hotlist { columns: 3 14em; margin: 4px 0; }
footer { margin-top: 40px; color: var(--muted); font-size: 0.8rem; border-top: 1px solid var(--line);
  padding-top: 8px; }
@media (max-width: 700px) { main { padding: 12px; } table.summary td.count { font-size: 1.2rem; } }
@media print {
  body { font-size: 10pt; }
  main { max-width: none; padding: 0; }
  nav.toc { display: none; }
  h2 { break-after: avoid; }
  article.finding, figure.chart, tr { break-inside: avoid; }
  thead { display: table-header-group; }
  .table-wrap { overflow: visible; }
  details::details-content { content-visibility: visible; display: block; }
}
"""


def _css() -> str:
    rules = [
        f".sev-{s.label} {{ background: {fill}; color: {text}; }}\n"
        f"article.finding.sev-border-{s.label} {{ border-left-color: {fill}; }}\n"
        for s, (fill, text) in _COLOURS.items()
    ]
    return _CSS_BASE + "".join(rules)


def _e(value: object) -> str:
    """A value of any type as escaped HTML text (quotes included, so it is safe in attributes too)."""
    return html.escape(value if isinstance(value, str) else _plain(value), quote=True)


def _plain(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bytes):
        return value.hex().upper()
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _none() -> str:
    return '<p class="none">none</p>'


def _badge(severity: Severity) -> str:
    return f'<span class="badge sev-{severity.label}">{severity.label}</span>'


def _table(
    head: Sequence[str], rows: Iterable[Sequence[str]], numeric: frozenset[int] = frozenset(), narrow: bool = False
) -> str:
    """A table from already-escaped cell HTML; ``numeric`` holds the column indexes aligned right; a ``narrow``
    table is as wide as its content."""
    cls = [' class="num"' if i in numeric else "" for i in range(len(head))]
    th = "".join(f'<th scope="col"{cls[i]}>{h}</th>' for i, h in enumerate(head))
    body = "".join("<tr>" + "".join(f"<td{cls[i]}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    table = '<table class="narrow">' if narrow else "<table>"
    return f'<div class="table-wrap">{table}<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _fen(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def format_yuan(fen: int) -> str:
    """Integer fen as yuan with two decimals and thousands separators (integer arithmetic, no float)."""
    yuan, cents = divmod(abs(fen), 100)
    return f"{'-' if fen < 0 else ''}{yuan:,}.{cents:02d}"


def _money(value: object) -> tuple[str, str]:
    """Cells for an amount in fen: (fen, yuan)."""
    fen = _fen(value)
    if fen is None:
        return _e(value), ""
    return f"{fen:,}", format_yuan(fen)


def _rate(value: object) -> str:
    try:
        percent = Decimal(_plain(value)) * 100
    except (InvalidOperation, ValueError):
        return _e(value)
    return f'<span class="nowrap">{_e(value)} ({_e(format(percent.normalize(), "f"))} %)</span>'


def _evidence(lines: Sequence[str], visible: int = EVIDENCE_VISIBLE) -> str:
    """Evidence lines in monospace; beyond ``visible`` (plus a little slack) the rest folds away."""
    if not lines:
        return '<p class="none">no evidence recorded</p>'
    if len(lines) <= visible + 2:
        return f"<pre>{_e(chr(10).join(lines))}</pre>"
    shown, rest = lines[:visible], lines[visible:]
    return (
        f"<pre>{_e(chr(10).join(shown))}</pre>"
        f"<details><summary>{len(rest):,} more lines</summary><pre>{_e(chr(10).join(rest))}</pre></details>"
    )


def _details(details: Mapping[str, object]) -> str:
    if not details:
        return ""
    items = "".join(f"<dt>{_e(k)}</dt><dd><code>{_e(v)}</code></dd>" for k, v in details.items())
    return f'<dl class="kv">{items}</dl>'


def _tech(tech: str) -> str:
    return _TECH_NAMES.get(tech, tech)


def _group_label(tech: str, city: str) -> str:
    return f"{_tech(tech)} · {city or 'no city'}"


def _header(report: Report, title: str) -> str:
    inputs = (
        '<ul class="plain">' + "".join(f"<li><code>{_e(i)}</code></li>" for i in report.inputs) + "</ul>"
        if report.inputs
        else '<span class="none">none</span>'
    )
    worst = report.worst()
    verdict = f"{_badge(worst)} {_plural(len(report.findings), 'finding')}" if worst is not None else "no findings"
    return (
        '<header class="top">'
        f"<h1>{_e(title)}</h1>"
        '<p class="sub">yikatong city one-card audit report</p>'
        '<dl class="meta">'
        f'<dt>Generated</dt><dd><time id="generated">{_e(report.generated)}</time></dd>'
        f"<dt>Tool</dt><dd>{_e(TOOL)}</dd>"
        f"<dt>Inputs</dt><dd>{inputs}</dd>"
        f"<dt>Worst</dt><dd>{verdict}</dd>"
        "</dl></header>"
    )


def _toc(entries: Sequence[tuple[str, str]]) -> str:
    links = "".join(f'<a href="#{anchor}">{_e(name)}</a>' for anchor, name in entries)
    return f'<nav class="toc" aria-label="sections">{links}</nav>'


def _summary(report: Report) -> str:
    counts = report.counts()
    head = "".join(f'<th scope="col">{_badge(s)}</th>' for s in _ORDER) + '<th scope="col">total</th>'
    cells = "".join(
        f'<td id="count-{s.label}" class="count{" zero" if not counts[s.label] else ""}" '
        f'data-count="{counts[s.label]}">{counts[s.label]}</td>'
        for s in _ORDER
    )
    total = len(report.findings)
    cells += f'<td id="count-total" class="count" data-count="{total}">{total}</td>'
    return (
        '<section id="summary"><h2>Findings by severity</h2>'
        '<div class="table-wrap"><table class="summary">'
        f"<thead><tr>{head}</tr></thead><tbody><tr>{cells}</tr></tbody></table></div></section>"
    )


def _nice_step(top: int, most_ticks: int = 8) -> int:
    """The smallest step of 1, 2 or 5 times a power of ten that draws at most ``most_ticks`` intervals."""
    scale = 1
    while True:
        for m in (1, 2, 5):
            if top <= m * scale * most_ticks:
                return m * scale
        scale *= 10


def _chart(findings: Sequence[Finding]) -> str:
    """Horizontal bars, one per (technology, city), stacked by severity; legend, axis labels, totals."""
    groups: dict[tuple[str, str], Counter[Severity]] = {}
    for f in findings:
        groups.setdefault((f.tech, f.city), Counter())[f.severity] += 1
    if not groups:
        return _none()
    tech_rank = {"cpu": 0, "m1": 1, "": 3}
    keys = sorted(groups, key=lambda k: (tech_rank.get(k[0], 2), k[0], k[1] == "", k[1]))
    top = max(sum(c.values()) for c in groups.values())
    step = _nice_step(top)
    axis_max = step * -(-top // step)
    width, left, right, legend_h, row_h, bar_h, bottom = 860, 190, 64, 46, 30, 18, 54
    plot_w = width - left - right
    height = legend_h + row_h * len(keys) + bottom
    plot_bottom = legend_h + row_h * len(keys)
    parts: list[str] = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-labelledby="chart-title" '
        f'font-size="13" preserveAspectRatio="xMinYMin meet">',
        '<title id="chart-title">Findings by card technology and city, stacked by severity</title>',
    ]
    # legend (every severity, most severe first, as in the summary)
    for i, s in enumerate(_ORDER):
        lx = left + i * 98
        parts.append(
            f'<rect x="{lx}" y="10" width="14" height="14" rx="2" fill="{_COLOURS[s][0]}"/>'
            f'<text x="{lx + 20}" y="22" fill="#111827">{s.label}</text>'
        )
    # grid and x ticks
    for value in range(0, axis_max + 1, step):
        tx = left + plot_w * value / axis_max
        parts.append(
            f'<line x1="{tx:.1f}" y1="{legend_h - 6}" x2="{tx:.1f}" y2="{plot_bottom}" '
            f'stroke="{"#6b7280" if value == 0 else "#e5e7eb"}" stroke-width="1"/>'
            f'<text x="{tx:.1f}" y="{plot_bottom + 17}" text-anchor="middle" fill="#4b5563">{value:,}</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 10}" text-anchor="middle" fill="#111827" '
        'font-weight="600">number of findings</text>'
        f'<text transform="translate(16 {legend_h + row_h * len(keys) / 2:.1f}) rotate(-90)" '
        'text-anchor="middle" fill="#111827" font-weight="600">technology · city</text>'
    )
    for row, (tech, city) in enumerate(keys):
        y = legend_h + row * row_h + (row_h - bar_h) / 2
        label = _group_label(tech, city)
        parts.append(
            f'<text x="{left - 10}" y="{y + bar_h - 4:.1f}" text-anchor="end" fill="#111827">{_e(label)}</text>'
        )
        x = float(left)
        counts = groups[(tech, city)]
        for s in _ORDER:
            n = counts.get(s, 0)
            if not n:
                continue
            w = max(plot_w * n / axis_max, 3.0)  # a sliver stays visible beside a long bar
            fill, ink = _COLOURS[s]
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{bar_h}" fill="{fill}">'
                f"<title>{_e(label)}: {n:,} {s.label}</title></rect>"
            )
            if w >= 8 * len(f"{n:,}") + 6:
                parts.append(
                    f'<text x="{x + w / 2:.1f}" y="{y + bar_h - 4:.1f}" text-anchor="middle" fill="{ink}" '
                    f'font-size="11">{n:,}</text>'
                )
            x += w
        total = sum(counts.values())
        parts.append(f'<text x="{x + 6:.1f}" y="{y + bar_h - 4:.1f}" fill="#111827" font-weight="600">{total:,}</text>')
    parts.append("</svg>")
    return (
        '<figure class="chart">'
        + "".join(parts)
        + "<figcaption>Findings per card technology (CPU, M1, other) and city, stacked by severity.</figcaption>"
        "</figure>"
    )


# The fleet view's segments: algorithms from the domestic SM4 to the broken Crypto-1, chip origins.
_ALGORITHM_COLOURS: Final = (
    ("sm4", "#15803d"),
    ("3des", "#ca8a04"),
    ("des", "#ea580c"),
    ("crypto-1", "#b91c1c"),
    ("", "#9ca3af"),
)
_ORIGIN_COLOURS: Final = (("domestic chip", "#15803d"), ("foreign chip", "#2563eb"), ("maker unknown", "#9ca3af"))


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "n/a"


def _fleet_segments(view: CityView) -> list[list[tuple[str, int, str]]]:
    """Two bars of one city: cards by algorithm, cards by chip origin (label, count, colour)."""
    algorithms = [(ALGORITHM_NAMES.get(a, "unknown"), view.by_algorithm[a], c) for a, c in _ALGORITHM_COLOURS]
    unknown = view.cards - view.domestic_chip - view.foreign_chip
    origin_counts = (view.domestic_chip, view.foreign_chip, unknown)
    origins = [(label, n, c) for (label, c), n in zip(_ORIGIN_COLOURS, origin_counts, strict=True)]
    return [algorithms, origins]


def _fleet_chart(fleet: FleetView) -> str:
    """Per city two bars as shares of its cards: by algorithm (SM4 to Crypto-1) and by chip origin."""
    rows = [
        (city, kind, segments)
        for city, view in fleet.cities.items()
        for kind, segments in zip(("algorithm", "chip"), _fleet_segments(view), strict=True)
    ]
    width, left, right, legend_h, row_h, bar_h, bottom = 860, 190, 64, 70, 28, 18, 54
    plot_w = width - left - right
    plot_bottom = legend_h + row_h * len(rows)
    height = plot_bottom + bottom
    parts = [
        f'<svg viewBox="0 0 {width} {height}" role="img" aria-labelledby="fleet-chart-title" font-size="13" '
        'preserveAspectRatio="xMinYMin meet">',
        '<title id="fleet-chart-title">Cards per city by algorithm and by chip origin, as shares of the city\'s '
        "cards</title>",
    ]
    legend = [(ALGORITHM_NAMES.get(a, "algorithm unknown"), c) for a, c in _ALGORITHM_COLOURS] + list(_ORIGIN_COLOURS)
    for i, (label, colour) in enumerate(legend):
        lx, ly = left + (i % 5) * 128, 10 + (i // 5) * 22
        parts.append(
            f'<rect x="{lx}" y="{ly}" width="14" height="14" rx="2" fill="{colour}"/>'
            f'<text x="{lx + 20}" y="{ly + 12}" fill="#111827">{_e(label)}</text>'
        )
    for pct in range(0, 101, 20):
        tx = left + plot_w * pct / 100
        parts.append(
            f'<line x1="{tx:.1f}" y1="{legend_h - 6}" x2="{tx:.1f}" y2="{plot_bottom}" '
            f'stroke="{"#6b7280" if pct == 0 else "#e5e7eb"}" stroke-width="1"/>'
            f'<text x="{tx:.1f}" y="{plot_bottom + 17}" text-anchor="middle" fill="#4b5563">{pct}%</text>'
        )
    parts.append(
        f'<text x="{left + plot_w / 2:.1f}" y="{height - 10}" text-anchor="middle" fill="#111827" '
        'font-weight="600">share of the city\'s cards</text>'
    )
    for row, (city, kind, segments) in enumerate(rows):
        y = legend_h + row * row_h + (row_h - bar_h) / 2
        total = sum(n for _, n, _ in segments)
        label = f"{city} · {kind}"
        parts.append(
            f'<text x="{left - 10}" y="{y + bar_h - 4:.1f}" text-anchor="end" fill="#111827">{_e(label)}</text>'
        )
        x = float(left)
        for name, n, colour in segments:
            if not n:
                continue
            w = plot_w * n / total
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{bar_h}" fill="{colour}">'
                f"<title>{_e(label)}: {n:,} {_e(name)} ({_percent(n, total)})</title></rect>"
            )
            if w >= 8 * len(str(n)) + 6:
                parts.append(
                    f'<text x="{x + w / 2:.1f}" y="{y + bar_h - 4:.1f}" text-anchor="middle" fill="#ffffff" '
                    f'font-size="11">{n:,}</text>'
                )
            x += w
    parts.append("</svg>")
    return (
        '<figure class="chart">'
        + "".join(parts)
        + "<figcaption>Per city: its cards by purse algorithm (SM4 is the domestic algorithm the plan asks for) and "
        "by the origin of their chips, as read from each card.</figcaption></figure>"
    )


def _fleet_counts(counter: Counter[str], names: Mapping[str, str] | None = None) -> str:
    return "<br>".join(f"{_e((names or {}).get(k, k) or 'unknown')}: {n:,}" for k, n in sorted(counter.items()))


def _fleet(report: Report) -> str:
    """The fleet view (chip reports): per city the cards by technology, algorithm and chip maker, the shares on
    domestic chips and on SM4, a chart of both, and the cards to replace first."""
    fleet = fleet_view(report.subjects, report.findings)
    if not fleet.total.cards:
        return '<section id="fleet"><h2>Fleet view</h2>' + _none() + "</section>"
    rows = []
    for city, view in [*fleet.cities.items(), ("whole fleet", fleet.total)]:
        rows.append(
            [
                _e(city),
                f"{view.cards:,}",
                _fleet_counts(view.by_tech, _TECH_NAMES),
                _fleet_counts(view.by_algorithm, ALGORITHM_NAMES),
                _fleet_counts(view.by_maker),
                f'<span data-share="domestic-chip">{_percent(view.domestic_chip, view.cards)}</span>',
                f'<span data-share="domestic-algorithm">{_percent(view.domestic_algorithm, view.cards)}</span>',
            ]
        )
    head = ["city", "cards", "technology", "algorithm", "chip maker", "on domestic chips", "on SM4"]
    table = _table(head, rows, frozenset({1, 5, 6}))
    first = [
        [
            f"{i:,}",
            f"<code>{_e(c.subject)}</code>",
            _e(c.city or "no city"),
            _e(ALGORITHM_NAMES.get(c.algorithm, c.algorithm or "unknown")),
            _e(f"{c.maker} ({c.country})" if c.country else c.maker),
            _badge(c.worst) if c.worst is not None else "",
            "none" if c.key_seconds is None else f"{c.key_seconds:.2f}",
        ]
        for i, c in enumerate(fleet.replace_first, 1)
    ]
    replace = (
        _table(["#", "card", "city", "algorithm", "chip maker", "worst", "first key fell, s"], first, frozenset({0, 6}))
        if first
        else _none()
    )
    return (
        '<section id="fleet"><h2>Fleet view: chips and algorithms of domestic origin</h2>'
        + table
        + _fleet_chart(fleet)
        + '<h3 id="replace-first">Cards to replace first</h3>'
        + "<p>Ordered by the worst finding, then by how fast a key fell (0 s: a public dictionary key).</p>"
        + replace
        + "</section>"
    )


def _subject_columns(subjects: Sequence[Mapping[str, object]]) -> list[str]:
    columns = [k for k in ("subject", "tech", "city") if any(k in s for s in subjects)]
    for s in subjects:
        columns.extend(k for k in s if k not in columns)
    return columns


def _by_subject(report: Report) -> list[tuple[str, Mapping[str, object], list[Finding]]]:
    """Cards in audit order (then subjects only findings name), each with its findings, most severe first."""
    found: dict[str, list[Finding]] = {}
    for f in report.findings:
        found.setdefault(f.subject, []).append(f)
    out: list[tuple[str, Mapping[str, object], list[Finding]]] = []
    seen: set[str] = set()
    for s in report.subjects:
        name = _plain(s.get("subject", ""))
        if name in seen:
            continue
        seen.add(name)
        out.append((name, s, found.get(name, [])))
    for name, fs in found.items():
        if name not in seen:
            seen.add(name)
            out.append((name, {"subject": name, "tech": fs[0].tech, "city": fs[0].city}, fs))
    for _, _, fs in out:
        fs.sort(key=lambda f: (-f.severity, f.id))
    return out


def _subject_cell(subject: Mapping[str, object], column: str, card: int) -> str:
    if column not in subject:
        return ""
    value = subject[column]
    if column == "subject":
        return f'<a href="#card-{card}"><code>{_e(value)}</code></a>'
    if column == "tech" and isinstance(value, str):
        return _e(_tech(value))
    return _e(value)


def _cards(report: Report, cards: Sequence[tuple[str, Mapping[str, object], list[Finding]]]) -> str:
    if not report.subjects:
        return '<section id="cards"><h2>Cards audited</h2>' + _none() + "</section>"
    columns = _subject_columns(report.subjects)
    index = {name: i for i, (name, _, _) in enumerate(cards, 1)}
    rows = []
    for s in report.subjects:
        name = _plain(s.get("subject", ""))
        fs = cards[index[name] - 1][2]
        worst = _badge(max(f.severity for f in fs)) if fs else ""
        cells = [_subject_cell(s, c, index[name]) for c in columns]
        rows.append([*cells, f"{len(fs):,}", worst])
    head = [_e(c) for c in columns] + ["findings", "worst"]
    return '<section id="cards"><h2>Cards audited</h2>' + _table(head, rows, frozenset({len(columns)})) + "</section>"


def _finding_article(f: Finding, anchor: str) -> str:
    details = _details(f.details)
    return (
        f'<article class="finding sev-border-{f.severity.label}" id="{anchor}">'
        f'<header>{_badge(f.severity)}<code class="rule">{_e(f.id)}</code><span class="title">{_e(f.title)}</span>'
        "</header>"
        f'<div class="label">Evidence</div><div class="evidence">{_evidence(f.evidence)}</div>'
        + (f'<div class="label">Details</div>{details}' if details else "")
        + f'<div class="label">Remediation</div><p class="remediation">{_e(f.remediation)}</p>'
        "</article>"
    )


def _card_findings(cards: Sequence[tuple[str, Mapping[str, object], list[Finding]]]) -> str:
    if not cards:
        return '<section id="findings"><h2>Findings per card</h2>' + _none() + "</section>"
    parts = ['<section id="findings"><h2>Findings per card</h2>']
    n = 0
    for i, (name, subject, fs) in enumerate(cards, 1):
        meta = " · ".join(
            _e(_tech(v) if k == "tech" and isinstance(v, str) else v)
            for k, v in subject.items()
            if k != "subject" and v not in ("", None)
        )
        worst = _badge(max(f.severity for f in fs)) if fs else ""
        parts.append(
            f'<section class="card" id="card-{i}"><h3><code>{_e(name or "(no subject)")}</code>'
            f'<span class="meta">{meta}</span>{worst}</h3>'
        )
        if not fs:
            parts.append(_none())
        for f in fs:
            n += 1
            parts.append(_finding_article(f, f"finding-{n}"))
        parts.append("</section>")
    parts.append("</section>")
    return "".join(parts)


def _checks(checks: Mapping[str, int]) -> str:
    if not checks:
        return '<section id="checks"><h2>Checks</h2>' + _none() + "</section>"
    rows = []
    for name, count in checks.items():
        status = '<span class="status-ok">ok</span>' if count == 0 else '<span class="status-bad">offending</span>'
        rows.append([_e(name), f"{count:,}" if isinstance(count, int) else _e(count), status])
    return (
        '<section id="checks"><h2>Checks</h2>'
        + _table(["check", "offending items", "status"], rows, frozenset({1}), narrow=True)
        + "</section>"
    )


def _rule_title(rule_id: str, fs: Sequence[Finding]) -> str:
    rule = RECONCILE_RULES.get(rule_id) or CHIP_RULES.get(rule_id)
    return rule.title if rule is not None else fs[0].title


def _rule_groups(findings: Sequence[Finding]) -> str:
    """Findings grouped by rule id, most severe rule first; at most ``FINDINGS_PER_RULE`` rows per rule."""
    if not findings:
        return '<section id="findings"><h2>Findings by rule</h2>' + _none() + "</section>"
    groups: dict[str, list[Finding]] = {}
    for f in findings:
        groups.setdefault(f.id, []).append(f)
    order = sorted(groups, key=lambda r: (-max(f.severity for f in groups[r]), r))
    parts = ['<section id="findings"><h2>Findings by rule</h2>']
    for rule_id in order:
        fs = groups[rule_id]
        worst = max(f.severity for f in fs)
        rows = [
            [
                f"<code>{_e(f.subject)}</code>",
                _e(_tech(f.tech)),
                _e(f.city),
                _evidence(f.evidence, 3),
                _details(f.details),
            ]
            for f in fs[:FINDINGS_PER_RULE]
        ]
        rows_html = _table(["subject", "tech", "city", "evidence", "details"], rows)
        more = len(fs) - FINDINGS_PER_RULE
        note = (
            f'<p class="note more" data-more="{more}">{more:,} more {_e(rule_id)} findings not shown '
            f"(first {FINDINGS_PER_RULE:,} of {len(fs):,}); the JSON report lists them all.</p>"
            if more > 0
            else ""
        )
        remediation = fs[0].remediation
        parts.append(
            f'<details class="group" open id="rule-{_e(rule_id)}"><summary>{_badge(worst)}'
            f"<code>{_e(rule_id)}</code><span>{_e(_rule_title(rule_id, fs))}</span>"
            f'<span class="meta">({_plural(len(fs), "finding")})</span></summary>'
            f'<p class="note">Remediation: {_e(remediation)}</p>{rows_html}{note}</details>'
        )
    parts.append("</section>")
    return "".join(parts)


def _hotlist(hotlist: Sequence[str]) -> str:
    body = (
        '<ul class="hotlist">' + "".join(f"<li><code>{_e(c)}</code></li>" for c in hotlist) + "</ul>"
        if hotlist
        else _none()
    )
    note = f'<p class="note">{len(hotlist):,} cards suspected of cloning or tampering.</p>' if hotlist else ""
    return f'<section id="hotlist"><h2>Cards to hotlist</h2>{note}{body}</section>'


def _pairs_table(pairs: Sequence[object]) -> str:
    dicts = [p for p in pairs if isinstance(p, Mapping)]
    if not dicts:
        return _none()
    columns: list[str] = []
    for p in dicts:
        columns.extend(k for k in p if k not in columns)
    head: list[str] = []
    numeric: set[int] = set()
    for c in columns:
        if c in _MONEY_KEYS:
            numeric.update({len(head), len(head) + 1})
            label = _e(_LABELS.get(c, c.replace("_", " ")))
            head += [f"{label}, fen", f"{label}, yuan"]
        else:
            if c == "records":
                numeric.add(len(head))
            head.append(_e(_LABELS.get(c, c.replace("_", " "))))
    rows = []
    for p in dicts:
        row: list[str] = []
        for c in columns:
            value = p.get(c, "")
            if c in _MONEY_KEYS:
                row.extend(_money(value))
            elif c == "rate":
                row.append(_rate(value))
            elif c == "records" and isinstance(value, int):
                row.append(f"{value:,}")
            else:
                row.append(_e(value))
        rows.append(row)
    return _table(head, rows, frozenset(numeric))


def _positions_table(positions: Mapping[str, object], net_sum: object) -> str:
    rows = []
    total = 0
    for city, value in positions.items():
        fen = _fen(value)
        total += fen or 0
        direction = "" if fen is None else "is owed" if fen > 0 else "owes" if fen < 0 else "even"
        rows.append([_e(city), *_money(value), direction])
    stated = _fen(net_sum)
    net = stated if stated is not None else total
    if total == 0 and net == 0:
        status = '<span class="status-ok">balanced (sum 0)</span>'
    elif net != total:
        status = f'<span class="status-bad">stated sum {net:,} fen, positions add up to {total:,} fen</span>'
    else:
        status = '<span class="status-bad">does not sum to zero</span>'

    fen_cell, yuan_cell = _money(net)
    table = _table(["city", "net, fen", "net, yuan", ""], rows, frozenset({1, 2}), narrow=True)
    foot = f'<tfoot><tr><td>sum</td><td class="num">{fen_cell}</td><td class="num">{yuan_cell}</td><td>{status}</td>'
    return table.replace("</tbody></table>", f"</tbody>{foot}</tr></tfoot></table>")


def _settlement(settlement: Mapping[str, object] | None) -> str:
    if not settlement:
        return '<section id="settlement"><h2>Settlement</h2>' + _none() + "</section>"
    day = settlement.get("day")
    parts = [f'<section id="settlement"><h2>Settlement{f" — {_e(day)}" if day else ""}</h2>']
    parts.append('<p class="note">All amounts are integer fen; yuan = fen / 100.</p>')
    pairs = settlement.get("pairs", settlement.get("lines"))
    parts.append("<h3>What each issuer owes each acquirer</h3>")
    parts.append(_pairs_table(pairs) if isinstance(pairs, Sequence) and pairs else _none())
    positions = settlement.get("positions")
    parts.append("<h3>Net positions</h3>")
    if isinstance(positions, Mapping) and positions:
        parts.append(_positions_table(positions, settlement.get("net_sum")))
    else:
        parts.append(_none())
    unsettled = settlement.get("unsettled")
    parts.append("<h3>Records left out (by forward status)</h3>")
    if isinstance(unsettled, Mapping) and unsettled:
        parts.append(
            _table(["status", "records"], [[_e(k), _e(v)] for k, v in unsettled.items()], frozenset({1}), narrow=True)
        )
    else:
        parts.append(_none())
    hotlisted = settlement.get("hotlisted")
    parts.append("<h3>Records of hotlisted cards (who bears them)</h3>")
    parts.append(_hotlisted_table(hotlisted, settlement.get("hotlist_versions")))
    known = {"schema", "day", "pairs", "lines", "positions", "net_sum", "unsettled", "hotlisted", "hotlist_versions"}
    extra = {k: v for k, v in settlement.items() if k not in known}
    if extra:
        parts.append("<h3>Other</h3>" + _details(extra))
    parts.append("</section>")
    return "".join(parts)


def _hotlisted_table(records: object, versions: object) -> str:
    """Each record of a card on its issuer's hotlist: the list version, its publish time, the pair's grace and
    who bears the record (the acquirer when it was taken after publish time + grace)."""
    note = ""
    if isinstance(versions, Mapping) and versions:
        known = ", ".join(f"{_e(c)} v{_e(v)}" if v else f"{_e(c)} none" for c, v in versions.items())
        note = f'<p class="note">Issuers\' hotlists the settlement knew: {known}.</p>'
    rows = []
    for x in records if isinstance(records, Sequence) else []:
        if not isinstance(x, Mapping):
            continue
        liable = x.get("liable")
        who = f"<strong>{_e(liable)}</strong>" if liable == "acquirer" else _e(liable)
        published = x.get("published")
        rows.append(
            [
                f"<code>{_e(x.get('record_id'))}</code>",
                _e(x.get("acquirer")),
                _e(x.get("issuer")),
                _e(x.get("time")),
                *_money(x.get("amount")),
                _e(x.get("version")),
                _e(published) if published else "never published",
                _e(x.get("grace_seconds")),
                who,
            ]
        )
    if not rows:
        return note + _none()
    head = ["record", "acquirer", "issuer", "time", "amount, fen", "amount, yuan", "list version", "published"]
    return note + _table([*head, "grace, s", "liable"], rows, frozenset({4, 5, 6, 8}))


def _skipped(skipped: Sequence[str]) -> str:
    body = '<ul class="plain">' + "".join(f"<li>{_e(s)}</li>" for s in skipped) + "</ul>" if skipped else _none()
    return f'<section id="skipped"><h2>Probes skipped</h2>{body}</section>'


def _main(report: Report, title: str, prefix: str = "") -> str:
    """One report's ``<main>``: header, table of contents and its sections."""
    sections: list[tuple[str, str, str]] = [("summary", "Summary", _summary(report))]
    chart = '<section id="chart"><h2>Findings by technology and city</h2>' + _chart(report.findings) + "</section>"
    if report.kind == "reconcile":
        sections += [
            ("checks", "Checks", _checks(report.checks)),
            ("chart", "Chart", chart),
            ("findings", "Findings", _rule_groups(report.findings)),
            ("hotlist", "Hotlist", _hotlist(report.hotlist)),
            ("settlement", "Settlement", _settlement(report.settlement)),
        ]
    else:
        cards = _by_subject(report)
        sections += [
            ("chart", "Chart", chart),
            ("fleet", "Fleet view", _fleet(report)),
            ("cards", "Cards", _cards(report, cards)),
            ("findings", "Findings", _card_findings(cards)),
        ]
        if report.checks:
            sections.append(("checks", "Checks", _checks(report.checks)))
        if report.settlement:
            sections.append(("settlement", "Settlement", _settlement(report.settlement)))
    sections.append(("skipped", "Skipped", _skipped(report.skipped)))
    if prefix:  # two reports on one page: their anchors must differ
        sections = [
            (prefix + anchor, name, body.replace(f'id="{anchor}"', f'id="{prefix}{anchor}"', 1))
            for anchor, name, body in sections
        ]
    return (
        f'<main data-kind="{_e(report.kind)}">'
        + _header(report, title)
        + _toc([(anchor, name) for anchor, name, _ in sections])
        + "".join(body for _, _, body in sections)
        + "</main>"
    )


def _page(title: str, mains: Sequence[str], generated: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<meta name="generator" content="{_e(TOOL)}">'
        f"<title>{_e(title)}</title><style>{_css()}</style></head><body>"
        + "".join(mains)
        + f"<footer>Generated {_e(generated)} by {_e(TOOL)}. Severities: "
        + ", ".join(s.label for s in _ORDER)
        + ". Machine-readable findings: the JSON report (yikatong.audit-report/1).</footer>"
        "</body></html>\n"
    )


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page (inline CSS and SVG, no script, no external resource)."""
    title = TITLES.get(report.kind, f"Audit report: {report.kind}")
    return _page(title, [_main(report, title)], report.generated)


def render_combined(title: str, reports: Sequence[Report]) -> str:
    """Several reports on one self-contained page (the demo's chip audit and reconciliation), one after the other."""
    mains = [_main(r, TITLES.get(r.kind, f"Audit report: {r.kind}"), f"{r.kind}-") for r in reports]
    return _page(title, mains, reports[0].generated if reports else "")
