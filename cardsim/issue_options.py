"""What a CPU purse card can be issued with beyond its keys: the card classes and the default purse limit, plain
values that the command line shows in its help without importing the card."""

from __future__ import annotations

from typing import Final

CARD_CLASSES: Final = {1: "normal", 2: "student", 3: "elderly", 4: "test"}
DEFAULT_MAX_BALANCE: Final = 100_000
"""Fen: 1,000 yuan, the usual cap of a transit purse."""

CPU_CHIP_MAKERS: Final = {
    "fudan-fm1208": "Fudan FM1208 (China)",
    "huada-ciu": "Huada CIU98 series (China)",
    "nxp-jcop": "NXP JCOP (Netherlands)",
    "infineon-cipurse": "Infineon SLS 32 CIPURSE (Germany)",
}
"""The chip makers a CPU card can be issued with (``--chip-maker``): each puts that maker's historical bytes in the
card's ATR (``cardsim.personalise``); without one, the ATR carries the simulator's own (YIKATONG)."""

M1_CHIP_MAKERS: Final = {
    "nxp": "NXP MF1ICS5005 (Netherlands)",
    "fudan-fm11rf08": "Fudan FM11RF08 (China)",
    "fudan-fm11rf08s": "Fudan FM11RF08S (China)",
    "infineon": "Infineon SLE66R35, SAK 88 (Germany)",
}
"""The chip makers an M1 card can be issued with (``--chip-maker``): each lays down that maker's block 0
manufacturer data (``cardsim.m1_issue``); without one, block 0 keeps the manufacturer data 62..69 of older images."""
