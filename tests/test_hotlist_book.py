"""The terminal's book of every issuer's hotlist, without a broker: deltas in order, a version gap caught up by
the snapshot, corrupt or truncated data refused with the old list kept, a list of 200,000 cards enforced, the
lists kept in the state file, and whatever arrives on a hotlist topic never raising."""

from __future__ import annotations

import base64
import json
import sqlite3
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from hotlist_support import Message, delta, published, snapshot
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import json_values

from terminals.hotlist import MAX_CHUNKS, CardSet, HotlistBook, HotlistError, IssuerList, Listing
from terminals.messages import (
    MessageError,
    hotlist_chunk_topic,
    hotlist_delta_topic,
    hotlist_snapshot_topic,
    parse_hotlist_message,
)
from terminals.outbox import Outbox


def serial(issuer: str, n: int) -> str:
    return f"3104{issuer}{n:012d}"


A, B, C, D = (serial("4510", n) for n in range(1, 5))
UID = "04A1B2C3"


def offer_all(book: HotlistBook, messages: list[Message]) -> None:
    for topic, payload in messages:
        news = book.offer(topic, payload)
        assert not news.refused, news.note


def at_version_5() -> HotlistBook:
    """A book that followed 4510's snapshot 2 and its deltas up to version 5."""
    book = HotlistBook()
    offer_all(book, snapshot("4510", 2, [A]))
    offer_all(book, [delta("4510", 2, [B]), delta("4510", 2, [B], []), delta("4510", 2, [B], [], [UID])])
    assert book.version("4510") == 5
    return book


def test_deltas_are_applied_in_order_and_a_repeat_changes_nothing() -> None:
    book = HotlistBook()
    first = book.offer(*delta("4510", 0, [A]))
    assert (first.issuer, first.version, first.refused) == ("4510", 1, False)
    assert book.blocking(A) == Listing("4510", 1) and book.blocking(B) is None
    second = book.offer(*delta("4510", 0, [A], [B, UID]))
    assert second.version == 2 and "+2 cards, 3 in all" in second.note
    assert book.blocking(B) == Listing("4510", 2) and book.blocking(UID) == Listing("4510", 2)
    again = book.offer(*delta("4510", 0, [A]))
    assert again.version is None and not again.refused and book.version("4510") == 2
    assert book.held("4510").published == published(2) and book.settled()


def test_a_terminal_offline_for_three_versions_waits_for_the_snapshot_then_takes_the_delta() -> None:
    book = at_version_5()
    # offline while the issuer went to 6, 7, 8 and snapshotted 8; back, the retained delta (base 8) comes first
    news = book.offer(*delta("4510", 8, [D]))
    assert news.version is None and "waiting for the snapshot" in news.note
    assert not book.settled() and book.incomplete() == ["4510"]
    assert book.version("4510") == 5 and book.blocking(A) == Listing("4510", 5), "the old list is enforced meanwhile"
    *chunks, head = snapshot("4510", 8, [A, B, C, UID], size=8)
    assert len(chunks) > 2
    book.offer(*head)  # the head first this time: the snapshot is half assembled
    for topic, payload in chunks[:-1]:
        assert book.offer(topic, payload).version is None and not book.settled()
    landed = book.offer(*chunks[-1])
    assert (
        landed.version == 9
        and "version 8 from its snapshot" in landed.note
        and "version 9 from its delta" in landed.note
    )
    assert book.settled() and book.blocking(C) == Listing("4510", 9) and book.blocking(D) == Listing("4510", 9)


def test_chunks_ahead_of_their_head_are_kept_aside_and_dropped_when_superseded() -> None:
    book = HotlistBook()
    *old_chunks, _ = snapshot("4560", 3, [serial("4560", 3)], size=8)
    *new_chunks, new_head = snapshot("4560", 4, [serial("4560", 4)], size=8)
    for message in [*old_chunks[:2], *new_chunks]:
        assert book.offer(*message).version is None
    assert book.settled(), "chunks without a head are not a half-assembled snapshot"
    assert book.offer(*new_head).version == 4  # the aside chunks of version 4 complete it at once
    assert book.blocking(serial("4560", 4)) == Listing("4560", 4) and book.blocking(serial("4560", 3)) is None
    stale = book.offer(*old_chunks[-1])
    assert stale.version is None and not stale.refused and book.settled()


