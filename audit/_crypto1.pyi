"""Crypto-1 state recovery and mfkey key searches in C (audit/_crypto1.c). Every word is 0..2**32-1."""

def recover_states(ks2: int, fed: int, /) -> tuple[bytes, bytes]:
    """Every state giving the keystream ``ks2`` while fed ``fed``, after those clocks: odd and even halves as
    native uint32 arrays."""

def mfkey32_keys(fed0: int, nr0_enc: int, ks2_0: int, fed1: int, nr1_enc: int, ks2_1: int, /) -> list[int]:
    """The keys (sorted, distinct) that, fed ``uid^nT`` and ``{nR}`` of each of two authentications, give the
    keystream of its ``{aR}``."""

def mfkey64_keys(fed: int, nr_enc: int, ks2: int, ks3: int, /) -> list[int]:
    """The keys (sorted, distinct) that, fed ``uid^nT`` and ``{nR}``, give the keystreams of ``{aR}`` and
    ``{aT}``."""

def darkside_keys(fed: int, nr_enc: int, ar_enc: int, naks: bytes, parities: bytes, /) -> list[int]:
    """The keys (sorted, distinct) that, fed ``uid^nT``, explain a darkside collection: for each of the 8 values c
    of {nR}'s last 3 bits (``nr_enc | c << 5``, then ``ar_enc``), the card's NAK keystream ``naks[c]`` (bit i:
    clock 64+i) and the 8 parity bits it accepted ``parities[c]`` (bit j: byte j)."""
