"""Shared builders for the tests: cards, PSAMs and readers with deterministic randomness."""

from __future__ import annotations

import datetime as dt
import random

from cardsim.crypto import Algorithm
from cardsim.keys import IssuerKeyStore
from cardsim.personalise import CardRequest, issue_cpu_card
from cardsim.psam import Psam, PsamState
from cardsim.purse import PurseCard, PurseState
from terminals.reader import InProcessReader

KEYS = IssuerKeyStore.test_set()
TERMINAL = bytes.fromhex("001122334455")
WHEN = dt.datetime(2026, 11, 24, 8, 15, 2)


def seeded_rng(seed: int = 1):
    """A reproducible random source for cards."""
    gen = random.Random(seed)
    return gen.randbytes


def new_state(alg: Algorithm = Algorithm.SM4, balance: int = 5000, city: str = "4510", sequence: int = 1) -> PurseState:
    return issue_cpu_card(KEYS, CardRequest(city, alg, balance, sequence, dt.date(2026, 1, 1), dt.date(2036, 1, 1)))


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
