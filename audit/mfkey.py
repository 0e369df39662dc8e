"""Key recovery from sniffed or collected MIFARE Classic authentications: mfkey64 and mfkey32.

Both invert Crypto-1 (the state recovery of ``audit.crypto1_recovery``, run in C by ``audit._crypto1``):
recover the cipher states that produced the keystream of {aR}, roll each back through {nR} and uid⊕nT to the
key, and keep the key that explains every trace.
"""

from __future__ import annotations

from audit._crypto1 import mfkey32_keys, mfkey64_keys
from cardsim.crypto1 import prng_successor


class NoKeyFound(ValueError):
    """The traces do not come from one key (or are not authentications at all)."""


def _unique_key(keys: list[int], what: str) -> int:
    if len(keys) != 1:
        if not keys:
            raise NoKeyFound(f"{what}: no key explains the traces")
        raise NoKeyFound(f"{what}: {len(keys)} keys explain the traces; add another trace")
    return keys[0]


def mfkey64(uid: int, nt: int, nr_enc: int, ar_enc: int, at_enc: int) -> int:
    """The key of one complete sniffed authentication (tag nonce, {nR}, {aR}, {aT})."""
    p64 = prng_successor(nt, 64)
    keys = mfkey64_keys(uid ^ nt, nr_enc, ar_enc ^ p64, at_enc ^ prng_successor(p64, 32))
    return _unique_key(keys, "mfkey64")


def mfkey32(uid: int, nt0: int, nr0_enc: int, ar0_enc: int, nt1: int, nr1_enc: int, ar1_enc: int) -> int:
    """The key behind two reader authentication attempts (the same or different tag nonces)."""
    keys = mfkey32_keys(
        uid ^ nt0, nr0_enc, ar0_enc ^ prng_successor(nt0, 64), uid ^ nt1, nr1_enc, ar1_enc ^ prng_successor(nt1, 64)
    )
    return _unique_key(keys, "mfkey32")
