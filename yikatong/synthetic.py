"""Synthetic terminals and cards for load tests and benchmarks: records signed exactly as a card and PSAM
would sign them (the TAC from the issuer keys), made thousands of times faster than by running the APDU
flows. Test keys only: a real issuer's keys never sit beside a load generator."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from cardsim.issuer import IssuerHost
from cardsim.personalise import application_serial
from clearing.verify import expected_tac
from terminals.messages import TXN_SCHEMA, CardRef, TxnRecord
from terminals.terminal import CHINA


@dataclass
class SyntheticCard:
    """A CPU purse card as the clearing sees it: issuer, serial, algorithm, balance and offline counter."""

    issuer: str
    serial: str
    alg: str = "sm4"
    balance: int = 100_000
    counter: int = 0


def synthetic_cards(count: int, issuers: list[str], seed: int = 1) -> list[SyntheticCard]:
    """``count`` cards spread over the issuer cities, half 3DES and half SM4."""
    rnd = random.Random(seed)
    return [
        SyntheticCard(
            city := issuers[i % len(issuers)],
            application_serial(city, rnd.randrange(10**12)).hex(),
            "3des" if i % 2 else "sm4",
        )
        for i in range(count)
    ]


class SyntheticTerminal:
    """A bus terminal that makes signed purchase records; each record one second after the last."""

    def __init__(self, host: IssuerHost, city: str, terminal: str, start: dt.datetime) -> None:
        self.host = host
        self.city = city
        self.terminal = terminal
        self.now = start
        self.seq = 0

    def purchase(self, card: SyntheticCard, amount: int) -> TxnRecord:
        """The next record of this terminal: ``card`` pays ``amount`` (its balance and counter move on)."""
        self.seq += 1
        self.now += dt.timedelta(seconds=1)
        amount = min(amount, card.balance)
        unsigned = TxnRecord(
            schema=TXN_SCHEMA,
            seq=self.seq,
            kind="purchase",
            tech="cpu",
            card=CardRef(issuer=card.issuer, serial=card.serial),
            card_counter=card.counter,
            amount=amount,
            balance_before=card.balance,
            balance_after=card.balance - amount,
            terminal=self.terminal,
            terminal_seq=self.seq,
            psam="0000" + self.terminal,
            acquirer=self.city,
            time=self.now.astimezone(CHINA).isoformat(),
            tac="00000000",
            key_version=1,
            alg="sm4" if card.alg == "sm4" else "3des",
        )
        card.counter = (card.counter + 1) & 0xFFFF
        card.balance -= amount
        return unsigned.model_copy(update={"tac": expected_tac(self.host, unsigned).hex().upper()})
