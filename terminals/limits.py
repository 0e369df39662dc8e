"""The wire's size limits (spec wire.md "Limits and health"): plain numbers, importable without the message
models, so that a command line can show them as defaults without loading pydantic."""

from __future__ import annotations

from typing import Final

MAX_FEN: Final = 2**31 - 1
"""The most fen an amount or a balance can be in a record (wire.md's amounts take 0..2^31-1; the card's 4-byte fields
and the M1 signed 32-bit value block hold no more in a valid purse): every layer checks against this one number."""
MAX_PAYLOAD: Final = 256 * 1024
"""Larger payloads are refused before JSON parsing (a batch of a few hundred records fits easily)."""
MAX_RECORDS: Final = 1000
MAX_DEPTH: Final = 8
MAX_STRING: Final = 256
MAX_DIGITS: Final = 20
"""Longest number literal accepted (2^64 has 20 digits): longer ones are refused before Python parses them."""
