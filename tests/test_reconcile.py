"""`yikatong audit reconcile`: the planted fixture gives exactly the planted findings; clean ledgers give none;
ledgers read from real clearing databases (SQLite, PostgreSQL) built by the clearing itself; exit codes
0/1/2; bad input named by file and line with nothing written; the clearing-file parser under fuzzing."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clearing_support import HOST, fresh_db, signed_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray
from reconcile_fixture import DAY, HOTLIST_GRACE, Fixture, write_fixture
from sqlalchemy import select

from audit.findings import RECONCILE_RULES
from audit.ledger_sources import (
    LedgerInputError,
    read_cities,
    read_clearing_file,
    read_hotlist_file,
    read_settlement,
    write_hotlist_file,
)
from audit.reconcile import BadValue, Cities, Options, Records, instants, reconcile
from cardsim.keys import TEST_KEYS_FIXTURE, IssuerKeyStore
from cardsim.resources import fixture_path
from clearing.db import migrate, open_engine
from clearing.intake import Intake, Topic
from clearing.ledger import Ledger, Received
from clearing.schema import HOTLIST, HOTLIST_VERSION, LEDGER
from clearing.settlement import CSV_HEADER, DEBIT_KINDS, settle
from terminals.messages import TxnRecord, batch_payload, interop_txn_topic, txn_topic
from yikatong.cli import main
from yikatong.reconcile_cli import read_ledgers

BENCH = Path(__file__).parents[1] / "bench" / "reconcile_bench.py"
FLEET_KEYS = "keys/fleet-keys.json"  # the demo's issuer keys


def reconcile_cli(*args: str, out: Path) -> tuple[int, dict[str, Any] | None]:
    """Run the command in this process; its exit code and the JSON report (None when none was written)."""
    report, page = out / "report.json", out / "report.html"
    code = main(["audit", "reconcile", *args, "--json", str(report), "--html", str(page)])
    assert report.exists() == page.exists()
    return code, json.loads(report.read_text()) if report.exists() else None


def found(report: dict[str, Any]) -> set[tuple[str, str]]:
    return {(f["id"], f["subject"]) for f in report["findings"]}


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return write_fixture(tmp_path_factory.mktemp("planted"), seed=7)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return write_fixture(tmp_path_factory.mktemp("clean"), seed=7, plant=False)


# --- the planted fixture --------------------------------------------------------------------------------


def test_the_fixture_plants_every_kind_of_problem(planted: Fixture) -> None:
    # a wrong key file is a problem of the audit's inputs, not of the ledgers: the key-file tests below give it
    assert {rule for rule, _ in planted.expected} == set(RECONCILE_RULES) - {"REC-TAC-KEYS"}


def test_planted_findings_are_reported_exactly(planted: Fixture, tmp_path: Path) -> None:
    code, report = reconcile_cli(*planted.inputs, "--settlement", str(planted.settlement), out=tmp_path)
    assert report is not None and code == 1
    assert found(report) == planted.expected
    assert report["hotlist"] == planted.hotlist
    assert report["checks"] == {rule: sum(r == rule for r, _ in planted.expected) for rule in RECONCILE_RULES}
    assert report["kind"] == "reconcile" and report["skipped"] == []
    assert report["settlement"]["net_sum"] == 0 and report["settlement"]["unsettled"] == {"missing at issuer": 1}
    # the recomputed Yantai position is what the tampered file says, less the 100 fen planted
    claimed = json.loads(planted.settlement.read_text())["positions"]
    assert report["settlement"]["positions"] == {**claimed, "4560": claimed["4560"] - 100}
    evidence = {(f["id"], f["subject"]): " ".join(f["evidence"]) for f in report["findings"]}
    assert all(".csv line " in text for (rule, _), text in evidence.items() if rule != "REC-SETTLEMENT")


def test_engine_gives_the_same_findings_with_tac_checks_in_worker_processes(planted: Fixture) -> None:
    ledgers = read_ledgers(planted.inputs, [])
    keys = IssuerKeyStore.test_set()
    one = reconcile(ledgers, Options(read_cities(), keys))
    for jobs in (2, 7):  # forked parts end at a change of card; with 7, some are empty
        many = reconcile(ledgers, Options(read_cities(), keys, jobs=jobs, min_parallel=0))
        assert [f.to_json() for f in one.findings] == [f.to_json() for f in many.findings]
        assert one.skipped == many.skipped
    assert {(f.id, f.subject) for f in one.findings} == {x for x in planted.expected if x[0] != "REC-SETTLEMENT"}


def test_reconcile_leaves_numpys_huge_page_switch_as_it_found_it(planted: Fixture) -> None:
    """reconcile runs on 4 KB pages (huge pages cost their zeroing, and whole copies after the TAC workers
    fork), then sets numpy's switch back."""
    switch = np._core.multiarray._set_madvise_hugepage
    ledgers = read_ledgers(planted.inputs, [])
    for setting in (True, False):
        switch(setting)
        reconcile(ledgers, Options(read_cities(), IssuerKeyStore.test_set(), jobs=2, min_parallel=0))
        assert switch(True) is setting


def test_without_travel_times_no_travel_is_judged_and_the_report_says_so(planted: Fixture) -> None:
    report = reconcile(read_ledgers(planted.inputs, []), Options(Cities(), None))
    assert "REC-IMPOSSIBLE-TRAVEL" not in {f.id for f in report.findings}
    assert any(note.startswith("travel time between 4510-4560 unknown") for note in report.skipped)


def test_no_tac_leaves_out_only_the_tac_findings(planted: Fixture, tmp_path: Path) -> None:
    code, report = reconcile_cli(*planted.inputs, "--no-tac", out=tmp_path)
    assert report is not None and code == 1
    assert found(report) == {x for x in planted.expected if x[0] not in ("REC-TAC", "REC-SETTLEMENT")}
    assert report["skipped"] == ["TAC verification not run (--no-tac)"]


def _zeroed_keys(folder: Path, cities: tuple[str, ...]) -> Path:
    """The published test key file with the TAC and purchase (M1 record MAC) masters of ``cities`` replaced: no
    TAC of their cards verifies with it."""
    doc = json.loads(fixture_path(TEST_KEYS_FIXTURE).read_text())
    for entry in doc["issuers"]:
        if entry["city"] in cities:
            entry["tac"] = entry["purchase"] = "00" * 16
    path = folder / "other-keys.json"
    path.write_text(json.dumps(doc))
    return path


