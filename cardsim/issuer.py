"""The issuer's online host: it alone holds the load and TAC master keys.

It authorises loads (checks the card's MAC1, answers MAC2), signs APPLICATION BLOCK for hotlisted cards,
and verifies TACs for clearing and audit, all through ``cardsim.crypto``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cardsim import crypto
from cardsim.crypto import Algorithm, BlockKey
from cardsim.issue_options import DEFAULT_MAX_BALANCE
from cardsim.keys import IssuerKeySet, IssuerKeyStore, city_of_serial
from cardsim.purse import TYPE_LOAD


class HostRefusal(Exception):
    """The issuer host refuses a request (unknown keys, card MAC1 wrong, a load past the maximum balance)."""


@dataclass(frozen=True)
class LoadRequest:
    """What a top-up machine sends the host after INITIALIZE FOR LOAD."""

    card_serial: bytes
    key_version: int
    algorithm_id: int
    random: bytes
    online_counter: int
    balance: int
    amount: int
    terminal: bytes
    mac1: bytes
    date: bytes
    time: bytes


class IssuerHost:
    """Issuer-side cryptography over one key store."""

    KEY_CACHE = 100_000
    """Card keys (TAC, M1 record MAC) kept: a clearing verifies the same cards all day, and deriving costs 3
    ciphers."""

    def __init__(self, keys: IssuerKeyStore, max_balance: int = DEFAULT_MAX_BALANCE) -> None:
        """``max_balance``: the most fen the issuer's cards may hold (its published product maximum); the host
        authorises no load past it, whether or not the card would refuse it itself."""
        self.keys = keys
        self.max_balance = max_balance
        self._card_keys: dict[tuple[object, ...], BlockKey] = {}
        # master keys ready to diversify with, by (city, version, usage, algorithm): a cipher context costs
        # as much as ~15 blocks, and every card of an issuer starts from the same few masters
        self._masters: dict[tuple[str, int, str, Algorithm], BlockKey] = {}

    def _key_set(self, card_serial: bytes, version: int) -> IssuerKeySet:
        try:
            city = city_of_serial(card_serial)
        except ValueError as err:
            raise HostRefusal(str(err)) from err
        return self._version(city, version)

    def _version(self, city: str, version: int) -> IssuerKeySet:
        key_set = self.keys.get(city, version)
        if key_set is None:
            raise HostRefusal(f"no keys for issuer {city} version {version}")
        return key_set

    def _master(self, key_set: IssuerKeySet, alg: Algorithm, usage: str) -> BlockKey:
        name = (key_set.city, key_set.version, usage, alg)
        master = self._masters.get(name)
        if master is None:
            raw = getattr(key_set, usage)
            if raw is None:
                raise HostRefusal(f"this key store holds no {usage} keys")
            master = self._masters[name] = BlockKey(alg, raw)
        return master

    def _diversified(self, card_serial: bytes, version: int, alg: Algorithm, usage: str) -> bytes:
        master = self._master(self._key_set(card_serial, version), alg, usage)
        return crypto.diversify(alg, master, card_serial)

    def card_key(self, card_serial: bytes, version: int, alg: Algorithm, usage: str) -> BlockKey:
        """A card's diversified key for one usage (purchase, load, tac, maintenance)."""
        return BlockKey(alg, self._diversified(card_serial, version, alg, usage))

    def authorize_load(self, req: LoadRequest) -> bytes:
        """Check the card's MAC1 and return MAC2 for CREDIT FOR LOAD; HostRefusal if MAC1 is wrong or the load
        would take the balance (which MAC1 vouches for) past the issuer's maximum balance."""
        try:
            alg = Algorithm.from_id(req.algorithm_id)
        except ValueError as err:
            raise HostRefusal(str(err)) from err
        card_load_key = self.card_key(req.card_serial, req.key_version, alg, "load")
        sk = crypto.session_key(card_load_key, crypto.load_key_input(req.random, req.online_counter))
        if sk.mac(crypto.load_mac1_data(req.balance, req.amount, TYPE_LOAD, req.terminal)) != req.mac1:
            raise HostRefusal("card MAC1 does not verify: not a genuine card of this issuer")
        if req.balance + req.amount > self.max_balance:  # a card that ignores its maximum gets no MAC2 for it
            raise HostRefusal(
                f"a load of {req.amount} fen on a balance of {req.balance} fen would pass the issuer's maximum balance"
                f" of {self.max_balance} fen"
            )
        return sk.mac(crypto.load_mac2_data(req.amount, TYPE_LOAD, req.terminal, req.date, req.time))

    def tac_key(self, card_serial: bytes, version: int, alg: Algorithm) -> BlockKey:
        """The card's TAC key, for verifying the TAC of its transactions."""
        return self._cached(
            ("tac", card_serial, version, alg),
            lambda: crypto.tac_key(alg, self._diversified(card_serial, version, alg, "tac")),
        )

    def m1_record_key(self, issuer: str, version: int, uid: bytes) -> BlockKey:
        """The key of an M1 card's record MAC (M1 cards have no TAC), from the issuer's purchase master."""
        return self._cached(
            ("m1", issuer, version, uid),
            lambda: crypto.m1_record_key(self._master(self._version(issuer, version), Algorithm.SM4, "purchase"), uid),
        )

    def _cached(self, name: tuple[object, ...], derive: Callable[[], BlockKey]) -> BlockKey:
        key = self._card_keys.get(name)
        if key is None:
            if len(self._card_keys) >= self.KEY_CACHE:
                self._card_keys.clear()
            key = self._card_keys[name] = derive()
        return key
