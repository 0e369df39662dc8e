"""Report options and output shared by ``audit chips`` and ``audit reconcile``: JSON and HTML files written
atomically at the end (never half-written), a summary on stdout, and the exit code from ``--fail-on``."""

from __future__ import annotations

import argparse
from pathlib import Path

from audit.findings import Report, Severity
from yikatong.argtypes import file_path
from yikatong.errors import CliError


def _severity(text: str) -> Severity:
    try:
        return Severity.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_report_options(parser: argparse.ArgumentParser, kind: str) -> None:
    """--json, --html and --fail-on, with defaults named after the job (audit-chips.json, ...)."""
    parser.add_argument(
        "--json", type=file_path, default=Path(f"audit-{kind}.json"), help="JSON report to write (default %(default)s)"
    )
    parser.add_argument(
        "--html",
        type=file_path,
        default=Path(f"audit-{kind}.html"),
        help="self-contained HTML report to write (default %(default)s)",
    )
    parser.add_argument(
        "--fail-on",
        type=_severity,
        default=Severity.HIGH,
        metavar="SEVERITY",
        help="exit 1 when a finding at or above this severity exists: pass, info, low, medium, high, critical "
        "(default high)",
    )


def finish(report: Report, args: argparse.Namespace) -> int:
    """Write both reports, print the counts by severity and where the reports are; the exit code."""
    from audit.html import render_html
    from cardsim.files import write_text_atomic
    from cardsim.image import write_json_atomic

    json_path: Path = args.json  # the options add_report_options added
    html_path: Path = args.html
    fail_on: Severity = args.fail_on
    try:
        for path in (json_path, html_path):
            path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(json_path, report.to_json())
        write_text_atomic(html_path, render_html(report))
    except OSError as err:
        raise CliError(f"cannot write the reports: {err}") from err
    counts = report.counts()
    print("findings by severity: " + ", ".join(f"{label} {n}" for label, n in counts.items()))
    print(f"reports: {json_path} {html_path}")
    code = report.exit_code(fail_on)
    if code:
        print(f"exit 1: findings at or above {fail_on.label}")
    return code
