"""A generated stream of hostile MQTT messages for a city's clearing, with genuine records interleaved.

Every message knows what the clearing must make of it: ``rows`` quarantine rows (a batch of records is
refused record by record; anything else is one row), or none when it is a replay of a genuine record (a
duplicate: acked again, never stored twice) or on a topic the clearing does not subscribe to. The shapes: bytes
that are not UTF-8 or not JSON, every kind of JSON value, deep nesting, huge numbers, long strings, lone
surrogates, NaN, records with wrong types or out-of-range fields, forged TACs, genuine records on another
terminal's topic, odd topic segments, batches, oversize payloads and binary with NUL and newlines (sent as
files), the interop topics, and other cities' topics.
"""

from __future__ import annotations

import json
import random
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from clearing_support import DAY_START, HOST

from terminals.messages import MAX_PAYLOAD, TxnRecord, batch_payload
from yikatong.synthetic import SyntheticTerminal, synthetic_cards

FAR = 10**12  # seqs the genuine terminal never reaches: what forged records on its topic carry


@dataclass
class Message:
    topic: str
    payload: bytes
    rows: int  # quarantine rows it must end as (0: a duplicate, or a topic the clearing ignores)
    genuine: bool = False


@dataclass
class Stream:
    """The messages in publishing order."""

    messages: list[Message] = field(default_factory=list)

    def rows_by_topic(self) -> Counter[str]:
        rows: Counter[str] = Counter()
        for m in self.messages:
            if m.rows:
                rows[m.topic] += m.rows
        return rows

    @property
    def genuine(self) -> list[Message]:
        return [m for m in self.messages if m.genuine]


