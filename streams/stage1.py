"""Stage 1, per input partition: decode, dead-letter, fold events into unit state and partials.

Input topics are keyed by unit_id and co-partitioned, so a unit's exposure and its later
outcomes meet here, in one partition of one worker. A batch is folded with numpy over the
whole batch rather than with Python per event (bench/PROFILE.md, sixth round):

1. replays: a message below its partition's input position was folded before (a redelivery
   after a crash or a hand-over) and is dropped; the positions are stored with the state
   they describe, in one state-log transaction (streams/state_log.py), so they always agree;
2. each topic's messages are decoded at once (streams/columns.py); bad ones become dead
   letters, and so do events for an experiment no worker knows (after one refresh of the
   experiment catalogue); events of draft and stopped experiments are counted and dropped;
3. each event finds its row in the partition's unit table (streams/units.py), and the events
   are applied in rounds (the r-th event of every touched row at once): exactly the per-unit,
   in-order result of the rules in streams/units.py;
4. each touched experiment's partial moves by what its rows changed, and the batch's
   predictions and shadow runs are counted into the partial's counters;
5. each partition's changes (rows, counter changes, new positions) become the chunks of one
   state-log transaction.

Nothing here does I/O: streams/worker.py reads the batches, writes the transactions and
publishes the partials.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from operator import attrgetter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np

from streams import metrics
from streams.codec import Codec, DeadLetter, DeadLetterReason, EventKind
from streams.columns import ColumnDecoder, DecodedBatch, StringColumn
from streams.partials import (HOUR_MS, LATENCY_SKETCH, SCORE_BINS, SCORE_DECISION_THRESHOLD, CounterKey, Partial,
                              VariantPartial, outcome_names, terms)
from streams.settings import Settings
from streams.topics import TopicError, input_topic_names, murmur2_partitions
from streams.units import FATES, NOT_EXPOSED, EventCode, Round, RowsView, Rules, UnitTable, pack, unpack

log = logging.getLogger("abstream.stage1")

# A producer that keys or partitions wrongly does so for every event: one log line a minute is enough.
OFF_PARTITION_LOG_EVERY_S = 60.0

# Events of experiments in these states are counted and dropped (str values: the config's
# status is a str enum, and Stage1 takes any config object).
_INACTIVE = frozenset({"draft", "stopped"})
_CODES = {EventKind.ASSIGNMENT: EventCode.ASSIGNMENT, EventKind.PREDICTION: EventCode.PREDICTION,
          EventKind.SHADOW: EventCode.SHADOW, EventKind.OUTCOME: EventCode.OUTCOME}
# An event's identity is its kind and its event_id: each kind's id hashes are told apart by
# xor with a constant of its own.
_KIND_SALT = {EventKind.ASSIGNMENT: np.uint64(0), EventKind.PREDICTION: np.uint64(0x9E3779B97F4A7C15),
              EventKind.SHADOW: np.uint64(0xC2B2AE3D27D4EB4F), EventKind.OUTCOME: np.uint64(0x165667B19E3779F9)}
_LOG_GAMMA = math.log(LATENCY_SKETCH.gamma)
# A partition's snapshot is written once its deltas since the last one exceed this many bytes
# or SNAPSHOT_AFTER_SNAPSHOTS times that snapshot, whichever is more: a new owner reads at most
# ~5 snapshots' worth of records (~0.1-0.5 s per 64 MB here) to rebuild a partition, and writing
# snapshots costs at most a quarter of the deltas. With 8 MB and 2x, snapshots of a growing table
# stalled one worker's batches: 50 ms of state write per batch instead of ~15 (make bench).
SNAPSHOT_AFTER_BYTES = 64 * 1024 * 1024
SNAPSHOT_AFTER_SNAPSHOTS = 4
_UNKNOWN, _IGNORED, _ACTIVE = 0, 1, 2
_value_of = attrgetter("value")


class StateUnreadable(Exception):
    """A partition's state log holds a transaction this version cannot apply (corrupt bytes, or
    written by an incompatible version)."""


class InputMessage(Protocol):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class ExperimentLookup(Protocol):
    def get(self, experiment_id: str) -> Any: ...
    def refresh(self, timeout_s: float = ...) -> None: ...


@dataclass
class PartitionState:
    """Everything stage 1 keeps of one input partition, rebuilt from its state-log transactions."""

    table: UnitTable = field(default_factory=UnitTable)
    positions: dict[str, int] = field(default_factory=dict)  # input topic -> next offset to fold
    partials: dict[str, Partial] = field(default_factory=dict)  # experiment -> partial, counters included
    bytes_since_snapshot: int = 0
    snapshot_bytes: int = 0


@dataclass
class BatchResult:
    dead: list[tuple[InputMessage, DeadLetter]] = field(default_factory=list)
    transactions: dict[int, list[bytes]] = field(default_factory=dict)  # partition -> chunks of one transaction
    ignored: dict[str, int] = field(default_factory=dict)


@dataclass
class _Events:
    """One topic's valid events of active experiments in one partition, in offset order."""

    kind: EventKind
    decoded: DecodedBatch
    messages: Sequence[InputMessage]  # of the whole decoded batch
    picked: np.ndarray  # indices into decoded and messages
    rows: np.ndarray
    variants: np.ndarray  # the table's variant code named (assignments, predictions), else -1
    metrics: np.ndarray  # the table's totals column of an outcome its experiment tracks, else -1

    def __len__(self) -> int:
        return self.picked.size

    def take(self, at: np.ndarray) -> "_Events":
        return _Events(self.kind, self.decoded, self.messages, self.picked[at], self.rows[at], self.variants[at],
                       self.metrics[at])


