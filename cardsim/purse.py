"""The CPU card electronic purse (spec card.md, part A) as a pure state machine: C-APDU in, R-APDU out.

No I/O, no clock: the terminal supplies date and time, and the caller injects the random source.
Everything the card must remember across power cycles lives in ``PurseState`` and changes only through
``Eeprom`` writes, which is what makes tearing testable at every write.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from typing import Final

from cardsim import crypto
from cardsim.apdu import (
    SW,
    ApduError,
    Command,
    check_le,
    contactless_atr,
    expect,
    handlers,
    handles,
    read_binary,
    respond,
    route,
    tlv,
)
from cardsim.commands import (
    CLA_ISO,
    CLA_ISO_SM,
    Credit,
    Debit,
    Initialize,
    InitializeAnswer,
    InitKind,
    PurchaseProof,
)
from cardsim.crypto import Algorithm, BlockKey
from cardsim.eeprom import CardTorn, Eeprom, Journal, recover
from cardsim.log_record import LogRecord

AID: Final = bytes.fromhex("A000000632010105")
PSE_NAME: Final = b"1PAY.SYS.DDF01"
HISTORICAL: Final = b"YIKATONG"
"""The historical bytes of the simulator's own ATR; a card issued for a chip maker carries that maker's."""
ATR: Final = contactless_atr(HISTORICAL)

TYPE_LOAD: Final = 0x02
TYPE_PURCHASE: Final = 0x06
TYPE_COMPOUND: Final = 0x09

SFI_PUBLIC: Final = 0x15
PUBLIC_DATA_SIZE: Final = 30
SFI_HOLDER: Final = 0x16
SFI_INTEROP: Final = 0x17
SFI_LOG: Final = 0x18
SFI_TRIPS: Final = 0x1E
LOG_RECORDS: Final = 10
LOG_RECORD_SIZE: Final = LogRecord.size()
TRIP_RECORDS: Final = 30
TRIP_RECORD_SIZE: Final = 48
MAC_FAILURE_LIMIT: Final = 3
COUNTER_MAX: Final = 0xFFFF
BALANCE_MODULUS: Final = 1 << 32
"""The balance is a 4-byte register: a flawed card's arithmetic wraps there (a genuine card never reaches it)."""
BINARY_FILES: Final = {SFI_PUBLIC: "public_data", SFI_HOLDER: "holder_data", SFI_INTEROP: "interop_data"}
"""The public binary files: SFI -> the ``PurseState`` (and ``PurseUpdate``) field that holds the file."""
RECORD_FILES: Final = (SFI_LOG, SFI_TRIPS)

RandomSource = Callable[[int], bytes]


class Defect(enum.Enum):
    """Chip operating system flaws real fleets have held (spec audit.md). A genuine card has none; fixtures
    plant them so that the audit can be shown to find each one through the card interface alone."""

    MAC1_UNCHECKED = "mac1-unchecked"  # DEBIT never compares MAC1
    REPLAY = "replay"  # the purchase session stays open after DEBIT: the same DEBIT works again
    NO_LOCKOUT = "no-lockout"  # MAC failures are never counted
    COUNTER_STUCK = "counter-stuck"  # the offline counter does not move on DEBIT
    NO_JOURNAL = "no-journal"  # DEBIT writes its fields one by one: a power cut leaves a mix
    WEAK_RANDOM = "weak-random"  # randoms from a 16-value cycle that restarts at power-up
    FUZZ_CORRUPTS = "fuzz-corrupts"  # a DEBIT whose data is not 15 bytes moves the offline counter, then 6700
    MAC2_UNCHECKED = "mac2-unchecked"  # CREDIT FOR LOAD never compares the issuer's MAC2: free money
    NO_MAX_BALANCE = "no-max-balance"  # INITIALIZE FOR LOAD ignores the maximum balance; the balance wraps at 2**32
    OVERDRAFT = "overdraft-wraps"  # a DEBIT above the balance is accepted and the 4-byte balance wraps around
    PLAIN_WRITE = "plain-write"  # UPDATE BINARY of the public files works without secure messaging


