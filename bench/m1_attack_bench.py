"""Benchmark: seconds per mfkey32 key, per nested-attack key and per darkside key (median over N random keys and
cards), with the cost of the Crypto-1 state recovery alone (lfsr_recovery32) beside them, in one run.

    python3 bench/m1_attack_bench.py [--keys 20]

Darkside stands beside Proxmark3's published figure: its client announced "Expected execution time is about
25seconds on average" for `hf mf darkside` (RfidResearchGroup/proxmark3, client/src/mifare/mifarehost.c, from
commit 28efc8b to 20a0bc3 in 2024; "25sec on average" in the older clients), time on the device against a card,
where ours is the simulated card in process (docs/research/darkside.md).

Not a test: it prints figures, it asserts only that each key was recovered.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from audit.crypto1_recovery import lfsr_recovery32
from audit.darkside import darkside_attack
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
    recovery, m32, nested, darkside = [], [], [], []
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

        sector, key_type = rnd.randrange(16), rnd.choice((0x60, 0x61))
        expected = int.from_bytes(sector_keys(KeyScheme.DIVERSIFIED, master, card_uid, sector)[key_type - 0x60])
        start = time.perf_counter()
        if darkside_attack(card, (sector * 4 + 3, key_type)) != expected:
            raise SystemExit("darkside missed a key")
        darkside.append(time.perf_counter() - start)
    print(f"{args.keys} random keys (darkside and nested: one random genuine card each), one thread; seconds per key")
    print(f"{'':<24} {'median':>7} {'max':>7}")
    print(f"{'lfsr_recovery32 alone':<24} {statistics.median(recovery):>7.2f} {max(recovery):>7.2f}")
    print(
        f"{'mfkey32':<24} {statistics.median(m32):>7.2f} {max(m32):>7.2f}   "
        f"= {statistics.median(m32) / statistics.median(recovery):.2f} x recovery"
    )
    print(
        f"{'nested (through card)':<24} {statistics.median(nested):>7.2f} {max(nested):>7.2f}   "
        f"= {statistics.median(nested) / statistics.median(recovery):.2f} x recovery"
    )
    print(
        f"{'darkside (through card)':<24} {statistics.median(darkside):>7.2f} {max(darkside):>7.2f}   "
        "Proxmark3 on the device: ~25 s on average (published)"
    )


if __name__ == "__main__":
    main()
