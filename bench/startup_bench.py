"""Benchmark: wall time of starting the command line, each run a fresh interpreter (median of N runs):
``yikatong --help``, each command group's ``--help``, and ``audit mfkey32`` on crapto1's published mfkey32v2
vector (proxmark3 tools/mfc/card_reader/mfkey_examples.md; key A0A1A2A3A4A5), beside the bare interpreter.

    python3 bench/startup_bench.py [--runs 11] [--before 018911e]

--before COMMIT extracts that commit's tree (git archive) into a temporary folder and times the same commands
there too, alternating with this tree's runs, so that both columns and their ratio come from one run (018911e:
the tree before issue 16, where every command imported SQLAlchemy, Alembic and NumPy and mfkey32 was NumPy).
The trees' own packages shadow the installed one (``python -m yikatong.cli`` with the tree as the current
folder); a commit that needs the C extension (audit/_crypto1.c) cannot be a --before.

Not a test: it prints figures (the aims of issue 16 beside them) and checks only that each command exits 0.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MFKEY32 = ["audit", "mfkey32", "12345678", "1AD8DF2B", "1D316024", "620EF048", "30D6CB07", "C52077E2", "837AC61A"]
GROUPS = ["demo", "card", "terminal", "clearing", "audit", "load"]
AIMS = {"--help": 0.25, " ".join(MFKEY32): 0.6}  # seconds (issue 16)


def _commands() -> list[list[str]]:
    return [["--help"], *([group, "--help"] for group in GROUPS), MFKEY32]


def _time(tree: Path, argv: list[str]) -> float:
    """Seconds for one run of the command line (``argv`` empty: the bare interpreter) in ``tree``."""
    cmd = [sys.executable, "-m", "yikatong.cli", *argv] if argv else [sys.executable, "-c", "pass"]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=tree, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} in {tree} exited {done.returncode}: {done.stderr.decode()[-300:]}")
    return elapsed


def _extract(commit: str, into: Path) -> Path:
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=11, help="runs per command and tree (median; default 11)")
    parser.add_argument("--before", metavar="COMMIT", help="also time this commit's tree, side by side")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="yikatong-before-") as temp:
        trees = {"now": ROOT}
        if args.before:
            trees = {"before": _extract(args.before, Path(temp)), "now": ROOT}
        rows = [[], *_commands()]
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.runs):
            for i, argv in enumerate(rows):
                for name, tree in trees.items():  # alternating: both trees see the same machine
                    times.setdefault((name, i), []).append(_time(tree, argv))
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"median wall seconds of {args.runs} runs, a fresh interpreter each ({sys.executable})")
    header = f"{'command':<28}" + "".join(f"{name:>9}" for name in trees)
    print(header + ("    ratio" if args.before else "") + "      aim")
    for i, argv in enumerate(rows):
        label = "python -c pass" if not argv else "yikatong " + " ".join(argv)
        label = label if len(label) <= 27 else label[:24] + "..."
        line = f"{label:<28}" + "".join(f"{median[(name, i)]:>9.3f}" for name in trees)
        if args.before:
            line += f"{median[('before', i)] / median[('now', i)]:>8.1f}x"
        aim = AIMS.get(" ".join(argv))
        print(line + (f"   < {aim:g}" if aim else ""))


if __name__ == "__main__":
    main()
