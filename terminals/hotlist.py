"""Hotlists in compact form: the card set a terminal checks at every tap, the snapshot codec both the issuer's
clearing (encode) and the terminals (decode) use, and ``HotlistBook``, every issuer's list as a terminal keeps it.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from terminals.messages import (
    CARD_ID,
    CHUNK_SCHEMA,
    MAX_CHUNK,
    SNAPSHOT_SCHEMA,
    HotlistChunk,
    HotlistDelta,
    HotlistSnapshot,
    MessageError,
    hotlist_chunk_topic,
    hotlist_delta_topic,
    hotlist_issuer,
    hotlist_snapshot_topic,
    parse_hotlist_message,
)

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
        # serial = key * 10**9 + tail reaches 2**67: written as a 5-byte high and a 4-byte low part, in numpy
        parts = [_serial_bytes(int(key), self.groups[key]) for key in sorted(self.groups)]
        n_serials = sum(len(part) for part in parts) // _SERIAL_BYTES
        return _HEADER.pack(n_serials, int(self.uids.size)) + b"".join(parts) + self.uids.astype(">u4").tobytes()

    @classmethod
    def from_canonical(cls, raw: bytes) -> CardSet:
        """The set whose canonical bytes are ``raw``; HotlistError when they cannot be."""
        if len(raw) < _HEADER.size:
            raise HotlistError("snapshot shorter than its header")
        n_serials, n_uids = _HEADER.unpack_from(raw)
        if len(raw) != _HEADER.size + n_serials * _SERIAL_BYTES + n_uids * 4:
            raise HotlistError(f"snapshot of {len(raw)} bytes does not hold {n_serials} serials and {n_uids} UIDs")
        start = _HEADER.size
        rows = np.frombuffer(raw, dtype=np.uint8, count=n_serials * _SERIAL_BYTES, offset=start)
        keys, tails = _split_serials(rows.reshape(n_serials, _SERIAL_BYTES))
        uids = np.frombuffer(raw, dtype=">u4", count=n_uids, offset=start + n_serials * _SERIAL_BYTES).astype(np.uint32)
        if bool(np.any(np.diff(uids.astype(np.int64)) <= 0)):
            raise HotlistError("snapshot UIDs not in strictly ascending order")
        return cls(_grouped(keys, tails), uids)


_LOW: Final = 2**32
_MAX_KEY: Final = 10**_GROUP


def _serial_bytes(key: int, tails: U32) -> bytes:
    """The 9-byte big-endian serials ``key * 10**9 + tail`` of one group, in the order of ``tails``."""
    high, low = divmod(key * _TAIL, _LOW)
    summed = np.uint64(low) + tails.astype(np.uint64)  # < 2**33: no overflow
    rows = np.empty((tails.size, _SERIAL_BYTES), dtype=np.uint8)
    rows[:, :5] = (np.uint64(high) + (summed >> np.uint64(32))).astype(">u8").view(np.uint8).reshape(-1, 8)[:, 3:]
    rows[:, 5:] = (summed & np.uint64(_LOW - 1)).astype(">u4").view(np.uint8).reshape(-1, 4)
    return rows.tobytes()


def _split_serials(rows: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.uint64], U32]:
    """(key, tail) of each 9-byte big-endian serial: ``serial // 10**9`` and ``serial % 10**9``; HotlistError
    when a serial has more than 20 digits."""
    high = np.zeros((rows.shape[0], 8), dtype=np.uint8)
    high[:, 3:] = rows[:, :5]
    high_value = high.view(">u8").reshape(-1).astype(np.uint64)  # serial >> 32, below 2**40
    low_value = rows[:, 5:].copy().view(">u4").reshape(-1).astype(np.uint64)
    # long division by 10**9 in base 2**32: the remainder of the high part times 2**32 still fits in 64 bits
    quotient, remainder = np.divmod(high_value, np.uint64(_TAIL))
    lower = remainder * np.uint64(_LOW) + low_value
    keys = quotient * np.uint64(_LOW) + lower // np.uint64(_TAIL)
    if keys.size and int(keys.max()) >= _MAX_KEY:
        raise HotlistError("snapshot holds a serial out of range (more than 20 digits)")
    return keys, (lower % np.uint64(_TAIL)).astype(np.uint32)


def _grouped(keys: npt.NDArray[np.uint64], tails: U32) -> dict[str, U32]:
    """The tails of each key, keyed by the key's 11 digits, from serials in strictly ascending order (as the
    canonical form has them; HotlistError otherwise)."""
    if not keys.size:
        return {}
    step = np.diff(keys.astype(np.int64))
    if bool(np.any((step < 0) | ((step == 0) & (np.diff(tails.astype(np.int64)) <= 0)))):
        raise HotlistError("snapshot serials not in strictly ascending order")
    bounds = np.flatnonzero(step) + 1
    return {
        f"{int(group[0]):0{_GROUP}d}": group_tails
        for group, group_tails in zip(np.split(keys, bounds), np.split(tails, bounds), strict=True)
    }


def _holds(sorted_values: U32, value: int) -> bool:
    # as a uint32, not a Python int: numpy would otherwise widen the whole array to int64 at every lookup
    at = int(np.searchsorted(sorted_values, np.uint32(value)))
    return at < sorted_values.size and int(sorted_values[at]) == value


def digest(canonical: bytes) -> str:
    """The SHA-256 (hex) a snapshot head announces for these canonical bytes."""
    return hashlib.sha256(canonical).hexdigest()


def _compress(canonical: bytes) -> bytes:
    """The zlib form of canonical bytes: what snapshot chunks carry and what a terminal's state file keeps."""
    return zlib.compress(canonical, 6)


