"""M1 card images and commands: issue, show, nested attack; bad input answered with exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cardsim.image import CardImageError, load_card, m1_from_json, m1_to_json
from cardsim.mifare import M1State, Profile, parse_value_block


def yk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "yikatong.cli", *args], capture_output=True, text=True, timeout=300)


def issue(tmp_path: Path, *extra: str) -> Path:
    out = tmp_path / "m1.json"
    result = yk(
        "card",
        "issue",
        "--city",
        "4560",
        "--tech",
        "m1",
        "--balance",
        "2500",
        "--uid",
        "9C599B32",
        "--out",
        str(out),
        *extra,
    )
    assert result.returncode == 0, result.stderr
    return out


def test_issue_and_show_an_m1_card(tmp_path: Path) -> None:
    out = issue(tmp_path, "--profile", "fm11rf08s", "--m1-keys", "shared")
    state = load_card(out)
    assert isinstance(state, M1State) and state.profile is Profile.FM11RF08S
    assert state.uid == 0x9C599B32 and parse_value_block(state.blocks[4]) == (2500, 4)
    assert m1_from_json(m1_to_json(state)) == state
    shown = yk("card", "show", str(out))
    assert shown.returncode == 0 and "UID 9C599B32" in shown.stdout and "25.00 yuan" in shown.stdout


def test_nested_attack_from_the_command_line(tmp_path: Path) -> None:
    out = issue(tmp_path, "--m1-keys", "default")
    result = yk(
        "audit",
        "nested",
        str(out),
        "--known-block",
        "3",
        "--known-key",
        "FFFFFFFFFFFF",
        "--target-block",
        "9",
        "--target-type",
        "B",
    )
    assert result.returncode == 0 and result.stdout.strip() == "FFFFFFFFFFFF"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            [
                "card",
                "issue",
                "--city",
                "4560",
                "--tech",
                "m1",
                "--balance",
                "1",
                "--uid",
                "9C59",
                "--out",
                "{tmp}/x.json",
            ],
            "not 8 hex digits",
        ),
        (
            [
                "card",
                "issue",
                "--city",
                "4560",
                "--tech",
                "m1",
                "--balance",
                "1",
                "--profile",
                "ev2",
                "--out",
                "{tmp}/x.json",
            ],
            "invalid choice",
        ),
        (
            ["audit", "nested", "{m1}", "--known-block", "3", "--known-key", "FFFFFFFFFFF", "--target-block", "7"],
            "not 12 hex digits",
        ),
        (
            ["audit", "nested", "{m1}", "--known-block", "64", "--known-key", "FFFFFFFFFFFF", "--target-block", "7"],
            "block number",
        ),
        (
            ["audit", "nested", "{m1}", "--known-block", "3", "--known-key", "123456789ABC", "--target-block", "7"],
            "wrong key",
        ),
        (
            [
                "audit",
                "nested",
                "{tmp}/missing.json",
                "--known-block",
                "3",
                "--known-key",
                "FFFFFFFFFFFF",
                "--target-block",
                "7",
            ],
            "cannot read card image",
        ),
    ],
)
def test_bad_input_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    m1 = issue(tmp_path)
    result = yk(*[a.replace("{tmp}", str(tmp_path)).replace("{m1}", str(m1)) for a in args])
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.json").exists()


def test_corrupt_m1_image_is_refused() -> None:
    doc = m1_to_json(M1State(blocks=[bytes(16)] * 64))
    doc["blocks"] = doc["blocks"][:10]
    with pytest.raises(CardImageError, match="64 blocks"):
        m1_from_json(doc)
    doc["profile"] = "unknown"
    with pytest.raises(CardImageError, match="profile"):
        m1_from_json(doc)
