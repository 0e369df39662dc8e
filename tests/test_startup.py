"""Fast start: each command imports only what it uses. ``yikatong --help``, every command's ``--help`` and
``audit mfkey32`` run in a fresh interpreter, and the modules they loaded are checked: no database, MQTT,
NumPy, pyarrow, pydantic or event-loop layer for a command that does not need it (those made every command
start in about a second). The command paths are found by walking the parser, so a new command is checked
without touching this file. Timings are bench/startup_bench.py's, not this test's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from yikatong.cli import build_parser

# What no --help loads: the packages behind the databases, MQTT, the wire models, the columnar reader, the
# metrics and the event loop (the commands that use them import them when they run).
HEAVY = (
    "sqlalchemy",
    "alembic",
    "aiosqlite",
    "asyncpg",
    "numpy",
    "pyarrow",
    "pydantic",
    "aiomqtt",
    "paho",
    "amqtt",
    "smartcard",
    "hdrh",
    "prometheus_client",
    "asyncio",
)
# crapto1's mfkey32v2 example (proxmark3 tools/mfc/card_reader/mfkey_examples.md): key A0A1A2A3A4A5
MFKEY32_VECTOR = ["12345678", "1AD8DF2B", "1D316024", "620EF048", "30D6CB07", "C52077E2", "837AC61A"]

# Runs the command line in the child and prints, as JSON, its exit code, its stdout and every module it loaded.
_PROBE = """
import contextlib, io, json, sys
from yikatong.cli import main
with contextlib.redirect_stdout(io.StringIO()) as out:
    code = main(json.loads(sys.argv[1]))
print(json.dumps({"code": code, "out": out.getvalue(), "modules": sorted(sys.modules)}))
"""


def _command_paths(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command and command group, as the words that name it (the top level is ``()``)."""
    paths = [words]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _command_paths(sub, (*words, name))
    return paths


COMMANDS = _command_paths(build_parser())


def _run(argv: list[str], cwd: Path) -> tuple[int, str, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(argv)], cwd=cwd, capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout.splitlines()[-1])
    return result["code"], result["out"], set(result["modules"])


def _loaded(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(p for p in packages if p in modules or any(m.startswith(p + ".") for m in modules))


def test_the_walk_finds_the_commands() -> None:
    assert {(), ("audit",), ("audit", "mfkey32"), ("clearing", "serve"), ("load",), ("demo",)} <= set(COMMANDS)


@pytest.mark.parametrize("words", COMMANDS, ids=[" ".join(w) or "yikatong" for w in COMMANDS])
def test_help_loads_no_heavy_layer(words: tuple[str, ...], tmp_path: Path) -> None:
    code, out, modules = _run([*words, "--help"], tmp_path)
    assert code == 0
    assert out.startswith(f"usage: {' '.join(['yikatong', *words])}")
    assert "yikatong.cli" in modules  # the probe sees what the command loaded
    assert _loaded(modules, HEAVY) == []


def test_mfkey32_on_the_published_vector_loads_no_numpy(tmp_path: Path) -> None:
    """The key search is C (audit._crypto1): the command needs neither NumPy nor anything above the cipher."""
    code, out, modules = _run(["audit", "mfkey32", *MFKEY32_VECTOR], tmp_path)
    assert (code, out) == (0, "A0A1A2A3A4A5\n")
    assert "audit._crypto1" in modules
    assert _loaded(modules, HEAVY) == []


def test_a_command_that_needs_the_database_still_loads_it(tmp_path: Path) -> None:
    """The check can fail: a database command does load SQLAlchemy (and only when it runs)."""
    code, _, modules = _run(["clearing", "migrate", "--db", f"sqlite:///{tmp_path / 'c.sqlite'}"], tmp_path)
    assert code == 0
    assert _loaded(modules, ("sqlalchemy", "alembic")) == ["alembic", "sqlalchemy"]