def encode_chunks(cards: CardSet, size: int = MAX_CHUNK) -> tuple[str, list[str]]:
    """(sha256 of the canonical bytes, base64 chunks of the compressed snapshot, at least one)."""
    canonical = cards.canonical()
    text = base64.b64encode(_compress(canonical)).decode("ascii")
    size -= size % 4  # whole base64 quanta: each chunk decodes on its own
    return digest(canonical), [text[at : at + size] for at in range(0, len(text), size)] or [""]


def snapshot_messages(
    issuer: str, version: int, cards: CardSet, published: str, size: int = MAX_CHUNK
) -> list[tuple[str, str]]:
    """(topic, payload) of snapshot ``version`` of ``issuer``'s list holding ``cards``, published at ``published``
    (ISO 8601): every chunk, then the head that names them, in the order an issuer's clearing publishes them."""
    sha256, chunks = encode_chunks(cards, size)
    messages = [
        (
            hotlist_chunk_topic(issuer, index),
            HotlistChunk(schema=CHUNK_SCHEMA, issuer=issuer, version=version, index=index, data=data).to_json(),
        )
        for index, data in enumerate(chunks)
    ]
    head = HotlistSnapshot(
        schema=SNAPSHOT_SCHEMA,
        issuer=issuer,
        version=version,
        published=published,
        cards=len(cards),
        chunks=len(chunks),
        sha256=sha256,
    )
    return [*messages, (hotlist_snapshot_topic(issuer), head.to_json())]


