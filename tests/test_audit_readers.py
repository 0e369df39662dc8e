"""The chip audit of M1 cards through readers: a PC/SC Part 3 reader (pcscd + vpcd, the checks it permits)
and an emulated PN532 on a pty (raw frames: every check, nested key recovery included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import ServedCard

from cardsim.image import load_card, save_card
from cardsim.m1_issue import KeyScheme, issue_m1_card
from cardsim.mifare import Profile
from terminals.pcsc import PcscReader, list_readers

READER = "Virtual PCD 00 00"
UID = bytes.fromhex("5A6B7C8D")


def audit(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    """``yikatong audit chips ARGS --out DIR``: the finished command and its JSON report."""
    report = tmp_path / "audit-chips.json"
    html = tmp_path / "audit-chips.html"
    done = subprocess.run(
        [sys.executable, "-m", "yikatong.cli", "audit", "chips", *args, "--json", str(report), "--html", str(html)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.exists(), done.stdout + done.stderr
    return done, json.loads(report.read_text())


@pytest.mark.pcsc
def test_part3_reader_audit_runs_the_checks_it_permits_and_names_the_rest(tmp_path: Path) -> None:
    assert READER in list_readers(), "run scripts/services.sh to start pcscd with vpcd"
    state = issue_m1_card(UID, Profile.GENUINE, KeyScheme.DEFAULT, 1500, bytes(16), city="4510")
    state.blocks[5] = state.blocks[5][:4] + bytes(4) + state.blocks[5][8:]  # the backup's redundancy broken
    image = tmp_path / "m1.json"
    save_card(image, state)
    before = image.read_text()
    reader = PcscReader(READER)
    with ServedCard(image) as serve:
        reader.wait_for_card(timeout=20)
        done, report = audit(tmp_path, "--reader", READER, "--count", "1", "--wait", "20")
    assert reader.wait_for_removal(timeout=30), "pcscd still sees the M1 card after card serve stopped"
    assert serve.returncode == 0, serve.output
    assert done.returncode == 1, done.stderr  # critical findings
    found = {f["id"]: f for f in report["findings"]}  # type: ignore[attr-defined]
    assert set(found) == {"M1-CRYPTO1", "M1-DEFAULT-KEY", "M1-VALUE-BLOCK"}, found
    assert "PC/SC Part 3, MIFARE Classic 1K" in found["M1-CRYPTO1"]["evidence"][0]
    assert found["M1-VALUE-BLOCK"]["details"]["block"] == 5
    [subject] = report["subjects"]  # type: ignore[misc]
    assert (subject["subject"], subject["city"], subject["keys known"]) == (UID.hex().upper(), "4510", "32 of 32")
    [raw] = [line for line in report["skipped"] if "raw frames" in line]  # type: ignore[attr-defined]
    for check in ("M1-WEAK-PRNG", "M1-MAGIC", "M1-BACKDOOR-KEY", "M1-KEY-RECOVERED"):
        assert check in raw, raw
    assert image.read_text() == before  # the audit only reads, and block 0 refused its own bytes
    assert load_card(image) == state
