"""The HTML audit report (audit/html.py): structure, escaping, money and the per-rule truncation in pure Python,
then the page as headless Chromium renders it (counts per severity, evidence never becomes markup, nothing loaded
from outside).

Chromium is one of the apt packages of scripts/setup.sh: a missing browser fails the browser tests, like the
PC/SC and PostgreSQL tests (never a skip that would hide a broken report).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest

from audit.findings import Finding, Report, finding
from audit.html import FINDINGS_PER_RULE, format_yuan, render_html

INJECTED = '<script>alert("pwned")</script> & <img src="https://evil.example/x.png"> & more'
SEVERITIES = ("critical", "high", "medium", "low", "info", "pass")
CHIPS_EXPECTED = {"critical": 3, "high": 3, "medium": 2, "low": 0, "info": 1, "pass": 1}
RECONCILE_EXPECTED = {"critical": 251, "high": 3, "medium": 2, "low": 0, "info": 0, "pass": 0}
SETTLEMENT = {
    "schema": "yikatong.settlement/1",
    "day": "2026-11-24",
    "pairs": [
        {
            "acquirer": "4510",
            "issuer": "4560",
            "records": 300,
            "gross": 60000,
            "fee": 300,
            "rate": "0.005",
            "issuer_owes_acquirer": 59700,
        },
        {
            "acquirer": "4560",
            "issuer": "4510",
            "records": 7,
            "gross": 1405,
            "fee": 7,
            "rate": "0.005",
            "issuer_owes_acquirer": 1398,
        },
        {
            "acquirer": "4530",
            "issuer": "4510",
            "records": 1,
            "gross": 5,
            "fee": 0,
            "rate": "0.005",
            "issuer_owes_acquirer": 5,
        },
    ],
    "positions": {"4510": 58297, "4560": -58302, "4530": 5},
    "net_sum": 0,
    "unsettled": {"pending": 2},
}


def chip_report() -> Report:
    """Three cards with findings of five severities; one evidence line tries to inject markup."""
    apdus = [f">> 80 5C 00 02 04  << 00 00 13 88 90 00  (read {i})" for i in range(40)]
    findings = [
        finding("M1-CRYPTO1", "04A1B2C3", "m1", "4530", ["ATQA 0004 SAK 08"]),
        finding("M1-DEFAULT-KEY", "04A1B2C3", "m1", "4530", ["sector 0 key A FFFFFFFFFFFF", INJECTED]),
        finding(
            "M1-KEY-RECOVERED",
            "04A1B2C3",
            "m1",
            "4530",
            ["nested from block 3", "nT 82A4166C nR A1E458CE aR 6EEA41E0"],
            key="A0A1A2A3A4A5",
            seconds=0.42,
        ),
        finding("M1-WEAK-PRNG", "04A1B2C3", "m1", "4530", ["nonce distance 160"]),
        finding("M1-VALUE-BLOCK", "04A1B2C3", "m1", "4530", ["block 4 value != ~value"]),
        finding("CPU-REPLAY", "4560000000000002", "cpu", "4560", apdus),
        finding("CPU-NO-LOCKOUT", "4560000000000002", "cpu", "4560", ["20 wrong MAC1, SW 9302 each time"]),
        finding("CPU-SINGLE-DES", "4560000000000002", "cpu", "4560", ["algorithm id 00"]),
        finding("CPU-3DES", "4560000000000002", "cpu", "4560", ["algorithm id 01"]),
        finding("CPU-SM4", "4510000000000001", "cpu", "4510", ["algorithm id 04"]),
    ]
    subjects = [
        {"subject": "4510000000000001", "tech": "cpu", "city": "4510", "algorithm": "sm4"},
        {"subject": "4560000000000002", "tech": "cpu", "city": "4560", "algorithm": "3des"},
        {"subject": "04A1B2C3", "tech": "m1", "city": "4530", "profile": "genuine"},
    ]
    return Report(
        kind="chips",
        inputs=["card-4510.json", "m1 & <friends>.json"],
        findings=findings,
        subjects=subjects,
        skipped=["CPU-TEARING on 04A1B2C3: not a CPU card"],
        settlement=SETTLEMENT,
        generated="2026-11-24T08:00:00+00:00",
    )


def reconcile_report() -> Report:
    """250 TAC failures (more than one page of a rule), a few of other rules, a hotlist and a settlement."""
    findings: list[Finding] = [
        finding("REC-TAC", f"TAC-{i:04d}", "cpu", "4560", [f"record 4560-{i} tac 0BADF00D"]) for i in range(1, 251)
    ]
    findings += [finding("REC-MISSING", f"MISS-{i}", "cpu", "4510", ["acquirer side only"]) for i in range(3)]
    findings += [finding("REC-DUPLICATE", f"DUP-{i}", "m1", "4530", ["twice in 4530"]) for i in range(2)]
    findings.append(finding("REC-IMPOSSIBLE-TRAVEL", "04A1B2C3", "m1", "4530", [INJECTED], minutes=3))
    return Report(
        kind="reconcile",
        inputs=["sqlite:///clearing-4510.sqlite", "sqlite:///clearing-4560.sqlite"],
        findings=findings,
        subjects=[{"subject": "4510"}, {"subject": "4560"}, {"subject": "4530"}],
        checks={"missing": 3, "duplicated": 2, "tac": 250, "balance": 0},
        settlement=SETTLEMENT,
        hotlist=["04A1B2C3", '<img src="https://evil.example/y.png">'],
        generated="2026-11-24T09:00:00+00:00",
    )


class Dom(HTMLParser):
    """The elements (tag and attributes), all text, and the text and data-count of the count cells."""

    def __init__(self, page: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.counts: dict[str, tuple[str, str]] = {}  # severity -> (data-count, cell text)
        self._cell: str | None = None
        self.feed(page)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.elements.append((tag, attributes))
        ident = attributes.get("id") or ""
        if ident.startswith("count-"):
            self._cell = ident.removeprefix("count-")
            self.counts[self._cell] = (attributes.get("data-count") or "", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._cell is not None:
            count, text = self.counts[self._cell]
            self.counts[self._cell] = (count, text + data.strip())

    def tags(self) -> Counter[str]:
        """How many elements of each tag."""
        return Counter(tag for tag, _ in self.elements)

    def ids(self) -> set[str]:
        """Every element id."""
        return {a["id"] or "" for _, a in self.elements if "id" in a}

    def external(self) -> list[str]:
        """src/href/xlink:href values that point outside the page."""
        return [
            value
            for _, attrs in self.elements
            for name, value in attrs.items()
            if name in {"src", "href", "xlink:href", "srcset", "action", "poster", "data"}
            and value is not None
            and value.strip().lower().startswith(("http:", "https:", "//", "ftp:"))
        ]


def assert_counts(dom: Dom, expected: dict[str, int]) -> None:
    """Each severity's count cell holds the expected number, in its text and in data-count."""
    for label in SEVERITIES:
        assert dom.counts[label] == (str(expected[label]), str(expected[label])), label
    total = str(sum(expected.values()))
    assert dom.counts["total"] == (total, total)


