"""ISO 7816-4 short APDUs: parsing C-APDUs, building and splitting R-APDUs, and the spec's status words."""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

H = TypeVar("H")
F = TypeVar("F", bound=Callable[..., bytes])
_INSTRUCTION: Final = "apdu_instruction"


class SW(enum.IntEnum):
    """The status words of spec card.md, and two of ISO 7816-4 for file writes (which the spec does not list); the
    simulated cards answer no others (docs/card-choices.md)."""

    OK = 0x9000
    WRONG_LENGTH = 0x6700
    FILE_NOT_FOUND = 0x6A82
    RECORD_NOT_FOUND = 0x6A83
    COMMAND_INCOMPATIBLE_WITH_FILE = 0x6981  # ISO 7816-4, for UPDATE RECORD of a binary file and the reverse
    SECURITY_STATUS_NOT_SATISFIED = 0x6982  # ISO 7816-4, for a plain write of a file that needs secure messaging
    CONDITIONS_NOT_SATISFIED = 0x6985
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    MAC_INVALID = 0x9302
    INSUFFICIENT_BALANCE = 0x9401
    KEY_NOT_FOUND = 0x9403
    APPLICATION_LOCKED = 0x9303
    APPLICATION_BLOCKED = 0x6A81

    def describe(self) -> str:
        """Human wording, for error messages and `card show`."""
        return f"{self.value:04X} {self.name.lower().replace('_', ' ')}"

    @classmethod
    def known(cls, sw: int | None) -> SW | None:
        """The spec status word ``sw`` is, or None for any other value (a card outside the spec)."""
        try:
            return None if sw is None else cls(sw)
        except ValueError:
            return None

    @staticmethod
    def wording(sw: int) -> str:
        """``describe()`` for a spec status word, bare hex for any other."""
        known = SW.known(sw)
        return known.describe() if known is not None else f"{sw:04X}"


class ApduError(Exception):
    """A command cannot be processed; carries the status word the card answers."""

    def __init__(self, sw: SW, why: str = "") -> None:
        super().__init__(why or sw.describe())
        self.sw = sw


@dataclass(frozen=True, slots=True)
class Command:
    """A parsed short C-APDU. ``le`` is None when absent; 0 means 'up to 256'."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None

    def to_bytes(self) -> bytes:
        """Encode as a short APDU (case 1 to 4)."""
        out = bytes([self.cla, self.ins, self.p1, self.p2])
        if self.data:
            if len(self.data) > 255:
                raise ValueError("short APDU data is at most 255 bytes")
            out += bytes([len(self.data)]) + self.data
        if self.le is not None:
            out += bytes([self.le & 0xFF])
        return out


def parse_command(raw: bytes) -> Command:
    """Parse a short C-APDU; ApduError(6700) when its length fields do not add up.

    Extended-length APDUs (Lc byte 00 followed by two length bytes) are not supported by these cards.
    """
    n = len(raw)
    if n < 4:
        raise ApduError(SW.WRONG_LENGTH, f"APDU of {n} bytes is shorter than a header")
    cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
    if n == 4:
        return Command(cla, ins, p1, p2)
    if n == 5:
        return Command(cla, ins, p1, p2, le=raw[4])
    lc = raw[4]
    if lc == 0:
        raise ApduError(SW.WRONG_LENGTH, "extended-length APDUs are not supported")
    if n == 5 + lc:
        return Command(cla, ins, p1, p2, bytes(raw[5:]))
    if n == 6 + lc:
        return Command(cla, ins, p1, p2, bytes(raw[5:-1]), raw[-1])
    raise ApduError(SW.WRONG_LENGTH, f"Lc={lc} does not match {n - 5} bytes after the header")


def respond(data: bytes = b"", sw: int = SW.OK) -> bytes:
    """An R-APDU: data followed by the two status bytes."""
    return data + sw.to_bytes(2)


def split_response(raw: bytes) -> tuple[bytes, int]:
    """Split an R-APDU into (data, SW); ValueError when it has no status word."""
    if len(raw) < 2:
        raise ValueError(f"response of {len(raw)} bytes has no status word")
    return bytes(raw[:-2]), int.from_bytes(raw[-2:])


def contactless_atr(historical: bytes) -> bytes:
    """The PC/SC part 3 ATR of an ISO 14443-4 card (T=1) with these historical bytes, TCK included."""
    if len(historical) > 15:
        raise ValueError("at most 15 historical bytes")
    body = bytes([0x3B, 0x80 | len(historical), 0x80, 0x01]) + historical
    tck = 0
    for b in body[1:]:
        tck ^= b
    return body + bytes([tck])


def check_le(cmd: Command, response_len: int) -> None:
    """Le may be absent, 00, or the exact response length; anything else is 6700."""
    if cmd.le not in (None, 0, response_len & 0xFF):
        raise ApduError(SW.WRONG_LENGTH, f"Le={cmd.le:02X} but the response has {response_len} bytes")


def expect(cmd: Command, p1p2: tuple[int, int], lc: int, response_len: int) -> None:
    """Check a command's P1 P2 (6D00: no such command), its data length (6700) and its Le (``check_le``)."""
    if (cmd.p1, cmd.p2) != p1p2:
        raise ApduError(SW.INS_NOT_SUPPORTED, "no such command for this P1/P2")
    if len(cmd.data) != lc:
        raise ApduError(SW.WRONG_LENGTH)
    check_le(cmd, response_len)


