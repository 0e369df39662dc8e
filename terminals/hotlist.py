"""Hotlists in compact form: the card set a terminal checks at every tap, and the snapshot codec both the
issuer's clearing (encode) and the terminals (decode) use.

A province list of a million cards must fit a terminal in a few MiB, so cards are kept as integers, not
strings: a CPU serial (20 digits) is split into its first 11 digits, a group key, and its last 9 digits, a
``uint32`` in that group's sorted array; an M1 UID (8 hex digits) is a ``uint32`` in one sorted array. A
lookup is a dict access and a binary search.

Snapshot canonical form (what ``HotlistSnapshot.sha256`` covers): ``u32 n_serials, u32 n_uids``, then the
serials as sorted 9-byte big-endian integers, then the UIDs as sorted 4-byte big-endian integers. On the wire it
is zlib-compressed and cut into base64 chunks of at most ``MAX_CHUNK`` characters.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from terminals.messages import CARD_ID, MAX_CHUNK

_GROUP: Final = 11  # digits of a serial that name its group; the other 9 fit a uint32
_TAIL: Final = 10**9
_SERIAL_BYTES: Final = 9  # 10**20 < 2**72
_HEADER: Final = struct.Struct(">II")
MAX_CARDS: Final = 5_000_000
"""Most cards one snapshot may hold: a bound on what a decompressed snapshot may grow to (zip bombs)."""

U32 = npt.NDArray[np.uint32]


class HotlistError(ValueError):
    """A snapshot that cannot be the list it claims to be (corrupt, truncated, wrong checksum)."""


def _empty() -> U32:
    return np.zeros(0, dtype=np.uint32)


@dataclass(frozen=True)
class CardSet:
    """An immutable set of card ids (CPU serials and M1 UIDs) in compact form."""

    groups: dict[str, U32]
    uids: U32

    @classmethod
    def of(cls, cards: Iterable[str]) -> CardSet:
        """The set of ``cards`` (ids as CARD_ID; ValueError for anything else)."""
        serials: dict[str, list[int]] = {}
        uids: list[int] = []
        for card in cards:
            if not CARD_ID.match(card):
                raise ValueError(f"not a 20-digit serial or 8-hex-digit UID: {card!r}")
            if len(card) == 8:
                uids.append(int(card, 16))
            else:
                serials.setdefault(card[:_GROUP], []).append(int(card[_GROUP:]))
        return cls(
            {key: np.unique(np.array(tails, dtype=np.uint32)) for key, tails in serials.items()},
            np.unique(np.array(uids, dtype=np.uint32)),
        )

    def __contains__(self, card: object) -> bool:
        if not isinstance(card, str) or not CARD_ID.match(card):
            return False
        if len(card) == 8:
            return _holds(self.uids, int(card, 16))
        group = self.groups.get(card[:_GROUP])
        return group is not None and _holds(group, int(card[_GROUP:]))

    def __len__(self) -> int:
        return int(self.uids.size) + sum(int(g.size) for g in self.groups.values())

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what the set costs beyond a few objects per group)."""
        return int(self.uids.nbytes) + sum(int(g.nbytes) for g in self.groups.values())

    def with_cards(self, cards: Iterable[str]) -> CardSet:
        """This set with ``cards`` added (a new set; this one is unchanged)."""
        added = CardSet.of(cards)
        groups = dict(self.groups)
        for key, tails in added.groups.items():
            groups[key] = np.union1d(groups[key], tails) if key in groups else tails
        return CardSet(groups, np.union1d(self.uids, added.uids) if added.uids.size else self.uids)

    def cards(self) -> list[str]:
        """Every card id, serials then UIDs, each sorted."""
        serials = [f"{key}{int(tail):09d}" for key in sorted(self.groups) for tail in self.groups[key]]
        return serials + [f"{int(uid):08X}" for uid in self.uids]

    def canonical(self) -> bytes:
        """The canonical bytes of this set (see the module docstring)."""
        keys = sorted(self.groups)
        serials = [int(key) * _TAIL + int(tail) for key in keys for tail in self.groups[key]]
        body = b"".join(n.to_bytes(_SERIAL_BYTES) for n in serials)
        return _HEADER.pack(len(serials), int(self.uids.size)) + body + self.uids.astype(">u4").tobytes()

    @classmethod
    def from_canonical(cls, raw: bytes) -> CardSet:
        """The set whose canonical bytes are ``raw``; HotlistError when they cannot be."""
        if len(raw) < _HEADER.size:
            raise HotlistError("snapshot shorter than its header")
        n_serials, n_uids = _HEADER.unpack_from(raw)
        if len(raw) != _HEADER.size + n_serials * _SERIAL_BYTES + n_uids * 4:
            raise HotlistError(f"snapshot of {len(raw)} bytes does not hold {n_serials} serials and {n_uids} UIDs")
        start = _HEADER.size
        cards = [
            f"{int.from_bytes(raw[at : at + _SERIAL_BYTES]):020d}"
            for at in range(start, start + n_serials * _SERIAL_BYTES, _SERIAL_BYTES)
        ]
        uids = np.frombuffer(raw, dtype=">u4", count=n_uids, offset=start + n_serials * _SERIAL_BYTES)
        try:
            made = cls.of(cards)
        except ValueError as err:
            raise HotlistError(f"snapshot holds a serial out of range: {err}") from err
        return cls(made.groups, np.unique(uids.astype(np.uint32)))


def _holds(sorted_values: U32, value: int) -> bool:
    # as a uint32, not a Python int: numpy would otherwise widen the whole array to int64 at every lookup
    at = int(np.searchsorted(sorted_values, np.uint32(value)))
    return at < sorted_values.size and int(sorted_values[at]) == value


def digest(canonical: bytes) -> str:
    """The SHA-256 (hex) a snapshot head announces for these canonical bytes."""
    return hashlib.sha256(canonical).hexdigest()


def encode_chunks(cards: CardSet, size: int = MAX_CHUNK) -> tuple[str, list[str]]:
    """(sha256 of the canonical bytes, base64 chunks of the compressed snapshot, at least one)."""
    canonical = cards.canonical()
    text = base64.b64encode(zlib.compress(canonical, 6)).decode("ascii")
    size -= size % 4  # whole base64 quanta: each chunk decodes on its own
    return digest(canonical), [text[at : at + size] for at in range(0, len(text), size)] or [""]


def decode_chunks(chunks: Sequence[str], sha256: str, cards: int) -> CardSet:
    """The set sent as ``chunks``, checked against its head's ``sha256`` and card count; HotlistError if not."""
    try:
        compressed = b"".join(base64.b64decode(chunk, validate=True) for chunk in chunks)
        inflater = zlib.decompressobj()
        limit = _HEADER.size + MAX_CARDS * _SERIAL_BYTES
        canonical = inflater.decompress(compressed, limit)
        if inflater.unconsumed_tail or not inflater.eof:
            raise HotlistError("snapshot truncated, or larger than any hotlist may be")
    except (ValueError, zlib.error) as err:
        raise HotlistError(f"snapshot data corrupt: {err}") from err
    if digest(canonical) != sha256:
        raise HotlistError("snapshot checksum does not match its head")
    found = CardSet.from_canonical(canonical)
    if len(found) != cards:
        raise HotlistError(f"snapshot holds {len(found)} cards, its head says {cards}")
    return found


EMPTY: Final = CardSet({}, _empty())
"""The empty set (no hotlist known yet)."""
