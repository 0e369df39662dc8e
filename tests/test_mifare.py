"""MIFARE Classic card: authentication through a reader-side Crypto-1, access bits, value blocks, purse."""

from __future__ import annotations

import datetime as dt

import pytest

from cardsim.crypto1 import Crypto1, encrypt_bytes, prng_successor
from cardsim.m1_issue import KeyScheme, issue_m1_card, sector_keys
from cardsim.mifare import (
    NACK_LEAKING,
    Frame,
    M1Card,
    Profile,
    decode_access,
    encode_access,
    parse_value_block,
    value_block,
)
from terminals.m1 import M1Error, M1Reader, m1_purchase

MASTER = bytes(range(16))
UID = bytes.fromhex("9C599B32")
WHEN = dt.datetime(2026, 11, 24, 8, 15, 2)


def card(profile: Profile = Profile.GENUINE, scheme: KeyScheme = KeyScheme.DIVERSIFIED, balance: int = 3000):
    c = M1Card(issue_m1_card(UID, profile, scheme, balance, MASTER), rng=bytes)
    c.power_on()
    return c


def keys(sector: int, scheme: KeyScheme = KeyScheme.DIVERSIFIED) -> tuple[int, int]:
    a, b = sector_keys(scheme, MASTER, UID, sector)
    return int.from_bytes(a), int.from_bytes(b)


def test_block0_and_access_bits_layout() -> None:
    c = card()
    block0 = c.state.blocks[0]
    assert block0[4] == 0x9C ^ 0x59 ^ 0x9B ^ 0x32 and block0[5] == 0x08 and block0[6:8] == b"\x04\x00"
    assert decode_access(bytes.fromhex("FF0780")) == [(0, 0, 0)] * 3 + [(0, 0, 1)]
    conditions = [(1, 1, 0), (0, 0, 1), (1, 0, 0), (0, 1, 1)]
    assert decode_access(encode_access(conditions)) == conditions
    assert decode_access(bytes.fromhex("FF0781")) is None


def test_authentication_and_read_with_the_right_key_only() -> None:
    c = card()
    key_a, _key_b = keys(1)
    reader = M1Reader(c, int.from_bytes(UID))
    with pytest.raises(M1Error, match="wrong key"):
        reader.authenticate(4, key_a ^ 1, 0x60)
    reader.authenticate(4, key_a, 0x60)
    assert parse_value_block(reader.read_block(4)) == (3000, 4)
    trailer = reader.read_block(7)
    assert trailer[0:6] == bytes(6), "key A never reads back"
    assert trailer[10:16] == bytes(6), "key B is not readable under these conditions"
    with pytest.raises(M1Error, match="NAK"):
        reader.read_block(8)  # another sector


def test_nested_authentication_switches_sector() -> None:
    c = card()
    reader = M1Reader(c, int.from_bytes(UID))
    reader.authenticate(4, keys(1)[0], 0x60)
    reader.authenticate(8, keys(2)[1], 0x61)  # nested: the nonce arrives encrypted
    assert reader.read_block(8) == bytes(16)


def test_access_conditions_forbid_writes_and_increments_with_key_a() -> None:
    c = card()
    key_a, _key_b = keys(1)
    reader = M1Reader(c, int.from_bytes(UID))
    reader.authenticate(4, key_a, 0x60)
    with pytest.raises(M1Error, match="NAK"):
        reader.write_block(6, bytes(16))  # block 6: write needs key B
    reader = M1Reader(c, int.from_bytes(UID))
    reader.authenticate(4, key_a, 0x60)
    with pytest.raises(M1Error, match="NAK"):
        reader.value_operation(0xC1, 4, 100)  # increment needs key B
    reader = M1Reader(c, int.from_bytes(UID))
    reader.authenticate(4, key_a, 0x60)
    reader.value_operation(0xC0, 4, 100)  # decrement is allowed with key A
    reader.transfer(4)
    assert parse_value_block(c.state.blocks[4]) == (2900, 4)


def test_purse_purchase_and_corrupted_value_block() -> None:
    c = card()
    reader = M1Reader(c, int.from_bytes(UID))
    txn = m1_purchase(reader, keys(1)[1], bytes.fromhex("001122334455"), 200, WHEN)
    assert (txn.balance_before, txn.balance_after) == (3000, 2800)
    assert parse_value_block(c.state.blocks[4]) == (2800, 4) == parse_value_block(c.state.blocks[5])
    assert c.state.blocks[6] == bytes.fromhex("000126112408150200112233445500C8")
    assert txn.counter == 0
    c.state.blocks[4] = c.state.blocks[4][:4] + bytes(4) + c.state.blocks[4][8:]  # break the redundancy
    c.state.blocks[5] = c.state.blocks[4]
    c.power_on()
    with pytest.raises(M1Error, match="corrupted"):
        m1_purchase(M1Reader(c, int.from_bytes(UID)), keys(1)[1], bytes(6), 200, WHEN)


