"""Benchmark: seconds per mfkey32 key and per nested-attack key (median over N random keys), with the
cost of the Crypto-1 state recovery alone (lfsr_recovery32) beside them, in one run.

    python3 bench/m1_attack_bench.py [--keys 20]

Not a test: it prints figures, it asserts only that each key was recovered.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from audit.crypto1_recovery import lfsr_recovery32
from audit.m1_attacks import nested_attack
from audit.mfkey import mfkey32
from cardsim.crypto1 import auth_trace, prng_successor
from cardsim.m1_issue import KeyScheme, issue_m1_card, sector_keys
from cardsim.mifare import M1Card, Profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=20)
    args = parser.parse_args()
    rnd = random.Random(2009)
    recovery, m32, nested = [], [], []
    for _ in range(args.keys):
        key, uid, nt0, nt1 = rnd.getrandbits(48), rnd.getrandbits(32), rnd.getrandbits(32), rnd.getrandbits(32)
        a, b = auth_trace(key, uid, nt0, rnd.getrandbits(32)), auth_trace(key, uid, nt1, rnd.getrandbits(32))
        start = time.perf_counter()
        lfsr_recovery32(a[1] ^ prng_successor(nt0, 64), 0)
        recovery.append(time.perf_counter() - start)
        start = time.perf_counter()
        if mfkey32(uid, nt0, a[0], a[1], nt1, b[0], b[1]) != key:
            raise SystemExit("mfkey32 missed a key")
        m32.append(time.perf_counter() - start)

        master, card_uid = rnd.randbytes(16), rnd.randbytes(4)
        card = M1Card(issue_m1_card(card_uid, Profile.GENUINE, KeyScheme.DIVERSIFIED, 100, master), rnd.randbytes)
        known = int.from_bytes(sector_keys(KeyScheme.DIVERSIFIED, master, card_uid, 0)[0])
        target = int.from_bytes(sector_keys(KeyScheme.DIVERSIFIED, master, card_uid, 5)[1])
        start = time.perf_counter()
        if nested_attack(card, int.from_bytes(card_uid), (3, known, 0x60), (23, 0x61)) != target:
            raise SystemExit("nested attack missed a key")
        nested.append(time.perf_counter() - start)
    print(f"{args.keys} random keys, one thread; seconds per key (median / max)")
    print(f"{'lfsr_recovery32 alone':<24} {statistics.median(recovery):>7.2f} {max(recovery):>7.2f}")
    print(
        f"{'mfkey32':<24} {statistics.median(m32):>7.2f} {max(m32):>7.2f}   "
        f"= {statistics.median(m32) / statistics.median(recovery):.2f} x recovery"
    )
    print(
        f"{'nested (through card)':<24} {statistics.median(nested):>7.2f} {max(nested):>7.2f}   "
        f"= {statistics.median(nested) / statistics.median(recovery):.2f} x recovery"
    )


if __name__ == "__main__":
    main()
