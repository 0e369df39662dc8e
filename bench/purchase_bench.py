"""Benchmark: in-process full purchases per second (card + PSAM + every APDU + crypto), beside the cost of
the bare crypto operations those purchases need, measured in the same run.

    python3 bench/purchase_bench.py [--purchases 20000] [--repeat 3]

Not a test: it prints figures, it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import time
from collections.abc import Callable

from cardsim import commands, crypto
from cardsim.crypto import Algorithm, BlockKey
from cardsim.keys import IssuerKeyStore
from cardsim.personalise import CardRequest, issue_cpu_card
from cardsim.psam import SFI_TERMINAL, Psam, PsamState
from cardsim.purse import COUNTER_MAX, TYPE_PURCHASE, PurseCard
from terminals.flows import exchange, purchase
from terminals.reader import InProcessReader, Reader

KEYS = IssuerKeyStore.test_set()
WHEN = dt.datetime(2026, 11, 24, 8, 15, 2)


def psam_terminal_number(sam: Reader) -> bytes:
    """The 6-byte terminal number held by the PSAM (its SFI 0x16)."""
    return exchange(sam, "PSAM READ BINARY", commands.read_binary(SFI_TERMINAL, 6), 6)


def best_of(repeat: int, n: int, run: Callable[[int], None]) -> float:
    """Best wall time per operation over ``repeat`` runs of ``n`` operations."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run(n)
        best = min(best, (time.perf_counter() - start) / n)
    return best


def full_purchases(alg: Algorithm) -> Callable[[int], None]:
    def run(n: int) -> None:
        psam = InProcessReader(Psam(PsamState(bytes(10), bytes.fromhex("001122334455"), KEYS.for_psam())))
        terminal = psam_terminal_number(psam)
        card_reader = None
        for i in range(n):
            if i % (COUNTER_MAX - 1) == 0:  # a card's offline counter allows 65535 purchases
                req = CardRequest("4510", alg, 10**9, i, dt.date(2026, 1, 1), dt.date(2036, 1, 1), max_balance=10**9)
                card_reader = InProcessReader(PurseCard(issue_cpu_card(KEYS, req), os.urandom))
                card_reader.connect()
            assert card_reader is not None
            purchase(card_reader, psam, terminal, 1, WHEN)

    return run


def bare_crypto(alg: Algorithm) -> Callable[[int], None]:
    """Exactly the cipher work of one purchase: PSAM MAC1; card MAC1 check, MAC2, TAC; PSAM MAC2 check."""
    dpk_card = BlockKey(alg, bytes(range(16)))
    dpk_psam = BlockKey(alg, bytes(range(16)))  # the PSAM caches each card's diversified key
    tk = crypto.tac_key(alg, bytes(range(16, 32)))
    terminal, date, time_ = bytes(6), bytes(4), bytes(3)

    def run(n: int) -> None:
        for i in range(n):
            random = os.urandom(4)
            key_input = crypto.purchase_key_input(random, i & 0xFFFF, i)
            mac1_data = crypto.purchase_mac1_data(1, TYPE_PURCHASE, terminal, date, time_)
            mac1 = crypto.session_key(dpk_psam, key_input).mac(mac1_data)
            sk = crypto.session_key(dpk_card, key_input)
            ok = sk.mac(mac1_data) == mac1
            mac2 = sk.mac(crypto.purchase_mac2_data(1))
            tk.mac(crypto.purchase_tac_data(1, TYPE_PURCHASE, terminal, i, date, time_))
            ok = ok and sk.mac(crypto.purchase_mac2_data(1)) == mac2
            if not ok:
                raise AssertionError("bare crypto disagrees with itself")

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--purchases", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.purchases} purchases per run, best of {args.repeat}, one core (single thread)")
    print(f"{'card':<6} {'purchases/s':>12} {'us/purchase':>12} {'bare crypto us':>15} {'ratio':>6}")
    for alg in Algorithm:
        full = best_of(args.repeat, args.purchases, full_purchases(alg))
        bare = best_of(args.repeat, args.purchases, bare_crypto(alg))
        print(f"{alg.value:<6} {1 / full:>12,.0f} {full * 1e6:>12.1f} {bare * 1e6:>15.1f} {full / bare:>6.2f}")


if __name__ == "__main__":
    main()
