"""Hypothesis fuzzing of the whole ``yikatong`` command line: every subcommand, found by walking the argparse
parser (a new subcommand is fuzzed without touching this file), gets argument lists that mix its real option
names with hostile values: huge and negative numbers, empty strings, unicode and non-UTF-8 (surrogate-escaped)
text, missing paths, directories, garbage JSON and CSV files, next to valid card images, key files and city
codes so that the commands get past their argument checks too. The CLI runs in this process (``main(argv)``).

The contract checked for every argument list: the exit code is 0, 1 or 2; nothing prints a traceback or hits
the last-resort ``internal error`` guard of ``yikatong.cli.main`` (a crash must be fixed where it happens); a
refusal says why (exit 2: a last stderr line with ``error:``; exit 1: a line on stdout or stderr).

Nothing here touches the network, a broker, a database server or PC/SC, and nothing blocks:
- the commands that serve, run until Ctrl-C or exist to talk to a broker or reader (``UNSAFE`` below) have their
  command function replaced by a stub: their whole argument parsing (every type and validator) is fuzzed, the
  command body is not;
- the other commands never get ``--reader`` (not even abbreviated), get only broker URLs that do not parse, and
  only SQLite databases in the example's folder (or URLs refused before connecting);
- as a safety net, ``socket.connect`` and the PC/SC reader raise if anything tries them anyway.
Every example runs in a fresh copy of a template folder as the current directory (commands write their
default output files there), under pytest's tmp_path.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reconcile_fixture import write_fixture

from cardsim.resources import fixture_path
from clearing.settlement import CSV_HEADER
from yikatong import argtypes
from yikatong.cli import build_parser, main

# Commands replaced by a stub after argument parsing, and why.
UNSAFE = {
    ("demo",): "runs the whole pipe for seconds with an embedded MQTT broker",
    ("load",): "opens thousands of MQTT connections and starts clearing processes",
    ("card", "serve"): "serves the card to pcscd's vpcd over TCP until Ctrl-C",
    ("terminal", "run"): "waits for cards on a PC/SC reader until Ctrl-C",
    ("terminal", "sync"): "publishes to the broker and waits up to --timeout for acks",
    ("clearing", "serve"): "serves a broker until Ctrl-C",
    ("clearing", "hotlist", "add"): "publishes the hotlist to the broker",
}
# Each Crypto-1 key search takes about a second when its five or seven values parse: few examples.
EXAMPLES = {("audit", "mfkey32"): 6, ("audit", "mfkey64"): 6}
DEFAULT_EXAMPLES = int(os.environ.get("YIKATONG_FUZZ_EXAMPLES", "60"))  # a deeper run: YIKATONG_FUZZ_EXAMPLES=1000
BLOCKED = ("--reader",)  # never given to the commands that run (PC/SC)
DAY = "2026-11-24"

# --- the template folder every example starts from -----------------------------------------------------

PATHS = [
    "card.json",
    "m1.json",
    "big.json",
    "garbage.json",
    "empty.json",
    "list.json",
    "wrongschema.json",
    "shapes-card.json",
    "shapes-m1.json",
    "shapes-keys.json",
    "shapes-fleet.json",
    "shapes-metro.json",
    "shapes-settlement.json",
    "keys.json",
    "metro.json",
    "fleet.json",
    "settlement.json",
    "garbage.csv",
    f"clearing-4510-{DAY}.csv",
    "state.sqlite",
    "clearing.sqlite",
    "cards",
    "emptydir",
    "dir/",
    ".",
    "missing.json",
    "no/such/dir/x.json",
    "card.json/x",
    "\udcff.json",
]


def _shapes(card: dict[str, Any], m1: dict[str, Any]) -> dict[str, Any]:
    """Files with the right schema and the wrong shapes inside (lists for objects, strings for numbers, ...)."""
    return {
        "shapes-metro.json": {"schema": "yikatong.metro/1", "cities": [1], "max_trip_minutes": "x"},
        "shapes-keys.json": {"schema": "yikatong.keys/1", "test_keys": "yes", "issuers": [{"city": 4510}]},
        "shapes-fleet.json": {
            "schema": "yikatong.fleet/1",
            "keys": "keys.json",
            "seed": [1],
            "cards": [{"tech": "m1", "city": "4510", "plant": {"default_sectors": [99], "broken_value": "x"}}],
        },
        "shapes-settlement.json": {"schema": "yikatong.settlement/1", "day": DAY, "positions": [1], "pairs": {}},
        "shapes-card.json": {**card, "journal": [1], "defects": {"a": 1}, "trips": [1], "keys": []},
        "shapes-m1.json": {**m1, "blocks": ["zz" * 16] * 64},
    }


def _write_template(folder: Path) -> None:
    def ok(*argv: str) -> None:
        code, out, err = run_cli(list(argv))
        assert code == 0, (argv, out, err)

    with contextlib.chdir(folder):
        ok("card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "5000", "--out", "card.json")
        ok("card", "issue", "--tech", "m1", "--city", "4510", "--balance", "3000", "--out", "m1.json")
        tap = ["terminal", "tap", "--card", "card.json", "--city", "4510", "--kind", "bus", "--fare", "1"]
        ok(*tap)
        ok(*tap, "--state", "state.sqlite")
        ok("clearing", "migrate")
        ok("pki", "init", "--out", "pki", "--city", "4510")
        ok("pki", "issue", "--terminal", "451000000001", "--pki", "pki", "--out", "tls")  # a device's TLS folder
    card, m1 = (json.loads((folder / name).read_text()) for name in ("card.json", "m1.json"))
    docs = {
        **_shapes(card, m1),
        "list.json": [1, 2, 3],
        "wrongschema.json": {"schema": "other/1", "balance": -1},
        "fleet.json": {
            "schema": "yikatong.fleet/1",
            "keys": "keys.json",
            "seed": 1,
            "cards": [
                {"name": "c", "tech": "cpu", "city": "4510", "alg": "sm4"},
                {"name": "m", "tech": "m1", "city": "4560", "profile": "hardened", "m1_keys": "diversified"},
            ],
        },
        # the image format allows a purse more than a transaction record carries
        "big.json": {**card, "max_balance": 2**32 - 1, "balance": 3_000_000_000},
    }
    for name, doc in docs.items():
        (folder / name).write_text(json.dumps(doc))
    (folder / "garbage.json").write_bytes(b"\x00{not json\xff")
    (folder / "empty.json").write_text("")
    (folder / "settlement.json").write_text(f'{{"day": "{DAY}", "positions": {{"4510": 1e999}}}}')
    shutil.copy(fixture_path("keys/test-keys.json"), folder / "keys.json")
    shutil.copy(fixture_path("metro.json"), folder / "metro.json")
    (folder / "garbage.csv").write_text('a,b\n1,"2\n')
    (folder / f"clearing-4510-{DAY}.csv").write_text(
        ",".join(CSV_HEADER) + "\n" + ",".join(["x"] * len(CSV_HEADER)) + "\n"
    )
    write_fixture(folder / "ledgers")  # a day of the three cities' clearing files, problems planted
    for name in ("cards", "emptydir", "dir"):
        (folder / name).mkdir()
    shutil.copy(folder / "card.json", folder / "cards" / "card.json")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("template")
    _write_template(folder)
    return folder


# --- running the CLI in this process -------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` with stdout and stderr as a real process has them (UTF-8; stdout strict as under a UTF-8
    locale, stderr backslashreplace); the exit code, stdout and stderr."""
    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out = io.TextIOWrapper(out_bytes, encoding="utf-8", errors="strict", write_through=True)
    err = io.TextIOWrapper(err_bytes, encoding="utf-8", errors="backslashreplace", write_through=True)
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code: Any = main(argv)
        except SystemExit as exit_:
            code = exit_.code
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message"): Python prints it and exits 1
        err.write(f"{code}\n")
        code = 1
    return code, out_bytes.getvalue().decode("utf-8", "replace"), err_bytes.getvalue().decode("utf-8", "replace")


