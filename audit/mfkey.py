"""Key recovery from sniffed or collected MIFARE Classic authentications: mfkey64 and mfkey32.

Both invert Crypto-1 (``audit.crypto1_recovery``): recover the cipher states that produced the keystream
of {aR}, roll each back through {nR} and uid⊕nT to the key, and keep the key that explains every trace.
"""

from __future__ import annotations

import numpy as np

from audit.crypto1_recovery import lfsr_recovery32
from cardsim.crypto1 import Crypto1, prng_successor


class NoKeyFound(ValueError):
    """The traces do not come from one key (or are not authentications at all)."""


def _unique_key(keys: np.ndarray, what: str) -> int:
    found = np.unique(keys)
    if len(found) != 1:
        if len(found) == 0:
            raise NoKeyFound(f"{what}: no key explains the traces")
        raise NoKeyFound(f"{what}: {len(found)} keys explain the traces; add another trace")
    return int(found[0])


def mfkey64(uid: int, nt: int, nr_enc: int, ar_enc: int, at_enc: int) -> int:
    """The key of one complete sniffed authentication (tag nonce, {nR}, {aR}, {aT})."""
    p64 = prng_successor(nt, 64)
    states = lfsr_recovery32(ar_enc ^ p64, 0)
    after_ar = states.copy()
    match = states.word() == (at_enc ^ prng_successor(p64, 32))
    cand = Crypto1(after_ar.odd[match], after_ar.even[match])
    cand.rollback_word()
    cand.rollback_word(nr_enc, encrypted=True)
    cand.rollback_word(uid ^ nt)
    return _unique_key(cand.lfsr(), "mfkey64")


def mfkey32(uid: int, nt0: int, nr0_enc: int, ar0_enc: int, nt1: int, nr1_enc: int, ar1_enc: int) -> int:
    """The key behind two reader authentication attempts (the same or different tag nonces)."""
    cand = lfsr_recovery32(ar0_enc ^ prng_successor(nt0, 64), 0)
    cand.rollback_word()
    cand.rollback_word(nr0_enc, encrypted=True)
    cand.rollback_word(uid ^ nt0)
    keys = cand.lfsr()
    second = cand.copy()
    second.word(uid ^ nt1)
    second.word(nr1_enc, encrypted=True)
    match = (second.word() ^ prng_successor(nt1, 64)) == ar1_enc
    return _unique_key(keys[match], "mfkey32")
