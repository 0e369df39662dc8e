"""Benchmark: what checking who published costs the clearing's intake (issue 18 item 3).

    python3 bench/identity_bench.py [--records 20000] [--terminals 20] [--repeat 3]

For messages of 1 record and of 100 records it prints the intake's records/s (``Intake.messages``: limits,
schema, sender, hotlist, TAC, all of it, no database) side by side: unsigned messages to a clearing without the
network CA, and the same records signed by their terminals' certificates to a clearing that requires identities.
Then, per message: what signing costs a terminal, the clearing's check of a certificate it has cached (one
ECDSA verification) and of one it sees for the first time (the chain too).

Each figure is the best of ``--repeat`` runs (other work on the machine only ever slows a run down). Not a test:
it prints figures and asserts nothing. The PKI is made in a temporary folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from clearing.identity import Identities
from clearing.intake import Accepted, Intake, Topic
from clearing.pki import Identity, Pki
from terminals.messages import CHINA, batch_payload, txn_topic
from terminals.mqtt import TlsFiles
from terminals.signing import Signer, unseal
from yikatong.synthetic import SyntheticTerminal, synthetic_cards

CITY = "4560"
DAY_START = dt.datetime(2026, 11, 24, 8, 0, tzinfo=CHINA)


def _best(repeat: int, run: Callable[[], object]) -> float:
    """The shortest of ``repeat`` runs, in seconds."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    """Make a PKI and the records, then measure and print."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--terminals", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    host = IssuerHost(IssuerKeyStore.test_set())
    numbers = [f"{CITY}BE00{n:04X}" for n in range(args.terminals)]
    with tempfile.TemporaryDirectory() as folder:
        pki = Pki.create(Path(folder), [CITY])
        signers: dict[str, Signer] = {}
        for number in numbers:
            _, device = pki.issue(Identity.terminal(number))
            signers[number] = Signer.of(TlsFiles.folder(device))
        _, clearing = pki.issue(Identity.clearing(CITY))
        identities = Identities.of(CITY, TlsFiles.folder(clearing))
        measure(args, host, numbers, signers, identities, lambda: Identities.of(CITY, TlsFiles.folder(clearing)))


def measure(
    args: argparse.Namespace,
    host: IssuerHost,
    numbers: list[str],
    signers: dict[str, Signer],
    identities: Identities,
    fresh: Callable[[], Identities],
) -> None:
    """Records/s with and without, then the costs per message (``fresh``: checks with nothing cached yet)."""
    cards = synthetic_cards(200, [CITY], seed=7)
    per_terminal = args.records // len(numbers)
    records = {}
    for n, number in enumerate(numbers):
        terminal = SyntheticTerminal(host, CITY, number, DAY_START)
        records[number] = [terminal.purchase(cards[(n * 7 + i) % len(cards)], 100) for i in range(per_terminal)]
    plain, checked = Intake(CITY, host), Intake(CITY, host, identities=identities)
    total = per_terminal * len(numbers)
    print(f"intake records/s, {total} records of {len(numbers)} terminals (best of {args.repeat})")
    print(f"{'records per message':>20} {'unsigned':>12} {'signed + checked':>18} {'ratio':>7}")
    for size in (1, 100):
        unsigned, signed = [], []
        for number, mine in records.items():
            topic = Topic.parse(txn_topic(CITY, number), CITY)
            assert topic is not None
            for start in range(0, len(mine), size):
                chunk = [r.to_json() for r in mine[start : start + size]]
                payload = chunk[0] if size == 1 else batch_payload(chunk)
                unsigned.append((topic, payload.encode()))
                signed.append((topic, signers[number].seal(payload).encode()))
        for intake, items in ((plain, unsigned), (checked, signed)):  # every verdict must be Accepted
            verdicts = [v for message in intake.messages(items[:50], frozenset()) for v in message]
            assert all(isinstance(v, Accepted) for v in verdicts), verdicts[:1]
        one = _best(args.repeat, partial(_in_batches, plain, unsigned))
        two = _best(args.repeat, partial(_in_batches, checked, signed))
        print(f"{size:>20} {total / one:>12,.0f} {total / two:>18,.0f} {one / two:>7.2f}")
    sample = records[numbers[0]][0].to_json()
    signer = signers[numbers[0]]
    count = 2000
    sign = _best(args.repeat, lambda: [signer.seal(sample) for _ in range(count)]) / count
    sealed = unseal(signer.seal(sample).encode())
    cached = _best(args.repeat, lambda: [identities.check(sealed) for _ in range(count)]) / count
    checkers = [fresh() for _ in range(count // 10 * args.repeat)]
    first = _best(args.repeat, lambda: [checkers.pop().check(sealed) for _ in range(count // 10)]) / (count // 10)
    print(
        f"per message: signing {sign * 1e6:.0f} µs (terminal); check with the certificate cached "
        f"{cached * 1e6:.0f} µs, first sight of it {first * 1e6:.0f} µs (clearing)"
    )


def _in_batches(intake: Intake, items: list[tuple[Topic, bytes]]) -> None:
    """The verdicts on every message, 500 at a time as the service's batches come."""
    for start in range(0, len(items), 500):
        intake.messages(items[start : start + 500], frozenset())


if __name__ == "__main__":
    main()
