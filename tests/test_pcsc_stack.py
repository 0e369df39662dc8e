"""The real PC/SC stack: pcscd + vsmartcard-vpcd + `yikatong card serve`, driven through pyscard.

This must fail, not skip, when the stack is missing: `.ci/run` (scripts/test.sh) installs and starts it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import TERMINAL, WHEN, ServedCard, new_psam

from cardsim.image import load_purse
from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from clearing.verify import tac_problem
from terminals.flows import purchase
from terminals.messages import parse_record
from terminals.pcsc import PcscReader, list_readers
from terminals.reader import InProcessReader

READER = "Virtual PCD 00 00"
pytestmark = pytest.mark.pcsc


def test_purchase_over_pcscd_and_vpcd(tmp_path: Path) -> None:
    names = list_readers()
    assert READER in names, (
        f"PC/SC reader {READER!r} missing (readers: {names}); run scripts/services.sh to start pcscd with vpcd"
    )
    image = tmp_path / "card.json"
    issue = subprocess.run(
        [
            sys.executable,
            "-m",
            "yikatong.cli",
            "card",
            "issue",
            "--city",
            "4560",
            "--alg",
            "3des",
            "--balance",
            "5000",
            "--out",
            str(image),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert issue.returncode == 0, issue.stderr
    with ServedCard(image) as serve:
        reader = PcscReader(READER)
        atr = reader.wait_for_card(timeout=20)
        assert atr.startswith(bytes.fromhex("3B888001"))
        psam = InProcessReader(new_psam())
        txn = purchase(reader, psam, TERMINAL, 150, WHEN)  # SELECT, INITIALIZE, PSAM MAC1, DEBIT, PSAM MAC2
        assert (txn.balance_before, txn.balance_after, txn.city) == (5000, 4850, "4560")
        reader.disconnect()
        reader.wait_for_card(timeout=20)  # a new connection: pcscd powers the card up again
        purchase(reader, psam, TERMINAL, 50, WHEN)
        reader.disconnect()
    assert serve.returncode == 0, serve.output
    saved = load_purse(image)
    assert saved.balance == 4800 and saved.offline_counter == 2, "the balance in the saved image drops"


def _yikatong(*args: str) -> list[str]:
    return [sys.executable, "-m", "yikatong.cli", *args]


@pytest.mark.parametrize("command", ["tap", "run"])
def test_terminal_on_pcsc_publishes_the_record_to_mosquitto(tmp_path: Path, command: str) -> None:
    """card serve + pcscd + `yikatong terminal tap|run --reader ...` -> the record arrives on the real Mosquitto,
    as an outside client (mosquitto_sub) sees it."""
    assert READER in list_readers(), "run scripts/services.sh to start pcscd with vpcd"
    image, state = tmp_path / "card.json", tmp_path / "terminal.sqlite"
    number = "4560" + os.urandom(4).hex().upper()
    subprocess.run(
        _yikatong("card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "3000", "--out", str(image)),
        check=True,
        capture_output=True,
    )
    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            "127.0.0.1",
            "-p",
            "1883",
            "-q",
            "1",
            "-C",
            "1",
            "-W",
            "60",
            "-t",
            f"yikatong/4560/txn/{number}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    with ServedCard(image):
        try:
            PcscReader(READER).wait_for_card(timeout=20)
            options = ["--city", "4560", "--kind", "bus", "--fare", "250", "--terminal", number, "--state", str(state)]
            extra = ["--count", "1"] if command == "run" else []
            done = subprocess.run(
                _yikatong(
                    "terminal", command, "--reader", READER, *options, *extra, "--broker", "mqtt://127.0.0.1:1883"
                ),
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert "OK       purchase" in done.stdout and "-2.50 -> 27.50 yuan" in done.stdout
            received, _ = sub.communicate(timeout=60)
        finally:
            sub.kill()
    record = parse_record(json.loads(received))
    assert (record.terminal, record.amount, record.balance_after, record.card.issuer) == (number, 250, 2750, "4510")
    assert tac_problem(IssuerHost(IssuerKeyStore.test_set()), record) is None
    assert load_purse(image).balance == 2750
