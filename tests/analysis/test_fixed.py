"""Fixed-horizon tests against scipy/statsmodels on raw data and gbstats' published values."""
import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import (confint_proportions_2indep, proportion_confint,
                                          proportion_effectsize, proportions_ztest)

from analysis.fixed import (cohens_h, lift, mann_whitney, newcombe_interval, srm_pvalue,
                            welch_test, wilson_interval, z_test)
from analysis.stats import MeanStats, ProportionStats, RatioStats


def rounded(result):
    return tuple(round(x, 5) for x in (result.estimate, result.ci_low, result.ci_high,
                                       result.p_value))


# gbstats/tests/frequentist/test_tests.py (TestTwoSidedTTest)
GB_CONTROL = MeanStats(n=3407, sum=1396.87, sum_squares=52377.9767)
GB_TREATMENT = MeanStats(n=3461, sum=2422.7, sum_squares=134698.29)


def test_welch_reproduces_gbstats_relative():
    result = welch_test(GB_CONTROL, GB_TREATMENT, relative=True)
    assert rounded(result) == (0.70732, -0.03526, 1.44989, 0.06191)


def test_welch_reproduces_gbstats_absolute():
    result = welch_test(GB_CONTROL, GB_TREATMENT, relative=False)
    assert rounded(result) == (0.29, 0.04538, 0.53462, 0.02016)


def test_welch_on_proportions_reproduces_gbstats_relative():
    result = welch_test(ProportionStats(28, 14), ProportionStats(30, 16), relative=True)
    assert rounded(result)[1:] == (-0.47767, 0.61101, 0.80707)


@pytest.mark.parametrize("seed", range(5))
def test_welch_absolute_equals_scipy_on_raw_data(seed):
    rng = np.random.default_rng(seed)
    c = rng.lognormal(1.0, 1.0, size=int(rng.integers(20, 3000)))
    t = rng.lognormal(1.1, 1.2, size=int(rng.integers(20, 3000)))
    result = welch_test(MeanStats.from_values(c), MeanStats.from_values(t), alpha=0.1)
    ref = stats.ttest_ind(t, c, equal_var=False)
    ci = ref.confidence_interval(0.9)
    assert result.statistic == pytest.approx(ref.statistic, rel=1e-9)
    assert result.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-12)
    assert result.estimate == pytest.approx(t.mean() - c.mean(), rel=1e-9)
    assert (result.ci_low, result.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-9)


def test_relative_lift_variance_matches_simulated_ratios():
    rng = np.random.default_rng(11)
    n = 2000
    c = rng.exponential(2.0, size=(3000, n))
    t = rng.exponential(2.4, size=(3000, n))
    ratios = t.mean(axis=1) / c.mean(axis=1) - 1
    predicted = lift(MeanStats.from_values(c[0]), MeanStats.from_values(t[0]), True).variance
    # 3000 replicates: the empirical variance has a relative standard error near 2.6%
    assert predicted == pytest.approx(np.var(ratios, ddof=1), rel=0.12)


def test_welch_reads_ratio_metrics_through_the_delta_method():
    rng = np.random.default_rng(12)
    den = rng.poisson(3, size=(2, 5000)) + 1.0
    num = rng.binomial(den.astype(int), [[0.2], [0.22]]).astype(float)
    result = welch_test(RatioStats.from_values(num[0], den[0]),
                        RatioStats.from_values(num[1], den[1]))
    assert result.estimate == pytest.approx(num[1].sum() / den[1].sum()
                                             - num[0].sum() / den[0].sum(), rel=1e-12)
    assert result.ci_low < result.estimate < result.ci_high


@pytest.mark.parametrize("counts", [(140, 1000, 171, 1010), (14, 28, 16, 30), (0, 50, 3, 40),
                                    (4999, 100000, 5301, 99000)])