def _versions_of(inputs: list[str]) -> Counter[str]:
    """Distinct record versions (rows of different content) per card issuer in clearing files: the TACs checked."""
    rows = {line for arg in inputs for line in Path(arg.split("=")[-1]).read_text().splitlines()[1:]}
    return Counter(line.split(",")[CSV_HEADER.index("issuer")] for line in rows)


def _tac_findings(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [f for f in report["findings"] if f["id"] in ("REC-TAC", "REC-TAC-KEYS")]


def test_records_signed_with_other_keys_give_one_finding_per_issuer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The demo's case: cards personalised from fixtures/keys/fleet-keys.json, reconciled with the default key file
    (the published test keys). One finding per issuer says so, instead of one per record, and no card is
    hotlisted for it."""
    fleet = write_fixture(tmp_path / "fleet", seed=7, plant=False, keys=IssuerKeyStore.load(fixture_path(FLEET_KEYS)))
    code, report = reconcile_cli(*fleet.inputs, out=tmp_path)
    assert report is not None and code == 1
    versions = _versions_of(fleet.inputs)
    assert {(f["id"], f["subject"]) for f in _tac_findings(report)} == {("REC-TAC-KEYS", c) for c in versions}
    assert report["checks"]["REC-TAC"] == 0 and report["checks"]["REC-TAC-KEYS"] == 3
    assert report["hotlist"] == [] and {f["id"] for f in report["findings"]} == {"REC-TAC-KEYS"}
    err = capsys.readouterr().err
    for f in report["findings"]:
        issuer, count = f["subject"], versions[f["subject"]]
        assert (f["severity"], f["city"], f["details"]["records"]) == ("high", issuer, count)
        assert len(f["details"]["samples"]) == 5 and all(x.startswith(f"{issuer}-") for x in f["details"]["samples"])
        text = " ".join(f["evidence"])
        hint = (
            f"none of the {count} TACs of issuer {issuer} verifies with the keys in fixtures/{TEST_KEYS_FIXTURE} "
            f"(the default: the published test keys): wrong key file? (the demo's cards use fixtures/{FLEET_KEYS}; "
            "pass --keys)"
        )
        assert f["evidence"][0] == hint
        assert f"yikatong: warning: {hint}" in err
        assert f"{f['details']['samples'][0]} (" in text and f"and {count - 5} more" in text
    # with the right key file, every TAC verifies
    code, report = reconcile_cli(*fleet.inputs, "--keys", str(fixture_path(FLEET_KEYS)), out=tmp_path)
    assert report is not None and (code, report["findings"]) == (0, [])
    assert "warning" not in capsys.readouterr().err


def test_a_key_file_of_other_masters_fails_every_issuer_once(planted: Fixture, tmp_path: Path) -> None:
    """A key file of other masters for every issuer: the check really uses the keys it is given."""
    keys = _zeroed_keys(tmp_path, ("4510", "4530", "4560"))
    code, report = reconcile_cli(*planted.inputs, "--keys", str(keys), out=tmp_path)
    assert report is not None and code == 1
    found_tac = {(f["id"], f["subject"]): f for f in _tac_findings(report)}
    assert set(found_tac) == {("REC-TAC-KEYS", c) for c in ("4510", "4530", "4560")}
    assert {c: f["details"]["records"] for (_, c), f in found_tac.items()} == _versions_of(planted.inputs)
    assert all(f"the keys in {keys}: wrong key file?" in f["evidence"][0] for f in found_tac.values())
    # the planted bad TACs are folded into their issuer's finding: those cards are not hotlisted for it
    assert found(report) - set(found_tac) == {x for x in planted.expected if x[0] not in ("REC-TAC", "REC-SETTLEMENT")}
    forged = {record_id.split("-")[1] for rule, record_id in planted.expected if rule == "REC-TAC"}
    assert forged and report["hotlist"] == sorted(set(planted.hotlist) - forged)


def test_an_issuer_whose_tacs_partly_verify_keeps_one_finding_per_record(planted: Fixture, tmp_path: Path) -> None:
    """Jinan's masters wrong, Zibo's and Yantai's right: one finding for Jinan; Zibo's two forged TACs (most of
    its TACs verify) stay one finding per record, as before, and their cards stay on the hotlist."""
    keys = _zeroed_keys(tmp_path, ("4510",))
    code, report = reconcile_cli(*planted.inputs, "--keys", str(keys), out=tmp_path)
    assert report is not None and code == 1
    planted_tac = {x for x in planted.expected if x[0] == "REC-TAC"}
    assert {x[1].split("-")[0] for x in planted_tac} == {"4530"}
    assert {(f["id"], f["subject"]) for f in _tac_findings(report)} == {("REC-TAC-KEYS", "4510"), *planted_tac}
    assert found(report) == planted.expected - {("REC-SETTLEMENT", DAY), ("REC-SETTLEMENT", "4560")} | {
        ("REC-TAC-KEYS", "4510")
    }
    assert report["hotlist"] == planted.hotlist


@pytest.mark.parametrize(("records", "expected"), [(2, {"REC-TAC": 2}), (3, {"REC-TAC-KEYS": 1})])
def test_it_takes_three_failing_tacs_of_an_issuer_to_blame_the_key_file(
    clean: Fixture, tmp_path: Path, records: int, expected: dict[str, int]
) -> None:
    """Jinan's masters wrong and only the first ``records`` records of one Jinan card kept: with two, each failing
    TAC is a REC-TAC as before; with three, they make one REC-TAC-KEYS. Nothing else is found."""
    ledgers = read_ledgers(clean.inputs, [])
    first = next(x for x in ledgers if x.city == "4510").records
    jinan = np.flatnonzero(first.issuer == 4510)
    card = first.card[jinan[0]]
    mine = jinan[first.card[jinan] == card]
    kept = {(int(first.kind[i]), int(first.counter[i])) for i in mine[np.argsort(first.time_us[mine])][:records]}

    def keep(r: Records) -> NDArray[np.bool_]:
        ours = np.array([(int(k), int(c)) in kept for k, c in zip(r.kind, r.counter, strict=True)], dtype=bool)
        return (r.issuer != 4510) | ((r.card == card) & ours)

    ledgers = [replace(x, records=x.records.take(keep(x.records))) for x in ledgers]
    keys = IssuerKeyStore.load(_zeroed_keys(tmp_path, ("4510",)))
    report = reconcile(ledgers, Options(read_cities(), keys, key_file="other-keys.json"))
    assert Counter(f.id for f in report.findings) == expected


# --- clean input, exit codes ----------------------------------------------------------------------------


def test_clean_ledgers_give_no_findings_and_exit_0(clean: Fixture, tmp_path: Path) -> None:
    code, report = reconcile_cli(*clean.inputs, "--settlement", str(clean.settlement), out=tmp_path)
    assert report is not None and code == 0
    assert report["findings"] == [] and report["hotlist"] == [] and report["skipped"] == []
    assert set(report["checks"].values()) == {0}
    assert report["settlement"] == json.loads(clean.settlement.read_text())
    assert [s["city"] for s in report["subjects"]] == ["4510", "4530", "4560"]


@pytest.mark.parametrize(("fail_on", "code"), [("critical", 0), ("high", 0), ("medium", 1), ("low", 1)])
def test_fail_on_decides_the_exit_code(clean: Fixture, tmp_path: Path, fail_on: str, code: int) -> None:
    """A copied row (a medium finding) fails the run only when --fail-on is medium or lower."""
    acquirer_file = Path(clean.inputs[0])
    copy = tmp_path / acquirer_file.name
    lines = acquirer_file.read_text().splitlines(keepends=True)
    copy.write_text("".join([*lines, lines[1]]))
    inputs = [str(copy), *clean.inputs[1:]]
    got, report = reconcile_cli(*inputs, "--fail-on", fail_on, out=tmp_path)
    assert report is not None and got == code
    assert found(report) == {("REC-DUPLICATE", lines[1].split(",")[0])}


def test_a_record_that_differs_between_the_sides_is_a_conflict(clean: Fixture, tmp_path: Path) -> None:
    """The issuer's copy of a forwarded record says another terminal seq than the acquirer's."""
    city, issuer_file = clean.inputs[1].split("=", 1)
    lines = Path(issuer_file).read_text().splitlines()
    changed = _set(lines[1], "terminal_seq", "999")
    (tmp_path / "issuer.csv").write_text("\n".join([lines[0], changed, *lines[2:]]) + "\n")
    inputs = [clean.inputs[0], f"{city}={tmp_path / 'issuer.csv'}", *clean.inputs[2:]]
    code, report = reconcile_cli(*inputs, "--no-tac", out=tmp_path)
    assert report is not None and code == 1
    assert found(report) == {("REC-CONFLICT", changed.split(",")[0])}
    (conflict,) = report["findings"]
    assert conflict["details"]["versions"] == 2 and "#999" in " ".join(conflict["evidence"])


def test_day_selects_the_records(clean: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = reconcile_cli(*clean.inputs, "--day", "2026-11-23", out=tmp_path)
    assert report is not None and code == 0
    assert {s["records"] for s in report["subjects"]} == {0} and report["settlement"]["day"] == "2026-11-23"
    code, report = reconcile_cli(*clean.inputs, "--day", DAY, out=tmp_path)
    assert report is not None and sum(s["records"] for s in report["subjects"]) > 50
    settlement = str(clean.settlement)
    assert reconcile_cli(*clean.inputs, "--day", "2026-11-23", "--settlement", settlement, out=tmp_path / "x") == (
        2,
        None,
    )
    assert "settles 2026-11-24" in capsys.readouterr().err


# --- the settlement file: every pair line and the file's own arithmetic ------------------------------------


def _altered_settlement(clean: Fixture, folder: Path, change: Any) -> Path:
    """A copy of the clean fixture's genuine settlement file with ``change(doc, pairs by (acquirer, issuer))``
    applied to its document."""
    doc = json.loads(clean.settlement.read_text())
    change(doc, {(p["acquirer"], p["issuer"]): p for p in doc["pairs"]})
    path = folder / clean.settlement.name
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def _settlement_evidence(report: dict[str, Any]) -> dict[str, str]:
    return {f["subject"]: " ".join(f["evidence"]) for f in report["findings"] if f["id"] == "REC-SETTLEMENT"}


def test_pair_lines_altered_with_the_positions_unchanged_are_reported(clean: Fixture, tmp_path: Path) -> None:
    """Both directions of one city pair get 200 fen more gross (fee +1, owed +199, so each line is consistent):
    the net positions stay what the records give, the pair lines do not."""

    def shift(doc: dict[str, Any], pairs: dict[tuple[str, str], dict[str, Any]]) -> None:
        for pair in (("4510", "4560"), ("4560", "4510")):
            pairs[pair]["gross"] += 200
            pairs[pair]["fee"] += 1
            pairs[pair]["issuer_owes_acquirer"] += 199

    altered = _altered_settlement(clean, tmp_path, shift)
    assert json.loads(altered.read_text())["positions"] == json.loads(clean.settlement.read_text())["positions"]
    code, report = reconcile_cli(*clean.inputs, "--no-tac", "--settlement", str(altered), out=tmp_path)
    assert report is not None and code == 1
    fields = ("gross", "fee", "issuer_owes_acquirer")
    assert found(report) == {
        ("REC-SETTLEMENT", f"{pair} {name}") for pair in ("4510:4560", "4560:4510") for name in fields
    }
    original = {(p["acquirer"], p["issuer"]): p for p in json.loads(clean.settlement.read_text())["pairs"]}
    evidence = _settlement_evidence(report)
    gross = original[("4510", "4560")]["gross"]
    assert (
        f"acquirer 4510, issuer 4560: gross {gross + 200} fen in the file, the records give {gross} fen (+200)"
        in (evidence["4510:4560 gross"])
    )
    owed = next(f for f in report["findings"] if f["subject"] == "4560:4510 issuer_owes_acquirer")
    assert owed["details"] == {
        "acquirer": "4560",
        "issuer": "4510",
        "field": "issuer_owes_acquirer",
        "claimed": original[("4560", "4510")]["issuer_owes_acquirer"] + 199,
        "recomputed": original[("4560", "4510")]["issuer_owes_acquirer"],
    }


def test_a_line_whose_own_arithmetic_is_wrong_is_reported(clean: Fixture, tmp_path: Path) -> None:
    """One more fen of fee on one line, its owed left as it was: the fee differs from the records, and the
    line's owed is no longer its gross - fee."""
    altered = _altered_settlement(clean, tmp_path, lambda doc, pairs: pairs[("4560", "4530")].update(fee=5))
    code, report = reconcile_cli(*clean.inputs, "--no-tac", "--settlement", str(altered), out=tmp_path)
    assert report is not None and code == 1
    assert found(report) == {("REC-SETTLEMENT", "4560:4530 fee"), ("REC-SETTLEMENT", "4560:4530 issuer_owes_acquirer")}
    evidence = _settlement_evidence(report)
    assert "fee 5 fen in the file, the records give 4 fen (+1)" in evidence["4560:4530 fee"]
    owed = evidence["4560:4530 issuer_owes_acquirer"]
    assert "issuer_owes_acquirer 896 fen in the file, but its gross - fee is 900 - 5 = 895 fen" in owed
    assert "records give" not in owed  # what the issuer owes is what the records give: only the arithmetic fails


def test_a_fee_that_its_rate_cannot_give_is_reported(clean: Fixture, tmp_path: Path) -> None:
    """A rate ten times higher on one line, its fee, gross and owed untouched: the fee is not what that rate
    gives, even allowing half a fen of rounding per record. The records settled at the file's rate (they carry
    none) give another fee, another owed and so other positions."""
    altered = _altered_settlement(clean, tmp_path, lambda doc, pairs: pairs[("4560", "4530")].update(rate="0.05"))
    code, report = reconcile_cli(*clean.inputs, "--no-tac", "--settlement", str(altered), out=tmp_path)
    assert report is not None and code == 1
    subjects = ("4560:4530 fee", "4560:4530 issuer_owes_acquirer", "4560", "4530")
    assert found(report) == {("REC-SETTLEMENT", subject) for subject in subjects}
    evidence = _settlement_evidence(report)["4560:4530 fee"]
    assert "fee 4 fen in the file, the records give 44 fen (-40)" in evidence  # 2 x 22.5 fen, rounded half-even
    assert "at its rate 0.05 on gross 900 fen (45 fen), rounded half-even per record over 2 record(s), the fee" in (
        evidence
    )
    assert "lies within 44..46 fen" in evidence


def test_pairs_in_only_one_of_file_and_records_are_reported(clean: Fixture, tmp_path: Path) -> None:
    """A pair line dropped from the file and one invented, the positions left as they were: both pairs are
    reported, and so are the positions that no longer follow from the file's own pairs."""

    def change(doc: dict[str, Any], pairs: dict[tuple[str, str], dict[str, Any]]) -> None:
        doc["pairs"] = [p for p in doc["pairs"] if (p["acquirer"], p["issuer"]) != ("4530", "4510")]
        invented = {"acquirer": "4530", "issuer": "4560", "records": 1, "gross": 100, "fee": 0, "rate": "0.005"}
        doc["pairs"].append({**invented, "issuer_owes_acquirer": 100})

    altered = _altered_settlement(clean, tmp_path, change)
    code, report = reconcile_cli(*clean.inputs, "--no-tac", "--settlement", str(altered), out=tmp_path)
    assert report is not None and code == 1
    assert found(report) == {("REC-SETTLEMENT", s) for s in ("4530:4510", "4530:4560", "4510", "4530", "4560")}
    evidence = _settlement_evidence(report)
    assert (
        "has no line for acquirer 4530, issuer 4510; the records give 2 record(s), gross 550 fen"
        in evidence["4530:4510"]
    )
    invented = "acquirer 4530, issuer 4560 (1 record(s), gross 100 fen, fee 0 fen, issuer_owes_acquirer 100 fen)"
    assert f"{invented} in the file; the records give no such pair" in evidence["4530:4560"]
    # 4510 is no longer owed 547 fen by its own pairs: the position it states is what the records give
    claimed = json.loads(altered.read_text())["positions"]
    assert (
        f"position {claimed['4510']:+} fen in the file, but its own pairs give {claimed['4510'] + 547:+} fen"
        in (evidence["4510"])
    )
    assert "records give" not in evidence["4510"]


def test_a_net_sum_that_is_not_the_sum_of_the_positions_is_reported(clean: Fixture, tmp_path: Path) -> None:
    altered = _altered_settlement(clean, tmp_path, lambda doc, pairs: doc.update(net_sum=5))
    code, report = reconcile_cli(*clean.inputs, "--no-tac", "--settlement", str(altered), out=tmp_path)
    assert report is not None and code == 1
    assert found(report) == {("REC-SETTLEMENT", DAY)}
    assert "net_sum 5 fen in the file, but its positions sum to +0 fen" in _settlement_evidence(report)[DAY]


# --- bad input: exit 2, a clear message, no report ------------------------------------------------------


def _edit(clean: Fixture, folder: Path, change: Any) -> tuple[str, str]:
    """A copy of the first acquirer file with ``change(lines)`` applied; (its path, its name)."""
    source = Path(clean.inputs[0])
    lines = source.read_text().splitlines()
    bad = folder / source.name
    bad.write_text("\n".join(change(lines)) + "\n")
    return str(bad), source.name


def _set(line: str, column: str, value: str) -> str:
    cells = line.split(",")
    cells[CSV_HEADER.index(column)] = value
    return ",".join(cells)


def _counter(line: str, counter: str) -> str:
    record_id = line.split(",", maxsplit=1)[0].rsplit("-", 1)[0] + "-" + counter
    return _set(_set(line, "card_counter", counter), "record_id", record_id)


BAD_FILES = {
    "missing column": (lambda ls: [ls[0].replace(",tac", ""), *(x.rsplit(",", 1)[0] for x in ls[1:])], "line 1"),
    "non-numeric amount": (lambda ls: [*ls[:3], _set(ls[3], "amount", "12a"), *ls[4:]], "line 4: column amount"),
    "short row": (lambda ls: [*ls[:2], ls[2].rsplit(",", 2)[0], *ls[3:]], "line 3: 11 columns"),
    "negative balance": (lambda ls: [*ls[:2], _set(ls[2], "balance_after", "-5")], "line 3: column balance_after"),
    "record id": (lambda ls: [*ls[:2], _set(ls[2], "record_id", "4510-x"), *ls[3:]], "line 3: column record_id"),
    "another record's id": (lambda ls: [*ls[:2], _set(ls[2], "record_id", ls[3].split(",")[0])], "line 3: record_id"),
    "bad time": (lambda ls: [*ls[:5], _set(ls[5], "time", "yesterday"), *ls[6:]], "line 6: column time"),
    "no offset": (lambda ls: [*ls[:2], _set(ls[2], "time", "2026-11-24T08:00:00")], "line 3: column time"),
    "counter too big": (lambda ls: [*ls[:2], _counter(ls[2], "70000")], "line 3: column card_counter: 70000 exceeds"),
    "unclosed quote": (lambda ls: [*ls[:2], '"' + ls[2]], "not CSV"),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_a_bad_clearing_file_is_named_by_line_and_nothing_is_written(
    clean: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    change, where = BAD_FILES[case]
    bad, name = _edit(clean, tmp_path, change)
    code, report = reconcile_cli(bad, *clean.inputs[1:], out=tmp_path / "out")
    assert (code, report) == (2, None)
    message = capsys.readouterr().err
    assert message.startswith("yikatong: error: ") and name in message and where in message, message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "postgresql+asyncpg://nobody@127.0.0.1:1/x"], "database postgresql+asyncpg://nobody@127.0.0.1:1/x"),
        (["--db", "sqlite:///no/such/folder/ledger.sqlite"], "no such SQLite file"),
        (["--db", "mysql://u@h/db"], "only SQLite and PostgreSQL"),
        (["no-such-file.csv"], "no-such-file.csv: No such file"),
        ([], "nothing to reconcile"),
    ],
)
def test_unusable_inputs_exit_2_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code, report = reconcile_cli(*args, out=tmp_path / "out")
    assert (code, report) == (2, None)
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_bad_settlement_file_or_a_mixed_file_without_holder_exits_2(
    clean: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "settlement.json"
    broken.write_text('{"schema": "yikatong.settlement/1", "day": "2026-11-24", "positions": {"4510": "x"}}')
    assert reconcile_cli(*clean.inputs, "--settlement", str(broken), out=tmp_path / "a") == (2, None)
    assert f"{broken}: not a settlement file" in capsys.readouterr().err
    doc = json.loads(clean.settlement.read_text())
    broken.write_text(json.dumps({**doc, "pairs": [*doc["pairs"], doc["pairs"][0]]}))
    assert reconcile_cli(*clean.inputs, "--settlement", str(broken), out=tmp_path / "a") == (2, None)
    assert "the pair acquirer 4510, issuer 4560 is listed twice" in capsys.readouterr().err
    issuer_side = clean.inputs[1].split("=", 1)[1]  # rows of several acquirers: whose ledger is it?
    assert reconcile_cli(issuer_side, out=tmp_path / "b") == (2, None)
    assert "name the holder city as CITY=" in capsys.readouterr().err


def test_a_database_without_a_ledger_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    assert reconcile_cli("--db", f"sqlite:///{empty}", out=tmp_path / "out") == (2, None)
    assert "no clearing ledger table" in capsys.readouterr().err


# --- real clearing databases ----------------------------------------------------------------------------


async def _clear_day(url: str, hold_back: int = 0) -> list[str]:
    """Two cities' clearings in one database: each stores its terminal's records and forwards the other
    city's cards to it, which verifies and stores them; ``hold_back`` forwards of Yantai never reach Jinan.
    Returns the ids of the held-back records."""
    engine = open_engine(url)
    await migrate(engine)
    held: list[str] = []
    for acquirer, issuer, seed in (("4560", "4510", 11), ("4510", "4560", 12)):
        terminal = f"{acquirer}00000001"
        records = signed_records(40, acquirer, terminal, issuers=(acquirer, issuer), cards=8, seed=seed)
        topic = txn_topic(acquirer, terminal)
        verdicts = Intake(acquirer, HOST).message(
            _topic(topic, acquirer), batch_payload([r.to_json() for r in records]).encode(), frozenset()
        )
        outcome = await Ledger(engine, acquirer).store([Received(topic, terminal, verdicts)])
        forwards: list[TxnRecord] = outcome.to_forward
        if acquirer == "4560" and hold_back:
            held = [r.record_id for r in forwards[:hold_back]]
            forwards = forwards[hold_back:]
        interop = interop_txn_topic(issuer)
        payload = batch_payload([r.to_json() for r in forwards]).encode()
        verdicts = Intake(issuer, HOST).message(_topic(interop, issuer), payload, frozenset())
        stored = await Ledger(engine, issuer).store([Received(interop, None, verdicts)])
        assert stored.stored == len(forwards)
        await Ledger(engine, acquirer).forward_done(issuer, [r.record_id for r in forwards], [])
    await engine.dispose()
    return held


def _topic(topic: str, city: str) -> Topic:
    parsed = Topic.parse(topic, city)
    assert parsed is not None
    return parsed


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_database_ledgers_built_by_the_clearing_reconcile_clean(kind: str, tmp_path: Path) -> None:
    async with fresh_db(kind, tmp_path) as url:
        await _clear_day(url)
        out = tmp_path / "files"
        assert await asyncio.to_thread(main, ["clearing", "settle", "--day", DAY, "--db", url, "--out", str(out)]) == 0
        settlement = str(out / f"settlement-{DAY}.json")
        code, report = await asyncio.to_thread(reconcile_cli, "--db", url, "--settlement", settlement, out=tmp_path)
    assert report is not None and code == 0
    assert report["findings"] == [] and report["skipped"] == []
    assert [(s["city"], s["records"], s["issuer_side"]) for s in report["subjects"]] == [
        ("4510", 40 + 20, True),
        ("4560", 40 + 20, True),
    ]
    assert report["settlement"]["positions"] == json.loads(Path(settlement).read_text())["positions"]
    # the daily clearing files that settle wrote reconcile too (the acquirer side only)
    files = sorted(str(p) for p in out.glob("clearing-*.csv"))
    code, report = await asyncio.to_thread(reconcile_cli, *files, "--settlement", settlement, out=tmp_path)
    assert report is not None and (code, report["findings"]) == (0, [])


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_forward_the_issuer_never_got_is_missing_on_its_side(kind: str, tmp_path: Path) -> None:
    async with fresh_db(kind, tmp_path) as url:
        held = await _clear_day(url, hold_back=2)
        out = tmp_path / "files"
        assert await asyncio.to_thread(main, ["clearing", "settle", "--day", DAY, "--db", url, "--out", str(out)]) == 0
        settlement = str(out / f"settlement-{DAY}.json")
        code, report = await asyncio.to_thread(reconcile_cli, "--db", url, "--settlement", settlement, out=tmp_path)
    assert report is not None and code == 1
    assert found(report) == {("REC-MISSING", record_id) for record_id in held}
    assert {f["city"] for f in report["findings"]} == {"4510"}
    # the clearing did not settle the unacked forwards; reconciliation leaves them out the same way
    assert report["settlement"]["unsettled"] == {"missing at issuer": 2}


# --- records of hotlisted cards: who bears them -----------------------------------------------------------


@pytest.fixture(scope="module")
def hot(tmp_path_factory: pytest.TempPathFactory) -> Fixture:
    return write_fixture(tmp_path_factory.mktemp("hot"), seed=7, plant=False, hotlisted=True)


def test_the_hotlist_fixture_has_records_on_both_sides_of_the_grace(hot: Fixture) -> None:
    assert sorted(hot.liable.values()) == ["acquirer", "acquirer", "issuer", "issuer"]


def test_hotlisted_records_are_charged_by_publish_time_plus_grace(
    hot: Fixture, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert hot.hotlists is not None
    args = ("--hotlists", str(hot.hotlists), "--settlement", str(hot.settlement))
    code, report = reconcile_cli(*hot.inputs, *args, out=tmp_path)
    assert report is not None and (code, report["findings"], report["skipped"]) == (0, [], [])
    assert "records of hotlisted cards: 4; the issuers bear " in capsys.readouterr().out
    claimed = json.loads(hot.settlement.read_text())
    assert report["settlement"] == claimed
    listed = {x["record_id"]: x for x in report["settlement"]["hotlisted"]}
    assert {k: x["liable"] for k, x in listed.items()} == hot.liable
    # the pair grace of 2 minutes makes Zibo's card at Jinan the acquirer's; Yantai's never-published list the issuer's
    by_pair = {(x["acquirer"], x["issuer"]): x for x in listed.values()}
    assert (by_pair[("4510", "4530")]["grace_seconds"], by_pair[("4510", "4530")]["liable"]) == (120, "acquirer")
    assert by_pair[("4530", "4560")]["published"] is None and by_pair[("4530", "4560")]["liable"] == "issuer"
    pairs = {(p["acquirer"], p["issuer"]): p for p in claimed["pairs"]}
    for pair, line in pairs.items():
        mine = [x for x in listed.values() if (x["acquirer"], x["issuer"]) == pair]
        for side in ("issuer", "acquirer"):
            assert line[f"hotlisted_{side}_fen"] == sum(x["amount"] for x in mine if x["liable"] == side)
    page = (tmp_path / "report.html").read_text()
    assert "Records of hotlisted cards" in page and all(record_id in page for record_id in hot.liable)


def test_without_the_issuers_lists_the_settlement_files_own_list_is_judged(hot: Fixture, tmp_path: Path) -> None:
    code, report = reconcile_cli(*hot.inputs, "--settlement", str(hot.settlement), out=tmp_path)
    assert report is not None and (code, report["findings"]) == (0, [])
    (note,) = report["skipped"]
    assert "no issuers' hotlists given" in note and "4 record(s)" in note
    assert {x["record_id"]: x["liable"] for x in report["settlement"]["hotlisted"]} == hot.liable


def test_a_settlement_that_ignores_the_hotlists_is_reported(hot: Fixture, tmp_path: Path) -> None:
    """The day settled as if no card were hotlisted: every pair with a late record has too much gross, and each
    record of a hotlisted card is one the file does not list."""
    assert hot.hotlists is not None
    debits = [
        (row["acquirer"], row["issuer"], int(row["amount"]), 1)
        for path in hot.inputs
        if "=" not in path  # the acquirers' files
        for row in csv.DictReader(Path(path).read_text().splitlines())
        if row["kind"] in DEBIT_KINDS and row["acquirer"] != row["issuer"]
    ]
    blind = tmp_path / hot.settlement.name
    blind.write_text(json.dumps(settle(DAY, debits, {}, grace=HOTLIST_GRACE).to_json()))
    args = ("--no-tac", "--hotlists", str(hot.hotlists), "--settlement", str(blind))
    code, report = reconcile_cli(*hot.inputs, *args, out=tmp_path)
    assert report is not None and code == 1
    late = {k for k, v in hot.liable.items() if v == "acquirer"}
    subjects = {f["subject"] for f in report["findings"]}
    assert set(hot.liable) <= subjects  # each hotlisted record is named
    assert {"4510:4530 gross", "4560:4510 gross", "4510:4530 hotlisted_acquirer_fen"} <= subjects
    evidence = _settlement_evidence(report)
    assert all("the file does not list it" in evidence[k] and "the acquirer's" in evidence[k] for k in late)


def test_an_older_settlement_file_is_still_read(clean: Fixture, tmp_path: Path) -> None:
    """A file written before the hotlist fields: the same checks, nothing missing reported."""

    def strip(doc: dict[str, object], pairs: dict[tuple[str, str], dict[str, object]]) -> None:
        for line in pairs.values():
            for key in ("hotlist_grace_seconds", "hotlisted_issuer_fen", "hotlisted_acquirer_fen"):
                del line[key]
        del doc["hotlisted"], doc["hotlist_versions"]

    older = _altered_settlement(clean, tmp_path, strip)
    claimed = read_settlement(older)
    assert claimed.hotlisted is None and claimed.graces == {}
    code, report = reconcile_cli(*clean.inputs, "--settlement", str(older), out=tmp_path)
    assert report is not None and (code, report["findings"], report["skipped"]) == (0, [], [])


def test_a_settlement_file_charging_a_record_to_the_wrong_party_is_reported(hot: Fixture, tmp_path: Path) -> None:
    assert hot.hotlists is not None
    record_id = next(k for k, v in hot.liable.items() if v == "acquirer")
    doc = json.loads(hot.settlement.read_text())
    for x in doc["hotlisted"]:
        if x["record_id"] == record_id:
            x["liable"] = "issuer"
    path = tmp_path / hot.settlement.name
    path.write_text(json.dumps(doc))
    args = ("--no-tac", "--hotlists", str(hot.hotlists), "--settlement", str(path))
    code, report = reconcile_cli(*hot.inputs, *args, out=tmp_path)
    assert report is not None and code == 1
    assert found(report) == {("REC-SETTLEMENT", record_id)}
    (wrong,) = report["findings"]
    assert (wrong["details"]["claimed"], wrong["details"]["recomputed"]) == ("issuer", "acquirer")


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def test_a_database_gives_the_issuers_lists_to_settle_and_reconcile(kind: str, tmp_path: Path) -> None:
    async with fresh_db(kind, tmp_path) as url:
        await _clear_day(url)
        engine = open_engine(url)
        async with engine.connect() as db:
            rows = (await db.execute(select(LEDGER.c.card, LEDGER.c.time).where(LEDGER.c.issuer == "4510"))).all()
        card = rows[0].card
        first = min(dt.datetime.fromisoformat(r.time) for r in rows if r.card == card)
        async with engine.begin() as db:  # Jinan lists the card a second before its first record: grace 0 below
            published = (first - dt.timedelta(seconds=1)).timestamp()
            await db.execute(
                HOTLIST_VERSION.insert(), {"city": "4510", "version": 1, "created": 0.0, "published": published}
            )
            await db.execute(HOTLIST.insert(), {"city": "4510", "card": card, "added": 0.0, "version": 1})
        await engine.dispose()
        out = tmp_path / "files"
        settle_args = ["clearing", "settle", "--day", DAY, "--db", url, "--out", str(out), "--hotlist-grace", "0"]
        assert await asyncio.to_thread(main, settle_args) == 0
        settlement = str(out / f"settlement-{DAY}.json")
        code, report = await asyncio.to_thread(reconcile_cli, "--db", url, "--settlement", settlement, out=tmp_path)
    assert report is not None and (code, report["findings"], report["skipped"]) == (0, [], [])
    listed = report["settlement"]["hotlisted"]
    assert listed and {x["liable"] for x in listed} == {"acquirer"} and {x["version"] for x in listed} == {1}
    assert report["settlement"] == json.loads(Path(settlement).read_text()) | {"hotlist_versions": {}}


# --- hotlist files and the settlement file's list under fuzzing ---------------------------------------------

_HOT_CELL = st.one_of(
    st.sampled_from(["4510", "45100000000000000001", "1D3B993F", "1", "0", "", "2026-11-24T08:00:00+08:00"]),
    st.sampled_from(["2026-11-24T08:00:00", "x", "-1", "99999999999", '"', "4510,1"]),
    st.text(max_size=10),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.one_of(
        st.binary(max_size=200),
        st.lists(st.lists(_HOT_CELL, min_size=3, max_size=5), max_size=4).map(
            lambda rows: "\n".join(["issuer,card,version,published", *(",".join(r) for r in rows)]).encode()
        ),
    )
)
def test_every_hotlist_file_parses_or_gets_a_clear_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "hotlists.csv"
    path.write_bytes(raw)
    try:
        history = read_hotlist_file(path)
    except LedgerInputError as err:
        assert str(err).startswith(str(path))
    else:
        assert len(history) <= raw.count(b"\n") + raw.count(b"\r")
        again = tmp_path / "again.csv"
        write_hotlist_file(again, history)
        assert read_hotlist_file(again) == history


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**12) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["record_id", "version", "published", "liable", None]),
    value=_JSON,
    pair_field=st.sampled_from(["hotlist_grace_seconds", "hotlisted_issuer_fen", "hotlisted_acquirer_fen"]),
    pair_value=_JSON,
    listed=_JSON,
)
def test_a_settlement_files_hotlist_fields_parse_or_get_a_clear_error(
    hot: Fixture, tmp_path: Path, field: str | None, value: object, pair_field: str, pair_value: object, listed: object
) -> None:
    doc = json.loads(hot.settlement.read_text())
    if field is None:
        doc["hotlisted"] = listed
    else:
        doc["hotlisted"][0][field] = value
    doc["pairs"][0][pair_field] = pair_value
    path = tmp_path / "settlement.json"
    path.write_text(json.dumps(doc))
    try:
        claimed = read_settlement(path)
    except LedgerInputError as err:
        assert str(err).startswith(f"{path}: not a settlement file")
    else:
        assert claimed.hotlisted is None or len(claimed.hotlisted) <= len(hot.liable)


