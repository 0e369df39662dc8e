"""Synthetic terminals and cards for load tests and benchmarks: records signed exactly as a card and PSAM
would sign them (the TAC from the issuer keys), made thousands of times faster than by running the APDU
flows. Test keys only: a real issuer's keys never sit beside a load generator."""

from __future__ import annotations

import datetime as dt
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from cardsim.issuer import IssuerHost
from cardsim.personalise import application_serial
from clearing.verify import expected_tac
from terminals.messages import CHINA, TXN_SCHEMA, CardRef, TxnKind, TxnRecord


@dataclass
class SyntheticCard:
    """A CPU purse card as the clearing sees it: issuer, serial, algorithm, balance and offline counter."""

    issuer: str
    serial: str
    alg: str = "sm4"
    balance: int = 100_000
    counter: int = 0
    online_counter: int = 0


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
    """A terminal that makes signed records: a purchase or a top-up (load) per call. Each record one second
    after the last, or at ``clock()`` when a clock is given; ``seq`` is the last terminal sequence number used."""

    def __init__(
        self,
        host: IssuerHost,
        city: str,
        terminal: str,
        start: dt.datetime | None = None,
        *,
        clock: Callable[[], dt.datetime] | None = None,
        seq: int = 0,
    ) -> None:
        if clock is not None and start is None:
            self.clock = clock
        elif start is not None and clock is None:
            self.clock = _seconds_after(start)
        else:
            raise ValueError("give a start time or a clock")
        self.host, self.city, self.terminal, self.seq = host, city, terminal, seq

    def purchase(self, card: SyntheticCard, amount: int) -> TxnRecord:
        """The next record of this terminal: ``card`` pays ``amount`` (its balance and counter move on)."""
        amount = min(amount, card.balance)
        record = self._record(card, "purchase", amount, card.counter, card.balance - amount)
        card.counter = (card.counter + 1) & 0xFFFF
        card.balance -= amount
        return record

    def top_up(self, card: SyntheticCard, amount: int) -> TxnRecord:
        """The next record of this terminal: ``amount`` loaded onto ``card`` (its online counter moves on)."""
        record = self._record(card, "load", amount, card.online_counter, card.balance + amount)
        card.online_counter = (card.online_counter + 1) & 0xFFFF
        card.balance += amount
        return record

    def _record(self, card: SyntheticCard, kind: TxnKind, amount: int, counter: int, after: int) -> TxnRecord:
        self.seq += 1
        when = self.clock()
        unsigned = TxnRecord(
            schema=TXN_SCHEMA,
            seq=self.seq,
            kind=kind,
            tech="cpu",
            card=CardRef(issuer=card.issuer, serial=card.serial),
            card_counter=counter,
            amount=amount,
            balance_before=card.balance,
            balance_after=after,
            terminal=self.terminal,
            terminal_seq=self.seq,
            psam="0000" + self.terminal,
            acquirer=self.city,
            time=when.astimezone(CHINA).isoformat(timespec="seconds"),
            tac="00000000",
            key_version=1,
            alg="sm4" if card.alg == "sm4" else "3des",
        )
        return unsigned.model_copy(update={"tac": expected_tac(self.host, unsigned).hex().upper()})


def _seconds_after(start: dt.datetime) -> Callable[[], dt.datetime]:
    """A clock that reads one second later at each call, the first time ``start`` + 1 s."""
    seconds = itertools.count(1)
    return lambda: start + dt.timedelta(seconds=next(seconds))
