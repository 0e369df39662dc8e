"""What a CPU purse card can be issued with beyond its keys: the card classes and the default purse limit, plain
values that the command line shows in its help without importing the card."""

from __future__ import annotations

from typing import Final

CARD_CLASSES: Final = {1: "normal", 2: "student", 3: "elderly", 4: "test"}
DEFAULT_MAX_BALANCE: Final = 100_000
"""Fen: 1,000 yuan, the usual cap of a transit purse."""
