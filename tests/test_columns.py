"""The column decoder against its reference, Codec.decode (fastavro and validate), row by row.

Every test states the contract of streams/columns.py: a valid row holds in every column exactly
the value of the record Codec.decode gives, an invalid row has exactly the dead letter it gives.
Payloads come from hypothesis (every event kind, odd values), from simulated streams, from
fuzzing those, and from a small Avro writer here that writes what fastavro's never does.
"""
from __future__ import annotations

import io
import json
import math
import random
import shutil
import string
import struct

import fastavro
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from streams import columns
from streams.codec import (MAX_EVENT_TIME_MS, MAX_LATENCY_MS, MAX_SEGMENT_ENTRIES, MIN_EVENT_TIME_MS, SCHEMA_DIR,
                           Codec, ControlKind, DeadLetter, EventKind, LocalCatalogue)
from streams.columns import ColumnDecoder, DecodedBatch, id_hash
from streams.simulate import simulate_records

SIMULATED = simulate_records(3000, seed=11)
REALISTIC = {kind: [r for k, r in SIMULATED if k is kind] for kind in EventKind}
HYPOTHESIS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class CountingCodec(Codec):
    """A codec that counts the payloads it decodes: the rows the column decoder hands it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decoded = 0

    def decode(self, kind, payload):
        self.decoded += 1
        return super().decode(kind, payload)


def _reader_fields(codec: Codec, kind: EventKind) -> dict[str, object]:
    return {f["name"]: f["type"] for f in codec.reader_schema(kind)["fields"]}


def _base_type(declared) -> str:
    if isinstance(declared, list):
        return _base_type(next(t for t in declared if t != "null"))
    return declared["type"] if isinstance(declared, dict) else declared


def assert_contract(kind: EventKind, values: list, batch: DecodedBatch, reference: Codec | None = None,
                    hashed: tuple[str, ...] = ("event_id",)) -> None:
    """Every row of ``batch`` is what ``reference.decode`` makes of its payload."""
    reference = reference or Codec()
    fields = _reader_fields(reference, kind)
    n = len(values)
    texts = {f for f, t in fields.items() if _base_type(t) in ("string", "enum")} - set(hashed)
    assert set(batch.strings) == texts
    assert set(batch.hashes) == set(hashed)
    assert set(batch.numbers) == {f for f, t in fields.items() if _base_type(t) in ("int", "long", "float", "double")}
    assert set(batch.nulls) == {f for f, t in fields.items() if isinstance(t, list)}
    assert batch.valid.dtype == bool and batch.valid.shape == (n,)
    for f, column in batch.strings.items():
        assert column.codes.dtype == np.int32 and column.codes.shape == (n,)
        assert len(set(column.values)) == len(column.values), f"{f}: values are not distinct"
    for f, number in batch.numbers.items():
        assert number.shape == (n,)
        assert number.dtype == (np.int64 if _base_type(fields[f]) in ("int", "long") else np.float64)
    for f, h in batch.hashes.items():
        assert h.dtype == np.uint64 and h.shape == (n,)
    for i, payload in enumerate(values):
        expected = reference.decode(kind, payload)
        if isinstance(expected, DeadLetter):
            assert not batch.valid[i], (i, payload, expected)
            assert batch.letters[i] == expected, (i, payload, batch.letters[i], expected)
            assert all(column.codes[i] == -1 for column in batch.strings.values())
            assert all(h[i] == 0 for h in batch.hashes.values())
            continue
        assert batch.valid[i], (i, payload, expected, batch.letters.get(i))
        assert i not in batch.letters
        for f, column in batch.strings.items():
            got = None if column.codes[i] == -1 else column.values[column.codes[i]]
            assert got == expected[f], (i, f, got, expected[f])
        for f, number in batch.numbers.items():
            value = 0 if expected[f] is None else expected[f]
            if _base_type(fields[f]) in ("int", "long"):
                assert int(number[i]) == value, (i, f, number[i], value)
            else:
                assert struct.pack("<d", number[i]) == struct.pack("<d", float(value)), (i, f, number[i], value)
        for f, null in batch.nulls.items():
            assert null[i] == (expected[f] is None), (i, f)
        for f, h in batch.hashes.items():
            assert int(h[i]) == (0 if expected[f] is None else id_hash(expected[f])), (i, f)
    assert set(batch.letters) == {i for i in range(n) if not batch.valid[i]}


def check(kind: EventKind, values: list, codec: Codec | None = None) -> DecodedBatch:
    codec = codec or Codec()
    batch = ColumnDecoder(codec, kind).decode(values)
    assert_contract(kind, values, batch, Codec(codec.schemas, readers=_readers(codec)))
    return batch


def _readers(codec: Codec) -> LocalCatalogue:
    return codec.schemas if isinstance(codec.schemas, LocalCatalogue) else LocalCatalogue()


# --------------------------------------------------------------------------------------
# strategies: records of every kind from the reader schema, with realistic and odd values

IDS = st.text(alphabet=string.ascii_letters + string.digits + "-_.:", min_size=1, max_size=40)
ODD_TEXT = st.one_of(
    st.just(""),
    st.text(max_size=12),  # any unicode, NUL and other control characters too
    st.text(alphabet="xy\u00e9\u20ac", min_size=250, max_size=262),  # about the length limit, in bytes and characters
    st.text(alphabet="ab", min_size=250, max_size=262),
    st.sampled_from(["a\x00", "\x00", "caf\u00e9", "\U0001f600", "x" * 256, "x" * 257]),
)
TEXT = st.one_of(IDS, IDS, ODD_TEXT)
REALISTIC_TIMES = st.integers(MIN_EVENT_TIME_MS, MAX_EVENT_TIME_MS - 1)
TIMES = st.one_of(REALISTIC_TIMES, REALISTIC_TIMES,
                  st.sampled_from([MIN_EVENT_TIME_MS - 1, MAX_EVENT_TIME_MS, 0, -1, 2**55, -(2**55) - 1]),
                  st.integers(-(2**63), 2**63 - 1))
# Zig-zag varints of 8, 9 and 10 bytes begin at 2**55, 2**62 and 2**63 (and at their negatives).
VARINT_BOUNDS = [b + d for b in (2**48, 2**55, 2**62) for d in (-1, 0)] + [-(2**55), -(2**55) - 1, -(2**62) - 1,
                                                                       2**63 - 1, -(2**63)]
LONGS = st.one_of(st.integers(-1000, 2**41), st.integers(-(2**63), 2**63 - 1), st.sampled_from(VARINT_BOUNDS),
                  st.integers(2**54, 2**62), st.integers(-(2**62), -(2**54)))
FLOATS = st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True),
                   st.sampled_from([0.0, -0.0, 5e-324, -1.5, 1e308]))
LATENCIES = st.one_of(st.floats(0, MAX_LATENCY_MS), st.floats(allow_nan=True, allow_infinity=True),
                      st.sampled_from([0.0, -0.0, -5e-324, MAX_LATENCY_MS, math.nextafter(MAX_LATENCY_MS, math.inf),
                                       -3.0]))
SAFE = {"text": IDS, "time": REALISTIC_TIMES, "long": st.integers(0, 2**41), "float": st.floats(0, 1),
        "latency": st.floats(0, MAX_LATENCY_MS), "keys": IDS, "entries": MAX_SEGMENT_ENTRIES}
ODD = {"text": TEXT, "time": TIMES, "long": LONGS, "float": FLOATS, "latency": LATENCIES,
       "keys": st.one_of(IDS, ODD_TEXT), "entries": 40}


def _field_strategy(name: str, declared, values: dict) -> st.SearchStrategy:
    if isinstance(declared, list):
        return st.one_of(st.none(), _field_strategy(name, next(t for t in declared if t != "null"), values))
    base = _base_type(declared)
    if base == "string":
        return values["text"]
    if base == "long":
        return values["time"] if name == "event_time" else values["long"]
    if base == "double":
        return values["latency"] if "latency" in name else values["float"]
    if base == "enum":
        return st.sampled_from(declared["symbols"])
    if base == "map":
        return st.dictionaries(values["keys"], values["keys"], max_size=values["entries"])
    raise AssertionError(f"no strategy for {declared}")


def records(kind: EventKind, values: dict = ODD) -> st.SearchStrategy:
    return st.fixed_dictionaries({name: _field_strategy(name, declared, values)
                                  for name, declared in _reader_fields(Codec(), kind).items()})


def encode(kind: EventKind, record: dict) -> bytes:
    return Codec().encode(kind, record)


# --------------------------------------------------------------------------------------
# the contract on valid and invalid records


@pytest.mark.parametrize("kind", list(EventKind))
@HYPOTHESIS
@given(data=st.data())
def test_records_of_every_kind_decode_as_the_codec_decodes_them(kind, data):
    batch = data.draw(st.lists(records(kind), min_size=1, max_size=25))
    check(kind, [encode(kind, r) for r in batch])


@pytest.mark.parametrize("kind", list(EventKind))
@HYPOTHESIS
@given(data=st.data())
def test_ascii_records_within_the_rules_never_reach_the_codec(kind, data):
    """The fast path is what decodes ordinary events; the codec only sees the odd ones."""
    batch = data.draw(st.lists(records(kind, SAFE), min_size=1, max_size=25))
    codec = CountingCodec()
    decoded = check(kind, [encode(kind, r) for r in batch], codec)
    assert codec.decoded == 0 and decoded.valid.all()


@pytest.mark.parametrize("kind", list(EventKind))
def test_simulated_streams_decode_without_the_codec(kind):
    values = [encode(kind, r) for r in REALISTIC[kind]]
    codec = CountingCodec()
    decoded = check(kind, values, codec)
    assert codec.decoded == 0 and decoded.valid.all()


def _assignment_v1(record: dict) -> bytes:
    v1 = LocalCatalogue().writer(1).parsed
    body = io.BytesIO()
    fastavro.schemaless_writer(body, v1, record)
    return b"\x00" + struct.pack(">I", 1) + body.getvalue()


@HYPOTHESIS
@given(batch=st.lists(st.tuples(records(EventKind.ASSIGNMENT), st.booleans(), st.integers(-(2**31), 2**31 - 1)),
                      min_size=1, max_size=20))
def test_assignments_written_with_v1_decode_as_v2(batch):
    """Schema id 1 (allocation_version an int) resolved to id 10 (a long), mixed in one batch."""
    values = [_assignment_v1({**r, "allocation_version": version}) if old else encode(EventKind.ASSIGNMENT, r)
              for r, old, version in batch]
    check(EventKind.ASSIGNMENT, values)


def test_v1_assignments_take_the_fast_path():
    codec = CountingCodec()
    values = [_assignment_v1(r) for r in REALISTIC[EventKind.ASSIGNMENT]]
    decoded = check(EventKind.ASSIGNMENT, values, codec)
    assert codec.decoded == 0 and decoded.valid.all()


# --------------------------------------------------------------------------------------
# payloads that are not events: not wire format, unknown or foreign schemas, fuzz


def _wire(schema_id: int, body: bytes) -> bytes:
    return b"\x00" + struct.pack(">I", schema_id) + body


@pytest.mark.parametrize("kind", list(EventKind))
def test_payloads_that_are_not_events_get_the_codecs_dead_letters(kind):
    good = encode(kind, REALISTIC[kind][0])
    other = next(k for k in EventKind if k is not kind)
    control = Codec().encode(ControlKind.KILLSWITCH, {"experiment_id": "x", "action": "kill", "variant": "v",
                                                      "reason": "r", "alert_id": None, "event_time": 1, "version": 1})
    values = [None, b"", b"\x00", b"\x00\x00\x00\x00", good[:5], b"\x01" + good[1:], b"garbage that is not avro",
              _wire(777, good[5:]), _wire(2**32 - 1, good[5:]), encode(other, REALISTIC[other][0]), control,
              good, good[:-1], good + b"\x00", bytes(64), b"\x00" * 5 + b"\xff" * 20]
    batch = check(kind, values)
    assert batch.valid.tolist() == [v == good for v in values]


@pytest.mark.parametrize("kind", list(EventKind))
def test_a_batch_of_one_and_an_empty_batch(kind):
    check(kind, [encode(kind, REALISTIC[kind][0])])
    check(kind, [None])
    empty = check(kind, [])
    assert empty.valid.shape == (0,) and not empty.letters


def _mutate(rng: random.Random, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(rng.randint(1, 3)):
        op = rng.choice(("flip", "set", "cut", "extend", "insert", "delete"))
        at = rng.randrange(len(data) + 1)
        if op == "flip" and at < len(data):
            data[at] ^= 1 << rng.randrange(8)
        elif op == "set" and at < len(data):
            data[at] = rng.choice((0, 1, 2, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == "cut":
            del data[at:]
        elif op == "extend":
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
        elif op == "insert":
            data[at:at] = bytes([rng.randrange(256)])
        elif op == "delete" and at < len(data):
            del data[at]
    return bytes(data)


@pytest.mark.parametrize("kind", list(EventKind))
def test_fuzzed_payloads_decode_as_the_codec_decodes_them(kind):
    rng = random.Random(kind.value)
    base = [encode(kind, r) for r in REALISTIC[kind][:200]]
    values = [_mutate(rng, rng.choice(base)) for _ in range(3000)]
    values[::15] = base  # unmutated ones among them
    check(kind, values)


@pytest.mark.parametrize("kind", list(EventKind))
@HYPOTHESIS
@given(data=st.data())
def test_fuzzed_odd_records_decode_as_the_codec_decodes_them(kind, data):
    batch = [encode(kind, r) for r in data.draw(st.lists(records(kind), min_size=1, max_size=10))]
    seed = data.draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    check(kind, batch + [_mutate(rng, p) for p in batch])


# --------------------------------------------------------------------------------------
# encodings fastavro's writer never produces, written here byte by byte (Avro 1.11, "Binary Encoding")


def varint(n: int, padding: int = 0) -> bytes:
    """The zig-zag varint of n, with ``padding`` redundant zero groups (a valid, longer encoding)."""
    u = ((n << 1) ^ (n >> 63)) & (2**64 - 1)
    groups = []
    while True:
        groups.append(u & 0x7F)
        u >>= 7
        if not u:
            break
    groups += [0] * padding
    return bytes([g | 0x80 for g in groups[:-1]] + [groups[-1]])


def text(value: str | bytes, length: int | None = None) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return varint(len(raw) if length is None else length) + raw


def block(pairs: list[tuple[str, str]], *, sized: bool = False, size: int | None = None) -> bytes:
    items = b"".join(text(k) + text(v) for k, v in pairs)
    if sized:
        return varint(-len(pairs)) + varint(len(items) if size is None else size) + items
    return varint(len(pairs)) + items


T = 1_767_225_600_000


def assignment(event_id=text("e-1"), event_time=varint(T), experiment=text("exp"), unit=text("u-1"),
               variant=text("control"), version=varint(7), segment=block([("country", "de")]) + varint(0)) -> bytes:
    return _wire(10, event_id + event_time + experiment + unit + variant + version + segment)


def prediction(score=varint(1) + struct.pack("<d", 0.5), label=varint(0), latency=struct.pack("<d", 12.5),
               status=varint(0)) -> bytes:
    head = text("e-1") + varint(T) + text("exp") + text("u-1") + text("r-1") + text("control") + text("m") + text("v1")
    return _wire(2, head + score + label + latency + status)


HANDMADE = {
    EventKind.ASSIGNMENT: [
        assignment(),
        assignment(event_time=varint(T, padding=2)),  # 8 bytes, not the shortest
        assignment(event_time=varint(T, padding=3)),  # 9 bytes
        assignment(event_time=varint(T, padding=4)),  # 10 bytes
        assignment(event_time=varint(T, padding=5)),  # 11 bytes: longer than a long
        assignment(event_time=b"\xff" * 9 + b"\x7f"),  # 10th byte beyond 64 bits
        *(assignment(version=varint(v)) for v in VARINT_BOUNDS + [2**60, -(2**60), 2**56 + 12345]),
        assignment(event_id=text("", 0)), assignment(unit=text("u", 2)), assignment(unit=text("u-1", -1)),
        assignment(unit=text("u-1", -3)), assignment(variant=varint(-1)), assignment(variant=text("x" * 300)),
        assignment(unit=text(b"u\x00")), assignment(unit=text(b"\x00")), assignment(unit=text(b"u\x00v")),
        assignment(unit=text("\u00fcn\u00efc\u00f6d\u00e9")), assignment(unit=text(b"\xff\xfe")),
        assignment(unit=text(b"\xc3")), assignment(event_id=text(b"e\x80")),
        assignment(segment=varint(0)),  # an empty map
        assignment(segment=block([("a", "1")]) + block([("b", "2"), ("c", "3")]) + varint(0)),
        assignment(segment=block([("a", "1"), ("b", "2")], sized=True) + varint(0)),
        assignment(segment=block([("a", "1")], sized=True, size=999) + varint(0)),  # a reader may ignore the size
        assignment(segment=block([("a", "1")], sized=True) + block([("b", "2")]) + varint(0)),
        assignment(segment=block([(str(i), "v") for i in range(32)]) + varint(0)),
        assignment(segment=block([(str(i), "v") for i in range(33)]) + varint(0)),
        assignment(segment=block([("same", "v")] * 40) + varint(0)),  # 40 entries, one key
        assignment(segment=block([(str(i), "v") for i in range(20)]) + block([(str(i), "w") for i in range(20)])
                   + varint(0)),
        assignment(segment=block([("k\u00e9", "v")]) + varint(0)),
        assignment(segment=block([("k", "\x00")]) + varint(0)),
        assignment(segment=block([("k", "v" * 257)]) + varint(0)),
        assignment(segment=varint(1) + text("k")),  # ends inside the map
        assignment(segment=varint(2**40) + text("k") + text("v")), assignment(segment=varint(-(2**40))),
        assignment(segment=varint(-1) + varint(-5) + text("k") + text("v") + varint(0)),
        assignment(event_time=varint(MIN_EVENT_TIME_MS - 1)), assignment(event_time=varint(MAX_EVENT_TIME_MS)),
        assignment(event_time=varint(MAX_EVENT_TIME_MS - 1)), assignment(event_time=varint(MIN_EVENT_TIME_MS)),
    ],
    EventKind.PREDICTION: [
        prediction(),
        prediction(score=varint(0)), prediction(score=varint(2) + struct.pack("<d", 0.5)),  # branch 2 of 2
        prediction(score=varint(-1) + struct.pack("<d", 0.5)),  # branch -1: fastavro takes the last
        prediction(score=varint(-2)), prediction(score=varint(1, padding=1) + struct.pack("<d", 0.5)),
        prediction(score=varint(1) + struct.pack("<d", math.nan)),
        prediction(score=varint(1) + struct.pack("<d", -0.0)),
        prediction(score=varint(1) + bytes.fromhex("7ff0000000000001")),  # a signalling NaN
        prediction(label=varint(1) + text("l")), prediction(label=varint(1) + text("")),
        prediction(label=varint(1) + text(b"\x00")),
        prediction(latency=struct.pack("<d", -0.0)), prediction(latency=struct.pack("<d", MAX_LATENCY_MS)),
        prediction(latency=struct.pack("<d", -1e-300)), prediction(latency=struct.pack("<d", math.inf)),
        prediction(latency=struct.pack("<d", 5e-324)),
        prediction(status=varint(2)), prediction(status=varint(3)), prediction(status=varint(-1)),
        prediction(status=varint(0, padding=1)), prediction(status=varint(2**40)),
        prediction(status=b""), prediction(latency=b"\x00" * 7),
    ],
}


@pytest.mark.parametrize("kind", list(HANDMADE))
def test_handmade_encodings_decode_as_the_codec_decodes_them(kind):
    values = HANDMADE[kind]
    check(kind, values)
    for value in values:
        check(kind, [value])


def test_a_batch_that_mixes_everything():
    kind = EventKind.ASSIGNMENT
    rng = random.Random(5)
    good = [encode(kind, r) for r in REALISTIC[kind][:300]]
    values = (good + [_assignment_v1(r) for r in REALISTIC[kind][:100]] + HANDMADE[kind]
              + [_mutate(rng, p) for p in good] + [None, b"", _wire(777, good[0][5:]),
                                                   encode(EventKind.OUTCOME, REALISTIC[EventKind.OUTCOME][0])]
              + [encode(kind, {**REALISTIC[kind][0], "unit_id": "\u00fcnit", "segment": {"k": "\u00e9"}})])
    rng.shuffle(values)
    check(kind, values)


# --------------------------------------------------------------------------------------
# schema resolution beyond the catalogue's: a reader that adds fields, a writer with extra,
# promoted and reordered ones


def _evolved_catalogue(tmp_path) -> LocalCatalogue:
    for f in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(f, tmp_path / f.name)
    v1 = json.loads((SCHEMA_DIR / "prediction.v1.avsc").read_text())
    status = next(f for f in v1["fields"] if f["name"] == "status")
    odd = {**v1, "fields": [
        {"name": "debug", "type": "string"},  # the reader has no such field
        *[f for f in v1["fields"] if f["name"] not in ("latency_ms", "status", "score")],
        {"name": "score", "type": ["double", "null"]},  # null second
        {"name": "latency_ms", "type": "float"},  # promoted to double
        {"name": "retries", "type": "int"},  # promoted to long
        {"name": "weight", "type": "int"},  # promoted to double
        {"name": "cost", "type": ["null", "long"]},  # promoted to ["null", "double"]
        {"name": "tier", "type": {"type": "enum", "name": "Tier", "symbols": ["a", "b"]}},  # the reader has none
        {"name": "status", "type": {**status["type"], "symbols": ["timeout", "unknown", "ok", "error"]}},
    ]}
    v2 = {**v1, "fields": [
        *v1["fields"],
        {"name": "region", "type": "string", "default": "unknown"},
        {"name": "retries", "type": "long", "default": 0},
        {"name": "weight", "type": "double", "default": 1.5},
        {"name": "cost", "type": ["null", "double"], "default": None},
        {"name": "note", "type": ["string", "null"], "default": "none"},
    ]}
    (tmp_path / "prediction.odd.avsc").write_text(json.dumps(odd))
    (tmp_path / "prediction.v2.avsc").write_text(json.dumps(v2))
    catalogue = json.loads((SCHEMA_DIR / "catalogue.json").read_text())
    catalogue["schemas"] += [{"id": 1000, "kind": "prediction", "file": "prediction.odd.avsc"},
                             {"id": 1001, "kind": "prediction", "file": "prediction.v2.avsc"}]
    (tmp_path / "catalogue.json").write_text(json.dumps(catalogue))
    return LocalCatalogue(tmp_path)


def test_schema_resolution_by_name_with_defaults_and_promotions(tmp_path):
    evolved = _evolved_catalogue(tmp_path)
    assert evolved.id_for(EventKind.PREDICTION) == 1001
    odd = evolved.writer(1000).parsed
    rng = random.Random(3)
    values = []
    for r in REALISTIC[EventKind.PREDICTION][:300]:
        body = io.BytesIO()
        fastavro.schemaless_writer(body, odd, {
            **r, "debug": rng.choice(["", "x", "\u00e9"]), "latency_ms": rng.choice([r["latency_ms"], 1e39, -1.0]),
            "retries": rng.randint(-3, 3), "weight": rng.choice([0, 7, 2**31 - 1]),
            "cost": rng.choice([None, 5, 2**53 + 1]),
            "tier": rng.choice("ab"), "status": rng.choice(["ok", "error", "timeout", "unknown"])})
        values.append(_wire(1000, body.getvalue()))
        values.append(Codec().encode(EventKind.PREDICTION, r))  # schema id 2, v1
    codec = CountingCodec(evolved, readers=evolved)
    batch = ColumnDecoder(codec, EventKind.PREDICTION).decode(values)
    assert_contract(EventKind.PREDICTION, values, batch, Codec(evolved, readers=evolved))
    assert batch.strings["region"].values == ["unknown"] and batch.strings["note"].values == ["none"]
    # Only the rows a rule or the resolution rejects need the codec: a latency of 1e39 (written
    # as a float32: infinite) or -1.0, the symbol v2 lacks, and "\u00e9" in the dropped field.
    assert 0 < codec.decoded < len(values) / 2


# --------------------------------------------------------------------------------------
# batches and their rows


@pytest.mark.parametrize("kind", list(EventKind))
@HYPOTHESIS
@given(data=st.data())
def test_a_batch_decodes_as_its_rows_one_by_one(kind, data):
    batch_records = data.draw(st.lists(records(kind), min_size=1, max_size=12))
    values = [encode(kind, r) for r in batch_records] + data.draw(
        st.lists(st.sampled_from([None, b"", b"\x00\x00\x00\x00\x02junk"] + HANDMADE.get(kind, [])), max_size=3))
    decoder = ColumnDecoder(Codec(), kind)
    whole = decoder.decode(values)
    for i, value in enumerate(values):
        alone = decoder.decode([value])
        assert alone.valid[0] == whole.valid[i]
        if not whole.valid[i]:
            assert alone.letters[0] == whole.letters[i]
        for f, column in whole.strings.items():
            one = alone.strings[f]
            assert (None if one.codes[0] < 0 else one.values[one.codes[0]]) == (
                None if column.codes[i] < 0 else column.values[column.codes[i]])
        for f, number in whole.numbers.items():
            assert alone.numbers[f][0].tobytes() == number[i].tobytes()
        for f, null in whole.nulls.items():
            assert alone.nulls[f][0] == null[i]
        for f, h in whole.hashes.items():
            assert alone.hashes[f][0] == h[i]


def test_strings_that_share_a_sort_key_keep_their_own_values(monkeypatch):
    """With a key that ignores all but the last 8 bytes, the distinct values' check sees the
    collisions and decides by the bytes."""
    monkeypatch.setattr(columns, "_KEY_MULTIPLIER", np.uint64(0))
    kind = EventKind.ASSIGNMENT
    base = REALISTIC[kind][0]
    values = [encode(kind, {**base, "unit_id": f"{prefix:08d}-same-tail", "experiment_id": f"x{prefix}"})
              for prefix in range(40) for _ in range(2)]
    batch = check(kind, values)
    assert len(batch.strings["unit_id"].values) == 40


def test_other_hashed_fields_and_their_strings():
    kind = EventKind.PREDICTION
    values = [encode(kind, r) for r in REALISTIC[kind][:50]] + [encode(kind, {**REALISTIC[kind][0], "label": "l"})]
    hashed = ("unit_id", "label")
    batch = ColumnDecoder(Codec(), kind, hashed=hashed).decode(values)
    assert_contract(kind, values, batch, hashed=hashed)
    assert "event_id" in batch.strings


def test_what_the_decoder_refuses_to_decode():
    with pytest.raises(ValueError, match="not an event kind"):
        ColumnDecoder(Codec(), ControlKind.DECISION)
    with pytest.raises(ValueError, match="hashed field latency_ms"):
        ColumnDecoder(Codec(), EventKind.PREDICTION, hashed=("latency_ms",))
    with pytest.raises(ValueError, match="hashed field nope"):
        ColumnDecoder(Codec(), EventKind.PREDICTION, hashed=("nope",))


# --------------------------------------------------------------------------------------
# id_hash


def fnv1a_64(data: bytes) -> int:
    """FNV-1a, 64 bits, as http://www.isthe.com/chongo/tech/comp/fnv/ defines it."""
    h = 14695981039346656037
    for byte in data:
        h = ((h ^ byte) * 1099511628211) % 2**64
    return h


