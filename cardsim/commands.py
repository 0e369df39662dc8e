"""The purse and PSAM commands of spec card.md (parts A and B) and their answers, each with one byte layout.

Terminals and the audit encode the commands and decode the answers; the simulated card and PSAM decode the same
commands and encode the same answers, so a field cannot sit at one offset on one side and another on the other.
Request data is decoded only after the card has checked Lc against its size.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Annotated, ClassVar, Final

from cardsim import crypto
from cardsim.apdu import SW, ApduError, Command
from cardsim.layout import U8, U16, U32, Layout
from cardsim.m1_issue import KeyScheme

CLA_ISO: Final = 0x00
CLA_PURSE: Final = 0x80
CLA_ISO_SM: Final = 0x04
"""The ISO class with secure messaging: the command's data ends with a MAC (UPDATE BINARY of the public files)."""


class InitKind(enum.IntEnum):
    """P1 of INITIALIZE: which transaction the card prepares."""

    LOAD = 0x00
    PURCHASE = 0x01
    COMPOUND = 0x03

    @property
    def answer_length(self) -> int:
        """16 bytes for a load (its answer carries MAC1), 15 for a purchase."""
        return 16 if self is InitKind.LOAD else 15


def select(name: bytes) -> bytes:
    """SELECT by name ``00 A4 04 00`` (no Le: the card answers its FCI)."""
    return Command(CLA_ISO, 0xA4, 0x04, 0x00, name).to_bytes()


def read_binary(sfi: int, le: int = 0) -> bytes:
    """READ BINARY of a whole file by SFI from offset 0; Le 0 means 'all of it'."""
    return Command(CLA_ISO, 0xB0, 0x80 | sfi, 0x00, le=le).to_bytes()


def read_record(sfi: int, number: int) -> bytes:
    """READ RECORD ``number`` (1 = newest) of the cyclic file ``sfi``."""
    return Command(CLA_ISO, 0xB2, number, (sfi << 3) | 4, le=0).to_bytes()


def update_binary(sfi: int, offset: int, data: bytes, cla: int = CLA_ISO) -> bytes:
    """UPDATE BINARY ``cla D6 (80|SFI) offset``: ``data`` written at ``offset`` of the binary file ``sfi``. With
    ``CLA_ISO_SM`` the data must end with the secure-messaging MAC (crypto.secure_message_data)."""
    return Command(cla, 0xD6, 0x80 | sfi, offset, data).to_bytes()


def get_balance() -> bytes:
    """GET BALANCE ``80 5C 00 02 04`` (purse balance, 4 bytes)."""
    return Command(CLA_PURSE, 0x5C, 0x00, 0x02, le=4).to_bytes()


def get_challenge(size: int) -> bytes:
    """GET CHALLENGE of ``size`` (4 or 8) random bytes."""
    return Command(CLA_ISO, 0x84, 0x00, 0x00, le=size).to_bytes()


def update_capp_data_cache(sfi: int, record: bytes) -> bytes:
    """UPDATE CAPP DATA CACHE: the trip record the following DEBIT of a compound purchase writes to ``sfi``."""
    return Command(CLA_PURSE, 0xDC, 0x00, sfi << 3, record).to_bytes()


def get_transaction_prove(txn_type: int, counter: int) -> bytes:
    """GET TRANSACTION PROVE ``80 5A 00 type``: MAC2 and TAC of the purchase with this card counter."""
    return Command(CLA_PURSE, 0x5A, 0x00, txn_type, counter.to_bytes(2), le=8).to_bytes()


def application_block(mac: bytes) -> bytes:
    """APPLICATION BLOCK: the header the PSAM MACs (crypto.BLOCK_COMMAND_HEADER, Lc 4) followed by the 4-byte MAC.
    The audit sends whatever a card gave it as a challenge, so the length is not checked here."""
    return crypto.BLOCK_COMMAND_HEADER + mac


def credit_sam_for_purchase(mac2: bytes) -> bytes:
    """PSAM CREDIT SAM FOR PURCHASE ``80 72``: the card's MAC2 for the PSAM to check."""
    return Command(CLA_PURSE, 0x72, 0x00, 0x00, mac2).to_bytes()


