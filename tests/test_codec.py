"""The wire-format codec and the validation rules, on bytes written by us and by confluent-kafka."""
from __future__ import annotations

import math
import struct
import time

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext

import streams.codec as codec_module
from streams.codec import (Codec, DeadLetter, DeadLetterReason, EventKind, LocalCatalogue, RegistryCatalogue,
                           SchemaLookupNeeded, SchemaRegistryUnavailable, SchemaRejected, schema_source)
from streams.simulate import simulate_records
from tests.support import fail_schema_registrations, refuse_schema_lookups

RECORDS = {kind: next(r for k, r in simulate_records(200, seed=3) if k is kind) for kind in EventKind}


@pytest.mark.parametrize("kind", list(EventKind))
def test_round_trip_in_confluent_wire_format(kind):
    codec = Codec()
    payload = codec.encode(kind, RECORDS[kind])
    assert payload[0] == 0
    assert struct.unpack(">I", payload[1:5])[0] == LocalCatalogue().id_for(kind)
    assert codec.decode(kind, payload) == RECORDS[kind]


@pytest.mark.parametrize("kind", list(EventKind))
def test_bytes_from_confluent_avro_serializer_decode_to_the_same_record(kind):
    registry = SchemaRegistryClient.new_client({"url": "mock://abstream-codec-test"})
    local = LocalCatalogue()
    serializer = AvroSerializer(registry, local.schema_json(kind))
    record = RECORDS[kind]
    payload = serializer(record, SerializationContext(f"abstream.{kind.value}s", MessageField.VALUE))
    assert Codec(RegistryCatalogue(registry)).decode(kind, payload) == record


def test_registry_catalogue_registers_and_reads_back():
    registry = SchemaRegistryClient.new_client({"url": "mock://abstream-codec-register"})
    codec = Codec(RegistryCatalogue(registry))
    payload = codec.encode(EventKind.OUTCOME, RECORDS[EventKind.OUTCOME])
    fresh_reader = Codec(RegistryCatalogue(registry))
    assert fresh_reader.decode(EventKind.OUTCOME, payload) == RECORDS[EventKind.OUTCOME]


def test_an_id_the_registry_does_not_know_is_asked_about_once_in_a_while(monkeypatch):
    registry = SchemaRegistryClient.new_client({"url": "mock://abstream-codec-missing"})
    asked = []
    ask = registry.get_schema
    monkeypatch.setattr(registry, "get_schema", lambda schema_id, *a, **k: asked.append(schema_id) or ask(schema_id))
    codec = Codec(RegistryCatalogue(registry))
    good = Codec().encode(EventKind.ASSIGNMENT, RECORDS[EventKind.ASSIGNMENT])
    unknown = b"\x00" + struct.pack(">I", 4242) + good[5:]
    letters = [codec.decode(EventKind.ASSIGNMENT, unknown) for _ in range(50)]
    assert {letter.reason for letter in letters} == {DeadLetterReason.UNKNOWN_SCHEMA}
    assert len({letter.detail for letter in letters}) == 1
    assert asked == [4242]
    now = time.monotonic()
    monkeypatch.setattr(codec_module.time, "monotonic", lambda: now + codec_module.MISSING_SCHEMA_RECHECK_S + 1)
    assert codec.decode(EventKind.ASSIGNMENT, unknown).reason is DeadLetterReason.UNKNOWN_SCHEMA
    assert asked == [4242, 4242], "a schema registered since must be found"


def test_a_registry_that_cannot_answer_is_an_error_to_wait_on_not_a_dead_letter(monkeypatch):
    registry = SchemaRegistryClient.new_client({"url": "mock://abstream-codec-outage"})
    payload = Codec(RegistryCatalogue(registry)).encode(EventKind.OUTCOME, RECORDS[EventKind.OUTCOME])
    asked = refuse_schema_lookups(monkeypatch, registry, lambda _, n: n <= 3)
    codec = Codec(RegistryCatalogue(registry))
    for _ in range(3):  # asked every time: an outage is not an answer to remember
        with pytest.raises(SchemaRegistryUnavailable, match="503"):
            codec.decode(EventKind.OUTCOME, payload)
    assert codec.decode(EventKind.OUTCOME, payload) == RECORDS[EventKind.OUTCOME]
    assert len(asked) == 4
    # A registry nobody listens for is the same.
    with pytest.raises(SchemaRegistryUnavailable, match="ConnectError"):
        Codec(schema_source("http://127.0.0.1:9")).decode(EventKind.OUTCOME, payload)



