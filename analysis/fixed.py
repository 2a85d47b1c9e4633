"""Fixed-horizon frequentist tests: each reads two arms' statistics and returns a result.

All tests are two-sided. Relative lifts use the delta method and, like GrowthBook's gbstats
(``gbstats/frequentist/tests.py``), the Welch-Satterthwaite degrees of freedom of the
absolute difference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy import stats

from analysis.results import ComparisonResult
from analysis.stats import Moments, ProportionStats


class Lift(NamedTuple):
    """A lift estimate and the variance of that estimate."""

    estimate: float
    variance: float


def lift(control: Moments, treatment: Moments, relative: bool) -> Lift:
    """Return treatment - control (or (treatment - control) / control) and its variance.

    Absolute: Var = s_t^2 / n_t + s_c^2 / n_c. Relative (delta method, gbstats
    ``frequentist_variance``): Var = s_t^2 / (n_t mu_c^2) + s_c^2 mu_t^2 / (n_c mu_c^4).
    """
    mu_c, mu_t = control.mean, treatment.mean
    if not relative:
        return Lift(mu_t - mu_c, treatment.variance / treatment.n + control.variance / control.n)
    if mu_c == 0:
        raise ValueError("relative lift needs a non-zero control mean")
    return Lift(mu_t / mu_c - 1.0,
                treatment.variance / (treatment.n * mu_c**2)
                + control.variance * mu_t**2 / (control.n * mu_c**4))


def welch_df(control: Moments, treatment: Moments) -> float:
    """Return the Welch-Satterthwaite degrees of freedom of the difference of means."""
    a, b = control.variance / control.n, treatment.variance / treatment.n
    if a + b == 0:
        raise ValueError("both arms have zero variance; a t test is undefined")
    return (a + b) ** 2 / (a**2 / (control.n - 1) + b**2 / (treatment.n - 1))


def welch_test(control: Moments, treatment: Moments, *, relative: bool = False,
               alpha: float = 0.05) -> ComparisonResult:
    """Return Welch's unequal-variance t test of treatment against control.

    The statistic is lift / se with a t distribution on Welch-Satterthwaite df; on raw data
    the absolute version equals ``scipy.stats.ttest_ind(t, c, equal_var=False)``, and both
    scales reproduce gbstats ``TwoSidedTTest``.
    """
    estimate, variance = lift(control, treatment, relative)
    df = welch_df(control, treatment)
    se = math.sqrt(variance)
    statistic = estimate / se
    half_width = float(stats.t.ppf(1.0 - alpha / 2.0, df)) * se
    return ComparisonResult("welch", estimate, estimate - half_width, estimate + half_width,
                            float(2.0 * stats.t.sf(abs(statistic), df)), relative, alpha,
                            statistic=statistic)


def z_test(control: ProportionStats, treatment: ProportionStats, *, relative: bool = False,
           alpha: float = 0.05) -> ComparisonResult:
    """Return the two-proportion z test of treatment against control.

    p-value: pooled-variance z, as ``statsmodels.stats.proportion.proportions_ztest`` (the
    variance under the null hypothesis p_t = p_c, the same hypothesis on either scale).
    Interval: Newcombe's hybrid score interval for the absolute difference, the delta-method
    Wald interval with a normal quantile for the relative lift.
    """
    pooled = (control.successes + treatment.successes) / (control.n + treatment.n)
    se_null = math.sqrt(pooled * (1.0 - pooled) * (1.0 / control.n + 1.0 / treatment.n))
    if se_null == 0:
        raise ValueError("no variation in either arm (all successes or none); z is undefined")
    statistic = (treatment.mean - control.mean) / se_null
    p_value = float(2.0 * stats.norm.sf(abs(statistic)))
    estimate, variance = lift(control, treatment, relative)
    if relative:
        half_width = float(stats.norm.ppf(1.0 - alpha / 2.0)) * math.sqrt(variance)
        low, high = estimate - half_width, estimate + half_width
    else:
        low, high = newcombe_interval(control, treatment, alpha)
    return ComparisonResult("z", estimate, low, high, p_value, relative, alpha,
                            statistic=statistic)


def wilson_interval(arm: ProportionStats, alpha: float = 0.05) -> tuple[float, float]:
    """Return the Wilson score interval of one proportion (Wilson 1927).

    Equals ``statsmodels.stats.proportion.proportion_confint(method="wilson")``.
    """
    z = float(stats.norm.ppf(1.0 - alpha / 2.0))
    p, n = arm.mean, arm.n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half_width = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return centre - half_width, centre + half_width


def newcombe_interval(control: ProportionStats, treatment: ProportionStats,
                      alpha: float = 0.05) -> tuple[float, float]:
    """Return Newcombe's hybrid score interval for p_t - p_c (Newcombe 1998, method 10).

    Built from each arm's Wilson interval; equals statsmodels
    ``confint_proportions_2indep(method="newcomb", compare="diff")``.
    """
    (lc, uc), (lt, ut) = wilson_interval(control, alpha), wilson_interval(treatment, alpha)
    pc, pt = control.mean, treatment.mean
    d = pt - pc
    return (d - math.sqrt((pt - lt) ** 2 + (uc - pc) ** 2),
            d + math.sqrt((ut - pt) ** 2 + (pc - lc) ** 2))


def cohens_h(p_control: float, p_treatment: float) -> float:
    """Return Cohen's h = 2 asin(sqrt(p_t)) - 2 asin(sqrt(p_c)) (Cohen 1988).

    Equals ``statsmodels.stats.proportion.proportion_effectsize(p_treatment, p_control)``.
    """
    return 2.0 * math.asin(math.sqrt(p_treatment)) - 2.0 * math.asin(math.sqrt(p_control))


def srm_pvalue(counts: ArrayLike, weights: ArrayLike) -> float:
    """Return the chi-square goodness-of-fit p-value of unit counts against planned weights.

    Sample ratio mismatch check (Fabijan et al. 2019); equals
    ``scipy.stats.chisquare(counts, f_exp=total * weights / sum(weights))``.
    """
    observed = np.asarray(counts, dtype=float)
    share = np.asarray(weights, dtype=float)
    if observed.shape != share.shape or observed.size < 2:
        raise ValueError("need one planned weight per arm and at least two arms")
    if np.any(share <= 0):
        raise ValueError("planned weights must be positive")
    expected = observed.sum() * share / share.sum()
    statistic = float(np.sum((observed - expected) ** 2 / expected))
    return float(stats.chi2.sf(statistic, observed.size - 1))


@dataclass(frozen=True)
class MannWhitneyResult:
    """Mann-Whitney U of the treatment sample, its p-value and P(T > C) + P(T = C) / 2."""

    statistic: float
    p_value: float
    prob_superiority: float


def mann_whitney(control_values: ArrayLike, treatment_values: ArrayLike) -> MannWhitneyResult:
    """Return the two-sided Mann-Whitney U test on raw values (for heavy-tailed metrics).

    Normal approximation with tie correction and continuity correction (Mann and Whitney
    1947); equals ``scipy.stats.mannwhitneyu(treatment, control, method="asymptotic")``.
    This is the one test here that needs raw values: ranks have no sufficient sums.
    """
    c = np.asarray(control_values, dtype=float).ravel()
    t = np.asarray(treatment_values, dtype=float).ravel()
    n_c, n_t = c.size, t.size
    pooled = np.concatenate([t, c])
    ranks = stats.rankdata(pooled)
    u = float(ranks[:n_t].sum() - n_t * (n_t + 1) / 2.0)
    n = n_c + n_t
    _, tie_counts = np.unique(pooled, return_counts=True)
    tie_term = float(np.sum(tie_counts**3 - tie_counts)) / (n * (n - 1))
    sigma = math.sqrt(n_c * n_t / 12.0 * ((n + 1) - tie_term))
    if sigma == 0:
        raise ValueError("all values are tied; the rank test is undefined")
    z = (max(u, n_c * n_t - u) - n_c * n_t / 2.0 - 0.5) / sigma
    return MannWhitneyResult(u, min(float(2.0 * stats.norm.sf(z)), 1.0), u / (n_c * n_t))
