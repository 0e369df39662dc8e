"""Batched TAC / M1 record MAC verification gives exactly the per-record verdicts: on records signed by real
cards and terminals, and on a generated mixed corpus of good and forged records (every kind, 3DES, single DES,
SM4 and M1, several records of a card and many cards, wrong keys, unknown issuers, a key version the store
lacks, a serial of another issuer) checked by keys that are right, wrong, or without TAC masters."""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import KEYS, new_card
from terminal_support import Clock, m1_card, make_terminal

from cardsim import crypto
from cardsim.crypto import Algorithm, BlockKey
from cardsim.issuer import HostRefusal, IssuerHost
from cardsim.keys import IssuerKeySet, IssuerKeyStore
from cardsim.mifare import M1Card
from cardsim.personalise import application_serial
from cardsim.purse import PurseCard
from clearing import verify
from clearing.verify import ALGS, TacColumns, expected_macs, expected_tac, tac_problem, tac_problems
from terminals.kinds import TerminalKind as Kind
from terminals.messages import TXN_SCHEMA, CardRef, TxnAlg, TxnKind, TxnRecord, parse_record
from terminals.reader import InProcessReader
from terminals.terminal import Terminal

V2 = IssuerKeySet("4510", 2, *(bytes([n]) * 16 for n in (0x21, 0x22, 0x23, 0x24)))
"""A second key version of Jinan: records signed with it verify only with a store that holds it."""
ALL_KEYS = IssuerKeyStore([*KEYS, V2])
SIGNER = IssuerHost(ALL_KEYS)


def _wrong_for(city: str) -> IssuerKeyStore:
    """The published test keys with ``city``'s TAC and purchase (M1 record MAC) masters replaced."""
    return IssuerKeyStore([replace(s, tac=bytes(16), purchase=bytes(16)) if s.city == city else s for s in ALL_KEYS])


VERIFIERS = {
    "right keys": ALL_KEYS,
    "no version 2": KEYS,
    "wrong keys of 4560": _wrong_for("4560"),
    "no TAC masters": ALL_KEYS.for_psam(),
}

Card = tuple[Literal["cpu", "m1"], str, str, TxnAlg]


# (tech, issuer, card id, algorithm): a small fleet, so that a corpus holds several records of a card
def cpu(issuer: str, serial_city: str, sequence: int, alg: TxnAlg) -> Card:
    return ("cpu", issuer, application_serial(serial_city, sequence).hex(), alg)


FLEET: list[Card] = [
    *(cpu(city, city, 7 + n, alg) for city in ("4510", "4560") for n, alg in enumerate(ALGS)),
    cpu("4530", "4530", 99, "sm4"),
    cpu("4999", "4999", 1, "3des"),  # an issuer no key store knows
    cpu("4560", "4510", 3, "sm4"),  # a Jinan serial under Yantai
    ("m1", "4510", "1D3B993F", "sm4"),
    ("m1", "4530", "A0B1C2D3", "3des"),  # an M1 record MAC is SM4 whatever the record says
    ("m1", "4999", "00000001", "sm4"),
]
ZONES = [dt.timezone(dt.timedelta(hours=8)), dt.UTC, dt.timezone(dt.timedelta(hours=-3, minutes=-30))]


def make_record(
    card: Card, kind: TxnKind, version: int, forgery: str, when: dt.datetime, numbers: tuple[int, int, int, int, int]
) -> TxnRecord:
    """A record of ``card``, signed with its issuer's keys when they exist (else any TAC), then forged: its TAC
    changed (``tac``), or its terminal sequence after signing (``seq``), or not (``none``)."""
    tech, issuer, card_id, alg = card
    amount, before, counter, terminal, seq = numbers
    unsigned = TxnRecord(
        schema=TXN_SCHEMA,
        seq=1 + seq,
        kind=kind,
        tech=tech,
        card=CardRef(issuer=issuer, serial=card_id) if tech == "cpu" else CardRef(issuer=issuer, uid=card_id),
        card_counter=counter,
        amount=amount,
        balance_before=amount + before,
        balance_after=2 * amount + before if kind == "load" else before,
        terminal=f"{terminal:012X}",
        terminal_seq=seq,
        psam="0011",
        acquirer=("4510", "4560", "4530")[seq % 3],
        time=when.isoformat(),
        tac=f"{terminal % 2**32:08X}",
        key_version=version,
        alg=alg,
    )
    with contextlib.suppress(HostRefusal):
        unsigned = unsigned.model_copy(update={"tac": expected_tac(SIGNER, unsigned).hex().upper()})
    if forgery == "tac":
        return unsigned.model_copy(update={"tac": f"{int(unsigned.tac, 16) ^ 0x00010000:08X}"})
    if forgery == "seq":
        return unsigned.model_copy(update={"terminal_seq": (seq + 1) % 2**32})
    return unsigned


