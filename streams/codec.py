"""Event codec: Avro in the Confluent wire format, and the validation rules of every event.

Wire format: byte 0 is the magic byte 0, bytes 1-4 the big-endian schema id, then the
Avro binary body. Schema ids come from the local catalogue (schemas/catalogue.json) or,
when ``ABSTREAM_SCHEMA_REGISTRY_URL`` is set, from a Confluent-compatible registry, so
that a service publishing with confluent-kafka's AvroSerializer needs none of our code.

A payload that cannot be decoded or fails validation becomes a :class:`DeadLetter` with a
reason from a closed set (a metric label) and a one-line detail (a Kafka header).
"""
from __future__ import annotations

import functools
import io
import json
import math
import re
import struct
import time
import warnings
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, Protocol

import fastavro

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"
_HEADER = struct.Struct(">bI")
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")

# An id the registry said it does not know is not asked about again for this long: a stream
# written against another registry would otherwise cost one registry request per message.
MISSING_SCHEMA_RECHECK_S = 30.0
# How long one request to the schema registry may take (the client retries once).
REGISTRY_TIMEOUT_S = 3.0

# Bounds that make a value absurd rather than merely surprising. Fixed, not relative to
# the clock, so that every process (worker, sink, replay next week) judges an event alike.
MIN_EVENT_TIME_MS = 946_684_800_000  # 2000-01-01T00:00:00Z
MAX_EVENT_TIME_MS = 4_102_444_800_000  # 2100-01-01T00:00:00Z
MAX_LATENCY_MS = 3_600_000.0
MAX_STRING_CHARS = 256
MAX_SEGMENT_ENTRIES = 32


class EventKind(str, Enum):
    ASSIGNMENT = "assignment"
    PREDICTION = "prediction"
    SHADOW = "shadow"
    OUTCOME = "outcome"




class ControlKind(str, Enum):
    """Records of the control plane, written in the same wire format as events."""

    EXPERIMENT_CONFIG = "experiment_config"
    DECISION = "decision"
    ALERT = "alert"
    KILLSWITCH = "killswitch"
    ALLOCATION = "allocation"


Kind = EventKind | ControlKind
_KINDS = {k.value: k for k in [*EventKind, *ControlKind]}


class DeadLetterReason(str, Enum):
    NOT_WIRE_FORMAT = "not_wire_format"
    UNKNOWN_SCHEMA = "unknown_schema"
    WRONG_KIND = "wrong_kind"
    BAD_AVRO = "bad_avro"
    INVALID_FIELD = "invalid_field"
    UNKNOWN_EXPERIMENT = "unknown_experiment"
    PROCESSING_ERROR = "processing_error"


@dataclass(frozen=True)
class DeadLetter:
    reason: DeadLetterReason
    detail: str


class UnknownSchemaId(LookupError):
    pass


class SchemaRegistryUnavailable(RuntimeError):
    """The schema registry gave no answer about an id (down, timed out, refused, an error of
    its own): whether the id exists is not known, so what carries it must wait, not be
    dead-lettered. :meth:`Codec.decode` raises it rather than return a dead letter, and
    :meth:`Codec.encode` when it could not register the schema to write with."""


class SchemaLookupNeeded(LookupError):
    """What a catalogue that does not ask the registry inline (a worker's) has not cached: a
    schema id to look up, or a kind whose schema to register. The caller has the catalogue
    ask (``RegistryCatalogue.ask``) off its event loop and tries again."""

    def __init__(self, *, schema_id: int | None = None, kind: Kind | None = None):
        super().__init__(f"schema id {schema_id} not looked up yet" if kind is None
                         else f"the {kind.value} schema not registered yet")
        self.schema_id = schema_id
        self.kind = kind


class SchemaRejected(ValueError):
    """The schema registry answered that it will not register abstream's schema of a kind
    (incompatible with the subject's versions, invalid, not allowed): waiting does not help,
    a person must look at the subject or the registry's compatibility setting."""


@dataclass(frozen=True)
class WriterSchema:
    schema_id: int
    kind: Kind
    parsed: Any


class SchemaSource(Protocol):
    def writer(self, schema_id: int) -> WriterSchema: ...
    def id_for(self, kind: Kind) -> int: ...


def _plain(schema: Any) -> Any:
    """The schema with logical types removed: timestamps stay integer milliseconds.

    Logical types do not change the binary encoding; decoding millis to datetime objects
    would cost a Python object per event and be converted back at every sink.
    """
    if isinstance(schema, dict):
        return {k: _plain(v) for k, v in schema.items() if k != "logicalType"}
    if isinstance(schema, list):
        return [_plain(v) for v in schema]
    return schema


def _record_name(raw: dict) -> str:
    return f"{raw.get('namespace', '')}.{raw['name']}".lstrip(".")


