"""Card images: a card's whole non-volatile state as a JSON file (``yikatong.card/1``).

Saving is atomic (write aside, fsync, rename), so a crash while saving leaves the previous image whole.
Loading checks every field and names the file and field at fault.
"""

from __future__ import annotations

import json
from pathlib import Path

from cardsim.crypto import Algorithm
from cardsim.eeprom import Journal
from cardsim.files import JSONValue, read_json, write_text_atomic
from cardsim.mifare import BLOCK_SIZE, BLOCKS, M1State, Profile
from cardsim.purse import (
    BINARY_FILES,
    LOG_RECORD_SIZE,
    LOG_RECORDS,
    PUBLIC_DATA_SIZE,
    TRIP_RECORD_SIZE,
    TRIP_RECORDS,
    Defect,
    PurseKeys,
    PurseState,
    PurseUpdate,
    TransactionProof,
)

SCHEMA = "yikatong.card/1"


class CardImageError(ValueError):
    """A card image that cannot be read; the message names the file and the field."""


# --- encoding ------------------------------------------------------------------------------------


def _records(records: list[bytes]) -> JSONValue:
    return [r.hex().upper() for r in records]


def _proof(proof: TransactionProof | None) -> JSONValue:
    if proof is None:
        return None
    return {
        "counter": proof.counter,
        "type": proof.txn_type,
        "mac2": proof.mac2.hex().upper(),
        "tac": proof.tac.hex().upper(),
    }


def _update_value(value: object) -> JSONValue:
    """A journalled field's value as the state's own field is saved (record lists and files as hex, the proof as an
    object)."""
    if isinstance(value, list):
        return _records(value)
    if isinstance(value, TransactionProof):
        return _proof(value)
    if isinstance(value, int):
        return value
    if isinstance(value, bytes):  # a public file's new content, hex like the files themselves
        return value.hex().upper()
    raise TypeError(f"no image encoding for a journalled {type(value).__name__}")


def purse_to_json(state: PurseState) -> dict[str, JSONValue]:
    """The image document of a purse card."""
    journal: JSONValue = None
    if state.journal is not None:
        journal = {
            "valid": state.journal.valid,
            "updates": {name: _update_value(value) for name, value in state.journal.updates.writes()},
        }
    return {
        "schema": SCHEMA,
        "tech": "cpu",
        "algorithm": state.algorithm.value,
        "key_version": state.key_version,
        "key_index": state.key_index,
        "keys": {
            "purchase": state.keys.purchase.hex().upper(),
            "load": state.keys.load.hex().upper(),
            "tac": state.keys.tac.hex().upper(),
            "maintenance": state.keys.maintenance.hex().upper(),
        },
        "files": {
            "15": state.public_data.hex().upper(),
            "16": state.holder_data.hex().upper(),
            "17": state.interop_data.hex().upper(),
        },
        "balance": state.balance,
        "max_balance": state.max_balance,
        "offline_counter": state.offline_counter,
        "online_counter": state.online_counter,
        "log": _records(state.log),
        "trips": _records(state.trips),
        "proof": _proof(state.proof),
        "mac_failures": state.mac_failures,
        "locked": state.locked,
        "blocked": state.blocked,
        "journal": journal,
        "defects": [d.value for d in sorted(state.defects, key=lambda d: d.value)],
        "atr_historical": state.atr_historical.hex().upper(),
    }


# --- decoding ------------------------------------------------------------------------------------


