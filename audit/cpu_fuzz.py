"""Robustness of a CPU purse card: a bounded, seeded APDU fuzz as an audit stage (CPU-ROBUSTNESS).

What a card lab's robustness test does: read everything the card shows without keys, send malformed commands
(wrong Lc or Le, unknown CLA or INS, oversize data, truncated data, P1/P2 out of range, commands out of order),
check that each is answered with an ISO 7816-4 status word, and read everything again. A robust card answers
every one with an error and changes nothing. Nothing shorter than a 4-byte header is sent: it is no APDU, a
PC/SC stack refuses an empty one, and vpcd takes a 1-byte one for a control code and never answers (the card
model's answer to any bytes is tests/test_fuzz.py's business).

The fuzz spends no money and cannot lock the card: it never opens a session (no well-formed INITIALIZE or GET
CHALLENGE is among its commands, and the state read after each one ends with a READ RECORD, which closes any
session the card opened), so the MAC-bearing DEBIT, CREDIT, APPLICATION BLOCK and secure-messaging UPDATE BINARY
it sends all arrive without one and are refused (6985, or a length error) before any MAC is compared: no MAC
failure is counted toward the lockout. The card's state is read with INITIALIZE FOR PURCHASE and FOR LOAD of 0 fen,
which commit nothing. It sends no plain UPDATE BINARY: on a card that takes one it would write (the plain-write
probe, audit.cpu_files, tries that and puts the bytes back).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Final

from cardsim import commands
from cardsim.apdu import Command
from cardsim.commands import CLA_ISO, CLA_ISO_SM, CLA_PURSE, Initialize, InitializeAnswer, InitKind
from cardsim.purse import AID, LOG_RECORDS, SFI_HOLDER, SFI_INTEROP, SFI_LOG, SFI_PUBLIC, SFI_TRIPS, TRIP_RECORDS
from terminals.reader import CardGone, Reader

DEFAULT_BUDGET: Final = 200
"""Fuzz commands per card: the 122 structured cases, then seeded random ones. The reads around them make about
1,300 APDUs in all: 0.03 s on a simulated card, about a minute through pcscd and vpcd."""
DEFAULT_SEED: Final = 22
FUZZ_TERMINAL: Final = bytes.fromhex("A0D1000000F2")  # the terminal number of the state-reading INITIALIZEs
HEADER_SIZE: Final = 4
CLA_SECURE: Final = 0x84
SHOWN_BYTES: Final = 24
OUT_OF_RANGE: Final = 0xFF

Snapshot = dict[str, str]
"""What the card shows without keys: item -> its value as text (an answer's hex, or a decoded field)."""


@dataclass(frozen=True)
class Template:
    """A purse command of spec card.md to malform: its header, the data length and Le it expects."""

    name: str
    header: bytes
    lc: int
    le: int | None
    session: bool = False  # refused (6985) unless an INITIALIZE or GET CHALLENGE came just before


TEMPLATES: Final = (
    Template("SELECT", bytes([CLA_ISO, 0xA4, 0x04, 0x00]), len(AID), None),
    Template("READ BINARY", bytes([CLA_ISO, 0xB0, 0x80 | SFI_PUBLIC, 0x00]), 0, 0),
    Template("READ RECORD", bytes([CLA_ISO, 0xB2, 0x01, SFI_LOG << 3 | 4]), 0, 0),
    Template("GET CHALLENGE", bytes([CLA_ISO, 0x84, 0x00, 0x00]), 0, 8),
    Template("GET BALANCE", bytes([CLA_PURSE, 0x5C, 0x00, 0x02]), 0, 4),
    Template("INITIALIZE FOR PURCHASE", bytes([CLA_PURSE, 0x50, InitKind.PURCHASE, 0x02]), 11, 15),
    Template("INITIALIZE FOR LOAD", bytes([CLA_PURSE, 0x50, InitKind.LOAD, 0x02]), 11, 16),
    Template("DEBIT FOR PURCHASE", bytes([CLA_PURSE, 0x54, 0x01, 0x00]), 15, 8, session=True),
    Template("CREDIT FOR LOAD", bytes([CLA_PURSE, 0x52, 0x00, 0x00]), 11, 4, session=True),
    Template("UPDATE CAPP DATA CACHE", bytes([CLA_PURSE, 0xDC, 0x00, SFI_TRIPS << 3]), 48, None, session=True),
    Template("GET TRANSACTION PROVE", bytes([CLA_PURSE, 0x5A, 0x00, 0x06]), 2, 8),
    Template("APPLICATION BLOCK", bytes([CLA_SECURE, 0x1E, 0x00, 0x00]), 4, None, session=True),
    # one byte of SFI 16 and a MAC
    Template("UPDATE BINARY (secure messaging)", bytes([CLA_ISO_SM, 0xD6, 0x80 | SFI_HOLDER, 0x00]), 5, None, True),
)
"""Data is all zeros: key index 0 makes even a well-formed INITIALIZE a refusal (9403), never a session."""


@dataclass(frozen=True)
class FuzzCase:
    """One malformed command: what it is, and its bytes."""

    label: str
    apdu: bytes


@dataclass
class Robustness:
    """What the fuzz found on one card: ``evidence`` is empty for a robust card."""

    sent: int = 0  # fuzz commands sent (the state reads around them not counted)
    evidence: list[str] = field(default_factory=list)


def is_status_word(answer: bytes) -> bool:
    """True when ``answer`` ends with an ISO 7816-4 status word: SW1 in 61..6F or 90..9F."""
    return len(answer) >= 2 and (0x61 <= answer[-2] <= 0x6F or 0x90 <= answer[-2] <= 0x9F)


def _apdu(header: bytes, data: bytes = b"", le: int | None = None, lc: int | None = None) -> bytes:
    """Header, Lc (``lc`` when it must disagree with the data), data and Le, with no checks (unlike Command)."""
    body = bytes([len(data) if lc is None else lc]) + data if data or lc is not None else b""
    return header + body + (b"" if le is None else bytes([le]))


def _malformed(t: Template) -> Iterator[FuzzCase]:
    """Every way this command is malformed, and (for one that needs a session) the command out of order."""
    data = bytes(t.lc)
    wrong_le = 1 if t.le is None else t.le + 1
    cla, ins, p1, p2 = t.header
    yield FuzzCase(f"{t.name} with Lc one long", _apdu(t.header, bytes(t.lc + 1), t.le))
    if t.lc > 1:
        yield FuzzCase(f"{t.name} with Lc one short", _apdu(t.header, data[:-1], t.le))
        yield FuzzCase(f"{t.name} with Lc {t.lc} but {t.lc - 1} data bytes", _apdu(t.header, data[:-1], lc=t.lc))
    if t.lc:
        yield FuzzCase(f"{t.name} without its data", _apdu(t.header, le=t.le))
    else:
        yield FuzzCase(f"{t.name} with Lc 5 but 2 data bytes", _apdu(t.header, bytes(2), lc=5))
    yield FuzzCase(f"{t.name} with 255 data bytes", _apdu(t.header, bytes(255), t.le))
    yield FuzzCase(f"{t.name} with Le {wrong_le:02X}", _apdu(t.header, data, wrong_le))
    yield FuzzCase(f"{t.name} with P1 {OUT_OF_RANGE:02X}", _apdu(bytes([cla, ins, OUT_OF_RANGE, p2]), data, t.le))
    yield FuzzCase(f"{t.name} with P2 {OUT_OF_RANGE:02X}", _apdu(bytes([cla, ins, p1, OUT_OF_RANGE]), data, t.le))
    extended = b"\x00" + t.lc.to_bytes(2) + data if t.lc else b"\x00\x00\x00"
    yield FuzzCase(f"{t.name} in extended length", t.header + extended)
    if t.session:
        yield FuzzCase(f"{t.name} out of order (no session)", _apdu(t.header, data, t.le))


def _edge_cases() -> Iterator[FuzzCase]:
    """Well-formed commands that name what is not there."""
    yield FuzzCase("READ RECORD 0", commands.read_record(SFI_LOG, 0))
    yield FuzzCase("READ RECORD FF", commands.read_record(SFI_LOG, 0xFF))
    yield FuzzCase("READ RECORD of an unknown SFI", commands.read_record(0x1F, 1))
    yield FuzzCase("READ BINARY of an unknown SFI", commands.read_binary(0x01))
    yield FuzzCase("READ BINARY past the end", Command(CLA_ISO, 0xB0, 0x80 | SFI_PUBLIC, 0x1E, le=0).to_bytes())
    yield FuzzCase("GET TRANSACTION PROVE of counter FFFF", commands.get_transaction_prove(0x06, 0xFFFF))
    yield FuzzCase("GET TRANSACTION PROVE of type 02", commands.get_transaction_prove(0x02, 0))
    yield FuzzCase("SELECT of an unknown AID", commands.select(bytes(len(AID))))


def _random_cases(rng: random.Random) -> Iterator[FuzzCase]:
    """Unknown INS in the card's classes, unknown classes, then endless random APDUs (some on real headers)."""
    # the file writes the card knows are no unknown INS: a plain UPDATE BINARY or RECORD (00 D6, 00 DC) would write
    # on a card that takes one, and UPDATE RECORD with a MAC (04 DC) is a known command the card refuses
    known = {(t.header[0], t.header[1]) for t in TEMPLATES} | {(CLA_ISO, 0xD6), (CLA_ISO, 0xDC), (CLA_ISO_SM, 0xDC)}
    classes = (CLA_ISO, CLA_PURSE, CLA_SECURE, CLA_ISO_SM)
    for cla in classes:
        for ins in rng.sample([i for i in range(256) if (cla, i) not in known], 3):
            yield FuzzCase(f"unknown INS {cla:02X} {ins:02X}", bytes([cla, ins, 0x00, 0x00]))
    for cla in rng.sample([c for c in range(256) if c not in classes], 4):
        yield FuzzCase(f"unknown CLA {cla:02X}", bytes([cla, 0xB0, 0x95, 0x00, 0x00]))
    while True:
        if rng.random() < 0.5:
            t = rng.choice(TEMPLATES)
            tail = rng.randbytes(rng.randrange(1, 40))
            yield FuzzCase(f"random {t.name}", t.header[:2] + rng.randbytes(2) + tail)
        else:
            yield FuzzCase("random bytes", rng.randbytes(rng.randrange(HEADER_SIZE, 40)))


def fuzz_cases(budget: int = DEFAULT_BUDGET, seed: int = DEFAULT_SEED) -> list[FuzzCase]:
    """The first ``budget`` commands of the fuzz: every malformed form of every purse command and the edge cases
    first, then seeded random ones; the same list for the same seed."""
    structured = [case for t in TEMPLATES for case in _malformed(t)] + list(_edge_cases())
    cases = structured[:budget]
    random_cases = _random_cases(random.Random(seed))
    cases += [next(random_cases) for _ in range(budget - len(cases))]
    return cases


def _hex(answer: bytes) -> str:
    return answer.hex().upper() or "(empty)"


def _shown(case: FuzzCase) -> str:
    """The command as evidence: its bytes (the first 24 of a long one) and what it is."""
    apdu = case.apdu
    cut = f"...({len(apdu)} bytes)" if len(apdu) > SHOWN_BYTES else ""
    return f"> {apdu[:SHOWN_BYTES].hex().upper()}{cut} ({case.label})"


def _initialize(card: Reader, kind: InitKind) -> Snapshot:
    """Balance, counter, key version and algorithm from an INITIALIZE of 0 fen (the random and MAC1 left out)."""
    command = Initialize(kind, 0, FUZZ_TERMINAL)
    answer = card.transmit(command.to_apdu())
    load = kind is InitKind.LOAD
    if not answer.endswith(b"\x90\x00") or len(answer) != kind.answer_length + 2:
        return {f"INITIALIZE FOR {kind.name} answer": _hex(answer)}
    init = InitializeAnswer.from_bytes(answer[:-2], load)
    if load:
        return {"online counter": str(init.counter)}
    return {
        "balance": str(init.balance),
        "offline counter": str(init.counter),
        "key version": f"{init.key_version:02X}",
        "algorithm id": f"{init.algorithm_id:02X}",
    }


def _read(card: Reader, label: str, apdu: bytes) -> Snapshot:
    return {label: _hex(card.transmit(apdu))}


def _record(card: Reader, sfi: int, number: int) -> Snapshot:
    return _read(card, f"READ RECORD {number} of SFI {sfi:02X}", commands.read_record(sfi, number))


def watch(card: Reader) -> Snapshot:
    """The state a malformed command could plausibly touch, read after each one: SELECT (the FCI, locked or
    blocked), balance and both counters, the newest log and trip records. Leaves the purse selected and no
    session open (it ends with a READ RECORD)."""
    state = _read(card, "SELECT", commands.select(AID))
    state |= _initialize(card, InitKind.PURCHASE) | _initialize(card, InitKind.LOAD)
    return state | _record(card, SFI_LOG, 1) | _record(card, SFI_TRIPS, 1)


def snapshot(card: Reader) -> Snapshot:
    """Everything the card shows without keys, after a power-up: ``watch``, GET BALANCE, the public files, every
    log and trip record, and the proof of the last purchase (GET TRANSACTION PROVE)."""
    card.connect()
    state = watch(card) | _read(card, "GET BALANCE", commands.get_balance())
    for sfi in (SFI_PUBLIC, SFI_HOLDER, SFI_INTEROP):
        state |= _read(card, f"READ BINARY SFI {sfi:02X}", commands.read_binary(sfi))
    for sfi, records in ((SFI_LOG, LOG_RECORDS), (SFI_TRIPS, TRIP_RECORDS)):
        for number in range(2, records + 1):
            state |= _record(card, sfi, number)
    counter = state.get("offline counter", "")
    last = max(int(counter) - 1, 0) if counter.isdigit() else 0  # kept under the counter before the increment
    for txn_type in (0x06, 0x09):
        label = f"GET TRANSACTION PROVE {txn_type:02X} of the last purchase"
        state |= _read(card, label, commands.get_transaction_prove(txn_type, last))
    return state


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    """``item: old -> new`` for every item that differs (an item only one side read shows as 'not read')."""
    items = list(before) + [k for k in after if k not in before]
    return [
        f"{k}: {before.get(k, 'not read')} -> {after.get(k, 'not read')}"
        for k in items
        if before.get(k) != after.get(k)
    ]


def robustness_probe(card: Reader, *, budget: int = DEFAULT_BUDGET, seed: int = DEFAULT_SEED) -> Robustness:
    """Send ``budget`` malformed commands (``fuzz_cases``), reading the state after each; the evidence names each
    command answered without a status word or not at all, each command after which the state changed and what
    changed, and what changed over the whole run that the reads after each command do not cover. CardGone when
    the card cannot be powered up again after going silent (it left)."""
    result = Robustness()
    before = snapshot(card)
    seen = watch(card)
    for case in fuzz_cases(budget, seed):
        shown = _shown(case)
        result.sent += 1
        try:
            answer = card.transmit(case.apdu)
        except CardGone:
            result.evidence.append(f"{shown}  < no answer: the card went silent")
            card.connect()
        else:
            if not is_status_word(answer):
                result.evidence.append(f"{shown}  < {_hex(answer)}: no ISO status word")
            shown += f"  < {_hex(answer)}"
        now = watch(card)
        result.evidence += [f"{shown}: {change}" for change in changes(seen, now)]
        seen = now
    after = snapshot(card)
    unexplained = changes(before | seen, after)
    result.evidence += [f"after {result.sent} fuzz commands: {change}" for change in unexplained]
    return result
