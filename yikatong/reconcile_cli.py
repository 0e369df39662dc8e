"""``yikatong audit reconcile``: reconcile the cities' ledgers (clearing databases or daily clearing files),
check TACs and the day's settlement, write the JSON and HTML reports, exit by --fail-on."""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from yikatong.argtypes import Subcommands, database_url, file_path, load_keys, positive
from yikatong.audit_output import add_report_options, finish
from yikatong.demo import DEFAULT_KEYS as DEMO_KEYS
from yikatong.errors import CliError

# the readers and the reconciliation (NumPy, pyarrow, SQLAlchemy) are imported when the command runs
if TYPE_CHECKING:
    from audit.findings import Report
    from audit.reconcile import CityLedger, HotlistEntry

_HOLDER = re.compile(r"([0-9]{4})=(.+)")


def register(sub: Subcommands) -> None:
    """Add ``reconcile`` to the ``audit`` subcommands."""
    parser = sub.add_parser(
        "reconcile",
        help="reconcile the cities' ledgers: missing, duplicate and conflicting records, counters, balances, "
        "TACs, clones, settlement",
        description=textwrap.fill(
            "Reconcile the ledgers of the cities, read from clearing databases (--db, every city in it) "
            "or from daily clearing files (CSV as 'clearing settle' writes them; the holder city of a file is its "
            "acquirer column, or CITY=FILE for a city's issuer-side file). Checks: records missing on the acquirer "
            "or issuer side, duplicates, conflicts, counter gaps and repeats, balance continuity, TACs (issuer "
            "keys), M1 value-block tampering, impossible travel, and the day's settlement (--settlement; who bears "
            "each record of a hotlisted card: the issuers' lists from --hotlists or --db). Suspected "
            "clones make the report's hotlist. Exit 0, 1 when a finding at or above --fail-on exists, 2 on bad input "
            "(nothing written).",
            width=100,
        ),
        epilog="Examples:\n"
        "  yikatong audit reconcile --db sqlite:///clearing.sqlite --settlement settlement-2026-11-24.json\n"
        "  yikatong audit reconcile clearing-4510-2026-11-24.csv clearing-4560-2026-11-24.csv \\\n"
        "      4510=issuer-4510-2026-11-24.csv --no-tac --fail-on critical",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("files", nargs="*", metavar="FILE|CITY=FILE", help="daily clearing files (CSV)")
    parser.add_argument(
        "--db",
        type=database_url,
        action="append",
        default=[],
        metavar="URL",
        help="clearing database, sqlite:///FILE or postgresql+asyncpg://user@host/db (repeatable)",
    )
    parser.add_argument("--settlement", type=file_path, metavar="FILE", help="settlement-DAY.json to check")
    parser.add_argument(
        "--hotlists",
        type=file_path,
        action="append",
        default=[],
        metavar="FILE",
        help="the issuers' hotlists (CSV: issuer,card,version,published) for who bears a record of a hotlisted "
        "card; the hotlist tables of each --db are read too (repeatable)",
    )
    parser.add_argument("--day", type=_day, help="only records of this settlement day, YYYY-MM-DD")
    parser.add_argument(
        "--keys",
        type=file_path,
        help=f"issuer key file (default: the published TEST keys; the demo's cards use fixtures/{DEMO_KEYS})",
    )
    parser.add_argument("--no-tac", action="store_true", help="do not verify TACs (the structural checks only)")
    parser.add_argument(
        "--jobs",
        type=positive,
        default=os.cpu_count() or 1,
        help="processes verifying TACs (default: one per CPU, %(default)s)",
    )
    add_report_options(parser, "reconcile")
    parser.set_defaults(run=_reconcile)


def _day(text: str) -> str:
    from audit.reconcile import day_number

    try:
        day_number(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day like 2026-11-24") from None
    return text


def read_ledgers(files: Sequence[str], databases: Sequence[str], day: str | None = None) -> list[CityLedger]:
    """The ledgers of files (``FILE`` or ``CITY=FILE``) and databases; CliError naming a bad input."""
    from audit.ledger_sources import LedgerInputError, read_clearing_file, read_database

    ledgers = []
    try:
        for arg in files:
            named = _HOLDER.fullmatch(arg)
            path, holder = (Path(named[2]), named[1]) if named else (Path(arg), None)
            ledgers.append(read_clearing_file(path, holder))
        for url in databases:
            ledgers += read_database(url, day)
    except LedgerInputError as err:
        raise CliError(str(err)) from err
    return ledgers


def read_hotlists(files: Sequence[Path], databases: Sequence[str]) -> dict[tuple[str, str], HotlistEntry] | None:
    """The issuers' hotlists from hotlist files and the databases' hotlist tables; None when neither is given
    (reconcile then judges the settlement file's own list of hotlisted records); CliError naming a bad input."""
    from audit.ledger_sources import LedgerInputError, merge_hotlists, read_database_hotlists, read_hotlist_file

    if not files and not databases:
        return None
    try:
        parts = [(str(path), read_hotlist_file(path)) for path in files]
        parts += [(f"database {url}", read_database_hotlists(url)) for url in databases]
        return merge_hotlists(parts)
    except LedgerInputError as err:
        raise CliError(str(err)) from err


def _reconcile(args: argparse.Namespace) -> int:
    from audit.ledger_sources import LedgerInputError, read_cities, read_settlement
    from audit.reconcile import Options, reconcile
    from cardsim.keys import TEST_KEYS_FIXTURE

    if not args.files and not args.db:
        raise CliError("nothing to reconcile: give daily clearing files (FILE or CITY=FILE) or --db URL")
    keys = None if args.no_tac else load_keys(args.keys)
    try:
        cities = read_cities()
        claimed = read_settlement(args.settlement) if args.settlement else None
    except LedgerInputError as err:
        raise CliError(str(err)) from err
    if claimed and args.day and claimed.day != args.day:
        raise CliError(f"--day {args.day} but {args.settlement} settles {claimed.day}")
    ledgers = read_ledgers(args.files, args.db, args.day)
    key_file = str(args.keys) if args.keys else f"fixtures/{TEST_KEYS_FIXTURE} (the default: the published test keys)"
    hint = f"the demo's cards use fixtures/{DEMO_KEYS}; pass --keys"
    hotlists = read_hotlists(args.hotlists, args.db)
    options = Options(cities, keys, claimed, args.day, args.jobs, key_file=key_file, key_hint=hint, hotlists=hotlists)
    report = reconcile(ledgers, options)
    for wrong in report.findings:
        if wrong.id == "REC-TAC-KEYS":
            print(f"yikatong: warning: {wrong.evidence[0]}", file=sys.stderr)
    _print_summary(report)
    return finish(report, args)


def _print_summary(report: Report) -> None:
    records = [s["records"] for s in report.subjects]  # each city's row count
    rows = sum(n for n in records if isinstance(n, int))
    cities = ", ".join(f"{s['city']} {s['name']} {s['records']:,}".replace("  ", " ") for s in report.subjects)
    print(f"reconciled {rows:,} ledger rows of {len(report.subjects)} cities ({cities})")
    print("checks: " + ", ".join(f"{rule} {n}" for rule, n in report.checks.items()))
    for note in report.skipped:
        print(f"not checked: {note}")
    if report.settlement is not None:
        positions = ", ".join(f"{c} {n:+,}" for c, n in report.settlement["positions"].items())
        print(f"settlement {report.settlement['day']} from the records: {positions or 'nothing to settle'}")
        hotlisted = report.settlement["hotlisted"]
        if hotlisted:
            bears = {
                side: sum(x["amount"] for x in hotlisted if x["liable"] == side) for side in ("issuer", "acquirer")
            }
            print(
                f"records of hotlisted cards: {len(hotlisted):,}; the issuers bear {bears['issuer']:,} fen, "
                f"the acquirers {bears['acquirer']:,} fen"
            )
    print(f"hotlist ({len(report.hotlist)}): {' '.join(report.hotlist) or '-'}")