def parse_schema(schema_json: str | dict, kind_by_record: dict[str, Kind]) -> tuple[Kind, Any]:
    """The kind of a record schema (by its full name) and the schema parsed for fastavro."""
    raw = json.loads(schema_json) if isinstance(schema_json, str) else schema_json
    kind = kind_by_record.get(_record_name(raw))
    if kind is None:
        raise UnknownSchemaId(f"record {_record_name(raw)} is not an abstream record")
    return kind, fastavro.parse_schema(_plain(raw), named_schemas={})


class LocalCatalogue:
    """Schema ids from schemas/catalogue.json; the newest id of a kind is used for writing."""

    def __init__(self, directory: Path = SCHEMA_DIR):
        entries = json.loads((directory / "catalogue.json").read_text())["schemas"]
        self._by_id: dict[int, WriterSchema] = {}
        self._latest: dict[Kind, int] = {}
        self._json: dict[int, str] = {}
        self.kind_by_record: dict[str, Kind] = {}
        for entry in entries:
            text = (directory / entry["file"]).read_text()
            kind = _KINDS[entry["kind"]]
            self.kind_by_record[_record_name(json.loads(text))] = kind
            _, parsed = parse_schema(text, self.kind_by_record)
            self._by_id[entry["id"]] = WriterSchema(entry["id"], kind, parsed)
            self._json[entry["id"]] = text
            self._latest[kind] = max(entry["id"], self._latest.get(kind, 0))

    def writer(self, schema_id: int) -> WriterSchema:
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise UnknownSchemaId(f"schema id {schema_id} is not in the local catalogue") from None

    def id_for(self, kind: Kind) -> int:
        return self._latest[kind]

    @property
    def kinds(self) -> list[Kind]:
        return list(self._latest)

    def schema_json(self, kind: Kind) -> str:
        """The newest schema of the kind as written in its .avsc file (logical types kept)."""
        return self._json[self._latest[kind]]


class RegistryCatalogue:
    """Schema ids from a Confluent-compatible schema registry (any SchemaRegistryClient).

    Writing registers the local schema of a kind under the subject ``abstream.events.<Record>``
    (record-name strategy, so one subject serves every topic prefix).

    With ``ask_inline`` False the catalogue never waits for the registry itself: what it has not
    cached raises :class:`SchemaLookupNeeded`, and the caller has :meth:`ask` answer it off its
    event loop, then tries again (a worker's loop must not stand still for a registry's timeout).
    """

    def __init__(self, client: Any, local: LocalCatalogue | None = None, *, ask_inline: bool = True):
        self._client = client
        self._local = local or LocalCatalogue()
        self._ask_inline = ask_inline
        self._by_id: dict[int, WriterSchema] = {}
        self._ids: dict[Kind, int] = {}
        self._missing: dict[int, tuple[float, str]] = {}  # schema id -> (when the registry said so, what)

    def writer(self, schema_id: int) -> WriterSchema:
        cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        missing = self._missing.get(schema_id)
        if missing is not None and time.monotonic() - missing[0] < MISSING_SCHEMA_RECHECK_S:
            raise UnknownSchemaId(missing[1])
        if not self._ask_inline:
            raise SchemaLookupNeeded(schema_id=schema_id)
        return self._look_up(schema_id)

    def id_for(self, kind: Kind) -> int:
        if kind not in self._ids:
            if not self._ask_inline:
                raise SchemaLookupNeeded(kind=kind)
            self._register(kind)
        return self._ids[kind]

    def ask(self, need: SchemaLookupNeeded) -> None:
        """Ask the registry what ``need`` names and keep the answer (blocking: off the event
        loop). Raises SchemaRegistryUnavailable or SchemaRejected, as writing and reading do."""
        if need.kind is not None:
            self._register(need.kind)
            return
        try:
            self._look_up(need.schema_id)
        except UnknownSchemaId:
            pass  # an answer, kept: the caller's next try dead-letters what carries the id

    def _look_up(self, schema_id: int) -> WriterSchema:
        try:
            schema = self._client.get_schema(schema_id)
        except Exception as exc:  # the registry client raises its own error types
            if getattr(exc, "http_status_code", None) != 404:
                raise SchemaRegistryUnavailable(f"the schema registry did not say what schema id {schema_id} is: "
                                                f"{type(exc).__name__}: {exc}"[:300]) from None
            self._unknown(schema_id, f"schema id {schema_id} is not in the registry: {exc}")
        try:
            kind, parsed = parse_schema(schema.schema_str, self._local.kind_by_record)
        except (UnknownSchemaId, ValueError, KeyError) as exc:
            self._unknown(schema_id, f"schema id {schema_id} in the registry is not usable: {exc}")
        self._by_id[schema_id] = found = WriterSchema(schema_id, kind, parsed)
        return found

    def _unknown(self, schema_id: int, detail: str) -> NoReturn:
        if len(self._missing) >= 10_000:
            self._missing.clear()  # hostile ids must not grow it without bound
        self._missing[schema_id] = (time.monotonic(), detail)  # an answer: it holds a while
        raise UnknownSchemaId(detail)

    def _register(self, kind: Kind) -> None:
        from confluent_kafka.schema_registry import Schema

        text = self._local.schema_json(kind)
        subject = _record_name(json.loads(text))
        try:
            schema_id = self._client.register_schema(subject, Schema(text, "AVRO"))
        except Exception as exc:  # the registry client raises its own error types, and httpx's
            status = getattr(exc, "http_status_code", None)
            said = f"{type(exc).__name__}: {exc}"[:300]
            if isinstance(status, int) and 400 <= status < 500 and status not in (408, 429):
                raise SchemaRejected(f"the schema registry refused abstream's {kind.value} schema "
                                     f"under subject {subject}: {said}") from None
            raise SchemaRegistryUnavailable(f"the schema registry did not register abstream's {kind.value} "
                                            f"schema: {said}") from None
        # The registry gave this id to the text just sent: writing needs no look-up of it.
        local = self._local.writer(self._local.id_for(kind))
        self._by_id.setdefault(schema_id, WriterSchema(schema_id, kind, local.parsed))
        self._ids[kind] = schema_id


