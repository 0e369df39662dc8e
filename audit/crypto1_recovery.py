"""Crypto-1 state recovery from 32 keystream bits (the crapto1 ``lfsr_recovery32`` method), as NumPy arrays.

The filter reads only the odd half of the state, so even- and odd-numbered keystream bits each constrain one
half. Both halves are grown bit by bit from all 2^20 filter inputs, keeping only those that reproduce their
keystream bits; the bits each half contributes to the other's feedback are recorded, and the halves are
joined where those contributions agree. About 2^16 candidate states survive; rolling each back through what
was fed to the cipher (``cardsim.crypto1.Crypto1.rollback_word``) yields candidate keys.

The search itself is C (``audit._crypto1``, audit/_crypto1.c): ~10^7 filter evaluations over lists of 2^19
half states, which NumPy did in 0.7 s and C does in 0.07 s.
"""

from __future__ import annotations

import numpy as np

from audit._crypto1 import recover_states
from cardsim.crypto1 import Crypto1


def lfsr_recovery32(ks2: int, inp: int) -> Crypto1:
    """All cipher states that produce the 32 keystream bits ``ks2`` while being fed ``inp``.

    Returns the candidates as one array-valued Crypto1 (``uint64`` arrays), positioned after those 32 clocks.
    """
    odd, even = recover_states(ks2, inp)
    return Crypto1(
        np.frombuffer(odd, dtype=np.uint32).astype(np.uint64), np.frombuffer(even, dtype=np.uint32).astype(np.uint64)
    )
