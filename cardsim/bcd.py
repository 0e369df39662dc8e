"""BCD dates and times as the purse files and commands carry them."""

from __future__ import annotations

import datetime as dt


def bcd(digits: str) -> bytes:
    """Pack a string of decimal digits (even length) into BCD bytes."""
    if len(digits) % 2 or not digits.isdigit():
        raise ValueError(f"{digits!r} is not an even number of decimal digits")
    return bytes.fromhex(digits)


def bcd_date(day: dt.date) -> bytes:
    """YYYYMMDD as 4 BCD bytes."""
    return bcd(day.strftime("%Y%m%d"))


def bcd_time(moment: dt.datetime | dt.time) -> bytes:
    """HHMMSS as 3 BCD bytes."""
    # by arithmetic, not strftime (5x faster): the clearing converts the time of every record it verifies
    return bytes(n // 10 << 4 | n % 10 for n in (moment.hour, moment.minute, moment.second))


def parse_bcd_date(raw: bytes) -> dt.date:
    """The date in 4 BCD bytes; ValueError when they are not a valid date."""
    return dt.datetime.strptime(raw.hex(), "%Y%m%d").date()


def parse_bcd_datetime(date: bytes, time: bytes) -> dt.datetime:
    """A naive datetime from 4 BCD date bytes and 3 BCD time bytes; ValueError when invalid."""
    return dt.datetime.strptime(date.hex() + time.hex(), "%Y%m%d%H%M%S")
