"""Hotlist messages for terminal tests, as an issuer's clearing publishes them: a snapshot's chunks then its head,
and the retained delta since a snapshot."""

from __future__ import annotations

from collections.abc import Iterable

from terminals.hotlist import CardSet, snapshot_messages
from terminals.messages import (
    DELTA_SCHEMA,
    MAX_CHUNK,
    HotlistChange,
    HotlistDelta,
    hotlist_delta_topic,
)

Message = tuple[str, str]
"""(topic, payload)"""


def published(version: int) -> str:
    """The publish time of test version ``version``: one minute apart."""
    return f"2026-11-24T08:{version % 60:02d}:00+08:00"


def snapshot(issuer: str, version: int, cards: Iterable[str], size: int = MAX_CHUNK) -> list[Message]:
    """The chunk messages of the snapshot, then its head (the order a clearing publishes them)."""
    return snapshot_messages(issuer, version, CardSet.of(cards), published(version), size)


def delta(issuer: str, base: int, *added: list[str]) -> Message:
    """The delta since snapshot ``base``: version base+1 added ``added[0]``, base+2 ``added[1]``, ..."""
    changes = [
        HotlistChange(version=base + n, published=published(base + n), add=cards) for n, cards in enumerate(added, 1)
    ]
    message = HotlistDelta(schema=DELTA_SCHEMA, issuer=issuer, base=base, version=base + len(added), changes=changes)
    return hotlist_delta_topic(issuer), message.to_json()
