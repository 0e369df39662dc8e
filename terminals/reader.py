"""The Reader interface a transaction runs over, and the in-process reader for simulated cards."""

from __future__ import annotations

from typing import Protocol

from cardsim.eeprom import CardTorn


class CardGone(Exception):
    """The card left the field (or lost power) before it answered: the transaction may be torn."""


class Reader(Protocol):
    """A slot holding one card: power it up, exchange APDUs, let it go."""

    name: str

    def connect(self) -> bytes:
        """Power the card up; returns its ATR."""
        ...

    def transmit(self, apdu: bytes) -> bytes:
        """Send a C-APDU and return the R-APDU; CardGone when the card does not answer."""
        ...

    def disconnect(self) -> None:
        """Release (power down) the card."""
        ...


class SimulatedCard(Protocol):
    """What the in-process reader needs of a cardsim card."""

    def power_on(self) -> bytes: ...

    def transmit(self, apdu: bytes) -> bytes: ...


class InProcessReader:
    """A reader wired straight to a cardsim card object (no PC/SC), for tests, load and benchmarks."""

    def __init__(self, card: SimulatedCard, name: str = "in-process") -> None:
        self.card = card
        self.name = name

    def connect(self) -> bytes:
        """Power the card up; returns its ATR."""
        return self.card.power_on()

    def transmit(self, apdu: bytes) -> bytes:
        """Send a C-APDU; a simulated power cut surfaces as CardGone, as a pulled card would."""
        try:
            return self.card.transmit(apdu)
        except CardTorn as err:
            raise CardGone(f"{self.name}: card lost power before answering") from err

    def disconnect(self) -> None:
        """Nothing to release for an in-process card."""
