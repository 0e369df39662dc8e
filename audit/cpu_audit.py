"""Chip audit of one CPU purse card through its APDU interface only (spec audit.md, the CPU-* findings).

What a reviewer with a reader and the issuer's keys can do: read the algorithm id, check whose keys the card
holds from the MAC1 that INITIALIZE FOR LOAD returns (no money moves), draw challenges, ask for loads past the
issuer's maximum balance and past the 4-byte balance (INITIALIZE FOR LOAD alone), and, with ``active``, probe the
purse: a DEBIT with a wrong MAC1, plain writes of the card class and expiry (each put back), a replayed DEBIT,
the counter across purchases, the load path (a
CREDIT with a wrong MAC2, a replayed CREDIT, a DEBIT above the balance), power cuts at every
write of a metro DEBIT (when the reader can cut power: a tearing rig), each judged on everything the DEBIT touches
against what the spec says it must write, and, last because it locks the card, the MAC lockout.
Active probes spend at most a few fen of the card's balance.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Protocol

from audit.chip_makers import Maker, cpu_maker
from audit.cpu_files import plain_write_probe
from audit.cpu_fuzz import robustness_probe
from audit.findings import Finding, finding
from cardsim import commands, crypto
from cardsim.apdu import SW, split_response
from cardsim.bcd import bcd_date, bcd_time
from cardsim.commands import Credit, Debit, Initialize, InitializeAnswer, InitKind
from cardsim.crypto import Algorithm, BlockKey
from cardsim.files import JSONValue
from cardsim.issue_options import DEFAULT_MAX_BALANCE
from cardsim.keys import IssuerKeyStore
from cardsim.log_record import LogRecord
from cardsim.purse import BALANCE_MODULUS, SFI_LOG, SFI_TRIPS, TYPE_COMPOUND, TYPE_LOAD, TYPE_PURCHASE
from terminals.flows import TransactionError, select_purse
from terminals.metro import trip_record
from terminals.reader import CardGone, Reader

AUDIT_TERMINAL: Final = bytes.fromhex("A0D100000001")  # the reviewer's terminal number in DEBIT and its MAC1
AUDIT_TIME: Final = dt.datetime(2026, 1, 1, 12, 0, 0)
CHALLENGES: Final = 256
CHI2_LIMIT: Final = 377.0
"""Chi-square of 2,048 challenge bytes over 256 values (255 degrees of freedom) at p = 1e-6 (Wilson-Hilferty):
a good card is flagged about once in a million audits."""
POWER_UPS: Final = 4
LOCKOUT_TRIES: Final = 10
TEAR_POINTS: Final = 16
TRIP_SINGLE: Final = 0x06
"""The tearing probe's trip record type (spec card.md: 06 single): no gate reads it as an open metro entry."""


_POWER_CUT: Final = "a reader that can cut power mid-command (simulated cards have one, a PC/SC reader has not)"


class TearingRig(Protocol):
    """A reader that can cut the card's power part-way through the next command (after ``writes`` writes)."""

    def tear_after(self, writes: int | None) -> None: ...


@dataclass(frozen=True)
class KeySource:
    """A master key store the reviewer holds: the published test set, or the issuer's keys."""

    name: str
    store: IssuerKeyStore
    test: bool


@dataclass(frozen=True)
class CardKeys:
    """Whose keys the card holds, as proven by its MAC1."""

    source: KeySource
    diversified: bool
    load_key: bytes
    purchase: BlockKey
    tac: BlockKey | None  # None when the key set holds no TAC key: the tearing probe then checks MAC2 alone


@dataclass
class CpuAudit:
    """Everything the audit learned about one CPU card."""

    serial: str
    city: str
    algorithm: str
    findings: list[Finding] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    keys: CardKeys | None = None
    maker: Maker | None = None  # from the ATR's historical bytes