class Codec:
    """Encodes and decodes abstream events; decoding resolves the writer's schema to ours."""

    def __init__(self, schemas: SchemaSource | None = None, *, readers: LocalCatalogue | None = None):
        """``schemas`` resolves the ids in payloads; ``readers`` (the local catalogue by default)
        gives the newest schema of each kind, which every decoded record is resolved to."""
        self.schemas = schemas or LocalCatalogue()
        readers = readers or LocalCatalogue()
        self._reader = {kind: readers.writer(readers.id_for(kind)).parsed for kind in readers.kinds}
        # Per writer schema id: the reader schema to resolve to, or None when the two are equal.
        # fastavro compares them deeply on every call otherwise (~40% of a decode, measured).
        self._resolve_to: dict[int, Any] = {}

    def reader_schema(self, kind: Kind) -> Any:
        """The parsed schema that every decoded record of the kind is resolved to."""
        return self._reader[kind]

    def encode(self, kind: Kind, record: dict) -> bytes:
        schema_id = self.schemas.id_for(kind)
        buf = io.BytesIO()
        buf.write(_HEADER.pack(0, schema_id))
        fastavro.schemaless_writer(buf, self.schemas.writer(schema_id).parsed, record)
        return buf.getvalue()

    def decode(self, kind: Kind, payload: bytes | None) -> dict | DeadLetter:
        """The validated record, or the dead letter that says why there is none. Raises
        :class:`SchemaRegistryUnavailable` when the registry cannot say what the schema id is."""
        if payload is None or len(payload) < _HEADER.size or payload[0] != 0:
            return DeadLetter(DeadLetterReason.NOT_WIRE_FORMAT, "payload does not start with magic byte 0 and a schema id")
        schema_id = _HEADER.unpack_from(payload)[1]
        try:
            writer = self.schemas.writer(schema_id)
        except UnknownSchemaId as exc:
            return DeadLetter(DeadLetterReason.UNKNOWN_SCHEMA, str(exc))
        if writer.kind is not kind:
            return DeadLetter(DeadLetterReason.WRONG_KIND, f"schema id {schema_id} is for {writer.kind.value} events, this topic carries {kind.value} events")
        body = io.BytesIO(payload)
        body.seek(_HEADER.size)
        try:
            if schema_id not in self._resolve_to:
                reader = self._reader[kind]
                self._resolve_to[schema_id] = None if writer.parsed == reader else reader
            record = fastavro.schemaless_reader(body, writer.parsed, self._resolve_to[schema_id])
        except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError, IndexError, ...
            # fastavro's messages may name the buffer object (its memory address): a dead letter's
            # detail must be the same whoever decodes the payload, and whenever.
            detail = _OBJECT_REPR.sub("<payload>", f"{type(exc).__name__}: {exc}")
            return DeadLetter(DeadLetterReason.BAD_AVRO, detail[:200])
        if body.tell() != len(payload):
            return DeadLetter(DeadLetterReason.BAD_AVRO, f"{len(payload) - body.tell()} bytes after the end of the record")
        problem = validate(kind, record, size=len(payload) - _HEADER.size) if isinstance(kind, EventKind) else None
        if problem is not None:
            return DeadLetter(DeadLetterReason.INVALID_FIELD, problem)
        return record