def test_an_older_or_equal_head_is_ignored() -> None:
    book = at_version_5()
    *_, head = snapshot("4510", 2, [C])
    news = book.offer(*head)
    assert news.version is None and not news.refused and "ignored" in news.note
    assert book.settled() and book.version("4510") == 5


def _corrupt(chunk: Message) -> Message:
    topic, payload = chunk
    doc = json.loads(payload)
    data = base64.b64decode(doc["data"])
    doc["data"] = base64.b64encode(data[:10] + bytes([data[10] ^ 0xFF]) + data[11:]).decode()
    return topic, json.dumps(doc)


def _truncate(chunk: Message) -> Message:
    topic, payload = chunk
    doc = json.loads(payload)
    doc["data"] = doc["data"][: len(doc["data"]) // 8 * 4]
    return topic, json.dumps(doc)


def _wrong_checksum(head: Message) -> Message:
    topic, payload = head
    return topic, payload.replace(json.loads(payload)["sha256"], "0" * 64)


def _wrong_count(head: Message) -> Message:
    topic, payload = head
    return topic, payload.replace('"cards":4', '"cards":5')


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (lambda m: [*m[:-2], _corrupt(m[-2]), m[-1]], "corrupt"),
        (lambda m: [*m[:-2], _truncate(m[-2]), m[-1]], "truncated"),
        (lambda m: [*m[:-1], _wrong_checksum(m[-1])], "checksum"),
        (lambda m: [*m[:-1], _wrong_count(m[-1])], "holds 4 cards, its head says 5"),
    ],
    ids=["corrupted chunk", "truncated snapshot", "wrong checksum", "wrong card count"],
)
def test_a_spoilt_snapshot_is_refused_and_the_old_list_kept(
    spoil: Callable[[list[Message]], list[Message]], why: str
) -> None:
    book = at_version_5()
    messages = spoil(snapshot("4510", 8, [A, B, C, D]))
    *rest, last = messages
    offer_all(book, rest)
    news = book.offer(*last)
    assert news.refused and why in news.note and "keeping version 5" in news.note, news.note
    assert book.version("4510") == 5 and book.blocking(C) is None and book.blocking(A) == Listing("4510", 5)
    assert book.settled(), "a refused snapshot is not waited for"


def test_a_snapshot_cut_short_of_its_last_chunk_waits_and_the_old_list_stays() -> None:
    book = at_version_5()
    *chunks, head = snapshot("4510", 8, [A, B, C], size=8)
    offer_all(book, [*chunks[:-1], head])
    assert not book.settled() and book.version("4510") == 5 and book.blocking(C) is None


@pytest.mark.parametrize(
    ("message", "why"),
    [
        ((hotlist_delta_topic("4510"), b"\xff\xfe garbage"), "not UTF-8 JSON"),
        (
            (hotlist_delta_topic("4510"), delta("4510", 5, [C], [D])[1].replace('"version":7,"p', '"version":8,"p')),
            "order",
        ),
        ((hotlist_delta_topic("4510"), delta("4510", 5, [C])[1].replace(C, "1234")), "not a 20-digit serial"),
        ((hotlist_delta_topic("4560"), delta("4510", 5, [C])[1]), "belongs on yikatong/4510/hotlist/delta"),
        (
            (hotlist_chunk_topic("4510", 1), snapshot("4510", 8, [C])[0][1]),
            "belongs on yikatong/4510/hotlist/snapshot/0",
        ),
        ((hotlist_snapshot_topic("4510"), delta("4510", 5, [C])[1]), "belongs on yikatong/4510/hotlist/delta"),
    ],
    ids=["garbage", "changes out of order", "bad card id", "another issuer's topic", "wrong chunk index", "wrong kind"],
)
def test_a_bad_message_is_refused_and_the_old_list_kept(message: Message, why: str) -> None:
    book = at_version_5()
    news = book.offer(*message)
    assert news.refused and why in news.note and "keeping version" in news.note, news.note
    assert book.versions() == {"4510": 5} and book.blocking(C) is None and book.settled()