def handles(cla: int, ins: int) -> Callable[[F], F]:
    """Mark a card's method as the handler of the commands with this CLA and INS (collected by ``handlers``)."""

    def mark(method: F) -> F:
        setattr(method, _INSTRUCTION, (cla, ins))
        return method

    return mark


def handlers(card: object) -> dict[tuple[int, int], Callable[..., bytes]]:
    """The methods of ``card``'s class marked with ``handles``, bound to ``card``, by (CLA, INS)."""
    table: dict[tuple[int, int], Callable[..., bytes]] = {}
    for name, member in vars(type(card)).items():
        instruction = getattr(member, _INSTRUCTION, None)
        if instruction is not None:
            table[instruction] = getattr(card, name)
    return table


def route(raw: bytes, handlers: Mapping[tuple[int, int], H]) -> tuple[Command, H]:
    """Parse a C-APDU and find the handler of its (CLA, INS); ApduError 6D00 when the card knows the class but
    not the instruction, 6E00 when it knows neither (and ``parse_command``'s errors)."""
    cmd = parse_command(raw)
    handler = handlers.get((cmd.cla, cmd.ins))
    if handler is None:
        known_cla = any(cla == cmd.cla for cla, _ in handlers)
        raise ApduError(SW.INS_NOT_SUPPORTED if known_cla else SW.CLA_NOT_SUPPORTED)
    return cmd, handler


def tlv(tag: int, value: bytes) -> bytes:
    """BER-TLV with a one- or two-byte tag and a short or 81-form length."""
    tag_bytes = tag.to_bytes(2) if tag > 0xFF else bytes([tag])
    n = len(value)
    length = bytes([n]) if n < 0x80 else bytes([0x81, n])
    return tag_bytes + length + value


def read_binary(cmd: Command, files: dict[int, bytes]) -> bytes:
    """READ BINARY by SFI (P1 = 80|SFI, P2 = offset) from ``files``; the R-APDU, or ApduError."""
    content = files.get(cmd.p1 & 0x1F) if cmd.p1 & 0xE0 == 0x80 else None
    if content is None:
        raise ApduError(SW.FILE_NOT_FOUND)
    if cmd.data or cmd.p2 >= len(content):
        raise ApduError(SW.WRONG_LENGTH)
    rest = content[cmd.p2 :]
    if cmd.le:
        if cmd.le > len(rest):
            raise ApduError(SW.WRONG_LENGTH, f"only {len(rest)} bytes from offset {cmd.p2}")
        rest = rest[: cmd.le]
    return respond(rest)
