"""Card images round-trip and refuse corruption by name; the card CLI answers bad input with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from support import TERMINAL, WHEN, new_card, new_psam, readers

from cardsim.image import CardImageError, load_purse, purse_from_json, purse_to_json, save_purse
from cardsim.purse import PurseCard
from terminals.flows import purchase
from yikatong.cli import main


def yk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "yikatong.cli", *args], capture_output=True, text=True, timeout=60)


def test_image_round_trip_keeps_everything(tmp_path: Path) -> None:
    card = new_card()
    purchase(*readers(card, new_psam()), TERMINAL, 123, WHEN, trip_record=bytes(48))
    path = tmp_path / "c.json"
    save_purse(path, card.state)
    assert load_purse(path) == card.state
    assert not list(tmp_path.glob(".*tmp")), "atomic save leaves no temporary file"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(balance=-1), "field 'balance'"),
        (lambda d: d.update(balance="5000"), "field 'balance'"),
        (lambda d: d.update(balance=200_000), "field 'balance'"),
        (lambda d: d.update(algorithm="aes"), "field 'algorithm'"),
        (lambda d: d["keys"].update(purchase="XYZ"), "field 'purchase'"),
        (lambda d: d["keys"].pop("tac"), "field 'tac'"),
        (lambda d: d["files"].update({"15": "00"}), "field '15' must be 30 bytes"),
        (lambda d: d.update(log=["00"]), "field 'log'"),
        (lambda d: d.update(schema="other/1"), "schema"),
        (lambda d: d.update(tech="m1"), "not a CPU purse"),
        (lambda d: d.update(locked="no"), "field 'locked'"),
        (lambda d: d.update(journal={"valid": True, "updates": {"colour": 1}}), "unknown update"),
    ],
)
def test_corrupt_images_are_refused_by_field(mutate, message: str) -> None:
    doc = purse_to_json(new_card().state)
    mutate(doc)
    with pytest.raises(CardImageError, match=message):
        purse_from_json(doc, "x.json")


def test_cli_issue_show_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "card.json"
    assert (
        main(
            [
                "card",
                "issue",
                "--city",
                "4510",
                "--alg",
                "sm4",
                "--balance",
                "5000",
                "--out",
                str(out),
                "--sequence",
                "77",
            ]
        )
        == 0
    )
    state = load_purse(out)
    assert state.balance == 5000 and state.public.application_serial.hex() == "31044510000000000077"
    assert main(["card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "1", "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert load_purse(out).balance == 5000, "an existing image is never overwritten without --force"
    card = PurseCard(state, bytes)
    purchase(*readers(card, new_psam()), TERMINAL, 250, WHEN)
    save_purse(out, card.state)
    assert main(["card", "show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "3104 4510 0000 0000 0077" in shown and "47.50 yuan (4750 fen)" in shown and "purchase" in shown
    assert "2026-11-24 08:15:02" in shown


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["card", "issue", "--city", "9999", "--alg", "sm4", "--balance", "1", "--out", "{tmp}/a.json"],
            "no issuer keys",
        ),
        (
            ["card", "issue", "--city", "4510", "--alg", "rsa", "--balance", "1", "--out", "{tmp}/a.json"],
            "invalid choice",
        ),
        (["card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "1.5", "--out", "{tmp}/a.json"], "fen"),
        (
            ["card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "1", "--out", "{tmp}/no/a.json"],
            "not a directory",
        ),
        (
            [
                "card",
                "issue",
                "--city",
                "4510",
                "--alg",
                "sm4",
                "--balance",
                "1",
                "--out",
                "{tmp}/a.json",
                "--keys",
                "{tmp}/missing.json",
            ],
            "missing.json",
        ),
        (["card", "show", "{tmp}/missing.json"], "cannot read card image"),
        (["card", "show", "{tmp}/garbage.json"], "not valid JSON"),
        (["card", "serve", "{tmp}/garbage.json"], "not valid JSON"),
        (["card"], "required"),
    ],
)
def test_cli_bad_input_exits_2_without_traceback(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "garbage.json").write_bytes(b"\x00{not json")
    result = yk(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "a.json").exists()


def test_help_lists_the_card_commands() -> None:
    result = yk("card", "--help")
    assert result.returncode == 0
    for command in ("issue", "show", "serve"):
        assert command in result.stdout


def test_images_are_plain_json_people_can_read(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    save_purse(path, new_card().state)
    doc = json.loads(path.read_text())
    assert doc["schema"] == "yikatong.card/1" and doc["algorithm"] == "sm4" and doc["balance"] == 5000


def test_a_top_up_past_the_issuers_maximum_is_refused_by_the_host_it_is_configured_with(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    card = str(tmp_path / "card.json")
    issue = ["card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "90000", "--max-balance", "500000"]
    assert main([*issue, "--out", card]) == 0
    top_up = ["terminal", "tap", "--card", card, "--city", "4510", "--kind", "topup", "--amount", "20000"]
    top_up += ["--state", str(tmp_path / "t.sqlite")]
    capsys.readouterr()
    assert main(top_up) == 1  # the card would take it; the host holds the product maximum (100,000 fen)
    out = capsys.readouterr().out
    assert "REFUSED  issuer host: a load of 20000 fen on a balance of 90000 fen would pass the issuer's maximum " in out
    assert load_purse(Path(card)).balance == 90_000
    assert main([*top_up, "--max-balance", "500000"]) == 0
    assert load_purse(Path(card)).balance == 110_000
    bus = ["terminal", "tap", "--card", card, "--city", "4510", "--kind", "bus", "--fare", "1", "--max-balance", "1"]
    assert main(bus) == 2
    assert "--max-balance is for topup terminals" in capsys.readouterr().err
