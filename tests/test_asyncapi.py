"""docs/asyncapi.yaml stays true: its payload schemas have the fields of the message models, and its channel
addresses are the topics the code uses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from terminals import messages, signing

DOC = yaml.safe_load((Path(__file__).parent.parent / "docs" / "asyncapi.yaml").read_text())
MODELS: dict[str, type[BaseModel]] = {
    "txn": messages.TxnRecord,
    "batch": messages.Batch,
    "ack": messages.Ack,
    "hotlistSnapshot": messages.HotlistSnapshot,
    "hotlistChunk": messages.HotlistChunk,
    "hotlistDelta": messages.HotlistDelta,
    "interopAck": messages.InteropAck,
    "health": messages.Health,
}


def _same_fields(schema: dict[str, object], model: type[BaseModel]) -> None:
    fields = model.model_fields
    names = {f.alias or key for key, f in fields.items()}
    required = {f.alias or key for key, f in fields.items() if f.is_required() or key == "schema_"}
    assert isinstance(schema["properties"], dict) and isinstance(schema["required"], list)
    assert set(schema["properties"]) == names
    assert set(schema["required"]) == required


@pytest.mark.parametrize("name", sorted(MODELS))
def test_schema_fields_match_the_model(name: str) -> None:
    schema = DOC["components"]["schemas"][name]
    _same_fields(schema, MODELS[name])
    schema_id = MODELS[name].model_fields["schema_"].default
    assert (
        schema["properties"]["schema"] == {"const": schema_id}
        and DOC["components"]["messages"][name]["name"] == schema_id
    )


def test_the_signed_envelope_is_what_terminals_send() -> None:
    schema = DOC["components"]["schemas"]["signed"]
    sent = json.loads(signing.seal('{"schema":"yikatong.txn/1"}', "QUJD", b"sig"))
    assert list(schema["properties"]) == schema["required"] == list(sent)  # the fixed order too
    assert schema["properties"]["schema"] == {"const": signing.SIGNED_SCHEMA} == {"const": sent["schema"]}
    assert DOC["components"]["messages"]["signed"]["name"] == signing.SIGNED_SCHEMA
    assert (schema["properties"]["cert"]["maxLength"], schema["properties"]["sig"]["maxLength"]) == (
        signing.MAX_CERT,
        signing.MAX_SIG,
    )


def test_a_deltas_changes_are_hotlist_changes() -> None:
    _same_fields(DOC["components"]["schemas"]["hotlistDelta"]["properties"]["changes"]["items"], messages.HotlistChange)


@pytest.mark.parametrize("channel", sorted(DOC["channels"]))
def test_each_channel_describes_the_parameters_of_its_address(channel: str) -> None:
    found = DOC["channels"][channel]
    assert set(found.get("parameters", {})) == set(re.findall(r"\{(\w+)\}", found["address"]))


def test_channel_addresses_are_the_topics_in_use() -> None:
    addresses = {c["address"] for c in DOC["channels"].values()}
    assert addresses == {
        messages.txn_topic("{city}", "{terminal}"),
        messages.ack_topic("{city}", "{terminal}"),
        messages.hotlist_snapshot_topic("{issuer}"),
        messages.hotlist_chunk_topic("{issuer}", "{index}"),  # type: ignore[arg-type]  # the address template
        messages.hotlist_delta_topic("{issuer}"),
        messages.health_topic("{city}"),
        messages.interop_txn_topic("{issuer_city}"),
        messages.interop_ack_topic("{acquirer_city}"),
    }
