"""What the clearing makes of MQTT messages, before any storage: pure functions, no I/O.

A terminal publish (``yikatong/{city}/txn/{terminal}``) or a forwarded batch (``yikatong/interop/{city}/txn``)
becomes a list of verdicts, one per record: ``Accepted`` (the TAC verified, or the card belongs to another
city and will be forwarded) or ``Refused`` (with the reason, the raw bytes and, when the record names one, the
seq to ack as rejected). A payload that is not even a record list is one ``Refused`` without a seq. The TACs
of every record of a batch of messages are verified together (``clearing.verify.tac_problems``).

A terminal message may come signed (``terminals.signing``): with ``Identities`` (the network CA) the clearing
checks that the certificate is trusted, that it signed the payload and that it names the topic's terminal
(each record must name it too); a message that fails is refused whole, without a seq, as its publisher is not
the topic's terminal (nothing may be acked to that terminal on its account). Without them the envelope is
opened unchecked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from cardsim.issuer import IssuerHost
from clearing.identity import Identities, IdentityRefusal
from clearing.verify import tac_problem, tac_problems
from terminals.messages import (
    CHINA,
    CITY_CODE,
    DEFAULT_LIMITS,
    Limits,
    MessageError,
    TxnRecord,
    parse_record,
    parse_uplink,
    parse_uplink_records,
)
from terminals.signing import is_sealed, unseal


@dataclass(frozen=True)
class Accepted:
    """A record to store. ``forward`` when another city issued the card (its clearing verifies the TAC).
    ``canonical`` is the record's canonical JSON: what is stored and compared when the same identity comes again
    (made at once: every accepted record is stored, and Python 3.11's cached_property takes a lock per read)."""

    record: TxnRecord
    forward: bool
    canonical: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "canonical", self.record.to_json())


@dataclass(frozen=True)
class Refused:
    """Something to quarantine; ``seq`` is set when the sender can be told (acked as rejected)."""

    reason: str
    raw: bytes
    seq: int | None = None
    record_id: str | None = None
    acquirer: str | None = None  # of a forwarded record: whom to answer
    conflict: bool = False  # same identity as a stored record, other content: the card gets flagged


Verdict = Accepted | Refused


class _Payload:
    """A message's payload, for the refusal of one of its records: the payload itself when it holds just that
    record, else the record's own JSON (the documents decoded again when a refusal first needs one, if the
    records were validated straight from the text)."""

    def __init__(self, payload: bytes, limits: Limits, count: int, docs: Sequence[object] | None = None) -> None:
        self.payload = payload
        self.limits = limits
        self.count = count
        self.docs = docs

    def raw(self, index: int) -> bytes:
        """What to quarantine for record ``index``."""
        if self.count == 1:
            return self.payload
        if self.docs is None:
            try:
                self.docs = parse_uplink(self.payload, self.limits)
            except Exception:  # isolation: the fast path took this payload, so it decodes, but if not: keep it whole
                return self.payload
        return _raw(self.docs[index])


@dataclass(frozen=True)
class _Unverified:
    """A record that passed every check but its TAC, with what a refusal of it needs."""

    record: TxnRecord
    source: _Payload
    index: int


@dataclass(frozen=True)
class Checked:
    """Messages checked for everything but their TACs (``Intake.check``), for ``Intake.verify``."""

    drafts: list[list[Verdict | _Unverified]]


@dataclass(frozen=True)
class Topic:
    """What a subscribed topic says about the sender."""

    kind: Literal["terminal", "interop"]
    terminal: str | None  # the terminal number in a terminal topic (whatever the publisher put there)

    @classmethod
    def parse(cls, topic: str, city: str) -> Topic | None:
        """``yikatong/{city}/txn/{terminal}`` or ``yikatong/interop/{city}/txn``; None for anything else."""
        parts = topic.split("/")
        if len(parts) == 4 and parts[0] == "yikatong" and parts[1] == city and parts[2] == "txn":
            return cls("terminal", parts[3])
        if parts == ["yikatong", "interop", city, "txn"]:
            return cls("interop", None)
        return None


def unexpected(stage: str, err: BaseException) -> str:
    """The quarantine reason for an error nobody foresaw (short: the type names the bug, the text may be long)."""
    return f"internal error while {stage}: {type(err).__name__}: {str(err)[:200]}"


