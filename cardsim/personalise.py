"""Issuing a CPU purse card: lay out its files and diversify its keys from the issuer master keys."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

from cardsim import crypto
from cardsim.bcd import bcd, bcd_date
from cardsim.crypto import Algorithm
from cardsim.issue_options import CARD_CLASSES, CPU_CHIP_MAKERS, DEFAULT_MAX_BALANCE
from cardsim.keys import IssuerKeyStore
from cardsim.purse import HISTORICAL, PurseKeys, PurseState

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
    chip_maker: str | None = None  # one of CPU_CHIP_MAKERS; None: the simulator's own ATR


# ATR historical bytes per maker (where each comes from: docs/audit-choices.md, "Fleet view"). Fudan's end with the
# chip's 4-byte UID, here the last 4 bytes of the card serial.
_HISTORICAL: Final = {
    "fudan-fm1208": bytes.fromhex("20900000000000"),
    "huada-ciu": bytes.fromhex("813F017511010281010A"),  # a stand-in: the CIU9872B's contact historical bytes
    "nxp-jcop": b"JCOP41V221",
    "infineon-cipurse": bytes.fromhex("77433254000901"),
}


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
    if req.chip_maker is not None and req.chip_maker not in CPU_CHIP_MAKERS:
        raise IssueError(f"CPU chip maker must be one of {', '.join(CPU_CHIP_MAKERS)}, not {req.chip_maker!r}")
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
        atr_historical=_historical(req.chip_maker, card_serial),
    )


def _historical(maker: str | None, card_serial: bytes) -> bytes:
    """The ATR historical bytes of a chip of this maker (Fudan's carry the chip UID: the serial's last 4 bytes)."""
    if maker is None:
        return HISTORICAL
    historical = _HISTORICAL[maker]
    return historical + card_serial[-4:] if maker == "fudan-fm1208" else historical
