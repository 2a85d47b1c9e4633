"""Per-arm statistics against numpy/statsmodels on raw data, and merge/dict properties.

Property tests draw integer-valued floats, so every sum is exact in float64 and merged
statistics can be compared with ``==``.
"""
import json
import math

import numpy as np
import pytest
import statsmodels.api as sm
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.stats import (CupedStats, MeanStats, ProportionStats, RatioStats, cuped_adjust,
                            pooled_theta)

ints = st.lists(st.integers(-1000, 1000), max_size=40)
bits = st.lists(st.booleans(), max_size=40)
pairs = st.lists(st.tuples(st.integers(-1000, 1000), st.integers(-1000, 1000)), max_size=40)


def build(kind, raw):
    """Return a statistic of ``kind`` from a list of raw unit values (ints or int pairs)."""
    if kind is ProportionStats or kind is MeanStats:
        return kind.from_values(np.asarray(raw, dtype=float if kind is MeanStats else bool))
    a = np.array([x for x, _ in raw], dtype=float)
    b = np.array([y for _, y in raw], dtype=float)
    return kind.from_values(a, b)


KINDS = [(ProportionStats, bits), (MeanStats, ints), (RatioStats, pairs), (CupedStats, pairs)]


@pytest.mark.parametrize("kind,raw", KINDS, ids=lambda k: getattr(k, "__name__", ""))
def test_merge_is_associative_commutative_and_equals_concatenation(kind, raw):
    @settings(max_examples=60, deadline=None)
    @given(raw, raw, raw)
    def check(a, b, c):
        sa, sb, sc = build(kind, a), build(kind, b), build(kind, c)
        assert (sa + sb) + sc == sa + (sb + sc)
        assert sa.merge(sb) == sb.merge(sa)
        assert sa + sb + sc == build(kind, a + b + c)

    check()


@pytest.mark.parametrize("kind,raw", KINDS, ids=lambda k: getattr(k, "__name__", ""))
def test_dict_round_trip_through_json(kind, raw):
    @settings(max_examples=60, deadline=None)
    @given(raw)
    def check(a):
        stat = build(kind, a)
        assert kind.from_dict(json.loads(json.dumps(stat.to_dict()))) == stat

    check()


def test_update_on_existing_equals_concatenation():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=100), rng.normal(size=57)
    got = MeanStats.from_values(a).update(b)
    want = MeanStats.from_values(np.concatenate([a, b]))
    assert got.n == want.n
    assert math.isclose(got.sum, want.sum, rel_tol=1e-12)
    assert math.isclose(got.sum_squares, want.sum_squares, rel_tol=1e-12)


def test_from_dict_rejects_wrong_keys_and_merge_rejects_other_kinds():
    with pytest.raises(ValueError, match="successes"):
        ProportionStats.from_dict({"n": 3})
    with pytest.raises(TypeError):
        ProportionStats(1, 1).merge(MeanStats(1, 1.0, 1.0))
    with pytest.raises(ValueError):
        ProportionStats(2, 3)
    with pytest.raises(ValueError):
        ProportionStats.from_values([0, 2])
    with pytest.raises(ValueError, match="at least 2"):
        _ = MeanStats(1, 1.0, 1.0).variance


def test_proportion_mean_and_variance_match_numpy():
    values = np.random.default_rng(2).random(1000) < 0.3
    stat = ProportionStats.from_values(values)
    assert stat.mean == pytest.approx(np.mean(values), rel=1e-12)
    assert stat.variance == pytest.approx(np.var(values), rel=1e-12)


def test_mean_and_variance_match_numpy():
    values = np.random.default_rng(3).lognormal(2.0, 1.0, size=5000)
    stat = MeanStats.from_values(values)
    assert stat.mean == pytest.approx(np.mean(values), rel=1e-12)
    assert stat.variance == pytest.approx(np.var(values, ddof=1), rel=1e-9)