def test_torn_purse_is_repaired_from_the_backup() -> None:
    c = card()
    c.state.blocks[4] = bytes(16)
    txn = m1_purchase(M1Reader(c, int.from_bytes(UID)), keys(1)[1], bytes(6), 100, WHEN)
    assert (txn.balance_before, txn.balance_after) == (3000, 2900)


def test_gen1a_backdoor_reads_and_writes_block0() -> None:
    c = card(Profile.GEN1A)
    assert c.transceive(Frame(b"\x40", bits=7)) == Frame(b"\x0a", bits=4)
    assert c.transceive(Frame(b"\x43")) == Frame(b"\x0a", bits=4)
    assert c.transceive(Frame(b"\x30\x00")).data[0:4] == UID
    c.transceive(Frame(b"\xa0\x00"))
    c.transceive(Frame(bytes.fromhex("11223344") + bytes(12)))
    assert c.state.blocks[0][0:4] == bytes.fromhex("11223344")
    genuine = card()
    assert genuine.transceive(Frame(b"\x40", bits=7)) is None


def test_fm11rf08s_accepts_the_backdoor_key() -> None:
    c = card(Profile.FM11RF08S)
    reader = M1Reader(c, int.from_bytes(UID))
    reader.authenticate(4, 0xA396EFA4E24F, 0x64)
    assert parse_value_block(reader.read_block(4)) == (3000, 4)
    with pytest.raises(M1Error):
        M1Reader(card(), int.from_bytes(UID)).authenticate(4, 0xA396EFA4E24F, 0x64)


def test_value_block_format() -> None:
    assert parse_value_block(value_block(-5, 9)) == (-5, 9)
    broken = bytearray(value_block(100, 4))
    broken[12] ^= 1
    assert parse_value_block(bytes(broken)) is None


def test_default_and_shared_key_schemes() -> None:
    assert keys(3, KeyScheme.DEFAULT) == (0xFFFFFFFFFFFF, 0xFFFFFFFFFFFF)
    other_uid = bytes.fromhex("01020304")
    assert sector_keys(KeyScheme.SHARED, MASTER, UID, 2) == sector_keys(KeyScheme.SHARED, MASTER, other_uid, 2)
    assert sector_keys(KeyScheme.DIVERSIFIED, MASTER, UID, 2) != sector_keys(
        KeyScheme.DIVERSIFIED, MASTER, other_uid, 2
    )


def _wrong_answer(c: M1Card, key: int, parity_right: bool) -> tuple[Frame | None, int]:
    """Start AUTH 60 04, answer with a wrong aR whose parity bits are right (or one flipped); the card's answer and
    the 4 keystream bits that follow aR."""
    answer = c.transceive(Frame(bytes([0x60, 0x04])))
    assert answer is not None
    nt = int.from_bytes(answer.data)
    reader = Crypto1.from_key(key)
    reader.word(int.from_bytes(UID) ^ nt)
    nr_enc, nr_par = encrypt_bytes(reader, bytes(4), feed=True)
    ar_enc, ar_par = encrypt_bytes(reader, (prng_successor(nt, 64) ^ 1).to_bytes(4))
    parity = nr_par + ar_par
    if not parity_right:
        parity[5] ^= 1
    ks = sum(int(reader.bit()) << i for i in range(4))
    return c.transceive(Frame(nr_enc + ar_enc, tuple(parity))), ks


@pytest.mark.parametrize("profile", list(Profile))
def test_a_wrong_answer_with_right_parity_gets_an_encrypted_nak_only_on_leaking_chips(profile: Profile) -> None:
    c = card(profile)
    key = keys(1)[0]
    leaked, ks = _wrong_answer(c, key, parity_right=True)
    if profile in NACK_LEAKING:
        assert leaked is not None and leaked.bits == 4 and leaked.data[0] ^ ks == 0x05  # NAK 5 under the keystream
    else:
        assert leaked is None
    assert _wrong_answer(c, key, parity_right=False)[0] is None  # a parity error is never answered
