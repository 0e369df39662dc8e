"""Chip audit of one MIFARE Classic card through its radio interface only (spec audit.md, the M1-* findings).

The order matters: the nonce class and backdoors first (no key needed), then the default-key dictionary; with
one key known and a weak PRNG, the nested attack recovers the purse sector's keys (or every sector's); the
known keys then open the trailers (key B readable? access bits consistent?) and the purse value blocks.

What runs depends on the reader: the nonce, backdoor and nested checks need raw frames (the in-process card,
a PN532); a PC/SC Part 3 reader offers only authenticate/read/write, so they are listed as skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from audit import m1_attacks as attacks
from audit.autopwn import ATTACK_RULES, DICTIONARY, REUSED, Autopwn, autopwn
from audit.chip_makers import Maker, m1_maker, read_block0
from audit.findings import Finding, finding
from cardsim.files import JSONValue
from cardsim.m1_issue import ISSUER_BLOCK, PURSE_SECTOR
from cardsim.mifare import decode_access, key_b_readable, parse_value_block
from terminals.m1 import BACKUP_BLOCK, PURSE_BLOCK, FrameSlot, M1Chip, M1Error, M1Session, M1Slot

NONCES: Final = 8
KEY_NAMES: Final = {0x60: "A", 0x61: "B"}
Slot = tuple[int, int]  # (sector, 0x60 key A | 0x61 key B)
# The checks that need raw frames (nonces, short frames, auth command 64, nested authentication).
RAW_FRAME_CHECKS: Final = (
    "PRNG class (M1-WEAK-PRNG, M1-STATIC-NONCE)",
    "Gen1a backdoor 40/43 (M1-MAGIC)",
    "vendor backdoor key, auth 64 (M1-BACKDOOR-KEY)",
    "nested key recovery (M1-KEY-RECOVERED)",
)


@dataclass
class M1Audit:
    """Everything the audit learned about one M1 card; ``keys`` holds every key known, ``recovered`` those
    an attack found (not in the public dictionary)."""

    uid: str
    city: str = ""  # from the issuer block, once a sector-0 key is known
    prng: str = ""
    skipped: list[str] = field(default_factory=list)
    keys: dict[Slot, int] = field(default_factory=dict)
    recovered: dict[Slot, int] = field(default_factory=dict)
    maker: Maker | None = None  # from block 0 (a sector-0 key known), else SAK/ATQA
    attacks: dict[str, int] = field(default_factory=dict)  # keys each attack of the chain broke
    recovery_seconds: float = 0.0
    _found: list[tuple[str, list[str], dict[str, JSONValue]]] = field(default_factory=list)

    def add(self, rule: str, evidence: list[str], **details: JSONValue) -> None:
        """Record a finding about this card."""
        self._found.append((rule, evidence, details))

    @property
    def findings(self) -> list[Finding]:
        """The findings, each naming the card's city as far as the audit could read it."""
        return [finding(rule, self.uid, "m1", self.city, evidence, **d) for rule, evidence, d in self._found]


@dataclass(frozen=True)
class KeyRecovery:
    """``audit chips --recover-keys``: the whole chain on each M1 card, within ``max_seconds`` a card.
    ``fleet_keys`` (keys broken out of other cards of the fleet) are tried before any attack;
    ``hardnested_key_bits`` fixes part of each unknown key for hardnested (a test-size search, said in the
    report)."""

    max_seconds: float | None = None
    fleet_seconds: float | None = None  # a whole fleet's budget (audit_fleet cuts each card's to what is left)
    fleet_keys: tuple[int, ...] = ()
    hardnested_key_bits: tuple[int, int] | None = None


def _default_keys(result: M1Audit, found: dict[Slot, int]) -> None:
    if found:
        result.add(
            "M1-DEFAULT-KEY",
            [f"{_slot_name(slot)} = {key:012X}" for slot, key in sorted(found.items())],
            slots=len(found),
        )


def _take_autopwn(result: M1Audit, pwn: Autopwn) -> None:
    """The chain's keys into the audit: public-dictionary keys are M1-DEFAULT-KEY, each attack's keys its own
    finding (a key reused from another sector counts for the attack that broke it), stages that could not run
    go to the skipped lines."""
    result.keys.update({slot: found.key for slot, found in pwn.keys.items()})
    _default_keys(result, {slot: f.key for slot, f in pwn.keys.items() if f.how == DICTIONARY})
    for slot, found in sorted(pwn.keys.items()):
        source = found.source if found.how == REUSED else None
        first = found if source is None else pwn.keys[source]
        rule = ATTACK_RULES.get(first.how)
        if rule is None:
            continue  # dictionary, fleet keys, key B read from a trailer: not an attack's
        result.recovered[slot] = found.key
        result.attacks[first.how] = result.attacks.get(first.how, 0) + 1
        how = first.how if source is None else f"{first.how} (the key of sector {source[0]})"
        result.add(
            rule,
            [f"{_slot_name(slot)} = {found.key:012X}, by {how} in {found.seconds:.2f} s, checked by authenticating"],
            sector=slot[0],
            key_type=KEY_NAMES[slot[1]],
            key=f"{found.key:012X}",
            seconds=round(found.seconds, 2),
            attack=first.how,
        )
    result.recovery_seconds = sum(stage.seconds for stage in pwn.stages)
    for stage in pwn.stages:
        if stage.outcome != "ran":
            result.skipped.append(f"{result.uid}: key recovery, {stage.name} {stage.outcome}: {stage.why}")
    if pwn.missing:
        result.skipped.append(f"{result.uid}: key recovery left {len(pwn.missing)} of 32 keys unknown")


