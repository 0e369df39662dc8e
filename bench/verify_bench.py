"""Benchmark: TAC / M1 record MAC verifications per second on one core, record by record and batched, beside the
bare cipher cost of the same blocks (ECB through ``cryptography``), for 3DES, SM4 and M1 cards; one run, ratios
side by side.

    python3 bench/verify_bench.py [--records 20000] [--cards 2000] [--batch 100] [--repeat 3]

Not a test: it prints figures and asserts nothing. The corpus of each card type mixes purchases, metro
entries and exits and top-ups (loads, CPU cards only) over ``--cards`` cards, a tenth of them forged. Columns:

- per record: ``tac_problem`` on each record (the clearing before batching);
- clearing batches: ``tac_problems`` on ``--batch`` records at a time as they arrive (few of a card in a batch);
- by card: ``expected_macs`` on the whole corpus as columns, the records of a card together (reconcile's case);
- bare cipher: one ECB call over as many blocks as the corpus's MACs chain, in one context (no key per card,
  no chaining, no layout): the floor.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from cardsim.crypto import Algorithm, BlockKey
from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from cardsim.personalise import application_serial
from clearing.verify import TacColumns, expected_macs, expected_tac, tac_problem, tac_problems
from terminals.messages import TXN_SCHEMA, CardRef, TxnKind, TxnRecord

KEYS = IssuerKeyStore.test_set()
START = dt.datetime(2026, 11, 24, 6, 0, tzinfo=dt.timezone(dt.timedelta(hours=8)))
TYPES = {"3DES": ("cpu", "3des"), "SM4": ("cpu", "sm4"), "M1": ("m1", "sm4")}
CITIES = ("4510", "4560", "4530")


def corpus(tech: str, alg: str, count: int, cards: int, seed: int = 1) -> list[TxnRecord]:
    """``count`` signed records of ``cards`` cards of one type, in the order terminals would send them."""
    rnd = random.Random(seed)
    host = IssuerHost(KEYS)
    fleet = [
        (CITIES[n % 3], application_serial(CITIES[n % 3], rnd.randrange(10**12)).hex(), f"{rnd.getrandbits(32):08X}")
        for n in range(cards)
    ]
    kinds: list[TxnKind] = ["purchase", "purchase", "metro_entry", "metro_exit"]
    kinds += ["load"] if tech == "cpu" else []
    records = []
    for n in range(count):
        issuer, serial, uid = fleet[rnd.randrange(cards)]
        kind = rnd.choice(kinds)
        amount = 5000 if kind == "load" else rnd.randrange(0, 600, 50)
        unsigned = TxnRecord(
            schema=TXN_SCHEMA,
            seq=n + 1,
            kind=kind,
            tech="cpu" if tech == "cpu" else "m1",
            card=CardRef(issuer=issuer, serial=serial) if tech == "cpu" else CardRef(issuer=issuer, uid=uid),
            card_counter=n % 0x10000,
            amount=amount,
            balance_before=100_000,
            balance_after=100_000 + amount if kind == "load" else 100_000 - amount,
            terminal=f"{int(issuer, 16):04X}{rnd.randrange(1, 1000):08X}",
            terminal_seq=n,
            psam="0011",
            acquirer=issuer,
            time=(START + dt.timedelta(seconds=n)).isoformat(),
            tac="00000000",
            key_version=1,
            alg="sm4" if alg == "sm4" else "3des",
        )
        tac = int.from_bytes(expected_tac(host, unsigned)) ^ (1 if n % 10 == 9 else 0)  # a tenth forged
        records.append(unsigned.model_copy(update={"tac": f"{tac:08X}"}))
    return records


def best(repeat: int, run: Callable[[], object]) -> float:
    """Best wall time of ``repeat`` runs of ``run()``; a fresh IssuerHost each time is the caller's business."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def blocks_of(records: list[TxnRecord]) -> int:
    """How many cipher blocks the records' MACs chain (purchase data 22 bytes, load 24, M1 35; padded)."""
    total = 0
    for r in records:
        size = 16 if r.tech == "m1" or r.alg == "sm4" else 8
        length = 35 if r.tech == "m1" else 24 if r.kind == "load" else 22
        total += (length + 1 + size - 1) // size
    return total


