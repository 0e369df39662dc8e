"""`yikatong demo` runs to its summary: rides in every city, every TAC verified, net positions sum to 0."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cardsim.image import load_purse
from yikatong.cli import main


def test_demo_runs_to_its_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--out", str(tmp_path), "--rides", "120", "--cards", "2"]) == 0
    out = capsys.readouterr().out
    assert "issued 12 cards" in out
    assert "net positions sum to 0 fen; TAC failures: 0" in out
    for city in ("4510 Jinan", "4560 Yantai", "4530 Zibo"):
        assert city in out
    rides = [int(m) for m in re.findall(r"^\d{4} \w+ +(\d+)", out, re.MULTILINE)]
    assert sum(rides) == 120
    images = sorted((tmp_path / "cards").glob("*.json"))
    assert len(images) == 12
    assert sum(load_purse(p).offline_counter for p in images) == 120
