"""Anytime-valid tests against independent references.

References: GrowthBook's own test suite (published values), direct numerical integration
of the mixture likelihood ratio on raw data (scipy.integrate.quad), scipy's
Dirichlet-multinomial and multinomial pmfs, scipy's multivariate normal CDF (Genz) for
group-sequential crossing probabilities, published gsDesign/rpact boundaries, and
Monte Carlo for time-uniform error rates.
"""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from analysis.sequential import (AlwaysValidInterval, AlwaysValidPValue, SpendingFamily,
                                 confidence_sequence, confidence_sequence_halfwidth,
                                 confidence_sequence_p_value, default_tau2,
                                 group_sequential_bounds, mixture_p_value, msprt,
                                 obrien_fleming_spending, pocock_spending, power_spending,
                                 sequential_srm_pvalue, srm_log_bayes_factor)
from analysis.stats import MeanStats, ProportionStats


def rounded(result):
    return tuple(round(x, 5) for x in (result.estimate, result.ci_low, result.ci_high,
                                       result.p_value))


# --------------------------------------------------------------------------- gbstats values
# growthbook/growthbook packages/stats/tests/frequentist/test_tests.py,
# class TestSequentialTTest (gbstats SequentialTwoSidedTTest; relative lift is gbstats'
# default difference type; values rounded to 5 decimals as that suite does).


def test_confidence_sequence_reproduces_gbstats_means_tuning_1000():
    # test_sequential_test_runs: SequentialConfig(sequential_tuning_parameter=1000)
    control = MeanStats(n=3000, sum=1396.87, sum_squares=52377.9767)
    treatment = MeanStats(n=3461, sum=2422.7, sum_squares=134698.29)
    result = confidence_sequence(control, treatment, relative=True, n_star=1000)
    assert rounded(result) == (0.50336, -0.55844, 1.56516, 1.0)
    assert round(result.estimate / result.statistic, 5) == 0.33341  # uplift stddev


def test_confidence_sequence_reproduces_gbstats_proportions_default_tuning():
    # test_sequential_test_runs_prop: default config (N* = 5000)
    result = confidence_sequence(ProportionStats(3000, 1396), ProportionStats(3461, 2422),
                                 relative=True)
    assert rounded(result) == (0.50386, 0.40098, 0.60675, 0.0)
    assert round(result.estimate / result.statistic, 5) == 0.03386


def test_confidence_sequence_is_narrowest_near_n_star_as_gbstats_tuning_test():
    # test_sequential_test_tuning_as_expected: N* = 10 and 10000 are wider than 6461 (= n)
    control = MeanStats(n=3000, sum=1396.87, sum_squares=52377.9767)
    treatment = MeanStats(n=3461, sum=2422.7, sum_squares=134698.29)
    width = {n_star: (r.ci_high - r.ci_low) for n_star in (10, 6461, 10000)
             for r in [confidence_sequence(control, treatment, relative=True, n_star=n_star)]}
    assert width[6461] < width[10000] < width[10]


# --------------------------------------------------------------------------- mSPRT vs quad


def mixture_lr_by_quadrature(estimate, variance, tau2, theta0=0.0):
    """Lambda = int N(d; theta, V) N(theta; theta0, tau2) dtheta / N(d; theta0, V)."""
    sd, tau = math.sqrt(variance), math.sqrt(tau2)
    numerator, _ = integrate.quad(
        lambda theta: stats.norm.pdf(estimate, theta, sd) * stats.norm.pdf(theta, theta0, tau),
        theta0 - 40 * tau, theta0 + 40 * tau, points=[estimate], limit=400,
        epsabs=0, epsrel=1e-11)
    return numerator / stats.norm.pdf(estimate, theta0, sd)


@pytest.mark.parametrize("seed,shift,tau2", [(0, 0.0, 0.01), (1, 0.05, 0.01), (2, 0.08, 0.002),
                                             (3, -0.03, 0.05), (4, 0.02, None)])
