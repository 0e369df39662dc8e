"""Benchmark: one APDU's round trip through the real PC/SC stack (pyscard -> pcscd -> vsmartcard-vpcd -> our
``card serve`` socket -> the simulated CPU card and back), with the served side acknowledging vpcd's frames at
once (``TCP_QUICKACK``, as ``card serve`` does) and with the kernel's delayed ACK left alone, in one run,
alternating, so that both columns and their ratio come from the same machine state.

    python3 bench/vpcd_bench.py [--apdus 200] [--rounds 3] [--port 35964] [--reader 'Virtual PCD 00 01']

Needs pcscd with the vpcd driver (scripts/services.sh) and no other program using that vpcd slot. Each round
serves one SM4 card with ``yikatong card serve`` (the delayed-ACK side: the same command with
``cardsim.vpcd._ack_at_once`` switched off), connects through pyscard and sends ``--apdus`` GET CHALLENGEs.
Not a test: it prints figures and checks only that every answer ends 9000.
"""

from __future__ import annotations

import argparse
import datetime as dt
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from smartcard.System import readers

from cardsim.crypto import Algorithm
from cardsim.image import save_card
from cardsim.keys import IssuerKeyStore
from cardsim.personalise import CardRequest, issue_cpu_card

GET_CHALLENGE = [0x00, 0x84, 0x00, 0x00, 0x04]
# ``yikatong card serve`` with the quick ACK switched off: the served side as it was before
DELAYED_ACK_SERVE = (
    "import sys; from cardsim import vpcd; vpcd._ack_at_once = lambda conn: None; "
    "from yikatong.cli import main; sys.exit(main(sys.argv[1:]))"
)
WAYS = {"quick ACK (card serve)": ["-m", "yikatong.cli"], "delayed ACK (kernel default)": ["-c", DELAYED_ACK_SERVE]}


@contextmanager
def _served(image: Path, port: int, how: list[str]) -> Iterator[None]:
    """``card serve IMAGE --port PORT`` in a child process, stopped with Ctrl-C (SIGINT) on leaving."""
    cmd = [sys.executable, *how, "card", "serve", str(image), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)


def _round(reader_name: str, apdus: int) -> list[float]:
    """Seconds per APDU for ``apdus`` GET CHALLENGEs on a fresh connection to the reader."""
    deadline = time.monotonic() + 15
    while True:
        try:
            reader = next(r for r in readers() if str(r) == reader_name)
            conn = reader.createConnection()
            conn.connect()
            break
        except Exception:  # no such reader or no card in it yet: pcscd polls vpcd
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    times = []
    for _ in range(apdus):
        start = time.perf_counter()
        _, sw1, sw2 = conn.transmit(GET_CHALLENGE)
        times.append(time.perf_counter() - start)
        assert (sw1, sw2) == (0x90, 0x00), (sw1, sw2)
    conn.disconnect()
    return times


def main() -> None:
    """Print the round trip with and without the quick ACK, and their ratio."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--apdus", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--port", type=int, default=35964, help="vpcd slot port (default 35964: slot 01)")
    parser.add_argument("--reader", default="Virtual PCD 00 01")
    args = parser.parse_args()
    image = Path(tempfile.mkdtemp(prefix="vpcd-bench-")) / "card.json"
    request = CardRequest("4510", Algorithm.SM4, 5000, 1, dt.date(2026, 1, 1), dt.date(2036, 1, 1))
    save_card(image, issue_cpu_card(IssuerKeyStore.test_set(), request))
    results: dict[str, list[float]] = {name: [] for name in WAYS}
    for _ in range(args.rounds):
        for name, how in WAYS.items():
            with _served(image, args.port, how):
                results[name] += _round(args.reader, args.apdus)
            time.sleep(1.0)  # pcscd sees the card leave before the next one comes
    print(f"{args.apdus} GET CHALLENGE x {args.rounds} rounds through pcscd + vpcd ({args.reader})")
    medians = []
    for name, times in results.items():
        medians.append(statistics.median(times))
        p99 = sorted(times)[int(len(times) * 0.99) - 1]
        print(f"  {name:30} median {medians[-1] * 1e3:7.2f} ms   p99 {p99 * 1e3:7.2f} ms")
    print(f"  ratio delayed / quick: {medians[1] / medians[0]:.0f}x")


if __name__ == "__main__":
    main()
