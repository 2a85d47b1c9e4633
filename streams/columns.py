"""Batch decoding of event payloads into numpy columns, with exactly the results of Codec.decode.

Stage 1 folds a batch of events with numpy, so it wants one array per field, not one dict per
event; and ``Codec.decode`` (fastavro's ``schemaless_reader`` per record, then ``validate``)
costs about 5.6 us per event, half the CPU budget of an event at the throughput target.
:class:`ColumnDecoder` decodes a whole batch with array operations instead, and gives for
every payload what ``Codec.decode`` gives: the same values, or the same dead letter.

How: the payloads are joined into one byte array and every row keeps its own read position.
The fields of the writer's schema are read in order for all rows at once, following the
binary encoding of the Avro 1.11 specification (https://avro.apache.org/docs/1.11.1/specification/,
"Binary Encoding"): int and long are zig-zag varints, float and double 4 and 8 little-endian
bytes, a string a long byte count and UTF-8 bytes, an enum the int index of a writer symbol,
a union the int index of a branch and then the branch, a map a series of blocks of entries
(a count, after a negative count the block's byte size, a zero count ends the map). Writer
fields are matched to the reader's by name ("Schema Resolution"): fields the reader lacks are
read and dropped, fields the writer lacks take the reader's default. A string column is codes
into its distinct values, found on the zero-padded bytes (see :func:`_distinct`), so that a
Python str is made once per distinct value, not once per row.

The fast path takes only the rows it is sure of: read exactly to their end, ASCII strings
without NUL, varints of at most 8 bytes, values within every rule of ``validate``. Every other
row (malformed, of an unknown or foreign schema, non-ASCII, a value a rule might reject, ...)
goes to ``Codec.decode`` itself, so its dead letter, or its values, are the codec's own; such
rows are rare in a healthy stream.
"""
from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from streams.codec import (MAX_EVENT_TIME_MS, MAX_LATENCY_MS, MAX_SEGMENT_ENTRIES, MAX_STRING_CHARS,
                           MIN_EVENT_TIME_MS, Codec, DeadLetter, EventKind, UnknownSchemaId, field_checks)