def test_msprt_p_value_equals_numerical_mixture_on_raw_means(seed, shift, tau2):
    rng = np.random.default_rng(seed)
    c = rng.normal(1.0, 1.0, size=int(rng.integers(500, 3000)))
    t = rng.normal(1.0 + shift, 1.3, size=int(rng.integers(500, 3000)))
    result = msprt(MeanStats.from_values(c), MeanStats.from_values(t), tau2=tau2)
    d = t.mean() - c.mean()
    v = np.var(t, ddof=1) / t.size + np.var(c, ddof=1) / c.size
    if tau2 is None:  # documented default: rho(0.05, 5000)^2 times the per-unit variance
        rho2 = (-2 * math.log(0.05) + math.log(-2 * math.log(0.05) + 1)) / 5000
        tau2 = rho2 * v * (c.size + t.size)
    lam = mixture_lr_by_quadrature(d, v, tau2)
    assert result.estimate == pytest.approx(d, rel=1e-9)
    assert result.p_value == pytest.approx(min(1.0, 1.0 / lam), rel=1e-7)
    assert result.statistic == pytest.approx(math.log(lam), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_msprt_interval_ends_are_where_the_mixture_reaches_one_over_alpha(seed):
    rng = np.random.default_rng(10 + seed)
    c, t = rng.normal(0, 2, 1500), rng.normal(0.2, 2, 1700)
    result = msprt(MeanStats.from_values(c), MeanStats.from_values(t), alpha=0.1, tau2=0.04)
    d = t.mean() - c.mean()
    v = np.var(t, ddof=1) / t.size + np.var(c, ddof=1) / c.size
    for end in (result.ci_low, result.ci_high):
        # the interval is {theta : Lambda for H0: effect = theta is < 1/alpha}
        assert mixture_lr_by_quadrature(d, v, 0.04, theta0=end) == pytest.approx(10.0, rel=1e-6)


def test_msprt_relative_on_proportions_matches_quadrature_with_numeric_delta_method():
    rng = np.random.default_rng(7)
    c, t = rng.random(20000) < 0.10, rng.random(21000) < 0.112
    result = msprt(ProportionStats.from_values(c), ProportionStats.from_values(t),
                   relative=True, tau2=0.05**2)
    mc, mt = c.mean(), t.mean()
    cov = np.diag([mc * (1 - mc) / c.size, mt * (1 - mt) / t.size])
    # gradient of g(mc, mt) = mt / mc - 1 by central differences, not the closed form
    h = 1e-7
    grad = np.array([((mt / (mc + h)) - (mt / (mc - h))) / (2 * h),
                     (((mt + h) / mc) - ((mt - h) / mc)) / (2 * h)])
    v = grad @ cov @ grad
    lam = mixture_lr_by_quadrature(mt / mc - 1, v, 0.05**2)
    assert result.p_value == pytest.approx(min(1.0, 1 / lam), rel=1e-5)


def test_msprt_with_default_tau2_is_the_same_mixture_as_the_confidence_sequence():
    control = MeanStats(n=3000, sum=1396.87, sum_squares=52377.9767)
    treatment = MeanStats(n=3461, sum=2422.7, sum_squares=134698.29)
    for relative in (False, True):
        a = msprt(control, treatment, relative=relative)
        b = confidence_sequence(control, treatment, relative=relative)
        assert (a.ci_low, a.ci_high, a.p_value) == pytest.approx((b.ci_low, b.ci_high, b.p_value),
                                                                 rel=1e-12)


def test_default_tau2_scales_with_the_per_unit_variance():
    assert default_tau2(2.0) == pytest.approx(2 * default_tau2(1.0))
    assert default_tau2(1.0, n_star=1000) == pytest.approx(5 * default_tau2(1.0, n_star=5000))


# --------------------------------------------------------------------------- Monte Carlo


def normal_streams(rng, streams, looks, batch, shift=0.0):
    """Cumulative (n, sum, sum of squares) per arm and look for normal(0 / shift, 1) units."""
    out = []
    for mu in (0.0, shift):
        x = rng.normal(mu, 1.0, size=(streams, looks, batch))
        out.append((np.full((streams, looks), batch) * np.arange(1, looks + 1),
                    np.cumsum(x.sum(axis=2), axis=1), np.cumsum((x * x).sum(axis=2), axis=1)))
    return out


def test_confidence_sequence_has_time_uniform_coverage_by_simulation():
    rng = np.random.default_rng(2024)
    streams, looks, batch, shift, alpha = 400, 60, 50, 0.1, 0.05
    (nc, sc, qc), (nt, stt, qt) = normal_streams(rng, streams, looks, batch, shift)
    missed = np.zeros(streams, dtype=bool)
    fixed_missed = np.zeros(streams, dtype=bool)
    for i in range(streams):
        for k in range(looks):
            control = MeanStats(int(nc[i, k]), float(sc[i, k]), float(qc[i, k]))
            treatment = MeanStats(int(nt[i, k]), float(stt[i, k]), float(qt[i, k]))
            result = confidence_sequence(control, treatment, alpha=alpha)
            missed[i] |= not result.ci_low <= shift <= result.ci_high
            z = (result.estimate - shift) / (result.estimate / result.statistic)
            fixed_missed[i] |= abs(z) > 1.959964
    se = math.sqrt(alpha * (1 - alpha) / streams)
    assert missed.mean() <= alpha + 3 * se
    # the same streams read with a fixed-horizon 95% interval at every look miss far more
    assert fixed_missed.mean() > 3 * alpha


def test_msprt_false_positive_rate_under_continuous_monitoring():
    rng = np.random.default_rng(99)
    streams, looks, batch, alpha = 1000, 100, 40, 0.05
    (nc, sc, qc), (nt, stt, qt) = normal_streams(rng, streams, looks, batch)
    var_c = (qc - sc**2 / nc) / (nc - 1)
    var_t = (qt - stt**2 / nt) / (nt - 1)
    d = stt / nt - sc / nc
    v = var_c / nc + var_t / nt
    p = mixture_p_value(d, v, tau2=0.05**2)
    rejected = (p <= alpha).any(axis=1)
    assert rejected.mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / streams)
    # spot-check the vectorised kernel against the public function on one look
    i, k = 3, 17
    result = msprt(MeanStats(int(nc[i, k]), sc[i, k], qc[i, k]),
                   MeanStats(int(nt[i, k]), stt[i, k], qt[i, k]), tau2=0.05**2)
    assert result.p_value == pytest.approx(p[i, k], rel=1e-12)


