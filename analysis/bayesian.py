"""Bayesian two-arm tests: exact Beta-Binomial for conversions, Gaussian on the lift.

Both return a :class:`ComparisonResult` whose ``chance_to_win`` is P(treatment better) and
``risk`` is the expected loss of (choosing control, choosing treatment), in the units of
``estimate``. A Bayesian test has no p-value: ``p_value`` is NaN, which compares false
against any threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import integrate, optimize, special, stats

from analysis.fixed import lift
from analysis.results import ComparisonResult
from analysis.stats import Moments, ProportionStats


def _miller_sum(a: int, b: int, c: int, d: int) -> float:
    """Return P(Y > X) for X ~ Beta(a, b), Y ~ Beta(c, d) with a sum of c terms (int c)."""
    i = np.arange(c, dtype=float)
    log_terms = (special.betaln(a + i, b + d) - np.log(d + i) - special.betaln(1 + i, d)
                 - special.betaln(a, b))
    return float(np.exp(special.logsumexp(log_terms)))


def prob_beta_greater(a: int, b: int, c: int, d: int) -> float:
    """Return P(Y > X) exactly for independent X ~ Beta(a, b), Y ~ Beta(c, d), integer params.

    Evan Miller's closed form ("Formulas for Bayesian A/B Testing", 2015), a sum of
    min(a, b, c, d) positive terms added in log space (accurate to about 1e-13). The sum
    runs over c; the three other parameters are reached by P(Y > X) = 1 - P(X > Y) and
    by 1 - Y ~ Beta(d, c).
    """
    if min(a, b, c, d) < 1 or any(int(v) != v for v in (a, b, c, d)):
        raise ValueError(f"Beta parameters must be positive integers, got {(a, b, c, d)}")
    a, b, c, d = int(a), int(b), int(c), int(d)
    smallest = min(a, b, c, d)
    if smallest == c:
        return _miller_sum(a, b, c, d)
    if smallest == a:
        return 1.0 - _miller_sum(c, d, a, b)
    if smallest == b:
        return _miller_sum(d, c, b, a)
    return 1.0 - _miller_sum(b, a, d, c)


def _expected_shortfall(a: int, b: int, c: int, d: int) -> float:
    """Return E[max(X - Y, 0)] for X ~ Beta(a, b), Y ~ Beta(c, d) (Stucchio 2015).

    E[X 1{X > Y}] = E[X] P(X' > Y) with X' ~ Beta(a + 1, b) (size-biased), likewise for Y.
    """
    return (a / (a + b) * (1.0 - prob_beta_greater(a + 1, b, c, d))
            - c / (c + d) * (1.0 - prob_beta_greater(a, b, c + 1, d)))


def _lift_quantile(control: stats.rv_continuous, treatment: stats.rv_continuous,
                   q: float, relative: bool) -> float:
    """Return the q-quantile of p_t - p_c (or p_t / p_c - 1) by integrating its CDF."""
    low, high = control.ppf(1e-14), control.isf(1e-14)

    def cdf(x: float) -> float:
        shifted = (lambda p: (1.0 + x) * p) if relative else (lambda p: p + x)
        value, _ = integrate.quad(lambda p: control.pdf(p) * treatment.cdf(shifted(p)),
                                  low, high, epsabs=1e-12, epsrel=1e-10, limit=200)
        return value - q

    upper = 1.0 / low if relative else 1.0
    return float(optimize.brentq(cdf, -1.0, upper, xtol=1e-10, rtol=1e-12))


def beta_binomial_test(control: ProportionStats, treatment: ProportionStats, *,
                       relative: bool = False, alpha: float = 0.05,
                       prior: tuple[int, int] = (1, 1)) -> ComparisonResult:
    """Return the exact Beta-Binomial comparison of two conversion rates.

    Posteriors Beta(prior_a + successes, prior_b + failures), integer priors. Returns the
    posterior mean lift (absolute p_t - p_c, or relative E[p_t / p_c] - 1), the equal-tailed
    credible interval from the exact lift distribution (numerical integration, quantiles
    to 1e-10), chance_to_win = P(p_t > p_c) (:func:`prob_beta_greater`) and risk = expected
    loss of each choice (Stucchio, "Bayesian A/B Testing at VWO", 2015). On the relative
    scale the loss E[max(p_t / p_c - 1, 0)] uses E[g(p_c) / p_c] = (a + b - 1) / (a - 1)
    E[g(Beta(a - 1, b))], so it needs a control posterior a > 1.
    """
    a, b = prior[0] + control.successes, prior[1] + control.n - control.successes
    c, d = prior[0] + treatment.successes, prior[1] + treatment.n - treatment.successes
    chance_to_win = prob_beta_greater(a, b, c, d)
    if relative:
        if a <= 1:
            raise ValueError("relative Beta-Binomial lift needs a control posterior a > 1")
        scale = (a + b - 1) / (a - 1)
        estimate = c / (c + d) * scale - 1.0
        loss_treatment = scale * _expected_shortfall(a - 1, b, c, d)
    else:
        estimate = c / (c + d) - a / (a + b)
        loss_treatment = _expected_shortfall(a, b, c, d)
    loss_control = loss_treatment + estimate
    posterior_c, posterior_t = stats.beta(a, b), stats.beta(c, d)
    ci_low = _lift_quantile(posterior_c, posterior_t, alpha / 2.0, relative)
    ci_high = _lift_quantile(posterior_c, posterior_t, 1.0 - alpha / 2.0, relative)
    return ComparisonResult("beta_binomial", estimate, ci_low, ci_high, math.nan, relative,
                            alpha, chance_to_win=chance_to_win,
                            risk=(loss_control, loss_treatment))


@dataclass(frozen=True)
class GaussianPrior:
    """A proper normal prior on the lift, on the scale of the test (absolute or relative)."""

    mean: float
    variance: float

    def __post_init__(self) -> None:
        if not self.variance > 0:
            raise ValueError(f"prior variance must be positive, got {self.variance}")


def gaussian_test(control: Moments, treatment: Moments, *, relative: bool = False,
                  alpha: float = 0.05, prior: GaussianPrior | None = None) -> ComparisonResult:
    """Return the Gaussian-posterior comparison of any two arms (means, ratios, proportions).

    The likelihood of the lift is normal with the delta-method estimate and variance of
    :func:`analysis.fixed.lift`; with a flat prior (``prior=None``) the posterior is that
    normal, with a proper prior the precision-weighted combination. Returns the posterior
    mean, the equal-tailed credible interval, chance_to_win = P(lift > 0) and risk =
    (E[max(lift, 0)], E[max(-lift, 0)]). This is gbstats' ``EffectBayesianABTest``
    (``gbstats/bayesian/tests.py``) with its flat or proper Gaussian prior.
    """
    estimate, variance = lift(control, treatment, relative)
    if variance == 0:
        raise ValueError("the lift has zero variance (no variation in either arm)")
    if prior is not None:
        precision = 1.0 / variance + 1.0 / prior.variance
        estimate = (estimate / variance + prior.mean / prior.variance) / precision
        variance = 1.0 / precision
    sd = math.sqrt(variance)
    z = estimate / sd
    half_width = float(stats.norm.ppf(1.0 - alpha / 2.0)) * sd
    loss_treatment = float(sd * stats.norm.pdf(z) - estimate * stats.norm.cdf(-z))
    return ComparisonResult("bayesian", estimate, estimate - half_width, estimate + half_width,
                            math.nan, relative, alpha, chance_to_win=float(stats.norm.cdf(z)),
                            risk=(loss_treatment + estimate, loss_treatment))
