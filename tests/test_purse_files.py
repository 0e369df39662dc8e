"""The CPU card's public files (SFI 15, 16, 17): UPDATE BINARY with secure messaging only (`04 D6`, a MAC with a
session key from the maintenance key and a GET CHALLENGE), plain `00 D6` refused unless Defect.PLAIN_WRITE is
planted, UPDATE RECORD refused, and a write torn at any point leaves the old file or the new one."""

from __future__ import annotations

import copy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import KEYS, files_of, new_card, sw

from cardsim import commands, crypto
from cardsim.commands import CLA_ISO_SM
from cardsim.crypto import Algorithm
from cardsim.eeprom import CardTorn
from cardsim.image import CardImageError, purse_from_json, purse_to_json
from cardsim.issuer import IssuerHost
from cardsim.purse import (
    AID,
    BINARY_FILES,
    MAC_FAILURE_LIMIT,
    SFI_HOLDER,
    SFI_INTEROP,
    SFI_PUBLIC,
    Defect,
    PurseCard,
)

SELECT = commands.select(AID)
EXPIRY = 24  # offset of the expiry date in SFI 15 (spec card.md)


def selected(alg: Algorithm = Algorithm.SM4, defects: frozenset[Defect] = frozenset()) -> PurseCard:
    card = new_card(alg)
    card.state.defects = defects
    assert sw(card.transmit(SELECT)) == 0x9000
    return card


def sm_header(sfi: int, offset: int) -> bytes:
    return bytes([CLA_ISO_SM, 0xD6, 0x80 | sfi, offset])


def sm_mac(card: PurseCard, challenge: bytes, covered: bytes) -> bytes:
    """The MAC the issuer computes over ``covered`` from its master maintenance key and the card's challenge."""
    key = IssuerHost(KEYS).card_key(card.state.public.card_serial, 1, card.state.algorithm, "maintenance")
    return crypto.session_key(key, crypto.block_key_input(challenge)).mac(covered)


def secure_apdu(card: PurseCard, challenge: bytes, sfi: int, offset: int, data: bytes, spoil: bool = False) -> bytes:
    """UPDATE BINARY with the issuer's secure-messaging MAC of this very command."""
    mac = sm_mac(card, challenge, crypto.secure_message_data(sm_header(sfi, offset), data))
    if spoil:
        mac = bytes(b ^ 0xFF for b in mac)
    return commands.update_binary(sfi, offset, data + mac, cla=CLA_ISO_SM)


def secure_write(card: PurseCard, sfi: int, offset: int, data: bytes, spoil: bool = False) -> bytes:
    """GET CHALLENGE, then the secure-messaging UPDATE BINARY; the card's answer."""
    challenge = card.transmit(commands.get_challenge(4))[:4]
    return card.transmit(secure_apdu(card, challenge, sfi, offset, data, spoil))


@pytest.mark.parametrize("alg", list(Algorithm))
@pytest.mark.parametrize("sfi", list(BINARY_FILES))
def test_a_secure_messaging_write_changes_the_file_and_reads_back(alg: Algorithm, sfi: int) -> None:
    card = selected(alg)
    old = card.transmit(commands.read_binary(sfi))[:-2]
    assert sw(secure_write(card, sfi, 1, b"\x02\x03")) == 0x9000
    new = old[:1] + b"\x02\x03" + old[3:]
    assert card.transmit(commands.read_binary(sfi)) == new + b"\x90\x00"
    restored = purse_from_json(purse_to_json(card.state))  # and the image keeps it
    assert getattr(restored, BINARY_FILES[sfi]) == new


def test_the_expiry_date_is_rewritten_and_a_good_mac_clears_the_failure_count() -> None:
    card = selected()
    assert sw(secure_write(card, SFI_PUBLIC, EXPIRY, bytes(4), spoil=True)) == 0x9302
    assert card.state.mac_failures == 1
    assert sw(secure_write(card, SFI_PUBLIC, EXPIRY, bytes.fromhex("20461231"))) == 0x9000
    assert card.state.public_data[EXPIRY:28] == bytes.fromhex("20461231") and card.state.mac_failures == 0
    # the FCI carries SFI 15 too
    assert bytes.fromhex("20461231") in card.transmit(SELECT)


@pytest.mark.parametrize("sfi", list(BINARY_FILES))
def test_a_plain_write_is_refused_unless_the_defect_is_planted(sfi: int) -> None:
    card = selected()
    before = copy.deepcopy(card.state)
    assert sw(card.transmit(commands.update_binary(sfi, 0, b"\x02"))) == 0x6982
    assert card.state == before
    flawed = selected(defects=frozenset({Defect.PLAIN_WRITE}))
    assert sw(flawed.transmit(commands.update_binary(sfi, 0, b"\x02"))) == 0x9000
    assert getattr(flawed.state, BINARY_FILES[sfi])[0] == 0x02


