"""Tearing: a power cut at every point of a transaction leaves the old or the new state, never a mix, and
GET TRANSACTION PROVE tells the terminal which one."""

from __future__ import annotations

import copy
from dataclasses import astuple
from typing import Any

import pytest
from support import KEYS, TERMINAL, WHEN, CuttingReader, new_psam, new_state, readers, seeded_rng, sw

from cardsim.crypto import Algorithm
from cardsim.image import purse_from_json, purse_to_json
from cardsim.issuer import IssuerHost
from cardsim.purse import PurseCard, PurseState
from terminals.flows import load, purchase
from terminals.reader import CardGone

TRIP = bytes([0x03]) + bytes(47)


def snapshot(state: PurseState) -> tuple[Any, ...]:
    """Everything a transaction may change."""
    proof = astuple(state.proof) if state.proof else None
    return (state.balance, state.offline_counter, state.online_counter, tuple(state.log), tuple(state.trips), proof)


def run(kind: str, alg: Algorithm, before_apdu: int | None, budget: int | None, through_image: bool):
    """One transaction with a cut; returns (card, its state before, the transaction or None)."""
    state = new_state(alg)
    card = PurseCard(state, seeded_rng(7))
    card.power_on()
    before = snapshot(state)
    reader = CuttingReader(card, before_apdu, budget)
    try:
        if kind == "load":
            load(reader, IssuerHost(KEYS), TERMINAL, 700, WHEN)
        else:
            sam = readers(card, new_psam())[1]
            purchase(reader, sam, TERMINAL, 300, WHEN, trip_record=TRIP if kind == "compound" else None)
    except CardGone:
        pass
    card.eeprom.budget = None
    if through_image:  # the card was saved mid-commit and loaded again, as `card serve` would
        card = PurseCard(purse_from_json(copy.deepcopy(purse_to_json(card.state))), seeded_rng(8))
    card.power_on()  # power comes back: the journal is replayed or dropped
    return card, before


def reference(kind: str, alg: Algorithm) -> tuple[Any, ...]:
    card, _ = run(kind, alg, None, None, through_image=False)
    return snapshot(card.state)


CUTS = [(apdu, None) for apdu in range(6)] + [(None, budget) for budget in range(12)]


@pytest.mark.parametrize("kind", ["purchase", "compound", "load"])
@pytest.mark.parametrize("alg", list(Algorithm))
def test_every_cut_point_leaves_old_or_new_state(kind: str, alg: Algorithm) -> None:
    new = reference(kind, alg)
    outcomes = set()
    for before_apdu, budget in CUTS:
        for through_image in (False, True):
            card, old = run(kind, alg, before_apdu, budget, through_image)
            after = snapshot(card.state)
            assert after in (old, new), f"mixed state after cut {before_apdu=} {budget=}"
            assert card.state.journal is None
            outcomes.add(after == new)
            if kind == "load":
                continue
            card.transmit(bytes.fromhex("00A4040008A000000632010105"))
            prove = card.transmit(bytes([0x80, 0x5A, 0x00, 0x09 if kind == "compound" else 0x06, 0x02, 0x00, 0x00]))
            if after == new:
                assert sw(prove) == 0x9000 and prove[:-2] == new[5][2] + new[5][3]  # MAC2 | TAC
            else:
                assert sw(prove) == 0x6A83
    assert outcomes == {True, False}, "the cuts must reach both sides of the commit point"
