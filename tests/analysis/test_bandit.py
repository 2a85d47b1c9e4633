"""Thompson weights against numerical integration of P(best) and the exact two-arm value."""
import math

import numpy as np
import pytest
from scipy import integrate, stats

from analysis.bandit import prob_best, thompson_weights
from analysis.bayesian import prob_beta_greater
from analysis.stats import MeanStats, ProportionStats

DRAWS = 200_000
TOLERANCE = 5 * 0.5 / math.sqrt(DRAWS)  # five Monte Carlo standard errors at worst


def integrated_prob_best(posteriors, low, high):
    """P(arm i best) = integral of pdf_i(x) * prod_(j != i) cdf_j(x) dx."""
    return np.array([
        integrate.quad(lambda x, i=i: posteriors[i].pdf(x) * np.prod(
            [p.cdf(x) for j, p in enumerate(posteriors) if j != i]), low, high,
            points=[p.mean() for p in posteriors], limit=200)[0]
        for i in range(len(posteriors))])


def test_three_proportion_arms_match_integration():
    arms = [ProportionStats(500, 50), ProportionStats(480, 60), ProportionStats(510, 58)]
    want = integrated_prob_best([stats.beta(1 + a.successes, 1 + a.n - a.successes)
                                 for a in arms], 0.0, 1.0)
    np.testing.assert_allclose(prob_best(arms, draws=DRAWS), want, atol=TOLERANCE)


def test_mean_arms_match_integration():
    rng = np.random.default_rng(2)
    arms = [MeanStats.from_values(rng.normal(mu, 2.0, 400)) for mu in (1.0, 1.1, 1.15, 0.9)]
    posteriors = [stats.norm(a.mean, math.sqrt(a.variance / a.n)) for a in arms]
    want = integrated_prob_best(posteriors, -5.0, 7.0)
    np.testing.assert_allclose(prob_best(arms, draws=DRAWS), want, atol=TOLERANCE)


def test_two_proportion_arms_are_exact():
    arms = [ProportionStats(1000, 100), ProportionStats(1000, 115)]
    p = prob_beta_greater(101, 901, 116, 886)
    np.testing.assert_allclose(prob_best(arms), [1 - p, p], rtol=1e-12)


def test_floor_keeps_every_arm_and_weights_sum_to_one():
    arms = [ProportionStats(5000, 100), ProportionStats(5000, 300), ProportionStats(5000, 150)]
    weights = thompson_weights(arms, floor=0.05)
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert weights.min() >= 0.05
    assert np.argmax(weights) == 1
    np.testing.assert_array_equal(weights, thompson_weights(arms, floor=0.05))


def test_rejects_bad_floor_and_mixed_arms():
    arms = [ProportionStats(10, 1), ProportionStats(10, 2)]
    with pytest.raises(ValueError, match="floor"):
        thompson_weights(arms, floor=0.6)
    with pytest.raises(TypeError):
        prob_best([ProportionStats(10, 1), MeanStats(3, 1.0, 2.0)])