def _slot_name(slot: Slot) -> str:
    return f"sector {slot[0]} key {KEY_NAMES[slot[1]]}"


def _session(card: M1Slot, slot: Slot, key: int) -> M1Session:
    """A fresh session authenticated on the slot's sector."""
    reader = card.session()
    reader.authenticate(slot[0] * 4 + 3, key, slot[1])
    return reader


def _read_with_any_key(card: M1Slot, result: M1Audit, block: int) -> bytes | None:
    """The block read with any known key of its sector that may read it; None when none can."""
    for slot, key in sorted(result.keys.items()):
        if slot[0] != block // 4:
            continue
        try:
            return _session(card, slot, key).read_block(block)
        except M1Error:
            continue
    return None


def _recover(chip: M1Chip, uid: int, result: M1Audit, targets: list[Slot], progress: Callable[[str], None]) -> None:
    """Nested attack from the first known key on each target slot not yet known."""
    known_slot, known_key = sorted(result.keys.items())[0]
    known = (known_slot[0] * 4 + 3, known_key, known_slot[1])
    for target in targets:
        if target in result.keys:
            continue
        progress(f"M1 card {result.uid}: nested attack on {_slot_name(target)}")
        start = time.perf_counter()
        try:
            key = attacks.nested_attack(chip, uid, known, (target[0] * 4 + 3, target[1]))
        except (attacks.AttackFailed, M1Error) as err:
            result.skipped.append(f"{result.uid}: nested attack on {_slot_name(target)} failed: {err}")
            continue
        seconds = time.perf_counter() - start
        result.keys[target] = result.recovered[target] = key
        result.add(
            "M1-KEY-RECOVERED",
            [
                f"nested attack from {_slot_name(known_slot)} = {known_key:012X} (weak PRNG)",
                f"{_slot_name(target)} = {key:012X}, recovered in {seconds:.2f} s and checked by authenticating",
            ],
            sector=target[0],
            key_type=KEY_NAMES[target[1]],
            key=f"{key:012X}",
            seconds=round(seconds, 2),
        )


def _trailers(card: M1Slot, result: M1Audit) -> None:
    """Read each trailer whose key A is known: key B readable, or access bits that block the sector."""
    for (sector, key_type), key in sorted(result.keys.items()):
        if key_type != 0x60:
            continue
        block = sector * 4 + 3
        try:
            reader = _session(card, (sector, key_type), key)
        except M1Error as err:  # the key worked before: an authentication failing now tells nothing of the trailer
            result.skipped.append(f"{result.uid}: trailer of sector {sector} not read: {err}")
            continue
        try:
            trailer = reader.read_block(block)
        except M1Error as err:
            # Every consistent trailer lets key A read its access bits: a refusal means they are broken.
            result.add(
                "M1-ACCESS-BITS",
                [f"sector {sector}: key A {key:012X} authenticates but READ {block} is refused ({err})"],
                sector=sector,
            )
            continue
        if decode_access(trailer[6:9]) is None:
            result.add("M1-ACCESS-BITS", [f"sector {sector} trailer access bytes {trailer[6:10].hex().upper()}"])
        elif key_b_readable(trailer):
            result.add(
                "M1-KEYB-READABLE",
                [
                    f"sector {sector}: READ {block} with key A returns access {trailer[6:10].hex().upper()} "
                    f"and key B {trailer[10:16].hex().upper()}"
                ],
                sector=sector,
            )


def _value_blocks(card: M1Slot, result: M1Audit) -> None:
    for block in (PURSE_BLOCK, BACKUP_BLOCK):
        data = _read_with_any_key(card, result, block)
        if data is None:
            result.skipped.append(f"{result.uid}: value block {block}: no known key may read it")
        elif parse_value_block(data) is None:
            result.add(
                "M1-VALUE-BLOCK",
                [f"block {block} = {data.hex().upper()}: value/~value/value or address copies disagree"],
                block=block,
            )


def _block0_writable(card: M1Slot, result: M1Audit) -> str | None:
    """Rewrite block 0 with its own content under each known sector-0 key; the evidence if the card accepts."""
    for slot, key in sorted(result.keys.items()):
        if slot[0] != 0:
            continue
        try:
            reader = _session(card, slot, key)
            block0 = reader.read_block(0)
            reader.write_block(0, block0)
        except M1Error:
            continue
        return f"WRITE block 0 ({block0.hex().upper()}) accepted with {_slot_name(slot)}"
    return None


