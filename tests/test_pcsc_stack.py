"""The real PC/SC stack: pcscd + vsmartcard-vpcd + `yikatong card serve`, driven through pyscard.

This must fail, not skip, when the stack is missing: `.ci/run` (scripts/test.sh) installs and starts it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import TERMINAL, WHEN, new_psam

from cardsim.image import load_purse
from terminals.flows import purchase
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
    serve = subprocess.Popen(
        [sys.executable, "-m", "yikatong.cli", "card", "serve", str(image)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
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
    finally:
        serve.send_signal(signal.SIGINT)
        out, _ = serve.communicate(timeout=20)
    assert serve.returncode == 0, out
    saved = load_purse(image)
    assert saved.balance == 4800 and saved.offline_counter == 2, "the balance in the saved image drops"
