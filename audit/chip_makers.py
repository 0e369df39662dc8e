"""Who made a card's chip, read from the card itself: the ATR historical bytes of a CPU card, block 0's
manufacturer data (with the SAK and ATQA it answered) of an M1 card. The plan's goal is chips of domestic origin,
so each maker carries its country.

The signatures and where each comes from are listed in docs/audit-choices.md ("Fleet view"); the Proxmark3 client's
``hf mf info`` fingerprints (client/src/cmdhfmf.c) and its ATR list (client/src/atrs.h, from Ludovic Rousseau's
smartcard_list) are the main sources. Where no public signature exists, the entry says it is a stand-in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from cardsim.files import JSONValue
from terminals.m1 import M1Error, M1Slot

CHINA: Final = "China"


@dataclass(frozen=True)
class Maker:
    """A chip maker as the card showed it: company, its country, the chip (model or family, "" when the card does
    not tell) and the evidence (what was read)."""

    company: str
    country: str
    chip: str
    evidence: str

    @property
    def known(self) -> bool:
        """False when nothing the card showed names a maker."""
        return bool(self.country)

    @property
    def domestic(self) -> bool:
        """A chip of domestic (Chinese) origin, the plan's goal."""
        return self.country == CHINA

    @property
    def label(self) -> str:
        """Company and chip as a report shows them ("unknown" when not known)."""
        return f"{self.company} {self.chip}".strip() if self.known else "unknown"

    def to_json(self) -> dict[str, JSONValue]:
        """The maker as a JSON object."""
        return {
            "company": self.company,
            "country": self.country,
            "chip": self.chip,
            "domestic": self.domestic,
            "evidence": self.evidence,
        }


@dataclass(frozen=True)
class _Company:
    name: str
    country: str


NXP: Final = _Company("NXP", "Netherlands")
FUDAN: Final = _Company("Fudan Microelectronics", CHINA)
HUADA: Final = _Company("CEC Huada Electronic Design", CHINA)
INFINEON: Final = _Company("Infineon", "Germany")


@dataclass(frozen=True)
class _M1Signature:
    """Block 0 bytes 5.. (stored SAK, ATQA, manufacturer data) as a pattern, one set of allowed values per byte
    (None: any byte)."""

    company: _Company
    chip: str
    pattern: tuple[frozenset[int] | None, ...]


def _pattern(text: str) -> tuple[frozenset[int] | None, ...]:
    """'08 04 00 01|02 .. 1D' -> per byte the values allowed ('..' any)."""
    return tuple(None if b == ".." else frozenset(int(v, 16) for v in b.split("|")) for b in text.split())


# Block 0 from byte 5 on. Proxmark3 hf mf info compares these bytes (stored SAK, ATQA LSB first, manufacturer data).
# NXP chips store SAK 88 in block 0 and answer SAK 08; our card model answers block 0's byte, so simulated NXP cards
# store 08: both are accepted.
_M1_SIGNATURES: Final = (
    _M1Signature(FUDAN, "FM11RF08S", _pattern("08 04 00 03|04|05 .. .. .. .. .. .. 90")),
    _M1Signature(FUDAN, "FM11RF08S", _pattern("08 04 00 04|05 .. .. .. .. .. .. 98")),
    _M1Signature(FUDAN, "FM11RF08", _pattern("08 04 00 01|02|03 .. .. .. .. .. .. 1D")),
    _M1Signature(FUDAN, "FM11RF08 family", _pattern("08 04 00 62 63 64 65 66 67 68 69")),
    _M1Signature(INFINEON, "SLE66R35", _pattern("88 04 00 43")),
    _M1Signature(NXP, "MF1ICS5003", _pattern("88|08 04 00 44")),
    _M1Signature(NXP, "MF1ICS5004", _pattern("88|08 04 00 45")),
    _M1Signature(NXP, "MF1ICS5005", _pattern("88|08 04 00 46")),
    _M1Signature(NXP, "MF1ICS5006", _pattern("88|08 04 00 47")),
    _M1Signature(NXP, "MF1ICS5007", _pattern("88|08 04 00 48")),
    _M1Signature(NXP, "MF1ICS5035", _pattern("88|08 04 00 C0")),
)


def _matches(signature: _M1Signature, tail: bytes) -> bool:
    return len(tail) >= len(signature.pattern) and all(
        allowed is None or byte in allowed for byte, allowed in zip(tail, signature.pattern, strict=False)
    )