_MAX_CANONICAL: Final = _HEADER.size + MAX_CARDS * _SERIAL_BYTES
# chunks a snapshot of MAX_CARDS cards may need at worst (zlib adds at most ~0.1 % and a few bytes to data it
# cannot compress; base64 adds a third): a head announcing more is refused before any chunk is kept for it
MAX_CHUNKS: Final = -(-4 * -(-(_MAX_CANONICAL + _MAX_CANONICAL // 1000 + 64) // 3) // MAX_CHUNK)


def _inflate(compressed: bytes) -> bytes:
    """Canonical bytes from their zlib form, never more than a hotlist of MAX_CARDS may be; HotlistError when
    the data is corrupt, truncated or too large."""
    inflater = zlib.decompressobj()
    try:
        canonical = inflater.decompress(compressed, _MAX_CANONICAL)
    except zlib.error as err:
        raise HotlistError(f"snapshot data corrupt: {err}") from err
    if inflater.unconsumed_tail or not inflater.eof:
        raise HotlistError("snapshot truncated, or larger than any hotlist may be")
    return canonical


def decode_chunks(chunks: Sequence[str], sha256: str, cards: int) -> tuple[CardSet, bytes]:
    """The set sent as ``chunks``, checked against its head's ``sha256`` and card count (HotlistError if not), and
    its compressed form as it came (kept as is: compressing the set again would only rebuild these bytes)."""
    try:
        compressed = b"".join(base64.b64decode(chunk, validate=True) for chunk in chunks)
    except ValueError as err:
        raise HotlistError(f"snapshot data corrupt: {err}") from err
    canonical = _inflate(compressed)
    if digest(canonical) != sha256:
        raise HotlistError("snapshot checksum does not match its head")
    found = CardSet.from_canonical(canonical)
    if len(found) != cards:
        raise HotlistError(f"snapshot holds {len(found)} cards, its head says {cards}")
    return found, compressed


EMPTY: Final = CardSet({}, _empty())
"""The empty set (no hotlist known yet)."""


# --- a terminal's book of every issuer's list ---------------------------------------------------------------


@dataclass(frozen=True)
class IssuerList:
    """One issuer's hotlist as a terminal holds it: ``version`` (0: none yet), when the issuer ``published`` it
    (ISO 8601, empty for none) and its ``cards``."""

    issuer: str
    version: int
    published: str
    cards: CardSet
    arrived: bytes | None = field(default=None, compare=False, repr=False)
    """The compressed form of ``cards`` as a snapshot brought it (None: the list changed since)."""

    def packed(self) -> bytes:
        """The canonical bytes of the cards, zlib-compressed (how a terminal's state file keeps them)."""
        return self.arrived if self.arrived is not None else _compress(self.cards.canonical())

    @classmethod
    def unpacked(cls, issuer: str, version: int, published: str, packed: bytes) -> IssuerList:
        """The list kept as ``packed`` bytes; HotlistError when they are not a list."""
        return cls(issuer, version, published, CardSet.from_canonical(_inflate(packed)))


@dataclass(frozen=True)
class Listing:
    """A hotlist that holds a card: whose it is and which version."""

    issuer: str
    version: int


@dataclass(frozen=True)
class HotlistNews:
    """What one offered message did: the ``issuer`` whose topic it came on (None: not a hotlist topic), the
    ``version`` it made current (None: the list did not change), one ``note`` line for the log, and whether the
    message was ``refused`` as invalid (the list held before is kept)."""

    issuer: str | None
    version: int | None
    note: str
    refused: bool = False


@dataclass
class _Incoming:
    """What is on its way for one issuer: a snapshot being assembled (its head, its chunks by index), chunks of
    a version whose head has not come yet (chunks are published first), and the newest delta not yet applied."""

    head: HotlistSnapshot | None = None
    chunks: dict[int, str] = field(default_factory=dict)
    early_version: int = 0
    early: dict[int, str] = field(default_factory=dict)
    delta: HotlistDelta | None = None


class HotlistBook:
    """Every issuer's hotlist as one terminal keeps it, fed the messages of the hotlist topics (sans-IO: it reads
    no clock and no network, it takes what it is offered).

    An issuer's list moves on by its deltas in order, or by a whole snapshot on first start or after a gap (the
    terminal was offline while the issuer's delta moved past its version). Anything invalid is refused with a
    note and the list held before stays. Offer from one thread at a time; ``blocking``, ``versions``,
    ``settled`` may be called from another meanwhile (the maps they read are replaced, never changed in place).
    """

    def __init__(self, lists: Iterable[IssuerList] = ()) -> None:
        self._lists: Mapping[str, IssuerList] = dict(sorted({held.issuer: held for held in lists}.items()))
        self._incoming: Mapping[str, _Incoming] = {}

    # --- what a tap asks ---------------------------------------------------------------------------------

    def blocking(self, card: str, issuer: str | None = None) -> Listing | None:
        """The list that holds ``card``: the card's own ``issuer``'s when it does, else the first by city code;
        None when no list holds it."""
        lists = self._lists  # one read: another thread may replace the map
        own = lists.get(issuer) if issuer is not None else None
        if own is not None and card in own.cards:
            return Listing(own.issuer, own.version)
        for held in lists.values():
            if card in held.cards:
                return Listing(held.issuer, held.version)
        return None

    def held(self, issuer: str) -> IssuerList:
        """The issuer's list as held now (version 0 and no cards when none has come)."""
        return self._lists.get(issuer) or IssuerList(issuer, 0, "", EMPTY)

    def lists(self) -> list[IssuerList]:
        """Every list held, by issuer."""
        return list(self._lists.values())

    def version(self, issuer: str) -> int:
        """The version held of the issuer's list (0: none)."""
        return self.held(issuer).version

    def versions(self) -> dict[str, int]:
        """The version held of each issuer's list, by issuer."""
        return {issuer: held.version for issuer, held in self._lists.items()}

    def incomplete(self) -> list[str]:
        """Issuers with a snapshot half assembled or a version gap waiting for the snapshot."""
        return [issuer for issuer, incoming in self._incoming.items() if self._waiting(issuer, incoming)]

    def settled(self) -> bool:
        """No snapshot half assembled and no version gap waiting."""
        return not self.incomplete()

    @property
    def nbytes(self) -> int:
        """Bytes held by the card arrays of every list."""
        return sum(held.cards.nbytes for held in self._lists.values())

    # --- messages ----------------------------------------------------------------------------------------

    def offer(self, topic: str, payload: bytes | str) -> HotlistNews:
        """Take one message of a hotlist topic. Never raises: what it did, or why it was refused, is the news."""
        issuer = hotlist_issuer(topic)
        if issuer is None:
            return HotlistNews(None, None, f"hotlist: {topic!r} is not a hotlist topic", refused=True)
        if not payload:  # a retained message being cleared (a chunk topic a smaller snapshot no longer uses)
            return HotlistNews(issuer, None, f"hotlist {issuer}: {topic} cleared")
        try:
            message = parse_hotlist_message(payload)
            if topic != (home := _topic(message)):
                raise MessageError(f"a message of {message.issuer}'s version {message.version} belongs on {home}")
        except MessageError as err:
            return self._refused(issuer, f"{topic}: {err}")
        incoming = self._incoming.get(issuer)
        if incoming is None:
            incoming = _Incoming()
            self._incoming = {**self._incoming, issuer: incoming}
        if isinstance(message, HotlistSnapshot):
            return self._head(incoming, message)
        if isinstance(message, HotlistChunk):
            return self._chunk(incoming, message)
        return self._delta(incoming, message)

    def _head(self, incoming: _Incoming, head: HotlistSnapshot) -> HotlistNews:
        issuer, held = head.issuer, self.held(head.issuer)
        if head.version <= held.version or (incoming.head is not None and head.version < incoming.head.version):
            return HotlistNews(issuer, None, f"hotlist {issuer}: snapshot {head.version} ignored, not newer")
        if head.cards > MAX_CARDS or head.chunks > MAX_CHUNKS:
            return self._refused(issuer, f"snapshot {head.version} of {head.cards} cards in {head.chunks} chunks")
        if incoming.head is None or head.version != incoming.head.version:
            early = incoming.early if incoming.early_version == head.version else {}
            incoming.chunks = {index: data for index, data in early.items() if index < head.chunks}
            if incoming.early_version <= head.version:
                incoming.early_version, incoming.early = 0, {}
        incoming.head = head
        return self._assemble(incoming, head)

    def _chunk(self, incoming: _Incoming, chunk: HotlistChunk) -> HotlistNews:
        issuer, head = chunk.issuer, incoming.head
        if chunk.version <= self.version(issuer) or (head is not None and chunk.version < head.version):
            return HotlistNews(issuer, None, f"hotlist {issuer}: chunk {chunk.index} of {chunk.version} ignored, old")
        if head is None or chunk.version != head.version:  # ahead of its head: kept aside, one version at most
            if chunk.version > incoming.early_version:
                incoming.early_version, incoming.early = chunk.version, {}
            if chunk.version == incoming.early_version and chunk.index < MAX_CHUNKS:
                incoming.early[chunk.index] = chunk.data
            return HotlistNews(issuer, None, f"hotlist {issuer}: chunk {chunk.index} of {chunk.version} kept aside")
        if chunk.index >= head.chunks:
            return self._refused(issuer, f"chunk {chunk.index} of snapshot {head.version}, which has {head.chunks}")
        incoming.chunks[chunk.index] = chunk.data
        return self._assemble(incoming, head)

    def _assemble(self, incoming: _Incoming, head: HotlistSnapshot) -> HotlistNews:
        """Land the snapshot once every chunk is in, then the delta that continues it."""
        issuer = head.issuer
        if len(incoming.chunks) < head.chunks:
            return HotlistNews(
                issuer, None, f"hotlist {issuer}: snapshot {head.version}, {len(incoming.chunks)}/{head.chunks} chunks"
            )
        chunks = [incoming.chunks[index] for index in range(head.chunks)]
        incoming.head, incoming.chunks = None, {}
        try:
            cards, arrived = decode_chunks(chunks, head.sha256, head.cards)
        except HotlistError as err:
            return self._refused(issuer, f"snapshot {head.version}: {err}")
        self._put(IssuerList(issuer, head.version, head.published, cards, arrived))
        note = f"hotlist {issuer}: version {head.version} from its snapshot, {len(cards)} cards"
        followed = self._follow(incoming, issuer)
        return HotlistNews(issuer, self.version(issuer), note + (f", then {followed}" if followed else ""))

    def _delta(self, incoming: _Incoming, delta: HotlistDelta) -> HotlistNews:
        issuer = delta.issuer
        if incoming.delta is None or delta.version >= incoming.delta.version:
            incoming.delta = delta
        followed = self._follow(incoming, issuer)
        if followed:
            return HotlistNews(issuer, self.version(issuer), f"hotlist {issuer}: {followed}")
        if self._waiting(issuer, incoming):
            return HotlistNews(
                issuer,
                None,
                f"hotlist {issuer}: delta {delta.base}..{delta.version} cannot follow version "
                f"{self.version(issuer)}: waiting for the snapshot",
            )
        return HotlistNews(issuer, None, f"hotlist {issuer}: delta up to {delta.version}, nothing new")

    def _follow(self, incoming: _Incoming, issuer: str) -> str:
        """Apply the issuer's newest delta where it continues the list held; what it did ("" for nothing)."""
        delta, held = incoming.delta, self.held(issuer)
        if delta is None or delta.base > held.version:
            return ""
        incoming.delta = None
        changes = [change for change in delta.changes if change.version > held.version]
        if not changes:
            return ""
        added = [card for change in changes for card in change.add]
        cards = held.cards.with_cards(added)
        self._put(IssuerList(issuer, delta.version, changes[-1].published, cards))
        if incoming.head is not None and incoming.head.version <= delta.version:  # overtaken: no longer needed
            incoming.head, incoming.chunks = None, {}
        return f"version {delta.version} from its delta (+{len(cards) - len(held.cards)} cards, {len(cards)} in all)"

    def _waiting(self, issuer: str, incoming: _Incoming) -> bool:
        """A snapshot half assembled, or a delta that cannot follow the version held (a gap)."""
        delta = incoming.delta
        return incoming.head is not None or (delta is not None and delta.base > self.version(issuer))

    def _put(self, held: IssuerList) -> None:
        self._lists = dict(sorted({**self._lists, held.issuer: held}.items()))

    def _refused(self, issuer: str, why: str) -> HotlistNews:
        return HotlistNews(
            issuer, None, f"hotlist {issuer}: refused {why}; keeping version {self.version(issuer)}", refused=True
        )


def _topic(message: HotlistSnapshot | HotlistChunk | HotlistDelta) -> str:
    """The topic a valid message of this kind travels on."""
    if isinstance(message, HotlistSnapshot):
        return hotlist_snapshot_topic(message.issuer)
    if isinstance(message, HotlistChunk):
        return hotlist_chunk_topic(message.issuer, message.index)
    return hotlist_delta_topic(message.issuer)
