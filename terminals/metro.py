"""Metro gates: the fare table (fixtures/metro.json), the 48-byte 0x1E trip record, and the fare at exit."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cardsim.bcd import bcd, parse_bcd_datetime
from cardsim.resources import fixture_path

TRIP_ENTRY: Final = 0x03
TRIP_EXIT: Final = 0x04
MODE_METRO: Final = 0x01
METRO_FIXTURE: Final = "metro.json"


class FareTableError(ValueError):
    """A fare table file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Station:
    """A station: its line, its code, and its distance in km from the line's origin (where lines meet)."""

    line: str
    code: str
    km: float


@dataclass(frozen=True)
class CityFares:
    """One city's network and distance bands (fen)."""

    stations: dict[tuple[str, str], Station]
    bands: list[tuple[float, int]]
    max_fare: int

    def station(self, line: str, code: str) -> Station:
        """A station of the network; KeyError with the known lines when it is not one."""
        try:
            return self.stations[(line, code)]
        except KeyError:
            lines = sorted({s.line for s in self.stations.values()})
            raise KeyError(f"no station {code} on line {line} (lines: {', '.join(lines)})") from None

    def fare(self, entry: Station, exit_: Station) -> int:
        """The fare between two stations: km on one line, or through the shared origin between lines."""
        km = abs(entry.km - exit_.km) if entry.line == exit_.line else entry.km + exit_.km
        for up_to, fare in self.bands:
            if km <= up_to:
                return fare
        return self.max_fare


@dataclass(frozen=True)
class FareTable:
    """Metro networks of the cities, and how long a trip may last before it pays the maximum fare."""

    cities: dict[str, CityFares]
    max_trip: dt.timedelta

    def city(self, code: str) -> CityFares:
        """One city's fares; KeyError naming the cities that have a metro."""
        try:
            return self.cities[code]
        except KeyError:
            raise KeyError(f"city {code} has no metro in the fare table (cities: {', '.join(self.cities)})") from None

    @classmethod
    def load(cls, path: Path | None = None) -> FareTable:
        """Read a ``yikatong.metro/1`` file (default: the shipped fixture); FareTableError names the problem."""
        source = path or fixture_path(METRO_FIXTURE)
        try:
            doc = json.loads(Path(source).read_text(encoding="utf-8"))
            return cls._from_json(doc)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:  # (a list where an object goes)
            raise FareTableError(f"{source}: {err}") from err

    @classmethod
    def _from_json(cls, doc: object) -> FareTable:
        if not isinstance(doc, dict) or doc.get("schema") != "yikatong.metro/1":
            raise ValueError("not a yikatong.metro/1 document")
        cities = {}
        for code, city in doc["cities"].items():
            stations = {
                (line, s["station"]): Station(line, str(s["station"]), float(s["km"]))
                for line, members in city["lines"].items()
                for s in members
            }
            bands = sorted((float(b["up_to_km"]), int(b["fare"])) for b in city["bands"])
            cities[str(code)] = CityFares(stations, bands, int(city["max_fare"]))
        return cls(cities, dt.timedelta(minutes=int(doc["max_trip_minutes"])))


@dataclass(frozen=True)
class Trip:
    """A decoded 0x1E trip record (the fields a gate uses)."""

    trip_type: int
    line: str
    station: str
    amount: int
    balance_after: int
    when: dt.datetime
    city: str


def _place(line: str, station: str) -> bytes:
    return line.encode("ascii").ljust(3, b" ")[:3] + station.encode("ascii").ljust(4, b" ")[:4]


def trip_record(
    trip_type: int,
    terminal: bytes,
    line: str,
    station: str,
    amount: int,
    balance_after: int,
    when: dt.datetime,
    city: str,
    acquirer: bytes,
) -> bytes:
    """The 48-byte record: type | terminal(8) | mode | line(3)+station(4) ASCII | amount | balance after |
    YYYYMMDDhhmmss BCD | city BCD | acquirer id(8) | RFU(6)."""
    return (
        bytes([trip_type])
        + terminal.rjust(8, b"\x00")
        + bytes([MODE_METRO])
        + _place(line, station)
        + amount.to_bytes(4)
        + balance_after.to_bytes(4)
        + bcd(when.strftime("%Y%m%d%H%M%S"))
        + bcd(city)
        + acquirer[-8:].rjust(8, b"\x00")
        + bytes(6)
    )


def parse_trip(record: bytes) -> Trip | None:
    """A trip record written by a metro gate, or None for anything else (other modes, garbage)."""
    if len(record) != 48 or record[9] != MODE_METRO or record[0] not in (TRIP_ENTRY, TRIP_EXIT):
        return None
    try:
        place = record[10:17].decode("ascii")
        when = parse_bcd_datetime(record[25:29], record[29:32])
    except ValueError:
        return None
    city = record[32:34].hex()
    if not city.isdigit():
        return None
    return Trip(
        record[0],
        place[:3].rstrip(),
        place[3:].rstrip(),
        int.from_bytes(record[17:21]),
        int.from_bytes(record[21:25]),
        when,
        city,
    )


def exit_fare(
    fares: CityFares, table: FareTable, city: str, last: Trip | None, exit_: Station, now: dt.datetime
) -> int:
    """The fare at an exit gate: by distance from the entry on the card, or the maximum fare when the card has
    no entry in this city's network within ``max_trip`` (no entry, already exited, another city, stale)."""
    if last is None or last.trip_type != TRIP_ENTRY or last.city != city:
        return fares.max_fare
    if not dt.timedelta(0) <= now.replace(tzinfo=None) - last.when <= table.max_trip:
        return fares.max_fare
    entry = fares.stations.get((last.line, last.station))
    return fares.max_fare if entry is None else fares.fare(entry, exit_)
