"""Bayesian tests against gbstats' published values, Monte Carlo and scipy integration."""
import math

import numpy as np
import pytest
from scipy import integrate, stats
from statsmodels.stats.weightstats import CompareMeans, DescrStatsW

from analysis.bayesian import GaussianPrior, beta_binomial_test, gaussian_test, prob_beta_greater
from analysis.stats import MeanStats, ProportionStats

DRAWS = 2_000_000


def test_gaussian_reproduces_gbstats_relative_proportions():
    # gbstats/tests/bayesian/test_tests.py: 49/100 vs 51/100, relative, flat prior
    result = gaussian_test(ProportionStats(100, 49), ProportionStats(100, 51), relative=True)
    got = [round(x, 5) for x in (result.estimate, result.ci_low, result.ci_high,
                                 result.chance_to_win, *result.risk)]
    assert got == [0.04082, -0.24779, 0.32943, 0.60918, 0.0814, 0.04058]
    assert math.isnan(result.p_value)


@pytest.mark.parametrize("params", [(1, 1, 1, 1), (50, 950, 61, 940), (13, 7, 3, 30),
                                    (401, 2, 380, 5), (120, 900, 7, 100)])
def test_prob_beta_greater_matches_scipy_integration(params):
    a, b, c, d = params
    x, y = stats.beta(a, b), stats.beta(c, d)
    want, _ = integrate.quad(lambda p: y.pdf(p) * x.cdf(p), 0, 1, epsabs=1e-13, limit=500,
                             points=[x.mean(), y.mean()])
    assert prob_beta_greater(a, b, c, d) == pytest.approx(want, abs=1e-10)


def test_prob_beta_greater_matches_monte_carlo():
    rng = np.random.default_rng(20240601)
    a, b, c, d = 101, 901, 121, 881
    wins = np.mean(rng.beta(c, d, DRAWS) > rng.beta(a, b, DRAWS))
    se = math.sqrt(wins * (1 - wins) / DRAWS)
    assert prob_beta_greater(a, b, c, d) == pytest.approx(wins, abs=5 * se)


def test_prob_beta_greater_is_symmetric_and_rejects_non_integers():
    assert prob_beta_greater(30, 70, 40, 60) + prob_beta_greater(40, 60, 30, 70) == \
        pytest.approx(1.0, abs=1e-13)
    with pytest.raises(ValueError):
        prob_beta_greater(1.5, 2, 3, 4)


@pytest.mark.parametrize("relative", [False, True])
def test_beta_binomial_matches_monte_carlo(relative):
    control, treatment = ProportionStats(1000, 100), ProportionStats(1000, 121)
    result = beta_binomial_test(control, treatment, relative=relative, alpha=0.1)
    rng = np.random.default_rng(7)
    pc = rng.beta(101, 901, DRAWS)
    pt = rng.beta(122, 880, DRAWS)
    lifts = pt / pc - 1 if relative else pt - pc

    def close(value, samples):
        se = np.std(samples) / math.sqrt(DRAWS)
        assert value == pytest.approx(np.mean(samples), abs=5 * se)

    close(result.estimate, lifts)
    close(result.chance_to_win, lifts > 0)
    close(result.risk[0], np.maximum(lifts, 0))
    close(result.risk[1], np.maximum(-lifts, 0))
    for q, bound in ((0.05, result.ci_low), (0.95, result.ci_high)):
        close(q, lifts <= bound)


def test_beta_binomial_credible_interval_is_fast_and_narrow_for_large_arms():
    result = beta_binomial_test(ProportionStats(10**6, 100_000), ProportionStats(10**6, 101_000))
    normal = stats.norm(0.001, math.sqrt(2 * 0.1 * 0.9 / 1e6))
    assert (result.ci_low, result.ci_high) == pytest.approx(
        (normal.ppf(0.025), normal.ppf(0.975)), abs=2e-6)
    assert result.chance_to_win == pytest.approx(normal.sf(0), abs=1e-3)


def test_gaussian_flat_prior_equals_statsmodels_z_interval_on_raw_data():
    rng = np.random.default_rng(8)
    c, t = rng.normal(10, 3, 4000), rng.normal(10.2, 3.5, 3500)
    result = gaussian_test(MeanStats.from_values(c), MeanStats.from_values(t))
    compare = CompareMeans(DescrStatsW(t), DescrStatsW(c))
    assert (result.ci_low, result.ci_high) == pytest.approx(
        compare.zconfint_diff(usevar="unequal"), rel=1e-9)
    # with a flat prior P(lift > 0) = Phi(z), the one-sided p-value against "smaller"
    _, phi_z = compare.ztest_ind(usevar="unequal", alternative="smaller")
    assert result.chance_to_win == pytest.approx(phi_z, rel=1e-9)


def test_gaussian_proper_prior_matches_numerical_posterior():
    control, treatment = MeanStats.from_values([1.0, 2, 4, 3, 5]), MeanStats.from_values(
        [2.0, 4, 3, 6, 7, 5])
    prior = GaussianPrior(mean=0.0, variance=0.5)
    result = gaussian_test(control, treatment, prior=prior)
    estimate = treatment.mean - control.mean
    se = math.sqrt(treatment.variance / treatment.n + control.variance / control.n)

    def posterior(x):
        return stats.norm.pdf(estimate, x, se) * stats.norm.pdf(x, 0.0, math.sqrt(0.5))

    mass = integrate.quad(posterior, -20, 20)[0]
    mean = integrate.quad(lambda x: x * posterior(x), -20, 20)[0] / mass
    win = integrate.quad(posterior, 0, 20)[0] / mass
    loss_treatment = integrate.quad(lambda x: -x * posterior(x), -20, 0)[0] / mass
    assert result.estimate == pytest.approx(mean, rel=1e-8)
    assert result.chance_to_win == pytest.approx(win, rel=1e-8)
    assert result.risk[1] == pytest.approx(loss_treatment, rel=1e-7)
    assert abs(result.estimate) < abs(estimate)