class _Traced:
    """A reader that keeps the APDUs of the current probe, for the evidence."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.name = reader.name
        self.lines: list[str] = []

    def connect(self) -> bytes:
        self.lines.append("power on")
        return self.reader.connect()

    def transmit(self, apdu: bytes) -> bytes:
        try:
            answer = self.reader.transmit(apdu)
        except CardGone:
            self.lines.append(f"> {apdu.hex().upper()}  < (no answer: power cut)")
            raise
        self.lines.append(f"> {apdu.hex().upper()}  < {answer.hex().upper()}")
        return answer

    def disconnect(self) -> None:
        self.reader.disconnect()

    def take(self) -> list[str]:
        lines, self.lines = self.lines, []
        return lines


def _sw(answer: bytes) -> int:
    return split_response(answer)[1]


def _initialize(card: _Traced, kind: InitKind, amount: int) -> InitializeAnswer | int:
    """INITIALIZE FOR LOAD/PURCHASE/COMPOUND; the decoded answer, or the status word when refused."""
    command = Initialize(kind, amount, AUDIT_TERMINAL)
    data, sw = split_response(card.transmit(command.to_apdu()))
    if sw != SW.OK or len(data) != kind.answer_length:
        return sw
    return InitializeAnswer.from_bytes(data, kind is InitKind.LOAD)


def _session(purchase_key: BlockKey, init: InitializeAnswer, seq: int) -> BlockKey:
    """The purchase session key of a DEBIT with terminal sequence ``seq`` after ``init``."""
    return crypto.session_key(purchase_key, crypto.purchase_key_input(init.random, init.counter, seq))


def _spoilt(mac: bytes) -> bytes:
    """A MAC with every bit inverted: wrong, whatever the key."""
    return bytes(b ^ 0xFF for b in mac)


def _debit_apdu(
    init: InitializeAnswer,
    purchase_key: BlockKey | None,
    seq: int,
    spoil: bool = False,
    txn_type: int = TYPE_PURCHASE,
    when: dt.datetime = AUDIT_TIME,
    amount: int = 1,
) -> bytes:
    """DEBIT FOR PURCHASE of ``amount`` fen after ``init``; MAC1 from the key, or zeros (spoilt) without one."""
    date, time = bcd_date(when), bcd_time(when)
    mac1 = bytes(4)
    if purchase_key is not None:
        mac1 = _session(purchase_key, init, seq).mac(
            crypto.purchase_mac1_data(amount, txn_type, AUDIT_TERMINAL, date, time)
        )
    return Debit(seq, date, time, _spoilt(mac1) if spoil else mac1).to_apdu()


def _credit_apdu(init: InitializeAnswer, load_key: bytes, spoil: bool = False) -> bytes:
    """CREDIT FOR LOAD of 1 fen after ``init``, with the MAC2 the issuer host would compute (inverted: spoilt)."""
    date, time = bcd_date(AUDIT_TIME), bcd_time(AUDIT_TIME)
    key = BlockKey(Algorithm.from_id(init.algorithm_id), load_key)
    sk = crypto.session_key(key, crypto.load_key_input(init.random, init.counter))
    mac2 = sk.mac(crypto.load_mac2_data(1, TYPE_LOAD, AUDIT_TERMINAL, date, time))
    return Credit(date, time, _spoilt(mac2) if spoil else mac2).to_apdu()


def identify_keys(init: InitializeAnswer, card_serial: bytes, city: str, sources: list[KeySource]) -> CardKeys | None:
    """The key set whose load key reproduces the card's load MAC1: diversified for this card, or the master
    itself (undiversified); None when no key the reviewer holds does."""
    alg = Algorithm.from_id(init.algorithm_id)
    data = crypto.load_mac1_data(init.balance, 1, TYPE_LOAD, AUDIT_TERMINAL)
    for source in sources:
        key_set = source.store.get(city, init.key_version)
        if key_set is None or key_set.load is None:
            continue
        for diversified in (True, False):
            load_key = crypto.diversify(alg, key_set.load, card_serial) if diversified else key_set.load
            sk = crypto.session_key(BlockKey(alg, load_key), crypto.load_key_input(init.random, init.counter))
            if sk.mac(data) == init.mac1:
                purchase = crypto.diversify(alg, key_set.purchase, card_serial) if diversified else key_set.purchase
                tac = None
                if key_set.tac is not None:
                    dtk = crypto.diversify(alg, key_set.tac, card_serial) if diversified else key_set.tac
                    tac = crypto.tac_key(alg, dtk)
                return CardKeys(source, diversified, load_key, BlockKey(alg, purchase), tac)
    return None


# The parts of the card a DEBIT writes, as the tearing probe reads them back.
BALANCE: Final = "balance"
COUNTER: Final = "offline counter"
LOG: Final = "newest log record"
PROOF: Final = "transaction proof"
TRIP: Final = "newest trip record"


def _audit_trip(balance_after: int, when: dt.datetime, city: str) -> bytes:
    """The trip record the tearing probe's metro DEBIT carries: a 1-fen single journey at the audit terminal."""
    return trip_record(TRIP_SINGLE, AUDIT_TERMINAL, "AUD", "0", 1, balance_after, when, city, AUDIT_TERMINAL)