class _Concatenated:
    """Lists read as one, by index (only dead letters look a message up)."""

    def __init__(self, lists: list[Sequence[InputMessage]]):
        self.lists = lists
        self.starts = np.cumsum([0] + [len(items) for items in lists])

    def __getitem__(self, i: int) -> InputMessage:
        which = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.lists[which][i - int(self.starts[which])]


@dataclass
class _Staged:
    """One partition's events applied to its table, before its partials move (Stage1._fold)."""

    table: UnitTable
    events: list[_Events]
    applied: np.ndarray  # per event, in the order of events: applied (not a re-send)
    window_writes: tuple[np.ndarray, np.ndarray]  # (row, hash) appended to the id windows, in order
    changed: np.ndarray  # the rows the events changed, sorted
    before: RowsView  # of the changed rows, before and after
    after: RowsView
    undo: Any  # what puts the table back (UnitTable.save)


_Counts = dict[int, dict[str, dict[CounterKey, float]]]  # partition -> experiment -> counter changes


def group_by_partition(messages: Iterable[InputMessage]) -> dict[tuple[str, int], list[InputMessage]]:
    """Messages per (topic, partition), each list in the order given (offset order)."""
    groups: dict[tuple[str, int], list[InputMessage]] = {}
    for message in messages:
        groups.setdefault((message.topic, message.partition), []).append(message)
    return groups