# --- purse commands with a data layout -------------------------------------------------------------


class CommandData(Layout):
    """The data layout of a command with a fixed header: a subclass names its ``header`` (CLA INS P1 P2) and
    ``le`` (the length of the answer) in its class statement, and they complete its C-APDU."""

    HEADER: ClassVar[tuple[int, int, int, int]]
    LE: ClassVar[int]

    def __init_subclass__(cls, *, header: tuple[int, int, int, int], le: int, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.HEADER, cls.LE = header, le

    def to_apdu(self) -> bytes:
        """The C-APDU."""
        cla, ins, p1, p2 = self.HEADER
        return Command(cla, ins, p1, p2, self.to_bytes(), self.LE).to_bytes()


@dataclass(frozen=True)
class Initialize:
    """INITIALIZE FOR LOAD/PURCHASE/COMPOUND ``80 50 P1 02 0B``: key index | amount(4) | terminal(6)."""

    DATA_LENGTH: ClassVar[int] = 11

    kind: InitKind
    amount: int
    terminal: bytes
    key_index: int = 1

    def to_apdu(self) -> bytes:
        """The C-APDU."""
        data = bytes([self.key_index]) + self.amount.to_bytes(4) + self.terminal
        return Command(CLA_PURSE, 0x50, self.kind, 0x02, data, self.kind.answer_length).to_bytes()

    @classmethod
    def from_command(cls, kind: InitKind, cmd: Command) -> Initialize:
        """Decode the data of an INITIALIZE whose P1 the card read as ``kind``."""
        d = cmd.data
        return cls(kind, int.from_bytes(d[1:5]), d[5:11], d[0])


@dataclass(frozen=True)
class InitializeAnswer:
    """The card's answer to INITIALIZE. Purchase: balance(4) | counter(2) | overdraft limit(3) | key version |
    algorithm id | random(4). Load: balance(4) | counter(2) | key version | algorithm id | random(4) | MAC1(4).
    ``mac1`` is present exactly for a load."""

    balance: int
    counter: int
    key_version: int
    algorithm_id: int
    random: bytes
    mac1: bytes = b""

    def to_bytes(self) -> bytes:
        """The response data."""
        head = self.balance.to_bytes(4) + self.counter.to_bytes(2)
        tail = bytes([self.key_version, self.algorithm_id]) + self.random
        if not self.mac1:
            return head + bytes(3) + tail  # overdraft limit 0
        return head + tail + self.mac1

    @classmethod
    def from_bytes(cls, data: bytes, load: bool) -> InitializeAnswer:
        """Decode a 16-byte load or 15-byte purchase answer (the caller has checked its length)."""
        balance, counter = int.from_bytes(data[0:4]), int.from_bytes(data[4:6])
        if load:
            return cls(balance, counter, data[6], data[7], data[8:12], data[12:16])
        return cls(balance, counter, data[9], data[10], data[11:15])


@dataclass(frozen=True)
class Debit(CommandData, header=(CLA_PURSE, 0x54, 0x01, 0x00), le=8):
    """DEBIT FOR PURCHASE: terminal sequence number | date | time | MAC1; answered by a ``PurchaseProof``
    (TAC | MAC2)."""

    terminal_seq: U32
    date: Annotated[bytes, 4]
    time: Annotated[bytes, 3]
    mac1: Annotated[bytes, 4]


@dataclass(frozen=True)
class PurchaseProof:
    """TAC and MAC2 of a purchase: DEBIT answers TAC | MAC2, GET TRANSACTION PROVE answers MAC2 | TAC."""

    tac: bytes
    mac2: bytes

    def debit_answer(self) -> bytes:
        """The data of the DEBIT answer."""
        return self.tac + self.mac2

    def prove_answer(self) -> bytes:
        """The data of the GET TRANSACTION PROVE answer."""
        return self.mac2 + self.tac

    @classmethod
    def from_debit_answer(cls, data: bytes) -> PurchaseProof:
        """Decode an 8-byte DEBIT answer."""
        return cls(data[0:4], data[4:8])

    @classmethod
    def from_prove_answer(cls, data: bytes) -> PurchaseProof:
        """Decode an 8-byte GET TRANSACTION PROVE answer."""
        return cls(data[4:8], data[0:4])


@dataclass(frozen=True)
class Credit(CommandData, header=(CLA_PURSE, 0x52, 0x00, 0x00), le=4):
    """CREDIT FOR LOAD: date | time | MAC2; the card answers its TAC."""

    date: Annotated[bytes, 4]
    time: Annotated[bytes, 3]
    mac2: Annotated[bytes, 4]


# --- PSAM commands -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequencedMac(Layout):
    """A PSAM answer: the terminal transaction sequence number it used, then the MAC made with it."""

    seq: U32
    mac: Annotated[bytes, 4]


@dataclass(frozen=True)
class SectorKeys(Layout):
    """The answer to M1 SECTOR KEYS."""

    key_a: Annotated[bytes, 6]
    key_b: Annotated[bytes, 6]


@dataclass(frozen=True)
class InitSamForPurchase(CommandData, header=(CLA_PURSE, 0x70, 0x00, 0x00), le=SequencedMac.size()):
    """PSAM INIT SAM FOR PURCHASE, answered by a ``SequencedMac`` (MAC1 for the DEBIT)."""

    random: Annotated[bytes, 4]
    counter: U16
    amount: U32
    txn_type: U8
    date: Annotated[bytes, 4]
    time: Annotated[bytes, 3]
    key_version: U8
    algorithm_id: U8
    card_serial: Annotated[bytes, 8]


@dataclass(frozen=True)
class ComputeBlockMac(CommandData, header=(CLA_PURSE, 0xFA, 0x00, 0x00), le=4):
    """Project command PSAM COMPUTE BLOCK MAC, answered by the MAC of APPLICATION BLOCK."""

    card_serial: Annotated[bytes, 8]
    challenge: Annotated[bytes, 4]
    key_version: U8
    algorithm_id: U8


_SCHEME_CODES: Final = {KeyScheme.SHARED: 0x01, KeyScheme.DIVERSIFIED: 0x02}


@dataclass(frozen=True)
class M1SectorKeys:
    """Project command PSAM M1 SECTOR KEYS ``80 FB sector 00 08``: city(2 BCD) | key version | scheme (01 shared,
    02 diversified) | UID(4); answered by ``SectorKeys``."""

    DATA_LENGTH: ClassVar[int] = 8

    sector: int
    city: str
    key_version: int
    scheme: KeyScheme
    uid: bytes

    def to_apdu(self) -> bytes:
        """The C-APDU."""
        data = bytes.fromhex(self.city) + bytes([self.key_version, _SCHEME_CODES[self.scheme]]) + self.uid
        return Command(CLA_PURSE, 0xFB, self.sector, 0x00, data, SectorKeys.size()).to_bytes()

    @classmethod
    def from_command(cls, cmd: Command) -> M1SectorKeys:
        """Decode the data; ApduError 9403 for a scheme the PSAM has no keys for."""
        d = cmd.data
        scheme = next((s for s, code in _SCHEME_CODES.items() if code == d[3]), None)
        if scheme is None:
            raise ApduError(SW.KEY_NOT_FOUND, f"key scheme {d[3]:02X}")
        return cls(cmd.p1, d[0:2].hex(), d[2], scheme, d[4:8])


@dataclass(frozen=True)
class M1RecordMac(CommandData, header=(CLA_PURSE, 0xFC, 0x00, 0x00), le=SequencedMac.size()):
    """Project command PSAM M1 RECORD MAC, answered by a ``SequencedMac``."""

    city: Annotated[str, 2]
    key_version: U8
    uid: Annotated[bytes, 4]
    counter: U16
    amount: U32
    balance_before: U32
    balance_after: U32
    date: Annotated[bytes, 4]
    time: Annotated[bytes, 3]
