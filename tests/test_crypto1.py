"""Crypto-1: the spec's forward vector, rollback, the nonce PRNG, and real key recovery (mfkey64, mfkey32)."""

from __future__ import annotations

import random
import subprocess
import sys

import pytest

from audit.mfkey import NoKeyFound, mfkey32, mfkey64
from cardsim.crypto1 import Crypto1, auth_trace, is_weak_nonce, prng_successor

UID, NT, NR = 0x9C599B32, 0x82A4166C, 0xEFEA1CDA


def test_forward_vector_of_the_spec() -> None:
    assert Crypto1.from_key(0xFFFFFFFFFFFF).lfsr() == 0xFFFFFFFFFFFF
    assert auth_trace(0xFFFFFFFFFFFF, UID, NT, NR) == (0xA1E458CE, 0x6EEA41E0, 0x5CADF439)


def test_rollback_inverts_the_cipher() -> None:
    key = 0xA0A1A2A3A4A5
    s = Crypto1.from_key(key)
    s.word(UID ^ NT)
    nr_enc = NR ^ s.word(NR)
    s.word()
    s.rollback_word()
    s.rollback_word(nr_enc, encrypted=True)
    s.rollback_word(UID ^ NT)
    assert s.lfsr() == key


def test_weak_nonces_follow_the_16_bit_lfsr() -> None:
    assert is_weak_nonce(NT)
    assert all(is_weak_nonce(prng_successor(NT, n)) for n in (1, 160, 4095, 65535))
    assert prng_successor(NT, 65535) == NT  # the LFSR has period 2^16 - 1
    rnd = random.Random(5)
    assert sum(is_weak_nonce(rnd.getrandbits(32)) for _ in range(2000)) < 5


def test_mfkey64_spec_trace() -> None:
    assert mfkey64(UID, NT, 0xA1E458CE, 0x6EEA41E0, 0x5CADF439) == 0xFFFFFFFFFFFF


@pytest.mark.parametrize("seed", range(20))
def test_mfkey32_recovers_random_keys_with_different_nonces(seed: int) -> None:
    rnd = random.Random(seed)
    key, uid, nt0, nt1 = rnd.getrandbits(48), rnd.getrandbits(32), rnd.getrandbits(32), rnd.getrandbits(32)
    nr0, ar0, _ = auth_trace(key, uid, nt0, rnd.getrandbits(32))
    nr1, ar1, _ = auth_trace(key, uid, nt1, rnd.getrandbits(32))
    assert mfkey32(uid, nt0, nr0, ar0, nt1, nr1, ar1) == key


@pytest.mark.parametrize("seed", range(100, 110))
def test_mfkey32_recovers_random_keys_with_the_same_nonce(seed: int) -> None:
    rnd = random.Random(seed)
    key, uid, nt = rnd.getrandbits(48), rnd.getrandbits(32), rnd.getrandbits(32)
    nr0, ar0, _ = auth_trace(key, uid, nt, rnd.getrandbits(32))
    nr1, ar1, _ = auth_trace(key, uid, nt, rnd.getrandbits(32))
    assert mfkey32(uid, nt, nr0, ar0, nt, nr1, ar1) == key


@pytest.mark.parametrize("seed", range(200, 210))
def test_mfkey64_recovers_random_keys(seed: int) -> None:
    rnd = random.Random(seed)
    key, uid, nt = rnd.getrandbits(48), rnd.getrandbits(32), rnd.getrandbits(32)
    assert mfkey64(uid, nt, *auth_trace(key, uid, nt, rnd.getrandbits(32))) == key


def test_traces_of_two_keys_are_refused() -> None:
    nr0, ar0, _ = auth_trace(0x111111111111, UID, NT, 1)
    nr1, ar1, _ = auth_trace(0x222222222222, UID, NT ^ 1, 2)
    with pytest.raises(NoKeyFound, match="no key explains"):
        mfkey32(UID, NT, nr0, ar0, NT ^ 1, nr1, ar1)


def yk(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "yikatong.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_mfkey64_prints_the_key() -> None:
    result = yk("audit", "mfkey64", "9C599B32", "82A4166C", "A1E458CE", "6EEA41E0", "5CADF439")
    assert result.returncode == 0 and result.stdout.strip() == "FFFFFFFFFFFF"


def test_cli_mfkey32_prints_the_key() -> None:
    key = 0x4D3A99C351DD
    nr0, ar0, _ = auth_trace(key, UID, NT, 7)
    nr1, ar1, _ = auth_trace(key, UID, NT, 8)
    values = [UID, NT, nr0, ar0, NT, nr1, ar1]
    result = yk("audit", "mfkey32", *(f"{v:08X}" for v in values))
    assert result.returncode == 0 and result.stdout.strip() == "4D3A99C351DD"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mfkey64", "9C599B3", "82A4166C", "A1E458CE", "6EEA41E0", "5CADF439"], "not 8 hex digits"),
        (["mfkey64", "9C599B32", "82A4166G", "A1E458CE", "6EEA41E0", "5CADF439"], "not 8 hex digits"),
        (["mfkey64", "9C599B32", "82A4166C", "A1E458CE", "6EEA41E0"], "required"),
        (["mfkey64", "9C599B32", "82A4166C", "A1E458CE", "6EEA41E0", "5CADF438"], "do not come from one key"),
        (
            ["mfkey32", "9C599B32", "82A4166C", "A1E458CE", "6EEA41E0", "82A4166C", "A1E458CF", "6EEA41E0"],
            "do not come from one key",
        ),
        (
            ["mfkey32", "9C599B32", "82A4166C", "A1E458CE", "6EEA41E0", "82A4166C", "A1E458CF", "6EEA41E0", "00"],
            "unrecognized arguments",
        ),
    ],
)
def test_cli_bad_traces_exit_2_without_traceback(args: list[str], message: str) -> None:
    result = yk("audit", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