class Stage1:
    """The stage-1 fold of one worker, over the input partitions it holds."""

    def __init__(self, settings: Settings, codec: Codec, experiments: ExperimentLookup):
        self.experiments = experiments
        self.kinds = input_topic_names(settings)
        self.topics = {kind: topic for topic, kind in self.kinds.items()}
        self.short_names = {topic: topic[len(settings.topic_prefix):] for topic in self.kinds}
        self.decoders = {kind: ColumnDecoder(codec, kind) for kind in EventKind}
        self.partitions: dict[int, PartitionState] = {}
        self.dirty: set[tuple[int, str]] = set()
        self._refreshed = False
        self._input_partitions = settings.partitions
        self._off_partition_logged = -math.inf

    # --- partitions -----------------------------------------------------------------------------

    def load(self, partition: int, transactions: Iterable[tuple[str, Sequence[bytes]]], *, from_start: bool) -> None:
        """Rebuild (``from_start``) or continue a partition's state from state-log transactions
        (type, chunks), rebuild its partials, and mark them for publication: its last owner may
        have died after writing its state but before publishing it, and no new event may come.
        Raises StateUnreadable (the partition's state forgotten) when a chunk cannot be applied."""
        try:
            self._load(partition, transactions, from_start=from_start)
        except Exception as exc:
            # A state that is partly applied would count wrong from then on: none is kept.
            self.forget(partition)
            raise StateUnreadable(f"the stage-1 state of input partition {partition} cannot be applied "
                                  f"({type(exc).__name__}: {exc})") from exc

    def _load(self, partition: int, transactions: Iterable[tuple[str, Sequence[bytes]]], *, from_start: bool) -> None:
        state = self.partitions.get(partition)
        if from_start or state is None:
            state = PartitionState()
        counters = {e: p.counters for e, p in state.partials.items()}
        for kind, chunks in transactions:
            if kind == "snapshot":
                state, counters = PartitionState(), {}
            size = sum(map(len, chunks))
            for chunk in chunks:
                meta, arrays = unpack(chunk)
                if meta["kind"] == "rows":
                    state.table.apply_chunk(meta, arrays)
                else:
                    state.positions.update(meta["positions"])
                    for experiment_id, changes in meta["counters"].items():
                        mine = counters.setdefault(experiment_id, {})
                        for ns, name, key, by in changes:
                            mine[(ns, name, key)] = mine.get((ns, name, key), 0) + by
            if kind == "snapshot":
                state.snapshot_bytes, state.bytes_since_snapshot = size, 0
            else:
                state.bytes_since_snapshot += size
        state.partials = {}
        table = state.table
        for code, experiment_id in enumerate(table.experiments):
            config = self.experiments.get(experiment_id)
            rows = table.rows_of_experiment(code)
            if config is not None and rows.size:
                partial = state.partials[experiment_id] = Partial()
                _move(partial, table, config, table.view(rows, blank=True), table.view(rows))
        for experiment_id, mine in counters.items():
            partial = state.partials.setdefault(experiment_id, Partial())
            partial.counters = mine
            partial.drop_middle_score_hours()
        self.partitions[partition] = state
        self.dirty |= {(partition, e) for e in state.partials}

    def forget(self, partition: int) -> None:
        self.partitions.pop(partition, None)
        self.dirty = {(p, e) for p, e in self.dirty if p != partition}

    def snapshot(self, partition: int) -> list[bytes]:
        """The chunks of a snapshot transaction of the partition (rows, counters and positions whole)."""
        state = self.partitions[partition]
        chunks = state.table.snapshot_chunks() + [_partition_chunk(state, {
            e: list(_counter_list(p.counters)) for e, p in state.partials.items() if p.counters})]
        state.snapshot_bytes, state.bytes_since_snapshot = sum(map(len, chunks)), 0
        return chunks

    def snapshot_due(self, partition: int) -> bool:
        state = self.partitions[partition]
        return state.bytes_since_snapshot > max(SNAPSHOT_AFTER_BYTES, SNAPSHOT_AFTER_SNAPSHOTS * state.snapshot_bytes)

    def expire(self, experiment_ids: set[str], partitions: Iterable[int]) -> list[int]:
        """Drop the unit states and partials of these experiments in these partitions (rows are
        renumbered: only partitions whose state is written next may change); returns those that
        changed (whose state must be written again as a :meth:`snapshot`)."""
        changed = []
        for partition in sorted(partitions):
            state = self.partitions.get(partition)
            if state is not None and experiment_ids & (set(state.table.experiments) | set(state.partials)):
                state.table = state.table.without_experiments(experiment_ids)
                for experiment_id in experiment_ids:
                    state.partials.pop(experiment_id, None)
                changed.append(partition)
        self.dirty = {(p, e) for p, e in self.dirty if e not in experiment_ids}
        return changed

    def take_dirty(self) -> list[tuple[int, str, Partial, int]]:
        """The partials changed since the last call, to be published: (partition, experiment,
        partial, position), the position being how many of the partition's input messages its
        state has folded (the sum over the input topics of the next offset to fold). Along the
        state log a partition's positions only grow, whichever worker owns it, so stage 2 can
        tell a partial read again or come late from a newer one (stage2.with_partial)."""
        dirty, self.dirty = self.dirty, set()
        return [(p, e, self.partitions[p].partials[e], sum(self.partitions[p].positions.values()))
                for p, e in sorted(dirty) if p in self.partitions and e in self.partitions[p].partials]

    def unit_states(self) -> int:
        return sum(state.table.n for state in self.partitions.values())

    # --- the fold ------------------------------------------------------------------------------

    def process(self, batch: Mapping[tuple[str, int], Sequence[InputMessage]]) -> BatchResult:
        """Fold a batch: messages per (input topic, partition), each list in offset order. Every
        partition must have been loaded (:meth:`load`)."""
        result = BatchResult()
        self._refreshed = False
        fresh: dict[tuple[str, int], Sequence[InputMessage]] = {}
        consumed, duplicates = Counter(), Counter()
        for (topic, partition), messages in batch.items():
            if not messages:
                continue
            consumed[topic] += len(messages)
            position = self.partitions[partition].positions.get(topic, 0)
            replays = 0
            while replays < len(messages) and messages[replays].offset < position:
                replays += 1
            duplicates[topic] += replays
            if replays < len(messages):
                fresh[(topic, partition)] = messages[replays:]
        # Every topic's messages decoded before anything changes or is counted: a schema
        # registry that cannot say what an id is (SchemaRegistryUnavailable) leaves the batch
        # as if it had not been read, to be read again.
        decoded: dict[EventKind, tuple[list[tuple[int, Sequence[InputMessage]]], DecodedBatch]] = {}
        for kind in EventKind:
            parts = [(p, ms) for (t, p), ms in fresh.items() if self.kinds[t] is kind]
            if parts:
                values = [value for _, ms in parts for value in map(_value_of, ms)]
                decoded[kind] = parts, self.decoders[kind].decode(values)
        metrics.BATCH_EVENTS.observe(sum(consumed.values()))
        for topic, n in consumed.items():
            metrics.EVENTS_CONSUMED.labels(self.short_names[topic]).inc(n)

        touched = sorted({partition for _, partition in fresh})
        first_new = {p: self.partitions[p].table.n for p in touched}
        routed: dict[int, list[_Events]] = {}
        new_rows: list[tuple[int, str, int, int]] = []
        for kind, (parts, values) in decoded.items():
            self._route(kind, parts, values, routed, result, new_rows)
        if new_rows:
            self._check_partitions(new_rows)
        events_of = {partition: routed.get(partition, []) for partition in touched}
        try:
            folded = self._fold(events_of, first_new, duplicates)
        except Exception:
            # One partition at a time, so that only the partition with the event that raised is
            # folded one event at a time (its stack trace is logged there).
            folded = {}
            for partition, events in events_of.items():
                try:
                    folded |= self._fold({partition: events}, first_new, duplicates)
                except Exception:  # a bug or an input nobody foresaw must not stop the worker
                    log.exception("folding partition %d's batch failed: folding its events one at a time", partition)
                    folded[partition] = self._fold_each(partition, events, first_new[partition], duplicates, result)
        for partition in touched:
            state = self.partitions[partition]
            for (topic, p), messages in fresh.items():
                if p == partition:
                    state.positions[topic] = messages[-1].offset + 1
            row_chunks, counter_changes = folded[partition]
            chunks = row_chunks + [_partition_chunk(state, counter_changes)]
            state.bytes_since_snapshot += sum(map(len, chunks))
            result.transactions[partition] = chunks
        for topic, n in duplicates.items():
            if n:
                metrics.EVENTS_DUPLICATE.labels(self.short_names[topic]).inc(n)
        return result

    def _route(self, kind: EventKind, parts: list[tuple[int, Sequence[InputMessage]]], decoded: DecodedBatch,
               routed: dict[int, list[_Events]], result: BatchResult,
               new_rows: list[tuple[int, str, int, int]]) -> None:
        """One topic's messages of every partition, decoded at once: dead-letter the bad ones and
        those of unknown experiments, count those of inactive ones, and route the rest to their
        partitions' tables (rows created for units seen for the first time, noted in
        ``new_rows`` as (partition, topic short name, first row, end))."""
        messages = _Concatenated([ms for _, ms in parts])
        partitions = np.repeat(np.array([p for p, _ in parts], dtype=np.int64), [len(ms) for _, ms in parts])
        short = self.short_names[self.topics[kind]]
        for i, letter in sorted(decoded.letters.items()):
            result.dead.append((messages[i], letter))
            metrics.DEADLETTERS.labels(short, letter.reason.value).inc()
        experiment = decoded.strings["experiment_id"]
        configs = [self._config(e) for e in experiment.values]
        status = np.array([_UNKNOWN if c is None else _IGNORED if c.status in _INACTIVE else _ACTIVE for c in configs],
                          dtype=np.int8)
        valid = np.flatnonzero(decoded.valid)
        row_status = status[experiment.codes[valid]] if status.size else np.zeros(0, dtype=np.int8)
        for i in valid[row_status == _UNKNOWN].tolist():
            name = experiment.values[experiment.codes[i]]
            letter = DeadLetter(DeadLetterReason.UNKNOWN_EXPERIMENT, f"experiment {name[:80]!r} is not defined")
            result.dead.append((messages[i], letter))
            metrics.DEADLETTERS.labels(short, letter.reason.value).inc()
        ignored = valid[row_status == _IGNORED]
        if ignored.size:
            for code, n in zip(*np.unique(experiment.codes[ignored], return_counts=True)):
                reason = f"experiment_{configs[code].status._value_}"
                result.ignored[reason] = result.ignored.get(reason, 0) + int(n)
                metrics.EVENTS_IGNORED.labels(short, reason).inc(int(n))
        active = valid[row_status == _ACTIVE]
        units = decoded.strings["unit_id"]
        tracked_names = list(dict.fromkeys(name for config, code in zip(configs, status.tolist()) if code == _ACTIVE
                                           for name in sorted(outcome_names(config.metrics))))
        for partition in np.unique(partitions[active]).tolist():
            picked = active[partitions[active] == partition]
            table = self.partitions[partition].table
            # The table's codes of the batch's experiments, variants and tracked metrics; columns
            # are all created here, before a round runs (a round holds on to the columns).
            experiment_codes = np.array([table.experiment_code(e) if status[i] == _ACTIVE else -1
                                         for i, e in enumerate(experiment.values)], dtype=np.int64)
            first_new_row = table.n
            rows = self._rows(table, experiment_codes, experiment.codes[picked], units, units.codes[picked])
            if table.n > first_new_row:
                new_rows.append((partition, short, first_new_row, table.n))
            variants = np.full(picked.size, -1, dtype=np.int64)
            if kind in (EventKind.ASSIGNMENT, EventKind.PREDICTION):
                named = decoded.strings["variant"]
                codes = np.array([table.variant_code(v) for v in named.values], dtype=np.int64)
                variants = codes[named.codes[picked]]
            for name in tracked_names:
                table.metric_code(name)
            tracked = np.full(picked.size, -1, dtype=np.int64)
            if kind is EventKind.OUTCOME:
                tracked = _tracked_columns(table, configs, status, decoded.strings["metric"], experiment.codes[picked],
                                           decoded.strings["metric"].codes[picked])
            routed.setdefault(partition, []).append(_Events(kind, decoded, messages, picked, rows, variants, tracked))

    def _check_partitions(self, new_rows: list[tuple[int, str, int, int]]) -> None:
        """Count the units new to a partition that Kafka's default partitioner puts elsewhere
        (one murmur2 pass per batch). A unit's exposure and outcomes meet only on one partition:
        a producer that keys by something else (a request id) or partitions otherwise
        (librdkafka's default) splits them, and the split units' outcomes wait for an exposure
        that never comes."""
        units = [u for p, _, first, end in new_rows for u in self.partitions[p].table.unit_ids[first:end]]
        sizes = np.array([end - first for _, _, first, end in new_rows])
        arrived = np.repeat([p for p, _, _, _ in new_rows], sizes)
        home = murmur2_partitions(units, self._input_partitions)
        off = home != arrived
        if not off.any():
            return
        counts = np.add.reduceat(off.astype(np.int64), np.cumsum(sizes) - sizes)  # spans are never empty
        for (_, short, _, _), n in zip(new_rows, counts.tolist()):
            if n:
                metrics.UNITS_OFF_PARTITION.labels(short).inc(n)
        if time.monotonic() - self._off_partition_logged > OFF_PARTITION_LOG_EVERY_S:
            self._off_partition_logged = time.monotonic()
            i = int(np.flatnonzero(off)[0])
            log.warning("%d unit(s) new to this batch's partitions belong to other partitions, unit %r arrived on "
                        "%d and belongs to %d (key events by unit_id, partitioner=murmur2_random); their events are "
                        "counted where they arrive", int(off.sum()), units[i][:80], int(arrived[i]), int(home[i]))

    @staticmethod
    def _rows(table: UnitTable, experiment_codes: np.ndarray, experiments: np.ndarray, units: StringColumn,
              unit_codes: np.ndarray) -> np.ndarray:
        """Each event's row: Python work per distinct (experiment, unit) of the batch, not per event."""
        n_units = max(1, len(units.values))
        pairs, inverse = np.unique(experiments.astype(np.int64) * n_units + unit_codes, return_inverse=True)
        rows = np.empty(pairs.size, dtype=np.int64)
        by_experiment = pairs // n_units
        for e in np.unique(by_experiment).tolist():
            at = np.flatnonzero(by_experiment == e)
            rows[at] = table.rows_of(int(experiment_codes[e]), [units.values[u] for u in (pairs[at] % n_units).tolist()])
        return rows[inverse.reshape(-1)]

    def _config(self, experiment_id: str):
        config = self.experiments.get(experiment_id)
        if config is None and not self._refreshed:
            self._refreshed = True
            try:
                self.experiments.refresh()
            except TopicError as exc:
                # The broker away: judge by the configs the catalogue holds. A config published in
                # the last moments is then missed and its first events are dead letters, bytes
                # kept; raising instead would stop the worker.
                log.warning("the experiment catalogue could not be refreshed: %s", exc)
            config = self.experiments.get(experiment_id)
        return config

    def _fold(self, events_of: Mapping[int, list[_Events]], first_new: Mapping[int, int],
              duplicates: Counter) -> dict[int, tuple[list[bytes], dict[str, list]]]:
        """Apply each partition's events and move its partials; returns per partition the
        transaction's row chunks and counter changes. On an exception every table is as it was
        before.

        The predictions and shadow runs of all the partitions are counted together: a batch
        cost ~1.6 ms more per partition it touched, numpy calls on small arrays repeated per
        partition, and the counting was the largest part (bench/PROFILE.md, eleventh round)."""
        staged: dict[int, _Staged] = {}
        try:
            for partition, events in events_of.items():
                if events:
                    staged[partition] = self._stage(self.partitions[partition].table, events, first_new[partition])
            counter_changes, observations = self._count(staged)
            chunks = {partition: s.table.delta_chunks(s.changed, first_new[partition], s.window_writes)
                      for partition, s in staged.items()}
        except Exception:
            for s in staged.values():
                s.table.restore(s.undo)
            raise
        # Nothing can fail from here on: the partials and the metrics move only when the rows did.
        for observe in observations:
            observe()
        folded: dict[int, tuple[list[bytes], dict[str, list]]] = {}
        for partition in events_of:
            s = staged.get(partition)
            if s is None:
                folded[partition] = [], {}
                continue
            state = self.partitions[partition]
            table = state.table
            offset = 0
            for e in s.events:
                duplicates[self.topics[e.kind]] += int(np.count_nonzero(~s.applied[offset:offset + len(e)]))
                offset += len(e)
            # The changed rows by experiment, each experiment's a slice (a view, not a copy).
            order = np.argsort(s.after.experiment, kind="stable")
            before, after = s.before.take(order), s.after.take(order)
            codes, starts = np.unique(after.experiment, return_index=True)
            for code, start, end in zip(codes.tolist(), starts.tolist(), [*starts[1:].tolist(), order.size]):
                experiment_id = table.experiments[code]
                config = self.experiments.get(experiment_id)
                if config is None:
                    continue
                partial = state.partials.setdefault(experiment_id, Partial())
                _move(partial, table, config, before.take(slice(start, end)), after.take(slice(start, end)))
                self.dirty.add((partition, experiment_id))
            changes = counter_changes.get(partition, {})
            for experiment_id, by in changes.items():
                partial = state.partials.setdefault(experiment_id, Partial())
                # Without a new counter the score hours are those of the last drop: nothing to drop.
                # (Looking through every counter per batch was ~5% of the main thread at 10,000 events/s, py-spy.)
                if partial.add_counters(by):
                    partial.drop_middle_score_hours()
                self.dirty.add((partition, experiment_id))
            folded[partition] = chunks[partition], {e: list(_counter_list(c)) for e, c in changes.items()}
        return folded

    def _stage(self, table: UnitTable, events: list[_Events], first_new: int) -> "_Staged":
        """Apply one partition's events to its table; on an exception the table is as it was."""
        rows = np.concatenate([e.rows for e in events])
        candidates = np.unique(np.r_[rows, np.arange(first_new, table.n)])
        undo = table.save(candidates)
        try:
            before = table.view(candidates)
            applied, window_writes = self._apply(table, events, rows)
            changed = np.union1d(np.unique(rows[applied]), np.arange(first_new, table.n))
            return _Staged(table, events, applied, window_writes, changed,
                           before.take(np.searchsorted(candidates, changed)), table.view(changed), undo)
        except Exception:
            table.restore(undo)
            raise

    def _count(self, staged: Mapping[int, "_Staged"]) -> tuple[_Counts, list[Callable[[], None]]]:
        """The applied predictions and shadow runs of every staged partition, counted at once;
        returns the counter changes and what moves the worker's metrics by them."""
        applied: dict[EventKind, list[tuple[int, UnitTable, _Events]]] = {}
        for partition, s in staged.items():
            offset = 0
            for e in s.events:
                mine = s.applied[offset:offset + len(e)]
                offset += len(e)
                if e.kind in (EventKind.PREDICTION, EventKind.SHADOW) and mine.any():
                    applied.setdefault(e.kind, []).append((partition, s.table, e.take(np.flatnonzero(mine))))
        changes: _Counts = {}
        observations = []
        if EventKind.PREDICTION in applied:
            observations.append(self._count_predictions(applied[EventKind.PREDICTION], changes))
        if EventKind.SHADOW in applied:
            _count_shadow_runs(applied[EventKind.SHADOW], changes)
        return changes, observations

    def _apply(self, table: UnitTable, events: list[_Events], rows: np.ndarray) -> tuple[np.ndarray, tuple]:
        """Apply events in rounds (see streams/units.py); returns which events were applied (not
        re-sends) and the (row, hash) appended to the id windows, in order."""
        kinds = np.concatenate([np.full(len(e), _CODES[e.kind], dtype=np.int8) for e in events])
        hashes = np.concatenate([e.decoded.hashes["event_id"][e.picked] ^ _KIND_SALT[e.kind] for e in events])
        hashes[hashes == 0] = 1  # 0 marks an empty slot of the id window
        times = np.concatenate([e.decoded.numbers["event_time"][e.picked] for e in events])
        variants = np.concatenate([e.variants for e in events])
        columns = np.concatenate([e.metrics for e in events])
        values = np.concatenate([e.decoded.numbers["value"][e.picked] if e.kind is EventKind.OUTCOME
                                 else np.zeros(len(e)) for e in events])
        outcomes = next((e for e in events if e.kind is EventKind.OUTCOME), None)
        metric_names = outcomes.decoded.strings["metric"].values if outcomes is not None else []
        names = np.concatenate([e.decoded.strings["metric"].codes[e.picked] if e is outcomes
                                else np.full(len(e), -1, dtype=np.int64) for e in events])
        rules = self._rules(table)
        # rank[i]: how many events of row rows[i] come before event i in the batch.
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_rows)) + 1]
        rank = np.empty(rows.size, dtype=np.int64)
        rank[order] = np.arange(rows.size) - np.repeat(starts, np.diff(np.r_[starts, rows.size]))
        by_rank = np.argsort(rank, kind="stable")
        bounds = np.searchsorted(rank[by_rank], np.arange(int(rank.max()) + 2))
        applied = np.zeros(rows.size, dtype=bool)
        written_rows, written_hashes = [], []
        for r in range(bounds.size - 1):
            at = by_rank[bounds[r]:bounds[r + 1]]
            first = table.apply_round(Round(rows[at], kinds[at], hashes[at], times[at], variants[at], columns[at],
                                            values[at], names[at], metric_names), rules)
            applied[at] = first
            written_rows.append(rows[at][first])
            written_hashes.append(hashes[at][first])
        return applied, (np.concatenate(written_rows), np.concatenate(written_hashes))

    def _rules(self, table: UnitTable) -> Rules:
        windows, tracked = [], []
        for experiment_id in table.experiments:
            config = self.experiments.get(experiment_id)
            windows.append(int(config.attribution_window_s * 1000) if config is not None else 0)
            tracked.append(outcome_names(config.metrics) if config is not None else frozenset())
        return Rules(np.array(windows, dtype=np.int64), tracked)

    def _fold_each(self, partition: int, events: list[_Events], first_new: int, duplicates: Counter,
                   result: BatchResult) -> tuple[list[bytes], dict[str, list]]:
        """The slow path after a batch raised: fold the events one at a time; an event that raises
        leaves the table as it was and becomes a dead letter (``processing_error``), so that one
        poison event cannot stop the worker. The changes are written as one transaction."""
        table = self.partitions[partition].table
        rows: list[np.ndarray] = []
        counters: dict[str, dict[CounterKey, float]] = {}
        for e in events:
            for i in range(len(e)):
                one = e.take(np.array([i]))
                try:
                    _, changes = self._fold({partition: [one]}, {partition: table.n}, duplicates)[partition]
                except Exception as exc:
                    message = e.messages[int(one.picked[0])]
                    letter = DeadLetter(DeadLetterReason.PROCESSING_ERROR, f"{type(exc).__name__}: {exc}"[:200])
                    result.dead.append((message, letter))
                    metrics.DEADLETTERS.labels(self.short_names[message.topic], letter.reason.value).inc()
                    continue
                rows.append(one.rows)
                for experiment_id, changed in changes.items():
                    mine = counters.setdefault(experiment_id, {})
                    for ns, name, key, by in changed:
                        mine[(ns, name, key)] = mine.get((ns, name, key), 0) + by
        changed = np.union1d(np.unique(np.concatenate(rows)) if rows else np.zeros(0, dtype=np.int64),
                             np.arange(first_new, table.n))
        # Every window write of these rows is in their full id windows: a snapshot of the rows' windows.
        chunks = table.delta_chunks(changed, first_new, None)
        return chunks, {e: list(_counter_list(c)) for e, c in counters.items()}

    def _count_predictions(self, parts: list[tuple[int, UnitTable, _Events]], changes: _Counts) -> Callable[[], None]:
        """Count applied predictions, (partition, its table, its events), into their partials'
        counters; returns what moves the worker's metrics by them (called once the batch is
        folded for good)."""
        d, at, part, experiments, variants = _joined(parts)
        status = d.strings["status"]
        latency = d.numbers["latency_ms"][at]
        zero = latency == 0
        with np.errstate(divide="ignore"):
            bucket = np.where(zero, 0, np.ceil(np.log(latency) / _LOG_GAMMA)).astype(np.int64)

        def add(i: int, x: int, v: int, key: str, value: str, n: int) -> None:
            partition, table, _ = parts[i]
            _add(changes, partition, table.experiments[x], (key, table.variants[v], value), n)

        by_status = _count_by(part, experiments, variants, status.codes[at])
        for (i, x, v, s), n in by_status:
            add(i, x, v, "status", status.values[s], n)
        for (i, x, v, z, k), n in _count_by(part, experiments, variants, zero.astype(np.int64), bucket):
            add(i, x, v, "latency", "z" if z else str(k), n)
        scored = np.flatnonzero(~d.nulls["score"][at])
        if scored.size:
            score = d.numbers["score"][at][scored]
            bins = np.minimum(SCORE_BINS - 1, (np.clip(score, 0.0, 1.0) * SCORE_BINS).astype(np.int64))
            hours = d.numbers["event_time"][at][scored] // HOUR_MS
            for (i, x, v, h, b), n in _count_by(part[scored], experiments[scored], variants[scored], hours, bins):
                add(i, x, v, "score", f"{h}:{b}", n)
        # Label values are bounded by the config: a router's typo must not create series.
        labels: dict[tuple[int, int, int], tuple[str, str]] = {}

        def label(i: int, x: int, v: int) -> tuple[str, str]:
            if (i, x, v) not in labels:
                table = parts[i][1]
                experiment_id, name = table.experiments[x], table.variants[v]
                config = self.experiments.get(experiment_id)
                labels[(i, x, v)] = experiment_id, name if config is not None and name in config.weights else "unknown"
            return labels[(i, x, v)]

        statuses = [(label(i, x, v), status.values[s], n) for (i, x, v, s), n in by_status]
        seconds = latency / 1000
        bucket_index = np.searchsorted(np.asarray(metrics.PREDICTION_LATENCY.bounds), seconds, side="left")
        buckets: dict[tuple[str, str], dict[int, int]] = {}
        for (i, x, v, b), n in _count_by(part, experiments, variants, bucket_index):
            histogram = buckets.setdefault(label(i, x, v), {})
            histogram[b] = histogram.get(b, 0) + n
        seconds_by_label: dict[tuple[str, str], float] = {}
        for (i, x, v), total_s in _count_by(part, experiments, variants, weights=seconds):
            seconds_by_label[label(i, x, v)] = seconds_by_label.get(label(i, x, v), 0.0) + total_s

        def observe() -> None:
            for (experiment_id, name), status_name, n in statuses:
                metrics.PREDICTIONS.labels(experiment_id, name, status_name).inc(n)
            for key, total_s in seconds_by_label.items():
                metrics.PREDICTION_LATENCY.add(key, buckets.get(key, {}), total_s)
        return observe