def test_a_schema_the_registry_cannot_register_is_waited_on_and_one_it_refuses_is_an_error(monkeypatch):
    registry = SchemaRegistryClient.new_client({"url": "mock://abstream-codec-register-outage"})
    answers = iter([503, 409])
    fail_schema_registrations(monkeypatch, registry, lambda: next(answers, None))
    asked = refuse_schema_lookups(monkeypatch, registry, lambda *_: True)
    codec = Codec(RegistryCatalogue(registry))
    record = RECORDS[EventKind.PREDICTION]
    with pytest.raises(SchemaRegistryUnavailable, match="503"):
        codec.encode(EventKind.PREDICTION, record)
    with pytest.raises(SchemaRejected, match="409.*incompatible|incompatible"):
        codec.encode(EventKind.PREDICTION, record)
    payload = codec.encode(EventKind.PREDICTION, record)
    assert codec.decode(EventKind.PREDICTION, payload) == record
    assert asked == [], "the id the registry just gave for abstream's own schema needs no look-up"
    with pytest.raises(SchemaRegistryUnavailable, match="ConnectError"):
        Codec(schema_source("http://127.0.0.1:9")).encode(EventKind.PREDICTION, record)



def test_a_catalogue_that_does_not_ask_inline_says_what_to_ask_and_keeps_each_answer(monkeypatch):
    registry = SchemaRegistryClient.new_client({"url": "mock://abstream-codec-deferred"})
    record = RECORDS[EventKind.OUTCOME]
    payload = Codec(RegistryCatalogue(registry)).encode(EventKind.OUTCOME, record)
    good_id = struct.unpack(">I", payload[1:5])[0]
    catalogue = RegistryCatalogue(registry, ask_inline=False)
    codec = Codec(catalogue)
    asked = refuse_schema_lookups(monkeypatch, registry, lambda *_: False)
    with pytest.raises(SchemaLookupNeeded) as need:
        codec.decode(EventKind.OUTCOME, payload)
    assert (need.value.schema_id, need.value.kind) == (good_id, None) and asked == [], "asked inline"
    catalogue.ask(need.value)
    assert codec.decode(EventKind.OUTCOME, payload) == record
    # An id the registry does not know, and one whose schema is not abstream's: each answer is
    # kept, so the next try dead-letters instead of asking again (and again).
    foreign = registry.register_schema("other", Schema(
        '{"type": "record", "name": "Other", "fields": [{"name": "x", "type": "int"}]}', "AVRO"))
    for schema_id in (4242, foreign):
        unknown = b"\x00" + struct.pack(">I", schema_id) + payload[5:]
        with pytest.raises(SchemaLookupNeeded) as need:
            codec.decode(EventKind.OUTCOME, unknown)
        catalogue.ask(need.value)
        assert codec.decode(EventKind.OUTCOME, unknown).reason is DeadLetterReason.UNKNOWN_SCHEMA
    assert asked == [good_id, 4242, foreign]
    # Writing: the kind's schema is registered when asked, not inline.
    with pytest.raises(SchemaLookupNeeded) as need:
        codec.encode(EventKind.PREDICTION, RECORDS[EventKind.PREDICTION])
    assert need.value.kind is EventKind.PREDICTION
    catalogue.ask(need.value)
    assert codec.decode(EventKind.PREDICTION, codec.encode(EventKind.PREDICTION, RECORDS[EventKind.PREDICTION])) \
        == RECORDS[EventKind.PREDICTION]
    # A registry that cannot answer says so from ask, as it does inline.
    down = schema_source("http://127.0.0.1:9", ask_inline=False)
    with pytest.raises(SchemaRegistryUnavailable, match="ConnectError"):
        down.ask(SchemaLookupNeeded(schema_id=good_id))


def _reason(kind, payload):
    result = Codec().decode(kind, payload)
    assert isinstance(result, DeadLetter), result
    assert result.detail and "\n" not in result.detail
    return result.reason


def test_each_way_of_going_bad_has_its_reason():
    codec = Codec()
    good = codec.encode(EventKind.ASSIGNMENT, RECORDS[EventKind.ASSIGNMENT])
    assert _reason(EventKind.ASSIGNMENT, None) is DeadLetterReason.NOT_WIRE_FORMAT
    assert _reason(EventKind.ASSIGNMENT, b"\x01" + good[1:]) is DeadLetterReason.NOT_WIRE_FORMAT
    assert _reason(EventKind.ASSIGNMENT, b"\x00\x00") is DeadLetterReason.NOT_WIRE_FORMAT
    assert _reason(EventKind.ASSIGNMENT, b"\x00" + struct.pack(">I", 777) + good[5:]) is DeadLetterReason.UNKNOWN_SCHEMA
    assert _reason(EventKind.PREDICTION, good) is DeadLetterReason.WRONG_KIND
    assert _reason(EventKind.ASSIGNMENT, good[:-3]) is DeadLetterReason.BAD_AVRO
    assert _reason(EventKind.ASSIGNMENT, good + b"\x00") is DeadLetterReason.BAD_AVRO


