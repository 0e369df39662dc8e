"""Hypothesis fuzzing of what a terminal reads from outside: MQTT payloads (records, batches, acks, hotlists)
and card answers. Parsers raise only MessageError; a tap never raises and records nothing a card did not do."""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import json_values
from support import new_card
from terminal_support import make_terminal

from terminals.messages import MessageError, parse_ack, parse_hotlist_message, parse_record, parse_uplink
from terminals.reader import InProcessReader
from terminals.terminal import TapOutcome

GOOD = {
    "schema": "yikatong.txn/1",
    "seq": 1,
    "kind": "purchase",
    "tech": "cpu",
    "card": {"issuer": "4510", "serial": "31044510000000000001"},
    "card_counter": 0,
    "amount": 200,
    "balance_before": 5000,
    "balance_after": 4800,
    "terminal": "001122334455",
    "terminal_seq": 1,
    "psam": "0102",
    "acquirer": "4560",
    "time": "2026-11-24T08:15:02+08:00",
    "tac": "B3A0D49C",
    "key_version": 1,
    "alg": "3des",
}


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """Random bytes, random JSON, or a good record with one field replaced or removed."""
    choice = draw(st.integers(0, 2))
    if choice == 0:
        return draw(st.binary(max_size=400))
    if choice == 1:
        return json.dumps(draw(json_values)).encode()
    doc = dict(GOOD)
    key = draw(st.sampled_from(sorted(GOOD)))
    if draw(st.booleans()):
        del doc[key]
    else:
        doc[key] = draw(json_values)
    return json.dumps(doc).encode()


@settings(max_examples=400, deadline=None)
@given(payloads())
def test_message_parsers_raise_only_message_error(payload: bytes) -> None:
    for parse in (parse_uplink, parse_ack, parse_hotlist_message):
        with contextlib.suppress(MessageError):
            parse(payload)
    try:
        for doc in parse_uplink(payload):
            record = parse_record(doc)
            assert record.balance_after == record.balance_before + (
                record.amount if record.kind == "load" else -record.amount
            )
    except MessageError:
        pass


class RandomCard:
    """A card that answers each APDU with the real card's answer or with drawn bytes."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.real = new_card()

    def power_on(self) -> bytes:
        return self.data.draw(st.sampled_from([self.real.power_on(), b"", b"\x3b\x00", b"\xff" * 5]))

    def transmit(self, apdu: bytes) -> bytes:
        answer = self.real.transmit(apdu)
        if self.data.draw(st.integers(0, 3)) == 0:
            return self.data.draw(st.binary(max_size=40) | st.sampled_from([b"\x6f\x00", b"\x90\x00", answer[:-1]]))
        return answer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_a_tap_never_raises_whatever_the_card_answers(tmp_path: Path, data: st.DataObject) -> None:
    state = tmp_path / f"{uuid.uuid4().hex}.sqlite"  # a fresh terminal per example
    term = make_terminal(state)
    card = RandomCard(data)
    result = term.tap(InProcessReader(card))  # type: ignore[arg-type]
    assert result.status in list(TapOutcome) and result.message
    queued = term.outbox.counts().queued
    assert queued == (1 if result.record is not None else 0)
    assert result.record is None or result.status is TapOutcome.OK
    # whatever happened, an honest retap settles it: charged once per record, nothing pending
    settle = term.tap(InProcessReader(card.real))
    assert settle.ok, settle.message
    charged = 5000 - card.real.state.balance
    assert charged == 200 * term.outbox.counts().queued and term.outbox.counts().pending == 0
