"""Chip audit of one CPU purse card through its APDU interface only (spec audit.md, the CPU-* findings).

What a reviewer with a reader and the issuer's keys can do: read the algorithm id, check whose keys the card
holds from the MAC1 that INITIALIZE FOR LOAD returns (no money moves), draw challenges, and, with ``active``,
probe the purse: a DEBIT with a wrong MAC1, a replayed DEBIT, the counter across purchases, power cuts at every
write (when the reader can cut power: a tearing rig) and, last because it locks the card, the MAC lockout.
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
from audit.findings import Finding, finding
from cardsim import commands, crypto
from cardsim.apdu import SW, split_response
from cardsim.bcd import bcd_date, bcd_time
from cardsim.commands import Debit, Initialize, InitializeAnswer, InitKind
from cardsim.crypto import Algorithm, BlockKey
from cardsim.files import JSONValue
from cardsim.keys import IssuerKeyStore
from cardsim.purse import TYPE_LOAD, TYPE_PURCHASE
from terminals.flows import TransactionError, select_purse
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


def _initialize(card: _Traced, load: bool, amount: int) -> InitializeAnswer | int:
    """INITIALIZE FOR LOAD/PURCHASE; the decoded answer, or the status word when refused."""
    command = Initialize(InitKind.LOAD if load else InitKind.PURCHASE, amount, AUDIT_TERMINAL)
    data, sw = split_response(card.transmit(command.to_apdu()))
    if sw != SW.OK or len(data) != command.kind.answer_length:
        return sw
    return InitializeAnswer.from_bytes(data, load)


def _debit_apdu(init: InitializeAnswer, purchase_key: BlockKey | None, seq: int, spoil: bool = False) -> bytes:
    """DEBIT FOR PURCHASE of 1 fen after ``init``; MAC1 from the key, or zeros (spoilt) without one."""
    date, time = bcd_date(AUDIT_TIME), bcd_time(AUDIT_TIME)
    mac1 = bytes(4)
    if purchase_key is not None:
        sk = crypto.session_key(purchase_key, crypto.purchase_key_input(init.random, init.counter, seq))
        mac1 = sk.mac(crypto.purchase_mac1_data(1, TYPE_PURCHASE, AUDIT_TERMINAL, date, time))
    if spoil:
        mac1 = bytes(b ^ 0xFF for b in mac1)
    return Debit(seq, date, time, mac1).to_apdu()


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
                return CardKeys(source, diversified, load_key, BlockKey(alg, purchase))
    return None


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

    def begin_purchase(self) -> InitializeAnswer:
        """A clean session and INITIALIZE FOR PURCHASE of 1 fen; TransactionError when the card refuses."""
        self.fresh()
        init = _initialize(self.card, False, 1)
        if isinstance(init, int):
            raise TransactionError("INITIALIZE FOR PURCHASE", f"answered {init:04X}", init)
        return init

    def state(self) -> tuple[int, int]:
        """(balance, offline counter) from an INITIALIZE FOR PURCHASE that is never completed."""
        init = self.begin_purchase()
        return init.balance, init.counter

    def purchase(self, key: BlockKey, seq: int) -> tuple[bytes, bytes]:
        """A 1-fen purchase: (the DEBIT APDU, the card's answer)."""
        apdu = _debit_apdu(self.begin_purchase(), key, seq)
        return apdu, self.card.transmit(apdu)

    # --- passive -------------------------------------------------------------------------------

    def algorithm_and_keys(self, sources: list[KeySource], card_serial: bytes) -> None:
        self.fresh()
        init = _initialize(self.card, True, 1)
        if isinstance(init, int):
            self.result.skipped.append(f"{self.result.serial}: key check: INITIALIZE FOR LOAD answered {init:04X}")
            init = _initialize(self.card, False, 0)
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
        init = _initialize(self.card, False, 1)
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

    def counter(self, key: BlockKey) -> tuple[int, int]:
        """Two purchases; the (balance, counter) change one untorn purchase makes on this card."""
        states = [self.state()]
        for seq in (3, 4):
            _, answer = self.purchase(key, seq)
            if _sw(answer) != SW.OK:
                raise TransactionError("DEBIT FOR PURCHASE", f"answered {_sw(answer):04X}", _sw(answer))
            states.append(self.state())
        evidence = self.card.take()
        counters = [c for _, c in states]
        if any(b != a + 1 for a, b in itertools.pairwise(counters)):
            self.add("CPU-COUNTER", [*evidence, f"offline counter across two purchases: {counters}"])
        return states[1][0] - states[0][0], states[1][1] - states[0][1]

    def tearing(self, key: BlockKey, rig: TearingRig, step: tuple[int, int]) -> None:
        """Cut power after 0, 1, 2... writes of a DEBIT; each outcome must be all-old or all-new."""
        for writes in range(TEAR_POINTS):
            before = self.state()
            init = self.begin_purchase()
            rig.tear_after(writes)
            try:
                self.card.transmit(_debit_apdu(init, key, 10 + writes))
                torn = False
            except CardGone:
                torn = True
            finally:
                rig.tear_after(None)
            after = self.state()
            change = (after[0] - before[0], after[1] - before[1])
            evidence = self.card.take()
            if change not in ((0, 0), step):
                self.add(
                    "CPU-TEARING",
                    [
                        *evidence,
                        f"power cut after {writes} writes: (balance, counter) {before} -> {after}, "
                        f"expected no change or {step}",
                    ],
                    writes=writes,
                )
                return
            if not torn:
                return  # the DEBIT finished before the cut: every point has been tried

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
    progress: Callable[[str], None] = lambda _: None,
) -> CpuAudit:
    """Run every applicable CPU check on the card in ``reader``; TransactionError/CardGone when the card
    cannot be audited at all (it left, or it is not a purse)."""
    probe = _Probe(reader, CpuAudit("", "", ""))
    atr = probe.card.connect()
    app = select_purse(probe.card)
    probe.card.take()  # each probe's evidence starts with its own SELECT
    serial = app.application_serial.hex().upper()
    result = probe.result
    result.serial, result.city, result.maker = serial, app.city, cpu_maker(atr)
    progress(f"CPU card {serial}: algorithm, keys, randomness")
    probe.algorithm_and_keys(sources, app.card_serial)
    probe.randomness()
    if not active:
        result.skipped.append(f"{serial}: active probes (wrong MAC1, replay, counter, tearing, lockout) need --active")
        return result
    progress(f"CPU card {serial}: active probes")
    probe.wrong_mac1()
    keys = result.keys
    if keys is None:
        result.skipped.append(f"{serial}: replay, counter and tearing probes need the card's purchase key (--keys)")
    else:
        probe.replay(keys.purchase)
        step = probe.counter(keys.purchase)
        if rig is None:
            result.skipped.append(f"{serial}: tearing probe needs a reader that can cut power mid-command")
        else:
            probe.tearing(keys.purchase, rig, step)
    probe.lockout()
    return result
