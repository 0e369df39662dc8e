"""The MQTT messages between terminals and clearing (spec wire.md): one module that both sides import.

Payloads are UTF-8 JSON objects named by ``schema``. Parsing is strict (no type coercion, no unknown fields) and
every failure is a ``MessageError`` whose text says what is wrong, so a clearing can quarantine with a reason
and a terminal can log and ignore.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Final, Literal, NoReturn, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cardsim.files import JSONValue
from terminals.limits import MAX_DEPTH, MAX_DIGITS, MAX_FEN, MAX_PAYLOAD, MAX_RECORDS, MAX_STRING

TXN_SCHEMA: Final = "yikatong.txn/1"
BATCH_SCHEMA: Final = "yikatong.batch/1"
ACK_SCHEMA: Final = "yikatong.ack/1"
SNAPSHOT_SCHEMA: Final = "yikatong.hotlist-snapshot/1"
CHUNK_SCHEMA: Final = "yikatong.hotlist-chunk/1"
DELTA_SCHEMA: Final = "yikatong.hotlist-delta/1"
MAX_CHUNK: Final = 160_000
"""Base64 characters of snapshot data per chunk message: well inside the 256 KiB payload limit."""
MAX_DELTA_CARDS: Final = 2000
"""Cards a retained delta may carry in all its changes; beyond, the clearing publishes a new snapshot instead."""
INTEROP_ACK_SCHEMA: Final = "yikatong.interop-ack/1"
HEALTH_SCHEMA: Final = "yikatong.health/1"

CHINA: Final = dt.timezone(dt.timedelta(hours=8), "CST")
"""China Standard Time: record times, settlement days (00:00-24:00 +08:00) and card dates use it."""
CITY_CODE: Final = re.compile(r"^[0-9]{4}$")
CityCode = Annotated[str, Field(pattern=CITY_CODE.pattern)]
TERMINAL_NO: Final = re.compile(r"^[0-9A-F]{12}$")
TerminalNo = Annotated[str, Field(pattern=TERMINAL_NO.pattern)]
Fen = Annotated[int, Field(ge=0, le=MAX_FEN)]
TxnKind = Literal["purchase", "load", "metro_entry", "metro_exit"]
TxnAlg = Literal["3des", "sm4", "des"]
CARD_ID: Final = re.compile(r"^[0-9]{20}$|^[0-9A-F]{8}$")
"""A CPU card serial (20 digits) or an M1 UID (8 hex digits)."""


class MessageError(ValueError):
    """A payload that is not a valid message of the expected kind; the text is the reason."""


class _Model(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


_M = TypeVar("_M", bound=_Model)


class CardRef(_Model):
    """Which card: its issuer city and the 20-digit application serial (CPU) or the 8-hex-digit UID (M1)."""

    issuer: CityCode
    serial: Annotated[str, Field(pattern=r"^[0-9]{20}$")] | None = None
    uid: Annotated[str, Field(pattern=r"^[0-9A-F]{8}$")] | None = None

    @model_validator(mode="after")
    def _one_identity(self) -> CardRef:
        if (self.serial is None) == (self.uid is None):
            raise ValueError("a card has exactly one of 'serial' (cpu) or 'uid' (m1)")
        return self

    @property
    def id(self) -> str:
        """The serial or the UID."""
        return self.serial if self.serial is not None else str(self.uid)


class TxnFields(_Model):
    """What a terminal makes of one card transaction: every field of a ``TxnRecord`` but ``schema`` and ``seq``,
    which the terminal's outbox gives it (see ``TxnRecord.numbered``). ``tac`` is empty until the card gave it."""

    kind: TxnKind
    tech: Literal["cpu", "m1"]
    card: CardRef
    card_counter: Annotated[int, Field(ge=0, le=0xFFFF)]
    amount: Fen
    balance_before: Fen
    balance_after: Fen
    terminal: TerminalNo
    terminal_seq: Annotated[int, Field(ge=0, le=0xFFFFFFFF)]
    psam: Annotated[str, Field(pattern=r"^[0-9A-F]{1,32}$")]
    acquirer: CityCode
    time: str
    tac: Annotated[str, Field(pattern=r"^([0-9A-F]{8})?$")]
    key_version: Annotated[int, Field(ge=0, le=255)]
    alg: TxnAlg
    line: Annotated[str, Field(min_length=1, max_length=3)] | None = None
    station: Annotated[str, Field(min_length=1, max_length=4)] | None = None

    @field_validator("time")
    @classmethod
    def _aware_time(cls, value: str) -> str:
        return _aware(value)

    @model_validator(mode="after")
    def _consistent(self) -> TxnFields:
        if (self.tech == "cpu") != (self.card.serial is not None):
            raise ValueError("a cpu record names the card by 'serial', an m1 record by 'uid'")
        if self.kind == "load":
            if self.balance_after != self.balance_before + self.amount:
                raise ValueError("balance_after must be balance_before + amount for a load")
        elif self.balance_after != self.balance_before - self.amount:
            raise ValueError("balance_after must be balance_before - amount")
        return self