def test_wrong_macs_count_toward_the_lockout_and_change_nothing() -> None:
    card = selected()
    before = files_of(card.state)
    answers = [sw(secure_write(card, SFI_HOLDER, 0, b"\x02", spoil=True)) for _ in range(MAC_FAILURE_LIMIT)]
    assert answers == [0x9302] * (MAC_FAILURE_LIMIT - 1) + [0x9303]
    assert card.state.locked and files_of(card.state) == before


def test_secure_messaging_needs_the_challenge_just_before() -> None:
    card = selected()
    data = b"\x02" + bytes(4)
    assert sw(card.transmit(commands.update_binary(SFI_HOLDER, 0, data, cla=CLA_ISO_SM))) == 0x6985
    challenge = card.transmit(commands.get_challenge(4))[:4]
    card.transmit(commands.get_balance())  # the challenge served that command
    assert sw(card.transmit(secure_apdu(card, challenge, SFI_HOLDER, 0, b"\x02"))) == 0x6985
    assert card.state.mac_failures == 0 and card.state.holder_data[0] != 0x02


SM_DATA = b"\x02\x03"
SIGNED = crypto.secure_message_data(sm_header(SFI_HOLDER, 0), SM_DATA)  # what the issuer signed: SFI 16, offset 0


@pytest.mark.parametrize(
    ("covered", "sfi", "offset", "data"),
    [
        (SIGNED, SFI_INTEROP, 0, SM_DATA),  # sent to SFI 17
        (SIGNED, SFI_HOLDER, 1, SM_DATA),  # to offset 1
        (SIGNED, SFI_HOLDER, 0, SM_DATA[:1]),  # a shorter Lc: the command cut short
        (sm_header(SFI_HOLDER, 0) + bytes([len(SM_DATA) + 3]) + SM_DATA, SFI_HOLDER, 0, SM_DATA),  # MAC of Lc - 1
    ],
    ids=["sfi-17", "offset-1", "shorter-lc-sent", "shorter-lc-signed"],
)
def test_the_secure_messaging_mac_covers_the_header(covered: bytes, sfi: int, offset: int, data: bytes) -> None:
    card = selected()
    before = files_of(card.state)
    challenge = card.transmit(commands.get_challenge(4))[:4]
    apdu = commands.update_binary(sfi, offset, data + sm_mac(card, challenge, covered), cla=CLA_ISO_SM)
    assert sw(card.transmit(apdu)) == 0x9302  # as signed it writes: the first test of this file
    assert files_of(card.state) == before and card.state.mac_failures == 1


@pytest.mark.parametrize(
    ("apdu", "status"),
    [
        ("00DC01AC02AAAA", 0x6981),  # UPDATE RECORD of SFI 15, 16, 17: binary files
        ("04DC01B4050200000000", 0x6981),
        ("00DC01C417" + "00" * 23, 0x6982),  # the transaction log: written by the card alone
        ("04DC01F430" + "00" * 48, 0x6982),  # the trip log
        ("00DC010C0100", 0x6A82),  # SFI 01: no such file
        ("00D6980001AA", 0x6981),  # UPDATE BINARY of the transaction log
        ("04D69E000500000000AA", 0x6981),
        ("00D6810001AA", 0x6A82),  # SFI 01
        ("00D6150001AA", 0x6A82),  # P1 without the SFI bit: no current file
    ],
)
def test_update_record_and_other_files_are_refused_for_good(apdu: str, status: int) -> None:
    flawed = selected(defects=frozenset({Defect.PLAIN_WRITE}))  # the flaw is about the public files' access only
    before = copy.deepcopy(flawed.state)
    assert sw(flawed.transmit(bytes.fromhex(apdu))) == status
    assert flawed.state == before


@pytest.mark.parametrize(
    ("offset", "data"),
    [(29, b"\x01\x02"), (30, b"\x01"), (0xFF, b"\x01"), (0, b"")],
    ids=["past-the-end", "offset-at-the-end", "offset-FF", "no-data"],
)
def test_writes_outside_the_file_are_wrong_length(offset: int, data: bytes) -> None:
    flawed = selected(defects=frozenset({Defect.PLAIN_WRITE}))
    before = files_of(flawed.state)
    plain = bytes([0x00, 0xD6, 0x80 | SFI_PUBLIC, offset]) + (bytes([len(data)]) + data if data else b"")
    assert sw(flawed.transmit(plain)) == 0x6700
    assert sw(secure_write(flawed, SFI_PUBLIC, offset, data)) == 0x6700
    assert files_of(flawed.state) == before and flawed.state.mac_failures == 0


