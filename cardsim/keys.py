"""Issuer master key sets (per city and key version), their JSON files, and the city of a card serial."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from cardsim.files import read_json
from cardsim.resources import fixture_path

KEY_USAGES = ("purchase", "load", "tac", "maintenance")
TEST_KEYS_FIXTURE = "keys/test-keys.json"


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class IssuerKeySet:
    """One issuer's master keys (16 bytes each) for one key version; None where a holder must not have it."""

    city: str
    version: int
    purchase: bytes
    maintenance: bytes
    load: bytes | None = None
    tac: bytes | None = None


class IssuerKeyStore:
    """Master key sets by (city code, key version). ``test_keys`` marks the published test set."""

    def __init__(self, sets: list[IssuerKeySet], *, test_keys: bool = False) -> None:
        self._sets = {(s.city, s.version): s for s in sets}
        self.test_keys = test_keys

    def get(self, city: str, version: int) -> IssuerKeySet | None:
        """The key set for a city and version, or None."""
        return self._sets.get((city, version))

    def __iter__(self) -> Iterator[IssuerKeySet]:
        return iter(self._sets.values())

    def for_psam(self) -> IssuerKeyStore:
        """The subset a PSAM may hold: purchase and maintenance keys, no load or TAC keys."""
        return IssuerKeyStore([replace(s, load=None, tac=None) for s in self], test_keys=self.test_keys)

    @classmethod
    def from_json(cls, doc: object, source: str = "key file") -> IssuerKeyStore:
        """Parse a ``yikatong.keys/1`` document; KeyFileError names what is wrong."""
        if not isinstance(doc, dict) or doc.get("schema") != "yikatong.keys/1":
            raise KeyFileError(f"{source}: not a yikatong.keys/1 document")
        entries = doc.get("issuers")
        if not isinstance(entries, list) or not entries:
            raise KeyFileError(f"{source}: 'issuers' must be a non-empty list")
        sets = []
        for i, entry in enumerate(entries):
            where = f"{source}: issuers[{i}]"
            if not isinstance(entry, dict):
                raise KeyFileError(f"{where}: not an object")
            city, version = entry.get("city"), entry.get("version")
            if not (isinstance(city, str) and len(city) == 4 and city.isdigit()):
                raise KeyFileError(f"{where}: city must be a 4-digit code")
            if not (isinstance(version, int) and 0 <= version <= 255):
                raise KeyFileError(f"{where}: version must be an integer 0..255")
            keys = {}
            for usage in KEY_USAGES:
                try:
                    keys[usage] = bytes.fromhex(entry[usage])
                except (KeyError, TypeError, ValueError):
                    raise KeyFileError(f"{where}: '{usage}' must be 32 hex digits") from None
                if len(keys[usage]) != 16:
                    raise KeyFileError(f"{where}: '{usage}' must be 32 hex digits")
            sets.append(IssuerKeySet(city, version, **keys))
        return cls(sets, test_keys=bool(doc.get("test_keys")))

    @classmethod
    def load(cls, path: Path) -> IssuerKeyStore:
        """Read a key file; KeyFileError when it is missing or malformed."""
        return cls.from_json(read_json(path, KeyFileError, "key file"), str(path))

    @classmethod
    def test_set(cls) -> IssuerKeyStore:
        """The published test keys for Jinan 4510, Yantai 4560 and Zibo 4530 (fixtures)."""
        return cls.load(fixture_path(TEST_KEYS_FIXTURE))


def city_of_serial(card_serial: bytes) -> str:
    """The issuer city code carried in the first two BCD bytes of a card serial (docs/card-choices.md)."""
    digits = card_serial[:2].hex()
    if len(digits) != 4 or not digits.isdigit():
        raise ValueError(f"card serial {card_serial.hex().upper()} does not start with a BCD city code")
    return digits
