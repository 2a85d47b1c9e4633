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
- Duplicates: the state keeps the ids of its most recent events, so an event replayed after
  a crash, or re-sent by a producer, is recognised and changes nothing. Because the ids and
  the totals are one record, they are written (and recovered) together.

- Guardrail counts live in the unit state too, as sparse counters (prediction status,
  latency sketch buckets, prediction score bins per event-time hour, shadow comparisons per
  challenger), so that they are exactly as idempotent as the metric totals.

A unit's *contribution* to the experiment statistics is a pure function of its state; the
stage-1 agent adds (contribution after a batch - contribution before) to the partials, once
per touched unit per batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from analysis.sketch import QuantileSketch

RECENT_EVENT_IDS = 256
MAX_AWAITING_OUTCOMES = 64
LATENCY_SKETCH = QuantileSketch(relative_accuracy=0.02)
SCORE_BINS = 20
HOUR_MS = 3_600_000
# Shadow runs are compared on labels when both models give one, else on scores, which
# disagree when they fall on different sides of this decision threshold.
SCORE_DECISION_THRESHOLD = 0.5


def counter_key(namespace: str, name: str) -> str:
    """Counters are grouped as "<namespace>:<variant or challenger>"."""
    return f"{namespace}:{name}"


def score_bin(score: float) -> int:
    """The bin of a score in [0, 1]; scores outside count in the end bins (clamped first:
    a huge finite score times the bin count would overflow)."""
    return min(SCORE_BINS - 1, int(min(1.0, max(0.0, score)) * SCORE_BINS))


class OutcomeFate(str, Enum):
    ATTRIBUTED = "attributed"
    BEFORE_EXPOSURE = "before_exposure"
    AFTER_WINDOW = "after_window"
    AWAITING_EXPOSURE = "awaiting_exposure"
    DROPPED_AWAITING = "dropped_awaiting"


@dataclass
class UnitState:
    """Mutable while a batch is folded in; stored as a plain dict (see ``to_dict``)."""

    variant: str | None = None
    exposed_ms: int | None = None
    totals: dict[str, float] = field(default_factory=dict)
    awaiting: list[tuple[str, int, float]] = field(default_factory=list)
    fates: dict[str, int] = field(default_factory=dict)
    inconsistencies: int = 0
    recent_ids: list[str] = field(default_factory=list)
    last_ms: int = 0
    counters: dict[str, dict[str, float]] = field(default_factory=dict)

    def count(self, group: str, key: str, by: float = 1) -> None:
        bucket = self.counters.setdefault(group, {})
        bucket[key] = bucket.get(key, 0) + by

    def first_time(self, identity: str, time_ms: int) -> bool:
        """True the first time an event identity is seen (and remembers it and its time)."""
        if identity in self.recent_ids:
            return False
        self.last_ms = max(self.last_ms, time_ms)
        self.recent_ids.append(identity)
        if len(self.recent_ids) > RECENT_EVENT_IDS:
            del self.recent_ids[0]
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
        # Predictions naming another variant than the exposure are counted from these
        # counters (see other_variant_predictions), whichever of the two arrived first.
        variant = prediction["variant"]
        self.count(counter_key("status", variant), prediction["status"])
        key = LATENCY_SKETCH.key(prediction["latency_ms"])
        self.count(counter_key("latency", variant), "z" if key is None else str(key))
        if prediction["score"] is not None:
            hour = prediction["event_time"] // HOUR_MS
            self.count(counter_key("score", variant), f"{hour}:{score_bin(prediction['score'])}")

    def shadowed(self, run: dict) -> None:
        group = counter_key("shadow", f"{run['challenger_model']}:{run['challenger_version']}")
        self.count(group, "runs")
        self.count(group, run["challenger_status"])
        if run["challenger_status"] != "ok":
            return
        if run["challenger_latency_ms"] is not None:
            self.count(group, "latency_diff_ms", run["challenger_latency_ms"] - run["champion_latency_ms"])
            self.count(group, "latency_compared")
        champion, challenger = run["champion_score"], run["challenger_score"]
        if run["champion_label"] is not None and run["challenger_label"] is not None:
            self.count(group, "compared")
            self.count(group, "disagree", int(run["champion_label"] != run["challenger_label"]))
        elif champion is not None and challenger is not None:
            self.count(group, "compared")
            self.count(group, "disagree", int((champion >= SCORE_DECISION_THRESHOLD) != (challenger >= SCORE_DECISION_THRESHOLD)))
            self.count(group, "abs_score_diff", abs(challenger - champion))
            self.count(group, f"champion_bin:{score_bin(champion)}")
            self.count(group, f"challenger_bin:{score_bin(challenger)}")

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
        if self.variant is None:
            return 0
        own = counter_key("status", self.variant)
        return int(sum(sum(counts.values()) for group, counts in self.counters.items()
                       if group.startswith("status:") and group != own))

    def to_dict(self) -> dict:
        return {"v": self.variant, "t": self.exposed_ms, "m": self.totals, "a": self.awaiting,
                "f": self.fates, "x": self.inconsistencies, "r": self.recent_ids, "l": self.last_ms, "c": self.counters}

    @classmethod
    def from_dict(cls, d: dict) -> "UnitState":
        return cls(d["v"], d["t"], dict(d["m"]), [tuple(a) for a in d["a"]], dict(d["f"]), d["x"], list(d["r"]), d["l"],
                   {group: dict(counts) for group, counts in d["c"].items()})
