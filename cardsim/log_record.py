"""The purse's transaction log record (SFI 0x18, spec card.md): written by the card, read back by terminals."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class LogRecord:
    """counter(2) | overdraft(3, always 0 here) | amount(4) | type | terminal(6) | date(4 BCD) | time(3 BCD)."""

    SIZE: ClassVar[int] = 23

    counter: int
    amount: int
    txn_type: int
    terminal: bytes
    date: bytes
    time: bytes

    def to_bytes(self) -> bytes:
        """The 23-byte record."""
        return (
            self.counter.to_bytes(2)
            + bytes(3)  # overdraft: not used by this project's products
            + self.amount.to_bytes(4)
            + bytes([self.txn_type])
            + self.terminal
            + self.date
            + self.time
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> LogRecord:
        """Decode a record; ValueError when it is not 23 bytes."""
        if len(raw) != cls.SIZE:
            raise ValueError(f"log record of {len(raw)} bytes, expected {cls.SIZE}")
        return cls(int.from_bytes(raw[0:2]), int.from_bytes(raw[5:9]), raw[9], raw[10:16], raw[16:20], raw[20:23])
