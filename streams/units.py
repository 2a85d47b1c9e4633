"""Unit state: a unit's exposure to an experiment and its attributed metric totals.

One :class:`UnitState` per (experiment, unit) lives with the unit's partition. The rules,
all in event time:

- Exposure: the first assignment processed for (experiment, unit) fixes the unit's variant
  and exposure time. A later assignment naming another variant, and any prediction naming
  another variant than the exposure (whether it came before or after it), count as
  assignment inconsistencies; they do not move the unit.
- Attribution: an outcome at time t counts for a unit exposed at t0 when
  t0 <= t < t0 + attribution window. One before the exposure counts as ``before_exposure``,
  one after the window as ``after_window``; neither moves a statistic.
- An outcome for a unit whose exposure has not been seen yet waits in the unit's state
  (``awaiting_exposure``) and is judged by the rules above once the exposure arrives.
- Duplicates, two ways, both stored with the totals (one record, written and recovered
  together):
  - replays: the state keeps, per input topic, the offset of the newest event it applied.
    A unit lives in one partition of each co-partitioned topic, read in offset order, so
    an event at or below that offset was applied before (a redelivery after a crash or a
    hand-over), whatever the number of events in between;
  - re-sends: the state keeps an 8-byte hash of the ids of its 64 most recent events, so
    an event a producer sent twice (two offsets, one event_id) is recognised if its twin
    is among them. Kept as a hash because the dedup window was most of the state's bytes
    (bench/PROFILE.md); two distinct ids collide with probability ~64/2^64 per event.
  Offsets restart at 0 when a topic is deleted and created again: an input topic must
  not be recreated under a running deployment's prefix (its unit changelog would then
  skip the new events).

- Guardrail counts live in the unit state too, as sparse counters (prediction status,
  latency sketch buckets, prediction score bins per event-time hour, shadow comparisons per
  challenger), so that they are exactly as idempotent as the metric totals. They are one
  flat dict keyed by (namespace, variant or challenger, key).

A unit's *contribution* to the experiment statistics is a pure function of its state; the
stage-1 fold adds (contribution after a batch - contribution before) to the partials, once
per touched unit per batch. Counters are linear, so the fold does not take them away and
add them back (that was the fold's largest cost after decoding): each counter change is
also written to a *journal*, and the journal is what the partial receives.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass, field
from enum import Enum

from analysis.sketch import QuantileSketch

RECENT_EVENT_IDS = 64
_ID_BYTES = 8
MAX_AWAITING_OUTCOMES = 64
LATENCY_SKETCH = QuantileSketch(relative_accuracy=0.02)
SCORE_BINS = 20
HOUR_MS = 3_600_000
# Shadow runs are compared on labels when both models give one, else on scores, which
# disagree when they fall on different sides of this decision threshold.
SCORE_DECISION_THRESHOLD = 0.5
# The input topics in a fixed order, for the per-topic offsets (see streams.stage1).
TOPIC_SLOTS = 4

CounterKey = tuple[str, str, str]  # (namespace, variant or challenger, key)


def score_bin(score: float) -> int:
    """The bin of a score in [0, 1]; scores outside count in the end bins (clamped first:
    a huge finite score times the bin count would overflow)."""
    return min(SCORE_BINS - 1, int(min(1.0, max(0.0, score)) * SCORE_BINS))


def id_hash(identity: str) -> bytes:
    return hashlib.blake2b(identity.encode(), digest_size=_ID_BYTES).digest()


class OutcomeFate(str, Enum):
    ATTRIBUTED = "attributed"
    BEFORE_EXPOSURE = "before_exposure"
    AFTER_WINDOW = "after_window"
    AWAITING_EXPOSURE = "awaiting_exposure"
    DROPPED_AWAITING = "dropped_awaiting"


@dataclass(slots=True)  # one per unit in memory: no per-instance __dict__
class UnitState:
    """Mutable while a batch is folded in (on a :meth:`copy`); stored as bytes (:meth:`to_bytes`)."""

    variant: str | None = None
    exposed_ms: int | None = None
    totals: dict[str, float] = field(default_factory=dict)
    awaiting: list[tuple[str, int, float]] = field(default_factory=list)
    fates: dict[str, int] = field(default_factory=dict)
    inconsistencies: int = 0
    recent_ids: bytearray = field(default_factory=bytearray)
    last_ms: int = 0
    counters: dict[CounterKey, float] = field(default_factory=dict)
    offsets: list[int] = field(default_factory=lambda: [-1] * TOPIC_SLOTS)
    # Predictions per variant they named, kept apart from the counters so that
    # other_variant_predictions does not scan them.
    predictions: dict[str, int] = field(default_factory=dict)
    # Where counter changes are also recorded while a batch is folded (see the module doc).
    journal: dict[CounterKey, float] | None = field(default=None, compare=False, repr=False)

    def copy(self) -> "UnitState":
        # Slot by slot, past the dataclass __init__ (the copy is made once per touched unit per batch).
        other = object.__new__(UnitState)
        other.variant, other.exposed_ms, other.inconsistencies, other.last_ms = \
            self.variant, self.exposed_ms, self.inconsistencies, self.last_ms
        other.totals, other.awaiting, other.fates, other.recent_ids = \
            self.totals.copy(), self.awaiting.copy(), self.fates.copy(), self.recent_ids.copy()
        other.counters, other.offsets, other.predictions, other.journal = \
            self.counters.copy(), self.offsets.copy(), self.predictions.copy(), None
        return other

    def contribution_copy(self) -> "UnitState":
        """A copy of what the unit's contribution to its partial depends on (variant, exposure,
        totals, fates, inconsistencies, predictions, last event time): the "before" of
        :meth:`Partial.move_unit`. Counters, dedup state and offsets are left out: counters
        move the partial by the journal, and copying them was most of a full copy's cost."""
        other = object.__new__(UnitState)
        other.variant, other.exposed_ms, other.inconsistencies, other.last_ms = \
            self.variant, self.exposed_ms, self.inconsistencies, self.last_ms
        other.totals, other.fates, other.predictions = self.totals.copy(), self.fates.copy(), self.predictions.copy()
        other.awaiting, other.recent_ids, other.counters, other.offsets, other.journal = [], bytearray(), {}, [], None
        return other

    def count(self, key: CounterKey, by: float = 1) -> None:
        counters = self.counters
        counters[key] = counters.get(key, 0) + by
        if self.journal is not None:
            self.journal[key] = self.journal.get(key, 0) + by

    def applied_before(self, slot: int, offset: int) -> bool:
        """True for a redelivered message (at or below the newest offset applied from its
        topic); else remembers its offset."""
        if offset <= self.offsets[slot]:
            return True
        self.offsets[slot] = offset
        return False

    def first_time(self, identity: str, time_ms: int) -> bool:
        """True the first time an event identity is seen among the recent ones (and
        remembers it and its time)."""
        digest = id_hash(identity)
        ids = self.recent_ids
        at = ids.find(digest)
        while at != -1:
            if at % _ID_BYTES == 0:
                return False
            at = ids.find(digest, at + 1)
        self.last_ms = max(self.last_ms, time_ms)
        ids += digest
        if len(ids) > RECENT_EVENT_IDS * _ID_BYTES:
            del ids[:_ID_BYTES]
        return True

    def expose(self, variant: str, time_ms: int, window_ms: int, metrics: frozenset[str]) -> None:
        if self.variant is not None:
            if variant != self.variant:
                self.inconsistencies += 1
            return
        self.variant, self.exposed_ms = variant, time_ms
        awaiting, self.awaiting = self.awaiting, []
        self._count(OutcomeFate.AWAITING_EXPOSURE, -len(awaiting))
        for metric, t, value in awaiting:
            self.outcome(metric, t, value, window_ms, metrics)

    def predicted(self, prediction: dict) -> None:
        # Predictions naming another variant than the exposure are counted from
        # self.predictions (see other_variant_predictions), whichever of the two arrived first.
        variant = prediction["variant"]
        self.predictions[variant] = self.predictions.get(variant, 0) + 1
        self.count(("status", variant, prediction["status"]))
        key = LATENCY_SKETCH.key(prediction["latency_ms"])
        self.count(("latency", variant, "z" if key is None else str(key)))
        if prediction["score"] is not None:
            hour = prediction["event_time"] // HOUR_MS
            self.count(("score", variant, f"{hour}:{score_bin(prediction['score'])}"))

    def shadowed(self, run: dict) -> None:
        challenger = f"{run['challenger_model']}:{run['challenger_version']}"
        self.count(("shadow", challenger, "runs"))
        self.count(("shadow", challenger, run["challenger_status"]))
        if run["challenger_status"] != "ok":
            return
        # What the shadow_disagreement guardrail reads; score and latency differences are the
        # offline report's (shadow_pairs in ClickHouse), not counted per event here.
        champion, challenger_score = run["champion_score"], run["challenger_score"]
        if run["champion_label"] is not None and run["challenger_label"] is not None:
            self.count(("shadow", challenger, "compared"))
            self.count(("shadow", challenger, "disagree"), int(run["champion_label"] != run["challenger_label"]))
        elif champion is not None and challenger_score is not None:
            self.count(("shadow", challenger, "compared"))
            self.count(("shadow", challenger, "disagree"),
                       int((champion >= SCORE_DECISION_THRESHOLD) != (challenger_score >= SCORE_DECISION_THRESHOLD)))

    def outcome(self, metric: str, time_ms: int, value: float, window_ms: int, metrics: frozenset[str]) -> None:
        if self.exposed_ms is None:
            if len(self.awaiting) >= MAX_AWAITING_OUTCOMES:
                self._count(OutcomeFate.DROPPED_AWAITING, 1)
                return
            self.awaiting.append((metric, time_ms, value))
            self._count(OutcomeFate.AWAITING_EXPOSURE, 1)
        elif time_ms < self.exposed_ms:
            self._count(OutcomeFate.BEFORE_EXPOSURE, 1)
        elif time_ms >= self.exposed_ms + window_ms:
            self._count(OutcomeFate.AFTER_WINDOW, 1)
        else:
            self._count(OutcomeFate.ATTRIBUTED, 1)
            if metric in metrics:
                self.totals[metric] = self.totals.get(metric, 0.0) + value

    def _count(self, fate: OutcomeFate, by: int) -> None:
        if by:
            self.fates[fate.value] = self.fates.get(fate.value, 0) + by

    def other_variant_predictions(self) -> int:
        """Predictions that name another variant than the unit's exposure (0 while unexposed).
        A prediction and its unit's assignment travel on different topics, and Kafka orders
        nothing across topics, so this must not depend on which came first."""
        if self.variant is None or not self.predictions:
            return 0
        return sum(self.predictions.values()) - self.predictions.get(self.variant, 0)

    def to_bytes(self) -> bytes:
        """The stored form: a pickle (protocol 5) of a tuple of plain values. Pickle, not JSON:
        the fold encodes every touched unit and decodes it on its next touch, and JSON took
        ~7.5 us each way against ~2 and ~3.5 (bench/PROFILE.md); the protocol stays readable
        by later Pythons. :meth:`from_bytes` refuses any record that names a class or function."""
        return pickle.dumps((self.variant, self.exposed_ms, self.totals, self.awaiting, self.fates, self.inconsistencies,
                             bytes(self.recent_ids), self.last_ms, self.counters, self.offsets, self.predictions),
                            protocol=5)

    @classmethod
    def from_bytes(cls, data: bytes) -> "UnitState":
        v, t, m, a, f, x, ids, last, counters, offsets, predictions = _PlainValues(io.BytesIO(data)).load()
        return cls(v, t, m, a, f, x, bytearray(ids), last, counters, offsets, predictions)


class _PlainValues(pickle.Unpickler):
    """Unpickles plain values only (str, bytes, numbers, None, tuples, lists, dicts): whoever can
    write to the changelog topic must not be able to run code in a worker."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"a unit state record may not name {module}.{name}")
