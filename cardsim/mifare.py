"""MIFARE Classic 1K (legacy M1 city card, spec card.md part C) as a pure state machine over radio frames.

Frames carry bytes and, once a sector is authenticated, Crypto-1 encrypted parity bits, so a reader-side
Crypto-1 (``terminals.m1``) and the attacks in ``audit`` see exactly what they would see on air. CRC_A is left
out of frames (docs/card-choices.md): the reader chip adds and checks it. A reader whose chip leaves CRC to the
host (a PN532 in raw mode) sends it inside its frames, encrypted with the data; the card then accepts commands and
data frames carrying a CRC_A and answers a READ of that session with its CRC_A too (``M1Card.transceive``). Card
profiles model the chips a fleet really holds: genuine (weak 16-bit PRNG), hardened PRNG, static nonce,
Gen1a magic backdoor, FM11RF08S (static encrypted nested nonces, vendor backdoor key; docs/research/static-nested.md).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from cardsim.crypto1 import Crypto1, Word, decrypt_bytes, encrypt_bytes, odd_parity, prng_successor

BLOCKS: Final = 64
BLOCK_SIZE: Final = 16
ACK: Final = 0x0A
NAK: Final = 0x04
NAK_TRANSMISSION: Final = 0x05  # what a genuine chip leaks to a wrong aR with right parity (Garcia et al. 2009)
TRANSPORT_ACCESS: Final = bytes.fromhex("FF078069")
DEFAULT_KEY: Final = 0xFFFFFFFFFFFF
BACKDOOR_KEY: Final = 0xA396EFA4E24F
FIRST_WEAK_NONCE: Final = 0x01200145  # the nonce a genuine chip's PRNG starts from at power-up
STATIC_NONCE: Final = 0x009080A2
PRNG_STEPS_PER_FRAME: Final = 160  # the PRNG runs freely; a frame exchange takes about this many steps

RandomSource = Callable[[int], bytes]


class M1Command(enum.IntEnum):
    """The first byte of a MIFARE Classic command frame (the reader sends the block number after it)."""

    AUTH_A = 0x60
    AUTH_B = 0x61
    BACKDOOR_AUTH_A = 0x64  # FM11RF08S vendor key
    BACKDOOR_AUTH_B = 0x65
    HALT = 0x50
    READ = 0x30
    WRITE = 0xA0
    DECREMENT = 0xC0
    INCREMENT = 0xC1
    RESTORE = 0xC2
    TRANSFER = 0xB0


AUTH_COMMANDS: Final = (M1Command.AUTH_A, M1Command.AUTH_B, M1Command.BACKDOOR_AUTH_A, M1Command.BACKDOOR_AUTH_B)
VALUE_COMMANDS: Final = (M1Command.DECREMENT, M1Command.INCREMENT, M1Command.RESTORE)
# The access-condition column (see ``_allowed``) each data-block command needs.
_OPERATIONS: Final[dict[int, int]] = {
    M1Command.WRITE: 1,
    M1Command.INCREMENT: 2,
    M1Command.DECREMENT: 3,
    M1Command.RESTORE: 3,
    M1Command.TRANSFER: 3,
}


class Profile(enum.Enum):
    """What kind of chip the card is."""

    GENUINE = "genuine"  # NXP-like: weak 16-bit PRNG
    HARDENED = "hardened"  # EV1-like: unpredictable nonces
    STATIC_NONCE = "static-nonce"
    GEN1A = "gen1a"  # magic: answers the backdoor (40 in 7 bits, then 43), block 0 writable
    FM11RF08S = "fm11rf08s"  # accepts a vendor backdoor key with auth command 64/65


# Chips that answer a wrong reader answer with an encrypted NAK when its parity bits happen to be right (genuine
# NXP-era chips and the clones that copy them); hardened chips (EV1, FM11RF08S) stay silent.
NACK_LEAKING: Final = frozenset({Profile.GENUINE, Profile.GEN1A, Profile.STATIC_NONCE})


# --- FM11RF08S static nested nonces ----------------------------------------------------------------
# The nonce of a nested authentication on an FM11RF08S is a function of a 16-bit value fixed per sector and of
# the sector key the command names (key A for 60/64, key B for 61/65), whichever key encrypts it (ePrint 2024/1275;
# the relation Proxmark3's tools/mfc/card_only/staticnested_2x1nt_rf08s*.c invert): from the sector's value the
# chip's 16-bit LFSR runs 8 steps and takes in one key byte through two nibble substitutions, for each key byte
# from the first to the last, then runs 14 more steps. The nonce is that LFSR state followed by the state 16
# steps later, like every weak-PRNG nonce. Values are in nonce byte order; each table is packed 4 bits an entry.
_RF08S_SUB_A: Final = sum(v << 4 * i for i, v in enumerate((0, 8, 9, 4, 6, 11, 1, 15, 12, 5, 2, 13, 10, 14, 3, 7)))
_RF08S_SUB_B: Final = sum(v << 4 * i for i, v in enumerate((0, 13, 1, 14, 4, 10, 15, 7, 5, 3, 8, 6, 9, 2, 12, 11)))


def _swap16(x: Word) -> Word:
    return ((x & 0xFF) << 8) | (x >> 8)


def lfsr16(x: Word, steps: int) -> Word:
    """The 16-bit tag PRNG (x^16+x^14+x^13+x^11+1), state in nonce byte order, ``steps`` on (negative: back)."""
    x = _swap16(x)
    for _ in range(steps):
        x = (x >> 1) | ((x ^ (x >> 2) ^ (x >> 3) ^ (x >> 5)) & 1) << 15
    for _ in range(-steps):
        x = ((x << 1) & 0xFFFF) | (((x >> 15) ^ (x >> 1) ^ (x >> 2) ^ (x >> 4)) & 1)
    return _swap16(x)


def _rf08s_key_byte(key: Word, index: int) -> Word:
    """Key byte ``index`` (0 = first) through the substitutions: tables A, B on its nibbles, swapped every byte."""
    byte = (key >> (8 * (5 - index))) & 0xFF
    low, high = (_RF08S_SUB_A, _RF08S_SUB_B) if index % 2 else (_RF08S_SUB_B, _RF08S_SUB_A)
    return ((low >> 4 * (byte & 0xF)) & 0xF) | ((high >> 4 * (byte >> 4)) & 0xF) << 4


def fm11rf08s_nested_nonce(seed: int, key: int) -> int:
    """The static nested nonce of an FM11RF08S sector whose 16-bit value is ``seed``, for the slot holding ``key``."""
    x = seed
    for index in range(6):
        x = lfsr16(x, 8) ^ _rf08s_key_byte(key, index)
    x = lfsr16(x, 14)
    return int(x << 16 | lfsr16(x, 16))


def fm11rf08s_seed(nt: int, key: Word) -> Word:
    """The sector value behind nested nonce ``nt`` if the slot holds ``key`` (an int, or a uint64 array of
    candidates): key A and key B of one sector give the same value, the filter the recovery uses."""
    x: Word = lfsr16(nt >> 16, -14)
    for index in range(5, -1, -1):
        x = lfsr16(x ^ _rf08s_key_byte(key, index), -8)
    return x


@dataclass(frozen=True)
class Frame:
    """One radio frame. ``bits`` is set for short frames (7-bit commands, 4-bit ACK/NAK)."""

    data: bytes
    parity: tuple[int, ...] = ()
    bits: int | None = None


def crc_a(data: bytes) -> bytes:
    """ISO/IEC 14443-3 CRC_A (initial 0x6363, reflected polynomial 0x8408), low byte first."""
    crc = 0x6363
    for byte in data:
        mixed = byte ^ (crc & 0xFF)
        mixed = (mixed ^ (mixed << 4)) & 0xFF
        crc = (crc >> 8) ^ (mixed << 8) ^ (mixed << 3) ^ (mixed >> 4)
    return crc.to_bytes(2, "little")


# --- access conditions ---------------------------------------------------------------------------

# Data blocks: (C1, C2, C3) -> key types allowed to read, write, increment, decrement/transfer/restore.
DATA_ACCESS: Final[dict[tuple[int, int, int], tuple[str, str, str, str]]] = {
    (0, 0, 0): ("AB", "AB", "AB", "AB"),
    (0, 1, 0): ("AB", "", "", ""),
    (1, 0, 0): ("AB", "B", "", ""),
    (1, 1, 0): ("AB", "B", "B", "AB"),
    (0, 0, 1): ("AB", "", "", "AB"),
    (0, 1, 1): ("B", "B", "", ""),
    (1, 0, 1): ("B", "", "", ""),
    (1, 1, 1): ("", "", "", ""),
}
# Sector trailer: (C1, C2, C3) -> write key A, read access bits, write access bits, read key B, write key B.
TRAILER_ACCESS: Final[dict[tuple[int, int, int], tuple[str, str, str, str, str]]] = {
    (0, 0, 0): ("A", "A", "", "A", "A"),
    (0, 1, 0): ("", "A", "", "A", ""),
    (1, 0, 0): ("B", "AB", "", "", "B"),
    (1, 1, 0): ("", "AB", "", "", ""),
    (0, 0, 1): ("A", "A", "A", "A", "A"),
    (0, 1, 1): ("B", "AB", "B", "", "B"),
    (1, 0, 1): ("", "AB", "B", "", ""),
    (1, 1, 1): ("", "AB", "", "", ""),
}


def decode_access(access: bytes) -> list[tuple[int, int, int]] | None:
    """(C1, C2, C3) for blocks 0-3 of a sector from access bytes 6-8; None when they are inconsistent."""
    b6, b7, b8 = access[0], access[1], access[2]
    if (b6 & 0x0F) != (~b7 >> 4) & 0x0F or (b6 >> 4) != (~b8) & 0x0F or (b7 & 0x0F) != (~b8 >> 4) & 0x0F:
        return None
    c1, c2, c3 = b7 >> 4, b8 & 0x0F, b8 >> 4
    return [((c1 >> i) & 1, (c2 >> i) & 1, (c3 >> i) & 1) for i in range(4)]


def encode_access(conditions: list[tuple[int, int, int]], gpb: int = 0x69) -> bytes:
    """Access bytes 6-9 for (C1, C2, C3) of blocks 0-3."""
    c1 = sum(c[0] << i for i, c in enumerate(conditions))
    c2 = sum(c[1] << i for i, c in enumerate(conditions))
    c3 = sum(c[2] << i for i, c in enumerate(conditions))
    return bytes([(~c2 & 0xF) << 4 | (~c1 & 0xF), c1 << 4 | (~c3 & 0xF), c3 << 4 | c2, gpb])


def key_b_readable(trailer: bytes) -> bool:
    """True when the trailer's conditions let key B be read (then it cannot serve as a key)."""
    conditions = decode_access(trailer[6:9])
    return conditions is not None and TRAILER_ACCESS[conditions[3]][3] != ""