KINDS: list[TxnKind] = ["purchase", "load", "metro_entry", "metro_exit"]
VERSIONS = [1, 2, 7]  # 2: only Jinan has it; 7: nobody
FORGERIES = ["none", "tac", "seq"]
records = st.builds(
    make_record,
    st.sampled_from(FLEET),
    st.sampled_from(KINDS),
    st.sampled_from(VERSIONS),
    st.sampled_from(FORGERIES),
    st.datetimes(dt.datetime(2000, 1, 1), dt.datetime(2099, 12, 31), timezones=st.sampled_from(ZONES)),
    st.tuples(
        st.integers(0, 2**29),
        st.integers(0, 2**29),
        st.integers(0, 0xFFFF),
        st.integers(0, 2**48 - 1),
        st.integers(0, 2**32 - 1),
    ),
)


def corpus() -> list[TxnRecord]:
    """Every card of the fleet, every kind, key version and forgery, a few records each (so several of a card)."""
    start = dt.datetime(2026, 11, 24, 5, 59, 58, tzinfo=ZONES[0])
    combos = itertools.product(FLEET, KINDS, VERSIONS, FORGERIES)
    return [
        make_record(*combo, start + dt.timedelta(seconds=97 * n), (n * 10, n, n % 7, 0x451000000000 + n, n))
        for n, combo in enumerate(combos)
    ]


