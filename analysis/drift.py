"""Distribution drift between a reference and a current :class:`Histogram` (same edges)."""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from analysis.sketch import Histogram

PSI_FLOOR = 1e-4
"""Bin share used in place of an empty bin's 0, so PSI stays finite (common practice)."""


def _shares(reference: Histogram, current: Histogram) -> tuple[np.ndarray, np.ndarray]:
    if reference.edges != current.edges:
        raise ValueError("drift needs two histograms with the same edges")
    if reference.count == 0 or current.count == 0:
        raise ValueError("drift needs two non-empty histograms")
    return (np.asarray(reference.counts, dtype=float) / reference.count,
            np.asarray(current.counts, dtype=float) / current.count)


class PsiBand(enum.Enum):
    """The customary reading of a PSI value (Siddiqi, "Credit Risk Scorecards", 2006)."""

    STABLE = "stable"        # PSI < 0.1
    MODERATE = "moderate"    # 0.1 <= PSI < 0.2
    SHIFTED = "shifted"      # PSI >= 0.2

    @classmethod
    def of(cls, psi_value: float) -> PsiBand:
        """Return the band of a PSI value."""
        if psi_value < 0.1:
            return cls.STABLE
        return cls.MODERATE if psi_value < 0.2 else cls.SHIFTED


def psi(reference: Histogram, current: Histogram) -> float:
    """Return the population stability index sum (c_i - r_i) ln(c_i / r_i) over bin shares.

    PSI is the symmetrised Kullback-Leibler divergence KL(c || r) + KL(r || c). Empty bins
    count as :data:`PSI_FLOOR` so the index stays finite.
    """
    r, c = (np.maximum(share, PSI_FLOOR) for share in _shares(reference, current))
    return float(np.sum((c - r) * np.log(c / r)))


@dataclass(frozen=True)
class KsResult:
    """Two-sample Kolmogorov-Smirnov statistic (max CDF gap) and its p-value."""

    statistic: float
    p_value: float


def ks_binned(reference: Histogram, current: Histogram) -> KsResult:
    """Return the two-sample KS test on binned data.

    The statistic is the largest gap between the two empirical CDFs at the bin edges; with
    one bin per distinct value it equals ``scipy.stats.ks_2samp``'s, and coarser bins
    give a smaller (conservative) one. The p-value is the Kolmogorov distribution at the
    effective size round(n m / (n + m)) (Smirnov's asymptotic formula), as
    ``ks_2samp(method="asymp")``.
    """
    r, c = _shares(reference, current)
    statistic = float(np.max(np.abs(np.cumsum(r) - np.cumsum(c))))
    n, m = reference.count, current.count
    effective_n = round(n * m / (n + m))
    return KsResult(statistic, float(np.clip(stats.kstwo.sf(statistic, effective_n), 0, 1)))


def js_divergence(reference: Histogram, current: Histogram) -> float:
    """Return the Jensen-Shannon divergence of the bin shares in bits, in [0, 1] (Lin 1991).

    JS = (KL(r || m) + KL(c || m)) / 2 with m = (r + c) / 2; this is the square of
    ``scipy.spatial.distance.jensenshannon(r, c, base=2)``, which returns the distance.
    """
    r, c = _shares(reference, current)
    m = (r + c) / 2.0

    def kl_bits(p: np.ndarray) -> float:
        nonzero = p > 0
        return float(np.sum(p[nonzero] * np.log(p[nonzero] / m[nonzero]))) / math.log(2.0)

    return max((kl_bits(r) + kl_bits(c)) / 2.0, 0.0)
