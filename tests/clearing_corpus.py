"""The clearing's bad-input corpus: payloads a clearing must quarantine, each with the reason it must give.

Every case is a message (topic terminal + payload bytes) and the words its quarantine reason must contain;
``seq`` is the terminal record seq the clearing must ack as rejected (None: nothing to ack). The payloads that
need valid signatures are built from the test keys, so each case differs from a good record in one way only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from clearing_support import HOST, signed_records

from terminals.messages import MAX_PAYLOAD, TxnRecord, batch_payload
from yikatong.synthetic import SyntheticCard, SyntheticTerminal

CITY = "4560"
TERMINAL = "4560C0C0C001"
OTHER_TERMINAL = "4560C0C0C002"


@dataclass(frozen=True)
class Case:
    name: str
    payload: bytes
    reason: str
    seq: int | None
    topic_terminal: str = TERMINAL


def _doc(record: TxnRecord) -> dict[str, object]:
    return json.loads(record.to_json())  # type: ignore[no-any-return]


def _bytes(doc: object) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def good_records() -> list[TxnRecord]:
    """Valid records of TERMINAL (seqs 1..4) that the bad cases are made from (not published themselves)."""
    return signed_records(4, CITY, TERMINAL, issuers=("4560",), cards=2)


def corpus() -> list[Case]:
    """Every bad-input case. Each is the terminal's record seq 2, right after the original (seq 1), so that
    an ack covers it; sent one after another they are simply quarantined again and again."""
    base = _doc(good_records()[0])

    def variant(seq: int, **changes: object) -> dict[str, object]:
        return {**base, "seq": seq, **changes}

    forged = variant(2, tac="00000000" if base["tac"] != "00000000" else "11111111")
    unknown = variant(2, card={"issuer": "9999", "serial": "31049999000000000001"})
    # a clone: the same card and counter at another terminal, genuinely signed, other content
    clone_card = SyntheticCard("4560", base["card"]["serial"], alg="sm4", balance=base["balance_before"])  # type: ignore[index]
    clone_card.counter = base["card_counter"]  # type: ignore[assignment]
    clone = SyntheticTerminal(HOST, CITY, TERMINAL, TxnRecord.model_validate(base).moment)
    clone.seq = 1
    replay = clone.purchase(clone_card, 999)
    huge = batch_payload([json.dumps(variant(20 + i)) for i in range(MAX_PAYLOAD // len(json.dumps(base)) + 2)])
    return [
        Case("not-json", b"\x00\xff this is not JSON", "not UTF-8 JSON", None),
        Case("json-array", b"[1, 2, 3]", "neither a yikatong.txn/1 record nor a yikatong.batch/1", None),
        Case("json-other-schema", b'{"schema": "yikatong.txn/9", "seq": 11}', "neither a yikatong.txn/1", None),
        Case("empty-batch", b'{"schema":"yikatong.batch/1","records":[]}', "empty batch", None),
        Case("huge", huge.encode(), f"exceeds {MAX_PAYLOAD}", None),
        Case("wrong-type", _bytes(variant(2, amount="200")), "amount: Input should be a valid integer", 2),
        Case("missing-field", _bytes({k: v for k, v in variant(2).items() if k != "tac"}), "tac: Field required", 2),
        Case("forged-tac", _bytes(forged), "TAC does not verify", 2),
        Case("unknown-issuer", _bytes(unknown), "unknown issuer 9999", 2),
        Case(
            "foreign-terminal-topic",
            _bytes(variant(2)),
            f"record of terminal {TERMINAL} published on the topic of terminal {OTHER_TERMINAL}",
            2,
            OTHER_TERMINAL,
        ),
        Case("replayed-counter", replay.to_json().encode(), "conflict: record", 2),
        Case("wrong-acquirer", _bytes(variant(2, acquirer="4510")), "names acquirer 4510", 2),
        Case("balance-arithmetic", _bytes(variant(2, balance_after=1)), "balance_after must be", 2),
    ]