def _expected_debit(
    old: dict[str, str], init: InitializeAnswer, keys: CardKeys, seq: int, when: dt.datetime, trip: bytes
) -> dict[str, str]:
    """What a 1-fen metro DEBIT must leave (spec card.md), from the state before it: balance - 1, counter + 1, a
    log record of the DEBIT, the MAC2 | TAC of the DEBIT for its counter, the trip record it carried."""
    date, time = bcd_date(when), bcd_time(when)
    mac2 = _session(keys.purchase, init, seq).mac(crypto.purchase_mac2_data(1))
    tac = b""
    if keys.tac is not None:
        tac = keys.tac.mac(crypto.purchase_tac_data(1, TYPE_COMPOUND, AUDIT_TERMINAL, seq, date, time))
    record = LogRecord(init.counter, 1, TYPE_COMPOUND, AUDIT_TERMINAL, date, time).to_bytes()
    return {
        BALANCE: str(int(old[BALANCE]) - 1),
        COUNTER: str(int(old[COUNTER]) + 1),
        LOG: record.hex().upper(),
        PROOF: (mac2 + tac).hex().upper(),
        TRIP: trip.hex().upper(),
    }


def _judge(
    old: dict[str, str], expected: dict[str, str], after: dict[str, str], unjudged: frozenset[str]
) -> dict[str, list[str]]:
    """The parts a DEBIT changes, sorted by what they hold after a cut: the 'old' value, the 'new' one, or
    'neither'."""
    verdict: dict[str, list[str]] = {"old": [], "new": [], "neither": []}
    for part, value in after.items():
        if part in unjudged or expected[part] == old[part]:
            continue  # such a part cannot tell the old state from the new
        side = "new" if value == expected[part] else "old" if value == old[part] else "neither"
        verdict[side].append(part)
    return verdict


def _tearing_evidence(
    writes: int,
    old: dict[str, str],
    expected: dict[str, str],
    after: dict[str, str],
    verdict: dict[str, list[str]],
    unjudged: frozenset[str],
) -> list[str]:
    """The lines that show a mixed state: which parts are old and which new at this tear point, then each part."""
    sides = "; ".join(f"{side}: {', '.join(parts)}" for side, parts in verdict.items() if parts)
    lines = [f"power cut after {writes} writes of the DEBIT leaves a mix ({sides}), expected all old or all new"]
    lines += [f"{part}: before {old[part]}, spec's new {expected[part]}, after the cut {after[part]}" for part in after]
    lines += [f"{part} not judged: it does not step on this card (CPU-COUNTER)" for part in sorted(unjudged)]
    return lines


def chi_square(data: bytes) -> float:
    """Pearson's chi-square of the byte values of ``data`` against a uniform distribution."""
    expected = len(data) / 256
    counts = Counter(data)
    return sum((counts.get(v, 0) - expected) ** 2 / expected for v in range(256))