def test_a_dead_letter_says_the_same_whoever_decodes_it():
    # fastavro's EOFError names its buffer object by memory address; the detail must not.
    truncated = Codec().encode(EventKind.OUTCOME, RECORDS[EventKind.OUTCOME])[:-3]
    first, second = Codec().decode(EventKind.OUTCOME, truncated), Codec().decode(EventKind.OUTCOME, truncated)
    assert first == second and first.reason is DeadLetterReason.BAD_AVRO and " at 0x" not in first.detail


@pytest.mark.parametrize("kind, change, words", [
    (EventKind.PREDICTION, {"score": math.nan}, "score"),
    (EventKind.PREDICTION, {"score": math.inf}, "score"),
    (EventKind.PREDICTION, {"latency_ms": -1.0}, "latency_ms"),
    (EventKind.PREDICTION, {"latency_ms": 1e12}, "latency_ms"),
    (EventKind.SHADOW, {"challenger_latency_ms": -3.0}, "challenger_latency_ms"),
    (EventKind.OUTCOME, {"value": -math.inf}, "value"),
    (EventKind.OUTCOME, {"unit_id": ""}, "unit_id"),
    (EventKind.ASSIGNMENT, {"event_id": ""}, "event_id"),
    (EventKind.ASSIGNMENT, {"experiment_id": "x" * 10_000}, "experiment_id"),
    (EventKind.ASSIGNMENT, {"event_time": 0}, "event_time"),
    (EventKind.ASSIGNMENT, {"event_time": 2**62}, "event_time"),
    (EventKind.ASSIGNMENT, {"segment": {str(i): "v" for i in range(100)}}, "segment"),
])
def test_validation_names_the_field(kind, change, words):
    codec = Codec()
    result = codec.decode(kind, codec.encode(kind, {**RECORDS[kind], **change}))
    assert isinstance(result, DeadLetter) and result.reason is DeadLetterReason.INVALID_FIELD
    assert words in result.detail


def test_optional_fields_may_be_null():
    codec = Codec()
    record = {**RECORDS[EventKind.SHADOW], "challenger_latency_ms": None, "challenger_score": None}
    assert codec.decode(EventKind.SHADOW, codec.encode(EventKind.SHADOW, record)) == record


def test_events_written_with_an_older_schema_still_decode(tmp_path):
    """Backward compatibility: a v2 that adds a field with a default reads v1 bytes."""
    import json
    import shutil

    from streams.codec import SCHEMA_DIR

    for f in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(f, tmp_path / f.name)
    v2 = json.loads((SCHEMA_DIR / "prediction.v1.avsc").read_text())
    v2["fields"].append({"name": "region", "type": "string", "default": "unknown"})
    (tmp_path / "prediction.v2.avsc").write_text(json.dumps(v2))
    catalogue = json.loads((SCHEMA_DIR / "catalogue.json").read_text())
    catalogue["schemas"].append({"id": 1000, "kind": "prediction", "file": "prediction.v2.avsc"})
    (tmp_path / "catalogue.json").write_text(json.dumps(catalogue))

    old_bytes = Codec().encode(EventKind.PREDICTION, RECORDS[EventKind.PREDICTION])
    evolved = LocalCatalogue(tmp_path)
    assert evolved.id_for(EventKind.PREDICTION) == 1000
    decoded = Codec(evolved, readers=evolved).decode(EventKind.PREDICTION, old_bytes)
    assert decoded == {**RECORDS[EventKind.PREDICTION], "region": "unknown"}


def test_assignments_written_with_v1_decode_under_v2():
    """Assignment v2 widened allocation_version from int to long (Avro promotes int to long)."""
    from streams.codec import SCHEMA_DIR
    import fastavro, io, json, struct

    v1 = fastavro.parse_schema(json.loads((SCHEMA_DIR / "assignment.v1.avsc").read_text()), named_schemas={})
    body = io.BytesIO()
    fastavro.schemaless_writer(body, v1, RECORDS[EventKind.ASSIGNMENT])
    v1_bytes = b"\x00" + struct.pack(">I", 1) + body.getvalue()
    assert LocalCatalogue().id_for(EventKind.ASSIGNMENT) == 10
    assert Codec().decode(EventKind.ASSIGNMENT, v1_bytes) == RECORDS[EventKind.ASSIGNMENT]
    big = {**RECORDS[EventKind.ASSIGNMENT], "allocation_version": 1_767_225_600_000}
    assert Codec().decode(EventKind.ASSIGNMENT, Codec().encode(EventKind.ASSIGNMENT, big)) == big
