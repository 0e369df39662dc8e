"""Terminal taps over in-process cards: bus, metro gates, top-up, M1, hotlist, tearing recovery, bad cards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hotlist_support import delta, snapshot
from support import KEYS, CuttingReader, new_card, new_state, seeded_rng
from terminal_support import FARES, Clock, CuttingChip, m1_card, make_terminal

from cardsim import crypto
from cardsim.crypto import Algorithm
from cardsim.issuer import IssuerHost
from cardsim.m1_issue import KeyScheme
from cardsim.mifare import Frame, M1Card, parse_value_block
from cardsim.purse import Defect, PurseCard
from clearing.verify import tac_problem
from terminals.limits import MAX_FEN
from terminals.messages import TxnRecord, hotlist_delta_topic, parse_record
from terminals.metro import parse_trip
from terminals.reader import CardGone, InProcessReader
from terminals.terminal import TapOutcome, Terminal
from terminals.terminal import TerminalKind as Kind

HOST = IssuerHost(KEYS)


def records(terminal: Terminal) -> list[TxnRecord]:
    return [parse_record(json.loads(raw)) for _, raw in terminal.outbox.unacked(0, 1000)]


def test_bus_purchase_of_another_citys_card_is_recorded_with_a_verifying_tac(tmp_path: Path) -> None:
    term = make_terminal(tmp_path / "t.sqlite", Kind.BUS, city="4560", amount=200)
    card = new_card(Algorithm.DES3, 5000, city="4510")
    first, second = term.tap(InProcessReader(card)), term.tap(InProcessReader(card))
    assert first.ok and second.ok, (first.message, second.message)
    assert first.message.startswith("OK       purchase card 3104451")
    r1, r2 = records(term)
    assert (r1.seq, r2.seq) == (1, 2)
    assert (r1.card.issuer, r1.acquirer, r1.kind, r1.tech, r1.alg) == ("4510", "4560", "purchase", "cpu", "3des")
    assert (r1.card_counter, r2.card_counter) == (0, 1)
    assert (r1.balance_before, r1.balance_after, r2.balance_after) == (5000, 4800, 4600)
    assert (r1.terminal_seq, r2.terminal_seq) == (1, 2)
    assert r1.time == "2026-11-24T08:01:00+08:00"
    assert tac_problem(HOST, r1) is None and tac_problem(HOST, r2) is None
    assert tac_problem(HOST, r1.model_copy(update={"amount": 100, "balance_after": 4900})) == "TAC does not verify"
    assert card.state.balance == 4600


def test_a_wrapped_card_and_an_overdraft_are_refused_before_any_money_moves(tmp_path: Path) -> None:
    term = make_terminal(tmp_path / "t.sqlite", Kind.BUS, amount=200)
    card = new_card(balance=100)
    card.state.defects = frozenset({Defect.OVERDRAFT})  # would accept both and wrap its 4-byte balance
    short = term.tap(InProcessReader(card))
    assert short.status is TapOutcome.REFUSED, short.message
    assert "accepted 200 fen on a balance of 100 fen; not charged" in short.message
    card.state.balance = 2**32 - 1  # what an overdraft probe leaves on such a card: more than a record carries
    wrapped = term.tap(InProcessReader(card))
    assert wrapped.status is TapOutcome.REFUSED, wrapped.message
    assert f"holds {2**32 - 1} fen, past what a transaction record carries ({MAX_FEN})" in wrapped.message
    assert card.state.balance == 2**32 - 1 and card.state.offline_counter == 0 and records(term) == []


def test_psam_sequence_and_record_seq_survive_a_restart(tmp_path: Path) -> None:
    card = new_card()
    make_terminal(tmp_path / "t.sqlite").tap(InProcessReader(card))
    again = make_terminal(tmp_path / "t.sqlite")
    assert again.tap(InProcessReader(card)).ok
    assert [(r.seq, r.terminal_seq) for r in records(again)] == [(1, 1), (2, 2)]


def test_state_file_of_another_terminal_is_refused(tmp_path: Path) -> None:
    make_terminal(tmp_path / "t.sqlite", terminal="456000000001")
    with pytest.raises(Exception, match="belongs to terminal 456000000001"):
        make_terminal(tmp_path / "t.sqlite", terminal="456000000002")


def test_top_up_machine_loads_through_the_issuer_host(tmp_path: Path) -> None:
    term = make_terminal(tmp_path / "t.sqlite", Kind.TOPUP, city="4510", amount=5000)
    card = new_card(Algorithm.SM4, 1000)
    result = term.tap(InProcessReader(card))
    assert result.ok and result.record is not None
    assert (result.record.kind, result.record.amount, result.record.balance_after) == ("load", 5000, 6000)
    assert tac_problem(HOST, result.record) is None
    assert card.state.balance == 6000


def test_metro_entry_then_exit_charges_by_distance_and_logs_the_trip(tmp_path: Path) -> None:
    clock = Clock()
    entry = make_terminal(tmp_path / "in.sqlite", Kind.METRO_ENTRY, "4510", station=("M1", "A00"), clock=clock)
    exit_ = make_terminal(
        tmp_path / "out.sqlite", Kind.METRO_EXIT, "4510", station=("M1", "A05"), terminal="451000000002", clock=clock
    )
    card = new_card(Algorithm.SM4, 5000)
    assert entry.tap(InProcessReader(card)).ok
    trip = parse_trip(card.state.trips[0])
    assert trip is not None and (trip.trip_type, trip.line, trip.station, trip.city) == (3, "M1", "A00", "4510")
    result = exit_.tap(InProcessReader(card))
    assert result.ok and result.record is not None
    # A00 -> A05 is 12.5 km on line M1: the 12..22 km band, 4 yuan.
    assert (result.record.kind, result.record.amount, result.record.station) == ("metro_exit", 400, "A05")
    assert records(entry)[0].amount == 0 and records(entry)[0].kind == "metro_entry"
    assert card.state.balance == 4600 and card.state.offline_counter == 2
    exit_trip = parse_trip(card.state.trips[0])
    assert exit_trip is not None and (exit_trip.trip_type, exit_trip.amount, exit_trip.balance_after) == (4, 400, 4600)
    for record in (*records(entry), result.record):
        assert tac_problem(HOST, record) is None


def test_exit_between_lines_and_without_entry(tmp_path: Path) -> None:
    clock = Clock()
    entry = make_terminal(tmp_path / "in.sqlite", Kind.METRO_ENTRY, "4510", station=("M2", "B02"), clock=clock)
    exit_ = make_terminal(
        tmp_path / "out.sqlite", Kind.METRO_EXIT, "4510", station=("M1", "A01"), terminal="451000000002", clock=clock
    )
    card = new_card()
    entry.tap(InProcessReader(card))
    assert exit_.tap(InProcessReader(card)).record.amount == 300  # type: ignore[union-attr]  # 4.4 + 2.5 km
    assert exit_.tap(InProcessReader(card)).record.amount == 700  # type: ignore[union-attr]  # no entry: max
    entry.tap(InProcessReader(card))
    clock.now += FARES.max_trip
    assert exit_.tap(InProcessReader(card)).record.amount == 700  # type: ignore[union-attr]  # stale entry


def test_a_card_on_another_issuers_list_is_refused_and_blocked_naming_that_list(tmp_path: Path) -> None:
    term = make_terminal(tmp_path / "t.sqlite", city="4560")
    card = new_card(city="4510")
    serial = card.state.public.application_serial.hex()
    for topic, payload in [*snapshot("4510", 6, ["31044510999999999999"]), delta("4510", 6, [serial])]:
        assert not term.offer_hotlist(topic, payload).refused
    result = term.tap(InProcessReader(card))
    assert result.status is TapOutcome.REFUSED and card.state.blocked
    assert result.message == f"REFUSED  card {serial} is hotlisted by 4510 (list version 7): application blocked"
    again = term.tap(InProcessReader(card))
    assert again.status is TapOutcome.REFUSED and "6A81" in again.message
    assert records(term) == [] and card.state.balance == 5000
    # a restarted terminal still enforces the list; a malformed or older message changes nothing
    restarted = make_terminal(tmp_path / "t.sqlite")
    assert restarted.hotlists.versions() == {"4510": 7} and restarted.hotlists.blocking(serial) is not None
    assert restarted.offer_hotlist(hotlist_delta_topic("4510"), b"{not json").refused
    assert restarted.offer_hotlist(*delta("4510", 6, [])).version is None
    assert restarted.hotlists.versions() == {"4510": 7} and restarted.hotlists.blocking(serial) is not None
    other = PurseCard(new_state(city="4510", sequence=2), seeded_rng(2))
    other.power_on()
    assert restarted.tap(InProcessReader(other)).ok, "a card on no list is charged"


@pytest.mark.parametrize("scheme", list(KeyScheme))
def test_m1_bus_purchase_with_record_mac(tmp_path: Path, scheme: KeyScheme) -> None:
    term = make_terminal(tmp_path / "t.sqlite", city="4560", amount=150)
    card = m1_card(scheme, 3000, city="4530")
    first, second = term.tap_m1(card), term.tap_m1(card)
    assert first.ok and second.ok, first.message
    r1, r2 = records(term)
    assert (r1.tech, r1.card.issuer, r1.card.uid, r1.card_counter, r2.card_counter) == (
        "m1",
        "4530",
        card.anticollision()[0].hex().upper(),
        0,
        1,
    )
    assert parse_value_block(card.state.blocks[4]) == (2700, 4)
    assert tac_problem(HOST, r1) is None and tac_problem(HOST, r2) is None
    assert tac_problem(HOST, r1.model_copy(update={"terminal_seq": 9})) == "M1 record MAC does not verify"


def test_m1_hotlisted_and_wrong_kind(tmp_path: Path) -> None:
    card = m1_card()
    uid = card.anticollision()[0].hex().upper()
    term = make_terminal(tmp_path / "t.sqlite")
    term.offer_hotlist(*delta("4530", 0, [uid]))
    refused = term.tap_m1(card)
    assert refused.status is TapOutcome.REFUSED
    assert refused.message == f"REFUSED  M1 card {uid} is hotlisted by 4530 (list version 1)"
    gate = make_terminal(
        tmp_path / "g.sqlite", Kind.METRO_ENTRY, "4510", station=("M1", "A00"), terminal="4510000000AA"
    )
    assert "only bus" in gate.tap_m1(card).message
    assert records(term) == [] == records(gate)


# --- tearing -----------------------------------------------------------------------------------------------


def _settled(term: Terminal, card: PurseCard, expected_records: int, fare: int, start_balance: int) -> None:
    """After the retap: charged exactly once, one record per charge, nothing left pending."""
    recs = records(term)
    assert len(recs) == expected_records
    assert card.state.balance == start_balance - fare
    assert recs[-1].balance_after == card.state.balance
    assert recs[-1].card_counter == card.state.offline_counter - 1
    assert len({r.identity for r in recs}) == len(recs)
    assert term.outbox.counts().pending == 0
    for r in recs:
        assert tac_problem(HOST, r) is None


# INITIALIZE, (UPDATE CAPP,) DEBIT ... : cut before every APDU, and at every EEPROM write of the commit.
CUTS = [(n, None) for n in range(7)] + [(None, budget) for budget in range(6)]


@pytest.mark.parametrize(("before_apdu", "budget"), CUTS)
@pytest.mark.parametrize("restart", [False, True])
def test_bus_purchase_torn_anywhere_is_charged_and_recorded_once(
    tmp_path: Path, before_apdu: int | None, budget: int | None, restart: bool
) -> None:
    term = make_terminal(tmp_path / "t.sqlite", amount=300)
    card = PurseCard(new_card().state, seeded_rng(9))
    first = term.tap(CuttingReader(card, before_apdu, budget))
    assert first.status in (TapOutcome.OK, TapOutcome.TORN, TapOutcome.ERROR), first.message
    if restart:
        term = make_terminal(tmp_path / "t.sqlite", amount=300)
    second = term.tap(InProcessReader(card))
    assert second.ok, second.message
    _settled(term, card, 1 if not first.ok else 2, 300 if not first.ok else 600, 5000)


@pytest.mark.parametrize(("before_apdu", "budget"), [*CUTS, (7, None), (8, None)])
@pytest.mark.parametrize("gate", ["entry", "exit"])
def test_metro_gate_torn_anywhere_is_charged_and_recorded_once(
    tmp_path: Path, before_apdu: int | None, budget: int | None, gate: str
) -> None:
    clock = Clock()
    entry = make_terminal(tmp_path / "in.sqlite", Kind.METRO_ENTRY, "4510", station=("M1", "A00"), clock=clock)
    exit_ = make_terminal(
        tmp_path / "out.sqlite", Kind.METRO_EXIT, "4510", station=("M1", "A02"), terminal="451000000002", clock=clock
    )
    card = PurseCard(new_card().state, seeded_rng(9))
    term = entry if gate == "entry" else exit_
    if gate == "exit":
        assert entry.tap(InProcessReader(card)).ok
    first = term.tap(CuttingReader(card, before_apdu, budget))
    retap = term.tap(InProcessReader(card))
    assert retap.ok, retap.message
    if first.status is TapOutcome.OK:
        return  # the cut came after the payment finished: a second, normal trip followed
    _settled(term, card, 1, 0 if gate == "entry" else 200, 5000)
    trip = parse_trip(card.state.trips[0])
    assert trip is not None and trip.station == ("A00" if gate == "entry" else "A02")
    assert len(card.state.trips) == (1 if gate == "entry" else 2)


@pytest.mark.parametrize("frames", range(0, 48))
def test_m1_purchase_torn_anywhere_is_charged_and_recorded_once(tmp_path: Path, frames: int) -> None:
    term = make_terminal(tmp_path / "t.sqlite", amount=100)
    card = m1_card(KeyScheme.SHARED, 1000)
    first = term.tap_m1(CuttingChip(card, frames))
    second = term.tap_m1(CuttingChip(card, None))
    assert second.ok, (first.message, second.message)
    recs = records(term)
    charged = 1000 - parse_value_block(card.state.blocks[4])[0]  # type: ignore[index]
    assert charged == 100 * len(recs)
    assert len({r.identity for r in recs}) == len(recs) and term.outbox.counts().pending == 0
    assert parse_value_block(card.state.blocks[5]) == parse_value_block(card.state.blocks[4])


# --- cards that answer nonsense ------------------------------------------------------------------------------


class ScriptedCard:
    """A 'card' with a given ATR whose answers are replaced for chosen commands (by INS byte)."""

    def __init__(self, real: PurseCard, atr: bytes | None = None, answers: dict[int, bytes] | None = None) -> None:
        self.real = real
        self.atr = atr
        self.answers = answers or {}

    def power_on(self) -> bytes:
        atr = self.real.power_on()
        return self.atr if self.atr is not None else atr

    def transmit(self, apdu: bytes) -> bytes:
        answer = self.real.transmit(apdu)
        return self.answers.get(apdu[1], answer)


@pytest.mark.parametrize(
    ("atr", "answers", "expected"),
    [
        (b"\x00\x11\x22", {}, "not a valid ATR"),
        (b"", {}, "not a valid ATR"),
        (None, {0xA4: b"\x6f\x01\x90\x00"}, "9F0C"),
        (None, {0xA4: b"\x90"}, "SELECT"),
        (None, {0x50: b"\x6f\x00"}, "6F00"),
        (None, {0x50: b"\x00\x00\x90\x00"}, "answered 2 bytes, expected 15"),
        (None, {0x54: b"\x6f\x00"}, "6F00"),
        (None, {0x54: b"\x01\x02\x90\x00"}, "answered 2 bytes"),
    ],
)
def test_garbage_from_the_card_ends_the_tap_with_a_message_and_no_record(
    tmp_path: Path, atr: bytes | None, answers: dict[int, bytes], expected: str
) -> None:
    term = make_terminal(tmp_path / "t.sqlite")
    card = new_card()
    result = term.tap(InProcessReader(ScriptedCard(card, atr, answers)))  # type: ignore[arg-type]
    assert not result.ok and expected in result.message, result.message
    assert records(term) == []
    # the card itself is fine: a later normal tap settles whatever the garbage left
    assert term.tap(InProcessReader(card)).ok
    assert len(records(term)) == 1 and card.state.balance == 4800


def test_m1_record_mac_key_is_the_one_crypto_module() -> None:
    key_set = KEYS.get("4510", 1)
    assert key_set is not None
    uid = bytes.fromhex("0A0B0C0D")
    mac = crypto.m1_record_key(key_set.purchase, uid).mac(bytes(35))
    assert len(mac) == 4 and mac != crypto.m1_record_key(key_set.purchase, bytes(4)).mac(bytes(35))


@pytest.mark.parametrize(("before_apdu", "budget"), [(n, None) for n in range(4)] + [(None, b) for b in range(6)])
def test_top_up_torn_anywhere_is_credited_and_recorded_once(
    tmp_path: Path, before_apdu: int | None, budget: int | None
) -> None:
    term = make_terminal(tmp_path / "t.sqlite", Kind.TOPUP, city="4510", amount=1000)
    card = PurseCard(new_card(balance=500).state, seeded_rng(9))
    first = term.tap(CuttingReader(card, before_apdu, budget))
    second = term.tap(InProcessReader(card))
    assert second.ok, second.message
    recs = records(term)
    loads = 1 if not first.ok else 2
    assert len(recs) == loads and card.state.balance == 500 + 1000 * loads
    assert [r.card_counter for r in recs] == list(range(loads)) and term.outbox.counts().pending == 0
    for r in recs:
        assert tac_problem(HOST, r) is None


class LosingReader(InProcessReader):
    """Delivers DEBIT to the card, then loses the card before its answer comes back."""

    def transmit(self, apdu: bytes) -> bytes:
        answer = super().transmit(apdu)
        if apdu[:2] == b"\x80\x54":
            raise CardGone("pulled just after the card committed")
        return answer


def test_card_torn_here_and_used_elsewhere_is_set_aside_not_stuck(tmp_path: Path) -> None:
    here = make_terminal(tmp_path / "a.sqlite", terminal="456000000001")
    elsewhere = make_terminal(tmp_path / "b.sqlite", terminal="456000000002")
    card = new_card()
    assert here.tap(LosingReader(card)).status is TapOutcome.TORN and card.state.balance == 4800
    assert elsewhere.tap(InProcessReader(card)).ok  # the card's proof now belongs to this newer purchase
    back = here.tap(InProcessReader(card))
    assert back.ok, back.message  # the rider is not stuck: charged afresh
    assert card.state.balance == 4400 and len(records(here)) == 1
    assert here.outbox.counts().pending == 1, "the unprovable payment stays on file for the operator"
    assert here.tap(InProcessReader(card)).ok and here.outbox.counts().pending == 1


def test_a_journal_entry_written_by_an_earlier_version_is_finished(tmp_path: Path) -> None:
    """The pending table keeps the text older terminals wrote (json.dumps of a flat dict): a state file left by
    one of them with a torn purchase still finishes it, and a new journal entry is written in that same text."""
    term = make_terminal(tmp_path / "t.sqlite", terminal="456000000001")
    card = new_card()
    assert term.tap(LosingReader(card)).status is TapOutcome.TORN
    ((key, written),) = term.outbox._db.execute("SELECT card, intent FROM pending").fetchall()
    fields = json.loads(written)
    assert written == json.dumps(fields) and list(fields)[-3:] == ["key_version", "alg", "txn_type"]
    assert fields["tac"] == "" and fields["card"] == {"issuer": "4510", "serial": key[4:]}
    term.outbox._db.execute("UPDATE pending SET intent = ? WHERE card = ?", (json.dumps(fields, indent=1), key))
    finished = term.tap(InProcessReader(card))
    assert finished.ok and "finished the interrupted payment" in finished.message, finished.message
    (record,) = records(term)
    assert list(json.loads(record.to_json()))[:3] == ["schema", "seq", "kind"]  # the wire order
    assert record.card_counter == fields["card_counter"] and term.outbox.counts().pending == 0


class RefusingAfterCommit:
    """A card that commits DEBIT but answers it with a spec refusal (a lying or glitching card)."""

    def __init__(self, card: PurseCard, sw: bytes) -> None:
        self.card, self.sw = card, sw

    def power_on(self) -> bytes:
        return self.card.power_on()

    def transmit(self, apdu: bytes) -> bytes:
        answer = self.card.transmit(apdu)
        return self.sw if apdu[:2] == b"\x80\x54" else answer  # DEBIT FOR PURCHASE


@pytest.mark.parametrize("sw", ["9302", "6D00", "9401"])
def test_a_refused_debit_is_checked_on_the_card_before_the_journal_is_dropped(tmp_path: Path, sw: str) -> None:
    term = make_terminal(tmp_path / "t.sqlite")
    card = new_card()
    before = card.state.balance
    result = term.tap(InProcessReader(RefusingAfterCommit(card, bytes.fromhex(sw))))  # type: ignore[arg-type]
    assert card.state.balance == before - 200  # the card took the fare whatever it answered
    assert result.status is TapOutcome.OK and result.record is not None, result.message
    assert term.outbox.counts().queued == 1 and term.outbox.counts().pending == 0
    honest = term.tap(InProcessReader(new_card()))  # a card that really refuses nothing still pays once
    assert honest.ok and term.outbox.counts().queued == 2


class TamperedDebit(RefusingAfterCommit):
    """A line that corrupts DEBIT's MAC1 on its way: the card refuses it honestly (93 02), nothing changes."""

    def transmit(self, apdu: bytes) -> bytes:
        if apdu[:2] == b"\x80\x54":
            apdu = apdu[:-2] + bytes([apdu[-2] ^ 0xFF]) + apdu[-1:]
        return self.card.transmit(apdu)


