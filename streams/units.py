"""Unit state: each unit's exposure and attributed metric totals, one table per input partition.

One row per (experiment, unit) lives with the unit's partition. The rules, all in event time:

- Exposure: the first assignment processed for (experiment, unit) fixes the unit's variant
  and exposure time. A later assignment naming another variant, and any prediction naming
  another variant than the exposure (whether it came before or after it), count as
  assignment inconsistencies; they do not move the unit.
- Attribution: an outcome at time t counts for a unit exposed at t0 when
  t0 <= t < t0 + attribution window. One before the exposure counts as ``before_exposure``,
  one after the window as ``after_window``; neither moves a statistic.
- An outcome for a unit whose exposure has not been seen yet waits in the unit's state
  (``awaiting_exposure``, at most MAX_AWAITING_OUTCOMES, then ``dropped_awaiting``) and is
  judged by the rules above once the exposure arrives.
- Re-sends: a row keeps a 64-bit hash of the identity (kind and event_id) of its
  RECENT_EVENT_IDS most recent events; an event whose identity is among them is a duplicate
  (a producer that sent it twice) and changes nothing. Two distinct identities collide with
  probability ~64/2^64 per event. Replays of messages (a redelivery after a crash or a
  hand-over) are recognised earlier, by the partition's input positions (streams/stage1.py).

Why columns: the stage-1 fold was one Python object per unit, decoded, copied, applied and
encoded per touched unit, ~22 us per event in all (bench/PROFILE.md), while the throughput
target leaves ~11 us per event for everything a worker does. Here a batch is applied in
*rounds*: round r applies the r-th event of every touched row at once with numpy, so the
result is exactly that of applying each row's events one by one in order (the rules above are
sequential per unit: first assignment wins, the dedup window slides), while the Python work
per batch grows with the number of rounds (the most events one unit has in the batch), not
with the number of events. Only outcomes that wait for an exposure take a Python path (a
list per waiting row).

Guardrail counters (prediction status, latency, scores, shadow comparisons) are linear
sums that depend on the event alone, so they are not kept per unit but per partition, in the
partition's partials (streams/stage1.py), and are made durable with the rows they belong to.

Stored form: :meth:`UnitTable.delta_chunks` and :meth:`UnitTable.snapshot_chunks` give the
chunks of a state-log transaction (streams/state_log.py), :meth:`UnitTable.apply_chunk` reads
them back. A chunk is a JSON header and raw little-endian arrays of allow-listed dtypes: no
pickle, so whoever can write to the state topic cannot run code in a worker.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Iterable

import numpy as np

RECENT_EVENT_IDS = 64
MAX_AWAITING_OUTCOMES = 64
NOT_EXPOSED = -1
# Rows per chunk: a chunk must stay well under Kafka's 1 MB record limit with unit ids of up to
# 256 bytes (a delta row is ~120 bytes of columns, a snapshot row ~650 with its id window).
DELTA_ROWS_PER_CHUNK = 2000
SNAPSHOT_ROWS_PER_CHUNK = 800


class OutcomeFate(str, Enum):
    ATTRIBUTED = "attributed"
    BEFORE_EXPOSURE = "before_exposure"
    AFTER_WINDOW = "after_window"
    AWAITING_EXPOSURE = "awaiting_exposure"
    DROPPED_AWAITING = "dropped_awaiting"


FATES = tuple(OutcomeFate)
_ATTRIBUTED, _BEFORE, _AFTER, _AWAITING, _DROPPED = range(len(FATES))


class EventCode:
    """The kind of an event in a round (small ints, for numpy masks)."""

    ASSIGNMENT, PREDICTION, SHADOW, OUTCOME = 0, 1, 2, 3


@dataclass(frozen=True)
class Rules:
    """What the experiments' configs say about attribution, per experiment code of a table:
    the attribution window and the outcome names whose totals are kept."""

    window_ms: np.ndarray
    tracked: list[frozenset[str]]


@dataclass
class Round:
    """At most one event per row, in the order the row saw them (see the module doc).

    ``variants``: the table's variant code named by an assignment or prediction (-1 otherwise);
    ``metrics``: the totals column of an outcome's metric when its experiment tracks it, else -1;
    ``names``: an outcome's metric name as a code into ``metric_names`` (outcomes that must wait
    keep the name), -1 otherwise.
    """

    rows: np.ndarray
    kinds: np.ndarray
    hashes: np.ndarray
    times: np.ndarray
    variants: np.ndarray
    metrics: np.ndarray
    values: np.ndarray
    names: np.ndarray
    metric_names: list[str]


# Columns per row: name -> (dtype, initial value). Width-varying ones (totals, predicted, ring,
# fates) are 2-D; their widths are kept in UnitTable.
_COLUMNS = {
    "experiment": ("<i4", 0),
    "variant": ("<i4", NOT_EXPOSED),
    "exposed_ms": ("<i8", 0),
    "last_ms": ("<i8", 0),
    "inconsistencies": ("<i8", 0),
    "fates": ("<i8", 0),
    "totals": ("<f8", 0.0),
    "predicted": ("<i8", 0),
    "ring": ("<u8", 0),
    "ring_head": ("|u1", 0),
    "ring_count": ("|u1", 0),
}
_DELTA_COLUMNS = ("experiment", "variant", "exposed_ms", "last_ms", "inconsistencies", "fates", "totals", "predicted",
                  "ring_head", "ring_count")


class UnitTable:
    """The unit states of one input partition, as numpy columns indexed by row."""

    def __init__(self) -> None:
        self.experiments: list[str] = []
        self._experiment_codes: dict[str, int] = {}
        self.variants: list[str] = []
        self._variant_codes: dict[str, int] = {}
        self.metrics: list[str] = []  # outcome names with a totals column
        self._metric_codes: dict[str, int] = {}
        self._rows: list[dict[str, int]] = []  # per experiment code: unit_id -> row
        self.unit_ids: list[str] = []  # per row
        self.awaiting: dict[int, list[tuple[str, int, float]]] = {}
        self._awaiting_changed: set[int] = set()  # rows whose waiting outcomes the next delta must carry
        self.n = 0
        self._cap = 0
        self.columns: dict[str, np.ndarray] = {}
        self._allocate(0, widths={"fates": len(FATES), "totals": 0, "predicted": 0, "ring": RECENT_EVENT_IDS})

    # --- names and rows ---------------------------------------------------------------------

    def experiment_code(self, experiment_id: str) -> int:
        code = self._experiment_codes.get(experiment_id)
        if code is None:
            code = self._experiment_codes[experiment_id] = len(self.experiments)
            self.experiments.append(experiment_id)
            self._rows.append({})
        return code

    def variant_code(self, name: str) -> int:
        code = self._variant_codes.get(name)
        if code is None:
            code = self._variant_codes[name] = len(self.variants)
            self.variants.append(name)
            self._widen("predicted", len(self.variants))
        return code

    def metric_code(self, name: str) -> int:
        code = self._metric_codes.get(name)
        if code is None:
            code = self._metric_codes[name] = len(self.metrics)
            self.metrics.append(name)
            self._widen("totals", len(self.metrics))
        return code

    def rows_of(self, experiment_code: int, unit_ids: Iterable[str]) -> np.ndarray:
        """The row of each unit of the experiment, new rows for units not seen before."""
        index, created = self._rows[experiment_code], []
        rows = []
        for unit_id in unit_ids:
            row = index.get(unit_id)
            if row is None:
                row = index[unit_id] = self.n + len(created)
                created.append(unit_id)
            rows.append(row)
        if created:
            first = self.n
            self._ensure(first + len(created))
            self.n = first + len(created)
            self.unit_ids.extend(created)
            self.columns["experiment"][first:self.n] = experiment_code
        return np.asarray(rows, dtype=np.int64)

    def metric_column(self, name: str) -> int:
        """The totals column of an outcome name, -1 if it has none."""
        return self._metric_codes.get(name, -1)

    def _add_rows(self, experiments: list[int], unit_ids: list[str]) -> None:
        """Append rows for these (experiment code, unit) pairs, in order (a chunk's new rows)."""
        first = self.n
        for offset, (experiment, unit_id) in enumerate(zip(experiments, unit_ids)):
            index = self._rows[experiment]
            if unit_id in index:
                raise ValueError(f"a unit-state chunk adds a row for a unit the table holds already (row {index[unit_id]})")
            index[unit_id] = first + offset
        self._ensure(first + len(unit_ids))
        self.n = first + len(unit_ids)
        self.unit_ids.extend(unit_ids)
        self.columns["experiment"][first:self.n] = experiments

    def rows_of_experiment(self, experiment_code: int) -> np.ndarray:
        return np.flatnonzero(self.columns["experiment"][:self.n] == experiment_code)

    # --- applying events --------------------------------------------------------------------

    def apply_round(self, events: Round, rules: Rules) -> np.ndarray:
        """Apply one event per row (see :class:`Round`); returns which events were applied
        (False: a re-send whose identity the row had seen). Every variant and metric column the
        events name must exist before (a round holds on to the columns)."""
        c = self.columns
        rows, kinds = events.rows, events.kinds
        ring = c["ring"]
        first = ~(ring[rows] == events.hashes[:, None]).any(axis=1)
        applied = rows[first]
        head, count = c["ring_head"][applied].astype(np.int64), c["ring_count"][applied].astype(np.int64)
        ring[applied, (head + count) % RECENT_EVENT_IDS] = events.hashes[first]
        full = count == RECENT_EVENT_IDS
        c["ring_head"][applied] = np.where(full, (head + 1) % RECENT_EVENT_IDS, head)
        c["ring_count"][applied] = np.where(full, count, count + 1)
        c["last_ms"][applied] = np.maximum(c["last_ms"][applied], events.times[first])

        assignment = np.flatnonzero(first & (kinds == EventCode.ASSIGNMENT))
        if assignment.size:
            self._expose(rows[assignment], events.variants[assignment], events.times[assignment], rules)
        prediction = np.flatnonzero(first & (kinds == EventCode.PREDICTION))
        if prediction.size:
            # One event per row in a round: fancy-index += adds once per row.
            c["predicted"][rows[prediction], events.variants[prediction]] += 1
        outcome = np.flatnonzero(first & (kinds == EventCode.OUTCOME))
        if outcome.size:
            self._outcomes(rows[outcome], events.times[outcome], events.values[outcome], events.metrics[outcome],
                           events.names[outcome], events.metric_names, rules)
        return first

    def _expose(self, rows: np.ndarray, variants: np.ndarray, times: np.ndarray, rules: Rules) -> None:
        c = self.columns
        current = c["variant"][rows]
        fresh = current == NOT_EXPOSED
        c["inconsistencies"][rows[~fresh & (current != variants)]] += 1
        exposed = rows[fresh]
        c["variant"][exposed] = variants[fresh]
        c["exposed_ms"][exposed] = times[fresh]
        if self.awaiting:
            waited = [row for row in exposed.tolist() if row in self.awaiting]
            if waited:
                self._judge_awaiting(waited, rules)

    def _judge_awaiting(self, rows: list[int], rules: Rules) -> None:
        """Judge the outcomes that waited for these rows' exposure (just seen), in their order."""
        c = self.columns
        at, times, values, metrics = [], [], [], []
        for row in rows:
            waiting = self.awaiting.pop(row)
            self._awaiting_changed.add(row)
            c["fates"][row, _AWAITING] -= len(waiting)
            tracked = rules.tracked[int(c["experiment"][row])]
            for metric, time_ms, value in waiting:
                at.append(row)
                times.append(time_ms)
                values.append(value)
                metrics.append(self.metric_column(metric) if metric in tracked else -1)
        at_rows, metric_columns = np.array(at, dtype=np.int64), np.array(metrics, dtype=np.int64)
        fate = self._fate(at_rows, np.array(times, dtype=np.int64), rules)
        # A row may have several: np.add.at adds each, in order (fancy += would add once).
        np.add.at(c["fates"], (at_rows, fate), 1)
        counted = (fate == _ATTRIBUTED) & (metric_columns >= 0)
        np.add.at(c["totals"], (at_rows[counted], metric_columns[counted]), np.array(values)[counted])

    def _fate(self, rows: np.ndarray, times: np.ndarray, rules: Rules) -> np.ndarray:
        """The fate of outcomes at ``times`` of exposed rows."""
        c = self.columns
        exposed_ms = c["exposed_ms"][rows]
        windows = rules.window_ms[c["experiment"][rows]]
        return np.where(times < exposed_ms, _BEFORE, np.where(times >= exposed_ms + windows, _AFTER, _ATTRIBUTED))

    def _outcomes(self, rows: np.ndarray, times: np.ndarray, values: np.ndarray, metrics: np.ndarray,
                  names: np.ndarray, metric_names: list[str], rules: Rules) -> None:
        c = self.columns
        judged = np.flatnonzero(c["variant"][rows] != NOT_EXPOSED)
        fate = self._fate(rows[judged], times[judged], rules)
        c["fates"][rows[judged], fate] += 1
        counted = judged[(fate == _ATTRIBUTED) & (metrics[judged] >= 0)]
        c["totals"][rows[counted], metrics[counted]] += values[counted]
        if judged.size == rows.size:
            return
        for i in np.flatnonzero(c["variant"][rows] == NOT_EXPOSED).tolist():
            row = int(rows[i])
            waiting = self.awaiting.setdefault(row, [])
            self._awaiting_changed.add(row)
            if len(waiting) >= MAX_AWAITING_OUTCOMES:
                c["fates"][row, _DROPPED] += 1
                continue
            waiting.append((metric_names[names[i]], int(times[i]), float(values[i])))
            c["fates"][row, _AWAITING] += 1

    # --- undo ---------------------------------------------------------------------------------

    def save(self, rows: np.ndarray) -> "_Saved":
        """What :meth:`restore` needs to put these rows back as they are now."""
        return _Saved(rows, {name: column[rows].copy() for name, column in self.columns.items()},
                      {row: list(self.awaiting[row]) for row in rows.tolist() if row in self.awaiting})

    def restore(self, saved: "_Saved") -> None:
        for name, values in saved.columns.items():
            self.columns[name][saved.rows] = values
        for row in saved.rows.tolist():
            if row in saved.awaiting:
                self.awaiting[row] = saved.awaiting[row]
            else:
                self.awaiting.pop(row, None)

    # --- what rows contribute ---------------------------------------------------------------

    def other_variant_predictions(self, rows: np.ndarray) -> np.ndarray:
        """Per row: predictions naming another variant than the row's exposure (0 while unexposed).
        A prediction and its unit's assignment travel on different topics, and Kafka orders
        nothing across topics, so this must not depend on which came first."""
        c = self.columns
        predicted = c["predicted"][rows]
        variant = c["variant"][rows]
        if predicted.shape[1] == 0:
            return np.zeros(rows.size, dtype=np.int64)
        own = predicted[np.arange(rows.size), np.maximum(variant, 0)]
        return np.where(variant == NOT_EXPOSED, 0, predicted.sum(axis=1) - own)

    def view(self, rows: np.ndarray, *, blank: bool = False) -> "RowsView":
        """A copy of what the rows contribute to their partials now (``blank``: what a row
        contributes before its first event: nothing)."""
        c = self.columns
        if blank:
            zeros = np.zeros(rows.size, dtype=np.int64)
            return RowsView(rows, c["experiment"][rows].copy(), np.full(rows.size, NOT_EXPOSED, dtype=np.int32), zeros,
                            zeros, np.zeros((rows.size, c["totals"].shape[1])), np.zeros((rows.size, len(FATES)), np.int64),
                            zeros)
        return RowsView(rows, c["experiment"][rows].copy(), c["variant"][rows].copy(), c["exposed_ms"][rows].copy(),
                        c["last_ms"][rows].copy(), c["totals"][rows].copy(), c["fates"][rows].copy(),
                        c["inconsistencies"][rows] + self.other_variant_predictions(rows))

    # --- stored form ------------------------------------------------------------------------

    def delta_chunks(self, rows: np.ndarray, first_new_row: int,
                     window_writes: tuple[np.ndarray, np.ndarray] | None) -> list[bytes]:
        """Chunks that bring a copy of this table from before a batch to now: ``rows`` are the
        rows the batch changed (sorted; every row from ``first_new_row`` on is new and among
        them), ``window_writes`` the (row, hash) appended to the id windows, in order (None:
        carry the rows whole, their id windows and waiting outcomes, whatever changed)."""
        chunks = []
        for start in range(0, rows.size, DELTA_ROWS_PER_CHUNK):
            part = rows[start:start + DELTA_ROWS_PER_CHUNK]
            arrays = self._row_arrays(part, first_new_row)
            if window_writes is None:
                arrays |= self._windows(part)
                waiting = part.tolist()
            else:
                written = np.isin(window_writes[0], part)
                arrays |= self._window_slots(window_writes[0][written], window_writes[1][written])
                waiting = [r for r in part.tolist() if r in self._awaiting_changed]
            chunks.append(pack(self._row_meta(waiting), arrays))
        self._awaiting_changed.clear()
        return chunks

    def _row_meta(self, waiting_rows: list[int]) -> dict:
        """Names (so that codes mean the same to a reader) and these rows' waiting outcomes (an
        empty list clears a row's)."""
        return {"kind": "rows", "experiments": self.experiments, "variants": self.variants, "metrics": self.metrics,
                "awaiting": {str(r): self.awaiting.get(r, []) for r in waiting_rows}}

    def _row_arrays(self, part: np.ndarray, first_new_row: int) -> dict[str, np.ndarray]:
        """The rows' columns, and the unit ids of the new ones (their UTF-8 bytes end to end)."""
        new = part[part >= first_new_row]
        ids = [self.unit_ids[r].encode() for r in new.tolist()]
        return {"rows": part} | {name: self.columns[name][part] for name in _DELTA_COLUMNS} | {
            "new_rows": new, "new_id_bytes": np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)),
            "new_ids": np.frombuffer(b"".join(ids), dtype=np.uint8)}

    def _windows(self, part: np.ndarray) -> dict[str, np.ndarray]:
        """The rows' whole id windows, their occupied slots only: a window fills slots 0, 1, ...
        and wraps only once full, so a row's ids are its first ring_count slots (~8 bytes per
        event of a unit with few events, not 512 bytes)."""
        held = np.arange(RECENT_EVENT_IDS) < self.columns["ring_count"][part][:, None]
        return {"ring_hashes": self.columns["ring"][part][held]}

    def _window_slots(self, rows: np.ndarray, hashes: np.ndarray) -> dict[str, np.ndarray]:
        """The final (row, slot, hash) of a batch's id-window writes: slots counted back from each
        row's newest slot now, so a reader sets slots and needs no order."""
        c = self.columns
        # The k-th of a row's n writes (in order) sits n - 1 - k slots before the newest one.
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_rows)) + 1] if rows.size else np.zeros(0, dtype=np.int64)
        counts = np.diff(np.r_[starts, sorted_rows.size])
        rank = np.arange(sorted_rows.size) - np.repeat(starts, counts)
        back = np.repeat(counts, counts) - 1 - rank
        newest = c["ring_head"][sorted_rows].astype(np.int64) + c["ring_count"][sorted_rows].astype(np.int64) - 1
        kept = back < RECENT_EVENT_IDS  # the older ones were overwritten in the same batch
        return {"ring_rows": sorted_rows[kept].astype(np.int64), "ring_slots": ((newest - back) % RECENT_EVENT_IDS)[kept],
                "ring_hashes": hashes[order][kept].astype(np.uint64)}

    def snapshot_chunks(self) -> list[bytes]:
        """Chunks that rebuild this table from nothing."""
        chunks = []
        for start in range(0, self.n, SNAPSHOT_ROWS_PER_CHUNK):
            part = np.arange(start, min(self.n, start + SNAPSHOT_ROWS_PER_CHUNK), dtype=np.int64)
            waiting = [r for r in part.tolist() if r in self.awaiting]
            chunks.append(pack(self._row_meta(waiting), self._row_arrays(part, 0) | self._windows(part)))
        return chunks

    def apply_chunk(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        """Apply a chunk of :meth:`delta_chunks` or :meth:`snapshot_chunks` (names first, so
        that codes in the arrays mean what they meant to the writer)."""
        for name in meta["experiments"]:
            self.experiment_code(name)
        for name in meta["variants"]:
            self.variant_code(name)
        for name in meta["metrics"]:
            self.metric_code(name)
        if self.experiments != meta["experiments"] or self.variants != meta["variants"] or self.metrics != meta["metrics"]:
            raise ValueError("a unit-state chunk names experiments, variants or metrics in another order than the table")
        new_rows = arrays["new_rows"]
        if new_rows.size and (new_rows[0] != self.n or np.any(np.diff(new_rows) != 1)):
            raise ValueError(f"a unit-state chunk adds rows from {new_rows[0]} to a table of {self.n} rows")
        if new_rows.size:
            ends = np.cumsum(arrays["new_id_bytes"]).tolist()
            blob = arrays["new_ids"].tobytes()
            ids = [blob[start:end].decode() for start, end in zip([0] + ends[:-1], ends)]
            self._add_rows(arrays["experiment"][np.searchsorted(arrays["rows"], new_rows)].tolist(), ids)
        rows = arrays["rows"]
        if rows.size and int(rows.max()) >= self.n:
            raise ValueError("a unit-state chunk changes a row the table does not have")
        for name in _DELTA_COLUMNS:
            value = arrays[name]
            target = self.columns[name]
            if target.ndim == 2:
                target[rows, :value.shape[1]] = value
            else:
                target[rows] = value
        if "ring_slots" in arrays:
            self.columns["ring"][arrays["ring_rows"], arrays["ring_slots"]] = arrays["ring_hashes"]
        else:
            held = np.arange(RECENT_EVENT_IDS) < arrays["ring_count"][:, None]
            windows = np.zeros((rows.size, RECENT_EVENT_IDS), dtype=np.uint64)
            windows[held] = arrays["ring_hashes"]
            self.columns["ring"][rows] = windows
        for row, waiting in meta["awaiting"].items():
            if waiting:
                self.awaiting[int(row)] = [tuple(w) for w in waiting]
            else:
                self.awaiting.pop(int(row), None)

    def without_experiments(self, experiment_ids: set[str]) -> "UnitTable":
        """A copy of this table without the rows of these experiments (rows renumbered)."""
        table = UnitTable()
        for name in self.variants:
            table.variant_code(name)
        for name in self.metrics:
            table.metric_code(name)
        for code, experiment_id in enumerate(self.experiments):
            if experiment_id in experiment_ids:
                continue
            rows = self.rows_of_experiment(code)
            new_rows = table.rows_of(table.experiment_code(experiment_id), [self.unit_ids[r] for r in rows.tolist()])
            for name in (*_DELTA_COLUMNS, "ring"):
                if name != "experiment":
                    table.columns[name][new_rows] = self.columns[name][rows]
            for old, new in zip(rows.tolist(), new_rows.tolist()):
                if old in self.awaiting:
                    table.awaiting[new] = list(self.awaiting[old])
        return table

    # --- storage ----------------------------------------------------------------------------

    def _allocate(self, cap: int, widths: dict[str, int]) -> None:
        old, self._cap = self.columns, cap
        self._widths = widths
        self.columns = {}
        for name, (dtype, initial) in _COLUMNS.items():
            shape = (cap, widths[name]) if name in widths else (cap,)
            # Zeros come from calloc: pages the OS maps when first touched, not memset now (np.full of
            # the 512-byte id windows per row was 11% of a growing worker's time in py-spy).
            column = np.zeros(shape, dtype=dtype) if initial == 0 else np.full(shape, initial, dtype=dtype)
            if name in old:
                previous = old[name]
                if column.ndim == 2:
                    column[:previous.shape[0], :previous.shape[1]] = previous
                else:
                    column[:previous.shape[0]] = previous
            self.columns[name] = column

    def _ensure(self, rows: int) -> None:
        if rows > self._cap:
            self._allocate(max(rows, 2 * self._cap, 1024), self._widths)

    def _widen(self, name: str, width: int) -> None:
        if width > self._widths[name]:
            self._allocate(self._cap, self._widths | {name: width})


@dataclass
class RowsView:
    """What some rows contributed at one moment: the "before" and "after" of a batch."""

    rows: np.ndarray
    experiment: np.ndarray
    variant: np.ndarray
    exposed_ms: np.ndarray
    last_ms: np.ndarray
    totals: np.ndarray
    fates: np.ndarray
    inconsistencies: np.ndarray  # assignment inconsistencies plus other-variant predictions

    def take(self, at: np.ndarray | slice) -> "RowsView":
        return RowsView(self.rows[at], self.experiment[at], self.variant[at], self.exposed_ms[at], self.last_ms[at],
                        self.totals[at], self.fates[at], self.inconsistencies[at])


@dataclass
class _Saved:
    rows: np.ndarray
    columns: dict[str, np.ndarray]
    awaiting: dict[int, list]


# --- chunks: a JSON header and raw arrays ---------------------------------------------------

_DTYPES = frozenset({"<i4", "<i8", "<u8", "<f8", "|u1", "|b1"})
_LENGTH = struct.Struct("<I")


def pack(meta: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """One chunk: a 4-byte header length, the JSON header, the arrays' bytes."""
    layout, parts, offset = [], [], 0
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        if array.dtype.str not in _DTYPES:
            raise TypeError(f"array {name} has dtype {array.dtype.str}, not one a chunk may hold")
        layout.append([name, array.dtype.str, list(array.shape), offset])
        parts.append(array.tobytes())
        offset += array.nbytes
    header = json.dumps({"meta": meta, "arrays": layout}, separators=(",", ":")).encode()
    return _LENGTH.pack(len(header)) + header + b"".join(parts)


def unpack(chunk: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The header and arrays of :func:`pack` (arrays are read-only views of ``chunk``)."""
    (length,) = _LENGTH.unpack_from(chunk)
    header = json.loads(chunk[_LENGTH.size:_LENGTH.size + length])
    body = memoryview(chunk)[_LENGTH.size + length:]
    arrays = {}
    for name, dtype, shape, offset in header["arrays"]:
        if dtype not in _DTYPES:
            raise ValueError(f"a chunk's array {name} has dtype {dtype}, not one a chunk may hold")
        count = int(np.prod(shape)) if shape else 1
        arrays[name] = np.frombuffer(body, dtype=np.dtype(dtype), count=count, offset=offset).reshape(shape)
    return header["meta"], arrays