class _RecordHead(_Model):
    """What an outbox adds to a terminal's ``TxnFields``: the schema and the terminal's record ``seq``."""

    schema_: Literal["yikatong.txn/1"] = Field(TXN_SCHEMA, alias="schema")
    seq: Annotated[int, Field(ge=1, le=2**63 - 1)]


class TxnRecord(TxnFields, _RecordHead):
    """One completed card transaction (``yikatong.txn/1``).

    ``_RecordHead`` is the last base so that its fields come first (pydantic orders fields from the far end of
    the MRO): the wire order and the order of validation errors stay schema, seq, kind, ..."""

    tac: Annotated[str, Field(pattern=r"^[0-9A-F]{8}$")]

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)

    @classmethod
    def numbered(cls, seq: int, fields: TxnFields) -> TxnRecord:
        """``fields`` as record ``seq`` of its terminal, validated (MessageError if not valid); a record passed
        as ``fields`` keeps its content and takes the new ``seq``."""
        content = {name: getattr(fields, name) for name in TxnFields.model_fields}
        try:
            return cls.model_validate({"schema": TXN_SCHEMA, "seq": seq, **content})
        except ValidationError as err:
            raise MessageError(_explain(err)) from err

    @property
    def moment(self) -> dt.datetime:
        """The transaction time as an aware datetime."""
        return dt.datetime.fromisoformat(self.time)

    @property
    def identity(self) -> tuple[str, str, str, int]:
        """What makes two copies the same record: (issuer, serial or uid, kind, card counter)."""
        return (self.card.issuer, self.card.id, self.kind, self.card_counter)

    @property
    def record_id(self) -> str:
        """``{issuer}-{card}-{kind}-{card_counter}`` as in the daily clearing file."""
        return "-".join(str(part) for part in self.identity)

    def to_json(self) -> str:
        """The compact JSON payload (field order fixed, optional fields left out when empty)."""
        # model_dump_json's own work, without its wrapper's (a quarter of the cost for a record)
        return self.__pydantic_serializer__.to_json(self, by_alias=True, exclude_none=True).decode()


class Batch(_Model):
    """Several records in one publish (``yikatong.batch/1``)."""

    schema_: Literal["yikatong.batch/1"] = Field(BATCH_SCHEMA, alias="schema")
    records: list[dict[str, object]]

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)


class Rejection(_Model):
    """A record the clearing refused for good (it is stored in quarantine there)."""

    seq: Annotated[int, Field(ge=1)]
    reason: str


class Ack(_Model):
    """The clearing has committed every record of ``terminal`` up to ``acked_through`` (``yikatong.ack/1``)."""

    schema_: Literal["yikatong.ack/1"] = Field(ACK_SCHEMA, alias="schema")
    terminal: TerminalNo
    acked_through: Annotated[int, Field(ge=0)]
    rejected: list[Rejection] = []

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        """The JSON payload."""
        return self.model_dump_json(by_alias=True)


RECORD_ID: Final = re.compile(r"^[0-9]{4}-([0-9]{20}|[0-9A-F]{8})-[a-z_]{4,11}-[0-9]{1,5}$")
"""``{issuer}-{card}-{kind}-{card_counter}`` as in the daily clearing file."""
RecordId = Annotated[str, Field(pattern=RECORD_ID.pattern)]


