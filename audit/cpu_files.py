"""Protection of a CPU purse card's public files: the plain-write probe (CPU-UNPROTECTED-FILE).

The public files hold what terminals grant discounts and acceptance on: the expiry date (SFI 15, bytes 24-27),
the card class in the holder file (SFI 16, byte 0) and in the interop file (SFI 17, byte 10; 1 normal,
2 student, 3 elderly). A genuine card writes them only with secure messaging (a MAC with the issuer's maintenance
key, docs/card-choices.md) and refuses a plain UPDATE BINARY with 6982. The probe tries exactly that: it rewrites
the card class to student and the expiry to 2099, without a MAC, reads each file back, and puts the original
bytes back with the same plain write, so that the audited card leaves with its own files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from cardsim import commands
from cardsim.apdu import SW, split_response
from cardsim.purse import SFI_HOLDER, SFI_INTEROP, SFI_PUBLIC
from terminals.flows import select_purse
from terminals.reader import Reader

STUDENT: Final = b"\x02"
ELDERLY: Final = b"\x03"


@dataclass(frozen=True)
class Target:
    """Bytes of a public file the probe forges: where they sit, what they mean, and the forged values (the second
    for a card that already holds the first)."""

    sfi: int
    offset: int
    what: str
    forged: tuple[bytes, bytes]

    def value_for(self, original: bytes) -> bytes:
        """The forged bytes that differ from ``original``."""
        return self.forged[0] if self.forged[0] != original else self.forged[1]


TARGETS: Final = (
    Target(SFI_PUBLIC, 24, "expiry date", (bytes.fromhex("20991231"), bytes.fromhex("20981231"))),
    Target(SFI_HOLDER, 0, "card class", (STUDENT, ELDERLY)),
    Target(SFI_INTEROP, 10, "card class", (STUDENT, ELDERLY)),
)


@dataclass
class PlainWrites:
    """What the probe found: the files a plain write changed, and the lines that prove it (empty: protected)."""

    written: list[str] = field(default_factory=list)  # "SFI 16 card class", one per forged target
    evidence: list[str] = field(default_factory=list)
    restored: bool = True
    skipped: list[str] = field(default_factory=list)  # targets that could not be tried, and why


def _read(card: Reader, sfi: int) -> tuple[bytes, int]:
    """The whole binary file ``sfi`` and the status word."""
    return split_response(card.transmit(commands.read_binary(sfi)))


def _write(card: Reader, sfi: int, offset: int, data: bytes) -> int:
    """A plain UPDATE BINARY (no MAC); the status word."""
    return split_response(card.transmit(commands.update_binary(sfi, offset, data)))[1]


def plain_write_probe(card: Reader) -> PlainWrites:
    """Power up, SELECT the purse, and for each target: read the file, write the forged bytes without a MAC, read
    it back; when the file changed, write the original bytes back the same way and check them. A read back the
    card does not answer with 9000 proves nothing: the target is listed as skipped. TransactionError
    when the purse cannot be selected, CardGone when the card leaves."""
    result = PlainWrites()
    card.connect()
    select_purse(card)
    for t in TARGETS:
        name = f"SFI {t.sfi:02X} {t.what}"
        content, sw = _read(card, t.sfi)
        end = t.offset + len(t.forged[0])
        if sw != SW.OK or len(content) < end:
            result.skipped.append(f"{name}: READ BINARY answered {sw:04X} with {len(content)} bytes")
            continue
        original = content[t.offset : end]
        forged = t.value_for(original)
        sw = _write(card, t.sfi, t.offset, forged)
        after, read_sw = _read(card, t.sfi)
        if read_sw != SW.OK:  # a failed read says nothing of the file: not taken for a forged one
            line = f"{name}: plain UPDATE BINARY answered {sw:04X}, the read back {read_sw:04X} ({len(after)} bytes)"
            if sw == SW.OK:  # it may have been written: the original bytes go back all the same
                line += f"; the original bytes written back ({_write(card, t.sfi, t.offset, original):04X})"
            result.skipped.append(line)
            continue
        if after == content:
            continue  # refused (a genuine card: 6982), or accepted and not written: nothing to put back
        result.written.append(name)
        result.evidence.append(
            f"plain UPDATE BINARY of {name} (offset {t.offset}) {original.hex().upper()} -> {forged.hex().upper()}"
            f" answered {sw:04X}, no MAC: the file now reads {after.hex().upper()}"
        )
        restore_sw = _write(card, t.sfi, t.offset, original)
        again, _ = _read(card, t.sfi)
        if again == content:
            result.evidence.append(
                f"{name} put back with a plain write ({restore_sw:04X}): the original bytes read again"
            )
        else:
            result.restored = False
            result.evidence.append(
                f"{name} NOT restored: the write back answered {restore_sw:04X}, the file reads {again.hex().upper()},"
                f" originally {content.hex().upper()}"
            )
    return result
