"""Hotlist messages for terminal tests, as an issuer's clearing publishes them: a snapshot's chunks then its head,
and the retained delta since a snapshot."""

from __future__ import annotations

from collections.abc import Iterable

from terminals.hotlist import CardSet, encode_chunks
from terminals.messages import (
    CHUNK_SCHEMA,
    DELTA_SCHEMA,
    MAX_CHUNK,
    SNAPSHOT_SCHEMA,
    HotlistChange,
    HotlistChunk,
    HotlistDelta,
    HotlistSnapshot,
    hotlist_chunk_topic,
    hotlist_delta_topic,
    hotlist_snapshot_topic,
)

Message = tuple[str, str]
"""(topic, payload)"""


def published(version: int) -> str:
    """The publish time of test version ``version``: one minute apart."""
    return f"2026-11-24T08:{version % 60:02d}:00+08:00"


def snapshot(issuer: str, version: int, cards: Iterable[str], size: int = MAX_CHUNK) -> list[Message]:
    """The chunk messages of the snapshot, then its head (the order a clearing publishes them)."""
    card_set = CardSet.of(cards)
    sha256, chunks = encode_chunks(card_set, size)
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
        published=published(version),
        cards=len(card_set),
        chunks=len(chunks),
        sha256=sha256,
    )
    return [*messages, (hotlist_snapshot_topic(issuer), head.to_json())]


def delta(issuer: str, base: int, *added: list[str]) -> Message:
    """The delta since snapshot ``base``: version base+1 added ``added[0]``, base+2 ``added[1]``, ..."""
    changes = [
        HotlistChange(version=base + n, published=published(base + n), add=cards) for n, cards in enumerate(added, 1)
    ]
    message = HotlistDelta(schema=DELTA_SCHEMA, issuer=issuer, base=base, version=base + len(added), changes=changes)
    return hotlist_delta_topic(issuer), message.to_json()
