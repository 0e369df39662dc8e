"""Publishing a city's hotlist to every terminal of the network: a full snapshot (compressed, checksummed,
chunked; ``terminals.hotlist``) now and then, and in between one small retained delta carrying every change
since that snapshot, so a terminal at any version from the snapshot on catches up from the delta alone.

A new snapshot replaces the delta when there is none yet, when the changes since it hold more than
``MAX_DELTA_CARDS`` cards or span more than ``SNAPSHOT_AFTER_VERSIONS`` versions, or when the operator asks. Every
message is retained and sent with QoS 1; a version counts as published (``Ledger.mark_published``, where liability
at settlement starts) only once the broker confirmed every message carrying it.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from clearing.ledger import HotlistHead, Ledger, VersionTimes
from terminals.hotlist import CardSet, snapshot_messages
from terminals.messages import (
    CHINA,
    DELTA_SCHEMA,
    MAX_DELTA_CARDS,
    HotlistChange,
    HotlistDelta,
    hotlist_chunk_topic,
    hotlist_delta_topic,
)

log = logging.getLogger(__name__)
SNAPSHOT_AFTER_VERSIONS: Final = 50
"""Most versions one delta spans: past it a new snapshot keeps the delta (and a catching-up terminal's work) short."""


class Publisher(Protocol):
    """What publishing needs of an MQTT client (an ``aiomqtt.Client``): a publish that returns once the broker
    confirmed it (QoS 1: its PUBACK) and raises when it cannot."""

    async def publish(self, topic: str, payload: str | bytes, qos: int, retain: bool) -> None:
        """Publish ``payload`` on ``topic``."""


@dataclass(frozen=True)
class Published:
    """What one ``publish_hotlist`` sent: the version now on the broker (0: no list, nothing sent), whether a new
    snapshot was made (and why), and the cards on the list when it was (else None: not counted)."""

    version: int
    snapshot_reason: str | None = None
    cards: int | None = None


def snapshot_reason(head: HotlistHead, pending: Sequence[VersionTimes], cards: int, *, asked: bool) -> str | None:
    """Why the list needs a new snapshot rather than a delta (None: a delta will do). ``pending`` are the
    versions above the last snapshot, ``cards`` the cards they added."""
    if asked:
        return "asked for"
    if head.snapshot == 0:
        return "no snapshot yet"
    if [v.version for v in pending] != list(range(head.snapshot + 1, head.version + 1)):
        return f"versions {head.snapshot + 1}..{head.version} are not all in the database"
    if cards > MAX_DELTA_CARDS:
        return f"{cards} cards since snapshot {head.snapshot}, more than a delta holds ({MAX_DELTA_CARDS})"
    if len(pending) > SNAPSHOT_AFTER_VERSIONS:
        return f"{len(pending)} versions since snapshot {head.snapshot} (at most {SNAPSHOT_AFTER_VERSIONS})"
    return None


def iso(epoch: float) -> str:
    """An epoch time as the wire's ISO 8601 time (+08:00, milliseconds)."""
    return dt.datetime.fromtimestamp(epoch, CHINA).isoformat(timespec="milliseconds")


async def publish_hotlist(
    client: Publisher, ledger: Ledger, *, snapshot: bool = False, restore: bool = False
) -> Published:
    """Bring the broker's retained copy of the city's hotlist up to the database: a delta, or a new snapshot
    (always with ``snapshot``). ``restore`` sends the current snapshot again too (a service starting cannot
    know that the broker kept it). Raises ``aiomqtt.MqttError`` when the broker fails: no version is marked
    published unless the broker confirmed every message."""
    head = await ledger.hotlist_head()
    if head.version == 0:
        return Published(0)
    # times of the snapshot's own version too (a snapshot sent again carries its first publish time)
    times = await ledger.hotlist_versions(after=max(head.snapshot - 1, 0))
    pending = [v for v in times if v.version > head.snapshot]
    added = await ledger.hotlist_added(after=head.snapshot)
    now = round(time.time(), 3)  # what the messages say is what the database keeps
    first_published = {v.version: v.published for v in times}
    reason = snapshot_reason(head, pending, sum(map(len, added.values())), asked=snapshot)
    if reason is not None:
        cards = await ledger.hotlist_cards(head.version)
        stale = await ledger.snapshot_chunks()
        chunks = await send_snapshot(
            client, ledger.city, head.version, cards, first_published.get(head.version) or now, stale
        )
        await _send_delta(
            client,
            HotlistDelta(schema=DELTA_SCHEMA, issuer=ledger.city, base=head.version, version=head.version, changes=[]),
        )
        await ledger.mark_published(head.version, now, snapshot=True, chunks=chunks)
        log.info("hotlist %s: snapshot of version %d (%d cards): %s", ledger.city, head.version, len(cards), reason)
        return Published(head.version, reason, len(cards))
    if restore:
        cards = await ledger.hotlist_cards(head.snapshot)
        await send_snapshot(client, ledger.city, head.snapshot, cards, first_published.get(head.snapshot) or now, 0)
    changes = [
        HotlistChange(version=v.version, published=iso(v.published or now), add=added.get(v.version, []))
        for v in pending
    ]
    await _send_delta(
        client,
        HotlistDelta(
            schema=DELTA_SCHEMA, issuer=ledger.city, base=head.snapshot, version=head.version, changes=changes
        ),
    )
    await ledger.mark_published(head.version, now)
    return Published(head.version)


async def send_snapshot(
    client: Publisher, city: str, version: int, cards: CardSet, published: float, stale: int
) -> int:
    """Publish snapshot ``version`` of ``city``'s list, ``cards``, first published at ``published``: every chunk,
    then the head that names them; then clear the chunk topics past its own up to ``stale - 1`` that a larger
    earlier snapshot left retained. Returns its chunk count."""
    messages = snapshot_messages(city, version, cards, iso(published))
    for topic, payload in messages:
        await client.publish(topic, payload, qos=1, retain=True)
    chunks = len(messages) - 1
    for index in range(chunks, stale):
        await client.publish(hotlist_chunk_topic(city, index), b"", qos=1, retain=True)
    return chunks


async def _send_delta(client: Publisher, delta: HotlistDelta) -> None:
    await client.publish(hotlist_delta_topic(delta.issuer), delta.to_json(), qos=1, retain=True)
