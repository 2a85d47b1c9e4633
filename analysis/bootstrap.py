"""Bootstrap intervals for heavy-tailed metrics: pure, seeded, vectorised in chunks."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class BootstrapInterval:
    """Point estimate and percentile interval of a lift from ``resamples`` resamples."""

    estimate: float
    ci_low: float
    ci_high: float
    alpha: float
    resamples: int
    seed: int
    relative: bool

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict."""
        return asdict(self)


def _ratio_of_means(values: np.ndarray, denominators: np.ndarray | None, index: np.ndarray) -> np.ndarray:
    numerator = values[index].sum(axis=-1)
    if denominators is None:
        return numerator / index.shape[-1]
    return numerator / denominators[index].sum(axis=-1)


def bootstrap_lift(control: ArrayLike, treatment: ArrayLike, *, relative: bool = True, alpha: float = 0.05,
                   resamples: int = 2000, seed: int = 0, control_denominators: ArrayLike | None = None,
                   treatment_denominators: ArrayLike | None = None, chunk: int = 100) -> BootstrapInterval:
    """Return the percentile bootstrap interval of mean_t - mean_c (or mean_t / mean_c - 1).

    Each arm's units are resampled with replacement independently (Efron and Tibshirani
    1993, ch. 13, the two-sample percentile interval; scipy.stats.bootstrap with
    ``method="percentile"`` on two independent samples). With denominators the arm's
    statistic is the ratio of sums (a ratio metric), resampled by unit.
    """
    c, t = np.asarray(control, dtype=float), np.asarray(treatment, dtype=float)
    dc = None if control_denominators is None else np.asarray(control_denominators, dtype=float)
    dt = None if treatment_denominators is None else np.asarray(treatment_denominators, dtype=float)
    if c.size < 2 or t.size < 2:
        raise ValueError("the bootstrap needs at least two units per arm")

    def lift(mc: np.ndarray, mt: np.ndarray) -> np.ndarray:
        return mt / mc - 1.0 if relative else mt - mc

    whole = lambda v, d: float(v.sum() / (v.size if d is None else d.sum()))  # noqa: E731
    estimate = float(lift(np.array(whole(c, dc)), np.array(whole(t, dt))))
    rng = np.random.default_rng(seed)
    draws = []
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        mc = _ratio_of_means(c, dc, rng.integers(0, c.size, (size, c.size)))
        mt = _ratio_of_means(t, dt, rng.integers(0, t.size, (size, t.size)))
        with np.errstate(divide="ignore", invalid="ignore"):
            draws.append(lift(mc, mt))
    values = np.concatenate(draws)
    low, high = np.nanquantile(values, [alpha / 2.0, 1.0 - alpha / 2.0])
    return BootstrapInterval(estimate, float(low), float(high), alpha, resamples, seed, relative)