def check_contract(argv: list[str], code: int, out: str, err: str) -> None:
    shown = f"yikatong {' '.join(argv)!r}\nexit {code}\nstdout: {out[-2000:]}\nstderr: {err[-2000:]}"
    assert code in (0, 1, 2), shown
    assert "Traceback" not in err and "Traceback" not in out, shown
    assert "internal error" not in err, shown  # the guard is for users; a crash must be fixed at its cause
    lines = [line for line in err.splitlines() if line.strip()]
    if code == 2:
        assert lines and "error:" in lines[-1], shown
    elif code == 1:
        assert lines or out.strip(), shown


# --- the subcommands and their options -----------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """A runnable subcommand: its words and its parser."""

    words: tuple[str, ...]
    parser: argparse.ArgumentParser

    @property
    def name(self) -> str:
        return " ".join(self.words)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[Any] | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def leaves(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> Iterator[Leaf]:
    sub = _subparsers(parser)
    if sub is None:
        yield Leaf(words, parser)
        return
    for word, child in sub.choices.items():
        yield from leaves(child, (*words, word))


LEAVES = list(leaves(build_parser()))

_HOSTILE = [
    "",
    " ",
    "-",
    "--",
    "0",
    "-0",
    "-1",
    "-2147483648",
    "1",
    "2147483647",
    "2147483648",
    "4294967295",
    "4294967296",
    "999999999999",
    "9" * 40,
    "1" + "0" * 5000,
    "1e9",
    "1.5",
    "0x10",
    "nan",
    "inf",
    "-inf",
    "1e999",
    "\u00b2\u00b2\u00b2\u00b2",  # superscript twos: str.isdigit() says yes, int() says no
    "\u0661\u0662\u0663\u0664",  # Arabic-Indic digits: isdigit() and int() say yes
    "\uff14\uff15\uff11\uff10",  # fullwidth 4510
    "济南",
    "\u202e4510",
    "😀",
    "\udcff\udcfe",  # a non-UTF-8 argument as Python sees it (surrogate-escaped bytes)
    "a,b",
    "=",
    "4510=",
    "4510:4560=",
    "FFFFFFFFFFFF",
    "ffffffff",
    "0x",
    "2026-02-30",
    "9999-12-31",
    "0001-01-01",
    "--help",
    "-h",
    *PATHS,
]
_CITIES = ["4510", "4560", "4530", "9999", "0000"]
_FEN = ["0", "1", "200", "5000", "99999", "2147483647", "2147483648", "4294967296", "999999999999"]
_FLOATS = ["0", "0.01", "-1", "nan", "inf", "1e308", "5"]
_INTS = ["1", "2", "0", "-1", "99999999999999999999"]
_BAD_BROKERS = [
    "mqtt://",
    "http://127.0.0.1",
    "mqtt://h:99999",
    "mqtt://h/x",
    "mqtts://",
    "mqtts://h/x",
    "127.0.0.1:1883",
]
_GOOD_BROKERS = ["mqtt://127.0.0.1:1", "mqtt://u:p@127.0.0.1:1883", "mqtts://127.0.0.1:1", *_BAD_BROKERS]
_DATABASES = [
    "sqlite:///clearing.sqlite",
    "sqlite:///new.sqlite",
    "sqlite:///garbage.json",
    "sqlite:///dir",
    "sqlite:///no/such/dir/x.sqlite",
    "sqlite://",
    "sqlite:///\udcff.sqlite",
    "mysql://u@h/db",
    "postgresql+psycopg2://u@h/db",
    "nonsense",
    "",
]
_BY_TYPE: dict[str, list[str]] = {
    "fen": _FEN,
    "positive": ["1", "2", "3", "0", "-3", "10000000000", "\u0663"],
    "city_code": _CITIES,
    "_cities": ["4510,4560", "4510,4510", ",", "4510,x"],
    "_positive_float": ["1", "0.001", "1e308", "0", "nan"],
    "_day": [DAY, "2026-13-01", "20261124", *_HOSTILE[-20:-16]],
    "_date": ["2026-01-01", "2026-02-29", "9999-12-31", "0001-01-01"],
    "_percent": ["0.5", "100", "101", "-1", "NaN", "1e999", "0.5%", "sNaN"],
    "_pair_rate": ["4510:4560=0.4", "4510:4560=1e999", "4510:4510=nan", "4510:4560=100"],
    "_sequence": ["77", "999999999999", "1234567890123", "\u0667\u0667"],
    "_block": ["3", "7", "0", "63", "64", "\u0663"],
    "_key_type": ["A", "B", "b", "C"],
    "_severity": ["high", "critical", "pass", "info", "x"],
    "_card_id": ["45100000000000000001", "9C599B32", "9c599b32", "x"],
    "float": _FLOATS,
    "seconds": _FLOATS,
    "interval": _FLOATS,
    "session_expiry": ["0", "5", "300", "4294967294", "4294967295", "-1"],
    "int": _INTS,
    "file_path": PATHS,
}
_LEDGERS = [f"ledgers/clearing-{city}-{DAY}.csv" for city in ("4510", "4560", "4530")]
_LEDGERS += [f"{city}=ledgers/issuer-{city}-{DAY}.csv" for city in ("4510", "4560", "4530")]
_BY_DEST: dict[str, list[str]] = {
    "db": _DATABASES,
    "card": ["card.json", "m1.json", "big.json", "shapes-card.json", "shapes-m1.json"],
    "image": ["card.json", "m1.json", "big.json", "shapes-card.json", "shapes-m1.json"],
    "fleet": ["fleet.json", "shapes-fleet.json"],
    "cards": ["cards"],
    "keys": ["keys.json", "shapes-keys.json"],
    "fares": ["metro.json", "shapes-metro.json"],
    "state": ["state.sqlite", "new.sqlite"],
    "settlement": [f"ledgers/settlement-{DAY}.json", "settlement.json", "shapes-settlement.json"],
    "out": ["out.json", "out", "."],
    "json": ["report.json", "dir"],
    "html": ["report.html", "dir"],
    "line": ["M1", "M9", ""],
    "station": ["A03", "Z99", ""],
    "holder": ["张三", "x" * 200],
    "files": [*_LEDGERS, "card.json", f"clearing-4510-{DAY}.csv", f"4510=clearing-4510-{DAY}.csv", "9999=garbage.csv"],
    "worker": ["a", ""],
    "host": ["127.0.0.1"],
    "tls_dir": ["tls", "pki", "card.json"],
    "cert": ["tls/cert.pem", "tls/key.pem", "card.json"],
    "key": ["tls/key.pem", "tls/cert.pem"],
    "ca": ["tls/ca.pem", "pki/chain.pem", "card.json"],
    "pki": ["pki", "tls"],
    "crl": ["pki/crl.pem", "tls/cert.pem", "card.json"],
}


def _hex_digits(function: Callable[..., Any]) -> int | None:
    """The digit count of a ``hex_number(digits)`` type (its closure), or of a type wrapping one."""
    if function.__qualname__.startswith("hex_number."):
        return int(function.__closure__[0].cell_contents)  # type: ignore[index]
    return {"_uid": 8}.get(function.__name__)


def typed_values(action: argparse.Action, unsafe: bool) -> list[list[str]]:
    """Values that mean something to this option (valid ones and near misses): the option's own first (by
    name), then those of its type."""
    if action.dest == "broker" or getattr(action.type, "__name__", "") == "broker_url":
        return [_GOOD_BROKERS if unsafe else _BAD_BROKERS]
    if action.choices is not None:
        return [[str(getattr(c, "value", c)) for c in action.choices], ["x", ""]]
    tiers = [_BY_DEST.get(action.dest, [])]
    kind = action.type
    if callable(kind):
        digits = _hex_digits(kind)
        if digits is not None:
            tiers.append(["9C599B32A1E4"[:digits], "F" * digits, "0x" + "0" * digits, "G" * digits, "1" * (digits + 1)])
        tiers.append(_BY_TYPE.get(getattr(kind, "__name__", ""), []))
    return [tier for tier in tiers if tier]


_safe_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00/"), max_size=12
)  # no '/': a path from random text stays in the example's folder
_binaryish = st.binary(min_size=1, max_size=8).map(os.fsdecode).map(lambda s: s.replace("\x00", "").replace("/", "_"))