def assert_inert(dom: Dom) -> None:
    """Injected markup stayed text; nothing refers to a resource outside the page."""
    tags = dom.tags()
    assert tags["script"] == 0
    assert tags["img"] == 0
    assert tags["link"] == 0
    assert dom.external() == []
    text = "".join(dom.text)
    assert '<script>alert("pwned")</script> & <img src="https://evil.example/x.png"> & more' in text


# --- pure Python -------------------------------------------------------------------------------------------


def test_chip_report_structure() -> None:
    page = render_html(chip_report())
    dom = Dom(page)
    assert page.startswith("<!doctype html>")
    assert "<title>Chip security audit</title>" in page
    assert_counts(dom, CHIPS_EXPECTED)
    assert {"summary", "chart", "fleet", "cards", "findings", "skipped", "settlement"} <= dom.ids()
    assert {"card-1", "card-2", "card-3"} <= dom.ids()
    assert "2026-11-24T08:00:00+00:00" in page
    assert "m1 &amp; &lt;friends&gt;.json" in page  # inputs escaped too
    # the cards table: every key of every subject is a column
    cards = Dom(page[page.index('<section id="cards">') :])
    headers = [data for data in cards.text if data in {"subject", "tech", "city", "algorithm", "profile"}]
    assert headers[:5] == ["subject", "tech", "city", "algorithm", "profile"]
    # a recovered key and its time are shown; long APDU evidence folds into <details>
    assert "A0A1A2A3A4A5" in page and "0.42" in page
    assert "34 more lines" in page
    assert dom.tags()["details"] >= 1
    # the chart: inline SVG with a bar per technology and city, a legend and axis labels (the second: the fleet view)
    assert dom.tags()["svg"] == 2
    for label in ("CPU · 4510", "CPU · 4560", "M1 · 4530", "number of findings", "technology · city"):
        assert label in dom.text
    assert "CPU-TEARING on 04A1B2C3: not a CPU card" in page


def test_evidence_is_escaped() -> None:
    for report in (chip_report(), reconcile_report()):
        page = render_html(report)
        assert "<script" not in page.lower()
        assert "<img" not in page.lower()
        assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt; &amp; &lt;img" in page
        assert_inert(Dom(page))


