"""What a terminal does with each card (bus, metro gates, top-up), in a module of its own: the command line lists
the kinds without importing the terminal and the layers under it."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from terminals.messages import TxnKind


class TerminalKind(enum.Enum):
    """What the terminal does with each card; ``value`` is the command-line name."""

    BUS = "bus"
    METRO_ENTRY = "metro-entry"
    METRO_EXIT = "metro-exit"
    TOPUP = "topup"

    @property
    def wire(self) -> TxnKind:
        """The record ``kind`` on the wire."""
        return _WIRE_KIND[self]


_WIRE_KIND: Final[dict[TerminalKind, TxnKind]] = {
    TerminalKind.BUS: "purchase",
    TerminalKind.METRO_ENTRY: "metro_entry",
    TerminalKind.METRO_EXIT: "metro_exit",
    TerminalKind.TOPUP: "load",
}
