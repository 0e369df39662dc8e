"""``yikatong demo``: issue a fleet for Jinan, Yantai and Zibo, ride buses across cities, top up, and print
what every city took in and owes, with each TAC checked by the issuer's keys.

Everything runs in process on simulated cards and PSAMs; card images are saved in the run folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from cardsim import crypto
from cardsim.bcd import bcd_date, bcd_time
from cardsim.crypto import Algorithm
from cardsim.image import save_purse
from cardsim.issuer import IssuerHost
from cardsim.keys import IssuerKeyStore
from cardsim.personalise import CardRequest, issue_cpu_card
from cardsim.psam import Psam, PsamState
from cardsim.purse import TYPE_PURCHASE, PurseCard
from terminals.flows import PurseTransaction, load, psam_terminal_number, purchase
from terminals.inspect import yuan
from terminals.reader import InProcessReader
from yikatong.argtypes import positive
from yikatong.errors import CliError

CITIES = {"4510": "Jinan", "4560": "Yantai", "4530": "Zibo"}
BUS_FARE = 200  # fen
TOP_UP = 5000


def register(groups: Any) -> None:
    """Add the ``demo`` command."""
    demo = groups.add_parser(
        "demo",
        help="run the whole pipeline on simulated cards and print a summary",
        description="Issue CPU cards (3DES and SM4) for Jinan, Yantai and Zibo, let riders take buses in every "
        "city, top cards up when they run low, verify every TAC with the issuer keys, and print per-city totals.",
    )
    demo.add_argument("--out", type=Path, default=Path("run/demo"), help="run folder (default %(default)s)")
    demo.add_argument("--cards", type=positive, default=4, help="cards per city and algorithm (default 4)")
    demo.add_argument("--rides", type=positive, default=300, help="bus rides in total (default 300)")
    demo.add_argument("--seed", type=int, default=2009, help="random seed, for a repeatable run")
    demo.set_defaults(run=run)


def _progress(done: int, total: int) -> None:
    """A bar redrawn in place on a terminal; a line per quarter when stderr is a file or pipe."""
    if sys.stderr.isatty():
        width = 30
        filled = width * done // total
        sys.stderr.write(f"\r  rides [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        if done == total:
            sys.stderr.write("\n")
    elif done == total or (4 * done // total) != (4 * (done - 1) // total):
        sys.stderr.write(f"  rides {done}/{total}\n")
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns 0, or 1 if any TAC failed to verify."""
    out: Path = args.out
    try:
        (out / "cards").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CliError(f"cannot create run folder {out}: {err.strerror}") from err
    rng = random.Random(args.seed)
    keys = IssuerKeyStore.test_set()
    host = IssuerHost(keys)
    start = dt.datetime(2026, 11, 24, 7, 0, 0)

    cards: list[tuple[str, PurseCard]] = []
    for city in CITIES:
        for alg in (Algorithm.DES3, Algorithm.SM4):  # the purses a city issues today; DES is legacy
            for _n in range(args.cards):
                req = CardRequest(
                    city, alg, rng.randrange(500, 3000), len(cards) + 1, start.date(), start.date().replace(year=2036)
                )
                cards.append((city, PurseCard(issue_cpu_card(keys, req), rng.randbytes)))
    print(f"issued {len(cards)} cards ({args.cards} per city and algorithm) with the published TEST keys")

    terminals = {}
    for i, city in enumerate(CITIES):
        psam = InProcessReader(
            Psam(PsamState(bytes(9) + bytes([i + 1]), bytes.fromhex(f"{city}000000{i + 1:02d}"), keys.for_psam()))
        )
        terminals[city] = (psam, psam_terminal_number(psam))

    gross: Counter[tuple[str, str]] = Counter()  # (acquirer, issuer) -> fen
    loads: Counter[str] = Counter()
    rides_by_city: Counter[str] = Counter()
    tac_failures = 0
    for ride in range(args.rides):
        issuer, card = rng.choice(cards)
        acquirer = issuer if rng.random() < 0.7 else rng.choice(list(CITIES))
        when = start + dt.timedelta(seconds=37 * ride)
        reader = InProcessReader(card)
        reader.connect()
        psam, terminal = terminals[acquirer]
        if card.state.balance < BUS_FARE:
            load(reader, host, terminal, TOP_UP, when)
            loads[issuer] += TOP_UP
        txn = purchase(reader, psam, terminal, BUS_FARE, when)
        if not _tac_verifies(host, card.state.public.card_serial, txn):
            tac_failures += 1
        gross[(acquirer, issuer)] += BUS_FARE
        rides_by_city[acquirer] += 1
        _progress(ride + 1, args.rides)

    for _, card in cards:
        save_purse(out / "cards" / f"{card.state.public.application_serial.hex().upper()}.json", card.state)
    _summary(gross, loads, rides_by_city, tac_failures)
    print(f"card images: {out / 'cards'}")
    return 1 if tac_failures else 0


def _tac_verifies(host: IssuerHost, card_serial: bytes, txn: PurseTransaction) -> bool:
    data = crypto.purchase_tac_data(
        txn.amount, TYPE_PURCHASE, txn.terminal, txn.terminal_seq, bcd_date(txn.when), bcd_time(txn.when)
    )
    return host.tac_key(card_serial, txn.key_version, txn.algorithm).mac(data) == txn.tac


def _summary(gross: Counter[tuple[str, str]], loads: Counter[str], rides: Counter[str], tac_failures: int) -> None:
    print()
    print(
        f"{'city':<12} {'rides':>6} {'taken in':>10} {'of it others':>13} {'owed to others':>15} "
        f"{'net':>9} {'top-ups':>9}"
    )
    total_net = 0
    for code, name in CITIES.items():
        taken = sum(v for (acq, _), v in gross.items() if acq == code)
        from_others = sum(v for (acq, iss), v in gross.items() if acq == code and iss != code)
        owed = sum(v for (acq, iss), v in gross.items() if iss == code and acq != code)
        net = from_others - owed  # what the city is owed by issuers minus what it owes acquirers
        total_net += net
        print(
            f"{code} {name:<7} {rides[code]:>6} {yuan(taken):>10} {yuan(from_others):>13} {yuan(owed):>15} "
            f"{yuan(net):>9} {yuan(loads[code]):>9}"
        )
    print(f"net positions sum to {total_net} fen; TAC failures: {tac_failures}")