def m1_maker(block0: bytes | None, sak: int, atqa: bytes) -> Maker:
    """The maker of an M1 chip: from block 0 when it could be read (a sector-0 key is known), else from the SAK
    and ATQA alone, which name a maker only for Infineon's SAK 88. ``atqa`` as the card sends it (LSB first)."""
    answered = f"SAK {sak:02X} ATQA {atqa[::-1].hex().upper()}"
    if block0 is not None and len(block0) == 16:
        tail = block0[5:]
        shown = f"block 0 manufacturer bytes {tail.hex(' ').upper()}"
        for signature in _M1_SIGNATURES:
            if _matches(signature, tail):
                return Maker(signature.company.name, signature.company.country, signature.chip, f"{shown}, {answered}")
        return Maker("unknown", "", "", f"{shown} match no maker in the table ({answered})")
    if sak == 0x88:
        return Maker(INFINEON.name, INFINEON.country, "MIFARE Classic 1K", f"{answered} (Infineon's SAK); no block 0")
    return Maker("unknown", "", "", f"{answered}: many makers answer this; block 0 not read (no sector-0 key)")


def read_block0(card: M1Slot, keys: Mapping[tuple[int, int], int]) -> bytes | None:
    """Block 0 read through the card with a known sector-0 key (``keys``: (sector, 0x60/0x61) -> key); None when
    no sector-0 key is known or none may read it."""
    for (sector, key_type), key in sorted(keys.items()):
        if sector != 0:
            continue
        try:
            session = card.session()
            session.authenticate(3, key, key_type)
            return session.read_block(0)
        except M1Error:
            continue
    return None


@dataclass(frozen=True)
class _CpuSignature:
    company: _Company
    chip: str
    prefix: bytes  # the historical bytes start with these


_CPU_SIGNATURES: Final = (
    # 3B 8B 80 01 20 90 00 00 00 00 00 | UID (4) | TCK: Fudan FM1208 (and FM12080); atrs.h
    _CpuSignature(FUDAN, "FM1208", bytes.fromhex("20900000000000")),
    # the CIU9872B's historical bytes (its contact ATR 3B 6A 00 00 81 3F ... in atrs.h): a stand-in, see the docs
    _CpuSignature(HUADA, "CIU98 series", bytes.fromhex("813F0175110102")),
    _CpuSignature(NXP, "JCOP", b"JCOP"),
    # CIPURSE transport chips: 77 43 32 (atrs.h, "Infineon CIPURSE SLS 32TLC100M4 (Transport)")
    _CpuSignature(INFINEON, "SLS 32 (CIPURSE)", bytes.fromhex("774332")),
)


def historical_bytes(atr: bytes) -> bytes:
    """The historical bytes of an ISO 7816-3 ATR (T0's low nibble counts them, after the interface bytes that
    T0 and each TDi announce); ValueError when the ATR is too short for what it announces."""
    if len(atr) < 2 or atr[0] not in (0x3B, 0x3F):
        raise ValueError("not an ATR (TS must be 3B or 3F)")
    count = atr[1] & 0x0F
    at, indicator = 2, atr[1]
    while True:
        present = [indicator & bit for bit in (0x10, 0x20, 0x40, 0x80)]
        at += sum(1 for p in present if p)
        if not present[3]:
            break
        if at > len(atr):
            raise ValueError("ATR ends inside its interface bytes")
        indicator = atr[at - 1]
    if at + count > len(atr):
        raise ValueError(f"ATR announces {count} historical bytes but ends before them")
    return atr[at : at + count]


def cpu_maker(atr: bytes) -> Maker:
    """The maker of a CPU card's chip, from the historical bytes of its ATR (the ATS a contactless reader turns
    into a PC/SC ATR)."""
    try:
        historical = historical_bytes(atr)
    except ValueError as err:
        return Maker("unknown", "", "", f"ATR {atr.hex().upper()}: {err}")
    shown = f"ATR historical bytes {historical.hex(' ').upper()}"
    for signature in _CPU_SIGNATURES:
        if historical.startswith(signature.prefix):
            return Maker(signature.company.name, signature.company.country, signature.chip, shown)
    text = historical.decode("ascii", "replace") if historical.isascii() else ""
    return Maker("unknown", "", "", f"{shown}{f' ({text!r})' if text else ''} match no maker in the table")
