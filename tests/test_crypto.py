"""The published vectors of spec card.md reproduce exactly, and the crypto helpers reject bad keys."""

import pytest

from cardsim import crypto
from cardsim.crypto import Algorithm, BlockKey


def test_published_3des_purchase_vector() -> None:
    dpk = BlockKey(Algorithm.DES3, bytes.fromhex("11223344556677888877665544332211"))
    sk = crypto.session_key(dpk, crypto.purchase_key_input(bytes.fromhex("11223344"), 0x0000, 0x0001))
    assert sk.key.hex().upper() == "003238ABC57659DD"
    mac1_data = crypto.purchase_mac1_data(
        0x1000, 0x06, bytes.fromhex("001122334455"), bytes.fromhex("20120229"), bytes.fromhex("135100")
    )
    assert mac1_data.hex().upper() == "00001000" + "06" + "001122334455" + "20120229135100"
    assert sk.mac(mac1_data).hex().upper() == "F15CAB75"
    assert sk.mac(crypto.purchase_mac2_data(0x1000)).hex().upper() == "56988A13"


def test_published_sm4_primitive() -> None:
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    assert BlockKey(Algorithm.SM4, key).encrypt(key).hex().upper() == "681EDF34D206965E86B3E94F536E4246"


def test_padding_always_adds_a_block_when_full() -> None:
    assert crypto.pad80(bytes(8), 8) == bytes(8) + b"\x80" + bytes(7)
    assert crypto.pad80(b"\x01\x02", 8) == b"\x01\x02\x80" + bytes(5)
    assert len(crypto.pad80(bytes(15), 16)) == 16


@pytest.mark.parametrize("alg", list(Algorithm))
def test_diversification_differs_per_card_and_follows_the_spec(alg: Algorithm) -> None:
    master = bytes(range(16))
    a = crypto.diversify(alg, master, bytes.fromhex("4510000000000001"))
    b = crypto.diversify(alg, master, bytes.fromhex("4510000000000002"))
    assert len(a) == 16 and a != b
    d = bytes.fromhex("4510000000000001")
    inv = bytes(x ^ 0xFF for x in d)
    mk = BlockKey(alg, master)
    if alg is Algorithm.SM4:
        expected = mk.encrypt(d + inv)
    elif alg is Algorithm.DES3:
        expected = mk.encrypt(d) + mk.encrypt(inv)
    else:
        expected = mk.encrypt(d) * 2  # one single-DES key, stored twice
    assert a == expected


def test_3des_tac_key_is_xor_of_halves_and_sm4_is_the_key() -> None:
    dtk = bytes(range(16))
    assert crypto.tac_key(Algorithm.DES3, dtk).key == bytes(a ^ b for a, b in zip(dtk[:8], dtk[8:], strict=True))
    assert crypto.tac_key(Algorithm.SM4, dtk).key == dtk


def test_sm4_mac_matches_cbc_over_padded_blocks() -> None:
    key = BlockKey(Algorithm.SM4, bytes(range(16)))
    data = b"0123456789abcdefXYZ"
    padded = crypto.pad80(data, 16)
    c1 = key.encrypt(padded[:16])
    c2 = key.encrypt(bytes(a ^ b for a, b in zip(c1, padded[16:], strict=True)))
    assert key.mac(data) == c2[:4]


@pytest.mark.parametrize(("alg", "size"), [(Algorithm.DES3, 7), (Algorithm.DES3, 24), (Algorithm.SM4, 8)])
def test_bad_key_lengths_are_refused(alg: Algorithm, size: int) -> None:
    with pytest.raises(ValueError, match="key must be"):
        BlockKey(alg, bytes(size))


def test_algorithm_ids() -> None:
    assert Algorithm.from_id(0x00) is Algorithm.DES3
    assert Algorithm.from_id(0x04) is Algorithm.SM4
    assert Algorithm.from_id(0x01) is Algorithm.DES
    with pytest.raises(ValueError, match="unknown algorithm id 02"):
        Algorithm.from_id(0x02)