class _Probe:
    """One card's audit session: the traced reader, what was learned, and the findings so far."""

    def __init__(self, reader: Reader, result: CpuAudit) -> None:
        self.card = _Traced(reader)
        self.result = result

    def add(self, rule: str, evidence: list[str], **details: JSONValue) -> None:
        self.result.findings.append(finding(rule, self.result.serial, "cpu", self.result.city, evidence, **details))

    def fresh(self) -> None:
        """Power-cycle and SELECT the purse (every probe starts from a clean session)."""
        self.card.connect()
        select_purse(self.card)

    def begin_purchase(self, kind: InitKind = InitKind.PURCHASE) -> InitializeAnswer:
        """A clean session and INITIALIZE FOR PURCHASE (or COMPOUND) of 1 fen; TransactionError when the card
        refuses."""
        self.fresh()
        init = _initialize(self.card, kind, 1)
        if isinstance(init, int):
            raise TransactionError(f"INITIALIZE FOR {kind.name}", f"answered {init:04X}", init)
        return init

    def state(self) -> tuple[int, int]:
        """(balance, offline counter) from an INITIALIZE FOR PURCHASE that is never completed."""
        init = self.begin_purchase()
        return init.balance, init.counter

    def read(self, apdu: bytes, what: str) -> bytes:
        """The data of a read command; empty when the card holds no such record (6A83)."""
        data, sw = split_response(self.card.transmit(apdu))
        if sw == SW.RECORD_NOT_FOUND:
            return b""
        if sw != SW.OK:
            raise TransactionError(what, f"answered {sw:04X}", sw)
        return data

    def debit_state(self, proof_counter: int | None, tac_known: bool) -> dict[str, str]:
        """Everything a metro DEBIT touches, read in a clean session, as the evidence prints it: the balance
        (GET BALANCE), the offline counter (an INITIALIZE never completed), the newest log and trip records and
        the transaction proof (GET TRANSACTION PROVE) for ``proof_counter`` (None: the counter just read)."""
        init = self.begin_purchase()
        counter = init.counter if proof_counter is None else proof_counter
        balance = self.read(commands.get_balance(), "GET BALANCE")
        log = self.read(commands.read_record(SFI_LOG, 1), "READ RECORD (transaction log)")
        trip = self.read(commands.read_record(SFI_TRIPS, 1), "READ RECORD (trip log)")
        proof = self.read(commands.get_transaction_prove(TYPE_COMPOUND, counter), "GET TRANSACTION PROVE")
        if not tac_known:
            proof = proof[:4]  # MAC2 alone: without the TAC key the TAC cannot be computed
        return {
            BALANCE: str(int.from_bytes(balance)),
            COUNTER: str(init.counter),
            LOG: log.hex().upper() or "none",
            PROOF: proof.hex().upper() or "none",
            TRIP: trip.hex().upper() or "none",
        }

    def purchase(self, key: BlockKey, seq: int) -> tuple[bytes, bytes]:
        """A 1-fen purchase: (the DEBIT APDU, the card's answer)."""
        apdu = _debit_apdu(self.begin_purchase(), key, seq)
        return apdu, self.card.transmit(apdu)

    # --- passive -------------------------------------------------------------------------------

    def algorithm_and_keys(self, sources: list[KeySource], card_serial: bytes) -> None:
        self.fresh()
        init = _initialize(self.card, InitKind.LOAD, 1)
        if isinstance(init, int):
            self.result.skipped.append(f"{self.result.serial}: key check: INITIALIZE FOR LOAD answered {init:04X}")
            init = _initialize(self.card, InitKind.PURCHASE, 0)
            if isinstance(init, int):
                raise TransactionError("INITIALIZE FOR PURCHASE", f"answered {init:04X}", init)
            evidence = self.card.take()
        else:
            evidence = self.card.take()
            self.result.keys = identify_keys(init, card_serial, self.result.city, sources)
        try:
            alg = Algorithm.from_id(init.algorithm_id)
        except ValueError:
            self.result.skipped.append(f"{self.result.serial}: unknown algorithm id {init.algorithm_id:02X}")
            return
        self.result.algorithm = alg.value
        rule = {Algorithm.DES: "CPU-SINGLE-DES", Algorithm.DES3: "CPU-3DES", Algorithm.SM4: "CPU-SM4"}[alg]
        self.add(rule, [*evidence, f"algorithm id {init.algorithm_id:02X} = {alg.value}"])
        keys = self.result.keys
        if keys is None:
            return
        how = "diversified for this card" if keys.diversified else "the master key itself, not diversified"
        proof = [*evidence, f"load MAC1 {init.mac1.hex().upper()} verifies with the {keys.source.name}, {how}"]
        if keys.source.test:
            self.add("CPU-TEST-KEYS", proof, key_source=keys.source.name)
        if not keys.diversified:
            self.add("CPU-UNDIVERSIFIED", proof, key_source=keys.source.name)

    def load_limits(self, issuer_max: int) -> None:
        """INITIALIZE FOR LOAD of one fen past the issuer's published maximum balance (the card does not tell
        its own), and of one fen past the 4-byte balance, which any card must refuse. No CREDIT follows, so
        nothing on the card changes, whatever it answers. An answer other than the data or the refusal (6985)
        tests nothing: it is listed as skipped, and the rest of the audit goes on."""
        self.card.take()  # the randomness probe's challenges are not this probe's evidence
        self.fresh()
        data, sw = split_response(self.card.transmit(commands.get_balance()))
        if sw != SW.OK or len(data) != 4:
            self.card.take()
            self._skip_load_limits(f"GET BALANCE answered {sw:04X} with {len(data)} bytes: no limit tested")
            return
        balance = int.from_bytes(data)
        limits = {f"the issuer's maximum balance of {issuer_max} fen": issuer_max, "the 4-byte balance": 0xFFFFFFFF}
        accepted: dict[int, str] = {}
        for what, limit in limits.items():
            amount = max(1, limit - balance + 1)
            if amount >= BALANCE_MODULUS:
                continue  # a zero balance: no 4-byte amount can take it past 4 bytes
            answer = _initialize(self.card, InitKind.LOAD, amount)
            if not isinstance(answer, int):
                line = f"INITIALIZE FOR LOAD of {amount} fen on a balance of {balance} fen, past {what}: 9000"
                accepted[amount] = line
            elif answer != SW.CONDITIONS_NOT_SATISFIED:
                why = f"INITIALIZE FOR LOAD of {amount} fen answered {answer:04X}, not 6985: {what} not tested"
                self._skip_load_limits(why)
        evidence = self.card.take()
        if accepted:
            self.add(
                "CPU-LOAD-ABOVE-MAX",
                [*evidence, *accepted.values()],
                balance=balance,
                issuer_max=issuer_max,
                amounts=list[JSONValue](accepted),
            )

    def _skip_load_limits(self, why: str) -> None:
        self.result.skipped.append(f"{self.result.serial}: load-limit probe: {why}")

    def randomness(self) -> None:
        draws = []
        for _ in range(POWER_UPS):
            self.card.connect()
            draws.append(self._challenge())
        first_after_power_up = set(draws)
        self.card.take()
        draws += [self._challenge() for _ in range(CHALLENGES - POWER_UPS)]
        repeats = len(draws) - len(set(draws))
        chi2 = chi_square(b"".join(draws))
        problems = []
        if repeats:
            problems.append(f"{repeats} repeated 8-byte challenges in {len(draws)} draws")
        if len(first_after_power_up) < POWER_UPS:
            problems.append(f"the first challenge after {POWER_UPS} power-ups took {len(first_after_power_up)} values")
        if chi2 > CHI2_LIMIT:
            problems.append(f"chi-square {chi2:.0f} over {len(draws) * 8} bytes (limit {CHI2_LIMIT:.0f}, p = 1e-6)")
        if problems:
            sample = [d.hex().upper() for d in draws[:20]]
            self.add("CPU-WEAK-RANDOM", [*problems, "first challenges: " + " ".join(sample)], chi_square=round(chi2))

    def _challenge(self) -> bytes:
        data, sw = split_response(self.card.transmit(commands.get_challenge(8)))
        if sw != SW.OK or len(data) != 8:
            raise TransactionError("GET CHALLENGE", f"answered {sw:04X}", sw)
        return data

    # --- active --------------------------------------------------------------------------------

    def wrong_mac1(self) -> None:
        balance, _ = self.state()
        self.fresh()
        init = _initialize(self.card, InitKind.PURCHASE, 1)
        if isinstance(init, int):
            self.result.skipped.append(f"{self.result.serial}: wrong-MAC1 probe: INITIALIZE answered {init:04X}")
            return
        keys = self.result.keys
        answer = self.card.transmit(_debit_apdu(init, keys.purchase if keys else None, 1, spoil=True))
        evidence = self.card.take()
        after, _ = self.state()
        if _sw(answer) == SW.OK or after != balance:
            self.add("CPU-MAC1-NOT-CHECKED", [*evidence, f"balance {balance} -> {after} fen"])

    def replay(self, key: BlockKey) -> None:
        before, _ = self.state()
        self.card.take()
        apdu, first = self.purchase(key, 2)
        again = self.card.transmit(apdu)
        evidence = self.card.take()
        after, _ = self.state()
        if _sw(first) == SW.OK and _sw(again) == SW.OK:
            self.add("CPU-REPLAY", [*evidence, f"balance {before} -> {after} fen for one 1-fen purchase"])

    def counter(self, key: BlockKey) -> bool:
        """Two purchases; whether the offline counter stepped by one each time."""
        states = [self.state()]
        for seq in (3, 4):
            _, answer = self.purchase(key, seq)
            if _sw(answer) != SW.OK:
                raise TransactionError("DEBIT FOR PURCHASE", f"answered {_sw(answer):04X}", _sw(answer))
            states.append(self.state())
        evidence = self.card.take()
        counters = [c for _, c in states]
        if all(b == a + 1 for a, b in itertools.pairwise(counters)):
            return True
        self.add("CPU-COUNTER", [*evidence, f"offline counter across two purchases: {counters}"])
        return False

    def begin_load(self) -> InitializeAnswer | None:
        """A clean session and INITIALIZE FOR LOAD of 1 fen; None (and a skipped line) when the card refuses."""
        self.fresh()
        init = _initialize(self.card, InitKind.LOAD, 1)
        if isinstance(init, int):
            self.result.skipped.append(f"{self.result.serial}: load probe: INITIALIZE FOR LOAD answered {init:04X}")
            return None
        return init

    def loads(self, keys: CardKeys) -> None:
        """The load path: a 1-fen CREDIT with a wrong MAC2, a genuine 1-fen CREDIT sent twice, and a DEBIT of one
        fen more than the balance. A good card refuses all but the first genuine CREDIT, so it ends 1 fen richer,
        and the wrong MAC2's MAC failure is cleared by that CREDIT before the lockout probe counts failures."""
        before, _ = self.state()
        self.card.take()
        init = self.begin_load()
        if init is None:
            return
        answer = self.card.transmit(_credit_apdu(init, keys.load_key, spoil=True))
        evidence = self.card.take()
        after, _ = self.state()
        if _sw(answer) == SW.OK or after != before:
            self.add("CPU-MAC2-NOT-CHECKED", [*evidence, f"balance {before} -> {after} fen after a wrong MAC2"])
        self.card.take()
        init = self.begin_load()
        if init is None:
            return
        apdu = _credit_apdu(init, keys.load_key)
        first, again = self.card.transmit(apdu), self.card.transmit(apdu)
        evidence = self.card.take()
        if _sw(first) == SW.OK and _sw(again) == SW.OK:
            balance, _ = self.state()
            self.add(
                "CPU-REPLAY", [*evidence, f"replayed CREDIT FOR LOAD: balance {after} -> {balance} for one 1-fen load"]
            )
        self.overdraft(keys.purchase)

    def overdraft(self, key: BlockKey) -> None:
        """INITIALIZE FOR PURCHASE and DEBIT of one fen more than the balance: the spec's card refuses the
        INITIALIZE (9401); a card whose DEBIT then succeeds lets a purse go negative."""
        before, _ = self.state()
        self.card.take()
        self.fresh()
        init = _initialize(self.card, InitKind.PURCHASE, before + 1)
        if isinstance(init, int):
            self.card.take()
            return
        answer = self.card.transmit(_debit_apdu(init, key, 5, amount=before + 1))
        evidence = self.card.take()
        if _sw(answer) == SW.OK:
            self.add("CPU-OVERDRAFT", [*evidence, f"DEBIT of {before + 1} fen from a balance of {before} fen accepted"])

    def tearing(self, keys: CardKeys, rig: TearingRig, counter_steps: bool) -> None:
        """Cut power after 0, 1, 2... writes of a 1-fen metro DEBIT, until one completes. After each cut everything
        the DEBIT touches must be all old or all new, the new state computed from the old one as the spec says the
        DEBIT writes it: judged against what this card did before, one flaw would hide another."""
        # A counter that never steps reads 'old' after every DEBIT, torn or not; CPU-COUNTER has reported it.
        unjudged = frozenset() if counter_steps else frozenset({COUNTER})
        tac_known = keys.tac is not None
        for writes in range(TEAR_POINTS):
            seq, when = 10 + writes, AUDIT_TIME + dt.timedelta(seconds=writes)  # each log record differs
            old = self.debit_state(None, tac_known)
            init = self.begin_purchase(InitKind.COMPOUND)
            trip = _audit_trip(int(old[BALANCE]) - 1, when, self.result.city)
            sw = _sw(self.card.transmit(commands.update_capp_data_cache(SFI_TRIPS, trip)))
            if sw != SW.OK:
                self.result.skipped.append(
                    f"{self.result.serial}: tearing probe: UPDATE CAPP DATA CACHE answered {sw:04X}"
                )
                return
            rig.tear_after(writes)
            try:
                answer = self.card.transmit(_debit_apdu(init, keys.purchase, seq, txn_type=TYPE_COMPOUND, when=when))
            except CardGone:
                answer = None
            finally:
                rig.tear_after(None)
            if answer is not None:
                self.card.take()
                if _sw(answer) != SW.OK:
                    self.result.skipped.append(f"{self.result.serial}: tearing probe: DEBIT answered {_sw(answer):04X}")
                return  # the DEBIT finished before the cut: every point has been tried
            expected = _expected_debit(old, init, keys, seq, when, trip)
            after = self.debit_state(init.counter, tac_known)
            verdict = _judge(old, expected, after, unjudged)
            if verdict["neither"] or (verdict["old"] and verdict["new"]):
                self.add(
                    "CPU-TEARING",
                    [*self.card.take(), *_tearing_evidence(writes, old, expected, after, verdict, unjudged)],
                    writes=writes,
                    **{side: list[JSONValue](parts) for side, parts in verdict.items()},
                )
                return
            self.card.take()

    def protected_files(self) -> None:
        """Plain (MAC-less) writes of the card class and the expiry date (audit.cpu_files), each put back."""
        self.card.take()  # what earlier probes left: the evidence starts with this probe's power-up
        found = plain_write_probe(self.card)
        trace = self.card.take()
        self.result.skipped += [f"{self.result.serial}: plain-write probe: {line}" for line in found.skipped]
        if found.written:
            self.add(
                "CPU-UNPROTECTED-FILE",
                [*trace, *found.evidence],
                files=list[JSONValue](found.written),
                restored=found.restored,
            )

    def robustness(self) -> None:
        """The bounded APDU fuzz (audit.cpu_fuzz): every answer a status word, nothing on the card changed. Active:
        a flawed card changes state; it opens no session, so it spends nothing and counts no MAC failure."""
        found = robustness_probe(self.card)
        self.card.take()  # the fuzz's own ~1,300 lines: its evidence names the commands that mattered
        if found.evidence:
            self.add("CPU-ROBUSTNESS", found.evidence, commands=found.sent)

    def lockout(self) -> None:
        answers = []
        for _ in range(LOCKOUT_TRIES):
            self.fresh()
            challenge, sw = split_response(self.card.transmit(commands.get_challenge(4)))
            if sw != SW.OK:
                answers.append(sw)
                break
            sw = _sw(self.card.transmit(commands.application_block(bytes(b ^ 0x5A for b in challenge))))
            answers.append(sw)
            if sw != SW.MAC_INVALID:
                break
        evidence = self.card.take()
        if all(sw == SW.MAC_INVALID for sw in answers):
            self.add("CPU-NO-LOCKOUT", [*evidence[-4:], f"{len(answers)} wrong MACs, all answered 9302, never locked"])