_REQUIRED_IDS = ("event_id", "experiment_id", "unit_id")
_LATENCY_FIELDS = {
    EventKind.PREDICTION: ("latency_ms",),
    EventKind.SHADOW: ("champion_latency_ms", "challenger_latency_ms"),
}
_REQUIRED_BY_KIND = {
    EventKind.ASSIGNMENT: ("variant",),
    EventKind.PREDICTION: ("variant", "request_id"),
    EventKind.SHADOW: ("request_id",),
    EventKind.OUTCOME: ("metric",),
}


@dataclass(frozen=True)
class FieldChecks:
    """The fields of an event kind that validation reads, by type (from the newest local
    schema, which every decoded record is resolved to). Public for the column decoder
    (streams/columns.py), which applies the same rules to a whole batch."""

    required: tuple[str, ...]
    strings: tuple[str, ...]
    floats: tuple[str, ...]
    maps: tuple[str, ...]
    latencies: tuple[str, ...]


def _type_names(declared: Any) -> set[str]:
    """The Avro type names a field may hold ("string", "double", "map", ...; a union gives several)."""
    return {t["type"] if isinstance(t, dict) else t for t in (declared if isinstance(declared, list) else [declared])}


@functools.cache
def field_checks() -> dict[EventKind, FieldChecks]:
    """Per event kind, once per process (it reads the schema files)."""
    catalogue = LocalCatalogue()

    def checks(kind: EventKind) -> FieldChecks:
        fields = catalogue.writer(catalogue.id_for(kind)).parsed["fields"]

        def typed(*names: str) -> tuple[str, ...]:
            return tuple(f["name"] for f in fields if _type_names(f["type"]) & set(names))

        return FieldChecks(_REQUIRED_IDS + _REQUIRED_BY_KIND[kind], typed("string"), typed("double", "float"),
                           typed("map"), _LATENCY_FIELDS.get(kind, ()))

    return {kind: checks(kind) for kind in EventKind}


def validate(kind: EventKind, record: dict, *, size: int | None = None) -> str | None:
    """None when the record is valid, else a one-line description of the first problem.

    ``size`` is the record's encoded size in bytes when known. A string has at least as many
    UTF-8 bytes as characters, so no string of a record of at most MAX_STRING_CHARS bytes
    can be too long, and decode skips those checks (events are ~100 bytes; validation was
    a third of a worker's decoding in py-spy, bench/PROFILE.md).
    """
    checks = field_checks()[kind]
    for name in checks.required:
        if not record[name]:
            return f"{name} is empty"
    lengths = size is None or size > MAX_STRING_CHARS
    if lengths:
        for name in checks.strings:
            value = record.get(name)
            if value is not None and len(value) > MAX_STRING_CHARS:
                return f"{name} is longer than {MAX_STRING_CHARS} characters"
    for name in checks.floats:
        value = record.get(name)
        if value is not None and not math.isfinite(value):
            return f"{name} is {value}"
    for name in checks.maps:
        value = record.get(name) or {}
        if len(value) > MAX_SEGMENT_ENTRIES:
            return f"{name} has more than {MAX_SEGMENT_ENTRIES} entries"
        if lengths and any(len(k) > MAX_STRING_CHARS or len(v) > MAX_STRING_CHARS for k, v in value.items()):
            return f"{name} has a key or value longer than {MAX_STRING_CHARS} characters"
    if not MIN_EVENT_TIME_MS <= record["event_time"] < MAX_EVENT_TIME_MS:
        return f"event_time {record['event_time']} ms is outside the years 2000-2099"
    for name in checks.latencies:
        latency = record[name]
        if latency is not None and not 0.0 <= latency <= MAX_LATENCY_MS:
            return f"{name} {latency} is outside [0, {MAX_LATENCY_MS:.0f}]"
    return None


def schema_source(registry_url: str = "", *, ask_inline: bool = True) -> SchemaSource:
    """The registry at ``registry_url`` when one is configured, else the local catalogue
    (``ask_inline``: see RegistryCatalogue)."""
    if not registry_url:
        return LocalCatalogue()
    # authlib, under the registry client, warns of its own modules on import with a filter of
    # its own set to "always"; a recorded warning is not printed, whatever the filters say.
    with warnings.catch_warnings(record=True):
        from confluent_kafka.schema_registry import SchemaRegistryClient

    # new_client also accepts mock:// URLs (an in-process registry, for tests and trials). The
    # client waits for ever by default: a registry that hangs would hold what waits for its
    # answer (a batch, a record) without end rather than until it is tried again.
    return RegistryCatalogue(SchemaRegistryClient.new_client({
        "url": registry_url, "timeout": REGISTRY_TIMEOUT_S, "max.retries": 1, "retries.wait.ms": 200}),
        ask_inline=ask_inline)