# --------------------------------------------------------------------------- sequential SRM


@pytest.mark.parametrize("counts,weights,k", [((480, 520), (0.5, 0.5), 100.0),
                                              ((10, 300, 190), (0.1, 0.5, 0.4), 1.0),
                                              ((5230, 4770), (1, 1), 100.0),
                                              ((0, 7), (0.3, 0.7), 10.0)])
def test_srm_bayes_factor_equals_dirichlet_multinomial_over_multinomial(counts, weights, k):
    w = np.asarray(weights, float) / np.sum(weights)
    n = int(np.sum(counts))
    ref = (stats.dirichlet_multinomial.logpmf(counts, k * w, n)
           - stats.multinomial.logpmf(counts, n, w))
    assert srm_log_bayes_factor(counts, weights, concentration=k) == pytest.approx(ref, rel=1e-9)


def test_sequential_srm_false_positive_rate_under_continuous_monitoring():
    rng = np.random.default_rng(5)
    streams, looks, batch, alpha = 2000, 100, 200, 0.05
    treated = np.cumsum(rng.binomial(batch, 0.5, size=(streams, looks)), axis=1)
    n = batch * np.arange(1, looks + 1)
    counts = np.stack([n - treated, treated], axis=-1)
    log_bf = srm_log_bayes_factor(counts, (0.5, 0.5))
    rejected = (log_bf >= math.log(1 / alpha)).any(axis=1)
    assert rejected.mean() <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / streams)
    assert sequential_srm_pvalue(counts[0, -1], (0.5, 0.5)) == pytest.approx(
        min(1.0, math.exp(-log_bf[0, -1])))