def _tracked_columns(table: UnitTable, configs: list, status: np.ndarray, metric: StringColumn,
                     experiments: np.ndarray, metrics_: np.ndarray) -> np.ndarray:
    """Per outcome, the totals column of its metric when its experiment tracks it, else -1."""
    lookup = np.full((len(configs), max(1, len(metric.values))), -1, dtype=np.int64)
    for x, config in enumerate(configs):
        if status[x] != _ACTIVE:
            continue
        tracked = outcome_names(config.metrics)
        for m, name in enumerate(metric.values):
            if name in tracked:
                lookup[x, m] = table.metric_column(name)
    return lookup[experiments, metrics_]


def _count_shadow_runs(parts: list[tuple[int, UnitTable, _Events]], changes: _Counts) -> None:
    """Count applied shadow runs, (partition, its table, its events), into their partials'
    counters: what the shadow_disagreement guardrail reads (runs, challenger statuses,
    comparisons, disagreements). Score and latency differences are the offline report's
    (shadow_pairs in ClickHouse)."""
    d, at, part, experiments, _ = _joined(parts)
    model, version, status = d.strings["challenger_model"], d.strings["challenger_version"], d.strings["challenger_status"]
    challenger: dict[tuple[int, int], str] = {}

    def add(i: int, x: int, m: int, v: int, key: str, n: int) -> None:
        partition, table, _ = parts[i]
        _add(changes, partition, table.experiments[x], ("shadow", challenger[(m, v)], key), n)

    for (i, x, m, v), n in _count_by(part, experiments, model.codes[at], version.codes[at]):
        challenger.setdefault((m, v), f"{model.values[m]}:{version.values[v]}")
        add(i, x, m, v, "runs", n)
    for (i, x, m, v, s), n in _count_by(part, experiments, model.codes[at], version.codes[at], status.codes[at]):
        add(i, x, m, v, status.values[s], n)
    ok = np.asarray([value == "ok" for value in status.values] or [False])[status.codes[at]]
    champion_label, challenger_label = _same_codes(d.strings["champion_label"], d.strings["challenger_label"], at)
    labelled = ok & (champion_label >= 0) & (challenger_label >= 0)
    scored = ok & ~labelled & ~d.nulls["champion_score"][at] & ~d.nulls["challenger_score"][at]
    compared = labelled | scored
    disagree = np.where(labelled, champion_label != challenger_label,
                        (d.numbers["champion_score"][at] >= SCORE_DECISION_THRESHOLD)
                        != (d.numbers["challenger_score"][at] >= SCORE_DECISION_THRESHOLD))
    picked = np.flatnonzero(compared)
    for (i, x, m, v, dis), n in _count_by(part[picked], experiments[picked], model.codes[at][picked],
                                          version.codes[at][picked], disagree[picked].astype(np.int64)):
        add(i, x, m, v, "compared", n)
        add(i, x, m, v, "disagree", n if dis else 0)