def test_no_external_resources() -> None:
    report = chip_report()
    report.findings = [f for f in report.findings if INJECTED not in f.evidence]
    page = render_html(report)
    assert "http://" not in page and "https://" not in page
    assert "url(" not in page and "@import" not in page
    assert Dom(page).external() == []


def test_reconcile_truncates_per_rule() -> None:
    page = render_html(reconcile_report())
    dom = Dom(page)
    assert "<title>Inter-city reconciliation</title>" in page
    assert_counts(dom, RECONCILE_EXPECTED)
    assert FINDINGS_PER_RULE == 200
    assert "TAC-0200" in page and "TAC-0201" not in page
    more = 250 - FINDINGS_PER_RULE
    assert f"{more} more REC-TAC findings not shown" in page
    assert [a.get("data-more") for _, a in dom.elements if "data-more" in a] == [str(more)]  # only REC-TAC
    for ident in ("checks", "findings", "hotlist", "settlement", "rule-REC-TAC", "rule-REC-MISSING"):
        assert ident in dom.ids()
    assert "tac" in dom.text and "250" in dom.text  # checks table
    assert "04A1B2C3" in dom.text  # hotlist


def test_settlement_in_fen_and_yuan() -> None:
    dom = Dom(render_html(reconcile_report()))
    for cell in ("60,000", "600.00", "597.00", "59,700", "14.05", "0.05", "582.97", "-583.02", "-58,302"):
        assert cell in dom.text, cell
    assert "0.005 (0.5 %)" in dom.text
    assert "balanced (sum 0)" in dom.text
    assert format_yuan(0) == "0.00"
    assert format_yuan(5) == "0.05"
    assert format_yuan(-5) == "-0.05"
    assert format_yuan(-100) == "-1.00"
    assert format_yuan(123456789) == "1,234,567.89"
    assert format_yuan(10**20 + 1) == "1,000,000,000,000,000,000.01"  # integers: no float rounding


def test_unbalanced_settlement_is_flagged() -> None:
    report = reconcile_report()
    report.settlement = {**SETTLEMENT, "positions": {"4510": 10, "4560": -9}, "net_sum": 1}
    assert "does not sum to zero" in render_html(report)


def test_empty_sections_say_none() -> None:
    for kind, sections in (
        ("chips", ("chart", "fleet", "cards", "findings", "skipped")),
        ("reconcile", ("checks", "chart", "findings", "hotlist", "settlement", "skipped")),
    ):
        page = render_html(Report(kind=kind, inputs=[]))
        assert_counts(Dom(page), dict.fromkeys(SEVERITIES, 0))
        for section in sections:
            start = page.index(f'<section id="{section}">')
            end = page.index("</section>", start)
            assert '<p class="none">none</p>' in page[start:end], (kind, section)


# --- headless Chromium -------------------------------------------------------------------------------------


def chromium() -> str:
    """The Chromium executable; the test fails when it is missing (scripts/setup.sh installs it)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    message = "chromium not installed: run scripts/setup.sh (Debian package chromium)"
    pytest.fail(message)


def run_chromium(tmp_path: Path, page: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium on ``page`` with a throw-away profile; the process must succeed."""
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *options,
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.browser
@pytest.mark.parametrize(
    ("build", "expected"),
    [(chip_report, CHIPS_EXPECTED), (reconcile_report, RECONCILE_EXPECTED)],
    ids=["chips", "reconcile"],
)
def test_chromium_renders_counts_and_no_injected_script(
    tmp_path: Path, build: Callable[[], Report], expected: dict[str, int]
) -> None:
    report = build()
    page = tmp_path / "report.html"
    page.write_text(render_html(report), encoding="utf-8")
    dom = Dom(run_chromium(tmp_path, page, "--dump-dom").stdout)
    assert dom.tags()["main"] == 1, "Chromium did not dump the rendered page"
    assert_counts(dom, expected)
    assert_inert(dom)
    assert dom.tags()["svg"] == (2 if report.kind == "chips" else 1)  # the charts survived parsing (chips: fleet view)
    assert dom.tags()["rect"] > 6


@pytest.mark.browser
def test_chromium_screenshot(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text(render_html(chip_report()), encoding="utf-8")
    shot = tmp_path / "report.png"
    run_chromium(tmp_path, page, f"--screenshot={shot}", "--window-size=1280,2400", "--hide-scrollbars")
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = int.from_bytes(data[16:20]), int.from_bytes(data[20:24])
    assert (width, height) == (1280, 2400)
    assert len(data) > 20_000  # a page with text and a chart, not a blank canvas
