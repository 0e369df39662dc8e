"""The purse's transaction log record (SFI 0x18, spec card.md): written by the card, read back by terminals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from cardsim.layout import U8, U16, U32, Layout


@dataclass(frozen=True)
class LogRecord(Layout):
    """One 23-byte record; the dates and times are BCD as the terminal sent them."""

    counter: U16
    overdraft: Annotated[bytes, 3] = field(default=bytes(3), kw_only=True)  # not used by this project's products
    amount: U32
    txn_type: U8
    terminal: Annotated[bytes, 6]
    date: Annotated[bytes, 4]
    time: Annotated[bytes, 3]