class InteropRejection(_Model):
    """A forwarded record the issuer city refused (``record_id`` as in the daily clearing file)."""

    record_id: RecordId
    reason: str


class InteropAck(_Model):
    """The issuer city's answer on records an acquiring city forwarded (``yikatong.interop-ack/1``): each is
    either committed to the issuer's ledger (``acked``) or refused (``rejected``)."""

    schema_: Literal["yikatong.interop-ack/1"] = Field(INTEROP_ACK_SCHEMA, alias="schema")
    issuer: CityCode
    acked: list[RecordId] = []
    rejected: list[InteropRejection] = []

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        """The JSON payload."""
        return self.model_dump_json(by_alias=True)


class HotlistSnapshot(_Model):
    """The head of an issuer's full hotlist (``yikatong.hotlist-snapshot/1``, retained on
    ``yikatong/{issuer}/hotlist/snapshot``): version ``version`` holds ``cards`` cards, sent as ``chunks`` chunk
    messages whose data, joined and decompressed, has SHA-256 ``sha256`` (``terminals.hotlist``'s canonical form).
    ``published`` is when the issuer published that version (liability at settlement counts from it)."""

    schema_: Literal["yikatong.hotlist-snapshot/1"] = Field(SNAPSHOT_SCHEMA, alias="schema")
    issuer: CityCode
    version: Annotated[int, Field(ge=1, le=2**31 - 1)]
    published: str
    cards: Annotated[int, Field(ge=0, le=2**31 - 1)]
    chunks: Annotated[int, Field(ge=1, le=10_000)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("published")
    @classmethod
    def _aware_published(cls, value: str) -> str:
        return _aware(value)

    def to_json(self) -> str:
        """The JSON payload."""
        return self.model_dump_json(by_alias=True)


class HotlistChunk(_Model):
    """Chunk ``index`` of snapshot ``version`` (``yikatong.hotlist-chunk/1``, retained on
    ``yikatong/{issuer}/hotlist/snapshot/{index}``): base64 of a slice of the compressed snapshot."""

    schema_: Literal["yikatong.hotlist-chunk/1"] = Field(CHUNK_SCHEMA, alias="schema")
    issuer: CityCode
    version: Annotated[int, Field(ge=1, le=2**31 - 1)]
    index: Annotated[int, Field(ge=0, lt=10_000)]
    data: Annotated[str, Field(max_length=MAX_CHUNK, pattern=r"^[A-Za-z0-9+/]*={0,2}$")]

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        """The JSON payload."""
        return self.model_dump_json(by_alias=True)


class HotlistChange(_Model):
    """What one hotlist version added, and when it was published."""

    version: Annotated[int, Field(ge=1, le=2**31 - 1)]
    published: str
    add: list[str]

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("published")
    @classmethod
    def _aware_published(cls, value: str) -> str:
        return _aware(value)

    @field_validator("add")
    @classmethod
    def _card_ids(cls, cards: list[str]) -> list[str]:
        return _card_ids(cards)


class HotlistDelta(_Model):
    """The changes of an issuer's hotlist since snapshot ``base`` (``yikatong.hotlist-delta/1``, retained on
    ``yikatong/{issuer}/hotlist/delta``): ``changes`` are versions ``base``+1 .. ``version`` in order, so a
    terminal at any version from ``base`` on catches up from this one message; one below ``base`` needs the
    snapshot."""

    schema_: Literal["yikatong.hotlist-delta/1"] = Field(DELTA_SCHEMA, alias="schema")
    issuer: CityCode
    base: Annotated[int, Field(ge=0, le=2**31 - 1)]
    version: Annotated[int, Field(ge=1, le=2**31 - 1)]
    changes: list[HotlistChange]

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _in_order(self) -> HotlistDelta:
        if [c.version for c in self.changes] != list(range(self.base + 1, self.version + 1)):
            raise ValueError(f"changes must be versions {self.base + 1}..{self.version} in order")
        if sum(len(c.add) for c in self.changes) > MAX_DELTA_CARDS:
            raise ValueError(f"more than {MAX_DELTA_CARDS} cards in one delta")
        return self

    def to_json(self) -> str:
        """The JSON payload."""
        return self.model_dump_json(by_alias=True)


def _card_ids(cards: list[str]) -> list[str]:
    """``cards`` when each is a card id (CARD_ID); ValueError naming the first that is not."""
    bad = [c for c in cards if not CARD_ID.match(c)]
    if bad:
        raise ValueError(f"not a 20-digit serial or 8-hex-digit UID: {bad[0]!r}")
    return cards


def _aware(value: str) -> str:
    """``value`` when it is an ISO 8601 time with its UTC offset in the years 1970-9998 (a record's or a hotlist
    version's time); ValueError otherwise."""
    try:
        moment = dt.datetime.fromisoformat(value)
    except ValueError as err:
        raise ValueError("time must be ISO 8601, e.g. 2026-11-24T08:15:02+08:00") from err
    if moment.utcoffset() is None:
        raise ValueError("time must carry its UTC offset (+08:00)")
    if not 1970 <= moment.year <= 9998:  # the card's BCD date has 4 year digits; +08:00 must not overflow
        raise ValueError("time must lie between the years 1970 and 9998")
    return value


class Health(_Model):
    """A clearing worker's state (``yikatong.health/1``, retained on ``yikatong/{city}/clearing/health``): a
    stall shows from outside as an old ``time`` or ``last_commit`` or a growing ``backlog``."""

    schema_: Literal["yikatong.health/1"] = Field(HEALTH_SCHEMA, alias="schema")
    city: CityCode
    worker: str
    time: str
    last_commit: str | None
    backlog: Annotated[int, Field(ge=0)]  # messages received and not yet stored
    stored: Annotated[int, Field(ge=0)]
    quarantined: Annotated[int, Field(ge=0)]
    forwarded_unanswered: Annotated[int, Field(ge=0)]
    dropped: Annotated[int, Field(ge=0)] = 0  # not taken in while the database was behind (senders resend)
    quarantine_overflow: Annotated[int, Field(ge=0)] = 0  # refused past a sender's daily cap: counted only

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)

    def to_json(self) -> str:
        """The JSON payload."""
        return self.model_dump_json(by_alias=True)


