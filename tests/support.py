"""Shared builders for the tests: cards, PSAMs and readers with deterministic randomness."""

from __future__ import annotations

import datetime as dt
import random
import signal
import subprocess
import sys
from pathlib import Path

from cardsim.crypto import Algorithm
from cardsim.keys import IssuerKeyStore
from cardsim.personalise import CardRequest, issue_cpu_card
from cardsim.psam import Psam, PsamState
from cardsim.purse import BINARY_FILES, PurseCard, PurseState
from terminals.reader import CardGone, InProcessReader

KEYS = IssuerKeyStore.test_set()
TERMINAL = bytes.fromhex("001122334455")
WHEN = dt.datetime(2026, 11, 24, 8, 15, 2)
# The second vpcd slot: its reader name and the port `card serve` connects to (the PC/SC stack tests hold the first).
SLOT_01 = ("Virtual PCD 00 01", "35964")


def yikatong(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``yikatong ARGS`` as a child process, its output captured as text. The child is killed after ``timeout``
    seconds: a command that hangs fails its own test and leaves nothing running behind the suite."""
    return subprocess.run(
        [sys.executable, "-m", "yikatong.cli", *args], capture_output=True, text=True, timeout=timeout
    )


def seeded_rng(seed: int = 1):
    """A reproducible random source for cards."""
    gen = random.Random(seed)
    return gen.randbytes


def new_state(alg: Algorithm = Algorithm.SM4, balance: int = 5000, city: str = "4510", sequence: int = 1) -> PurseState:
    return issue_cpu_card(KEYS, CardRequest(city, alg, balance, sequence, dt.date(2026, 1, 1), dt.date(2036, 1, 1)))


def files_of(state: PurseState) -> list[bytes]:
    """The bytes of the card's public files SFI 15, 16 and 17."""
    return [getattr(state, name) for name in BINARY_FILES.values()]


def new_card(alg: Algorithm = Algorithm.SM4, balance: int = 5000, city: str = "4510", seed: int = 1) -> PurseCard:
    card = PurseCard(new_state(alg, balance, city), seeded_rng(seed))
    card.power_on()
    return card


def new_psam(terminal: bytes = TERMINAL) -> Psam:
    psam = Psam(PsamState(bytes.fromhex("00000000000000000001"), terminal, KEYS.for_psam()))
    psam.power_on()
    return psam


def readers(card: PurseCard, psam: Psam) -> tuple[InProcessReader, InProcessReader]:
    return InProcessReader(card, "card"), InProcessReader(psam, "psam")


def sw(response: bytes) -> int:
    return int.from_bytes(response[-2:])


class CuttingReader(InProcessReader):
    """Pulls the card before APDU number ``before_apdu`` (it never arrives), or arms the card's write budget
    so that power fails in the middle of a commit."""

    def __init__(self, card: PurseCard, before_apdu: int | None = None, write_budget: int | None = None) -> None:
        super().__init__(card, "cutting")
        self.sent = 0
        self.before_apdu = before_apdu
        self.write_budget = write_budget

    def connect(self) -> bytes:
        self.card.eeprom.budget = None  # type: ignore[attr-defined]
        return super().connect()

    def disconnect(self) -> None:
        self.card.eeprom.budget = None  # type: ignore[attr-defined]  # out of the field: the cut is over

    def transmit(self, apdu: bytes) -> bytes:
        if self.sent == self.before_apdu:
            raise CardGone("pulled before the APDU arrived")
        self.sent += 1
        self.card.eeprom.budget = self.write_budget  # type: ignore[attr-defined]
        return super().transmit(apdu)


class ServedCard:
    """``yikatong card serve IMAGE [ARGS]`` in a subprocess, stopped with Ctrl-C (SIGINT) on leaving the block;
    ``output`` and ``returncode`` are set once it has stopped."""

    def __init__(self, image: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "yikatong.cli", "card", "serve", str(image), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = ""
        self.returncode: int | None = None

    def __enter__(self) -> ServedCard:
        return self

    def __exit__(self, *_: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        self.output, _ = self.proc.communicate(timeout=20)
        self.returncode = self.proc.returncode
