"""Unit state: a unit's exposure to an experiment and its attributed metric totals.

One :class:`UnitState` per (experiment, unit) lives with the unit's partition. The rules,
all in event time:

- Exposure: the first assignment processed for (experiment, unit) fixes the unit's variant
  and exposure time. A later assignment or a prediction naming another variant counts as an
  assignment inconsistency; it does not move the unit.
- Attribution: an outcome at time t counts for a unit exposed at t0 when
  t0 <= t < t0 + attribution window. One before the exposure counts as ``before_exposure``,
  one after the window as ``after_window``; neither moves a statistic.
- An outcome for a unit whose exposure has not been seen yet waits in the unit's state
  (``awaiting_exposure``) and is judged by the rules above once the exposure arrives.
- Duplicates: the state keeps the ids of its most recent events, so an event replayed after
  a crash, or re-sent by a producer, is recognised and changes nothing. Because the ids and
  the totals are one record, they are written (and recovered) together.

A unit's *contribution* to the experiment statistics is a pure function of its state; the
stage-1 agent adds (contribution after a batch - contribution before) to the partials, once
per touched unit per batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

RECENT_EVENT_IDS = 256
MAX_AWAITING_OUTCOMES = 64


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

    def predicted(self, variant: str) -> None:
        if self.variant is not None and variant != self.variant:
            self.inconsistencies += 1

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

    def to_dict(self) -> dict:
        return {"v": self.variant, "t": self.exposed_ms, "m": self.totals, "a": self.awaiting,
                "f": self.fates, "x": self.inconsistencies, "r": self.recent_ids, "l": self.last_ms}

    @classmethod
    def from_dict(cls, d: dict) -> "UnitState":
        return cls(d["v"], d["t"], dict(d["m"]), [tuple(a) for a in d["a"]], dict(d["f"]), d["x"], list(d["r"]), d["l"])
