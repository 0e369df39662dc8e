"""The wire's size limits (spec wire.md "Limits and health"): plain numbers, importable without the message
models, so that a command line can show them as defaults without loading pydantic."""

from __future__ import annotations

from typing import Final

MAX_PAYLOAD: Final = 256 * 1024
"""Larger payloads are refused before JSON parsing (a batch of a few hundred records fits easily)."""
MAX_RECORDS: Final = 1000
MAX_DEPTH: Final = 8
MAX_STRING: Final = 256
MAX_DIGITS: Final = 20
"""Longest number literal accepted (2^64 has 20 digits): longer ones are refused before Python parses them."""