# --- the clearing-file parser under fuzzing -------------------------------------------------------------

_CELL = st.one_of(
    st.sampled_from(["4510", "4560", "0", "12", "-1", "", "purchase", "load", "ABCDEF012345", "1D3B993F"]),
    st.sampled_from(["2026-11-24T08:00:00+08:00", "2026-11-24", "99999999999", "45100000000000000001"]),
    st.text(max_size=12),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.one_of(
        st.binary(max_size=300),
        st.lists(st.lists(_CELL, min_size=11, max_size=14), max_size=4).map(
            lambda rows: "\n".join([",".join(CSV_HEADER), *(",".join(r) for r in rows)]).encode()
        ),
    )
)
def test_every_file_parses_or_gets_a_clear_error(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "fuzz.csv"
    path.write_bytes(raw)
    try:
        ledger = read_clearing_file(path, "4510")
    except LedgerInputError as err:
        assert str(err).startswith(str(path))
    else:
        assert len(ledger.records) <= raw.count(b"\n") + raw.count(b"\r")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(line=st.integers(1, 60), cut=st.integers(0, 200), junk=st.text(max_size=5))
def test_a_damaged_real_file_parses_or_names_its_line(
    clean: Fixture, tmp_path: Path, line: int, cut: int, junk: str
) -> None:
    """A real clearing file with one line cut short and junk appended: a clear error names the line (or the
    damage happens to leave a valid file)."""
    text = Path(clean.inputs[0]).read_text().splitlines()
    index = min(line, len(text) - 1)
    text[index] = text[index][:cut] + junk
    path = tmp_path / "damaged.csv"
    path.write_text("\n".join(text) + "\n")
    try:
        read_clearing_file(path)
    except LedgerInputError as err:
        assert str(err).startswith(f"{path} line ") or "CITY=" in str(err)


# --- the columnar (pyarrow) reader against the line reader ----------------------------------------------


def _read_both(path: Path, holder: str | None) -> tuple[object, object]:
    """What each reader makes of a file: the ledger as plain values, or the error message."""

    def outcome(columnar: bool) -> object:
        try:
            ledger = read_clearing_file(path, holder, columnar=columnar)
        except LedgerInputError as err:
            return str(err)
        columns = {
            f.name: (str(value.dtype), value.tolist())
            for f in fields(ledger.records)
            for value in [getattr(ledger.records, f.name)]
        }
        return ledger.city, ledger.sources, ledger.issuer_side, columns

    return outcome(True), outcome(False)


def test_the_columnar_reader_reads_the_fixture_files_as_the_line_reader(planted: Fixture, hot: Fixture) -> None:
    for arg in [*planted.inputs, *hot.inputs]:
        holder, _, name = arg.rpartition("=")
        columnar, by_lines = _read_both(Path(name), holder or None)
        assert not isinstance(by_lines, str) and columnar == by_lines


_NUMBER_CELL = st.integers(0, 2**32 + 5).map(str) | st.integers(0, 99).map(lambda n: f"{n:0{n % 4 + 8}d}")
_ROW_CELLS = st.fixed_dictionaries(
    {
        "issuer": st.sampled_from(["4510", "4560", "4530", "0000"]),
        "card": st.from_regex(r"[0-9]{20}|[0-9A-F]{8}", fullmatch=True),
        "kind": st.sampled_from(["purchase", "load", "metro_entry", "metro_exit"]),
        "card_counter": st.integers(0, 70_000).map(str) | st.integers(0, 9).map(lambda n: f"{n:05d}"),
        "acquirer": st.sampled_from(["4510", "4560"]),
        "terminal": st.from_regex(r"[0-9A-F]{12}", fullmatch=True),
        "terminal_seq": _NUMBER_CELL,
        "amount": _NUMBER_CELL,
        "balance_before": _NUMBER_CELL,
        "balance_after": _NUMBER_CELL,
        "time": st.sampled_from(
            [
                "2026-11-24T08:00:00+08:00",
                "2026-11-24T23:59:59.5-03:30",
                "2026-11-24T00:00:00Z",
                "2026-11-24 08:00+08:00",
                "2026-11-24T08:00:00",  # no offset
            ]
        ),
        "tac": st.from_regex(r"[0-9A-F]{8}", fullmatch=True),
    }
)
_CELL_DAMAGE: dict[str, Callable[[str], str]] = {  # how to spoil one cell ("junk": replace it by junk text)
    "lower case": str.lower,
    "a digit more": lambda c: "0" + c,
    "a character less": lambda c: c[1:],
    "space before": lambda c: " " + c,
    "space after": lambda c: c + " ",
    "minus": lambda c: "-" + c,
    "plus": lambda c: "+" + c,
    "empty": lambda c: "",
    "quoted": lambda c: f'"{c}"',
    "comma": lambda c: c + ",X",
    "non-ascii": lambda c: c[:-1] + "\u00e9",
}
_FILE_DAMAGE = ["junk", "crlf", "bom", "blank line", "no final newline", "header only", "bad header", "record id"]


def _file(rows: list[dict[str, str]], damage: str, where: int, junk: str) -> bytes:
    """A clearing file of ``rows`` (CSV_HEADER cells but the record id, made from its parts), damaged: the cell
    ``where`` picks by a _CELL_DAMAGE (or junk, or another record's id), or the file by a _FILE_DAMAGE."""
    lines = [",".join(CSV_HEADER)]
    for n, row in enumerate(rows):
        cells = {"record_id": "-".join(row[k] for k in ("issuer", "card", "kind", "card_counter")), **row}
        if n == where % max(len(rows), 1):
            column = CSV_HEADER[where % len(CSV_HEADER)]
            if damage in _CELL_DAMAGE:
                cells[column] = _CELL_DAMAGE[damage](cells[column])
            elif damage == "junk":
                cells[column] = junk
            elif damage == "record id":
                cells["record_id"] = cells["record_id"].replace("-", "-0", 1)
        lines.append(",".join(cells[name] for name in CSV_HEADER))
    if damage == "header only":
        lines = lines[:1]
    elif damage == "bad header":
        lines[0] = lines[0].replace("amount", "Amount")
    elif damage == "blank line":
        lines.insert(1 + where % len(lines), "")
    text = ("\r\n" if damage == "crlf" else "\n").join(lines) + ("" if damage == "no final newline" else "\n")
    return (b"\xef\xbb\xbf" if damage == "bom" else b"") + text.encode()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(_ROW_CELLS, max_size=6),
    damage=st.sampled_from(["none", "none", "none", *_CELL_DAMAGE, *_FILE_DAMAGE]),
    where=st.integers(0, 1000),
    junk=st.text(max_size=6),
    holder=st.sampled_from([None, "4510"]),
)
def test_the_columnar_reader_gives_the_line_readers_ledger_or_its_error(
    tmp_path: Path, rows: list[dict[str, str]], damage: str, where: int, junk: str, holder: str | None
) -> None:
    path = tmp_path / "clearing-4510-2026-11-24.csv"
    path.write_bytes(_file(rows, damage, where, junk))
    columnar, by_lines = _read_both(path, holder)
    assert columnar == by_lines


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=400) | st.text(max_size=400).map(lambda t: (",".join(CSV_HEADER) + "\n" + t).encode()))
def test_the_columnar_reader_agrees_on_any_bytes(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "fuzz.csv"
    path.write_bytes(raw)
    columnar, by_lines = _read_both(path, "4510")
    assert columnar == by_lines


def _instants_one_by_one(texts: list[str]) -> list[int] | str:
    """What instants must give: each text through datetime.fromisoformat, or the message for the first bad one."""
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    values = []
    for text in texts:
        try:
            moment = dt.datetime.fromisoformat(text)
        except ValueError:
            return f"{text!r} is not an ISO 8601 time such as 2026-11-24T08:15:02+08:00"
        if moment.utcoffset() is None:
            return f"{text!r} has no UTC offset (+08:00)"
        delta = moment - epoch
        values.append((delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds)
    return values


_OFFSETS = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
_BEYOND = {  # a field of 2026-11-24T08:15:02+08:00 (where, how wide) and values just or far out of its range
    (0, 4): [0],
    (5, 2): [0, 13, 99],
    (8, 2): [0, 29, 30, 31, 32, 99],  # 29: February of a year that is not a leap year
    (11, 2): [24, 99],
    (14, 2): [60, 99],
    (17, 2): [60, 99],
    (20, 2): [24, 99],
    (23, 2): [60, 99],
}


@st.composite
def _usual_time(draw: st.DrawFn) -> str:
    """A time in the usual form: valid (any day of years 1 to 9999, any time, any offset), the 29th of February
    of a year that may not be a leap year, or with one field out of range."""
    day = draw(
        st.integers(1, dt.date.max.toordinal()).map(dt.date.fromordinal)
        | st.sampled_from([dt.date(year, 12, 31) for year in range(1, 10_000, 97)])  # every era of 400 years
    )
    if draw(st.booleans()):
        day = dt.date(draw(st.sampled_from([1, 4, 100, 400, 1900, 2000, 2023, 2024, 2100, 9996, 9999])), 2, 28)
    moment = dt.datetime.combine(day, draw(st.times()), draw(_OFFSETS))
    text = moment.isoformat(timespec="seconds")
    spoil = draw(st.sampled_from(["none", "29th", "field"]))
    if spoil == "29th":
        text = text[:5] + "02-29" + text[10:]
    elif spoil == "field":
        (at, width), values = draw(st.sampled_from(list(_BEYOND.items())))
        text = f"{text[:at]}{draw(st.sampled_from(values)):0{width}d}{text[at + width :]}"
    return text


@settings(max_examples=300, deadline=None)
@given(texts=st.lists(_usual_time() | st.datetimes(timezones=st.none() | st.timezones()).map(str), max_size=8))
def test_instants_of_the_usual_form_by_arithmetic_are_fromisoformats(texts: list[str]) -> None:
    """Times of the form 2026-11-24T08:15:02+08:00 are converted all at once by arithmetic: the same instants as
    fromisoformat gives, and the same refusal of the first bad one."""
    try:
        got: list[int] | str = instants(texts).tolist()
    except BadValue as err:
        got = str(err)
    assert got == _instants_one_by_one(texts)


# --- the benchmark runs ---------------------------------------------------------------------------------


def test_the_benchmark_runs_on_a_small_day(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--records", "3000", "--folder", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "findings 0" in done.stdout and "records/s" in done.stdout
