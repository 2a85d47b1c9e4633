"""One entry point for two-arm comparisons: pick the test by name."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from analysis.bayesian import beta_binomial_test, gaussian_test
from analysis.fixed import welch_test, z_test
from analysis.results import ComparisonResult
from analysis.stats import CupedStats, Moments, ProportionStats, cuped_adjust


def _sequential(name: str) -> Callable[..., ComparisonResult]:
    # imported on use so the fixed-horizon methods do not depend on analysis.sequential
    from analysis import sequential

    return getattr(sequential, name)


METHODS: dict[str, Callable[[], Callable[..., ComparisonResult]]] = {
    "z": lambda: z_test,
    "welch": lambda: welch_test,
    "bayesian": lambda: gaussian_test,
    "beta_binomial": lambda: beta_binomial_test,
    "msprt": lambda: _sequential("msprt"),
    "sequential": lambda: _sequential("confidence_sequence"),
}
"""Method name -> the test it runs (resolved on use)."""


def compare(control: Moments | CupedStats, treatment: Moments | CupedStats,
            method: str = "welch", relative: bool = False, alpha: float = 0.05,
            **options: Any) -> ComparisonResult:
    """Return the comparison of treatment against control by the named method.

    Methods: "z" (:func:`analysis.fixed.z_test`, proportions), "welch"
    (:func:`analysis.fixed.welch_test`), "bayesian" (:func:`analysis.bayesian.gaussian_test`,
    option ``prior``), "beta_binomial" (:func:`analysis.bayesian.beta_binomial_test`,
    proportions, option ``prior``), "msprt" (:func:`analysis.sequential.msprt`) and
    "sequential" (:func:`analysis.sequential.confidence_sequence`). ``options`` go to the
    test unchanged. Two :class:`CupedStats` arms are first adjusted with the pooled theta
    (:func:`analysis.stats.cuped_adjust`), so every method sees the variance-reduced metric.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if method in ("z", "beta_binomial") and not (isinstance(control, ProportionStats)
                                                 and isinstance(treatment, ProportionStats)):
        raise TypeError(f"method {method!r} compares two ProportionStats arms")
    if isinstance(control, CupedStats) and isinstance(treatment, CupedStats):
        control, treatment = cuped_adjust(control, treatment)
    elif isinstance(control, CupedStats) or isinstance(treatment, CupedStats):
        raise TypeError("CUPED needs CupedStats for both arms")
    return METHODS[method]()(control, treatment, relative=relative, alpha=alpha, **options)