def test_sequential_srm_detects_a_52_48_split():
    rng = np.random.default_rng(6)
    state = AlwaysValidPValue()
    counts = np.zeros(2, dtype=int)
    for _ in range(100):  # looks after every 200 units, 20,000 in all
        treated = rng.binomial(200, 0.48)
        counts += (200 - treated, treated)
        state = state.update(sequential_srm_pvalue(counts, (0.5, 0.5)))
    assert state.p_value < 0.001
    assert state.looks == 100
    # and an exact 50/50 split is no evidence at all
    assert sequential_srm_pvalue((10000, 10000), (0.5, 0.5)) == 1.0


def test_sequential_srm_rejects_bad_input():
    with pytest.raises(ValueError):
        sequential_srm_pvalue((10, 10), (0.5, 0.0))
    with pytest.raises(ValueError):
        sequential_srm_pvalue((10, 10, 3), (0.5, 0.5))
    with pytest.raises(ValueError):
        sequential_srm_pvalue((10, 10), (0.5, 0.5), concentration=0)


# --------------------------------------------------------------------------- Lan-DeMets


def test_obrien_fleming_bounds_reproduce_published_five_look_design():
    # gsDesign(k=5, test.type=2, alpha=0.025, sfu=sfLDOF) / rpact asOF, sided=2, alpha=0.05
    design = group_sequential_bounds([0.2, 0.4, 0.6, 0.8, 1.0], alpha=0.05)
    assert design.z == pytest.approx((4.877, 3.357, 2.680, 2.290, 2.031), abs=6e-4)
    assert design.alpha_spent[-1] == pytest.approx(0.05)


def crossing_probabilities(fractions, bounds):
    """P(first |Z| >= bound by look k) by scipy's multivariate normal CDF (Genz)."""
    t = np.asarray(fractions)
    cov = np.sqrt(np.minimum.outer(t, t) / np.maximum.outer(t, t))
    out = []
    for k in range(1, len(t) + 1):
        b = np.asarray(bounds[:k])
        mvn = stats.multivariate_normal(np.zeros(k), cov[:k, :k], maxpts=500_000,
                                        abseps=2e-6, releps=1e-6)
        inside = mvn.cdf(b, lower_limit=-b, rng=np.random.default_rng(k))
        out.append(1 - inside)
    return np.array(out)


@pytest.mark.parametrize("fractions,family,rho", [
    ([0.2, 0.4, 0.6, 0.8, 1.0], "obrien_fleming", 1.0),
    ([0.2, 0.4, 0.6, 0.8, 1.0], "pocock", 1.0),
    ([0.2, 0.4, 0.6, 0.8, 1.0], "power", 1.0),
    ([0.1, 0.35, 0.5, 0.9, 1.0], "power", 3.0),
    ([0.25, 0.5, 0.75, 1.0], "obrien_fleming", 1.0),
])
def test_bounds_spend_alpha_as_planned_by_multivariate_normal(fractions, family, rho):
    design = group_sequential_bounds(fractions, alpha=0.05, spending=family, rho=rho)
    assert crossing_probabilities(fractions, design.z) == pytest.approx(
        design.alpha_spent, abs=2e-5)


def test_bounds_crossing_probability_by_monte_carlo():
    rng = np.random.default_rng(8)
    fractions = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    paths = 400_000
    increments = rng.normal(size=(paths, 5)) * np.sqrt(np.diff(fractions, prepend=0.0))
    z = np.cumsum(increments, axis=1) / np.sqrt(fractions)
    for family in SpendingFamily:
        design = group_sequential_bounds(fractions, alpha=0.05, spending=family)
        rate = (np.abs(z) >= np.asarray(design.z)).any(axis=1).mean()
        assert rate == pytest.approx(0.05, abs=3 * math.sqrt(0.05 * 0.95 / paths))


def test_spending_functions_reach_alpha_and_start_at_zero():
    t = np.array([0.0, 0.3, 1.0])
    for spent in (obrien_fleming_spending(t, 0.05), pocock_spending(t, 0.05),
                  power_spending(t, 0.05, 2.0)):
        assert spent[0] == 0 and spent[-1] == pytest.approx(0.05) and 0 < spent[1] < 0.05
    assert power_spending(0.3, 0.05, 2.0) == pytest.approx(0.05 * 0.09)
    # per side, O'Brien-Fleming type is the one-sided 2 - 2 Phi(z_{1-a/2} / sqrt t), a = alpha/2
    assert obrien_fleming_spending(0.3, 0.05) == pytest.approx(
        2 * 2 * stats.norm.sf(stats.norm.isf(0.0125) / math.sqrt(0.3)))