class _Reader:
    """Typed field access that raises CardImageError naming the field."""

    def __init__(self, doc: dict[str, object], where: str) -> None:
        self.doc = doc
        self.where = where

    def fail(self, field: str, what: str) -> CardImageError:
        return CardImageError(f"{self.where}: field '{field}' {what}")

    def integer(self, field: str, low: int, high: int) -> int:
        value = self.doc.get(field)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.fail(field, f"must be an integer {low}..{high}")
        return value

    def flag(self, field: str) -> bool:
        value = self.doc.get(field)
        if not isinstance(value, bool):
            raise self.fail(field, "must be true or false")
        return value

    def hexbytes(self, field: str, length: int | None = None, value: object = None) -> bytes:
        value = self.doc.get(field) if value is None else value
        if not isinstance(value, str):
            raise self.fail(field, "must be a hex string")
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise self.fail(field, "must be a hex string") from None
        if length is not None and len(raw) != length:
            raise self.fail(field, f"must be {length} bytes")
        return raw

    def records(self, field: str, size: int, most: int, value: object = None) -> list[bytes]:
        value = self.doc.get(field) if value is None else value
        if not isinstance(value, list) or len(value) > most:
            raise self.fail(field, f"must be a list of at most {most} records")
        return [self.hexbytes(field, size, v) for v in value]

    def proof(self, value: object) -> TransactionProof | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.fail("proof", "must be an object or null")
        sub = _Reader(value, f"{self.where}: proof")
        return TransactionProof(
            sub.integer("counter", 0, 0xFFFF),
            sub.integer("type", 0, 0xFF),
            sub.hexbytes("mac2", 4),
            sub.hexbytes("tac", 4),
        )


def purse_from_json(doc: object, where: str = "card image") -> PurseState:
    """Rebuild a purse card's state from its image; CardImageError names what is wrong."""
    if not isinstance(doc, dict):
        raise CardImageError(f"{where}: not a JSON object")
    if doc.get("schema") != SCHEMA:
        raise CardImageError(f"{where}: schema must be {SCHEMA!r}, got {doc.get('schema')!r}")
    if doc.get("tech") != "cpu":
        raise CardImageError(f"{where}: tech {doc.get('tech')!r} is not a CPU purse card")
    r = _Reader(doc, where)
    try:
        algorithm = Algorithm(doc.get("algorithm"))
    except ValueError:
        raise r.fail("algorithm", "must be '3des', 'sm4' or 'des'") from None
    keys_doc, files_doc = doc.get("keys"), doc.get("files")
    if not isinstance(keys_doc, dict):
        raise r.fail("keys", "must be an object")
    if not isinstance(files_doc, dict):
        raise r.fail("files", "must be an object")
    kr, fr = _Reader(keys_doc, f"{where}: keys"), _Reader(files_doc, f"{where}: files")
    max_balance = r.integer("max_balance", 0, 0xFFFFFFFF)
    defects = _defects(r, doc.get("defects", []))
    # a card planted with a flaw that lets its balance past the maximum may have been saved there
    balance_limit = 0xFFFFFFFF if defects & {Defect.NO_MAX_BALANCE, Defect.OVERDRAFT} else max_balance
    state = PurseState(
        algorithm=algorithm,
        key_version=r.integer("key_version", 0, 255),
        key_index=r.integer("key_index", 0, 255),
        keys=PurseKeys(*(kr.hexbytes(k, 16) for k in ("purchase", "load", "tac", "maintenance"))),
        public_data=fr.hexbytes("15", PUBLIC_DATA_SIZE),
        holder_data=fr.hexbytes("16"),
        interop_data=fr.hexbytes("17"),
        balance=r.integer("balance", 0, balance_limit),
        max_balance=max_balance,
        offline_counter=r.integer("offline_counter", 0, 0xFFFF),
        online_counter=r.integer("online_counter", 0, 0xFFFF),
        log=r.records("log", LOG_RECORD_SIZE, LOG_RECORDS),
        trips=r.records("trips", TRIP_RECORD_SIZE, TRIP_RECORDS),
        proof=r.proof(doc.get("proof")),
        mac_failures=r.integer("mac_failures", 0, 255),
        locked=r.flag("locked"),
        blocked=r.flag("blocked"),
    )
    state.journal = _journal(r, doc.get("journal"), {name: len(getattr(state, name)) for name in BINARY_FILES.values()})
    state.defects = defects
    if "atr_historical" in doc:  # the chip maker's ATR bytes (older images: the simulator's own)
        state.atr_historical = r.hexbytes("atr_historical")
        if len(state.atr_historical) > 15:
            raise r.fail("atr_historical", "must be at most 15 bytes")
    return state


def _defects(r: _Reader, value: object) -> frozenset[Defect]:
    """Planted chip OS flaws (absent on genuine cards' images)."""
    if not isinstance(value, list):
        raise r.fail("defects", "must be a list")
    try:
        return frozenset(Defect(v) for v in value)
    except (TypeError, ValueError):
        raise r.fail("defects", f"may hold only {', '.join(d.value for d in Defect)}") from None


