"""Partial statistics: the sums of one partition's units for one experiment.

A partial is a sum of unit contributions, so partials of different partitions add up to
the experiment's statistics exactly, whatever the number of workers. Stage 1 keeps one per
(partition, experiment) and publishes it whole (a cumulative snapshot, so a repeated or
replayed snapshot changes nothing); stage 2 keeps the newest of every partition and merges.

The sums are floats. Adding and later subtracting the same contribution is exact for
integer-valued metrics (counts, conversions, amounts in minor units) below 2**53; for other
values equality with a recomputation holds to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable, Iterable, Protocol

import numpy as np

from analysis.sketch import QuantileSketch
from analysis.stats import MeanStats, ProportionStats, RatioStats

# Guardrail counters, kept per partition and experiment, keyed (namespace, variant or
# challenger, key): prediction status; latency sketch buckets (a DDSketch key, "z" for 0);
# prediction score bins per event-time hour ("hour:bin"); shadow comparisons per challenger.
CounterKey = tuple[str, str, str]
LATENCY_SKETCH = QuantileSketch(relative_accuracy=0.02)
SCORE_BINS = 20
HOUR_MS = 3_600_000
# Shadow runs are compared on labels when both models give one, else on scores, which
# disagree when they fall on different sides of this decision threshold.
SCORE_DECISION_THRESHOLD = 0.5


class MetricSpec(Protocol):
    name: str
    kind: Enum | str
    numerator: str | None
    denominator: str | None


def metric_kind(metric: MetricSpec) -> str:
    kind = metric.kind
    # _value_, not .value: an Enum's .value is a descriptor call, ~1 us, paid per metric per touched unit.
    return kind._value_ if isinstance(kind, Enum) else kind


def outcome_names(metrics: Iterable[MetricSpec]) -> frozenset[str]:
    """The outcome metrics a unit must total to compute these experiment metrics."""
    names: set[str] = set()
    for m in metrics:
        names.update((m.numerator, m.denominator) if metric_kind(m) == "ratio" else (m.name,))
    return frozenset(names)


def terms(metric: MetricSpec, column: Callable[[str], int], totals: np.ndarray) -> np.ndarray:
    """Each row's terms in the metric's sufficient statistics (see analysis.stats), one row per
    unit: binary (converted,), continuous (x, x^2), ratio (x, x^2, y, y^2, xy), where x and y
    are the unit's totals of the named outcomes (``column`` gives their column, -1 if none)."""
    def total(name: str) -> np.ndarray:
        at = column(name)
        return totals[:, at] if at >= 0 else np.zeros(totals.shape[0])

    kind = metric_kind(metric)
    if kind == "binary":
        return (total(metric.name) > 0).astype(np.float64)[:, None]
    if kind == "continuous":
        x = total(metric.name)
        return np.stack([x, x * x], axis=1)
    x, y = total(metric.numerator), total(metric.denominator)
    return np.stack([x, x * x, y, y * y, x * y], axis=1)


