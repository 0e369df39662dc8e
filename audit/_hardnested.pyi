"""The hardnested attack's hot loops in C (audit/_hardnested.c)."""

def half_sums() -> tuple[bytes, bytes]:
    """Sum-property counts per 20-bit pattern (2^20 bytes each): p of the odd half, q of the even half, so that
    Sum(a0) = p(16 - q) + (16 - p)q."""

def brute_force(odd: bytes, even: bytes, fed: bytes, targets: bytes, threads: int, /) -> list[int]:
    """Every initial state of the odd x even lists (native uint32 arrays) that explains all nonces (``fed``: uid ^
    {nT} as native uint32, ``targets``: their a bits, one byte each), as odd << 24 | even; on ``threads``
    threads, without the GIL."""

def brute_force8(
    odd: bytes,
    even: bytes,
    fed8: bytes,
    targets8: bytes,
    fed: bytes,
    targets: bytes,
    threads: int,
    bitsliced: bool = True,
    /,
) -> list[int]:
    """The same over states *after the first byte B* (odd x even): each is checked against bytes 1..3 of the
    nonces of B (``fed8``: uid ^ {nT}, all starting with B; ``targets8``: their a bits), then rolled back over B;
    the initial states that explain all of ``fed`` are returned as odd << 24 | even. Bitsliced (256 states a
    vector, AVX2 where the CPU has it) unless ``bitsliced`` is false or the even list has fewer than 64."""