def _journal(r: _Reader, value: object, file_sizes: dict[str, int]) -> Journal[PurseUpdate] | None:
    """The pending write of a card saved in the middle of one; ``file_sizes``: the length of each public file, which
    a write never changes (replaying a value of another length would resize the file)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("updates"), dict):
        raise r.fail("journal", "must be null or an object with 'updates'")
    valid = _Reader(value, f"{r.where}: journal").flag("valid")
    fields = _Reader(value["updates"], f"{r.where}: journal")
    counts: dict[str, int] = {}
    records: dict[str, list[bytes]] = {}
    proof = None
    files: dict[str, bytes] = {}
    for name, raw in fields.doc.items():  # in the document's order, so the first bad field is named
        if name in ("balance", "offline_counter", "online_counter", "mac_failures"):
            counts[name] = fields.integer(name, 0, 0xFFFFFFFF)
        elif name == "log":
            records[name] = r.records("journal.log", LOG_RECORD_SIZE, LOG_RECORDS, raw)
        elif name == "trips":
            records[name] = r.records("journal.trips", TRIP_RECORD_SIZE, TRIP_RECORDS, raw)
        elif name == "proof":
            proof = r.proof(raw)
        elif name in BINARY_FILES.values():
            files[name] = fields.hexbytes(name)
            if len(files[name]) != file_sizes[name]:
                raise fields.fail(name, f"must be {file_sizes[name]} bytes, as long as the file a write replaces")
        else:
            raise r.fail("journal", f"has an unknown update {name!r}")
    updates = PurseUpdate(
        balance=counts.get("balance"),
        offline_counter=counts.get("offline_counter"),
        online_counter=counts.get("online_counter"),
        log=records.get("log"),
        proof=proof,
        mac_failures=counts.get("mac_failures"),
        trips=records.get("trips"),
        public_data=files.get("public_data"),
        holder_data=files.get("holder_data"),
        interop_data=files.get("interop_data"),
    )
    return Journal(updates, valid)


# --- files ---------------------------------------------------------------------------------------


def write_json_atomic(path: Path, doc: object) -> None:
    """Write JSON so that readers see the old file or the new one, never a half-written one."""
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")


def save_purse(path: Path, state: PurseState) -> None:
    """Save a purse card image atomically."""
    write_json_atomic(path, purse_to_json(state))


def load_purse(path: Path) -> PurseState:
    """Load a purse card image; CardImageError names the file and the problem."""
    return purse_from_json(read_json(path, CardImageError, "card image"), str(path))


# --- MIFARE Classic images -------------------------------------------------------------------------


def m1_to_json(state: M1State) -> dict[str, JSONValue]:
    """The image document of an M1 card: its 64 blocks as hex, and its chip profile."""
    return {
        "schema": SCHEMA,
        "tech": "m1",
        "profile": state.profile.value,
        "blocks": _records(state.blocks),
    }


def m1_from_json(doc: object, where: str = "card image") -> M1State:
    """Rebuild an M1 card's state from its image; CardImageError names what is wrong."""
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA or doc.get("tech") != "m1":
        raise CardImageError(f"{where}: not a {SCHEMA} image of an M1 card")
    r = _Reader(doc, where)
    try:
        profile = Profile(doc.get("profile"))
    except ValueError:
        raise r.fail("profile", f"must be one of {', '.join(p.value for p in Profile)}") from None
    blocks = r.records("blocks", BLOCK_SIZE, BLOCKS)
    if len(blocks) != BLOCKS:
        raise r.fail("blocks", f"must hold {BLOCKS} blocks")
    return M1State(blocks=blocks, profile=profile)


def save_card(path: Path, state: PurseState | M1State) -> None:
    """Save a CPU or M1 card image atomically."""
    write_json_atomic(path, m1_to_json(state) if isinstance(state, M1State) else purse_to_json(state))


def load_card(path: Path) -> PurseState | M1State:
    """Load a CPU or M1 card image; CardImageError names the file and the problem."""
    doc = read_json(path, CardImageError, "card image")
    if isinstance(doc, dict) and doc.get("tech") == "m1":
        return m1_from_json(doc, str(path))
    return purse_from_json(doc, str(path))
