"""Result objects returned by every test in analysis/: numbers only, formatting is elsewhere."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ComparisonResult:
    """The answer of a two-arm comparison (treatment against control).

    estimate, ci_low and ci_high are on the absolute scale (treatment - control) or, when
    ``relative`` is true, as a fraction of the control mean ((t - c) / c).
    ``chance_to_win`` and ``risk`` are set by Bayesian methods only: risk is the expected
    loss of (choosing control, choosing treatment), in the units of ``estimate``.
    """

    method: str
    estimate: float
    ci_low: float
    ci_high: float
    p_value: float
    relative: bool
    alpha: float
    chance_to_win: float | None = None
    risk: tuple[float, float] | None = None
    statistic: float | None = None