def test_design_first_crossing_and_nominal_levels():
    design = group_sequential_bounds([0.5, 1.0], spending="pocock")
    assert design.first_crossing([1.0, 2.5]) == 1
    assert design.first_crossing([-3.0, 0.0]) == 0
    assert design.first_crossing([0.0, 0.0]) is None
    assert design.nominal_p_values[0] == pytest.approx(2 * stats.norm.sf(design.z[0]))
    assert design.to_dict()["spending"] == "pocock"
    with pytest.raises(ValueError):
        group_sequential_bounds([0.5, 0.5, 1.0])


# --------------------------------------------------------------------------- properties

arms = st.tuples(st.integers(2, 100_000), st.floats(0.01, 0.99))


@settings(max_examples=150, deadline=None)
@given(arms, arms, st.floats(0.001, 0.3), st.booleans(),
       st.one_of(st.none(), st.floats(1e-6, 1.0)))
def test_p_values_in_unit_interval_and_intervals_contain_estimate(a, b, alpha, relative, tau2):
    control = ProportionStats(a[0], max(1, min(a[0] - 1, round(a[0] * a[1]))))
    treatment = ProportionStats(b[0], max(1, min(b[0] - 1, round(b[0] * b[1]))))
    for result in (msprt(control, treatment, alpha=alpha, relative=relative, tau2=tau2),
                   confidence_sequence(control, treatment, alpha=alpha, relative=relative)):
        assert 0.0 <= result.p_value <= 1.0
        assert result.ci_low < result.estimate < result.ci_high
        # p <= alpha exactly when the interval of the same alpha excludes 0
        if abs(result.p_value - alpha) > 1e-9:
            assert (result.p_value <= alpha) == (not result.ci_low <= 0 <= result.ci_high)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=30))
def test_always_valid_p_value_is_the_running_minimum(ps):
    state = AlwaysValidPValue()
    for p in ps:
        state = state.update(p)
    assert state.p_value == min(ps) and state.looks == len(ps)
    assert AlwaysValidPValue.from_dict(state.to_dict()) == state


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-10, 10), st.floats(0, 5)), min_size=1, max_size=30))
def test_always_valid_interval_is_the_running_intersection(intervals):
    state = AlwaysValidInterval()
    for centre, half in intervals:
        state = state.update(centre - half, centre + half)
    assert state.low == max(c - h for c, h in intervals)
    assert state.high == min(c + h for c, h in intervals)
    assert AlwaysValidInterval.from_dict(state.to_dict()) == state


def test_vectorised_kernels_match_the_public_functions():
    control, treatment = ProportionStats(5000, 510), ProportionStats(5100, 580)
    result = confidence_sequence(control, treatment, alpha=0.1, n_star=2000)
    v = (result.estimate / result.statistic) ** 2
    half = confidence_sequence_halfwidth(np.array([v, v]), np.array([10100, 10100]),
                                         alpha=0.1, n_star=2000)
    assert half == pytest.approx([result.ci_high - result.estimate] * 2, rel=1e-12)
    assert confidence_sequence_p_value(result.estimate, v, 10100, alpha=0.1,
                                       n_star=2000) == pytest.approx(result.p_value, rel=1e-12)


def test_degenerate_input_raises():
    with pytest.raises(ValueError, match="zero variance"):
        msprt(ProportionStats(100, 0), ProportionStats(100, 0))
    with pytest.raises(ValueError, match="alpha"):
        confidence_sequence(ProportionStats(100, 10), ProportionStats(100, 12), alpha=1.5)
    with pytest.raises(ValueError, match="tau2"):
        msprt(ProportionStats(100, 10), ProportionStats(100, 12), tau2=0.0)
    with pytest.raises(ValueError):
        AlwaysValidPValue().update(1.2)
