"""compare() dispatches to the named test and adjusts CUPED arms first."""
import numpy as np
import pytest
from scipy import stats

from analysis import sequential
from analysis.bayesian import GaussianPrior, beta_binomial_test, gaussian_test
from analysis.compare import compare
from analysis.fixed import welch_test, z_test
from analysis.stats import CupedStats, MeanStats, ProportionStats

PC, PT = ProportionStats(1000, 100), ProportionStats(1000, 125)
MC, MT = MeanStats(n=3407, sum=1396.87, sum_squares=52377.9767), \
    MeanStats(n=3461, sum=2422.7, sum_squares=134698.29)


@pytest.mark.parametrize("method,test,arms", [
    ("z", z_test, (PC, PT)), ("welch", welch_test, (MC, MT)),
    ("bayesian", gaussian_test, (MC, MT)), ("beta_binomial", beta_binomial_test, (PC, PT)),
    ("msprt", sequential.msprt, (MC, MT)), ("sequential", sequential.confidence_sequence, (MC, MT)),
])
@pytest.mark.parametrize("relative", [False, True])
def test_compare_dispatches_to_the_named_test(method, test, arms, relative):
    assert compare(*arms, method=method, relative=relative, alpha=0.1) == test(
        *arms, relative=relative, alpha=0.1)


def test_compare_passes_options():
    prior = GaussianPrior(0.0, 0.01)
    assert compare(MC, MT, method="bayesian", prior=prior) == gaussian_test(MC, MT, prior=prior)


def test_default_is_welch_and_matches_scipy_on_raw_data():
    rng = np.random.default_rng(3)
    c, t = rng.exponential(1.0, 500), rng.exponential(1.2, 600)
    result = compare(MeanStats.from_values(c), MeanStats.from_values(t))
    assert result.method == "welch"
    assert result.p_value == pytest.approx(stats.ttest_ind(t, c, equal_var=False).pvalue,
                                           rel=1e-9)


def test_cuped_arms_are_adjusted_and_narrow_the_interval():
    rng = np.random.default_rng(4)
    xc, xt = rng.normal(5, 1, 2000), rng.normal(5, 1, 2000)
    yc, yt = xc + rng.normal(0, 0.5, 2000), xt + 0.05 + rng.normal(0, 0.5, 2000)
    cuped = compare(CupedStats.from_values(yc, xc), CupedStats.from_values(yt, xt))
    plain = compare(MeanStats.from_values(yc), MeanStats.from_values(yt))
    assert cuped.ci_high - cuped.ci_low < (plain.ci_high - plain.ci_low) / 1.5


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError, match="welch.*msprt"):
        compare(MC, MT, method="t")


def test_proportion_only_methods_reject_means():
    with pytest.raises(TypeError, match="ProportionStats"):
        compare(MC, MT, method="z")