_CHINA_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\+08:00")
"""The usual form of a record's time, whose settlement day is the date written in it."""


def settlement_day(record: TxnRecord) -> str:
    """The settlement day of a record (00:00-24:00 +08:00, wire.md), YYYY-MM-DD."""
    if _CHINA_TIME.fullmatch(record.time):  # 5x cheaper than the calendar, and every terminal writes this form
        return record.time[:10]
    return record.moment.astimezone(CHINA).date().isoformat()


def _seq_of(doc: object) -> int | None:
    seq = doc.get("seq") if isinstance(doc, dict) else None
    return seq if type(seq) is int and 1 <= seq < 2**63 else None


def _record_id_of(doc: object) -> str | None:
    """The identity of a record that failed validation, when its parts are there (for the reviewer)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("card"), dict):
        return None
    card = doc["card"]
    parts = [card.get("issuer"), card.get("serial") or card.get("uid"), doc.get("kind"), doc.get("card_counter")]
    return "-".join(str(p) for p in parts) if all(p is not None for p in parts) else None


def _acquirer_of(doc: object) -> str | None:
    acquirer = doc.get("acquirer") if isinstance(doc, dict) else None
    return acquirer if isinstance(acquirer, str) and CITY_CODE.match(acquirer) else None


def _raw(doc: object) -> bytes:
    """A decoded record as bytes again (lone surrogates kept visible as escapes: they are not UTF-8)."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "backslashreplace")