def _explain(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "payload"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}"


@dataclass(frozen=True)
class Limits:
    """What a payload may be at most (wire.md "Limits and health"), checked before it is parsed."""

    max_payload: int = MAX_PAYLOAD
    max_records: int = MAX_RECORDS
    max_depth: int = MAX_DEPTH
    max_string: int = MAX_STRING


DEFAULT_LIMITS: Final = Limits()
_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)  # unrolled, possessive: 3x faster than (?:a|b)*
_INNERMOST = re.compile(r"\[[^\[\]{}]*\]|\{[^\[\]{}]*\}")
_BRACKET = re.compile(r"[\[\]{}]")
_LONG_NUMBER = re.compile(rf"[0-9]{{{MAX_DIGITS + 1},}}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(text: str, limits: Limits) -> None:
    """Depth, string lengths and number sizes of JSON text, with regular expressions only (C speed, no
    recursion), so nothing hostile reaches the JSON parser."""
    strings = _STRING.findall(text)
    # a string's JSON form is at least as long as its text: decode only when some form is over the limit
    if strings and max(map(len, strings)) - 2 > limits.max_string:
        for form in strings:
            if len(form) - 2 > limits.max_string:
                try:
                    length = len(json.loads(form))
                except ValueError as err:
                    raise MessageError(f"not UTF-8 JSON: {err}") from err
                if length > limits.max_string:
                    raise MessageError(f"a string of {length} characters exceeds {limits.max_string}")
    bare = _STRING.sub('""', text) if strings else text
    digits = _LONG_NUMBER.search(bare)
    if digits:
        raise MessageError(f"a number of {len(digits.group())} digits is out of range (at most {MAX_DIGITS})")
    for _ in range(limits.max_depth):
        bare, found = _INNERMOST.subn("", bare)
        if not found:
            break
    if _BRACKET.search(bare):
        raise MessageError(f"JSON nested deeper than {limits.max_depth} levels (or unbalanced brackets)")


def load_json(payload: bytes | str, limits: Limits = DEFAULT_LIMITS) -> JSONValue:
    """Decode a payload: size, UTF-8, depth, string and number limits checked before parsing, then JSON (no
    NaN or Infinity, no lone UTF-16 surrogates); MessageError otherwise."""
    if len(payload) > limits.max_payload:
        raise MessageError(f"payload of {len(payload)} bytes exceeds {limits.max_payload}")
    try:
        text = payload.decode() if isinstance(payload, bytes) else payload
    except UnicodeDecodeError as err:
        raise MessageError(f"not UTF-8 JSON: {err}") from err
    _check_text(text, limits)
    try:
        doc: JSONValue = json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as err:
        raise MessageError(f"not UTF-8 JSON: {err}") from err
    if "\\u" in text and _has_surrogate(doc):
        raise MessageError("a string holds a lone UTF-16 surrogate (\\uD800-\\uDFFF): not text")
    return doc


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _has_surrogate(doc: JSONValue) -> bool:
    """Whether a decoded value (depth already bounded) holds a string with a lone surrogate."""
    if isinstance(doc, str):
        return _SURROGATE.search(doc) is not None
    if isinstance(doc, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in doc.items())
    if isinstance(doc, list):
        return any(_has_surrogate(v) for v in doc)
    return False


def _validate(model: type[_M], schema: str, doc: object) -> _M:
    if not isinstance(doc, dict) or doc.get("schema") != schema:
        raise MessageError(f"not a {schema} object")
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        raise MessageError(_explain(err)) from err


def parse_record(doc: object) -> TxnRecord:
    """A decoded JSON value as a transaction record."""
    return _validate(TxnRecord, TXN_SCHEMA, doc)


def parse_uplink(payload: bytes | str, limits: Limits = DEFAULT_LIMITS) -> list[Mapping[str, object]]:
    """The record documents of a terminal publish: one record or a batch. Each is checked by ``parse_record``
    separately, so one bad record in a batch does not sink the others."""
    doc = load_json(payload, limits)
    if isinstance(doc, dict) and doc.get("schema") == BATCH_SCHEMA:
        records = doc.get("records")
        if isinstance(records, list) and len(records) > limits.max_records:
            raise MessageError(f"a batch of {len(records)} records exceeds {limits.max_records}")
        return list(_validate(Batch, BATCH_SCHEMA, doc).records)
    if isinstance(doc, dict) and doc.get("schema") == TXN_SCHEMA:
        return [doc]
    raise MessageError(f"neither a {TXN_SCHEMA} record nor a {BATCH_SCHEMA}")


class _RecordBatch(_Model):
    """A batch whose records are validated with it, straight from the JSON text (``parse_uplink_records``)."""

    schema_: Literal["yikatong.batch/1"] = Field(BATCH_SCHEMA, alias="schema")
    records: list[TxnRecord]

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True, populate_by_name=True)