def test_late_outcomes_move_sums_to_those_of_final_unit_totals():
    rng = np.random.default_rng(4)
    for _ in range(20):
        totals = np.zeros(int(rng.integers(2, 60)))
        stat = MeanStats(0, 0.0, 0.0)
        for total in totals:
            stat = stat.add_unit(float(total))
        covariates = rng.normal(size=totals.size)
        cuped = CupedStats.from_values(totals, covariates)
        for _ in range(int(rng.integers(0, 300))):
            unit = int(rng.integers(totals.size))
            new = totals[unit] + rng.exponential(3.0)
            stat = stat.move_unit(float(totals[unit]), float(new))
            cuped = cuped.move_unit(float(totals[unit]), float(new), float(covariates[unit]))
            totals[unit] = new
        want = MeanStats.from_values(totals)
        assert stat.n == want.n
        assert math.isclose(stat.sum, want.sum, rel_tol=1e-12)
        assert math.isclose(stat.sum_squares, want.sum_squares, rel_tol=1e-12)
        assert stat.variance == pytest.approx(np.var(totals, ddof=1), rel=1e-9, abs=1e-12)
        want_cuped = CupedStats.from_values(totals, covariates)
        for name in ("sum", "sum_squares", "sum_product"):
            assert math.isclose(getattr(cuped, name), getattr(want_cuped, name),
                                rel_tol=1e-9, abs_tol=1e-9)


def test_ratio_variance_is_numpy_covariance_through_the_delta_gradient():
    rng = np.random.default_rng(5)
    den = rng.poisson(5.0, size=3000) + 1.0
    num = rng.binomial(den.astype(int), 0.2) + rng.normal(0, 0.1, size=den.size)
    stat = RatioStats.from_values(num, den)
    assert stat.mean == pytest.approx(num.sum() / den.sum(), rel=1e-12)
    gradient = np.array([1 / den.mean(), -num.mean() / den.mean() ** 2])
    assert stat.variance == pytest.approx(gradient @ np.cov(num, den) @ gradient, rel=1e-9)


def test_ratio_delta_variance_matches_replicated_ratios():
    rng = np.random.default_rng(6)
    n, replicates = 400, 4000
    den = rng.poisson(4.0, size=(replicates, n)) + 1.0
    num = rng.binomial(den.astype(int), 0.3).astype(float)
    ratios = num.sum(axis=1) / den.sum(axis=1)
    predicted = np.mean([RatioStats.from_values(num[i], den[i]).variance / n
                         for i in range(200)])
    # the empirical variance of 4000 replicates has a relative standard error near 2.2%
    assert predicted == pytest.approx(np.var(ratios, ddof=1), rel=0.08)


def test_cuped_theta_and_effect_equal_ols_with_arm_intercepts():
    rng = np.random.default_rng(7)
    xc, xt = rng.normal(10, 2, 800), rng.normal(10.3, 2, 900)
    yc = 2 + 0.8 * xc + rng.normal(0, 1, xc.size)
    yt = 2.5 + 0.8 * xt + rng.normal(0, 1, xt.size)
    control, treatment = CupedStats.from_values(yc, xc), CupedStats.from_values(yt, xt)
    design = sm.add_constant(np.column_stack([np.concatenate([xc, xt]),
                                              np.r_[np.zeros(xc.size), np.ones(xt.size)]]))
    ols = sm.OLS(np.concatenate([yc, yt]), design).fit()
    theta = pooled_theta(control, treatment)
    assert theta == pytest.approx(ols.params[1], rel=1e-9)
    adjusted_c, adjusted_t = cuped_adjust(control, treatment)
    assert adjusted_t.mean - adjusted_c.mean == pytest.approx(ols.params[2], rel=1e-9)
    x_mean = np.concatenate([xc, xt]).mean()
    assert adjusted_c.mean == pytest.approx(np.mean(yc - theta * (xc - x_mean)), rel=1e-12)
    assert adjusted_t.variance == pytest.approx(np.var(yt - theta * xt, ddof=1), rel=1e-9)
    assert adjusted_t.variance < treatment.metric.variance / 2


def test_pooled_theta_is_zero_for_a_constant_covariate():
    a = CupedStats.from_values([1.0, 2.0, 3.0], [5.0, 5.0, 5.0])
    assert pooled_theta(a, a) == 0.0