def audit_m1(
    chip: M1Chip,
    *,
    recover_all: bool = False,
    recovery: KeyRecovery | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> M1Audit:
    """Run every M1 check on a card that passes raw frames (in process, or on a PN532); ``recover_all`` runs
    the nested attack on every sector, not just the purse sector; ``recovery`` runs the whole key-recovery
    chain instead (``audit.autopwn``: darkside, nested, hardnested, static nested, backdoor)."""
    chip.power_on()
    uid, sak, atqa = chip.anticollision()
    # ATQA as readers print it (nfc-list: 00 04), most significant byte first; the card sends it LSB first
    identity = f"ATQA {atqa[::-1].hex().upper()} SAK {sak:02X}: MIFARE Classic 1K"
    result = _audit(FrameSlot(chip), chip, uid, identity, recover_all=recover_all, recovery=recovery, progress=progress)
    result.maker = m1_maker(read_block0(FrameSlot(chip), result.keys), sak, atqa)
    chip.power_on()
    return result


def audit_m1_blocks(
    card: M1Slot, reader: str, identity: str, *, progress: Callable[[str], None] = lambda _: None
) -> M1Audit:
    """The checks a block-level reader permits (a PC/SC Part 3 reader named ``reader``): dictionary, trailers,
    value blocks, block 0; the raw-frame checks are listed as skipped. ``identity`` says how the card was
    recognised (its ATR)."""
    result = _audit(card, None, card.uid(), identity, recover_all=False, recovery=None, progress=progress)
    block0 = read_block0(card, result.keys)  # no SAK/ATQA over Part 3: block 0 holds the card's copies
    result.maker = None if block0 is None else m1_maker(block0, block0[5], block0[6:8])
    result.skipped.append(
        f"{result.uid}: not checked on {reader} (it passes no raw frames; a PN532 does, --pn532): "
        + "; ".join(RAW_FRAME_CHECKS)
    )
    return result


def _audit(
    card: M1Slot,
    frames: M1Chip | None,
    uid_bytes: bytes,
    identity: str,
    *,
    recover_all: bool,
    recovery: KeyRecovery | None,
    progress: Callable[[str], None],
) -> M1Audit:
    uid = int.from_bytes(uid_bytes)
    result = M1Audit(uid_bytes.hex().upper())
    prng: attacks.PrngClass | None = None
    magic = False
    if frames is None:
        result.add("M1-CRYPTO1", [identity])
    else:
        nonces = attacks.collect_nonces(frames, NONCES)
        prng = attacks.classify_prng(nonces)
        result.prng = prng.value
        nonce_text = " ".join(f"{n:08X}" for n in nonces)
        result.add("M1-CRYPTO1", [identity, f"AUTH 60 03 answered plain nT {nonce_text}"])
        if prng is attacks.PrngClass.WEAK:
            result.add("M1-WEAK-PRNG", [f"{NONCES} tag nonces, all on the 16-bit LFSR: {nonce_text}"])
        elif prng is attacks.PrngClass.STATIC:
            result.add("M1-STATIC-NONCE", [f"{NONCES} authentications, the same nT every time: {nonce_text}"])
        progress(f"M1 card {result.uid}: backdoors, dictionary")
        magic = attacks.has_gen1a_backdoor(frames)
        if attacks.accepts_backdoor_key(frames):
            result.add("M1-BACKDOOR-KEY", ["AUTH 64 03 with the vendor key A396EFA4E24F succeeds"])
    if frames is not None and recovery is not None:
        pwn = autopwn(
            frames,
            max_seconds=recovery.max_seconds,
            fleet_keys=recovery.fleet_keys,
            hardnested_key_bits=recovery.hardnested_key_bits,
            progress=progress,
        )
        _take_autopwn(result, pwn)
    else:
        found = attacks.dictionary_attack(card)
        result.keys.update(found)
        _default_keys(result, found)
        if frames is not None and result.keys and prng is attacks.PrngClass.WEAK:
            targets = (
                [(s, t) for s in range(16) for t in (0x60, 0x61)]
                if recover_all
                else [(PURSE_SECTOR, 0x60), (PURSE_SECTOR, 0x61)]
            )
            _recover(frames, uid, result, targets, progress)
    if not result.keys:
        result.skipped.append(
            f"{result.uid}: no sector key known (none in the {len(attacks.DEFAULT_KEYS)}-key dictionary, "
            f"{result.prng or 'unknown'} PRNG): trailer and value-block checks not possible"
        )
    issuer = _read_with_any_key(card, result, ISSUER_BLOCK)
    if issuer is not None and issuer[:2].hex().isdigit():
        result.city = issuer[:2].hex()
    written = _block0_writable(card, result)
    if magic or written:
        evidence = ["7-bit 40 then 43 both acknowledged (Gen1a backdoor)"] if magic else []
        result.add("M1-MAGIC", evidence + ([written] if written else []))
    _trailers(card, result)
    if result.keys:
        _value_blocks(card, result)
    if frames is not None:
        frames.power_on()
    return result