def test_a_head_announcing_more_than_any_list_needs_is_refused() -> None:
    book = HotlistBook()
    topic, payload = snapshot("4510", 1, [A])[-1]
    news = book.offer(topic, payload.replace('"chunks":1', f'"chunks":{MAX_CHUNKS + 1}'))
    assert news.refused and book.settled() and book.version("4510") == 0


def test_a_chunk_beyond_its_heads_count_is_refused() -> None:
    book = HotlistBook()
    *chunks, head = snapshot("4510", 1, [A, B, C], size=8)
    book.offer(*head)
    extra = snapshot("4510", 1, [A, B, C, D, UID], size=8)[len(chunks)]
    assert book.offer(*extra).refused


def test_every_issuer_is_enforced_and_the_cards_own_issuer_named_first() -> None:
    book = HotlistBook()
    offer_all(book, [delta("4560", 0, [A]), delta("4510", 0, [], [A]), delta("4530", 0, [UID])])
    assert book.blocking(A, "4510") == Listing("4510", 2)
    assert book.blocking(A, "4530") == Listing("4510", 2), "else the first list by city code"
    assert book.blocking(A) == Listing("4510", 2) and book.blocking(UID) == Listing("4530", 1)
    assert book.versions() == {"4510": 2, "4530": 1, "4560": 1}


def test_an_emptied_retained_topic_is_no_refusal_and_a_foreign_topic_is() -> None:
    book = at_version_5()
    cleared = book.offer(hotlist_chunk_topic("4510", 7), b"")
    assert not cleared.refused and cleared.version is None and book.version("4510") == 5
    foreign = book.offer("yikatong/4510/ack/451000000001", b"{}")
    assert foreign.refused and foreign.issuer is None


def test_a_list_of_200000_cards_is_enforced() -> None:
    listed = [serial("4510", 7 * n) for n in range(200_000)]
    book = HotlistBook()
    messages = snapshot("4510", 1, listed)
    assert len(messages) > 2, "more than one chunk"
    offer_all(book, messages)
    assert book.version("4510") == 1 and len(book.held("4510").cards) == 200_000
    assert all(book.blocking(card) == Listing("4510", 1) for card in listed)
    assert not any(book.blocking(serial("4510", 7 * n + 3)) for n in range(0, 200_000, 10))
    assert book.nbytes <= 4 * 200_000 + 1024


def test_lists_survive_in_the_state_file(tmp_path: Path) -> None:
    book = at_version_5()
    offer_all(book, [delta("4560", 0, [serial("4560", 9)])])
    outbox = Outbox(tmp_path / "t.sqlite")
    for held in book.lists():
        outbox.save_hotlist(held)
    outbox.close()
    restored = HotlistBook(Outbox(tmp_path / "t.sqlite").hotlists())
    assert restored.versions() == {"4510": 5, "4560": 1}
    assert [(h.issuer, h.version, h.published, h.cards.cards()) for h in restored.lists()] == [
        (h.issuer, h.version, h.published, h.cards.cards()) for h in book.lists()
    ]
    # and it goes on from there: the next delta applies
    assert restored.offer(*delta("4510", 2, [B], [], [UID], [D])).version == 6


def test_a_state_file_with_the_old_single_hotlist_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute(
            "INSERT INTO meta VALUES ('hotlist', ?)",
            ('{"schema":"yikatong.hotlist/1","version":3,"cards":["31044510000000000001"]}',),
        )
    outbox = Outbox(path)
    assert outbox.hotlists() == [] and outbox.get_meta("hotlist") is not None


def test_an_unreadable_stored_list_is_left_out(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "t.sqlite")
    outbox.save_hotlist(IssuerList("4510", 3, published(3), CardSet.of([A])))
    outbox.save_hotlist(IssuerList("4560", 1, published(1), CardSet.of([B])))
    with outbox._transaction() as db:
        db.execute("UPDATE hotlist SET cards = ? WHERE issuer = '4560'", (zlib.compress(b"\x00\x00\x00\x09"),))
    assert [held.issuer for held in outbox.hotlists()] == ["4510"]