def _value(action: argparse.Action, unsafe: bool) -> st.SearchStrategy[str]:
    tiers = typed_values(action, unsafe)
    typed = st.one_of([st.sampled_from(tier) for tier in tiers]) if tiers else None
    if action.dest in ("db", "broker") and not unsafe:  # only SQLite in the example folder, or refused early
        assert typed is not None
        return typed
    hostile = st.one_of(st.sampled_from(_HOSTILE), _safe_text, _binaryish)
    if typed is None:
        return hostile
    # mostly meaningful values, so that commands get past argparse and their own checks; a hostile one in six
    return st.integers(0, 5).flatmap(lambda n: hostile if n == 5 else typed)


def _blocked(token: str, unsafe: bool) -> bool:
    """An option (or an abbreviation argparse would expand to it) the running commands must not get."""
    if unsafe or not token.startswith("--"):
        return False
    name = token.split("=", 1)[0]
    return len(name) > 2 and any(option.startswith(name) for option in BLOCKED)


@st.composite
def argument_lists(draw: st.DrawFn, leaf: Leaf) -> list[str]:
    unsafe = leaf.words in UNSAFE
    units: list[list[str]] = []
    option_names: list[str] = []
    needed = set()  # one option of each required group (the others rarely: they conflict)
    for group in leaf.parser._mutually_exclusive_groups:
        members = [a for a in group._group_actions if not all(_blocked(o, unsafe) for o in a.option_strings)]
        if group.required and members:
            needed.add(id(draw(st.sampled_from(members))))
    for action in leaf.parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if action.option_strings:
            names = [o for o in action.option_strings if not _blocked(o, unsafe)]
            if not names:
                continue
            option_names += names
            # required ones (or one of a required group) nearly always; a broker URL bound to fail rarely. The
            # draws are so that Hypothesis's simplest choice (0) is the sane one: required given, others left out
            if action.required or id(action) in needed:
                if draw(st.integers(0, 9)) == 9:
                    continue
            elif draw(st.integers(0, 9)) < (9 if action.dest == "broker" and not unsafe else 7):
                continue
            name = draw(st.sampled_from(names))
            if action.nargs == 0:
                units.append([name])
            elif draw(st.integers(0, 9)) == 0:
                units.append([f"{name}={draw(_value(action, unsafe))}"])
            else:
                units.append([name, draw(_value(action, unsafe))])
        else:
            low, high = {"*": (0, 3), "+": (1, 3), "?": (0, 1)}.get(str(action.nargs), (1, 1))
            if draw(st.integers(0, 9)) == 0:
                low = max(0, low - 1)
            units += [[draw(_value(action, unsafe))] for _ in range(draw(st.integers(low, high)))]
    junk = st.one_of(st.sampled_from(option_names or ["--x"]), st.sampled_from(_HOSTILE), _safe_text)
    units += [[draw(junk)] for _ in range(max(0, draw(st.integers(-4, 2))))]
    tokens = list(itertools.chain.from_iterable(draw(st.permutations(units))))
    return [*leaf.words, *("x" if _blocked(t, unsafe) else t for t in tokens)]


