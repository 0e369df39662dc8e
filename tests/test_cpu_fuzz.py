"""The robustness stage (audit/cpu_fuzz.py): a bounded, seeded APDU fuzz that a robust card answers with status
words and no change, that finds the planted FUZZ_CORRUPTS flaw by name, and that never spends money or counts a
MAC failure on any card. (Any bytes to a clean card: tests/test_fuzz.py; here, cards with planted flaws.)"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import KEYS, SLOT_01, TERMINAL, WHEN, ServedCard, new_card, new_psam, new_state, readers, seeded_rng

from audit.cpu_fuzz import (
    DEFAULT_BUDGET,
    HEADER_SIZE,
    fuzz_cases,
    is_status_word,
    robustness_probe,
    snapshot,
    watch,
)
from audit.findings import CHIP_RULES, Severity
from cardsim.apdu import SW
from cardsim.crypto import Algorithm
from cardsim.image import load_purse
from cardsim.issuer import IssuerHost
from cardsim.purse import AID, Defect, PurseCard
from terminals.flows import load, purchase
from terminals.pcsc import PcscReader, list_readers
from terminals.reader import CardGone, InProcessReader

SPEC_SWS = {int(s) for s in SW}


class RecordingReader(InProcessReader):
    """An in-process reader that keeps every (C-APDU, R-APDU) exchanged."""

    def __init__(self, card: PurseCard) -> None:
        super().__init__(card)
        self.exchanges: list[tuple[bytes, bytes]] = []

    def transmit(self, apdu: bytes) -> bytes:
        answer = super().transmit(apdu)
        self.exchanges.append((apdu, answer))
        return answer


def used_card(alg: Algorithm = Algorithm.SM4, defects: frozenset[Defect] = frozenset()) -> PurseCard:
    """A card with a load and a purchase behind it (log records, a transaction proof, both counters above 0)."""
    card, psam = new_card(alg), new_psam()
    r_card, r_sam = readers(card, psam)
    load(r_card, IssuerHost(KEYS), TERMINAL, 1000, WHEN)
    purchase(r_card, r_sam, TERMINAL, 200, WHEN)
    card.state.defects = defects
    return card


@pytest.mark.parametrize("alg", list(Algorithm))
def test_clean_card_answers_every_command_with_a_status_word_and_keeps_its_state(alg: Algorithm) -> None:
    card = used_card(alg)
    state = copy.deepcopy(card.state)
    reader = RecordingReader(card)
    result = robustness_probe(reader)
    assert (result.sent, result.evidence) == (DEFAULT_BUDGET, [])
    fuzz_apdus = {case.apdu for case in fuzz_cases()}
    answered = [answer for apdu, answer in reader.exchanges if apdu in fuzz_apdus]
    assert len(answered) >= DEFAULT_BUDGET
    assert all(is_status_word(a) and int.from_bytes(a[-2:]) in SPEC_SWS for a in answered)
    assert card.state == state  # nothing moved: no money, no counter, no MAC failure, not locked


def test_fuzz_corrupts_card_is_found_naming_the_command_and_what_changed() -> None:
    card = used_card(defects=frozenset({Defect.FUZZ_CORRUPTS}))
    before = copy.deepcopy(card.state)
    result = robustness_probe(InProcessReader(card))
    debits = [line for line in result.evidence if line.startswith("> 8054")]
    for line in debits:  # each: a DEBIT with a wrong data length, its 6700, the counter it moved
        assert "DEBIT FOR PURCHASE" in line and "< 6700: offline counter: " in line
    assert debits[0].endswith("(DEBIT FOR PURCHASE with Lc one long)  < 6700: offline counter: 1 -> 2")
    # and what that breaks: the terminal can no longer ask for the proof of the card's last purchase
    [lost] = [line for line in result.evidence if line not in debits]
    assert lost.startswith(f"after {DEFAULT_BUDGET} fuzz commands: GET TRANSACTION PROVE 06 of the last purchase: ")
    assert lost.endswith("9000 -> 6A83")
    # Only the counter moved, by one per line of evidence: the audit pins the flaw down exactly.
    assert card.state.offline_counter == before.offline_counter + len(debits)
    assert dataclasses.replace(card.state, offline_counter=before.offline_counter) == before


@pytest.mark.parametrize("defect", [d for d in Defect if d is not Defect.FUZZ_CORRUPTS], ids=lambda d: d.value)
def test_other_flaws_give_no_evidence_and_the_fuzz_never_spends_or_counts_a_mac_failure(defect: Defect) -> None:
    card = used_card(defects=frozenset({defect}))
    state = copy.deepcopy(card.state)
    result = robustness_probe(InProcessReader(card))
    assert result.evidence == []
    assert card.state == state


def test_a_change_the_per_command_reads_miss_is_reported_over_the_whole_run() -> None:
    card = used_card()
    trigger = next(case for case in fuzz_cases() if case.label == "UPDATE CAPP DATA CACHE with 255 data bytes")

    class Corrupting(InProcessReader):
        def transmit(self, apdu: bytes) -> bytes:
            if apdu == trigger.apdu:  # a flaw that rewrites the holder file, which only the full reads cover
                card.state.holder_data = bytes(len(card.state.holder_data))
            return super().transmit(apdu)

    result = robustness_probe(Corrupting(card))
    [line] = result.evidence
    assert line.startswith(f"after {DEFAULT_BUDGET} fuzz commands: READ BINARY SFI 16: ")
    assert line.endswith(" -> " + bytes(len(card.state.holder_data)).hex().upper() + "9000")


def test_cases_are_bounded_seeded_and_cover_each_kind_of_malformed_command() -> None:
    assert [len(fuzz_cases(n)) for n in (0, 7, 500)] == [0, 7, 500]
    assert fuzz_cases(300) == fuzz_cases(300) and fuzz_cases(300, seed=1) != fuzz_cases(300, seed=2)
    assert fuzz_cases(50) == fuzz_cases(300)[:50]  # the structured cases come first
    labels = " | ".join(case.label for case in fuzz_cases())
    for kind in ["Lc one short", "Lc one long", "but 14 data bytes", "255 data bytes", "with Le", "P1 FF",
                 "P2 FF", "extended length", "DEBIT FOR PURCHASE out of order", "READ RECORD 0", "unknown INS 80",
                 "unknown CLA", "random"]:  # fmt: skip
        assert kind in labels


def test_the_file_writes_the_card_knows_are_never_sent_as_unknown_ins() -> None:
    writes = {(0x00, 0xD6), (0x00, 0xDC), (0x04, 0xD6), (0x04, 0xDC)}  # plain or MAC'd UPDATE BINARY / RECORD
    for seed in range(300):  # each seed draws 3 unknown INS per class: a write among them would be found here
        unknown = [case.apdu for case in fuzz_cases(seed=seed) if case.label.startswith("unknown INS")]
        assert len(unknown) == 12 and not {(apdu[0], apdu[1]) for apdu in unknown} & writes, seed


def test_state_reads_leave_the_purse_selected_with_no_session() -> None:
    card = used_card()
    reader = InProcessReader(card)
    state = snapshot(reader)
    assert state["balance"] == "5800" and state["offline counter"] == "1" and state["online counter"] == "1"
    assert state["GET TRANSACTION PROVE 06 of the last purchase"].endswith("9000")
    assert watch(reader) == {k: state[k] for k in watch(reader)}
    debit_without_initialize = bytes.fromhex("805401000F") + bytes(15) + b"\x08"
    assert reader.transmit(debit_without_initialize)[-2:] == b"\x69\x85"  # no session: refused before any MAC


def test_silence_and_answers_without_a_status_word_are_evidence() -> None:
    card = new_card()
    cases = fuzz_cases()
    mute, garbled = cases[0].apdu, cases[1].apdu

    class Flaky(InProcessReader):
        def transmit(self, apdu: bytes) -> bytes:
            if apdu == mute:
                raise CardGone("silent")
            return b"\x60\x00" if apdu == garbled else super().transmit(apdu)

    result = robustness_probe(Flaky(card))
    assert result.evidence == [
        f"> {mute.hex().upper()} ({cases[0].label})  < no answer: the card went silent",
        f"> {garbled.hex().upper()} ({cases[1].label})  < 6000: no ISO status word",
    ]
    assert all(len(case.apdu) >= HEADER_SIZE for case in cases)  # no header-less bytes: vpcd would hang on one


def test_robustness_is_a_high_chip_finding() -> None:
    assert CHIP_RULES["CPU-ROBUSTNESS"].severity is Severity.HIGH


ANSWERS = st.lists(st.one_of(st.none(), st.binary(max_size=24)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(answers=ANSWERS)
def test_any_answers_from_a_card_never_break_the_probe(answers: list[bytes | None]) -> None:
    """Whatever a card answers (or not), the probe ends, and each fuzz answer without a status word is evidence."""
    budget = 20
    fuzz_apdus = {case.apdu for case in fuzz_cases(budget)}
    cycle = itertools.cycle(answers)
    bad = 0

    class Arbitrary:
        name = "arbitrary"

        def connect(self) -> bytes:
            return b"\x3b\x00"

        def transmit(self, apdu: bytes) -> bytes:
            nonlocal bad
            answer = next(cycle)
            if apdu not in fuzz_apdus:
                return answer or b""  # the state reads get bytes; silence only answers fuzz commands
            if answer is None:
                bad += 1
                raise CardGone("silent")
            bad += not is_status_word(answer)
            return answer

        def disconnect(self) -> None:
            """Nothing to release."""

    result = robustness_probe(Arbitrary(), budget=budget)
    flagged = [line for line in result.evidence if "no ISO status word" in line or "went silent" in line]
    assert result.sent == budget and len(flagged) == bad


HEADERS = st.sampled_from(
    [
        bytes.fromhex(h)
        for h in ("80540100", "80520000", "80500102", "00B20104", "80DC00F0", "00D69600", "04D69500", "00DC01B4")
    ]
)
RAW_APDUS = st.one_of(st.binary(max_size=64), st.builds(bytes.__add__, HEADERS, st.binary(max_size=40)))


@settings(max_examples=200, deadline=None)
@given(
    defects=st.frozensets(st.sampled_from(list(Defect))),
    apdus=st.lists(RAW_APDUS, max_size=20),
)
def test_flawed_cards_answer_any_bytes_with_a_spec_status_word(defects: frozenset[Defect], apdus: list[bytes]) -> None:
    state = new_state()
    state.defects = defects
    card = PurseCard(state, seeded_rng())
    card.power_on()
    card.transmit(bytes([0x00, 0xA4, 0x04, 0x00, len(AID)]) + AID)
    for apdu in apdus:
        answer = card.transmit(apdu)
        assert is_status_word(answer) and int.from_bytes(answer[-2:]) in SPEC_SWS


@pytest.mark.pcsc
def test_the_fuzz_through_pcscd_and_vpcd_finds_the_flaw_and_every_answer_is_a_status_word(tmp_path: Path) -> None:
    name, port = SLOT_01
    assert name in list_readers(), "run scripts/services.sh to start pcscd with vpcd"
    image = tmp_path / "card.json"
    issue = ["card", "issue", "--city", "4510", "--alg", "sm4", "--balance", "5000", "--out"]
    subprocess.run([sys.executable, "-m", "yikatong.cli", *issue, str(image)], check=True, capture_output=True)
    image.write_text(json.dumps(json.loads(image.read_text()) | {"defects": [Defect.FUZZ_CORRUPTS.value]}))
    budget = 70  # every malformed form of SELECT .. DEBIT FOR PURCHASE (the reads after each make ~500 APDUs)
    with ServedCard(image, "--port", port):
        reader = PcscReader(name)
        reader.wait_for_card(timeout=20)
        result = robustness_probe(reader, budget=budget)
        reader.disconnect()
    assert result.sent == budget and result.evidence
    assert all(line.startswith("> 8054") and "< 6700: offline counter: " in line for line in result.evidence)
    assert load_purse(image).offline_counter == len(result.evidence)  # what the served card saved
