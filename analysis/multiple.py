"""Multiple-testing corrections: adjusted p-values for a family of metrics or arms.

Each function returns adjusted p-values in the input order; reject hypothesis i at level
alpha when adjusted[i] <= alpha. They equal
``statsmodels.stats.multitest.multipletests(p, method=...)[1]``.
"""
from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike


def _as_pvalues(pvalues: ArrayLike) -> np.ndarray:
    p = np.asarray(pvalues, dtype=float).ravel()
    if np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise ValueError("p-values must lie in [0, 1]")
    return p


def bonferroni(pvalues: ArrayLike) -> np.ndarray:
    """Return Bonferroni-adjusted p-values min(m p, 1) (family-wise error rate)."""
    p = _as_pvalues(pvalues)
    return np.minimum(p * p.size, 1.0)


def holm(pvalues: ArrayLike) -> np.ndarray:
    """Return Holm step-down adjusted p-values (Holm 1979; family-wise error rate).

    For ascending p_(1..m): adjusted_(i) = max_{j <= i} min((m - j + 1) p_(j), 1).
    """
    p = _as_pvalues(pvalues)
    order = np.argsort(p, kind="stable")
    steps = (p.size - np.arange(p.size)) * p[order]
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(steps), 1.0)
    return adjusted


def benjamini_hochberg(pvalues: ArrayLike) -> np.ndarray:
    """Return Benjamini-Hochberg step-up adjusted p-values (1995; false discovery rate).

    For ascending p_(1..m): adjusted_(i) = min_{j >= i} min(m p_(j) / j, 1).
    """
    p = _as_pvalues(pvalues)
    order = np.argsort(p, kind="stable")
    steps = p.size * p[order] / np.arange(1, p.size + 1)
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.minimum.accumulate(steps[::-1])[::-1], 1.0)
    return adjusted