_HEADER_BYTES = 5  # magic byte 0 and the 4-byte big-endian schema id (Confluent wire format)
# Zero bytes after the payloads, so that a fixed-width read at any position up to their end
# (a word, a string's words) stays inside the array.
_PADDING = bytes(8 * -(-MAX_STRING_CHARS // 8) + 8)

_INTEGERS = ("int", "long")
_FLOATS = ("float", "double")
_PRIMITIVES = frozenset({"string", *_INTEGERS, *_FLOATS})
# Avro's promotions among the primitives the fast path reads; fastavro converts int and long
# to a double with float(), which rounds as numpy's int64 -> float64 cast does.
_PROMOTIONS = frozenset({("int", "long"), ("int", "float"), ("int", "double"), ("long", "float"),
                         ("long", "double"), ("float", "double")})

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_BYTE_SUM = np.uint64(0x0101010101010101)  # (w * _BYTE_SUM) >> 56: the sum of the bytes of w (each 0 or 1)
_HIGH_BITS = np.uint64(0x8080808080808080)
_LOW_7_BITS = np.uint64(0x7F7F7F7F7F7F7F7F)
_VARINT_SQUEEZE = tuple((np.uint64(keep), np.uint64(move), np.uint64(shift)) for keep, move, shift in (
    (0x007F007F007F007F, 0x7F007F007F007F00, 1),
    (0x00003FFF00003FFF, 0x3FFF00003FFF0000, 2),
    (0x000000000FFFFFFF, 0x0FFFFFFF00000000, 4)))
_FLOAT_UPPER = np.uint64(0x0101010100000000)  # bytes that stand in, not suspicious, above a float's 4
_KEY_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_PEEL_SHARE = 16  # peel a string value off while it takes at least 1/16 of the rows left
_ZIGZAG_BYTE = np.array([(b >> 1) ^ -(b & 1) for b in range(128)], dtype=np.int64)  # one-byte varints

_MASK64 = 2**64 - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_FMIX_1 = 0xFF51AFD7ED558CCD
_FMIX_2 = 0xC4CEB9FE1A85EC53


@functools.cache
def _keep_words(width: int) -> np.ndarray:
    """Row n: the masks of `width` little-endian 64-bit words that keep their first n bytes."""
    kept = np.clip(np.arange(MAX_STRING_CHARS + 1)[:, None] - 8 * np.arange(width), 0, 8)
    return np.array([(1 << (8 * k)) - 1 for k in range(9)], dtype=np.uint64)[kept]


def id_hash(text: str) -> int:
    """A stable 64-bit hash of the UTF-8 bytes of ``text``, never 0 (0 marks an empty slot).

    FNV-1a 64 (http://www.isthe.com/chongo/tech/comp/fnv/) over the bytes, then the fmix64
    finalizer of MurmurHash3 (https://github.com/aappleby/smhasher, MurmurHash3.cpp) to spread
    FNV's weak low bits; the same in every process and Python version, so it may be stored.
    """
    h = _FNV_OFFSET
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * _FNV_PRIME) & _MASK64
    h ^= h >> 33
    h = (h * _FMIX_1) & _MASK64
    h ^= h >> 33
    h = (h * _FMIX_2) & _MASK64
    h ^= h >> 33
    return h or 1


def _id_hashes(data: np.ndarray, length: np.ndarray) -> np.ndarray:
    """:func:`id_hash` of the first ``length[i]`` bytes of each row of the uint8 matrix ``data``."""
    h = np.full(len(data), _FNV_OFFSET, dtype=np.uint64)
    if len(data) == 0:
        return h
    # Byte j of every string in one contiguous row, so that each step of the loop is one pass.
    columns = np.ascontiguousarray(data[:, :int(length.max())].T, dtype=np.uint64)
    shortest = int(length.min())
    prime = np.uint64(_FNV_PRIME)
    for j, byte in enumerate(columns):
        if j < shortest:
            h ^= byte
            h *= prime
        else:
            h = np.where(j < length, (h ^ byte) * prime, h)
    shift = np.uint64(33)
    h ^= h >> shift
    h *= np.uint64(_FMIX_1)
    h ^= h >> shift
    h *= np.uint64(_FMIX_2)
    h ^= h >> shift
    h[h == 0] = 1
    return h


@dataclass
class StringColumn:
    codes: np.ndarray  # int32 per row: index into `values`; -1 where null or the row is not valid
    values: list[str]  # distinct values


@dataclass
class DecodedBatch:
    """A batch decoded into columns; every column has one entry per payload, in order."""

    valid: np.ndarray  # bool per row
    letters: dict[int, DeadLetter]  # row -> dead letter, for every row that is not valid
    strings: dict[str, StringColumn]  # string and enum fields that are not hashed
    numbers: dict[str, np.ndarray]  # int64 (int, long) or float64 (float, double); 0 where null or not valid
    nulls: dict[str, np.ndarray]  # bool per row, for every optional field
    hashes: dict[str, np.ndarray]  # uint64 id_hash per row of the hashed fields; 0 where null or not valid


class _Type(NamedTuple):
    """A field type the fast path reads: a primitive, an enum, a map of strings, or ["null", primitive]."""

    base: str  # "string", "int", "long", "float", "double", "enum" or "map"
    null_branch: int | None = None  # for a union with null: the branch index of null
    symbols: tuple[str, ...] = ()  # enum
    name: str = ""  # enum: full name, which resolution matches


def _type_of(declared: Any) -> _Type | None:
    """The type of a parsed Avro field type, or None when the fast path does not read it."""
    if isinstance(declared, list):
        if len(declared) != 2 or "null" not in declared:
            return None
        null_branch = declared.index("null")
        inner = _type_of(declared[1 - null_branch])
        if inner is None or inner.base not in _PRIMITIVES:
            return None
        return inner._replace(null_branch=null_branch)
    if isinstance(declared, str):
        return _Type(declared) if declared in _PRIMITIVES else None
    if isinstance(declared, dict) and "logicalType" not in declared:  # a logical type changes the value read
        base = declared.get("type")
        if base in _PRIMITIVES:
            return _Type(base)
        if base == "enum":
            return _Type("enum", symbols=tuple(declared["symbols"]), name=declared["name"])
        if base == "map" and _type_of(declared["values"]) == _Type("string"):
            return _Type("map")
    return None


def _resolves(writer: _Type, reader: _Type) -> bool:
    """Whether the fast path can resolve a writer's field type to the reader's, as fastavro would."""
    if (writer.null_branch is None) != (reader.null_branch is None):
        return False
    if "enum" in (writer.base, reader.base):
        return writer.base == reader.base and writer.name == reader.name
    return writer.base == reader.base or (writer.base, reader.base) in _PROMOTIONS


class _Step(NamedTuple):
    """One field of a writer schema: how to read it, and the reader field it fills (None: dropped)."""

    type: _Type
    target: str | None
    to_reader: np.ndarray | None  # enum: the reader's index of each writer symbol, -1 where it has none


class _Plan(NamedTuple):
    steps: tuple[_Step, ...]
    defaults: dict[str, Any]  # reader fields the writer lacks -> their default


class _Payloads:
    """The payloads of a batch joined into one zero-padded byte array.

    Bytes that are NUL or >= 0x80 are "suspicious" in a string: fastavro's UTF-8 decoding
    decides the non-ASCII ones, and a NUL would be lost to the zero padding of the distinct
    values' search. A row's string bytes are whatever of the row was not read as a varint, a
    float or the header, so a row read exactly to its end has none of them in its strings
    when its suspicious bytes are all among those it read as binary (:class:`_Cursor` counts
    those): two counts per row instead of a look at every string.
    """

    def __init__(self, values: Sequence[bytes | None]):
        n = len(values)
        try:
            sizes = np.fromiter(map(len, values), np.int64, n)
            joined = b"".join([*values, _PADDING])
        except TypeError:  # None (a tombstone) among them
            sizes = np.fromiter((-1 if v is None else len(v) for v in values), np.int64, n)
            joined = b"".join([*(v for v in values if v is not None), _PADDING])
        self.sizes = sizes
        self.ends = np.cumsum(np.maximum(sizes, 0))
        self.starts = self.ends - np.maximum(sizes, 0)
        self.bytes = np.frombuffer(joined, np.uint8)
        # The little-endian 64-bit word at every byte offset (an unaligned view, no copy).
        self._words = np.ndarray((len(self.bytes) - 7,), "<u8", self.bytes, strides=(1,))
        self._windows: dict[int, np.ndarray] = {}
        suspicious = (self.bytes.view(np.int8) <= 0).view(np.uint8)
        # Row i's sum is over [starts[i], starts[i + 1]): its bytes, as rows are contiguous (an
        # empty row gets a byte of the next, but is never read); the last bound ends the last row.
        self.suspicious = np.add.reduceat(suspicious, np.append(self.starts, len(joined) - len(_PADDING)),
                                          dtype=np.int32)[:-1]

    def first(self, pos: np.ndarray) -> np.ndarray:
        # Clipped: positions past the end (only rows bound for the fallback have them) read padding.
        return self.bytes.take(pos, mode="clip")

    def word(self, pos: np.ndarray) -> np.ndarray:
        """The 8 bytes from each position as a little-endian uint64."""
        return self._words[np.minimum(pos, len(self._words) - 1)]

    def window(self, width: int, pos: np.ndarray) -> np.ndarray:
        """A (len(pos), width) copy of the bytes from each position."""
        view = self._windows.get(width)
        if view is None:
            view = self._windows[width] = as_strided(self.bytes, (len(self.bytes) - width + 1, width), (1, 1),
                                                     writeable=False)
        return view[np.minimum(pos, len(view) - 1)]

    def varints(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray | int, np.ndarray, np.ndarray | None]:
        """The zig-zag varint at each position: value (int64), size in bytes, number of
        suspicious bytes, and the rows the fast path leaves to fastavro (varints of 9 and 10
        bytes, values beyond +-2**55: rare, and fastavro knows what it does with their bits)."""
        first = self.first(pos)
        if not (first >= 0x80).any():  # string lengths, branches, enum indexes: nearly always one byte
            return _ZIGZAG_BYTE.take(first), 1, first == 0, None
        word = self.word(pos)
        stop = ~word & _HIGH_BITS  # the high bit of each byte that ends a varint
        last = stop & (~stop + np.uint64(1))  # the lowest: the high bit of this varint's last byte
        body = word & ((last << np.uint64(1)) - np.uint64(1))  # its bytes
        # Squeeze the 7-bit groups together: pairs into 14 bits, then 28, then 56.
        unsigned = body & _LOW_7_BITS
        for keep, move, shift in _VARINT_SQUEEZE:
            unsigned = (unsigned & keep) | ((unsigned & move) >> shift)
        size = _count_high_bits(body & _HIGH_BITS) + 1
        # Every byte but the last has its high bit set; the last is suspicious when it is 0.
        suspicious = size - 1 + (body < (last >> np.uint64(7)))
        value = (unsigned >> np.uint64(1)).view(np.int64) ^ -(unsigned & np.uint64(1)).view(np.int64)
        return value, size, suspicious, stop == 0

    def words(self, start: np.ndarray, length: np.ndarray) -> np.ndarray:
        """Each string's bytes as zero-padded little-endian 64-bit words, one row per string."""
        width = max(1, -(-int(length.max(initial=0)) // 8))
        words = self.word(start)[:, None] if width == 1 else self.window(8 * width, start).view("<u8")
        words &= _keep_words(width).take(length, axis=0)
        return words


def _count_high_bits(words: np.ndarray) -> np.ndarray:
    """The number of bytes of each word whose high bit is set (the other bits must be 0)."""
    return (((words >> np.uint64(7)) * _BYTE_SUM) >> np.uint64(56)).astype(np.int64)


def _suspicious_bytes(words: np.ndarray) -> np.ndarray:
    """The number of bytes of each word that are NUL or >= 0x80."""
    # ((b & 0x7F) + 0x7F) has its high bit set unless b & 0x7F is 0, and never carries into the next byte.
    nul = ~(((words & _LOW_7_BITS) + _LOW_7_BITS) | words) & _HIGH_BITS
    return _count_high_bits((words & _HIGH_BITS) | nul)


class _Cursor:
    """Read positions of the rows of one writer schema, advanced field by field; ``unsure``
    marks the rows the fast path leaves to fastavro, ``seen`` counts the suspicious bytes read
    other than in strings. A read for rows that are absent (the null branch of a union, a map's
    missing entries) leaves them where they are."""

    def __init__(self, payloads: _Payloads, rows: np.ndarray, header_suspicious: int):
        self.payloads = payloads
        self.rows = rows
        self.pos = payloads.starts[rows] + _HEADER_BYTES
        self.unsure = np.zeros(len(rows), bool)
        self.seen = np.full(len(rows), header_suspicious, np.int64)

    def _advance(self, size: np.ndarray | int, present: np.ndarray | None, seen: np.ndarray | None = None,
                 unsure: np.ndarray | None = None) -> None:
        if present is not None:
            size = np.where(present, size, 0)
            seen = None if seen is None else np.where(present, seen, 0)
            unsure = None if unsure is None else unsure & present
        self.pos += size
        if seen is not None:
            self.seen += seen
        if unsure is not None:
            self.unsure |= unsure

    def sure(self) -> np.ndarray:
        """The rows read exactly to their end, with no suspicious byte in their strings."""
        return ~self.unsure & (self.pos == self.payloads.ends[self.rows]) & (
            self.seen == self.payloads.suspicious[self.rows])

    def long(self, present: np.ndarray | None = None) -> np.ndarray:
        value, size, seen, unsure = self.payloads.varints(self.pos)
        self._advance(size, present, seen, unsure)
        return value

    def int(self, present: np.ndarray | None = None) -> np.ndarray:
        # fastavro reads an int as a long; a value beyond 32 bits is not a valid int, so leave it.
        value = self.long(present)
        beyond = (value < _INT32_MIN) | (value > _INT32_MAX)
        self.unsure |= beyond if present is None else beyond & present
        return value

    def double(self, present: np.ndarray | None = None) -> np.ndarray:
        word = self.payloads.word(self.pos)
        self._advance(8, present, _suspicious_bytes(word))
        return word.view("<f8")

    def float(self, present: np.ndarray | None = None) -> np.ndarray:
        word = (self.payloads.word(self.pos) & np.uint64(0xFFFFFFFF)) | _FLOAT_UPPER
        self._advance(4, present, _suspicious_bytes(word))
        return word.astype(np.uint32).view(np.float32).astype(np.float64)  # exact, as C's float -> double

    def string(self, present: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Start and length in bytes of each row's string (length 0 where absent or unsure)."""
        length = self.long(present)
        # A negative length (huge when unsigned) makes fastavro read to the end of the payload.
        wrong = length.view(np.uint64) > MAX_STRING_CHARS
        if present is not None:
            wrong &= present
            length = np.where(present & ~wrong, length, 0)
        elif wrong.any():
            length = np.where(wrong, 0, length)
        else:
            wrong = None
        start = self.pos.copy()
        self._advance(length, None, unsure=wrong)
        return start, length

    def enum(self, to_reader: np.ndarray) -> np.ndarray:
        """The reader's symbol index of each row."""
        index = self.long()
        # fastavro indexes the symbols with a Python int: a negative index would pick from the end.
        wrong = (index < 0) | (index >= len(to_reader))
        code = to_reader[np.where(wrong, 0, index)]
        self.unsure |= wrong | (code < 0)
        return code

    def is_null(self, null_branch: int) -> np.ndarray:
        branch = self.long()
        self.unsure |= (branch != 0) & (branch != 1)
        return branch == null_branch

    def skip_map(self) -> None:
        """Reads a map of strings, checking what validate checks of it beyond its text: its
        entry count (a map with more entries than the rule allows goes to fastavro, since
        repeated keys make fewer)."""
        entries = np.zeros(len(self.pos), np.int64)
        open_ = ~self.unsure
        while True:
            count = self.long(open_)
            open_ &= count != 0
            if not open_.any():
                return
            wrong = open_ & ((count < -MAX_SEGMENT_ENTRIES) | (count > MAX_SEGMENT_ENTRIES))
            sized = open_ & (count < 0) & ~wrong
            if sized.any():
                self.long(sized)  # the block's size in bytes, which a reader may ignore
            entries += np.where(open_ & ~wrong, np.abs(count), 0)
            wrong |= open_ & (entries > MAX_SEGMENT_ENTRIES)
            self.unsure |= wrong
            open_ &= ~wrong
            count = np.where(open_, np.abs(count), 0)
            for k in range(int(count.max())):
                present = count > k
                self.string(present)  # the key
                self.string(present)  # the value


class _Columns:
    """The columns of a batch as the fast path fills them, one writer schema's rows at a time."""

    def __init__(self, n: int, texts: Iterable[str], enums: Iterable[str], numbers: dict[str, type],
                 nullable: Iterable[str]):
        self.fast = np.zeros(n, bool)
        self.start = {name: np.zeros(n, np.int64) for name in texts}
        self.length = {name: np.zeros(n, np.int64) for name in texts}  # -1: a default, in self.constants
        self.constants: dict[str, list[tuple[np.ndarray, str]]] = {name: [] for name in texts}
        self.codes = {name: np.full(n, -1, np.int32) for name in enums}
        self.numbers = {name: np.zeros(n, dtype) for name, dtype in numbers.items()}
        self.nulls = {name: np.zeros(n, bool) for name in nullable}


class ColumnDecoder:
    """Decodes batches of one event kind's payloads into columns (see the module docstring)."""

    def __init__(self, codec: Codec, kind: EventKind, *, hashed: Iterable[str] = ("event_id",)):
        if not isinstance(kind, EventKind):
            raise ValueError(f"{kind} is not an event kind: only events are validated and decoded to columns")
        self.codec = codec
        self.kind = kind
        self._reader = codec.reader_schema(kind)
        self._fields = {f["name"]: f for f in self._reader["fields"]}
        self._types: dict[str, _Type] = {}
        for name, field in self._fields.items():
            declared = _type_of(field["type"])
            if declared is None:
                raise ValueError(f"{kind.value} field {name} has a type the column decoder does not read: "
                                 f"{field['type']}")
            self._types[name] = declared
        self._hashed = frozenset(hashed)
        for name in self._hashed:
            if name not in self._types or self._types[name].base != "string":
                raise ValueError(f"hashed field {name} is not a string field of {kind.value} events")
        checks = field_checks()[kind]
        self._required = frozenset(checks.required)
        self._latencies = frozenset(checks.latencies)
        # The types validate's rules assume, as _breaks_rule does.
        expected = {**{n: ("string",) for n in self._required}, **{n: _FLOATS for n in self._latencies},
                    "event_time": _INTEGERS}
        for name, bases in expected.items():
            declared = self._types.get(name)
            nullable = declared is not None and declared.null_branch is not None
            if declared is None or declared.base not in bases or (name == "event_time" and nullable):
                raise ValueError(f"{kind.value} events need a field {name} of type {' or '.join(bases)}, "
                                 f"which validation reads")
        self._ruled = self._required | self._latencies | {"event_time"} | {
            n for n, t in self._types.items() if t.base in _FLOATS}
        self._texts = tuple(n for n, t in self._types.items() if t.base == "string")
        self._enums = tuple(n for n, t in self._types.items() if t.base == "enum")
        self._numbers = {n: (np.int64 if t.base in _INTEGERS else np.float64) for n, t in self._types.items()
                         if t.base in _INTEGERS or t.base in _FLOATS}
        self._nullable = tuple(n for n, t in self._types.items() if t.null_branch is not None)
        self._symbol_index = {n: {s: i for i, s in enumerate(self._types[n].symbols)} for n in self._enums}
        # Per writer schema id: its plan, or None when the fast path leaves its rows to the codec.
        self._plans: dict[int, _Plan | None] = {}

    def decode(self, values: Sequence[bytes | None]) -> DecodedBatch:
        """Every payload decoded and validated, as ``Codec.decode`` would (see DecodedBatch)."""
        payloads = _Payloads(values)
        columns = _Columns(len(values), self._texts, self._enums, self._numbers, self._nullable)
        rows = np.flatnonzero(payloads.sizes >= _HEADER_BYTES)
        rows = rows[payloads.first(payloads.starts[rows]) == 0]
        schema_ids = payloads.window(4, payloads.starts[rows] + 1).view(">u4")[:, 0]
        uniform = len(schema_ids) > 0 and (schema_ids == schema_ids[0]).all()
        distinct_ids = [int(schema_ids[0])] if uniform else np.unique(schema_ids).tolist()
        for schema_id in distinct_ids:
            plan = self._plan(schema_id)
            if plan is not None:
                self._read(payloads, plan, schema_id, rows[schema_ids == schema_id] if len(distinct_ids) > 1 else rows,
                           columns)
        return self._finish(values, payloads, columns)

    def _plan(self, schema_id: int) -> _Plan | None:
        if schema_id not in self._plans:
            try:
                writer = self.codec.schemas.writer(schema_id)
            except UnknownSchemaId:
                return None  # not cached: a registry may know it later
            self._plans[schema_id] = self._compile(writer.parsed) if writer.kind is self.kind else None
        return self._plans[schema_id]

    def _compile(self, writer: Any) -> _Plan | None:
        """How to read records of the writer schema, or None when the fast path leaves them all
        to the codec: a type or a resolution it does not know, or a default a rule might reject."""
        if writer != self._reader and (writer.get("type") != "record" or writer.get("name") != self._reader["name"]
                                       or any("aliases" in f for f in self._reader["fields"])):
            return None
        steps = []
        for field in writer["fields"]:
            declared = _type_of(field["type"])
            target = field["name"] if field["name"] in self._fields else None
            if declared is None or (target is not None and not _resolves(declared, self._types[target])):
                return None
            to_reader = None
            if declared.base == "enum" and target is None:
                to_reader = np.arange(len(declared.symbols), dtype=np.int32)  # dropped: any writer symbol will do
            elif declared.base == "enum":
                index = self._symbol_index[target]
                to_reader = np.array([index.get(s, -1) for s in declared.symbols], np.int32)
            steps.append(_Step(declared, target, to_reader))
        written = {field["name"] for field in writer["fields"]}
        defaults = {}
        for name, field in self._fields.items():
            if name not in written:
                if "default" not in field or not self._usable_default(name, field["default"]):
                    return None
                defaults[name] = field["default"]
        return _Plan(tuple(steps), defaults)

    def _usable_default(self, name: str, value: Any) -> bool:
        """Whether every row may take this default and stay in the fast path."""
        declared = self._types[name]
        if value is None:
            return declared.null_branch is not None and name not in self._required
        if declared.base == "string":
            return isinstance(value, str) and len(value) <= MAX_STRING_CHARS and not self._breaks_rule(name, len(value))
        if declared.base == "enum":
            return value in declared.symbols
        if declared.base == "map":
            return isinstance(value, dict) and len(value) <= MAX_SEGMENT_ENTRIES and all(
                isinstance(s, str) and len(s) <= MAX_STRING_CHARS for pair in value.items() for s in pair)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if declared.base in _INTEGERS and not (isinstance(value, int) and -(2**63) <= value < 2**63):
            return False
        return not self._breaks_rule(name, np.float64(value) if declared.base in _FLOATS else value)

    def _breaks_rule(self, name: str, value: Any) -> np.ndarray | np.bool_ | bool:
        """Rows whose value of a reader field might break a rule of ``validate`` (for a string
        field, ``value`` is its length; null values are 0). Those rows go to the codec, which
        says which rule."""
        broken: Any = False
        if name in self._required:
            broken = broken | (value == 0)
        if self._types[name].base in _FLOATS:
            broken = broken | ~np.isfinite(value)
        if name == "event_time":
            broken = broken | (value < MIN_EVENT_TIME_MS) | (value >= MAX_EVENT_TIME_MS)
        if name in self._latencies:
            broken = broken | ~((value >= 0.0) & (value <= MAX_LATENCY_MS))
        return broken

    def _read(self, payloads: _Payloads, plan: _Plan, schema_id: int, rows: np.ndarray, columns: _Columns) -> None:
        """Reads the rows of one writer schema into the columns, marking the rows it is sure of."""
        header = 1 + sum(byte == 0 or byte >= 0x80 for byte in schema_id.to_bytes(4, "big"))  # 1: the magic byte
        cursor = _Cursor(payloads, rows, header)
        at = slice(None) if len(rows) == len(columns.fast) else rows  # a slice copies, an index array gathers
        for step in plan.steps:
            base, name, null_branch = step.type.base, step.target, step.type.null_branch
            null = None if null_branch is None else cursor.is_null(null_branch)
            present = None if null is None else ~null
            if base == "string":
                start, value = cursor.string(present)
            elif base == "enum":
                value = cursor.enum(step.to_reader)
            elif base == "map":
                cursor.skip_map()
                continue
            else:
                value = getattr(cursor, base)(present)
            if name is None:
                continue
            if base == "string":
                columns.start[name][at] = start
                columns.length[name][at] = value
            elif base == "enum":
                columns.codes[name][at] = value
            else:
                if null is not None:
                    value = np.where(null, 0, value)
                columns.numbers[name][at] = value
            if null is not None:
                columns.nulls[name][at] = null
            if name in self._ruled:
                cursor.unsure |= self._breaks_rule(name, value)
        for name, value in plan.defaults.items():
            if name in columns.nulls:
                columns.nulls[name][at] = value is None
            if name in columns.constants:
                columns.length[name][at] = -1
                if value is not None:
                    columns.constants[name].append((rows, value))
            elif name in columns.codes:
                columns.codes[name][at] = self._symbol_index[name][value]
            elif name in columns.numbers:
                columns.numbers[name][at] = 0 if value is None else value
        columns.fast[at] = cursor.sure()

    def _finish(self, values: Sequence[bytes | None], payloads: _Payloads, columns: _Columns) -> DecodedBatch:
        """The batch: the fast path's rows as read, the others as the codec decodes them."""
        fast = columns.fast
        slow = np.flatnonzero(~fast)
        letters: dict[int, DeadLetter] = {}
        records: dict[int, dict] = {}
        for i in slow.tolist():
            decoded = self.codec.decode(self.kind, values[i])
            if isinstance(decoded, DeadLetter):
                letters[i] = decoded
            else:
                records[i] = decoded
        valid = fast.copy()
        valid[list(records)] = True

        strings, hashes = {}, {}
        for name in self._texts:
            at = fast & (columns.length[name] >= 0)
            if name in columns.nulls:
                at &= ~columns.nulls[name]
            at = np.flatnonzero(at)
            length = columns.length[name][at]
            words = payloads.words(columns.start[name][at], length)
            constants = [(rows[fast[rows]], value) for rows, value in columns.constants[name]]
            others = constants + [(i, r[name]) for i, r in records.items() if r[name] is not None]
            if name in self._hashed:
                hashes[name] = h = np.zeros(len(values), np.uint64)
                h[at] = _id_hashes(words.astype("<u8", copy=False).view(np.uint8), length)
                for where, value in others:
                    h[where] = id_hash(value)
                continue
            codes, distinct = _distinct(words)
            strings[name] = column = StringColumn(np.full(len(values), -1, np.int32), distinct)
            column.codes[at] = codes
            if others:
                index = {value: code for code, value in enumerate(distinct)}
                for where, value in others:
                    code = index.get(value)
                    if code is None:
                        code = index[value] = len(distinct)
                        distinct.append(value)
                    column.codes[where] = code
        for name, codes in columns.codes.items():
            codes[slow] = -1
            for i, r in records.items():
                codes[i] = self._symbol_index[name][r[name]]
            strings[name] = StringColumn(codes, list(self._types[name].symbols))
        for name, number in columns.numbers.items():
            number[slow] = 0
            for i, r in records.items():
                number[i] = 0 if r[name] is None else r[name]
        for name, null in columns.nulls.items():
            null[slow] = False
            for i, r in records.items():
                null[i] = r[name] is None
        return DecodedBatch(valid, letters, strings, columns.numbers, columns.nulls, hashes)


def _distinct(words: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Codes (int32 per row) into the distinct strings of rows of zero-padded ASCII words.

    Most fields of a batch hold a few values (experiments, variants, models, metrics): those
    are peeled off one by one, each by one comparison with all rows, for as long as a value
    takes a good share of the rows left; the rest (ids) are found by sorting 64-bit keys.
    """
    codes = np.empty(len(words), np.int32)
    peeled: list[int] = []  # the first row of each value peeled off
    left = np.ones(len(words), bool)
    count = len(words)
    while count:
        first = int(np.argmax(left))
        same = left.copy()
        for k in range(words.shape[1]):
            same &= words[:, k] == words[first, k]
        codes[same] = len(peeled)
        peeled.append(first)
        taken = int(np.count_nonzero(same))
        left ^= same
        count -= taken
        if taken * _PEEL_SHARE < count + taken:
            break
    firsts = np.array(peeled, np.intp)
    if count:
        rest = np.flatnonzero(left)
        key = words[rest, 0]
        for k in range(1, words.shape[1]):
            key = key * _KEY_MULTIPLIER ^ words[rest, k]
        keys, inverse = np.unique(key, return_inverse=True)
        first_of_key = np.empty(len(keys), np.intp)
        first_of_key[inverse] = rest
        shared = np.bincount(inverse)[inverse] > 1  # only rows that share their key can collide
        if words.shape[1] > 1 and not np.array_equal(words[first_of_key[inverse[shared]]], words[rest[shared]]):
            # Two strings share a 64-bit key: let the bytes themselves decide.
            _, at, inverse = np.unique(words[rest].view(f"V{8 * words.shape[1]}")[:, 0], return_index=True,
                                       return_inverse=True)
            first_of_key = rest[at]
        codes[rest] = len(peeled) + inverse
        firsts = np.concatenate([firsts, first_of_key])
    as_bytes = words[firsts].astype("<u8", copy=False).view(f"S{8 * words.shape[1]}")[:, 0]
    return codes, list(map(bytes.decode, as_bytes.tolist()))