def _joined(parts: list[tuple[int, UnitTable, _Events]]) -> tuple[DecodedBatch, np.ndarray, np.ndarray, np.ndarray,
                                                                   np.ndarray]:
    """One kind's events of several partitions as one: their decoded batch (a batch decodes each
    kind once, see Stage1._route), their indices into it, the index of each one's part, and each
    one's experiment and variant codes in its part's table."""
    decoded = parts[0][2].decoded
    if any(e.decoded is not decoded for _, _, e in parts):
        raise ValueError("events of one kind from different decoded batches cannot be counted together")
    at = np.concatenate([e.picked for _, _, e in parts])
    part = np.repeat(np.arange(len(parts)), [len(e) for _, _, e in parts])
    experiments = np.concatenate([table.columns["experiment"][e.rows] for _, table, e in parts])
    variants = np.concatenate([e.variants for _, _, e in parts])
    return decoded, at, part, experiments, variants


def _same_codes(a: StringColumn, b: StringColumn, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two string columns' codes (at ``at``) in one code space, so equal strings get equal codes."""
    space = {value: i for i, value in enumerate(dict.fromkeys([*a.values, *b.values]))}
    map_a = np.array([space[v] for v in a.values] + [-1], dtype=np.int64)
    map_b = np.array([space[v] for v in b.values] + [-1], dtype=np.int64)
    return map_a[a.codes[at]], map_b[b.codes[at]]


def _count_by(*columns: np.ndarray, weights: np.ndarray | None = None) -> list[tuple[tuple[int, ...], Any]]:
    """The distinct combinations of the columns' (integer) values and how often each occurs (or,
    given ``weights``, the sum of the weights of its rows)."""
    if columns[0].size == 0:
        return []
    # One int64 key per row in mixed radix (one np.unique of a vector, not of rows: ~10x faster).
    lows = [int(c.min()) for c in columns]
    spans = [int(c.max()) - low + 1 for c, low in zip(columns, lows)]
    if math.prod(spans) >= 2**62:
        distinct, inverse, counts = np.unique(np.stack(columns, axis=1).astype(np.int64), axis=0, return_inverse=True,
                                              return_counts=True)
        keys = [tuple(row) for row in distinct.tolist()]
    else:
        key = np.zeros(columns[0].size, dtype=np.int64)
        for c, low, span in zip(columns, lows, spans):
            key = key * span + (c.astype(np.int64) - low)
        if weights is None:
            distinct, counts = np.unique(key, return_counts=True)
        else:
            distinct, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
        digits = []
        for low, span in zip(reversed(lows), reversed(spans)):
            distinct, digit = np.divmod(distinct, span)
            digits.append((digit + low).tolist())
        keys = list(zip(*reversed(digits)))
    if weights is not None:
        counts = np.bincount(inverse.reshape(-1), weights=weights, minlength=len(keys))
    return list(zip(keys, counts.tolist()))


def _add(changes: _Counts, partition: int, experiment_id: str, key: CounterKey, by: int) -> None:
    mine = changes.setdefault(partition, {}).setdefault(experiment_id, {})
    mine[key] = mine.get(key, 0) + by


def _counter_list(counters: dict[CounterKey, float]) -> Iterable[list]:
    return ([ns, name, key, value] for (ns, name, key), value in counters.items())


def _partition_chunk(state: PartitionState, counters: dict[str, list]) -> bytes:
    return pack({"kind": "partition", "positions": state.positions, "counters": counters}, {})


def _move(partial: Partial, table: UnitTable, config: Any, before: RowsView, after: RowsView) -> None:
    """Move an experiment's partial by what its rows changed from ``before`` to ``after``."""
    if after.rows.size == 0:
        return
    partial.watermark_ms = max(partial.watermark_ms, int(after.last_ms.max()))
    newly = (before.variant == NOT_EXPOSED) & (after.variant != NOT_EXPOSED)
    if newly.any():
        first = int(after.exposed_ms[newly].min())
        partial.first_exposure_ms = first if partial.first_exposure_ms is None else min(partial.first_exposure_ms, first)
    fates = (after.fates - before.fates).sum(axis=0)
    for fate, by in zip(FATES, fates.tolist()):
        if by:
            total = partial.fates.get(fate.value, 0) + by
            if total:
                partial.fates[fate.value] = total
            else:
                partial.fates.pop(fate.value, None)
    partial.inconsistencies += int((after.inconsistencies - before.inconsistencies).sum())
    exposed = np.flatnonzero(after.variant != NOT_EXPOSED)
    if exposed.size == 0:
        return
    was_exposed = before.variant[exposed] != NOT_EXPOSED
    variants = after.variant[exposed]
    column = table.metric_column
    moved = {metric.name: terms(metric, column, after.totals[exposed])
             - terms(metric, column, before.totals[exposed]) * was_exposed[:, None] for metric in config.metrics}
    for v in np.unique(variants).tolist():
        mine = variants == v
        arm = partial.variants.setdefault(table.variants[v], VariantPartial())
        arm.units += int(np.count_nonzero(mine & ~was_exposed))
        for metric in config.metrics:
            change = moved[metric.name][mine].sum(axis=0)
            sums = arm.sums.setdefault(metric.name, [0.0] * change.size)
            for i, by in enumerate(change.tolist()):
                sums[i] += by


def expired(configs: dict[str, Any], now_ms: int, retention_s: float) -> set[str]:
    """Experiments stopped more than ``retention_s`` ago: their unit state can go."""
    return {e for e, c in configs.items()
            if c.status.value == "stopped" and c.updated_time_ms + retention_s * 1000 <= now_ms}