def _json_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, 2**32, 2**63, -(2**63), 10**19, rng.randrange(-(10**6), 10**6)])
    if kind == 3:
        return rng.choice([0.5, -1e300, 1e-300, 3.14])
    if kind == 4:
        alphabet = 'ab09AF济南-_ \t"\\/é\u2028'
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
    if kind == 5:
        return rng.choice(["4560", "yikatong.txn/1", "yikatong.batch/1", "purchase", "cpu", "m1", ""])
    if kind == 6:
        return [_json_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    keys = ["schema", "seq", "kind", "card", "records", "amount", "x", "济南", ""]
    return {rng.choice(keys): _json_value(rng, depth + 1) for _ in range(rng.randrange(0, 5))}


def garbage_line(rng: random.Random, longest: int = 80) -> bytes:
    """Bytes without newline, CR or NUL (one line for ``mosquitto_pub -l``) that are not JSON."""
    allowed = [b for b in range(1, 256) if b not in (0x0A, 0x0D)]
    return b"\xff" + bytes(rng.choice(allowed) for _ in range(rng.randrange(1, longest)))


# values that make the whole message break a limit (so a batch holding one is refused as one message)
_MESSAGE_LEVEL = {"kind": ["\udc00"], "card": [{"issuer": "4560", "serial": "1" * 300}], "psam": ["P" * 257]}
_MESSAGE_LEVEL |= {"seq": [10**30], "amount": [1e400], "line": ["\ud800", "L" * 300, {"deep": [[[[[[[[[1]]]]]]]]]}]}


def _mutations(rng: random.Random, record_level: bool = False, keep_seq: bool = False) -> dict[str, Any]:
    """One or two fields of a record made wrong; ``record_level``: only ways that fail the record's own checks;
    ``keep_seq``: not the seq (the caller sets it, and a genuine record with only its seq changed is valid)."""
    field_values: dict[str, list[Any]] = {
        "seq": [0, -1, 2**63, "7", 1.5, None, [], 10**30],
        "amount": [-1, 2**31, 2**32, "200", 1e400, True],
        "card_counter": [2**16, -5, "1"],
        "terminal_seq": [2**32, -1],
        "kind": ["refund", "", 7, "\udc00"],
        "tech": ["nfc", None],
        "card": [{}, {"issuer": "4560"}, {"issuer": "4560", "serial": "1" * 300}, {"issuer": 4560, "uid": "ABCD"}, "x"],
        "time": ["yesterday", "2026-11-24T08:15:02", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-12:00"],
        "tac": ["", "ZZZZZZZZ", "\x00" * 8, 12345678],
        "psam": ["P" * 257, ""],
        "line": ["\ud800", "L" * 300, {"deep": [[[[[[[[[1]]]]]]]]]}],
        "extra_field": [1],
        "schema": ["yikatong.txn/2", None],
    }
    if keep_seq:
        del field_values["seq"]
    if record_level:
        kept = {
            name: [v for v in values if v not in _MESSAGE_LEVEL.get(name, [])] for name, values in field_values.items()
        }
        field_values = {name: values for name, values in kept.items() if values}
    chosen = rng.sample(sorted(field_values), rng.randrange(1, 3))
    return {name: rng.choice(field_values[name]) for name in chosen}


def _dumps(doc: Any) -> bytes:
    """JSON with non-ASCII escaped as \\uXXXX (so lone surrogates, which UTF-8 cannot carry, reach the clearing)."""
    return json.dumps(doc).encode()


def hostile_stream(city: str, terminal: str, genuine: list[TxnRecord], junk: int, seed: int = 1) -> Stream:
    """``genuine`` records of ``terminal`` in order, each followed by its share of ``junk`` hostile messages."""
    rng = random.Random(seed)
    base = json.loads(genuine[0].to_json())
    own = f"yikatong/{city}/txn/{terminal}"
    # made-up terminals of this run only (not seeded): runs on a shared broker must not answer each other
    made_up = [f"yikatong/{city}/txn/{city}{secrets.token_hex(4).upper()}" for _ in range(3)]
    odd = [
        f"yikatong/{city}/txn/{name}" for name in ("x", "not-a-terminal-at-all-" + "z" * 40, "济南", "4560C0C0C0C0C0")
    ]
    forger = SyntheticTerminal(HOST, city, terminal, DAY_START)
    forger_card = synthetic_cards(1, [city], seed + 99)[0]
    sent: list[Message] = []
    stream = Stream()

    def junk_message() -> Message:
        kind = rng.randrange(14)
        topic = rng.choice([own, *made_up, *odd])
        far = FAR + rng.randrange(10**6)
        if kind == 0:
            return Message(topic, garbage_line(rng), 1)
        if kind == 1:
            return Message(topic, _dumps(_json_value(rng)), 1)
        if kind == 2:
            depth = rng.choice([9, 50, 5000])
            return Message(topic, b"[" * depth + b"]" * depth, 1)
        if kind == 3:
            return Message(topic, b'{"schema":"yikatong.txn/1","seq":' + b"9" * rng.randrange(21, 6000) + b"}", 1)
        if kind == 4:
            return Message(topic, b'{"schema":"yikatong.txn/1","seq":NaN,"amount":-Infinity}', 1)
        if kind in (5, 6, 7):  # a record with one or two fields wrong (its seq too, at times)
            seq = far if topic == own else rng.choice([1, 2, far])
            changes = {"seq": seq, **_mutations(rng)} if kind == 7 else {**_mutations(rng, keep_seq=True), "seq": seq}
            return Message(topic, _dumps({**base, **changes}), 1)
        if kind == 8:  # a forged TAC
            record = forger.purchase(forger_card, 100 + rng.randrange(100))
            bad = "00000000" if record.tac != "00000000" else "11111111"
            seq = far if topic == own else rng.randrange(1, 50)
            forged = record.model_copy(update={"seq": seq, "tac": bad, "terminal": topic.rsplit("/", 1)[1]})
            return Message(topic, forged.to_json().encode(), 1)
        if kind == 9 and sent:  # a genuine record replayed: a duplicate
            return Message(own, rng.choice(sent).payload, 0)
        if kind == 10 and sent:  # a genuine record from a foreign sender
            return Message(rng.choice(made_up), rng.choice(sent).payload, 1)
        if kind == 11:  # a batch: each record refused on its own
            docs = [
                {**base, **_mutations(rng, record_level=True, keep_seq=True), "seq": FAR + rng.randrange(10**6)}
                for _ in range(rng.randrange(1, 5))
            ]
            return Message(topic, batch_payload([json.dumps(d) for d in docs]).encode(), len(docs))
        if kind == 12:  # the interop topics: junk forwarded, or junk as an issuer's answer
            return Message(f"yikatong/interop/{city}/{rng.choice(['txn', 'ack'])}", _dumps(_json_value(rng)), 1)
        other = rng.choice(["4510", "4530"])  # another city's topic: not this clearing's business
        return Message(f"yikatong/{other}/txn/{other}00000001", garbage_line(rng), 0)

    share = max(1, junk // max(1, len(genuine)))
    for record in genuine:
        for _ in range(share):
            stream.messages.append(junk_message())
        message = Message(own, record.to_json().encode(), 0, genuine=True)
        stream.messages.append(message)
        sent.append(message)
    return stream


def file_messages(city: str, terminal: str) -> list[Message]:
    """Payloads only a file can carry: over 256 KiB, and binary with NUL and newlines."""
    own = f"yikatong/{city}/txn/{terminal}"
    huge = b'{"schema":"yikatong.batch/1","records":["' + b"x" * (MAX_PAYLOAD + 1000) + b'"]}'
    return [
        Message(own, huge, 1),
        Message(own, b"\x00\n\r\x00{" * 1000, 1),
        Message(f"yikatong/{city}/txn/x", b'{"schema":"yikatong.txn/1",\n"seq":\x00}', 1),
    ]
