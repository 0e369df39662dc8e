"""Hypothesis fuzzing of every parser and APDU handler: never raises, answers only the spec's status words,
and moves no money without a correct transaction."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import new_card, new_psam

from cardsim.apdu import SW, ApduError, parse_command
from cardsim.crypto import Algorithm
from cardsim.purse import AID
from cardsim.vpcd import FrameDecoder, frame

SPEC_SWS = {int(s) for s in SW}
KNOWN = [
    (0x00, 0xA4),
    (0x00, 0x84),
    (0x00, 0xB0),
    (0x00, 0xB2),
    (0x00, 0xD6),
    (0x04, 0xD6),
    (0x00, 0xDC),
    (0x04, 0xDC),
    (0x80, 0x5C),
    (0x80, 0x50),
    (0x80, 0x54),
    (0x80, 0x52),
    (0x80, 0xDC),
    (0x80, 0x5A),
    (0x84, 0x1E),
    (0x80, 0x70),
    (0x80, 0x72),
    (0x80, 0xFA),
    (0x80, 0xFB),
    (0x80, 0xFC),
]
SELECT = bytes.fromhex("00A4040008") + AID


@st.composite
def apdus(draw: st.DrawFn) -> bytes:
    """Random bytes, or commands built around the real headers with wrong P1/P2, Lc, Le and data."""
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return draw(st.binary(max_size=300))
    if choice == 1:
        return SELECT
    cla, ins = draw(st.sampled_from(KNOWN)) if choice < 4 else (draw(st.integers(0, 255)), draw(st.integers(0, 255)))
    p1 = draw(st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x95, 0x96, 0x97, 0x98, draw(st.integers(0, 255))]))
    p2 = draw(st.sampled_from([0x00, 0x02, 0x06, 0x09, 0xB4, 0xC4, 0xF0, draw(st.integers(0, 255))]))
    data = draw(st.binary(max_size=60))
    header = bytes([cla, ins, p1, p2])
    tail = draw(st.sampled_from(["case1", "case2", "case3", "case4", "badlc"]))
    if tail == "case1":
        return header
    if tail == "case2":
        return header + bytes([draw(st.integers(0, 255))])
    if not data:
        data = b"\x01"
    body = header + bytes([len(data)]) + data
    if tail == "case3":
        return body
    if tail == "case4":
        return body + bytes([draw(st.integers(0, 255))])
    return header + bytes([draw(st.integers(0, 255))]) + data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(alg=st.sampled_from(list(Algorithm)), commands=st.lists(apdus(), max_size=25), select_first=st.booleans())
def test_card_never_raises_and_never_moves_money(alg: Algorithm, commands: list[bytes], select_first: bool) -> None:
    card = new_card(alg)
    money = (card.state.balance, card.state.offline_counter, card.state.online_counter, list(card.state.log))
    files = (card.state.public_data, card.state.holder_data, card.state.interop_data)
    for apdu in ([SELECT] if select_first else []) + commands:
        r = card.transmit(apdu)
        assert len(r) >= 2
        assert int.from_bytes(r[-2:]) in SPEC_SWS, f"{apdu.hex()} -> {r.hex()}"
    assert (card.state.balance, card.state.offline_counter, card.state.online_counter, card.state.log) == money
    assert (card.state.public_data, card.state.holder_data, card.state.interop_data) == files  # no MAC, no write
    assert card.state.journal is None


@settings(max_examples=300, deadline=None)
@given(commands=st.lists(apdus(), max_size=20))
def test_psam_never_raises(commands: list[bytes]) -> None:
    psam = new_psam()
    for apdu in commands:
        r = psam.transmit(apdu)
        assert int.from_bytes(r[-2:]) in SPEC_SWS


@given(st.binary(max_size=300))
def test_parse_command_accepts_or_answers_6700(raw: bytes) -> None:
    try:
        cmd = parse_command(raw)
    except ApduError as err:
        assert err.sw == SW.WRONG_LENGTH
    else:
        assert cmd.to_bytes() == raw


@given(st.lists(st.binary(max_size=400), max_size=10), st.lists(st.integers(1, 50), min_size=1, max_size=10))
def test_vpcd_frames_survive_any_split(payloads: list[bytes], chunk_sizes: list[int]) -> None:
    stream = b"".join(frame(p) for p in payloads)
    decoder, out, i, k = FrameDecoder(), [], 0, 0
    while i < len(stream):
        n = chunk_sizes[k % len(chunk_sizes)]
        out += decoder.feed(stream[i : i + n])
        i, k = i + n, k + 1
    assert out == payloads
