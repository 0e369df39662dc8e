"""Crypto-1, the MIFARE Classic cipher (spec card.md, part C), and the tag nonce PRNG.

``cryptography`` has no Crypto-1, so it lives here, once, for the card, the reader and the attacks. The
state is kept as crapto1 keeps it (two 24-bit halves: the odd- and even-indexed LFSR bits), which makes
the filter a function of one half and lets the attacks in ``audit`` split the state. Every operation works
on Python ints and, unchanged, on NumPy ``uint64`` arrays of states (the attacks step thousands at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Truth tables of the spec: fa and fb on 4 bits (index 8·y0+4·y1+2·y2+y3), fc on 5 bits.
FA = 0xD938
FB = 0xF22C
FC = 0xEC57E80A
# Feedback taps x0,5,9,10,12,14,15,17,19,24,25,27,29,35,39,41,42,43 as masks over the odd/even halves.
LF_POLY_ODD = 0x29CE5C
LF_POLY_EVEN = 0x870804
MASK24 = 0xFFFFFF

Word = Any  # an int, or a NumPy uint64 array of them


def parity(x: Word) -> Word:
    """Even parity (XOR of all bits) of an int or of each element of an array."""
    if isinstance(x, int):
        return x.bit_count() & 1
    import numpy as np  # only for arrays: the card and the reader, on ints, start without NumPy

    if isinstance(x, np.ndarray):
        return (np.bitwise_count(x) & 1).astype(x.dtype)
    return int(x).bit_count() & 1


def filter20(x: Word) -> Word:
    """The non-linear filter over the 20 low bits of the odd half: fc(fb, fa, fb, fb, fa) by nibble."""
    f = (
        ((FB << 4) >> (x & 0xF)) & 16
        | ((FA << 3) >> ((x >> 4) & 0xF)) & 8
        | ((FB << 2) >> ((x >> 8) & 0xF)) & 4
        | ((FB << 1) >> ((x >> 12) & 0xF)) & 2
        | (FA >> ((x >> 16) & 0xF)) & 1
    )
    return (FC >> f) & 1


def bebit(x: int, n: int) -> int:
    """Bit n of a 32-bit word in the order the cipher consumes it: bytes first to last, LSB first."""
    return (x >> (n ^ 24)) & 1


@dataclass
class Crypto1:
    """A Crypto-1 LFSR state (odd and even halves). Ints for one cipher, arrays for many."""

    odd: Word
    even: Word

    @classmethod
    def from_key(cls, key: int) -> Crypto1:
        """Load a 48-bit key: byte 0 first, each byte least-significant bit first."""
        odd = even = 0
        for i in range(47, 0, -2):
            odd = odd << 1 | (key >> ((i - 1) ^ 7)) & 1
            even = even << 1 | (key >> (i ^ 7)) & 1
        return cls(odd, even)

    def copy(self) -> Crypto1:
        """An independent copy of this state."""
        return Crypto1(self.odd, self.even) if isinstance(self.odd, int) else Crypto1(self.odd.copy(), self.even.copy())

    def peek(self) -> Word:
        """The next keystream bit, without clocking (it encrypts parity bits)."""
        return filter20(self.odd)

    def bit(self, inp: Word = 0, encrypted: bool = False) -> Word:
        """Clock once, feeding ``inp`` (decrypted first when ``encrypted``); returns the keystream bit."""
        ret = filter20(self.odd)
        feed = (ret if encrypted else 0) ^ inp ^ (LF_POLY_ODD & self.odd) ^ (LF_POLY_EVEN & self.even)
        self.odd, self.even = ((self.even << 1) | parity(feed)) & MASK24, self.odd
        return ret

    def byte(self, inp: int = 0, encrypted: bool = False) -> Word:
        """Clock 8 times, feeding a byte LSB first; returns 8 keystream bits (LSB first)."""
        ret: Word = 0
        for i in range(8):
            ret = ret | self.bit((inp >> i) & 1, encrypted) << i
        return ret

    def word(self, inp: int = 0, encrypted: bool = False) -> Word:
        """Clock 32 times, feeding a 32-bit word in cipher order; returns the 32 keystream bits."""
        ret: Word = 0
        for i in range(32):
            ret = ret | self.bit(bebit(inp, i), encrypted) << (i ^ 24)
        return ret

    def rollback_bit(self, inp: Word = 0, encrypted: bool = False) -> Word:
        """Undo one clock (the inverse of ``bit``); returns the keystream bit of that clock."""
        odd = self.odd & MASK24
        even = self.even
        self.odd, self.even = even, odd
        out = self.even & 1
        self.even = self.even >> 1
        out = out ^ (LF_POLY_EVEN & self.even) ^ (LF_POLY_ODD & self.odd) ^ inp
        ret = filter20(self.odd)
        if encrypted:
            out = out ^ ret
        self.even = self.even | parity(out) << 23
        return ret

    def rollback_word(self, inp: int = 0, encrypted: bool = False) -> Word:
        """Undo 32 clocks that consumed the word ``inp``."""
        ret: Word = 0
        for i in range(31, -1, -1):
            ret = ret | self.rollback_bit(bebit(inp, i), encrypted) << (i ^ 24)
        return ret

    def lfsr(self) -> Word:
        """The 48-bit LFSR content in key order (after ``from_key``, the key itself)."""
        out: Word = 0
        for i in range(23, -1, -1):
            out = out << 1 | (self.odd >> (i ^ 3)) & 1
            out = out << 1 | (self.even >> (i ^ 3)) & 1
        return out


def _swap_endian(x: int) -> int:
    return int.from_bytes(x.to_bytes(4, "big"), "little")


def prng_successor(nonce: int, n: int) -> int:
    """suc^n of a tag nonce: the 16-bit LFSR x^16+x^14+x^13+x^11+1 clocked n times over 32 bits."""
    x = _swap_endian(nonce & 0xFFFFFFFF)
    for _ in range(n):
        x = (x >> 1) | (((x >> 16) ^ (x >> 18) ^ (x >> 19) ^ (x >> 21)) & 1) << 31
    return _swap_endian(x)


def is_weak_nonce(nonce: int) -> bool:
    """True when the low 16 bits are suc^16 of the high 16 bits: the nonce came from the 16-bit LFSR."""
    x = (nonce >> 16) & 0xFFFF
    x = (x & 0xFF) << 8 | x >> 8
    for _ in range(16):
        x = x >> 1 | ((x ^ x >> 2 ^ x >> 3 ^ x >> 5) & 1) << 15
    return ((x & 0xFF) << 8 | x >> 8) == nonce & 0xFFFF


def odd_parity(byte: int) -> int:
    """ISO 14443-A parity bit of a byte (odd parity)."""
    return 1 ^ (byte.bit_count() & 1)


def encrypt_bytes(state: Crypto1, plain: bytes, feed: bool = False) -> tuple[bytes, list[int]]:
    """Encrypt bytes and their parity bits; ``feed`` also feeds the plaintext into the LFSR (the reader's nR)."""
    out = bytearray()
    parities = []
    for b in plain:
        ks = state.byte(b if feed else 0)
        out.append(b ^ ks)
        parities.append(odd_parity(b) ^ int(state.peek()))
    return bytes(out), parities


def decrypt_bytes(state: Crypto1, cipher: bytes, parities: list[int], feed: bool = False) -> tuple[bytes, bool]:
    """Decrypt bytes; returns them and whether every encrypted parity bit was right."""
    out = bytearray()
    ok = len(parities) == len(cipher)
    for i, c in enumerate(cipher):
        b = c ^ (state.byte(c, encrypted=True) if feed else state.byte())
        out.append(b)
        if ok and parities[i] != odd_parity(b) ^ int(state.peek()):
            ok = False
    return bytes(out), ok


def auth_trace(key: int, uid: int, nt: int, nr: int) -> tuple[int, int, int]:
    """{nR}, {aR}, {aT} of a three-pass authentication with ``key``, as a sniffer would record them."""
    s = Crypto1.from_key(key)
    s.word(uid ^ nt)
    nr_enc = nr ^ s.word(nr)
    ar_enc = prng_successor(nt, 64) ^ s.word()
    at_enc = prng_successor(nt, 96) ^ s.word()
    return nr_enc, int(ar_enc), int(at_enc)
