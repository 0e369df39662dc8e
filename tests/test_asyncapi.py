"""docs/asyncapi.yaml stays true: its payload schemas have the fields of the message models, and its channel
addresses are the topics the code uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from terminals import messages

DOC = yaml.safe_load((Path(__file__).parent.parent / "docs" / "asyncapi.yaml").read_text())
MODELS: dict[str, Any] = {
    "txn": messages.TxnRecord,
    "batch": messages.Batch,
    "ack": messages.Ack,
    "hotlist": messages.Hotlist,
    "interopAck": messages.InteropAck,
    "health": messages.Health,
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schema_fields_match_the_model(name: str) -> None:
    schema = DOC["components"]["schemas"][name]
    fields = MODELS[name].model_fields
    names = {f.alias or key for key, f in fields.items()}
    required = {f.alias or key for key, f in fields.items() if f.is_required() or key == "schema_"}
    assert set(schema["properties"]) == names
    assert set(schema["required"]) == required


def test_channel_addresses_are_the_topics_in_use() -> None:
    addresses = {c["address"] for c in DOC["channels"].values()}
    assert addresses == {
        messages.txn_topic("{city}", "{terminal}"),
        messages.ack_topic("{city}", "{terminal}"),
        messages.hotlist_topic("{city}"),
        messages.health_topic("{city}"),
        messages.interop_txn_topic("{issuer_city}"),
        messages.interop_ack_topic("{acquirer_city}"),
    }