def test_an_honest_debit_refusal_is_confirmed_on_the_card_and_the_journal_dropped(tmp_path: Path) -> None:
    term = make_terminal(tmp_path / "t.sqlite")
    card = new_card()
    result = term.tap(InProcessReader(TamperedDebit(card, b"")))  # type: ignore[arg-type]
    assert result.status is TapOutcome.REFUSED and "9302" in result.message, result.message
    assert card.state.balance == 5000 and term.outbox.counts().pending == 0 and term.outbox.counts().queued == 0


class SwappingChip:
    """Card A answers the first field; from the next power-up on, card B is in the field instead."""

    def __init__(self, first: M1Card, second: M1Card) -> None:
        self.cards, self.powered = (first, second), 0

    @property
    def host_crc(self) -> bool:
        return False

    def _card(self) -> M1Card:
        return self.cards[min(self.powered, 1)]

    def power_on(self) -> None:
        self.powered += 1
        self._card().power_on()

    def anticollision(self) -> tuple[bytes, int, bytes]:
        return self._card().anticollision()

    def transceive(self, frame: Frame) -> Frame | None:
        return self._card().transceive(frame)


def test_an_m1_card_swapped_mid_tap_is_not_charged_nor_let_past_the_hotlist(tmp_path: Path) -> None:
    first, second = m1_card(KeyScheme.SHARED, seed=3), m1_card(KeyScheme.SHARED, seed=4)
    term = make_terminal(tmp_path / "t.sqlite")
    term.offer_hotlist(*delta("4510", 0, [second.anticollision()[0].hex().upper()]))
    result = term.tap_m1(SwappingChip(first, second))  # type: ignore[arg-type]
    assert not result.ok and "left the field" in result.message, result.message
    assert parse_value_block(first.state.blocks[4]) == (3000, 4) == parse_value_block(second.state.blocks[4])
    assert records(term) == [] and term.outbox.counts().pending == 0