@dataclass(frozen=True)
class PublicData:
    """The 30 bytes of SFI 0x15 (also in the FCI, tag 9F0C), decoded."""

    raw: bytes

    @property
    def city(self) -> str:
        """The issuer city code."""
        return self.raw[2:4].hex()

    @property
    def application_serial(self) -> bytes:
        """The 10-byte BCD application serial."""
        return self.raw[10:20]

    @property
    def card_serial(self) -> bytes:
        """The 8 bytes used for key diversification: the last 8 of the application serial."""
        return self.raw[12:20]


@dataclass
class PurseKeys:
    """The card's own keys, already diversified from the issuer master keys (a card never holds those)."""

    purchase: bytes
    load: bytes
    tac: bytes
    maintenance: bytes


@dataclass(frozen=True)
class TransactionProof:
    """MAC2 and TAC of the last purchase, kept for GET TRANSACTION PROVE (tearing recovery)."""

    counter: int
    txn_type: int
    mac2: bytes
    tac: bytes


@dataclass(frozen=True)
class PurseUpdate:
    """What one transaction commits to ``PurseState``; a field left None keeps its value. The field order is
    the order the card writes them (and the order of a saved journal's fields)."""

    balance: int | None = None
    offline_counter: int | None = None
    online_counter: int | None = None
    log: list[bytes] | None = None
    proof: TransactionProof | None = None
    mac_failures: int | None = None
    trips: list[bytes] | None = None
    public_data: bytes | None = None
    holder_data: bytes | None = None
    interop_data: bytes | None = None

    def writes(self) -> list[tuple[str, object]]:
        """(field name, new value) of each changed field, in write order."""
        return [(f.name, value) for f in fields(self) if (value := getattr(self, f.name)) is not None]


@dataclass(slots=True)  # slots: a commit naming a field PurseState lacks fails instead of adding an attribute
class PurseState:
    """Everything non-volatile on the card. Files are raw bytes; logs are newest first."""

    algorithm: Algorithm
    key_version: int
    keys: PurseKeys
    public_data: bytes
    holder_data: bytes
    interop_data: bytes
    balance: int
    max_balance: int
    key_index: int = 1
    offline_counter: int = 0
    online_counter: int = 0
    log: list[bytes] = field(default_factory=list)
    trips: list[bytes] = field(default_factory=list)
    proof: TransactionProof | None = None
    mac_failures: int = 0
    locked: bool = False
    blocked: bool = False
    journal: Journal[PurseUpdate] | None = None
    defects: frozenset[Defect] = frozenset()
    atr_historical: bytes = HISTORICAL  # the chip's ATS historical bytes: a reader shows them in the ATR

    @property
    def public(self) -> PublicData:
        """SFI 0x15 decoded."""
        return PublicData(self.public_data)


@dataclass
class _Pending:
    """What INITIALIZE left for the DEBIT or CREDIT that must follow it."""

    txn_type: int
    amount: int
    terminal: bytes
    random: bytes
    balance: int
    counter: int
    load_key: BlockKey | None = None
    trip_record: bytes | None = None


@dataclass
class _Carry:
    """Volatile state that lives for exactly one following command (ISO 7816 practice)."""

    pending: _Pending | None = None
    challenge: bytes | None = None


Handler = Callable[[Command, _Carry], bytes]
_INIT_TYPES: Final = {InitKind.PURCHASE: TYPE_PURCHASE, InitKind.COMPOUND: TYPE_COMPOUND, InitKind.LOAD: TYPE_LOAD}