@dataclass
class VariantPartial:
    units: int = 0
    sums: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Partial:
    """Sums of one partition's units for one experiment; mutable inside stage 1 only."""

    variants: dict[str, VariantPartial] = field(default_factory=dict)
    fates: dict[str, int] = field(default_factory=dict)
    inconsistencies: int = 0
    watermark_ms: int = 0
    first_exposure_ms: int | None = None
    # Flat, keyed (namespace, variant or challenger, key): see CounterKey.
    counters: dict[CounterKey, float] = field(default_factory=dict)

    def add_counters(self, changes: dict[CounterKey, float]) -> bool:
        """Add the changes; True when one of them is a counter this partial did not have."""
        mine = self.counters
        had = len(mine)
        for key, value in changes.items():
            mine[key] = mine.get(key, 0) + value
        return len(mine) > had

    def drop_middle_score_hours(self) -> None:
        """Keep each variant's score bins of its first and its latest event-time hour only: the
        drift guardrail compares just those two, and the hours between grew every partial (and
        every message carrying one) by 20 counters per variant per hour of the experiment's life.

        Exact whenever it is applied, and across partitions: an hour that is the first or the
        latest now was never between two others before (the first only moves earlier, the
        latest later), so it kept every count; and a partition with scores in the experiment's
        overall first (latest) hour has it as its own first (latest)."""
        hours: dict[str, set[int]] = {}
        for ns, name, key in self.counters:
            if ns == "score":
                hours.setdefault(name, set()).add(int(key.partition(":")[0]))
        middle = {(name, hour) for name, seen in hours.items() if len(seen) > 2
                  for hour in seen - {min(seen), max(seen)}}
        if middle:
            self.counters = {k: v for k, v in self.counters.items()
                             if k[0] != "score" or (k[1], int(k[2].partition(":")[0])) not in middle}

    def merge(self, other: "Partial") -> "Partial":
        merged = Partial.from_dict(self.to_dict())
        merged._absorb(other)
        return merged

    def _absorb(self, other: "Partial") -> None:
        """Add ``other`` into this partial (sharing none of its lists or dicts)."""
        for name, arm in other.variants.items():
            mine = self.variants.setdefault(name, VariantPartial())
            mine.units += arm.units
            for metric, sums in arm.sums.items():
                mine.sums[metric] = [a + b for a, b in zip(mine.sums.get(metric, [0.0] * len(sums)), sums)]
        for fate, count in other.fates.items():
            self.fates[fate] = self.fates.get(fate, 0) + count
        self.inconsistencies += other.inconsistencies
        self.add_counters(other.counters)
        self.watermark_ms = max(self.watermark_ms, other.watermark_ms)
        if other.first_exposure_ms is not None:
            self.first_exposure_ms = min(self.first_exposure_ms or other.first_exposure_ms, other.first_exposure_ms)

    @property
    def runtime_s(self) -> float:
        """Event time from the first exposure to the newest event."""
        if self.first_exposure_ms is None:
            return 0.0
        return max(0.0, (self.watermark_ms - self.first_exposure_ms) / 1000)

    def stats(self, metric: MetricSpec) -> dict[str, ProportionStats | MeanStats | RatioStats]:
        """The metric's sufficient statistics per variant."""
        kind = metric_kind(metric)
        result = {}
        for name, arm in self.variants.items():
            sums = arm.sums.get(metric.name) or [0.0] * {"binary": 1, "continuous": 2}.get(kind, 5)
            if kind == "binary":
                result[name] = ProportionStats(arm.units, int(sums[0]))
            elif kind == "continuous":
                result[name] = MeanStats(arm.units, sums[0], sums[1])
            else:
                result[name] = RatioStats(arm.units, *sums)
        return result

    def counts(self, namespace: str) -> dict[str, dict[str, float]]:
        """Counters of one namespace (status, latency, score, shadow) by variant or challenger."""
        result: dict[str, dict[str, float]] = {}
        for (ns, name, key), value in self.counters.items():
            if ns == namespace:
                result.setdefault(name, {})[key] = value
        return result

    def exposures(self) -> dict[str, int]:
        return {name: arm.units for name, arm in self.variants.items()}

    def to_dict(self) -> dict:
        return {
            "variants": {name: {"units": a.units, "sums": {m: list(s) for m, s in a.sums.items()}}
                         for name, a in self.variants.items()},
            "fates": dict(self.fates), "inconsistencies": self.inconsistencies, "watermark_ms": self.watermark_ms,
            "first_exposure_ms": self.first_exposure_ms,
            # Nested by "namespace:name" in the published form (stable since the first release).
            "counters": _nested(self.counters),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Partial":
        return cls(
            {name: VariantPartial(a["units"], {m: list(s) for m, s in a["sums"].items()}) for name, a in d["variants"].items()},
            dict(d["fates"]), d["inconsistencies"], d["watermark_ms"], d["first_exposure_ms"],
            {(*group.split(":", 1), key): value for group, counts in d["counters"].items() for key, value in counts.items()},
        )


def _nested(counters: dict[CounterKey, float]) -> dict[str, dict[str, float]]:
    nested: dict[str, dict[str, float]] = {}
    for (ns, name, key), value in counters.items():
        nested.setdefault(f"{ns}:{name}", {})[key] = value
    return nested


def merge_all(partials: Iterable[Partial]) -> Partial:
    # In place: merge() copies its left side, and stage 2 merges every partition's partial on
    # every look at an experiment.
    total = Partial()
    for p in partials:
        total._absorb(p)
    return total