# --- the canonical form ------------------------------------------------------------------------------------

card_ids = st.one_of(
    st.integers(0, 10**20 - 1).map(lambda n: f"{n:020d}"),
    st.integers(10**18, 10**20 - 1).map(lambda n: f"{n:020d}"),  # the wide serials: past 2**64
    st.integers(0, 2**32 - 1).map(lambda n: f"{n:08X}"),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(card_ids, max_size=40))
def test_the_canonical_form_is_the_spec_bytes_and_reads_back(cards: list[str]) -> None:
    card_set = CardSet.of(cards)
    serials = sorted({int(card) for card in cards if len(card) == 20})
    uids = sorted({int(card, 16) for card in cards if len(card) == 8})
    spec = (
        struct.pack(">II", len(serials), len(uids))
        + b"".join(n.to_bytes(9, "big") for n in serials)
        + b"".join(n.to_bytes(4, "big") for n in uids)
    )
    assert card_set.canonical() == spec
    back = CardSet.from_canonical(spec)
    assert back.cards() == card_set.cards() == sorted({c for c in cards if len(c) == 20}) + [f"{n:08X}" for n in uids]
    assert all(card in back for card in cards)


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (struct.pack(">II", 2, 0) + (5).to_bytes(9, "big") + (3).to_bytes(9, "big"), "ascending"),
        (struct.pack(">II", 2, 0) + (5).to_bytes(9, "big") * 2, "ascending"),
        (struct.pack(">II", 0, 2) + bytes.fromhex("0000000200000001"), "ascending"),
        (struct.pack(">II", 1, 0) + (10**20).to_bytes(9, "big"), "more than 20 digits"),
        (struct.pack(">II", 1, 0) + b"\x00" * 8, "does not hold"),
    ],
    ids=["unsorted", "duplicate", "unsorted UIDs", "21 digits", "short"],
)
def test_bytes_that_are_no_canonical_form_are_refused(raw: bytes, why: str) -> None:
    with pytest.raises(HotlistError, match=why):
        CardSet.from_canonical(raw)


# --- fuzzing -------------------------------------------------------------------------------------------------

GOOD: list[Message] = [*snapshot("4510", 3, [A, B, UID], size=8), delta("4510", 3, [C])]
topics = st.sampled_from([topic for topic, _ in GOOD] + ["yikatong/4510/hotlist", "x", "yikatong/45a0/hotlist/delta"])


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """Random bytes, random JSON, or a good hotlist message with one field replaced, removed or cut."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=300))
    if choice == 1:
        return json.dumps(draw(json_values)).encode()
    payload = draw(st.sampled_from(GOOD))[1]
    if choice == 2:
        return payload.encode()[: draw(st.integers(0, len(payload)))]
    doc = json.loads(payload)
    key = draw(st.sampled_from(sorted(doc)))
    if draw(st.booleans()):
        del doc[key]
    else:
        doc[key] = draw(json_values)
    return json.dumps(doc).encode()


@settings(max_examples=500, deadline=None)
@given(payloads())
def test_parse_hotlist_message_raises_only_message_error(payload: bytes) -> None:
    try:
        message = parse_hotlist_message(payload)
    except MessageError:
        return
    assert message.issuer == "4510"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(topics, payloads() | st.sampled_from([p.encode() for _, p in GOOD])), max_size=12))
def test_whatever_is_offered_the_book_never_raises_and_keeps_a_consistent_list(offers: list[tuple[str, bytes]]) -> None:
    book = HotlistBook()
    for topic, payload in offers:
        before = book.version("4510")
        news = book.offer(topic, payload)
        assert news.note and (news.version is None or news.version > before)
        assert not (news.refused and news.version is not None)
        assert book.version("4510") >= before
    if book.version("4510") >= 3:
        assert book.blocking(A) is not None and book.blocking(UID) is not None
    assert book.blocking(D) is None
