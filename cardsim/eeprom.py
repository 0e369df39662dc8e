"""Non-volatile writes of a simulated chip, countable so that power can be cut after any one of them.

A real card commits a transaction through a journal: write the new values aside, set a valid flag (the
commit point), copy the values into place, clear the journal. On the next power-up a valid journal is
replayed and an invalid one discarded, so a cut anywhere leaves the old or the new state, never a mix.
Tests set ``budget`` to cut power after that many writes and check exactly that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class CardTorn(Exception):
    """Power was lost while the card was writing: it sends no response and must be powered on again."""


class FieldUpdate(Protocol):
    """A typed set of new values for some fields of a chip's state (a dataclass of the fields a commit changes)."""

    def writes(self) -> list[tuple[str, object]]:
        """(field name, new value) of each changed field, in the order the chip writes them."""
        ...


UpdateT = TypeVar("UpdateT", bound=FieldUpdate)


@dataclass
class Journal(Generic[UpdateT]):
    """New values waiting to be copied into place; ``valid`` set is the commit point."""

    updates: UpdateT
    valid: bool = False


class Journalled(Protocol[UpdateT]):
    """A chip state that keeps a commit journal. Its class should use slots, so that an update naming a field
    the state does not have fails instead of adding an attribute."""

    journal: Journal[UpdateT] | None


@dataclass
class Eeprom:
    """Counts writes; when ``budget`` (writes still possible) reaches zero, the next write tears."""

    budget: int | None = None
    writes: int = field(default=0)

    def write(self, apply: Callable[[], None]) -> None:
        """Perform one atomic non-volatile write, unless the power budget is spent."""
        if self.budget is not None:
            if self.budget <= 0:
                raise CardTorn("power lost during a non-volatile write")
            self.budget -= 1
        apply()
        self.writes += 1

    def commit(self, target: Journalled[UpdateT], updates: UpdateT) -> None:
        """Write ``updates`` into ``target`` through its journal."""
        journal = Journal(updates)
        self.write(lambda: setattr(target, "journal", journal))
        self.write(lambda: setattr(journal, "valid", True))
        self.write_in_place(target, updates)
        self.write(lambda: setattr(target, "journal", None))

    def write_in_place(self, target: object, updates: FieldUpdate) -> None:
        """Write each field straight into ``target``, one write each: with no journal around it (a flawed
        chip OS) a power cut leaves some fields new and others old."""
        for name, value in updates.writes():
            self.write(_setter(target, name, value))


def _setter(target: object, name: str, value: object) -> Callable[[], None]:
    return lambda: setattr(target, name, value)


def recover(target: Journalled[UpdateT]) -> None:
    """Power-up recovery: replay a valid journal, drop an unfinished one (no power budget applies)."""
    journal = target.journal
    if journal is None:
        return
    if journal.valid:
        for name, value in journal.updates.writes():
            setattr(target, name, value)
    target.journal = None