def audit_cpu(
    reader: Reader,
    sources: list[KeySource],
    *,
    active: bool,
    rig: TearingRig | None = None,
    issuer_max: int = DEFAULT_MAX_BALANCE,
    progress: Callable[[str], None] = lambda _: None,
) -> CpuAudit:
    """Run every applicable CPU check on the card in ``reader``; ``issuer_max``: the maximum balance the issuer
    publishes for its cards, in fen. TransactionError/CardGone when the card cannot be audited at all (it left,
    or it is not a purse)."""
    probe = _Probe(reader, CpuAudit("", "", ""))
    atr = probe.card.connect()
    app = select_purse(probe.card)
    probe.card.take()  # each probe's evidence starts with its own SELECT
    serial = app.application_serial.hex().upper()
    result = probe.result
    result.serial, result.city, result.maker = serial, app.city, cpu_maker(atr)
    progress(f"CPU card {serial}: algorithm, keys, randomness, load limits")
    probe.algorithm_and_keys(sources, app.card_serial)
    probe.randomness()
    probe.load_limits(issuer_max)
    if not active:
        result.skipped.append(
            f"{serial}: active probes (wrong MAC1, plain file writes, replay, counter, loads, robustness fuzz,"
            f" lockout) need --active; the tearing probe needs --active and {_POWER_CUT}"
        )
        return result
    progress(f"CPU card {serial}: active probes")
    probe.wrong_mac1()
    probe.protected_files()
    keys = result.keys
    if keys is None:
        result.skipped.append(
            f"{serial}: replay, counter, load and tearing probes need the card's purchase key (--keys)"
        )
    else:
        probe.replay(keys.purchase)
        counter_steps = probe.counter(keys.purchase)
        probe.loads(keys)
        if rig is None:
            result.skipped.append(f"{serial}: tearing probe needs {_POWER_CUT}")
        else:
            probe.tearing(keys, rig, counter_steps)
    progress(f"CPU card {serial}: robustness fuzz")
    probe.robustness()  # before the lockout, after which every command answers 9303
    probe.lockout()
    return result