_VALID_STRING: Final = 32
"""The longest string a valid record holds but its time (a PSAM number; names and literals are shorter)."""
_VALID_DEPTH: Final = 4
"""The nesting of a valid batch: the batch, its records list, a record, its card."""


def parse_uplink_records(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> list[TxnRecord] | None:
    """The records of a terminal publish when all of them are valid, parsed and validated in one pass from the
    text; None when this cannot vouch for the payload, and the caller then takes ``parse_uplink`` and
    ``parse_record``, which give every refusal and its reason.

    The fast path's answer is theirs: it takes only text without escapes (so without surrogates, and each
    string's JSON form is its text) whose payload, batch and record schemas are given by name, and limits a
    valid record cannot reach but by its time (strings of 32 characters, depth 4, integers of at most 19 digits
    where MAX_DIGITS allows 20); the JSON parser of pydantic refuses what ``json.loads`` refuses (control
    characters, trailing text, NaN) and bounds depth and number sizes itself, so hostile text costs it no more
    than a pass."""
    if (
        len(payload) > limits.max_payload
        or limits.max_string < _VALID_STRING
        or limits.max_depth < _VALID_DEPTH
        or b"\\" in payload
        or b'"schema_"' in payload  # the schemas must be given by their names, not as the field's own
    ):
        return None
    try:
        text = payload.decode()
        if text.startswith('{"schema":"' + BATCH_SCHEMA + '"'):
            records = _RecordBatch.model_validate_json(text).records
        elif text.startswith('{"schema":"' + TXN_SCHEMA + '"'):
            records = [TxnRecord.model_validate_json(text)]
        else:
            return None
    except (UnicodeDecodeError, ValidationError):
        return None
    if not 1 <= len(records) <= limits.max_records:
        return None
    for record in records:
        if "schema_" not in record.model_fields_set or len(record.time) > limits.max_string:
            return None
    return records


def parse_ack(payload: bytes | str) -> Ack:
    """A clearing ack."""
    return _validate(Ack, ACK_SCHEMA, load_json(payload))


def parse_interop_ack(payload: bytes | str, limits: Limits = DEFAULT_LIMITS) -> InteropAck:
    """An issuer city's ack of forwarded records."""
    return _validate(InteropAck, INTEROP_ACK_SCHEMA, load_json(payload, limits))


HOTLIST_LIMITS: Final = Limits(max_string=MAX_CHUNK)
"""Hotlist messages from the issuers' clearings: a snapshot chunk is one long base64 string."""


def parse_hotlist_message(payload: bytes | str) -> HotlistSnapshot | HotlistChunk | HotlistDelta:
    """A message of an issuer's hotlist topics, told apart by its ``schema``; MessageError otherwise."""
    doc = load_json(payload, HOTLIST_LIMITS)
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema == CHUNK_SCHEMA:
        return _validate(HotlistChunk, CHUNK_SCHEMA, doc)
    if schema == DELTA_SCHEMA:
        return _validate(HotlistDelta, DELTA_SCHEMA, doc)
    return _validate(HotlistSnapshot, SNAPSHOT_SCHEMA, doc)


def parse_health(payload: bytes | str) -> Health:
    """A clearing's health message."""
    return _validate(Health, HEALTH_SCHEMA, load_json(payload))


def batch_payload(records: list[str]) -> str:
    """A ``yikatong.batch/1`` payload from record payloads that are already JSON text (sent as stored)."""
    return '{"schema":"' + BATCH_SCHEMA + '","records":[' + ",".join(records) + "]}"


# --- topics ---------------------------------------------------------------------------------------------


def txn_topic(city: str, terminal: str) -> str:
    """Where a terminal publishes its records."""
    return f"yikatong/{city}/txn/{terminal}"


def ack_topic(city: str, terminal: str) -> str:
    """Where the clearing acks a terminal's records."""
    return f"yikatong/{city}/ack/{terminal}"


def hotlist_snapshot_topic(issuer: str) -> str:
    """The head of an issuer's retained full hotlist."""
    return f"yikatong/{issuer}/hotlist/snapshot"


def hotlist_chunk_topic(issuer: str, index: int) -> str:
    """Chunk ``index`` of an issuer's retained full hotlist."""
    return f"yikatong/{issuer}/hotlist/snapshot/{index}"


def hotlist_delta_topic(issuer: str) -> str:
    """An issuer's retained hotlist changes since its last snapshot."""
    return f"yikatong/{issuer}/hotlist/delta"


HOTLIST_FILTERS: Final = ("yikatong/+/hotlist/snapshot/#", "yikatong/+/hotlist/delta")
"""What a terminal subscribes to: every issuer's hotlist, its own city's and every other city's."""


def hotlist_issuer(topic: str) -> str | None:
    """The issuer city of a hotlist topic, or None when ``topic`` is not one."""
    parts = topic.split("/")
    if len(parts) >= 4 and parts[0] == "yikatong" and parts[2] == "hotlist" and CITY_CODE.match(parts[1]):
        return parts[1]
    return None


def health_topic(city: str) -> str:
    """The city clearing's retained health message."""
    return f"yikatong/{city}/clearing/health"


def interop_txn_topic(issuer: str) -> str:
    """Records forwarded to the issuer city's clearing."""
    return f"yikatong/interop/{issuer}/txn"


def interop_ack_topic(acquirer: str) -> str:
    """The issuer city's acks of forwarded records."""
    return f"yikatong/interop/{acquirer}/ack"
