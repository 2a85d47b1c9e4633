"""Stage 1, per partition: decode, dead-letter, fold events into unit state and partials.

Input topics are keyed by unit_id and co-partitioned, so a unit's exposure and its later
outcomes meet here, in one partition of one worker. A batch is folded in one pass:

1. decode and validate every message; bad ones become dead letters, and so do events for
   an experiment no worker knows (after one refresh of the experiment catalogue);
2. group the valid events by unit state key (partition, experiment, unit), in order;
3. for each touched unit: decode its stored state, apply its events to a copy (redeliveries
   recognised by offset, re-sends by event id), then move the partition's partial by the
   difference: the unit's contribution before and after, and the journal of its counter
   changes;
4. hand back each changed unit state once, encoded, to be written to the changelogged table.

Unit states are held in memory as their stored bytes (:meth:`UnitState.to_bytes`), the
record the changelog holds, not as objects: a few hundred thousand states of dicts and lists
made each of Python's full garbage collections take 0.15-0.45 s, every 1.5-3 s under load
(a gc callback in the worker, bench/PROFILE.md), and a stalled event loop is a late
decision. Bytes are not tracked by the collector and take less memory (make bench: 3.2 KB
of RSS per unit state, 5.2 KB as objects); decoding a touched unit costs ~3.5 us.

Nothing here does I/O: the Faust agent in streams/worker.py does the reading and writing.
"""
from __future__ import annotations

import logging
from collections import Counter, defaultdict
from operator import attrgetter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from streams import metrics
from streams.codec import Codec, DeadLetter, DeadLetterReason, EventKind
from streams.partials import Partial, outcome_names
from streams.settings import Settings
from streams.topics import INPUT_TOPICS, TopicError, input_topic_names
from streams.units import UnitState

log = logging.getLogger("abstream.stage1")
KEY_SEPARATOR = "\x1f"
# Events of experiments in these states are counted and dropped (str values: the config's
# status is a str enum, and Stage1 takes any config object).
_INACTIVE = frozenset({"draft", "stopped"})
_topic_of, _partition_of, _offset_of = attrgetter("topic"), attrgetter("partition"), attrgetter("offset")
_one_more = (1).__add__
_ASSIGNMENT, _PREDICTION, _OUTCOME = EventKind.ASSIGNMENT, EventKind.PREDICTION, EventKind.OUTCOME
_KIND_TAG = {EventKind.ASSIGNMENT: "a", EventKind.PREDICTION: "p", EventKind.SHADOW: "s", EventKind.OUTCOME: "o"}


class InputMessage(Protocol):
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class ExperimentLookup(Protocol):
    def get(self, experiment_id: str) -> Any: ...
    def refresh(self, timeout_s: float = ...) -> None: ...


def unit_key(partition: int, experiment_id: str, unit_id: str) -> str:
    # The partition leads the key so that a partition's units can be found after a rebalance.
    return f"{partition}{KEY_SEPARATOR}{experiment_id}{KEY_SEPARATOR}{unit_id}"


def split_unit_key(key: str) -> tuple[int, str, str]:
    partition, experiment_id, unit_id = key.split(KEY_SEPARATOR, 2)
    return int(partition), experiment_id, unit_id


@dataclass
class BatchResult:
    dead: list[tuple[InputMessage, DeadLetter]] = field(default_factory=list)
    unit_writes: list[tuple[int, str, bytes]] = field(default_factory=list)  # (partition, key, stored form)
    ignored: dict[str, int] = field(default_factory=dict)


