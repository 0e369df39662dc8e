"""Non-volatile writes of a simulated chip, countable so that power can be cut after any one of them.

A real card commits a transaction through a journal: write the new values aside, set a valid flag (the
commit point), copy the values into place, clear the journal. On the next power-up a valid journal is
replayed and an invalid one discarded, so a cut anywhere leaves the old or the new state, never a mix.
Tests set ``budget`` to cut power after that many writes and check exactly that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class CardTorn(Exception):
    """Power was lost while the card was writing: it sends no response and must be powered on again."""


@dataclass
class Journal:
    """New values waiting to be copied into place; ``valid`` set is the commit point."""

    updates: dict[str, Any]
    valid: bool = False


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

    def commit(self, target: Any, updates: dict[str, Any]) -> None:
        """Write ``updates`` (attribute name → value) into ``target`` through its ``journal`` attribute."""
        journal = Journal(dict(updates))
        self.write(lambda: setattr(target, "journal", journal))
        self.write(lambda: setattr(journal, "valid", True))
        self.write_in_place(target, journal.updates)
        self.write(lambda: setattr(target, "journal", None))

    def write_in_place(self, target: Any, updates: dict[str, Any]) -> None:
        """Write each field straight into ``target``, one write each: with no journal around it (a flawed
        chip OS) a power cut leaves some fields new and others old."""
        for name, value in updates.items():
            self.write(_setter(target, name, value))


def _setter(target: Any, name: str, value: Any) -> Callable[[], None]:
    return lambda: setattr(target, name, value)


def recover(target: Any) -> None:
    """Power-up recovery: replay a valid journal, drop an unfinished one (no power budget applies)."""
    journal: Journal | None = target.journal
    if journal is None:
        return
    if journal.valid:
        for name, value in journal.updates.items():
            setattr(target, name, value)
    target.journal = None
