"""Mergeable distribution summaries: a relative-error quantile sketch and fixed bins.

:class:`QuantileSketch` is for quantiles of positive values such as ``latency_ms``;
:class:`Histogram` holds counts on fixed edges, the input of the drift measures in
:mod:`analysis.drift`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


def _add_counts(keys: np.ndarray, counts: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return sorted unique keys and the summed counts of each."""
    unique, inverse = np.unique(keys, return_inverse=True)
    summed = np.bincount(inverse, weights=counts, minlength=unique.size)
    return tuple(int(k) for k in unique), tuple(int(c) for c in summed)


@dataclass(frozen=True)
class QuantileSketch:
    """DDSketch quantile sketch (Masson, Rim and Lee, VLDB 2019) for values >= 0.

    Bucket k counts values in (gamma^(k-1), gamma^k] with gamma = (1 + a) / (1 - a) and
    reports 2 gamma^k / (gamma + 1), so every quantile is within relative error
    ``relative_accuracy`` (a) of the exact order statistic of rank floor(q (count - 1)),
    i.e. ``numpy.quantile(values, q, method="lower")``. Zeros are counted apart. The
    sketch keeps one bucket per occupied power of gamma: about ln(max / min) / (2 a).
    """

    relative_accuracy: float = 0.01
    zero_count: int = 0
    keys: tuple[int, ...] = ()
    counts: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.relative_accuracy < 1:
            raise ValueError(f"relative_accuracy must be in (0, 1), got {self.relative_accuracy}")
        if len(self.keys) != len(self.counts):
            raise ValueError("a sketch needs one count per bucket key")

    @property
    def gamma(self) -> float:
        """Return the bucket growth factor (1 + a) / (1 - a)."""
        return (1.0 + self.relative_accuracy) / (1.0 - self.relative_accuracy)

    @property
    def count(self) -> int:
        """Return the number of values summarised."""
        return self.zero_count + sum(self.counts)

    def key(self, value: float) -> int | None:
        """The bucket key of one value (None for zero): what a streaming caller counts
        per bucket and later turns into a sketch with :meth:`from_counts`."""
        return None if value == 0 else math.ceil(math.log(value) / math.log(self.gamma))

    @classmethod
    def from_counts(cls, relative_accuracy: float, zero_count: int, counts: dict[int, int]) -> QuantileSketch:
        """The sketch whose buckets hold ``counts`` (key -> count, zero counts dropped)."""
        keys = sorted(k for k, c in counts.items() if c)
        return cls(relative_accuracy, int(zero_count), tuple(keys), tuple(int(counts[k]) for k in keys))

    def update(self, values: ArrayLike) -> QuantileSketch:
        """Return a new sketch with ``values`` (finite, >= 0) added."""
        array = np.asarray(values, dtype=float).ravel()
        if not np.all(np.isfinite(array)) or np.any(array < 0):
            raise ValueError("sketch values must be finite and >= 0")
        positive = array[array > 0]
        new_keys = np.ceil(np.log(positive) / math.log(self.gamma)).astype(np.int64)
        keys, counts = _add_counts(
            np.concatenate([np.asarray(self.keys, dtype=np.int64), new_keys]),
            np.concatenate([np.asarray(self.counts, dtype=float), np.ones(new_keys.size)]))
        return QuantileSketch(self.relative_accuracy,
                              self.zero_count + int(array.size - positive.size), keys, counts)

    def merge(self, other: QuantileSketch) -> QuantileSketch:
        """Return the sketch of both inputs; both must have the same relative accuracy."""
        if other.relative_accuracy != self.relative_accuracy:
            raise ValueError("cannot merge sketches with different relative accuracy")
        keys, counts = _add_counts(np.asarray(self.keys + other.keys, dtype=np.int64),
                                   np.asarray(self.counts + other.counts, dtype=float))
        return QuantileSketch(self.relative_accuracy, self.zero_count + other.zero_count,
                              keys, counts)

    def __add__(self, other: QuantileSketch) -> QuantileSketch:
        return self.merge(other)

    def quantile(self, q: float) -> float:
        """Return the q-quantile (0 <= q <= 1) within the sketch's relative accuracy."""
        if not 0 <= q <= 1:
            raise ValueError(f"q must be in [0, 1], got {q}")
        if self.count == 0:
            raise ValueError("quantile of an empty sketch")
        rank = math.floor(q * (self.count - 1))
        if rank < self.zero_count:
            return 0.0
        position = int(np.searchsorted(np.cumsum(self.counts), rank - self.zero_count,
                                       side="right"))
        return 2.0 * self.gamma ** self.keys[position] / (self.gamma + 1.0)

    def to_dict(self) -> dict[str, Any]:
        """Return a plain dict: relative_accuracy, zero_count, and sorted keys with counts."""
        return {"relative_accuracy": self.relative_accuracy, "zero_count": self.zero_count,
                "keys": list(self.keys), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QuantileSketch:
        """Return the sketch stored by :meth:`to_dict`."""
        return cls(float(d["relative_accuracy"]), int(d["zero_count"]),
                   tuple(int(k) for k in d["keys"]), tuple(int(c) for c in d["counts"]))


@dataclass(frozen=True)
class Histogram:
    """Counts on fixed bin edges, e.g. model scores in [0, 1].

    Bins are [e_i, e_(i+1)) with the last one closed, as ``numpy.histogram``. A value
    outside the edges raises: use -inf / inf outer edges to keep outliers.
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if len(self.edges) < 2 or any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError("edges must be at least two strictly increasing numbers")
        if not self.counts:
            object.__setattr__(self, "counts", (0,) * (len(self.edges) - 1))
        if len(self.counts) != len(self.edges) - 1:
            raise ValueError(f"{len(self.edges)} edges need {len(self.edges) - 1} counts")

    @property
    def count(self) -> int:
        """Return the number of values counted."""
        return sum(self.counts)

    def update(self, values: ArrayLike) -> Histogram:
        """Return a new histogram with ``values`` counted."""
        array = np.asarray(values, dtype=float).ravel()
        edges = np.asarray(self.edges)
        if np.any(np.isnan(array)) or np.any((array < edges[0]) | (array > edges[-1])):
            raise ValueError(f"values outside the edges [{edges[0]}, {edges[-1]}] or NaN")
        index = np.minimum(np.searchsorted(edges, array, side="right") - 1, edges.size - 2)
        added = np.bincount(index, minlength=edges.size - 1)
        return Histogram(self.edges, tuple(int(a + b) for a, b in zip(self.counts, added)))

    def merge(self, other: Histogram) -> Histogram:
        """Return the histogram of both inputs; both must have the same edges."""
        if other.edges != self.edges:
            raise ValueError("cannot merge histograms with different edges")
        return Histogram(self.edges, tuple(a + b for a, b in zip(self.counts, other.counts)))

    def __add__(self, other: Histogram) -> Histogram:
        return self.merge(other)

    def to_dict(self) -> dict[str, Any]:
        """Return a plain dict with the edges and counts as lists."""
        return {"edges": list(self.edges), "counts": list(self.counts)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        """Return the histogram stored by :meth:`to_dict`."""
        return cls(tuple(float(e) for e in d["edges"]), tuple(int(c) for c in d["counts"]))