def fmix64(k: int) -> int:
    """MurmurHash3's 64-bit finalizer (smhasher, MurmurHash3.cpp)."""
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) % 2**64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) % 2**64
    return k ^ (k >> 33)


def test_fnv1a_reference_matches_the_published_test_vectors():
    assert fnv1a_64(b"") == 0xCBF29CE484222325
    assert fnv1a_64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a_64(b"foobar") == 0x85944171F73967E8


def test_fmix64_reference_is_the_bijection_smhasher_inverts():
    inverse_1, inverse_2 = pow(0xFF51AFD7ED558CCD, -1, 2**64), pow(0xC4CEB9FE1A85EC53, -1, 2**64)
    rng = random.Random(1)
    for k in [0, 1, 2**64 - 1] + [rng.getrandbits(64) for _ in range(100)]:
        x = fmix64(k)
        x ^= x >> 33  # a right shift by more than half the width is its own inverse
        x = (x * inverse_2) % 2**64
        x ^= x >> 33
        x = (x * inverse_1) % 2**64
        x ^= x >> 33
        assert x == k


@pytest.mark.parametrize("value", ["", "a", "foobar", "e00000001", "bench-effect-u000123",
                                   "\u00fcn\u00efc\u00f6d\u00e9", "\U0001f600", "a\x00b"])
def test_id_hash_is_fnv1a_then_fmix64(value):
    assert id_hash(value) == (fmix64(fnv1a_64(value.encode("utf-8"))) or 1)


def test_id_hash_is_stable():
    """Values pinned once: the hash is stored, so it may never change."""
    assert id_hash("") == 0xEFD01F60BA992926
    assert id_hash("a") == 0x82A2A958A9BECE5B
    assert id_hash("foobar") == 0x2C22194922D1672B


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(max_size=40), min_size=1, max_size=30))
def test_vectorized_id_hashes_equal_id_hash(texts):
    encoded = [t.encode("utf-8") for t in texts]
    width = max(1, max(map(len, encoded)))
    data = np.zeros((len(encoded), width), np.uint8)
    for i, raw in enumerate(encoded):
        data[i, :len(raw)] = np.frombuffer(raw, np.uint8)
    length = np.array([len(raw) for raw in encoded])
    assert columns._id_hashes(data, length).tolist() == [id_hash(t) for t in texts]
