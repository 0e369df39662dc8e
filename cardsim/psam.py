"""The PSAM, the secure module in each terminal (spec card.md, part B), as a pure APDU state machine.

It holds the issuers' master purchase (and maintenance) keys, never gives them out, and computes MAC1 for
the card's DEBIT, checks the card's MAC2, and signs APPLICATION BLOCK commands for hotlisted cards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cardsim import crypto
from cardsim.apdu import SW, ApduError, Command, contactless_atr, expect, handlers, handles, read_binary, respond, route
from cardsim.commands import (
    ComputeBlockMac,
    InitSamForPurchase,
    M1RecordMac,
    M1SectorKeys,
    SectorKeys,
    SequencedMac,
)
from cardsim.crypto import Algorithm, BlockKey
from cardsim.eeprom import Eeprom
from cardsim.keys import IssuerKeySet, IssuerKeyStore, city_of_serial
from cardsim.m1_issue import sector_keys

ATR: Final = contactless_atr(b"YKT-PSAM")
SFI_SERIAL: Final = 0x15
SFI_TERMINAL: Final = 0x16
TTC_MAX: Final = 0xFFFFFFFF
_CACHE_LIMIT: Final = 4096
_NO_PARAMETERS: Final = (0x00, 0x00)  # P1 P2 of every PSAM command but M1 SECTOR KEYS


@dataclass
class PsamState:
    """Non-volatile PSAM content: identity, terminal number, TTC and the accepted issuers' keys."""

    serial: bytes
    terminal: bytes
    keys: IssuerKeyStore
    ttc: int = 1


@dataclass
class _Session:
    key: BlockKey
    amount: int


