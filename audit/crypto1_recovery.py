"""Crypto-1 state recovery from 32 keystream bits (the crapto1 ``lfsr_recovery32`` method, vectorised).

The filter reads only the odd half of the state, so even- and odd-numbered keystream bits each constrain one
half. Both halves are grown bit by bit from all 2^20 filter inputs, keeping only those that reproduce their
keystream bits; the bits each half contributes to the other's feedback are recorded, and the halves are
joined where those contributions agree. About 2^16 candidate states survive; rolling each back through what
was fed to the cipher (``cardsim.crypto1.Crypto1.rollback_word``) yields candidate keys.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from cardsim.crypto1 import LF_POLY_EVEN, LF_POLY_ODD, Crypto1, bebit, filter20, parity

U64 = NDArray[np.uint64]
_ALL20 = np.arange(1 << 20, dtype=np.uint64)
_FILTER20 = filter20(_ALL20).astype(np.uint8)  # every 20-bit filter input, computed once per process


def _extend(values: U64, bit: int) -> U64:
    """Append one state bit, keeping the values whose filter output can equal the keystream ``bit``."""
    shifted = values << np.uint64(1)
    f0 = _FILTER20[shifted & np.uint64(0xFFFFF)]
    f1 = _FILTER20[(shifted | np.uint64(1)) & np.uint64(0xFFFFF)]
    replace = f0 != f1  # exactly one choice of the new bit fits
    both = (f0 == f1) & (f0 == bit)  # both choices fit
    return np.concatenate(
        [shifted[replace] | (f0[replace] ^ bit).astype(np.uint64), shifted[both], shifted[both] | np.uint64(1)]
    )


def _extend_tracked(values: U64, keys: U64, bit: int, mask1: int, mask2: int, inp: int) -> tuple[U64, U64]:
    """``_extend`` that also appends two feedback-contribution bits per value to ``keys``."""
    shifted = values << np.uint64(1)
    f0 = _FILTER20[shifted & np.uint64(0xFFFFF)]
    f1 = _FILTER20[(shifted | np.uint64(1)) & np.uint64(0xFFFFF)]
    replace = f0 != f1
    both = (f0 == f1) & (f0 == bit)
    new = np.concatenate(
        [shifted[replace] | (f0[replace] ^ bit).astype(np.uint64), shifted[both], shifted[both] | np.uint64(1)]
    )
    old_keys = np.concatenate([keys[replace], keys[both], keys[both]])
    contribution = (parity(new & np.uint64(mask1)) << np.uint64(1) | parity(new & np.uint64(mask2))) ^ np.uint64(inp)
    return new & np.uint64(0xFFFFFF), old_keys << np.uint64(2) | contribution


def lfsr_recovery32(ks2: int, inp: int) -> Crypto1:
    """All cipher states that produce the 32 keystream bits ``ks2`` while being fed ``inp``.

    Returns the candidates as one array-valued Crypto1, positioned after those 32 clocks.
    """
    oks = eks = 0
    for i in range(31, -1, -2):
        oks = oks << 1 | bebit(ks2, i)
    for i in range(30, -1, -2):
        eks = eks << 1 | bebit(ks2, i)
    odd = _ALL20[(oks & 1) == _FILTER20]
    even = _ALL20[(eks & 1) == _FILTER20]
    for _ in range(4):
        oks >>= 1
        eks >>= 1
        odd = _extend(odd, oks & 1)
        even = _extend(even, eks & 1)
    inp = ((inp >> 16) & 0xFF | (inp << 16) & 0xFFFFFFFF | inp & 0xFF00) << 1 & 0xFFFFFFFF
    odd_keys = np.zeros(len(odd), dtype=np.uint64)
    even_keys = np.zeros(len(even), dtype=np.uint64)
    for _ in range(11):
        oks >>= 1
        eks >>= 1
        inp >>= 2
        odd, odd_keys = _extend_tracked(odd, odd_keys, oks & 1, LF_POLY_EVEN << 1 | 1, LF_POLY_ODD << 1, 0)
        even, even_keys = _extend_tracked(even, even_keys, eks & 1, LF_POLY_ODD, LF_POLY_EVEN << 1 | 1, inp & 3)
    # Join the halves whose feedback contributions agree at every step.
    order = np.argsort(even_keys, kind="stable")
    even, even_keys = even[order], even_keys[order]
    lo = np.searchsorted(even_keys, odd_keys, side="left")
    hi = np.searchsorted(even_keys, odd_keys, side="right")
    counts = hi - lo
    odd_idx = np.repeat(np.arange(len(odd)), counts)
    starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
    even_idx = starts + np.arange(counts.sum())
    o = odd[odd_idx]
    e = even[even_idx]
    e = (e << np.uint64(1)) ^ parity(e & np.uint64(LF_POLY_EVEN)) ^ np.uint64(1 if inp & 4 else 0)
    return Crypto1(odd=e ^ parity(o & np.uint64(LF_POLY_ODD)), even=o)