@pytest.fixture
def always_batched() -> Iterator[None]:
    """tac_problems verifies even one record as columns."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(verify, "BATCH_LEAST", 0)
        yield


def _per_record(host: IssuerHost, batch: list[TxnRecord]) -> list[str | None]:
    return [tac_problem(host, record) for record in batch]


@settings(max_examples=150, deadline=None)
@given(batch=st.lists(records, max_size=40), order=st.sampled_from(["as drawn", "by card"]))
def test_batched_verdicts_are_the_per_record_verdicts(batch: list[TxnRecord], order: str) -> None:
    if order == "by card":  # long runs of one card key, as reconcile gives them
        batch = sorted(batch, key=lambda r: (r.card.issuer, r.card.id, r.alg, r.key_version))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(verify, "BATCH_LEAST", 0)
        for keys in VERIFIERS.values():
            host = IssuerHost(keys)
            assert tac_problems(host, batch) == _per_record(IssuerHost(keys), batch)


def test_the_corpus_covers_every_verdict(always_batched: None) -> None:
    """A fixed draw of the corpus holds every kind of verdict, and the batch finds each where the per-record
    check does (so the property above cannot pass on a corpus that only verifies)."""
    batch = corpus()
    verdicts = set()
    for keys in VERIFIERS.values():
        found = tac_problems(IssuerHost(keys), batch)
        assert found == _per_record(IssuerHost(keys), batch)
        verdicts |= set(found)
    assert {
        None,
        "TAC does not verify",
        "M1 record MAC does not verify",
        "no keys for issuer 4999 version 1",
        "no keys for issuer 4510 version 7",
        "no keys for issuer 4510 version 2",
        "card serial does not belong to issuer 4560",
        "this key store holds no tac keys",
    } <= verdicts


def test_expected_macs_are_the_single_records_macs() -> None:
    batch = corpus()
    expected = expected_macs(SIGNER, TacColumns.of_records(batch))
    for i, record in enumerate(batch):
        try:
            mac = int.from_bytes(expected_tac(SIGNER, record))
        except HostRefusal as err:
            assert (expected.macs[i], expected.refused[i]) == (-1, str(err))
        else:
            assert (expected.macs[i], i in expected.refused) == (mac, False)


@pytest.mark.parametrize(
    ("field", "value", "kinds"),
    [
        ("amount", 2**32, ["purchase", "load"]),
        ("amount", -1, ["purchase"]),
        ("card_counter", 2**16, ["load"]),  # the load TAC's online counter; an M1 record MAC's counter
        ("terminal_seq", 2**32, ["purchase", "metro_entry"]),
        ("balance_after", 2**40, ["load"]),
    ],
)
def test_a_number_too_large_for_its_field_is_refused_in_a_batch_as_one_by_one(
    always_batched: None, field: str, value: int, kinds: list[str]
) -> None:
    """A number beyond its field of the MAC data (the schema bounds them; a file or a bug may not) is refused
    with the same reason whether the records go one by one or as columns, never cut to the field's width: a
    record signed over the cut value would verify."""
    batch = [r for r in corpus() if r.kind in kinds]
    spoilt = [r.model_copy(update={field: value}) for r in batch]
    cut = value % 2**32 if field != "card_counter" else value % 2**16
    signed_cut = [r.model_copy(update={field: value}) for r in batch]
    for i, record in enumerate(batch):  # signed over what the batched path used to see: the value cut
        with contextlib.suppress(HostRefusal):
            tac = expected_tac(SIGNER, record.model_copy(update={field: cut})).hex().upper()
            signed_cut[i] = signed_cut[i].model_copy(update={"tac": tac})
    reasons: set[str | None] = set()
    for keys in VERIFIERS.values():
        for records in (spoilt, signed_cut):
            found = tac_problems(IssuerHost(keys), records)
            assert found == _per_record(IssuerHost(keys), records)
            reasons |= set(found)
    named = {"card_counter": "counter"}.get(field, field)
    assert None not in reasons
    assert f"{named} {value} does not fit the MAC data's {4 if named != 'counter' else 2} bytes" in reasons


def test_no_records_and_one_record(always_batched: None) -> None:
    assert tac_problems(SIGNER, []) == []
    assert expected_macs(SIGNER, TacColumns.of_records([])).macs.tolist() == []
    record = corpus()[0]
    assert tac_problems(SIGNER, [record]) == [tac_problem(SIGNER, record)]


def test_cbc_macs_chain_many_messages_like_mac_does_one() -> None:
    for alg in Algorithm:
        key = BlockKey(alg, bytes(range(16)))
        size = alg.block_size
        messages = [crypto.pad80(bytes([n]) * 19, size) for n in range(5)]
        steps = [b"".join(m[k : k + size] for m in messages) for k in range(0, len(messages[0]), size)]
        chains = key.cbc_macs(steps)
        assert [chains[n * size : n * size + crypto.MAC_SIZE] for n in range(5)] == [
            key.mac(bytes([n]) * 19) for n in range(5)
        ]


def _taps(terminal: Terminal, *cards: PurseCard | M1Card) -> list[TxnRecord]:
    for card in cards:
        result = terminal.tap(InProcessReader(card)) if isinstance(card, PurseCard) else terminal.tap_m1(card)
        assert result.ok, result.message
    return [parse_record(json.loads(raw)) for _, raw in terminal.outbox.unacked(0, 1000)]


def test_records_of_real_cards_verify_in_a_batch_and_forgeries_do_not(tmp_path: Path, always_batched: None) -> None:
    """Records signed by the simulated cards and terminals (purchase, load, metro entry and exit, M1; 3DES,
    single DES, SM4), several of one card, checked in one batch; then each with one field changed."""
    clock = Clock()
    cards = [
        new_card(alg, 50_000, city, seed)
        for seed, (alg, city) in enumerate([(Algorithm.DES3, "4510"), (Algorithm.SM4, "4560"), (Algorithm.DES, "4530")])
    ]
    m1 = m1_card(balance=3000)
    bus = make_terminal(tmp_path / "bus.sqlite", Kind.BUS, "4560", amount=200, clock=clock)
    top_up = make_terminal(tmp_path / "top.sqlite", Kind.TOPUP, "4510", amount=5000, terminal="451000000009")
    gate_in = make_terminal(
        tmp_path / "in.sqlite", Kind.METRO_ENTRY, "4510", station=("M1", "A00"), clock=clock, terminal="451000000002"
    )
    gate_out = make_terminal(
        tmp_path / "out.sqlite", Kind.METRO_EXIT, "4510", station=("M1", "A05"), clock=clock, terminal="451000000003"
    )
    real = [
        *_taps(bus, *cards, *cards, m1, m1),
        *_taps(top_up, *cards),
        *_taps(gate_in, cards[0], cards[1]),
        *_taps(gate_out, cards[0], cards[1]),
    ]
    assert {(r.kind, r.tech, r.alg) for r in real} >= {
        ("purchase", "cpu", "3des"),
        ("purchase", "cpu", "des"),
        ("purchase", "cpu", "sm4"),
        ("purchase", "m1", "sm4"),
        ("load", "cpu", "sm4"),
        ("metro_entry", "cpu", "3des"),
        ("metro_exit", "cpu", "sm4"),
    }
    host = IssuerHost(KEYS)
    assert tac_problems(host, real) == [None] * len(real)
    forged = [
        r.model_copy(update={"time": r.moment.replace(second=(r.moment.second + 1) % 60).isoformat()}) for r in real
    ]
    expected = ["M1 record MAC does not verify" if r.tech == "m1" else "TAC does not verify" for r in real]
    assert tac_problems(host, forged) == expected == _per_record(host, forged)


def test_local_bcd_reads_the_local_date_and_time_each_text_gives() -> None:
    date, time = verify.local_bcd(["2026-11-24T08:15:02+08:00", "2026-11-24T00:00:59Z", "2026-11-24T08:15:02+08:00"])
    assert (date.tolist(), time.tolist()) == ([0x20261124] * 3, [0x081502, 0x000059, 0x081502])
    assert np.array_equal(date, verify.local_bcd(["2026-11-24T23:59:59.999999-03:30"] * 3)[0])