# --- the tests -----------------------------------------------------------------------------------------


class TouchedTheOutside(Exception):
    """A fuzzed command tried the network or a PC/SC reader."""


def _no_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise TouchedTheOutside("the fuzz test must not reach the network or PC/SC")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr("terminals.pcsc.PcscReader", refuse)  # (the commands import it from there when they run)


def _stub(leaf: Leaf, monkeypatch: pytest.MonkeyPatch) -> list[argparse.Namespace]:
    """Replace the command function of an unsafe leaf (looked up by name at each build_parser) by a stub."""
    command = leaf.parser.get_default("run")
    calls: list[argparse.Namespace] = []

    def stub(args: argparse.Namespace) -> int:
        calls.append(args)
        return 0

    monkeypatch.setattr(f"{command.__module__}.{command.__name__}", stub)
    return calls


def test_every_subcommand_is_found() -> None:
    names = {leaf.words for leaf in LEAVES}
    assert ("terminal", "tap") in names and ("audit", "reconcile") in names and ("clearing", "hotlist", "list") in names
    assert set(UNSAFE) <= names, "UNSAFE names a subcommand that no longer exists"
    for leaf in LEAVES:
        assert callable(leaf.parser.get_default("run")), f"{leaf.name} sets no command function"


@pytest.mark.parametrize("leaf", LEAVES, ids=[leaf.name.replace(" ", "-") for leaf in LEAVES])
def test_fuzzed_arguments_exit_0_1_2_without_traceback(
    leaf: Leaf, template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _no_outside(monkeypatch)
    if leaf.words in UNSAFE:
        _stub(leaf, monkeypatch)
    counter = itertools.count()

    @settings(
        max_examples=EXAMPLES.get(leaf.words, DEFAULT_EXAMPLES),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(argument_lists(leaf))
    def run(argv: list[str]) -> None:
        folder = tmp_path / f"example-{next(counter)}"
        shutil.copytree(template, folder, symlinks=True)
        monkeypatch.chdir(folder)
        code, out, err = run_cli(argv)
        check_contract(argv, code, out, err)

    run()


def test_stubbed_commands_do_get_parsed_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    leaf = next(leaf for leaf in LEAVES if leaf.words == ("terminal", "sync"))
    calls = _stub(leaf, monkeypatch)
    monkeypatch.chdir(tmp_path)
    assert run_cli(["terminal", "sync", "--state", "s.sqlite", "--broker", "mqtt://127.0.0.1:1"])[0] == 0
    assert len(calls) == 1 and calls[0].broker.port == 1


@pytest.fixture
def workdir(template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh copy of the template folder as the current directory."""
    folder = tmp_path / "work"
    shutil.copytree(template, folder)
    monkeypatch.chdir(folder)
    _no_outside(monkeypatch)
    return folder


@pytest.mark.parametrize("fare", ["999999999999", "2147483648", "0", "-5", "1" + "0" * 5000])
def test_a_fare_beyond_the_card_is_refused_by_argparse(workdir: Path, fare: str) -> None:
    before = (workdir / "card.json").read_bytes()
    code, _, err = run_cli(
        ["terminal", "tap", "--card", "card.json", "--city", "4510", "--kind", "bus", "--fare", fare]
    )
    assert code == 2 and "argument --fare" in err and "Traceback" not in err
    assert "at least 1 and at most 2147483647" in err, err
    assert (workdir / "card.json").read_bytes() == before


def test_the_largest_fare_is_a_refusal_not_a_crash(workdir: Path) -> None:
    argv = ["terminal", "tap", "--card", "card.json", "--city", "4510", "--kind", "bus", "--fare", "2147483647"]
    code, out, err = run_cli(argv)
    assert code == 1 and "REFUSED" in out and err == ""


# What the fuzz found (each crashed with a traceback before), as plain regression cases: argv, exit, message.
FOUND = [
    (["terminal", "tap", "--card", "card.json", "--city", "4510", "--kind", "bus", "--fare", "999999999999"], 2,
     "out of range"),
    (["terminal", "tap", "--card", "big.json", "--city", "4510", "--kind", "bus", "--fare", "1"], 2,
     "more than a transaction record carries"),
    (["terminal", "tap", "--card", "card.json", "--city", "4510", "--kind", "bus", "--fare", "1", "--fares",
      "shapes-metro.json"], 2, "shapes-metro.json: "),
    (["terminal", "status", "--state", "1" + "0" * 5000], 2, "File name too long"),
    (["card", "issue", "--city", "4510", "--tech", "m1", "--balance", "0", "--out", ".", "--force"], 2,
     ". is a folder"),
    (["card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "1", "--out", "a.json", "--start",
      "9999-12-31"], 2, "give --expiry"),
    (["card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "1", "--out", "a.json", "--start",
      "0001-01-01"], 2, "from 1000-01-01 to 9999-12-31"),
    (["card", "issue", "--city", "\u0664\u0665\u0661\u0660", "--alg", "sm4", "--balance", "1", "--out", "a.json"], 2,
     "4-digit city code"),
    (["clearing", "status", "--city", "4510", "--db", "sqlite:///\udcff.sqlite"], 2, "must be UTF-8 text"),
    (["clearing", "migrate", "--db", "sqlite:///dir"], 2, "dir is a folder, not a SQLite file"),
    (["clearing", "hotlist", "list", "--city", "4510", "--db", "sqlite:///no/such/x.sqlite"], 2,
     "no such SQLite file"),
    (["audit", "chips", "--fleet", "shapes-fleet.json"], 2, "'seed' must be a whole number"),
    (["card", "show", "new\nline\x85.json"], 2, "new\\nline\\x85.json"),
    (["card", "show", "\u202ecard.json"], 2, "\\u202ecard.json"),
    (["pki", "init", "--out=--"], 2, "argument --out: expected a value, not '--'"),
    (["load", "--broker", "mqtts://127.0.0.1:1"], 2, "need --pki DIR"),
    (["load", "--broker", "mqtts://127.0.0.1:1", "--pki", "pki"], 2, "--pki needs --seed N"),
    (["load", "--broker", "mqtts://127.0.0.1:1", "--pki", "pki", "--seed", "1", "--cities", "4510"], 2,
     "run 'yikatong load --pki pki --issue-certificates-only' with the same"),
    (["load", "--pki", "pki", "--issue-certificates-only", "--seed", "1"], 2, "no CA for city 4530 in pki"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "code", "message"), FOUND, ids=[" ".join(a[:2]) for a, _, _ in FOUND])
def test_what_the_fuzz_found(workdir: Path, argv: list[str], code: int, message: str) -> None:
    got, out, err = run_cli(argv)
    check_contract(argv, got, out, err)
    assert got == code and message in err, err
    assert len(err.splitlines()) == 1 or "usage:" in err


def test_a_leap_day_start_gets_a_default_expiry(workdir: Path) -> None:
    argv = ["card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "1", "--out", "a.json"]
    assert run_cli([*argv, "--start", "2024-02-29"])[0] == 0
    assert "2024-02-29 to 2034-02-28" in run_cli(["card", "show", "a.json"])[1]


def test_undecodable_file_names_are_printed_escaped(workdir: Path) -> None:
    code, out, err = run_cli(
        ["card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "1", "--out", "\udcff.json"]
    )
    assert code == 0 and err == "" and out.rstrip().endswith("-> \\udcff.json")
    assert (workdir / os.fsdecode(b"\xff.json")).exists()


def test_internal_error_guard(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    leaf = next(leaf for leaf in LEAVES if leaf.words == ("card", "show"))
    command = leaf.parser.get_default("run")

    def boom(_args: argparse.Namespace) -> int:
        raise OverflowError("int too big\nto convert")

    monkeypatch.setattr(f"{command.__module__}.{command.__name__}", boom)
    monkeypatch.delenv("YIKATONG_DEBUG", raising=False)
    code, out, err = run_cli(["card", "show", "x.json"])
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("yikatong: internal error: OverflowError: int too big to convert (please report")
    assert "YIKATONG_DEBUG=1" in err
    monkeypatch.setenv("YIKATONG_DEBUG", "1")
    with pytest.raises(OverflowError):
        main(["card", "show", "x.json"])


def test_ctrl_c_exits_130_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    leaf = next(leaf for leaf in LEAVES if leaf.words == ("card", "show"))
    command = leaf.parser.get_default("run")

    def interrupted(_args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(f"{command.__module__}.{command.__name__}", interrupted)
    assert run_cli(["card", "show", "x.json"]) == (130, "", "")


@pytest.mark.parametrize(
    ("parse", "text", "value"),
    [
        (argtypes.fen, "0", 0),
        (argtypes.fen, "+2147483647", 2**31 - 1),
        (argtypes.fen, " 200 ", 200),
        (argtypes.fen, "2147483648", None),
        (argtypes.fen, "-1", None),
        (argtypes.fen, "1_000", None),
        (argtypes.fen, "\u0661\u0662", None),  # other scripts' digits: int() takes them, a fare does not
        (argtypes.fen_amount, "1", 1),
        (argtypes.fen_amount, "0", None),
        (argtypes.positive, "3", 3),
        (argtypes.positive, "\u00b2", None),  # isdigit() says yes, int() raises
        (argtypes.positive, "9" * 5000, None),  # int() refuses 5,000 digits: the message is ours
        (argtypes.seconds, "0", 0.0),
        (argtypes.seconds, "2.5", 2.5),
        (argtypes.seconds, "nan", None),  # would wait for ever
        (argtypes.seconds, "-1", None),
        (argtypes.seconds, "inf", None),
        (argtypes.city_code, "4510", "4510"),
        (argtypes.city_code, "\uff14\uff15\uff11\uff10", None),
    ],
)
def test_argument_types(parse: Callable[[str], Any], text: str, value: Any) -> None:
    if value is None:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    else:
        assert parse(text) == value
