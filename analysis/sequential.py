"""Anytime-valid tests: results that stay valid however often the experiment is looked at.

A fixed-horizon z test read after every batch of units rejects a true null far more often
than alpha (see analysis/simulation.py). The tests here keep the false positive rate at
most alpha under continuous monitoring:

- :func:`msprt` -- mixture sequential probability ratio test, always-valid p-value and
  confidence interval (Johari, Koomen, Pekelis, Walsh, "Always valid inference:
  continuous monitoring of A/B tests", Operations Research 70(3), 2022; arXiv 1512.04922).
- :func:`confidence_sequence` -- the asymptotic confidence sequence of Waudby-Smith,
  Arnold, Wu, Howard, Ramdas ("Time-uniform central limit theory and asymptotic
  confidence sequences", arXiv 2103.06476, eq. 9 and 155) in the form GrowthBook's gbstats
  ships as "sequential testing" (``SequentialTwoSidedTTest``, tuning parameter N*).
- :func:`sequential_srm_pvalue` -- sample ratio mismatch on unit counts with the
  Dirichlet-multinomial Bayes factor of Lindon and Malek ("Anytime-valid inference for
  multinomial count data", NeurIPS 2022; arXiv 2011.03567).
- :func:`group_sequential_bounds` -- Lan-DeMets alpha spending (Lan and DeMets,
  Biometrika 70(3), 1983) with O'Brien-Fleming-type, Pocock-type and power-family
  spending, boundaries by the recursive numerical integration of Armitage, McPherson and
  Rowe (JRSS A 132, 1969). Valid only at looks planned by information fraction, unlike the
  three above.

The p-values here are "current" values: each is min(1, 1/E) for the current e-value /
likelihood ratio E, a non-negative martingale under the null, so by Ville's inequality
P(sup_n E_n >= 1/alpha) <= alpha. The always-valid p-value is the running *minimum* over
looks and the always-valid interval the running *intersection*; a pure function of the
current sums cannot know the past, so the caller keeps them, with :class:`AlwaysValidPValue`
and :class:`AlwaysValidInterval`. Rejecting the first time a current p-value is <= alpha is
the same decision as rejecting when the running minimum is.

All functions are pure: they read ``n``, ``mean`` and ``variance`` (per-unit) of the arms'
statistics (analysis.stats.ProportionStats, MeanStats, or anything with those three).
The numeric kernels (``mixture_*``, ``confidence_sequence_*``, ``srm_log_bayes_factor``)
take plain numbers or numpy arrays so that simulations can run them vectorised.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any, Sequence

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special
from scipy.stats import norm

from analysis.fixed import lift
from analysis.results import ComparisonResult
from analysis.stats import Moments

#: Default N* of the asymptotic confidence sequence: total units (both arms) at which the
#: interval is tightest. GrowthBook's default (``DEFAULT_TUNING_PARAMETER = 5000``).
DEFAULT_N_STAR = 5000.0

#: Default Dirichlet concentration k of the sequential SRM prior, alpha_0 = k * weights:
#: the default of Lindon's reference implementation (savvi ``Multinomial(..., k=100)``).
DEFAULT_SRM_CONCENTRATION = 100.0


# --------------------------------------------------------------------------- running state


@dataclass(frozen=True)
class AlwaysValidPValue:
    """Running minimum of current anytime-valid p-values: the always-valid p-value.

    Feed it the p-value of every look (``msprt``, ``confidence_sequence``,
    ``sequential_srm_pvalue``); ``p_value`` is then P-value_n = min_{m<=n} p_m of Johari et
    al. (2022), valid at any data-dependent stopping time.
    """

    p_value: float = 1.0
    looks: int = 0

    def update(self, p_value: float) -> AlwaysValidPValue:
        """Return the state after one more look whose current p-value is ``p_value``."""
        if not 0.0 <= p_value <= 1.0:
            raise ValueError(f"p-value must be in [0, 1], got {p_value}")
        return AlwaysValidPValue(min(self.p_value, p_value), self.looks + 1)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlwaysValidPValue:
        """Return the state stored by :meth:`to_dict`."""
        return cls(float(d["p_value"]), int(d["looks"]))


@dataclass(frozen=True)
class AlwaysValidInterval:
    """Running intersection of confidence-sequence intervals (Johari et al. 2022).

    Coverage holds for all looks at once, so the intersection covers too. With an
    asymptotic sequence the intersection can come out empty (``low > high``) when the
    normal approximation is poor early on; it is returned as it is, not patched.
    """

    low: float = -math.inf
    high: float = math.inf
    looks: int = 0

    def update(self, low: float, high: float) -> AlwaysValidInterval:
        """Return the state after one more look whose interval is [low, high]."""
        if low > high:
            raise ValueError(f"interval low {low} is above high {high}")
        return AlwaysValidInterval(max(self.low, low), min(self.high, high), self.looks + 1)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (unbounded ends are +-inf)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AlwaysValidInterval:
        """Return the state stored by :meth:`to_dict`."""
        return cls(float(d["low"]), float(d["high"]), int(d["looks"]))


# --------------------------------------------------------------------------- effect moments


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def effect_moments(control: Moments, treatment: Moments, *,
                   relative: bool = False) -> tuple[float, float]:
    """Return (estimate, variance of the estimate) of treatment against control.

    The effect and its (delta-method, when ``relative``) variance are those of
    :func:`analysis.fixed.lift`, so fixed and sequential tests agree on the estimate.
    Raises ValueError when the variance is not positive (for example no successes in
    either arm yet): an anytime-valid test has nothing to say then.
    """
    estimate, variance = lift(control, treatment, relative)
    if not variance > 0:
        raise ValueError("the effect has zero variance (e.g. no successes yet in either arm); "
                         "collect more units before testing")
    return estimate, variance


# --------------------------------------------------------------------------- mSPRT kernels


def mixture_log_likelihood_ratio(estimate: ArrayLike, variance: ArrayLike,
                                 tau2: ArrayLike) -> np.ndarray:
    """Return log Lambda of the normal-mixture SPRT for H0: effect = 0.

    With the estimate d ~ N(theta, V) and mixing distribution theta ~ N(0, tau2),
    Lambda = integral N(d; theta, V) N(theta; 0, tau2) dtheta / N(d; 0, V)
           = sqrt(V / (V + tau2)) exp(tau2 d^2 / (2 V (V + tau2)))
    (Johari et al. 2022, normal mixture, written for the two-sample difference).
    """
    d = np.asarray(estimate, dtype=float)
    v = np.asarray(variance, dtype=float)
    t2 = np.asarray(tau2, dtype=float)
    return 0.5 * np.log(v / (v + t2)) + t2 * d * d / (2.0 * v * (v + t2))


def mixture_p_value(estimate: ArrayLike, variance: ArrayLike, tau2: ArrayLike) -> np.ndarray:
    """Return the current mSPRT p-value min(1, 1/Lambda) (keep the running minimum)."""
    log_lr = mixture_log_likelihood_ratio(estimate, variance, tau2)
    return np.minimum(1.0, np.exp(-np.maximum(log_lr, 0.0)))


def mixture_halfwidth(variance: ArrayLike, tau2: ArrayLike, alpha: float) -> np.ndarray:
    """Return the half width of the mSPRT always-valid interval at level 1 - alpha.

    The interval is {theta : Lambda(d - theta) < 1/alpha} (Johari et al. 2022),
    so d +- sqrt( V (V + tau2) / tau2 * (2 ln(1/alpha) + ln((V + tau2) / V)) ).
    """
    _check_alpha(alpha)
    v = np.asarray(variance, dtype=float)
    t2 = np.asarray(tau2, dtype=float)
    return np.sqrt(v * (v + t2) / t2 * (2.0 * math.log(1.0 / alpha) + np.log((v + t2) / v)))


def default_tau2(per_unit_variance: float, *, n_star: float = DEFAULT_N_STAR) -> float:
    """Return the default mixing variance tau2 = rho^2 * s^2 on the scale of the effect.

    ``per_unit_variance`` is s^2 = V * (n_c + n_t), the variance of the effect estimate
    scaled to one unit. rho is Waudby-Smith et al.'s choice for alpha = 0.05 (eq. 161),
    which makes the mixture boundary tightest near ``n_star`` total units. With this tau2
    the mSPRT is algebraically the same normal mixture as :func:`confidence_sequence`
    at alpha = 0.05 (sqrt(V/(V+tau2)) = 1/sqrt(N rho^2 + 1) and the exponents agree).
    """
    return sequential_rho(0.05, n_star) ** 2 * per_unit_variance


def msprt(control: Moments, treatment: Moments, *, alpha: float = 0.05, relative: bool = False,
          tau2: float | None = None) -> ComparisonResult:
    """Return the mixture SPRT comparison of treatment against control at the current look.

    Johari, Koomen, Pekelis, Walsh (2022), "Always valid inference", normal mixture with
    mixing variance tau2 on the effect (absolute difference, or relative lift by the delta
    method when ``relative``). ``p_value`` is the current min(1, 1/Lambda) and
    [ci_low, ci_high] the current always-valid interval {theta : Lambda(d - theta) < 1/alpha};
    the caller keeps the running minimum / intersection (:class:`AlwaysValidPValue`,
    :class:`AlwaysValidInterval`). ``statistic`` is log Lambda (the log e-value).

    Choice of tau2: it is the spread of effects the test is tuned to detect (Johari et al.
    recommend matching it to the distribution of effects seen in past experiments; with
    a minimum detectable effect ``mde``, ``tau2=mde**2`` is a sound choice). It must be
    fixed in advance, not re-chosen from the data's effect as the experiment runs. When
    None, :func:`default_tau2` ties it to the data's variance, tightest near 5000 total
    units -- the same normal mixture as GrowthBook's sequential test at alpha = 0.05.
    tau2 is on the scale of the estimate (a fraction of the control mean if ``relative``).
    """
    _check_alpha(alpha)
    estimate, variance = effect_moments(control, treatment, relative=relative)
    if tau2 is None:
        tau2 = default_tau2(variance * (control.n + treatment.n))
    if not tau2 > 0:
        raise ValueError(f"tau2 must be positive, got {tau2}")
    log_lr = float(mixture_log_likelihood_ratio(estimate, variance, tau2))
    half = float(mixture_halfwidth(variance, tau2, alpha))
    return ComparisonResult(method="msprt", estimate=estimate, ci_low=estimate - half,
                            ci_high=estimate + half,
                            p_value=float(mixture_p_value(estimate, variance, tau2)),
                            relative=relative, alpha=alpha, statistic=log_lr)


# --------------------------------------------------------------------------- asymptotic CS


def sequential_rho(alpha: float, n_star: float = DEFAULT_N_STAR) -> float:
    """Return rho = sqrt((-2 ln alpha + ln(-2 ln alpha + 1)) / N*).

    Waudby-Smith et al. (arXiv 2103.06476v7, eq. 161): the mixing parameter that makes the
    two-sided boundary tightest at N* observations; gbstats ``sequential_rho``.
    """
    _check_alpha(alpha)
    if not n_star > 0:
        raise ValueError(f"n_star must be positive, got {n_star}")
    log_alpha = math.log(alpha)
    return math.sqrt((-2.0 * log_alpha + math.log(-2.0 * log_alpha + 1.0)) / n_star)


def confidence_sequence_halfwidth(variance: ArrayLike, n_total: ArrayLike, *, alpha: float = 0.05,
                                  n_star: float = DEFAULT_N_STAR) -> np.ndarray:
    """Return the half width of the two-sided asymptotic confidence sequence.

    Waudby-Smith et al. eq. 9 in gbstats' form: with s^2 = V * N (V the variance of the
    estimate, N the total units of both arms),
    sqrt(s^2) * sqrt(2 (N rho^2 + 1) / (N^2 rho^2) * ln(sqrt(N rho^2 + 1) / alpha)).
    """
    rho2 = sequential_rho(alpha, n_star) ** 2
    n = np.asarray(n_total, dtype=float)
    s2 = np.asarray(variance, dtype=float) * n
    return np.sqrt(s2) * np.sqrt(2.0 * (n * rho2 + 1.0) / (n * n * rho2)
                                 * np.log(np.sqrt(n * rho2 + 1.0) / alpha))


def confidence_sequence_p_value(estimate: ArrayLike, variance: ArrayLike, n_total: ArrayLike, *,
                                alpha: float = 0.05,
                                n_star: float = DEFAULT_N_STAR) -> np.ndarray:
    """Return the current sequential p-value min(1, 1/E) of the asymptotic CS.

    E = exp(rho^2 S^2 / (2 (N rho^2 + 1))) / sqrt(N rho^2 + 1) with S^2 = d^2 N / V
    (Waudby-Smith et al. eq. 155, reparameterised as in gbstats). rho depends on alpha, so
    p <= alpha exactly when 0 is outside the interval of the same alpha.
    """
    rho2 = sequential_rho(alpha, n_star) ** 2
    n = np.asarray(n_total, dtype=float)
    d = np.asarray(estimate, dtype=float)
    st2 = d * d * n / np.asarray(variance, dtype=float)
    tr2p1 = n * rho2 + 1.0
    log_e = rho2 * st2 / (2.0 * tr2p1) - 0.5 * np.log(tr2p1)
    return np.minimum(1.0, np.exp(-np.maximum(log_e, 0.0)))


def confidence_sequence(control: Moments, treatment: Moments, *, alpha: float = 0.05,
                        relative: bool = False,
                        n_star: float = DEFAULT_N_STAR) -> ComparisonResult:
    """Return the asymptotic confidence sequence comparison at the current look.

    Waudby-Smith, Arnold, Wu, Howard, Ramdas, "Time-uniform central limit theory and
    asymptotic confidence sequences" (arXiv 2103.06476), as GrowthBook's gbstats
    ``SequentialTwoSidedTTest``: estimate +- :func:`confidence_sequence_halfwidth` with
    N = n_c + n_t and tuning parameter ``n_star`` (N*, in total units, default 5000), and
    the p-value of :func:`confidence_sequence_p_value`. Relative lift uses the delta-method
    variance. ``statistic`` is d / sqrt(V), the z score. The sequence is asymptotic: its
    time-uniform coverage holds as the units grow, not exactly at small n.
    """
    estimate, variance = effect_moments(control, treatment, relative=relative)
    n_total = control.n + treatment.n
    half = float(confidence_sequence_halfwidth(variance, n_total, alpha=alpha, n_star=n_star))
    p = float(confidence_sequence_p_value(estimate, variance, n_total, alpha=alpha, n_star=n_star))
    return ComparisonResult(method="confidence_sequence", estimate=estimate,
                            ci_low=estimate - half, ci_high=estimate + half, p_value=p,
                            relative=relative, alpha=alpha,
                            statistic=estimate / math.sqrt(variance))


# --------------------------------------------------------------------------- sequential SRM


def _srm_prior(weights: ArrayLike, concentration: float | None) -> tuple[np.ndarray, np.ndarray]:
    theta0 = np.asarray(weights, dtype=float)
    if theta0.ndim != 1 or theta0.size < 2 or np.any(~(theta0 > 0)):
        raise ValueError("weights must be two or more positive numbers, one per variant")
    theta0 = theta0 / theta0.sum()
    k = DEFAULT_SRM_CONCENTRATION if concentration is None else float(concentration)
    if not k > 0:
        raise ValueError(f"concentration must be positive, got {concentration}")
    return theta0, k * theta0


def srm_log_bayes_factor(counts: ArrayLike, weights: ArrayLike, *,
                         concentration: float | None = None) -> np.ndarray:
    """Return log BF of "assignment probabilities ~ Dirichlet(k w)" against "= w".

    Lindon and Malek (2022), closed form of the Dirichlet-multinomial marginal likelihood
    of the assignment sequence over the null multinomial likelihood:
    log BF = lgamma(sum a) - lgamma(sum a + n) + sum_i [lgamma(a_i + x_i) - lgamma(a_i)]
             - sum_i x_i log w_i,   a = k w.
    The multinomial coefficient cancels; BF is a martingale under the null. ``counts``
    may carry leading batch axes; the variants are the last axis.
    """
    theta0, prior = _srm_prior(weights, concentration)
    x = np.asarray(counts, dtype=float)
    if x.shape[-1] != theta0.size:
        raise ValueError(f"{x.shape[-1]} counts for {theta0.size} weights")
    if np.any(x < 0):
        raise ValueError("counts must be non-negative")
    n = x.sum(axis=-1)
    return (special.gammaln(prior.sum()) - special.gammaln(prior.sum() + n)
            + np.sum(special.gammaln(prior + x) - special.gammaln(prior), axis=-1)
            - np.sum(special.xlogy(x, theta0), axis=-1))


def sequential_srm_pvalue(counts: Sequence[int] | ArrayLike, weights: Sequence[float] | ArrayLike,
                          *, concentration: float | None = None) -> float:
    """Return the current sequential SRM p-value min(1, 1/BF) for unit counts per variant.

    Lindon and Malek (2022), "Anytime-valid inference for multinomial count data".
    ``weights`` are the intended allocation (normalised here), ``concentration`` the
    Dirichlet prior strength k (default 100, as Lindon's savvi). Feed each look's value to
    :class:`AlwaysValidPValue` for the running minimum, the always-valid p-value.
    """
    log_bf = float(srm_log_bayes_factor(counts, weights, concentration=concentration))
    return min(1.0, math.exp(-log_bf)) if log_bf > 0 else 1.0


# --------------------------------------------------------------------------- Lan-DeMets


class SpendingFamily(str, Enum):
    """Lan-DeMets alpha-spending functions alpha(t), t the information fraction."""

    OBRIEN_FLEMING = "obrien_fleming"  # per side 2 - 2 Phi(z_{1-alpha/4} / sqrt t)
    POCOCK = "pocock"                  # alpha ln(1 + (e - 1) t)
    POWER = "power"                    # alpha t^rho (Kim and DeMets 1987)


def obrien_fleming_spending(t: ArrayLike, alpha: float = 0.05) -> np.ndarray:
    """Return the two-sided O'Brien-Fleming-type spending: alpha/2 per side.

    Each side spends a_s(t) = 2 - 2 Phi(z_{1-a_s/2} / sqrt(t)) with a_s = alpha/2 (Lan and
    DeMets 1983), so the total is 4 - 4 Phi(z_{1-alpha/4} / sqrt(t)). This is how gsDesign
    (``sfLDOF``, test.type=2) and rpact (``asOF``, sided=2) build symmetric two-sided designs;
    applying the formula once to the total alpha instead would give lower early bounds.
    """
    _check_alpha(alpha)
    t = np.clip(np.asarray(t, dtype=float), 0.0, 1.0)
    z = norm.isf(alpha / 4.0)
    with np.errstate(divide="ignore"):
        return np.where(t > 0, 4.0 * norm.sf(z / np.sqrt(np.where(t > 0, t, 1.0))), 0.0)


def pocock_spending(t: ArrayLike, alpha: float = 0.05) -> np.ndarray:
    """Return the Pocock-type spending alpha ln(1 + (e - 1) t) (Lan and DeMets 1983)."""
    _check_alpha(alpha)
    t = np.clip(np.asarray(t, dtype=float), 0.0, 1.0)
    return alpha * np.log1p((math.e - 1.0) * t)


def power_spending(t: ArrayLike, alpha: float = 0.05, rho: float = 1.0) -> np.ndarray:
    """Return the power-family spending alpha t^rho (Kim and DeMets 1987); rho=1 is linear."""
    _check_alpha(alpha)
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho}")
    t = np.clip(np.asarray(t, dtype=float), 0.0, 1.0)
    return alpha * t**rho


@dataclass(frozen=True)
class GroupSequentialBounds:
    """Two-sided efficacy boundaries of a group-sequential design.

    Reject H0 at the first look k with |Z_k| >= ``z[k]``. ``alpha_spent[k]`` is the
    cumulative type I error alpha(t_k) spent by look k.
    """

    information_fractions: tuple[float, ...]
    z: tuple[float, ...]
    alpha_spent: tuple[float, ...]
    alpha: float
    spending: str

    @property
    def nominal_p_values(self) -> tuple[float, ...]:
        """Return the two-sided nominal p-value thresholds 2 (1 - Phi(z_k)) per look."""
        return tuple(float(2.0 * norm.sf(z)) for z in self.z)

    def first_crossing(self, z_statistics: Sequence[float]) -> int | None:
        """Return the index of the first look whose |z| reaches its bound, or None."""
        for k, (z_stat, bound) in enumerate(zip(z_statistics, self.z)):
            if abs(z_stat) >= bound:
                return k
        return None

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (tuples become lists)."""
        return {"information_fractions": list(self.information_fractions), "z": list(self.z),
                "alpha_spent": list(self.alpha_spent), "alpha": self.alpha,
                "spending": self.spending}


def _std_normal_pdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _simpson_weights(m: int, half_width: float) -> tuple[np.ndarray, np.ndarray]:
    """Return nodes and composite-Simpson weights on [-half_width, half_width], m odd."""
    x = np.linspace(-half_width, half_width, m)
    h = x[1] - x[0]
    w = np.full(m, 2.0)
    w[1::2] = 4.0
    w[0] = w[-1] = 1.0
    return x, w * h / 3.0


def group_sequential_bounds(information_fractions: Sequence[float], *, alpha: float = 0.05,
                            spending: SpendingFamily | str = SpendingFamily.OBRIEN_FLEMING,
                            rho: float = 1.0, grid_points: int = 1201) -> GroupSequentialBounds:
    """Return Lan-DeMets two-sided boundaries for looks at the given information fractions.

    The z statistic at information fraction t is W(t)/sqrt(t) for a Brownian motion W
    under H0. Look k's bound c_k solves P(|Z_k| >= c_k, no earlier crossing) =
    alpha(t_k) - alpha(t_{k-1}); the sub-density of W(t_k) on the continuation region is
    carried from look to look by numerical convolution with the normal increment density
    (Armitage, McPherson and Rowe 1969; Reboussin, DeMets, Kim, Lan 2000), here with
    composite Simpson's rule on ``grid_points`` nodes. Bounds are symmetric: each side
    spends half of alpha(t), as gsDesign (test.type=2) and rpact (sided=2); for 5 equal
    looks at alpha 0.05 the O'Brien-Fleming type gives z = 4.877, 3.357, 2.680, 2.290,
    2.031. Fractions above 1 spend all of
    alpha (alpha(t) is capped at t = 1). A look where nothing is left to spend gets an
    infinite bound.
    """
    _check_alpha(alpha)
    family = SpendingFamily(spending)
    t = np.asarray(information_fractions, dtype=float)
    if t.ndim != 1 or t.size == 0 or np.any(t <= 0) or np.any(np.diff(t) <= 0):
        raise ValueError("information fractions must be positive and strictly increasing")
    if family is SpendingFamily.OBRIEN_FLEMING:
        spent = obrien_fleming_spending(t, alpha)
    elif family is SpendingFamily.POCOCK:
        spent = pocock_spending(t, alpha)
    else:
        spent = power_spending(t, alpha, rho)
    m = grid_points if grid_points % 2 == 1 else grid_points + 1
    no_bound_sd = 12.0  # grid half width, in sd of W(t), for a look without a bound

    bounds: list[float] = []
    x = wf = None  # nodes and weight*density of W at the previous look's continuation region
    t_prev = 0.0
    spent_prev = 0.0
    for t_k, spent_k in zip(t, spent):
        increment = float(spent_k - spent_prev)
        sd = math.sqrt(t_k - t_prev)
        if x is None:
            c = float(norm.isf(increment / 2.0)) if increment > 0 else math.inf
        elif increment <= 0:
            c = math.inf
        else:
            def crossing(c_: float) -> float:
                b = c_ * math.sqrt(t_k)
                return float(wf @ (special.ndtr((-b - x) / sd) + special.ndtr((x - b) / sd))) \
                    - increment
            c = optimize.brentq(crossing, 0.0, 40.0, xtol=1e-12)
        bounds.append(c)
        half = (c if math.isfinite(c) else no_bound_sd) * math.sqrt(t_k)
        y, w = _simpson_weights(m, half)
        if x is None:
            density = _std_normal_pdf(y / math.sqrt(t_k)) / math.sqrt(t_k)
        else:
            density = _std_normal_pdf((y[:, None] - x[None, :]) / sd) @ wf / sd
        x, wf = y, w * density
        t_prev, spent_prev = float(t_k), float(spent_k)
    return GroupSequentialBounds(tuple(float(v) for v in t), tuple(bounds),
                                 tuple(float(s) for s in spent), alpha, family.value)
