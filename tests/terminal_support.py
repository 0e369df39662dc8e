"""Builders for terminal tests: terminals over a state file, a clock, M1 cards, and card-cutting readers."""

from __future__ import annotations

import datetime as dt
import random
from pathlib import Path

from support import KEYS

from cardsim.issuer import IssuerHost
from cardsim.m1_issue import KeyScheme, issue_m1_card
from cardsim.mifare import Frame, M1Card, Profile
from terminals.messages import CHINA
from terminals.metro import FareTable
from terminals.outbox import Outbox
from terminals.terminal import Terminal, TerminalConfig, TerminalKind

FARES = FareTable.load()
START = dt.datetime(2026, 11, 24, 8, 0, 0, tzinfo=CHINA)


class Clock:
    """Local time that moves on a minute each time it is read."""

    def __init__(self, start: dt.datetime = START) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(minutes=1)
        return self.now


def make_terminal(
    state: Path,
    kind: TerminalKind = TerminalKind.BUS,
    city: str = "4560",
    amount: int = 200,
    station: tuple[str, str] | None = None,
    terminal: str = "456000000001",
    clock: Clock | None = None,
) -> Terminal:
    """A terminal of ``kind`` over the state file ``state``."""
    line, code = station or (None, None)
    config = TerminalConfig(city, kind, bytes.fromhex(terminal), amount, line, code)
    return Terminal(config, Outbox(state), KEYS, fares=FARES, host=IssuerHost(KEYS), clock=clock or Clock())


def m1_card(
    scheme: KeyScheme = KeyScheme.DIVERSIFIED, balance: int = 3000, city: str = "4510", seed: int = 3
) -> M1Card:
    """A genuine-profile M1 city card."""
    rnd = random.Random(seed)
    key_set = KEYS.get(city, 1)
    assert key_set is not None
    card = M1Card(
        issue_m1_card(rnd.randbytes(4), Profile.GENUINE, scheme, balance, key_set.purchase, city), rnd.randbytes
    )
    card.power_on()
    return card


class CuttingChip:
    """An M1 card that leaves the field after ``frames`` frames (later frames are never delivered)."""

    def __init__(self, card: M1Card, frames: int | None) -> None:
        self.card = card
        self.left = frames

    @property
    def host_crc(self) -> bool:
        return False

    def power_on(self) -> None:
        self.card.power_on()

    def anticollision(self) -> tuple[bytes, int, bytes]:
        return self.card.anticollision()

    def transceive(self, frame: Frame) -> Frame | None:
        if self.left is not None:
            if self.left == 0:
                return None
            self.left -= 1
        return self.card.transceive(frame)