class Stage1:
    """The stage-1 fold of one worker: stored unit states are read through ``read_unit``."""

    def __init__(self, settings: Settings, codec: Codec, experiments: ExperimentLookup,
                 read_unit: Callable[[str], bytes | None], scan_units: Callable[[], Iterable[tuple[str, bytes]]]):
        self.codec = codec
        self.experiments = experiments
        self.read_unit = read_unit
        self.scan_units = scan_units
        self.kinds = input_topic_names(settings)
        self.short_names = {topic: topic[len(settings.topic_prefix):] for topic in self.kinds}
        # Each input topic's slot in UnitState.offsets.
        self.slots = {settings.topic(INPUT_TOPICS[kind]): i for i, kind in enumerate(EventKind)}
        # This batch's prediction latencies per (experiment, variant): (bucket -> count, sum);
        # an _apply records its own in _applied_latencies, kept only if it does not raise.
        self._latencies: dict[tuple[str, str], list] = defaultdict(lambda: [{}, 0.0])
        self._applied_latencies: list[tuple[str, float]] = []
        self._attributions: dict[str, tuple[Any, int, frozenset[str]]] = {}
        self.partials: dict[int, dict[str, Partial]] = {}
        self.dirty: set[tuple[int, str]] = set()
        # Next offset to process per (topic, partition): the input lag is measured against it.
        self.positions: dict[tuple[str, int], int] = {}
        # Experiments whose unit state was expired: events of stopped experiments never
        # create state again, so they need no second scan.
        self.expired: set[str] = set()

    def forget_partitions(self, partitions: Iterable[int]) -> None:
        """Drop partials of partitions this worker no longer owns (they are rebuilt from the
        unit table if the partition comes back)."""
        for partition in partitions:
            self.partials.pop(partition, None)
            self.dirty = {(p, e) for p, e in self.dirty if p != partition}

    def adopt(self, partition: int) -> None:
        """Rebuild a newly assigned partition's partials from its recovered unit states and
        mark them for publication: its last owner may have died after writing its units but
        before publishing their partial, and no new event may ever come to trigger it."""
        if partition not in self.partials:
            self.dirty |= {(partition, experiment_id) for experiment_id in self._partials_of(partition)}

    def _partials_of(self, partition: int) -> dict[str, Partial]:
        partials = self.partials.get(partition)
        if partials is None:
            # First batch of this partition since it was assigned: rebuild its partials
            # from the recovered unit states, so that they hold every unit, not the new ones.
            partials = self.partials[partition] = {}
            for key, stored in self.scan_units():
                p, experiment_id, _ = split_unit_key(key)
                config = self.experiments.get(experiment_id) if p == partition else None
                if config is not None:
                    partials.setdefault(experiment_id, Partial()).add_unit(UnitState.from_bytes(stored), config.metrics)
        return partials

    def process(self, messages: Sequence[InputMessage]) -> BatchResult:
        # Per-event work is kept to the decode and a dict append: at 10,000 events/s a worker
        # spends most of its core here, and a busy core is a late decision (bench/PROFILE.md).
        result = BatchResult()
        by_unit: dict[tuple[int, str, str], list[tuple[EventKind, dict, InputMessage]]] = {}
        refreshed = False
        kinds, decode, get_config = self.kinds, self.codec.decode, self.experiments.get
        for message in messages:
            kind = kinds[message.topic]
            decoded = decode(kind, message.value)
            if decoded.__class__ is dict:
                experiment_id = decoded["experiment_id"]
                config = get_config(experiment_id)
                if config is None and not refreshed:
                    refreshed = True
                    try:
                        self.experiments.refresh()
                    except TopicError as exc:
                        # The broker away: judge by the configs the catalogue holds. A config
                        # published in the last moments is then missed and its first events are
                        # dead letters, bytes kept; raising instead would stop the worker.
                        log.warning("the experiment catalogue could not be refreshed: %s", exc)
                    config = get_config(experiment_id)
                if config is None:
                    decoded = DeadLetter(DeadLetterReason.UNKNOWN_EXPERIMENT, f"experiment {experiment_id[:80]!r} is not defined")
                elif config.status in _INACTIVE:
                    topic, reason = self.short_names[message.topic], f"experiment_{config.status._value_}"
                    result.ignored[reason] = result.ignored.get(reason, 0) + 1
                    metrics.EVENTS_IGNORED.labels(topic, reason).inc()
                    continue
                else:
                    unit = (message.partition, experiment_id, decoded["unit_id"])
                    events = by_unit.get(unit)
                    if events is None:
                        by_unit[unit] = [(kind, decoded, message)]
                    else:
                        events.append((kind, decoded, message))
                    continue
            result.dead.append((message, decoded))
            metrics.DEADLETTERS.labels(self.short_names[message.topic], decoded.reason.value).inc()
        # Counted and positioned in C over the whole batch rather than per event in the loop above.
        topics, partitions = list(map(_topic_of, messages)), map(_partition_of, messages)
        self.positions.update(zip(zip(topics, partitions), map(_one_more, map(_offset_of, messages))))
        metrics.BATCH_EVENTS.observe(len(messages))
        for topic, count in Counter(topics).items():
            metrics.EVENTS_CONSUMED.labels(self.short_names[topic]).inc(count)

        predictions: dict[tuple[str, str, str], int] = defaultdict(int)
        for (partition, experiment_id, unit_id), events in by_unit.items():
            key = unit_key(partition, experiment_id, unit_id)
            config = get_config(experiment_id)
            partials = self._partials_of(partition)
            partial = partials.get(experiment_id)
            if partial is None:
                partial = partials[experiment_id] = Partial()
            stored_form = self.read_unit(key)
            if stored_form is None:
                before, state = None, UnitState()
            else:
                state = UnitState.from_bytes(stored_form)
                before = state.contribution_copy()
            journal: dict = {}
            state.journal = journal
            self._applied_latencies = []
            try:
                changed = self._apply(state, events, config)
                self._keep_latencies(experiment_id)
            except Exception:
                stored = None if stored_form is None else UnitState.from_bytes(stored_form)
                state, changed, journal = self._apply_each(stored, events, config, result)
            state.journal = None
            if changed:
                partial.move_unit(before, state, config.metrics)
                partial.add_counters(journal)
                result.unit_writes.append((partition, key, state.to_bytes()))
                self.dirty.add((partition, experiment_id))
                for (ns, variant, status), n in journal.items():
                    if ns == "status":
                        predictions[(experiment_id, variant, status)] += int(n)
        # Label values are bounded by the config: a router's typo must not create series.
        for (experiment_id, variant, status), n in predictions.items():
            config = get_config(experiment_id)
            metrics.PREDICTIONS.labels(experiment_id, variant if variant in config.weights else "unknown", status).inc(n)
        for (experiment_id, variant), (counts, total) in self._latencies.items():
            config = get_config(experiment_id)
            metrics.PREDICTION_LATENCY.add((experiment_id, variant if variant in config.weights else "unknown"), counts, total)
        self._latencies.clear()
        return result

    def _apply_each(self, stored: UnitState | None, events: list, config: Any,
                    result: BatchResult) -> tuple[UnitState, bool, dict]:
        """The slow path after an event raised: apply the unit's events one at a time from its
        stored state; an event that raises leaves the state as it was before it and becomes a
        dead letter (``processing_error``), so that one poison event cannot stop the worker."""
        state = UnitState() if stored is None else stored  # decoded for this call: no copy needed
        changed, journal = False, {}
        for event in events:
            before, state.journal = state.copy(), {}
            self._applied_latencies = []
            try:
                changed |= self._apply(state, [event], config)
                self._keep_latencies(event[1]["experiment_id"])
            except Exception as exc:
                state = before
                kind, _, message = event
                result.dead.append((message, DeadLetter(DeadLetterReason.PROCESSING_ERROR, f"{type(exc).__name__}: {exc}"[:200])))
                metrics.DEADLETTERS.labels(self.short_names[message.topic], DeadLetterReason.PROCESSING_ERROR.value).inc()
            else:
                for counter, by in state.journal.items():
                    journal[counter] = journal.get(counter, 0) + by
        return state, changed, journal

    def _apply(self, state: UnitState, events: list, config: Any) -> bool:
        window_ms, tracked = self._attribution(config)
        changed = False
        for kind, event, message in events:
            if state.applied_before(self.slots[message.topic], message.offset) \
                    or not state.first_time(_KIND_TAG[kind] + event["event_id"], event["event_time"]):
                metrics.EVENTS_DUPLICATE.labels(INPUT_TOPICS[kind]).inc()
                continue
            changed = True
            if kind is _ASSIGNMENT:
                state.expose(event["variant"], event["event_time"], window_ms, tracked)
            elif kind is _PREDICTION:
                state.predicted(event)
                self._applied_latencies.append((event["variant"], event["latency_ms"] / 1000))
            elif kind is _OUTCOME:
                state.outcome(event["metric"], event["event_time"], event["value"], window_ms, tracked)
            else:
                state.shadowed(event)
        return changed

    def _attribution(self, config: Any) -> tuple[int, frozenset[str]]:
        """The config's attribution window (ms) and tracked outcomes, computed once per config
        object (outcome_names per touched unit was 7% of the fold in cProfile)."""
        cached = self._attributions.get(config.experiment_id)
        if cached is None or cached[0] is not config:
            cached = self._attributions[config.experiment_id] = (
                config, int(config.attribution_window_s * 1000), outcome_names(config.metrics))
        return cached[1], cached[2]

    def _keep_latencies(self, experiment_id: str) -> None:
        bucket = metrics.PREDICTION_LATENCY.bucket
        for variant, latency_s in self._applied_latencies:
            histogram = self._latencies[(experiment_id, variant)]
            index = bucket(latency_s)
            histogram[0][index] = histogram[0].get(index, 0) + 1
            histogram[1] += latency_s

    def expire(self, experiment_ids: set[str]) -> list[tuple[int, str]]:
        """Forget the unit states and partials of these experiments; returns the (partition,
        key) of every unit state to delete from the table."""
        experiment_ids = experiment_ids - self.expired
        if not experiment_ids:
            return []
        self.expired |= experiment_ids
        for partials in self.partials.values():
            for experiment_id in experiment_ids:
                partials.pop(experiment_id, None)
        return [(p, key) for key, _ in self.scan_units()
                for p, experiment_id, _ in [split_unit_key(key)] if experiment_id in experiment_ids]

    def take_dirty(self) -> list[tuple[int, str, Partial]]:
        """The partials changed since the last call, to be published."""
        dirty, self.dirty = self.dirty, set()
        return [(p, e, self.partials[p][e]) for p, e in sorted(dirty) if p in self.partials]



def expired(configs: dict[str, Any], now_ms: int, retention_s: float) -> set[str]:
    """Experiments stopped more than ``retention_s`` ago: their unit state can go."""
    return {e for e, c in configs.items()
            if c.status.value == "stopped" and c.updated_time_ms + retention_s * 1000 <= now_ms}