# --- value blocks --------------------------------------------------------------------------------


def value_block(value: int, address: int) -> bytes:
    """A value block: value | ~value | value (int32 LE) | addr | ~addr | addr | ~addr."""
    v = value.to_bytes(4, "little", signed=True)
    inv = bytes(b ^ 0xFF for b in v)
    return v + inv + v + bytes([address, address ^ 0xFF, address, address ^ 0xFF])


def parse_value_block(block: bytes) -> tuple[int, int] | None:
    """(value, address) of a well-formed value block, or None when its redundancy is broken."""
    v, inv, v2 = block[0:4], block[4:8], block[8:12]
    a = block[12:16]
    if v != v2 or bytes(b ^ 0xFF for b in v) != inv or a[0] != a[2] or a[1] != a[3] or a[0] ^ 0xFF != a[1]:
        return None
    return int.from_bytes(v, "little", signed=True), a[0]


# --- the card ------------------------------------------------------------------------------------


@dataclass
class M1State:
    """Non-volatile content of an M1 card: 64 blocks of 16 bytes (block 0 holds the UID) and its chip kind."""

    blocks: list[bytes]
    profile: Profile = Profile.GENUINE

    @property
    def uid(self) -> int:
        """The 4-byte UID from block 0."""
        return int.from_bytes(self.blocks[0][0:4])

    def sector_key(self, sector: int, key_type: int) -> int:
        """Key A (0x60) or key B (0x61) of a sector, as a 48-bit integer."""
        trailer = self.blocks[sector * 4 + 3]
        return int.from_bytes(trailer[0:6] if key_type == 0x60 else trailer[10:16])