class PurseCard:
    """A CPU purse card. ``transmit`` never raises, except ``CardTorn`` when a test cuts the power."""

    def __init__(self, state: PurseState, rng: RandomSource, eeprom: Eeprom | None = None) -> None:
        self.state = state
        self.rng = self._weak_random if Defect.WEAK_RANDOM in state.defects else rng
        self._weak_draws = 0
        self.eeprom = eeprom or Eeprom()
        self._purchase_key = BlockKey(state.algorithm, state.keys.purchase)
        self._load_key = BlockKey(state.algorithm, state.keys.load)
        self._tac_key = crypto.tac_key(state.algorithm, state.keys.tac)
        self._maintenance_key = BlockKey(state.algorithm, state.keys.maintenance)
        self._selected = False
        self._carry = _Carry()
        self._handlers: dict[tuple[int, int], Handler] = handlers(self)
        recover(state)

    # --- power -----------------------------------------------------------------------------------

    def power_on(self) -> bytes:
        """Power-up: finish or drop an interrupted commit, forget the session; returns the ATR."""
        recover(self.state)
        self.power_off()
        self._weak_draws = 0
        return contactless_atr(self.state.atr_historical)

    def power_off(self) -> None:
        """Power loss or field off: volatile state is gone, non-volatile state stays."""
        self._selected = False
        self._carry = _Carry()

    # --- APDU dispatch ---------------------------------------------------------------------------

    def transmit(self, apdu: bytes) -> bytes:
        """Process one C-APDU and return the R-APDU (data + SW)."""
        carried, self._carry = self._carry, _Carry()
        try:
            cmd, handler = route(apdu, self._handlers)
            return handler(cmd, carried)
        except ApduError as err:
            self._carry = _Carry()
            return respond(sw=err.sw)
        except CardTorn:
            self.power_off()
            raise

    # --- helpers ---------------------------------------------------------------------------------

    def _weak_random(self, size: int) -> bytes:
        """Defect WEAK_RANDOM: a 16-value cycle, the same after every power-up."""
        self._weak_draws = (self._weak_draws + 1) % 16
        return bytes((self._weak_draws * 17 + i) & 0xFF for i in range(size))

    def _has(self, defect: Defect) -> bool:
        return defect in self.state.defects

    def _require_application(self) -> None:
        if self.state.locked:
            raise ApduError(SW.APPLICATION_LOCKED)
        if self.state.blocked:
            raise ApduError(SW.APPLICATION_BLOCKED)
        if not self._selected:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "application not selected")

    def _expect(self, cmd: Command, p1p2: tuple[int, int], lc: int, response_len: int) -> None:
        """Check header, Lc and Le of a purse command, then that the application may run it."""
        expect(cmd, p1p2, lc, response_len)
        self._require_application()

    def _mac_failed(self) -> ApduError:
        if self._has(Defect.NO_LOCKOUT):
            return ApduError(SW.MAC_INVALID)
        failures = self.state.mac_failures + 1
        self.eeprom.write(lambda: setattr(self.state, "mac_failures", failures))
        if failures < MAC_FAILURE_LIMIT:
            return ApduError(SW.MAC_INVALID)
        self.eeprom.write(lambda: setattr(self.state, "locked", True))
        self._selected = False
        return ApduError(SW.APPLICATION_LOCKED)

    def _with_log(self, pending: _Pending, date: bytes, time: bytes) -> list[bytes]:
        record = LogRecord(pending.counter, pending.amount, pending.txn_type, pending.terminal, date, time)
        return [record.to_bytes(), *self.state.log[: LOG_RECORDS - 1]]

    # --- commands --------------------------------------------------------------------------------

    @handles(0x00, 0xA4)
    def _select(self, cmd: Command, _: _Carry) -> bytes:
        if (cmd.p1, cmd.p2) != (0x04, 0x00):
            raise ApduError(SW.INS_NOT_SUPPORTED, "SELECT supports select by name only")
        self._selected = False
        if cmd.data == PSE_NAME:
            return respond(tlv(0x6F, tlv(0x84, PSE_NAME) + tlv(0xA5, tlv(0x88, b"\x01"))))
        if cmd.data != AID:
            raise ApduError(SW.FILE_NOT_FOUND)
        if self.state.locked:
            raise ApduError(SW.APPLICATION_LOCKED)
        if self.state.blocked:
            raise ApduError(SW.APPLICATION_BLOCKED)
        self._selected = True
        return respond(tlv(0x6F, tlv(0x84, AID) + tlv(0xA5, tlv(0x9F0C, self.state.public_data))))

    @handles(0x00, 0x84)
    def _get_challenge(self, cmd: Command, _: _Carry) -> bytes:
        if (cmd.p1, cmd.p2) != (0x00, 0x00):
            raise ApduError(SW.INS_NOT_SUPPORTED)
        if cmd.data or cmd.le not in (4, 8):
            raise ApduError(SW.WRONG_LENGTH, "GET CHALLENGE takes no data and Le 04 or 08")
        challenge = self.rng(cmd.le)
        self._carry.challenge = challenge
        return respond(challenge)

    @handles(0x00, 0xB0)
    def _read_binary(self, cmd: Command, _: _Carry) -> bytes:
        self._require_application()
        return read_binary(cmd, {sfi: getattr(self.state, name) for sfi, name in BINARY_FILES.items()})

    @handles(CLA_ISO, 0xD6)
    def _update_binary_plain(self, cmd: Command, carried: _Carry) -> bytes:
        return self._update_binary(cmd, carried, secure=False)

    @handles(CLA_ISO_SM, 0xD6)
    def _update_binary_secure(self, cmd: Command, carried: _Carry) -> bytes:
        return self._update_binary(cmd, carried, secure=True)

    def _update_binary(self, cmd: Command, carried: _Carry, secure: bool) -> bytes:
        """UPDATE BINARY ``(00|04) D6 (80|SFI) offset`` of a public file: with secure messaging only (CLA 04, the
        data followed by a MAC with a session key from the maintenance key and the GET CHALLENGE just before)."""
        self._require_application()
        sfi = cmd.p1 & 0x1F if cmd.p1 & 0xE0 == 0x80 else None
        if sfi in RECORD_FILES:
            raise ApduError(SW.COMMAND_INCOMPATIBLE_WITH_FILE, "UPDATE BINARY of a record file")
        name = BINARY_FILES.get(sfi) if sfi is not None else None
        if name is None:
            raise ApduError(SW.FILE_NOT_FOUND)
        if not secure and not self._has(Defect.PLAIN_WRITE):
            raise ApduError(SW.SECURITY_STATUS_NOT_SATISFIED, "the public files are written with secure messaging")
        content: bytes = getattr(self.state, name)
        data = cmd.data[: -crypto.MAC_SIZE] if secure else cmd.data
        if not data or cmd.p2 + len(data) > len(content):
            raise ApduError(SW.WRONG_LENGTH, f"{len(data)} bytes at offset {cmd.p2} of a {len(content)}-byte file")
        check_le(cmd, 0)
        if secure:
            if carried.challenge is None:
                raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "secure messaging needs a GET CHALLENGE first")
            key = crypto.session_key(self._maintenance_key, crypto.block_key_input(carried.challenge[:4]))
            header = bytes([cmd.cla, cmd.ins, cmd.p1, cmd.p2])
            if key.mac(crypto.secure_message_data(header, data)) != cmd.data[-crypto.MAC_SIZE :]:
                raise self._mac_failed()
        new = content[: cmd.p2] + data + content[cmd.p2 + len(data) :]
        update = PurseUpdate(
            mac_failures=0 if secure else None,
            public_data=new if sfi == SFI_PUBLIC else None,
            holder_data=new if sfi == SFI_HOLDER else None,
            interop_data=new if sfi == SFI_INTEROP else None,
        )
        self.eeprom.commit(self.state, update)  # journalled, as the purse: a power cut leaves the old file or the new
        return respond()

    @handles(CLA_ISO, 0xDC)
    def _update_record_plain(self, cmd: Command, _: _Carry) -> bytes:
        return self._update_record(cmd)

    @handles(CLA_ISO_SM, 0xDC)
    def _update_record_secure(self, cmd: Command, _: _Carry) -> bytes:
        return self._update_record(cmd)

    def _update_record(self, cmd: Command) -> bytes:
        """UPDATE RECORD ``(00|04) DC rec (SFI<<3|4)``: refused. The public files are binary (6981); the logs are
        written by the card's own DEBIT and CREDIT only (6982); any other SFI is absent (6A82)."""
        self._require_application()
        sfi = cmd.p2 >> 3
        if sfi in BINARY_FILES:
            raise ApduError(SW.COMMAND_INCOMPATIBLE_WITH_FILE, "UPDATE RECORD of a binary file")
        if sfi in RECORD_FILES:
            raise ApduError(SW.SECURITY_STATUS_NOT_SATISFIED, "the logs are written by the card alone")
        raise ApduError(SW.FILE_NOT_FOUND)

    @handles(0x00, 0xB2)
    def _read_record(self, cmd: Command, _: _Carry) -> bytes:
        self._require_application()
        files = {SFI_LOG: self.state.log, SFI_TRIPS: self.state.trips}
        records = files.get(cmd.p2 >> 3) if cmd.p2 & 0x07 == 0x04 else None
        if records is None:
            raise ApduError(SW.FILE_NOT_FOUND)
        if cmd.data:
            raise ApduError(SW.WRONG_LENGTH)
        if not 1 <= cmd.p1 <= len(records):
            raise ApduError(SW.RECORD_NOT_FOUND)
        record = records[cmd.p1 - 1]
        check_le(cmd, len(record))
        return respond(record)

    @handles(0x80, 0x5C)
    def _get_balance(self, cmd: Command, _: _Carry) -> bytes:
        self._expect(cmd, (0x00, 0x02), 0, 4)
        return respond(self.state.balance.to_bytes(4))

    @handles(0x80, 0x50)
    def _initialize(self, cmd: Command, _: _Carry) -> bytes:
        try:
            kind = InitKind(cmd.p1)
        except ValueError:
            raise ApduError(SW.INS_NOT_SUPPORTED, "INITIALIZE supports P1 00, 01, 03") from None
        txn_type = _INIT_TYPES[kind]
        is_load = txn_type == TYPE_LOAD
        self._expect(cmd, (cmd.p1, 0x02), Initialize.DATA_LENGTH, kind.answer_length)
        request = Initialize.from_command(kind, cmd)
        amount, terminal = request.amount, request.terminal
        st = self.state
        if request.key_index != st.key_index:
            raise ApduError(SW.KEY_NOT_FOUND, f"key index {request.key_index:02X}")
        counter = st.online_counter if is_load else st.offline_counter
        if counter >= COUNTER_MAX:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "transaction counter exhausted")
        if is_load and st.balance + amount > st.max_balance and not self._has(Defect.NO_MAX_BALANCE):
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "load would exceed the maximum balance")
        if not is_load and amount > st.balance and not self._has(Defect.OVERDRAFT):
            raise ApduError(SW.INSUFFICIENT_BALANCE)
        random = self.rng(4)
        pending = _Pending(txn_type, amount, terminal, random, st.balance, counter)
        self._carry.pending = pending
        answer = InitializeAnswer(st.balance, counter, st.key_version, st.algorithm.algorithm_id, random)
        if not is_load:
            return respond(answer.to_bytes())
        pending.load_key = crypto.session_key(self._load_key, crypto.load_key_input(random, counter))
        mac1 = pending.load_key.mac(crypto.load_mac1_data(st.balance, amount, TYPE_LOAD, terminal))
        return respond(replace(answer, mac1=mac1).to_bytes())

    @handles(0x80, 0xDC)
    def _update_capp_cache(self, cmd: Command, carried: _Carry) -> bytes:
        self._expect(cmd, (0x00, (SFI_TRIPS << 3)), TRIP_RECORD_SIZE, 0)
        pending = carried.pending
        if pending is None or pending.txn_type != TYPE_COMPOUND:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "UPDATE CAPP DATA CACHE needs a compound INITIALIZE")
        pending.trip_record = cmd.data
        self._carry.pending = pending
        return respond()

    @handles(0x80, 0x54)
    def _debit(self, cmd: Command, carried: _Carry) -> bytes:
        if self._has(Defect.FUZZ_CORRUPTS) and len(cmd.data) != Debit.size():
            # the flawed OS reserves the counter as the DEBIT arrives and checks the length only afterwards
            counter = min(self.state.offline_counter + 1, COUNTER_MAX)
            self.eeprom.write(lambda: setattr(self.state, "offline_counter", counter))
        self._expect(cmd, (0x01, 0x00), Debit.size(), Debit.LE)
        pending = carried.pending
        if pending is None or pending.txn_type == TYPE_LOAD:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "DEBIT without INITIALIZE FOR PURCHASE")
        debit = Debit.from_bytes(cmd.data)
        seq, date, time, mac1 = debit.terminal_seq, debit.date, debit.time, debit.mac1
        sk = crypto.session_key(self._purchase_key, crypto.purchase_key_input(pending.random, pending.counter, seq))
        mac1_ok = sk.mac(crypto.purchase_mac1_data(pending.amount, pending.txn_type, pending.terminal, date, time))
        if mac1_ok != mac1 and not self._has(Defect.MAC1_UNCHECKED):
            raise self._mac_failed()
        mac2 = sk.mac(crypto.purchase_mac2_data(pending.amount))
        tac = self._tac_key.mac(
            crypto.purchase_tac_data(pending.amount, pending.txn_type, pending.terminal, seq, date, time)
        )
        new_balance = (pending.balance - pending.amount) % BALANCE_MODULUS
        trips = None
        if pending.trip_record is not None:
            trips = [pending.trip_record, *self.state.trips[: TRIP_RECORDS - 1]]
        updates = PurseUpdate(
            balance=new_balance,
            offline_counter=pending.counter + (0 if self._has(Defect.COUNTER_STUCK) else 1),
            log=self._with_log(pending, date, time),
            proof=TransactionProof(pending.counter, pending.txn_type, mac2, tac),
            mac_failures=0,
            trips=trips,
        )
        if self._has(Defect.NO_JOURNAL):
            self.eeprom.write_in_place(self.state, updates)
        else:
            self.eeprom.commit(self.state, updates)
        if self._has(Defect.REPLAY) and new_balance >= pending.amount:
            self._carry.pending = replace(pending, balance=new_balance)
        return respond(PurchaseProof(tac, mac2).debit_answer())

    @handles(0x80, 0x52)
    def _credit(self, cmd: Command, carried: _Carry) -> bytes:
        self._expect(cmd, (0x00, 0x00), Credit.size(), Credit.LE)
        pending = carried.pending
        if pending is None or pending.load_key is None:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "CREDIT without INITIALIZE FOR LOAD")
        credit = Credit.from_bytes(cmd.data)
        date, time, mac2 = credit.date, credit.time, credit.mac2
        expected = pending.load_key.mac(crypto.load_mac2_data(pending.amount, TYPE_LOAD, pending.terminal, date, time))
        if expected != mac2 and not self._has(Defect.MAC2_UNCHECKED):
            raise self._mac_failed()
        new_balance = (pending.balance + pending.amount) % BALANCE_MODULUS
        tac = self._tac_key.mac(
            crypto.load_tac_data(new_balance, pending.counter, pending.amount, TYPE_LOAD, pending.terminal, date, time)
        )
        self.eeprom.commit(
            self.state,
            PurseUpdate(
                balance=new_balance,
                online_counter=pending.counter + 1,
                log=self._with_log(pending, date, time),
                mac_failures=0,
            ),
        )
        return respond(tac)

    @handles(0x80, 0x5A)
    def _get_transaction_prove(self, cmd: Command, _: _Carry) -> bytes:
        if cmd.p2 not in (TYPE_PURCHASE, TYPE_COMPOUND):
            raise ApduError(SW.INS_NOT_SUPPORTED)
        self._expect(cmd, (0x00, cmd.p2), 2, 8)
        proof = self.state.proof
        counter = int.from_bytes(cmd.data)
        if proof is None or proof.counter != counter or proof.txn_type != cmd.p2:
            raise ApduError(SW.RECORD_NOT_FOUND, "no committed transaction with that counter")
        return respond(PurchaseProof(proof.tac, proof.mac2).prove_answer())

    @handles(0x84, 0x1E)
    def _application_block(self, cmd: Command, carried: _Carry) -> bytes:
        self._expect(cmd, (0x00, 0x00), 4, 0)
        if carried.challenge is None:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "APPLICATION BLOCK needs a GET CHALLENGE first")
        key = crypto.session_key(self._maintenance_key, crypto.block_key_input(carried.challenge[:4]))
        if key.mac(crypto.BLOCK_COMMAND_HEADER) != cmd.data:
            raise self._mac_failed()
        self.eeprom.write(lambda: setattr(self.state, "blocked", True))
        self._selected = False
        return respond()