class Intake:
    """The checks of one city's clearing: identity (with ``identities``), schema, sender, issuer, hotlist, TAC."""

    def __init__(
        self, city: str, host: IssuerHost, limits: Limits = DEFAULT_LIMITS, identities: Identities | None = None
    ) -> None:
        self.city = city
        self.host = host
        self.limits = limits
        self.identities = identities
        self.issuers = {key_set.city for key_set in host.keys}
        if city not in self.issuers:
            raise ValueError(f"the key store holds no keys of city {city}: this clearing cannot verify its cards")

    def message(self, topic: Topic, payload: bytes, hotlist: frozenset[str]) -> list[Verdict]:
        """The verdicts on every record of one message (see ``messages``)."""
        return self.messages([(topic, payload)], hotlist)[0]

    def messages(self, items: Sequence[tuple[Topic, bytes]], hotlist: frozenset[str]) -> list[list[Verdict]]:
        """The verdicts on every record of each message, the TACs of all of them verified in one batch: ``check``
        then ``verify``. Never raises: whatever goes wrong with one record (an error nobody foresaw included)
        refuses that record alone, with the error as its reason."""
        return self.verify(self.check(items, hotlist))

    def check(self, items: Sequence[tuple[Topic, bytes]], hotlist: frozenset[str]) -> Checked:
        """Everything but the TACs: limits, schema, sender, issuer, hotlist. Uses no key, so it may run in a worker
        thread while ``verify`` runs elsewhere."""
        return Checked([self._drafts(topic, payload, hotlist) for topic, payload in items])

    def verify(self, checked: Checked) -> list[list[Verdict]]:
        """The verdicts of checked messages, their TACs verified in one batch. The issuer host's cipher contexts
        are not thread-safe: call it from one thread at a time per host (the event loop's)."""
        drafts = checked.drafts
        unverified = [d for message in drafts for d in message if isinstance(d, _Unverified)]
        verified = iter(self._verify(unverified))
        return [[next(verified) if isinstance(d, _Unverified) else d for d in message] for message in drafts]

    def _drafts(self, topic: Topic, payload: bytes, hotlist: frozenset[str]) -> list[Verdict | _Unverified]:
        if topic.kind == "terminal":
            opened = self._opened(topic, payload)
            if isinstance(opened, Refused):
                return [opened]
            payload = opened
        try:
            records = parse_uplink_records(payload, self.limits)
        except Exception:  # the fast path vouches only for what it finishes: the checks below say what is wrong
            records = None
        if records is not None:
            source = _Payload(payload, self.limits, len(records))
            return [self._guarded(topic, source, i, record, hotlist) for i, record in enumerate(records)]
        try:
            docs = parse_uplink(payload, self.limits)
        except MessageError as err:
            return [Refused(str(err), payload)]
        except Exception as err:  # a parser bug must cost this message only
            return [Refused(unexpected("decoding", err), payload)]
        if not docs:
            return [Refused("empty batch", payload)]
        source = _Payload(payload, self.limits, len(docs), docs)
        return [self._guarded(topic, source, i, doc, hotlist) for i, doc in enumerate(docs)]

    def _opened(self, topic: Topic, payload: bytes) -> bytes | Refused:
        """The payload to check of a terminal message: a signed one's own (its signer checked against the topic
        when this clearing has the network CA), an unsigned one as it is unless signatures are required."""
        if not is_sealed(payload):
            if self.identities is not None and self.identities.required:
                return Refused(
                    "identity: unsigned (this clearing requires terminals to sign with their certificate)", payload
                )
            return payload
        try:
            sealed = unseal(payload)
            if self.identities is None:
                return sealed.payload
            signer = self.identities.check(sealed)
        except (MessageError, IdentityRefusal) as err:
            return Refused(f"identity: {err}", payload)
        except Exception as err:  # isolation: a certificate that trips a library bug costs this message alone
            return Refused(unexpected("checking the signature", err), payload)
        if signer != topic.terminal:
            return Refused(
                f"identity: certificate of terminal {signer} on the topic of terminal {topic.terminal}", payload
            )
        return sealed.payload

    def _guarded(
        self, topic: Topic, source: _Payload, index: int, item: object, hotlist: frozenset[str]
    ) -> Verdict | _Unverified:
        try:
            return self._record(topic, source, index, item, hotlist)
        except Exception as err:  # isolation: one record, not the batch or the service
            seq = item.seq if isinstance(item, TxnRecord) else _seq_of(item)
            return Refused(unexpected("checking", err), source.raw(index), seq)

    def _record(
        self, topic: Topic, source: _Payload, index: int, item: object, hotlist: frozenset[str]
    ) -> Verdict | _Unverified:
        """``item`` is record ``index`` of the payload: validated already, or its decoded document."""
        if isinstance(item, TxnRecord):
            record = item
        else:
            try:
                record = parse_record(item)
            except MessageError as err:
                return Refused(str(err), source.raw(index), _seq_of(item), _record_id_of(item), _acquirer_of(item))
        reason = self._problem(topic, record, hotlist)
        if reason is not None:
            return Refused(reason, source.raw(index), record.seq, record.record_id, record.acquirer)
        if record.card.issuer != self.city:
            return Accepted(record, forward=True)  # the issuer city verifies the TAC
        return _Unverified(record, source, index)

    def _verify(self, unverified: Sequence[_Unverified]) -> list[Verdict]:
        """The TAC verdicts, in one batch; if the batch raises, record by record, so that only the record that
        trips the error is refused for it."""
        try:
            problems = tac_problems(self.host, [u.record for u in unverified])
            return [self._verdict(u, problem) for u, problem in zip(unverified, problems, strict=True)]
        except Exception:
            return [self._verify_one(u) for u in unverified]

    def _verify_one(self, unverified: _Unverified) -> Verdict:
        try:
            problem = tac_problem(self.host, unverified.record)
        except Exception as err:  # isolation: one record, not the batch or the service
            raw = unverified.source.raw(unverified.index)
            return Refused(unexpected("checking", err), raw, unverified.record.seq)
        return self._verdict(unverified, problem)

    @staticmethod
    def _verdict(unverified: _Unverified, problem: str | None) -> Verdict:
        record = unverified.record
        if problem is None:
            return Accepted(record, forward=False)
        raw = unverified.source.raw(unverified.index)
        return Refused(problem, raw, record.seq, record.record_id, record.acquirer)

    def _problem(self, topic: Topic, record: TxnRecord, hotlist: frozenset[str]) -> str | None:
        """What refuses the record before its TAC is looked at: sender, acquirer, issuer, hotlist."""
        issuer = record.card.issuer
        if topic.kind == "terminal":
            if record.terminal != topic.terminal:
                return f"record of terminal {record.terminal} published on the topic of terminal {topic.terminal}"
            if record.acquirer != self.city:
                return f"record names acquirer {record.acquirer}, but terminal topics of {self.city} carry {self.city}"
        elif issuer != self.city:
            return f"forwarded record of a card of issuer {issuer}, not of {self.city}"
        if issuer not in self.issuers:
            return f"unknown issuer {issuer}"
        if topic.kind == "terminal" and record.card.id in hotlist:
            return f"card {record.card.id} is hotlisted"
        return None