def manufacturer_block(uid: bytes, manufacturer: bytes = b"\x62\x63\x64\x65\x66\x67\x68\x69") -> bytes:
    """Block 0: UID | BCC | SAK 08 | ATQA 04 00 | manufacturer data."""
    bcc = uid[0] ^ uid[1] ^ uid[2] ^ uid[3]
    return uid + bytes([bcc, 0x08, 0x04, 0x00]) + manufacturer


@dataclass
class _Auth:
    """An authentication in progress or done."""

    cipher: Crypto1
    nt: int
    sector: int
    key_type: int
    done: bool = False


def _trailer_rights(auth: _Auth, trailer: bytes) -> tuple[tuple[str, str, str, str, str], str] | None:
    """The trailer's rules and which key ('A' or 'B') this session holds; None when the bits are broken."""
    conditions = decode_access(trailer[6:9])
    if conditions is None:
        return None
    return TRAILER_ACCESS[conditions[3]], "A" if auth.key_type in (0x60, 0x64) else "B"


@dataclass
class M1Card:
    """A MIFARE Classic 1K card. ``transceive`` returns the card's answer frame, or None for silence."""

    state: M1State
    rng: RandomSource
    _auth: _Auth | None = None
    _nonce: int = FIRST_WEAK_NONCE
    _pending: tuple[int, int] | None = None  # (command, block) waiting for its data frame
    _register: int | None = None  # value register after increment/decrement/restore
    _magic: int = 0  # Gen1a: 1 after 40, 2 after 43 (unlocked)
    _magic_pending_write: int | None = field(default=None)
    _crc: bool = False  # the reader's last command carried a CRC_A: answer a READ with one

    @property
    def host_crc(self) -> bool:
        """False: a reader talking to the card object directly leaves CRC_A out (``terminals.m1.M1Link``)."""
        return False

    def power_on(self) -> None:
        """Field on: everything volatile is reset; a genuine PRNG restarts from its first nonce."""
        self._auth = None
        self._nonce = FIRST_WEAK_NONCE
        self._pending = None
        self._register = None
        self._magic = 0
        self._magic_pending_write = None
        self._crc = False

    def select(self) -> None:
        """A new selection without a power cycle (WUPA/anticollision after a halt or an abandoned
        authentication): the session is dropped, the free-running PRNG keeps its place."""
        nonce = self._nonce
        self.power_on()
        self._nonce = nonce

    def anticollision(self) -> tuple[bytes, int, bytes]:
        """UID, SAK and ATQA (REQA/anticollision/SELECT collapsed into one step)."""
        block0 = self.state.blocks[0]
        return block0[0:4], block0[5], block0[6:8]

    def _next_nonce(self, command: int, sector: int, nested: bool) -> int:
        """The tag nonce for an authentication ``command`` to ``sector``, as the chip makes it."""
        profile = self.state.profile
        if profile is Profile.HARDENED:
            return int.from_bytes(self.rng(4))
        if profile is Profile.STATIC_NONCE:
            # The PRNG restarts from the same value at every first authentication and runs on a fixed clock, so a
            # nested nonce lies exactly one frame's steps further each time (no reader timing in it).
            self._nonce = prng_successor(self._nonce, PRNG_STEPS_PER_FRAME) if nested else STATIC_NONCE
            return self._nonce
        if profile is Profile.FM11RF08S and nested:
            # Static encrypted nonce: fixed for the sector and the key the command names; the free-running PRNG
            # then goes on from it (a later first authentication's nonce lies a reader-timing distance further).
            slot_key = self.state.sector_key(sector, 0x60 if command in (0x60, 0x64) else 0x61)
            self._nonce = fm11rf08s_nested_nonce(self._fm11rf08s_seed(sector), slot_key)
            return self._nonce
        jitter = self.rng(1)[0] & 3  # the reader's timing is never exact
        self._nonce = prng_successor(self._nonce, PRNG_STEPS_PER_FRAME + jitter)
        return self._nonce

    def _fm11rf08s_seed(self, sector: int) -> int:
        """The sector's 16-bit nonce value. How the chip chooses it is not published (it stays the same when keys
        change, so nonces recorded in the supply chain still serve); here it follows from the UID."""
        digest = hashlib.blake2s(self.state.blocks[0][0:4] + bytes([sector]), digest_size=2).digest()
        return int.from_bytes(digest)

    # --- frame dispatch --------------------------------------------------------------------------

    def transceive(self, frame: Frame) -> Frame | None:
        """Process one frame from the reader.

        Commands (2 bytes), block data (16) and value operands (4) may carry a CRC_A after them, checked after
        decryption; a READ answer then carries one too, encrypted in the same keystream. A real card always
        sends it, but this model leaves CRCs to the reader chip unless the reader shows, by sending one, that
        its chip does not handle them: the model mirrors the reader so both kinds of reader see a true answer.
        """
        if frame.bits is not None:  # a short frame (7-bit REQA/WUPA/40)
            return self._short_frame(frame.data[0] if frame.data else 0, frame.bits)
        if self._magic == 1:  # Gen1a after the 7-bit 40: only 43 as a whole byte unlocks it
            return self._magic_unlock(frame)
        auth = self._auth
        if auth is not None and not auth.done:
            return self._finish_auth(auth, frame)
        if auth is not None:
            plain, parity_ok = decrypt_bytes(auth.cipher, frame.data, list(frame.parity))
            if not parity_ok:
                self._reset_session()
                return None
            return self._encrypted_command(auth, plain)
        if self._magic == 2:
            return self._magic_command(frame.data)
        data = self._strip_crc(frame.data, 2)
        if len(data) == 2 and data[0] in AUTH_COMMANDS:
            return self._start_auth(data[0], data[1], nested=False)
        return None

    def _strip_crc(self, data: bytes, size: int) -> bytes:
        """``data`` without the CRC_A a host-CRC reader appends to a ``size``-byte frame; notes whether it did."""
        self._crc = len(data) == size + 2 and crc_a(data[:size]) == data[size:]
        return data[:size] if self._crc else data

    def _with_crc(self, data: bytes) -> bytes:
        return data + crc_a(data) if self._crc else data

    def _reset_session(self) -> None:
        self._auth = None
        self._pending = None
        self._register = None

    def _short_frame(self, command: int, bits: int) -> Frame | None:
        self._reset_session()
        if self.state.profile is Profile.GEN1A and command == 0x40 and bits == 7:
            self._magic = 1
            return Frame(bytes([ACK]), bits=4)
        self._magic = 0
        return None

    def _magic_unlock(self, frame: Frame) -> Frame | None:
        """The frame after a Gen1a's 7-bit 40: 43 (8 bits with its parity bit, no CRC, as libnfc sends it) unlocks
        the backdoor; anything else ends it."""
        self._magic = 2 if frame.data == b"\x43" and frame.parity in ((), (odd_parity(0x43),)) else 0
        return Frame(bytes([ACK]), bits=4) if self._magic == 2 else None

    def _magic_command(self, data: bytes) -> Frame | None:
        """Gen1a after 40/43: plain READ and WRITE of any block, block 0 included."""
        if self._magic_pending_write is not None:
            block = self._strip_crc(data, BLOCK_SIZE)
            if len(block) != BLOCK_SIZE:
                return None
            self.state.blocks[self._magic_pending_write] = block
            self._magic_pending_write = None
            return Frame(bytes([ACK]), bits=4)
        data = self._strip_crc(data, 2)
        if len(data) == 2 and data[1] < BLOCKS and data[0] == M1Command.READ:
            return Frame(self._with_crc(self.state.blocks[data[1]]))
        if len(data) == 2 and data[1] < BLOCKS and data[0] == M1Command.WRITE:
            self._magic_pending_write = data[1]
            return Frame(bytes([ACK]), bits=4)
        return None

    # --- authentication --------------------------------------------------------------------------

    def _start_auth(self, command: int, block: int, nested: bool) -> Frame | None:
        if block >= BLOCKS:
            return None
        sector = block // 4
        if command in (0x64, 0x65):
            if self.state.profile is not Profile.FM11RF08S:
                return None
            key = BACKDOOR_KEY
        else:
            key = self.state.sector_key(sector, command)
        nt = self._next_nonce(command, sector, nested)
        cipher = Crypto1.from_key(key)
        # uid^nT enters the cipher; in a nested authentication the nonce goes out encrypted with that very
        # keystream, each parity bit with the keystream bit after its byte.
        fed = (self.state.uid ^ nt).to_bytes(4)
        encrypted = bytearray()
        parities = []
        for i, b in enumerate(nt.to_bytes(4)):
            encrypted.append(b ^ int(cipher.byte(fed[i])))
            parities.append(odd_parity(b) ^ int(cipher.peek()))
        self._auth = _Auth(cipher, nt, sector, command)
        if not nested:
            return Frame(nt.to_bytes(4))
        return Frame(bytes(encrypted), tuple(parities))

    def _finish_auth(self, auth: _Auth, frame: Frame) -> Frame | None:
        self._auth = None
        if len(frame.data) != 8:
            return None
        _, nr_parity = decrypt_bytes(auth.cipher, frame.data[0:4], list(frame.parity[0:4]), feed=True)  # nR enters
        ar, ar_parity = decrypt_bytes(auth.cipher, frame.data[4:8], list(frame.parity[4:8]))
        if int.from_bytes(ar) != prng_successor(auth.nt, 64):
            if nr_parity and ar_parity and self.state.profile in NACK_LEAKING:
                # The flaw darkside uses: a wrong aR whose 8 parity bits all check gets the transmission-error
                # NAK (5) encrypted with the next 4 keystream bits (the first also encrypted the last parity bit).
                return self._ack(auth, NAK_TRANSMISSION)
            return None
        trailer = self.state.blocks[auth.sector * 4 + 3]
        if auth.key_type == 0x61 and key_b_readable(trailer):
            return None  # a readable key B is data, not a key
        at, parities = encrypt_bytes(auth.cipher, prng_successor(auth.nt, 96).to_bytes(4))
        auth.done = True
        self._auth = auth
        return Frame(at, tuple(parities))

    # --- commands in an authenticated session ----------------------------------------------------

    def _answer(self, auth: _Auth, data: bytes) -> Frame:
        enc, parities = encrypt_bytes(auth.cipher, data)
        return Frame(enc, tuple(parities))

    def _ack(self, auth: _Auth, code: int) -> Frame:
        ks = 0
        for i in range(4):
            ks |= int(auth.cipher.bit()) << i
        return Frame(bytes([code ^ ks]), bits=4)

    def _nak(self, auth: _Auth) -> Frame:
        """Refuse: like a real chip, drop back to idle (a new authentication is needed)."""
        frame = self._ack(auth, NAK)
        self._reset_session()
        return frame

    def _allowed(self, auth: _Auth, block: int, operation: int) -> bool:
        """operation: 0 read, 1 write, 2 increment, 3 decrement/transfer/restore (data blocks)."""
        if block // 4 != auth.sector:
            return False
        conditions = decode_access(self.state.blocks[auth.sector * 4 + 3][6:9])
        if conditions is None:
            return False
        keys = DATA_ACCESS[conditions[block % 4]][operation]
        return ("A" if auth.key_type in (0x60, 0x64) else "B") in keys

    def _encrypted_command(self, auth: _Auth, plain: bytes) -> Frame | None:
        if self._pending is not None:
            return self._data_frame(auth, plain)
        plain = self._strip_crc(plain, 2)
        if len(plain) != 2:
            return self._nak(auth)
        command, block = plain[0], plain[1]
        if command in AUTH_COMMANDS:
            return self._start_auth(command, block, nested=True)
        if command == M1Command.HALT:
            self._reset_session()
            return None
        if block >= BLOCKS:
            return self._nak(auth)
        if command == M1Command.READ:
            return self._read(auth, block)
        if block % 4 == 3 and command == M1Command.WRITE:
            return self._start_trailer_write(auth, block)
        if block == 0 and command == M1Command.WRITE:
            return self._nak(auth)  # the manufacturer block is read-only on a genuine chip (Gen1a: backdoor only)
        operation = _OPERATIONS.get(command)
        if operation is None or block % 4 == 3 or not self._allowed(auth, block, operation):
            return self._nak(auth)
        if command == M1Command.TRANSFER:
            if self._register is None:
                return self._nak(auth)
            address = self.state.blocks[block][12]
            self.state.blocks[block] = value_block(self._register, address)
            self._register = None
            return self._ack(auth, ACK)
        if command in VALUE_COMMANDS and parse_value_block(self.state.blocks[block]) is None:
            return self._nak(auth)
        self._pending = (command, block)
        return self._ack(auth, ACK)

    def _read(self, auth: _Auth, block: int) -> Frame:
        if block // 4 != auth.sector:
            return self._nak(auth)
        if block % 4 != 3:
            if not self._allowed(auth, block, 0):
                return self._nak(auth)
            return self._answer(auth, self._with_crc(self.state.blocks[block]))
        trailer = self.state.blocks[block]
        rights = _trailer_rights(auth, trailer)
        if rights is None:
            return self._nak(auth)
        rules, who = rights
        access = trailer[6:10] if who in rules[1] else bytes(4)
        key_b = trailer[10:16] if who in rules[3] else bytes(6)
        return self._answer(auth, self._with_crc(bytes(6) + access + key_b))  # key A never reads back

    def _start_trailer_write(self, auth: _Auth, block: int) -> Frame:
        if block // 4 != auth.sector:
            return self._nak(auth)
        self._pending = (M1Command.WRITE, block)
        return self._ack(auth, ACK)

    def _data_frame(self, auth: _Auth, plain: bytes) -> Frame | None:
        command, block = self._pending or (0, 0)
        self._pending = None
        plain = self._strip_crc(plain, BLOCK_SIZE if command == M1Command.WRITE else 4)
        if command == M1Command.WRITE:
            if len(plain) != BLOCK_SIZE:
                return self._nak(auth)
            if block % 4 == 3:
                return self._write_trailer(auth, block, plain)
            self.state.blocks[block] = bytes(plain)
            return self._ack(auth, ACK)
        if len(plain) != 4:
            return self._nak(auth)
        parsed = parse_value_block(self.state.blocks[block])
        if parsed is None:
            return self._nak(auth)
        operand = int.from_bytes(plain, "little", signed=True)
        value = parsed[0]
        change: dict[int, int] = {M1Command.INCREMENT: operand, M1Command.DECREMENT: -operand}  # RESTORE: none
        result = value + change.get(command, 0)
        if not -(2**31) <= result < 2**31:
            return self._nak(auth)
        self._register = result
        return None  # the card answers nothing after the operand; TRANSFER commits

    def _write_trailer(self, auth: _Auth, block: int, plain: bytes) -> Frame:
        old = self.state.blocks[block]
        rights = _trailer_rights(auth, old)
        if rights is None:
            return self._nak(auth)
        rules, who = rights
        key_a = plain[0:6] if who in rules[0] else old[0:6]
        access = plain[6:10] if who in rules[2] else old[6:10]
        key_b = plain[10:16] if who in rules[4] else old[10:16]
        self.state.blocks[block] = key_a + access + key_b
        return self._ack(auth, ACK)