def measure(records: list[TxnRecord], name: str, batch: int, repeat: int) -> list[float]:
    """Records/s: one by one, in clearing batches, by card as columns, and the bare cipher of their blocks."""
    host = IssuerHost(KEYS)
    verdicts = [tac_problem(host, r) for r in records]  # derives and caches the card keys
    batches = [records[i : i + batch] for i in range(0, len(records), batch)]
    assert [v for b in batches for v in tac_problems(host, b)] == verdicts, "batches disagree with one by one"
    columns = TacColumns.of_records(sorted(records, key=lambda r: r.card.id))
    cipher = BlockKey(Algorithm.SM4, bytes(16)) if name != "3DES" else BlockKey(Algorithm.DES, bytes(8))
    # (the TAC key of a 3DES card is single DES: TripleDES K|K|K, as the verification runs it)
    blocks = bytes(blocks_of(records) * cipher.algorithm.block_size)
    seconds = [
        best(repeat, lambda: [tac_problem(host, r) for r in records]),
        best(repeat, lambda: [tac_problems(host, b) for b in batches]),
        best(repeat, lambda: expected_macs(host, columns)),
        best(repeat, lambda: cipher.encrypt(blocks)),
    ]
    return [len(records) / x for x in seconds]


def main() -> None:
    """Build the corpus of each card type, time each way of verifying it, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000, help="records per card type")
    parser.add_argument("--cards", type=int, default=2_000, help="cards per card type")
    parser.add_argument("--batch", type=int, default=100, help="records per tac_problems call (clearing batches)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(
        f"{args.records:,} records of {args.cards:,} cards per type, best of {args.repeat}; "
        "verifications/s on one core (keys derived in the first run, then cached, as in a clearing)"
    )
    header = f"{'type':<6}{'per record':>12}{'batches':>12}{'by card':>12}{'bare cipher':>13}"
    print(f"{header}   batches/per record  by card/per record  by card/cipher")
    for name, (tech, alg) in TYPES.items():
        rates = measure(corpus(tech, alg, args.records, args.cards), name, args.batch, args.repeat)
        print(
            f"{name:<6}{rates[0]:>12,.0f}{rates[1]:>12,.0f}{rates[2]:>12,.0f}{rates[3]:>13,.0f}"
            f"   {rates[1] / rates[0]:>17.1f}x {rates[2] / rates[0]:>18.1f}x {rates[2] / rates[3]:>14.2f}"
        )
    print("bare cipher: records/s if verifying cost only the ECB blocks of their MACs (one call, one key)")
    xor_of_a_step(args.records // args.cards, args.repeat)


def xor_of_a_step(records: int, repeat: int) -> None:
    """What chaining costs per step of a run of ``records`` records of one card: the XOR of the previous chain
    outputs with the next blocks, as Python ints (BlockKey.cbc_macs) or as numpy arrays."""
    print(f"XOR of one chaining step of a card's {records} records (the ECB call aside), per step:")
    for size in (8, 16):
        chain, blocks = bytes(range(256))[: size * records], bytes(size * records)
        as_ints = best(repeat, partial(_xor_ints, chain, blocks)) / _XORS * 1e6
        as_arrays = best(repeat, partial(_xor_arrays, chain, blocks)) / _XORS * 1e6
        print(f"  {size}-byte blocks: ints {as_ints:.2f} us, numpy {as_arrays:.2f} us")


_XORS = 10_000


def _xor_ints(chain: bytes, blocks: bytes) -> None:
    for _ in range(_XORS):
        (int.from_bytes(chain) ^ int.from_bytes(blocks)).to_bytes(len(blocks))


def _xor_arrays(chain: bytes, blocks: bytes) -> None:
    for _ in range(_XORS):
        (np.frombuffer(chain, dtype=np.uint8) ^ np.frombuffer(blocks, dtype=np.uint8)).tobytes()


if __name__ == "__main__":
    main()