def test_the_card_must_be_selected_and_le_must_fit() -> None:
    card = new_card()
    card.state.defects = frozenset({Defect.PLAIN_WRITE})
    assert sw(card.transmit(commands.update_binary(SFI_HOLDER, 0, b"\x02"))) == 0x6985  # not selected
    card.transmit(SELECT)
    assert sw(card.transmit(commands.update_binary(SFI_HOLDER, 0, b"\x02") + b"\x04")) == 0x6700  # Le 04: no data
    assert sw(card.transmit(commands.update_binary(SFI_HOLDER, 0, b"\x02") + b"\x00")) == 0x9000


@pytest.mark.parametrize("through_image", [False, True], ids=["in-memory", "saved-and-loaded"])
def test_a_torn_write_leaves_the_old_file_or_the_new_one(through_image: bool) -> None:
    old = files_of(selected().state)
    outcomes = set()
    for budget in range(6):
        card = selected()
        card.eeprom.budget = budget
        try:
            answer = secure_write(card, SFI_PUBLIC, EXPIRY, bytes.fromhex("20991231"))
        except CardTorn:
            answer = None
        card.eeprom.budget = None
        if through_image:
            card = PurseCard(purse_from_json(purse_to_json(card.state)), card.rng)
        card.power_on()
        after = files_of(card.state)
        new = [old[0][:EXPIRY] + bytes.fromhex("20991231") + old[0][28:], *old[1:]]
        assert after in (old, new) and card.state.journal is None
        assert answer is None or (sw(answer), after) == (0x9000, new)
        outcomes.add(after == new)
    assert outcomes == {True, False}, "the cuts must reach both sides of the commit point"


FILE_SIZES = {name: len(getattr(new_card().state, name)) for name in BINARY_FILES.values()}
FILE_VALUES = st.one_of(
    st.one_of(
        st.binary(max_size=40),
        st.sampled_from(sorted(FILE_SIZES.values())).flatmap(lambda n: st.binary(min_size=n, max_size=n)),
    ).map(lambda b: b.hex().upper()),
    st.sampled_from(["XYZ", "0", None, 7, []]),
)


def file_content(name: str, value: object) -> bytes | None:
    """The file a journal value stands for; None when it is none (no hex, or not as long as the file)."""
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return None if raw is None or len(raw) != FILE_SIZES[name] else raw


def test_a_journal_value_that_would_resize_a_file_is_refused_naming_the_field() -> None:
    doc = purse_to_json(new_card().state)
    doc["journal"] = {"valid": True, "updates": {"holder_data": "02" * (FILE_SIZES["holder_data"] + 1)}}
    expected = f"x.json: journal: field 'holder_data' must be {FILE_SIZES['holder_data']} bytes, as long as the file"
    with pytest.raises(CardImageError, match=expected):
        purse_from_json(doc, "x.json")


@settings(max_examples=200, deadline=None)
@given(
    updates=st.dictionaries(st.sampled_from(list(BINARY_FILES.values())), FILE_VALUES, min_size=1), valid=st.booleans()
)
def test_an_image_with_a_pending_file_write_loads_exactly_or_names_the_field(
    updates: dict[str, object], valid: bool
) -> None:
    """A card saved in the middle of a file write (`card serve` saves after every non-volatile write) keeps the
    write's journal: it loads back as saved, and a journal file value that is no hex, or not as long as its file
    (a replay would resize it), names its field."""
    doc = purse_to_json(new_card().state) | {"journal": {"valid": valid, "updates": updates}}
    contents = {name: file_content(name, value) for name, value in updates.items()}
    bad = [name for name, content in contents.items() if content is None]
    if bad:
        with pytest.raises(CardImageError, match=f"x.json: journal: field '({'|'.join(bad)})' must be"):
            purse_from_json(doc, "x.json")
        return
    state = purse_from_json(doc, "x.json")
    assert state.journal is not None and purse_to_json(state)["journal"] == doc["journal"]
    card = PurseCard(state, new_card().rng)
    card.power_on()  # a valid journal is replayed, an unfinished one dropped
    for name in BINARY_FILES.values():
        assert getattr(card.state, name) == (
            contents.get(name) if valid and name in contents else getattr(new_card().state, name)
        )