def test_z_test_matches_statsmodels(counts):
    sc, nc, st_, nt = counts
    control, treatment = ProportionStats(nc, sc), ProportionStats(nt, st_)
    result = z_test(control, treatment, alpha=0.1)
    z, p = proportions_ztest([st_, sc], [nt, nc])
    assert result.statistic == pytest.approx(z, rel=1e-9)
    assert result.p_value == pytest.approx(p, rel=1e-9)
    low, high = confint_proportions_2indep(st_, nt, sc, nc, method="newcomb", compare="diff",
                                           alpha=0.1)
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), rel=1e-9, abs=1e-12)
    if sc > 0:
        assert z_test(control, treatment, relative=True).p_value == result.p_value
    else:
        with pytest.raises(ValueError, match="non-zero control"):
            z_test(control, treatment, relative=True)


def test_z_test_relative_interval_is_the_delta_method_wald_interval():
    rng = np.random.default_rng(13)
    c, t = rng.random(4000) < 0.1, rng.random(5000) < 0.12
    result = z_test(ProportionStats.from_values(c), ProportionStats.from_values(t),
                    relative=True)
    assert result.estimate == pytest.approx(t.mean() / c.mean() - 1, rel=1e-12)
    se = np.sqrt(np.var(t) / (t.size * c.mean() ** 2)
                 + np.var(c) * t.mean() ** 2 / (c.size * c.mean() ** 4))
    assert result.ci_high - result.ci_low == pytest.approx(2 * 1.959963984540054 * se, rel=1e-9)


@pytest.mark.parametrize("count,nobs", [(0, 10), (3, 10), (10, 10), (487, 10000)])
def test_wilson_matches_statsmodels(count, nobs):
    want = proportion_confint(count, nobs, alpha=0.01, method="wilson")
    assert wilson_interval(ProportionStats(nobs, count), alpha=0.01) == pytest.approx(
        want, rel=1e-9, abs=1e-12)


def test_newcombe_matches_newcombes_published_example():
    # Newcombe (1998), Stat Med 17:873, Table II example (a): 56/70 vs 48/80, method 10
    low, high = newcombe_interval(ProportionStats(80, 48), ProportionStats(70, 56))
    assert (round(low, 4), round(high, 4)) == (0.0524, 0.3339)


@pytest.mark.parametrize("pc,pt", [(0.18, 0.162), (0.5, 0.6), (0.01, 0.001)])
def test_cohens_h_matches_statsmodels(pc, pt):
    assert cohens_h(pc, pt) == pytest.approx(proportion_effectsize(pt, pc), rel=1e-12)


@pytest.mark.parametrize("counts,weights", [([5050, 4950], [1, 1]), ([1000, 1100, 950], [1, 1, 1]),
                                            ([8210, 1790], [0.8, 0.2]), ([503, 497], [50, 50])])
def test_srm_pvalue_matches_scipy_chisquare(counts, weights):
    expected = np.sum(counts) * np.asarray(weights) / np.sum(weights)
    assert srm_pvalue(counts, weights) == pytest.approx(
        stats.chisquare(counts, expected).pvalue, rel=1e-9)


def test_srm_pvalue_rejects_mismatched_weights():
    with pytest.raises(ValueError):
        srm_pvalue([10, 20], [1, 1, 1])


@pytest.mark.parametrize("seed", range(4))
def test_mann_whitney_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    c = rng.pareto(1.5, size=300)
    t = rng.pareto(1.3, size=250)
    if seed % 2:  # heavy ties
        c, t = np.round(c), np.round(t)
    result = mann_whitney(c, t)
    ref = stats.mannwhitneyu(t, c, method="asymptotic")
    assert result.statistic == pytest.approx(ref.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(ref.pvalue, rel=1e-9)
    pairs = (t[:, None] > c[None, :]).mean() + 0.5 * (t[:, None] == c[None, :]).mean()
    assert result.prob_superiority == pytest.approx(pairs, rel=1e-12)
