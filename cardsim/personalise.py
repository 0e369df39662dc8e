"""Issuing a CPU purse card: lay out its files and diversify its keys from the issuer master keys."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cardsim import crypto
from cardsim.bcd import bcd, bcd_date
from cardsim.crypto import Algorithm
from cardsim.issue_options import CARD_CLASSES, DEFAULT_MAX_BALANCE
from cardsim.keys import IssuerKeyStore
from cardsim.purse import PurseKeys, PurseState

T_UNION_PREFIX = "3104"
"""First four digits of every application serial (T-Union style); then city code, then 12 digits."""


class IssueError(ValueError):
    """A card cannot be issued as asked (unknown city, no keys, bad numbers)."""


@dataclass(frozen=True)
class CardRequest:
    """What to personalise. ``sequence`` is the card's 12-digit number within its city."""

    city: str
    algorithm: Algorithm
    balance: int
    sequence: int
    start: dt.date
    expiry: dt.date
    key_version: int = 1
    card_class: int = 1
    holder: str = ""
    interoperable: bool = True
    max_balance: int = DEFAULT_MAX_BALANCE


def application_serial(city: str, sequence: int) -> bytes:
    """The 10-byte BCD application serial: 3104 | city | 12-digit sequence."""
    return bcd(f"{T_UNION_PREFIX}{city}{sequence:012d}")


def issue_cpu_card(keys: IssuerKeyStore, req: CardRequest) -> PurseState:
    """Personalise a purse card; IssueError says what is wrong with the request."""
    if not (len(req.city) == 4 and req.city.isdigit()):
        raise IssueError(f"city must be a 4-digit code, got {req.city!r}")
    key_set = keys.get(req.city, req.key_version)
    if key_set is None or key_set.load is None or key_set.tac is None:
        raise IssueError(f"no issuer keys for city {req.city} version {req.key_version}")
    if not 0 <= req.sequence < 10**12:
        raise IssueError("sequence must have at most 12 digits")
    if not 0 <= req.balance <= req.max_balance:
        raise IssueError(f"balance must be 0..{req.max_balance} fen")
    if req.card_class not in CARD_CLASSES:
        raise IssueError(f"card class must be one of {sorted(CARD_CLASSES)}")
    if req.expiry <= req.start:
        raise IssueError("expiry must be after the start date")
    city = bcd(req.city)
    serial = application_serial(req.city, req.sequence)
    public = (
        city  # issuer code: the city is the issuer
        + city
        + b"\x00\x00"  # industry code: transport
        + b"\xff\xff"
        + b"\x02"  # application type: EP
        + b"\x01"  # application version
        + serial
        + bcd_date(req.start)
        + bcd_date(req.expiry)
        + b"\x00\x00"
    )
    holder = bytes([req.card_class]) + req.holder.encode("gb18030")[:20].ljust(20, b"\x00")
    interop = (
        bcd("0156")  # country: China
        + bcd("3700")  # province: Shandong
        + city
        + b"\x00\x00"
        + (b"\x00\x01" if req.interoperable else b"\x00\x00")
        + bytes([req.card_class])
        + bytes(21)
    )
    card_serial = serial[2:]
    alg = req.algorithm
    diversified = PurseKeys(
        purchase=crypto.diversify(alg, key_set.purchase, card_serial),
        load=crypto.diversify(alg, key_set.load, card_serial),
        tac=crypto.diversify(alg, key_set.tac, card_serial),
        maintenance=crypto.diversify(alg, key_set.maintenance, card_serial),
    )
    return PurseState(
        algorithm=alg,
        key_version=req.key_version,
        keys=diversified,
        public_data=public,
        holder_data=holder,
        interop_data=interop,
        balance=req.balance,
        max_balance=req.max_balance,
    )