class Psam:
    """A PSAM. ``transmit`` takes a C-APDU and returns the R-APDU; it never raises."""

    def __init__(self, state: PsamState, eeprom: Eeprom | None = None) -> None:
        self.state = state
        self.eeprom = eeprom or Eeprom()
        self._session: _Session | None = None
        # Diversified keys by (usage, city, version, algorithm, card serial): a bus sees the same cards
        # every day, and diversifying costs two cipher set-ups.
        self._card_keys: dict[tuple[str, str, int, Algorithm, bytes], BlockKey] = {}
        self._handlers: dict[tuple[int, int], Callable[[Command], bytes]] = handlers(self)

    def power_on(self) -> bytes:
        """Reset the session; returns the ATR."""
        self._session = None
        return ATR

    def transmit(self, apdu: bytes) -> bytes:
        """Process one C-APDU and return the R-APDU (data + SW)."""
        session, self._session = self._session, None
        try:
            cmd, handler = route(apdu, self._handlers)
            if cmd.ins == 0x72:
                self._session = session
            return handler(cmd)
        except ApduError as err:
            self._session = None
            return respond(sw=err.sw)

    def _card_key(self, serial: bytes, version: int, algorithm_id: int, usage: str) -> BlockKey:
        try:
            alg = Algorithm.from_id(algorithm_id)
            city = city_of_serial(serial)
        except ValueError as err:
            raise ApduError(SW.KEY_NOT_FOUND, str(err)) from err
        cache_key = (usage, city, version, alg, serial)
        key = self._card_keys.get(cache_key)
        if key is None:
            key_set = self._key_set(city, version)
            master = key_set.purchase if usage == "purchase" else key_set.maintenance
            key = BlockKey(alg, crypto.diversify(alg, master, serial))
            if len(self._card_keys) >= _CACHE_LIMIT:
                self._card_keys.clear()
            self._card_keys[cache_key] = key
        return key

    def _key_set(self, city: str, version: int) -> IssuerKeySet:
        key_set = self.state.keys.get(city, version)
        if key_set is None:
            raise ApduError(SW.KEY_NOT_FOUND, f"no keys for issuer {city} version {version}")
        return key_set

    def _next_ttc(self) -> int:
        """The current TTC, stored +1 before anything that uses it is answered."""
        ttc = self.state.ttc
        if ttc >= TTC_MAX:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "terminal transaction sequence exhausted")
        self.eeprom.write(lambda: setattr(self.state, "ttc", ttc + 1))
        return ttc

    @handles(0x00, 0xB0)
    def _read_binary(self, cmd: Command) -> bytes:
        return read_binary(cmd, {SFI_SERIAL: self.state.serial, SFI_TERMINAL: self.state.terminal})

    @handles(0x80, 0x70)
    def _init_sam_for_purchase(self, cmd: Command) -> bytes:
        expect(cmd, _NO_PARAMETERS, InitSamForPurchase.size(), SequencedMac.size())
        r = InitSamForPurchase.from_bytes(cmd.data)
        card_key = self._card_key(r.card_serial, r.key_version, r.algorithm_id, "purchase")
        ttc = self._next_ttc()
        sk = crypto.session_key(card_key, crypto.purchase_key_input(r.random, r.counter, ttc))
        mac1 = sk.mac(crypto.purchase_mac1_data(r.amount, r.txn_type, self.state.terminal, r.date, r.time))
        self._session = _Session(sk, r.amount)
        return respond(SequencedMac(ttc, mac1).to_bytes())

    @handles(0x80, 0x72)
    def _credit_sam_for_purchase(self, cmd: Command) -> bytes:
        expect(cmd, _NO_PARAMETERS, 4, 0)
        session = self._session
        self._session = None
        if session is None:
            raise ApduError(SW.CONDITIONS_NOT_SATISFIED, "CREDIT SAM without INIT SAM")
        if session.key.mac(crypto.purchase_mac2_data(session.amount)) != cmd.data:
            raise ApduError(SW.MAC_INVALID)
        return respond()

    @handles(0x80, 0xFA)
    def _block_mac(self, cmd: Command) -> bytes:
        """Project command COMPUTE BLOCK MAC (commands.ComputeBlockMac)."""
        expect(cmd, _NO_PARAMETERS, ComputeBlockMac.size(), ComputeBlockMac.LE)
        r = ComputeBlockMac.from_bytes(cmd.data)
        key = self._card_key(r.card_serial, r.key_version, r.algorithm_id, "maintenance")
        block_key = crypto.session_key(key, crypto.block_key_input(r.challenge))
        return respond(block_key.mac(crypto.BLOCK_COMMAND_HEADER))

    @handles(0x80, 0xFB)
    def _m1_sector_keys(self, cmd: Command) -> bytes:
        """Project command M1 SECTOR KEYS (commands.M1SectorKeys): a sector's keys A and B, as a MIFARE SAM
        gives a legacy reader."""
        if cmd.p1 > 15:  # a 1K card's sectors
            raise ApduError(SW.INS_NOT_SUPPORTED)
        expect(cmd, (cmd.p1, 0x00), M1SectorKeys.DATA_LENGTH, SectorKeys.size())
        r = M1SectorKeys.from_command(cmd)
        master = self._key_set(r.city, r.key_version).purchase
        key_a, key_b = sector_keys(r.scheme, master, r.uid, r.sector)
        return respond(SectorKeys(key_a, key_b).to_bytes())

    @handles(0x80, 0xFC)
    def _m1_record_mac(self, cmd: Command) -> bytes:
        """Project command M1 RECORD MAC (commands.M1RecordMac) -> terminal seq(4) | MAC(4). M1 cards have no
        TAC; this MAC lets the clearing check that a terminal with a PSAM made the record."""
        expect(cmd, _NO_PARAMETERS, M1RecordMac.size(), SequencedMac.size())
        r = M1RecordMac.from_bytes(cmd.data)
        master = self._key_set(r.city, r.key_version).purchase
        ttc = self._next_ttc()
        data = crypto.m1_record_data(
            r.uid, r.counter, r.amount, r.balance_before, r.balance_after, self.state.terminal, ttc, r.date, r.time
        )
        return respond(SequencedMac(ttc, crypto.m1_record_key(master, r.uid).mac(data)).to_bytes())
