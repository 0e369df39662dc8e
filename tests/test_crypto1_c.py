"""The C Crypto-1 search (audit._crypto1) against the Python cipher (cardsim.crypto1): every state it recovers
gives the keystream, the true state is among them, the mfkey searches find the key, and words outside 32 bits
are refused, not cut."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit._crypto1 import mfkey32_keys, mfkey64_keys, recover_states
from cardsim.crypto1 import MASK24, Crypto1, auth_trace, prng_successor

WORD = st.integers(0, 2**32 - 1)


def _states(ks2: int, fed: int) -> list[tuple[int, int]]:
    odd, even = recover_states(ks2, fed)
    return list(zip(memoryview(odd).cast("I"), memoryview(even).cast("I"), strict=True))


@settings(max_examples=12, deadline=None)
@given(key=st.integers(0, 2**48 - 1), fed=WORD, seed=st.integers(0, 2**32))
def test_recovery_finds_the_true_state_and_only_states_that_fit(key: int, fed: int, seed: int) -> None:
    cipher = Crypto1.from_key(key)
    ks2 = cipher.word(fed)
    states = _states(ks2, fed)
    assert (cipher.odd, cipher.even) in {(o & MASK24, e & MASK24) for o, e in states}
    for odd, even in random.Random(seed).sample(states, min(40, len(states))):
        back = Crypto1(odd, even)
        back.rollback_word(fed)
        assert back.word(fed) == ks2


@settings(max_examples=8, deadline=None)
@given(key=st.integers(0, 2**48 - 1), uid=WORD, nt0=WORD, nt1=WORD, nr0=WORD, nr1=WORD)
def test_mfkey32_keys_holds_the_key(key: int, uid: int, nt0: int, nt1: int, nr0: int, nr1: int) -> None:
    nr0_enc, ar0_enc, _ = auth_trace(key, uid, nt0, nr0)
    nr1_enc, ar1_enc, _ = auth_trace(key, uid, nt1, nr1)
    ks0, ks1 = ar0_enc ^ prng_successor(nt0, 64), ar1_enc ^ prng_successor(nt1, 64)
    assert key in mfkey32_keys(uid ^ nt0, nr0_enc, ks0, uid ^ nt1, nr1_enc, ks1)


def test_mfkey64_keys_of_the_spec_trace() -> None:
    uid, nt = 0x9C599B32, 0x82A4166C
    ks2, ks3 = 0x6EEA41E0 ^ prng_successor(nt, 64), 0x5CADF439 ^ prng_successor(nt, 96)
    assert mfkey64_keys(uid ^ nt, 0xA1E458CE, ks2, ks3) == [0xFFFFFFFFFFFF]


@pytest.mark.parametrize("bad", [-1, 2**32, 2**64, 2**200])
def test_words_outside_32_bits_are_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="32-bit word"):
        recover_states(bad, 0)
    with pytest.raises(ValueError, match="32-bit word"):
        mfkey64_keys(0, 0, 0, bad)


def test_a_word_must_be_an_int() -> None:
    with pytest.raises(TypeError):
        recover_states("12345678", 0)  # type: ignore[arg-type]
