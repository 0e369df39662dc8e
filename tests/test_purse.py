"""The CPU purse card through PSAM + card in process: purchases, loads, compound purchases, status words."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import KEYS, TERMINAL, WHEN, new_card, new_psam, readers, sw

from cardsim import crypto
from cardsim.commands import InitializeAnswer
from cardsim.crypto import Algorithm, BlockKey
from cardsim.image import load_purse, save_card
from cardsim.issuer import HostRefusal, IssuerHost
from cardsim.purse import AID, LOG_RECORDS, TRIP_RECORDS, Defect, PurseCard
from terminals.flows import TransactionError, load, purchase, select_purse
from terminals.limits import MAX_FEN

SELECT = bytes.fromhex("00A4040008") + AID
ALGS = list(Algorithm)


def init_purchase(card: PurseCard, amount: int, key_index: int = 1) -> bytes:
    return card.transmit(bytes([0x80, 0x50, 0x01, 0x02, 0x0B, key_index]) + amount.to_bytes(4) + TERMINAL + b"\x0f")


def debit(card: PurseCard, mac1: bytes, seq: int = 1) -> bytes:
    return card.transmit(bytes.fromhex("805401000F") + seq.to_bytes(4) + bytes.fromhex("20261124081502") + mac1)


@pytest.mark.parametrize("alg", ALGS)
def test_full_purchase_through_psam_and_card(alg: Algorithm) -> None:
    card, psam = new_card(alg), new_psam()
    r_card, r_sam = readers(card, psam)
    txn = purchase(r_card, r_sam, TERMINAL, 200, WHEN)
    assert (txn.balance_before, txn.balance_after, txn.card_counter) == (5000, 4800, 0)
    assert card.state.balance == 4800 and card.state.offline_counter == 1 and card.state.online_counter == 0
    assert txn.algorithm is alg and txn.terminal_seq == 1 and psam.state.ttc == 2
    # The TAC verifies with the issuer's keys (what clearing will do).
    tac_key = IssuerHost(KEYS).tac_key(card.state.public.card_serial, 1, alg)
    tac_data = crypto.purchase_tac_data(200, 0x06, TERMINAL, 1, bytes.fromhex("20261124"), bytes.fromhex("081502"))
    assert tac_key.mac(tac_data) == txn.tac
    log = card.state.log[0]
    assert log[0:2] == b"\x00\x00" and int.from_bytes(log[5:9]) == 200 and log[9] == 0x06 and log[10:16] == TERMINAL
    second = purchase(r_card, r_sam, TERMINAL, 300, WHEN)
    assert (second.card_counter, second.terminal_seq, card.state.balance) == (1, 2, 4500)


@pytest.mark.parametrize("alg", ALGS)
def test_full_load_through_issuer_host(alg: Algorithm) -> None:
    card = new_card(alg, balance=100)
    txn = load(readers(card, new_psam())[0], IssuerHost(KEYS), TERMINAL, 5000, WHEN)
    assert (txn.balance_before, txn.balance_after) == (100, 5100)
    assert card.state.balance == 5100 and card.state.online_counter == 1 and card.state.offline_counter == 0
    tac_key = IssuerHost(KEYS).tac_key(card.state.public.card_serial, 1, alg)
    date, time = bytes.fromhex("20261124"), bytes.fromhex("081502")
    assert tac_key.mac(crypto.load_tac_data(5100, 0, 5000, 0x02, TERMINAL, date, time)) == txn.tac
    assert card.state.log[0][9] == 0x02


def test_load_refused_by_host_of_another_issuer() -> None:
    card = new_card(city="4560")
    other_city_only = type(KEYS)([s for s in KEYS if s.city == "4510"])
    with pytest.raises(HostRefusal, match="no keys for issuer 4560"):
        load(readers(card, new_psam())[0], IssuerHost(other_city_only), TERMINAL, 100, WHEN)
    assert card.state.balance == 5000


def test_load_over_the_purse_limit_is_refused() -> None:
    card = new_card(balance=99_900)
    with pytest.raises(TransactionError) as err:
        load(readers(card, new_psam())[0], IssuerHost(KEYS), TERMINAL, 200, WHEN)
    assert err.value.sw == 0x6985 and card.state.balance == 99_900
    assert "above the card's maximum" in str(err.value)  # the terminal says what 6985 means here


def test_a_card_that_ignores_its_maximum_is_held_to_it_by_the_issuer_host_and_to_what_a_record_holds(
    tmp_path: Path,
) -> None:
    card = new_card(balance=99_900)
    card.state.defects = frozenset({Defect.NO_MAX_BALANCE})
    reader = readers(card, new_psam())[0]
    past = "a load of 200 fen on a balance of 99900 fen would pass the issuer's maximum balance of 100000 fen"
    with pytest.raises(HostRefusal, match=past):
        load(reader, IssuerHost(KEYS), TERMINAL, 200, WHEN)  # the product maximum by default
    with pytest.raises(HostRefusal, match="of 100050 fen"):
        load(reader, IssuerHost(KEYS, max_balance=100_050), TERMINAL, 200, WHEN)
    assert card.state.balance == 99_900 and card.state.online_counter == 0
    host = IssuerHost(KEYS, max_balance=100_100)  # a host configured with a higher maximum than this card's
    assert load(reader, host, TERMINAL, 200, WHEN).balance_after == card.state.balance == 100_100
    with pytest.raises(TransactionError, match="past what any purse may hold"):
        load(reader, host, TERMINAL, MAX_FEN, WHEN)  # refused before the issuer host authorises it
    assert card.state.balance == 100_100 and card.state.online_counter == 1
    save_card(tmp_path / "card.json", card.state)  # the flawed card's image keeps its balance past the maximum
    assert load_purse(tmp_path / "card.json").balance == 100_100


def test_a_card_that_allows_overdraft_wraps_its_balance_and_the_terminal_charges_nothing() -> None:
    card, psam = new_card(balance=50), new_psam()
    card.state.defects = frozenset({Defect.OVERDRAFT})
    with pytest.raises(TransactionError, match="accepted 80 fen on a balance of 50 fen; not charged") as err:
        purchase(*readers(card, psam), TERMINAL, 80, WHEN)
    assert err.value.sw == 0x9401 and card.state.balance == 50  # the refusal a genuine card gives
    card.transmit(SELECT)
    answer = init_purchase(card, 80)
    assert sw(answer) == 0x9000  # a genuine card answers 9401
    init = InitializeAnswer.from_bytes(answer[:-2], load=False)
    key = BlockKey(Algorithm.SM4, card.state.keys.purchase)
    session = crypto.session_key(key, crypto.purchase_key_input(init.random, init.counter, 1))
    mac1 = session.mac(
        crypto.purchase_mac1_data(80, 0x06, TERMINAL, bytes.fromhex("20261124"), bytes.fromhex("081502"))
    )
    assert sw(debit(card, mac1)) == 0x9000
    assert card.state.balance == 2**32 - 30  # 50 - 80, wrapped round the 4-byte balance


def test_interop_purchase_with_cards_of_every_city() -> None:
    psam = new_psam()
    for city in ("4510", "4560", "4530"):
        card = new_card(city=city)
        txn = purchase(*readers(card, psam), TERMINAL, 100, WHEN)
        assert txn.city == city and card.state.balance == 4900


@pytest.mark.parametrize("alg", ALGS)
def test_compound_purchase_writes_the_trip_log_with_the_debit(alg: Algorithm) -> None:
    card = new_card(alg)
    trip = bytes([0x03]) + bytes(47)
    txn = purchase(*readers(card, new_psam()), TERMINAL, 0, WHEN, trip_record=trip)
    assert txn.txn_type == 0x09 and card.state.trips == [trip] and card.state.log[0][9] == 0x09
    for i in range(TRIP_RECORDS + 2):
        purchase(*readers(card, new_psam()), TERMINAL, 1, WHEN, trip_record=bytes([0x04, i]) + bytes(46))
    assert len(card.state.trips) == TRIP_RECORDS and card.state.trips[0][1] == TRIP_RECORDS + 1


def test_update_capp_cache_needs_a_compound_initialize() -> None:
    card = new_card()
    card.transmit(SELECT)
    init_purchase(card, 100)
    assert sw(card.transmit(bytes.fromhex("80DC00F030") + bytes(48))) == 0x6985


def test_log_is_cyclic_newest_first() -> None:
    card, psam = new_card(), new_psam()
    for amount in range(1, LOG_RECORDS + 3):
        purchase(*readers(card, psam), TERMINAL, amount, WHEN)
    assert len(card.state.log) == LOG_RECORDS
    assert [int.from_bytes(r[5:9]) for r in card.state.log] == list(range(LOG_RECORDS + 2, 2, -1))
    card.transmit(SELECT)
    newest = card.transmit(bytes.fromhex("00B201C400"))
    assert sw(newest) == 0x9000 and int.from_bytes(newest[5:9]) == LOG_RECORDS + 2
    assert sw(card.transmit(bytes.fromhex("00B20BC400"))) == 0x6A83


def test_debit_without_initialize_is_refused() -> None:
    card = new_card()
    card.transmit(SELECT)
    assert sw(debit(card, bytes(4))) == 0x6985
    assert card.state.balance == 5000


def test_any_command_between_initialize_and_debit_cancels_the_transaction() -> None:
    card, psam = new_card(), new_psam()
    r_card, _r_sam = readers(card, psam)
    app = select_purse(r_card)
    r = init_purchase(card, 100)
    sam = psam.transmit(
        bytes.fromhex("807000001C")
        + r[11:15]
        + r[4:6]
        + (100).to_bytes(4)
        + b"\x06"
        + bytes.fromhex("20261124081502")
        + bytes([r[9], r[10]])
        + app.card_serial
    )
    assert card.transmit(bytes.fromhex("805C000204"))[-2:] == b"\x90\x00"
    assert sw(debit(card, sam[4:8], int.from_bytes(sam[0:4]))) == 0x6985
    assert card.state.balance == 5000


def test_wrong_mac1_debits_nothing_and_three_in_a_row_lock() -> None:
    card = new_card()
    for attempt in (1, 2, 3):
        card.transmit(SELECT)
        assert sw(init_purchase(card, 100)) == 0x9000
        answer = sw(debit(card, b"\x00\x00\x00\x00"))
        assert answer == (0x9302 if attempt < 3 else 0x9303)
        assert card.state.balance == 5000 and card.state.offline_counter == 0 and card.state.log == []
    assert card.state.locked
    assert sw(card.transmit(SELECT)) == 0x9303
    assert sw(card.transmit(bytes.fromhex("805C000204"))) == 0x9303
    card.power_on()  # the lock is non-volatile
    assert sw(card.transmit(SELECT)) == 0x9303


def test_a_good_mac_resets_the_failure_count() -> None:
    card, psam = new_card(), new_psam()
    for _ in range(2):
        card.transmit(SELECT)
        init_purchase(card, 100)
        debit(card, bytes(4))
    assert card.state.mac_failures == 2
    purchase(*readers(card, psam), TERMINAL, 100, WHEN)
    assert card.state.mac_failures == 0 and not card.state.locked


def test_insufficient_balance_and_unknown_key_index() -> None:
    card = new_card(balance=50)
    card.transmit(SELECT)
    assert sw(init_purchase(card, 51)) == 0x9401
    assert sw(init_purchase(card, 10, key_index=2)) == 0x9403
    assert sw(init_purchase(card, 50)) == 0x9000


def test_status_words_for_malformed_commands() -> None:
    card = new_card()
    assert sw(card.transmit(bytes.fromhex("805C000204"))) == 0x6985  # not selected
    assert sw(card.transmit(bytes.fromhex("00A4040007A0000006320101"))) == 0x6A82  # wrong AID
    assert sw(card.transmit(SELECT)) == 0x9000
    assert sw(card.transmit(bytes.fromhex("00CA000000"))) == 0x6D00
    assert sw(card.transmit(bytes.fromhex("B0CA000000"))) == 0x6E00
    assert sw(card.transmit(bytes.fromhex("8050"))) == 0x6700
    assert sw(card.transmit(bytes.fromhex("805001020A") + bytes(10))) == 0x6700  # Lc 0A, needs 0B
    assert sw(card.transmit(bytes.fromhex("805001020B") + bytes(5))) == 0x6700  # Lc disagrees with data
    assert sw(card.transmit(bytes.fromhex("805C000208"))) == 0x6700  # Le 08 for a 4-byte balance
    assert sw(card.transmit(bytes.fromhex("805C000104"))) == 0x6D00  # wrong P2
    assert sw(card.transmit(bytes.fromhex("00B0990000"))) == 0x6A82  # no SFI 0x19
    assert sw(card.transmit(bytes.fromhex("00B2019C00"))) == 0x6A82  # READ RECORD of SFI 0x13
    assert sw(card.transmit(bytes.fromhex("00B201C400"))) == 0x6A83  # empty log
    fci = card.transmit(SELECT)
    assert fci.startswith(b"\x6f") and bytes.fromhex("9F0C1E") in fci
    public = card.transmit(bytes.fromhex("00B0950000"))
    assert public[:-2] == card.state.public_data and len(public) == 32
    assert card.transmit(bytes.fromhex("00B095020A"))[:-2] == card.state.public_data[2:12]


def test_pse_can_be_selected() -> None:
    card = new_card()
    r = card.transmit(bytes.fromhex("00A404000E") + b"1PAY.SYS.DDF01")
    assert sw(r) == 0x9000 and b"1PAY.SYS.DDF01" in r


def test_get_challenge_lengths() -> None:
    card = new_card()
    assert len(card.transmit(bytes.fromhex("0084000004"))) == 6
    assert len(card.transmit(bytes.fromhex("0084000008"))) == 10
    assert sw(card.transmit(bytes.fromhex("0084000005"))) == 0x6700


def block_command(card: PurseCard, challenge: bytes, alg: Algorithm) -> bytes:
    key = IssuerHost(KEYS).card_key(card.state.public.card_serial, 1, alg, "maintenance")
    mac = crypto.session_key(key, crypto.block_key_input(challenge)).mac(crypto.BLOCK_COMMAND_HEADER)
    return crypto.BLOCK_COMMAND_HEADER + mac


@pytest.mark.parametrize("alg", ALGS)
def test_application_block_with_psam_mac(alg: Algorithm) -> None:
    card, psam = new_card(alg), new_psam()
    card.transmit(SELECT)
    challenge = card.transmit(bytes.fromhex("0084000004"))[:4]
    mac = psam.transmit(
        bytes.fromhex("80FA00000E") + card.state.public.card_serial + challenge + bytes([1, alg.algorithm_id]) + b"\x04"
    )
    assert sw(mac) == 0x9000
    assert crypto.BLOCK_COMMAND_HEADER + mac[:4] == block_command(card, challenge, alg)
    assert sw(card.transmit(crypto.BLOCK_COMMAND_HEADER + mac[:4])) == 0x9000
    assert card.state.blocked
    assert sw(card.transmit(SELECT)) == 0x6A81


def test_application_block_needs_a_fresh_challenge_and_a_good_mac() -> None:
    card = new_card()
    card.transmit(SELECT)
    assert sw(card.transmit(crypto.BLOCK_COMMAND_HEADER + bytes(4))) == 0x6985  # no challenge
    challenge = card.transmit(bytes.fromhex("0084000004"))[:4]
    card.transmit(bytes.fromhex("805C000204"))  # the challenge served that command, not the block
    assert sw(card.transmit(block_command(card, challenge, Algorithm.SM4))) == 0x6985
    card.transmit(bytes.fromhex("0084000004"))
    assert sw(card.transmit(crypto.BLOCK_COMMAND_HEADER + bytes(4))) == 0x9302
    assert not card.state.blocked


def test_get_transaction_prove_returns_the_last_purchase_proof() -> None:
    card, psam = new_card(), new_psam()
    txn = purchase(*readers(card, psam), TERMINAL, 100, WHEN)
    assert card.transmit(bytes.fromhex("805A000602000008")) == txn.mac2 + txn.tac + b"\x90\x00"
    assert sw(card.transmit(bytes.fromhex("805A0006020001"))) == 0x6A83  # counter 1 never used
    assert sw(card.transmit(bytes.fromhex("805A0009020000"))) == 0x6A83  # it was not a compound purchase
    assert sw(card.transmit(bytes.fromhex("805A0002020000"))) == 0x6D00


def test_psam_refuses_what_it_cannot_do() -> None:
    psam = new_psam()
    assert sw(psam.transmit(bytes.fromhex("8072000004") + bytes(4))) == 0x6985  # no INIT SAM
    unknown_issuer = bytes(18) + bytes([1, 0]) + bytes.fromhex("9999000000000001")
    assert sw(psam.transmit(bytes.fromhex("807000001C") + unknown_issuer)) == 0x9403
    bad_alg = bytes(18) + bytes([1, 7]) + bytes.fromhex("4510000000000001")
    assert sw(psam.transmit(bytes.fromhex("807000001C") + bad_alg)) == 0x9403
    assert psam.state.ttc == 1  # nothing was MACed
    ok = psam.transmit(bytes.fromhex("807000001C") + bytes(18) + bytes([1, 4]) + bytes.fromhex("4510000000000001"))
    assert sw(ok) == 0x9000 and psam.state.ttc == 2
    assert sw(psam.transmit(bytes.fromhex("8072000004") + bytes(4))) == 0x9302
    assert psam.transmit(bytes.fromhex("00B0960006")) == TERMINAL + b"\x90\x00"
