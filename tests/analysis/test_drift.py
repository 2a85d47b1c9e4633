"""Drift measures against scipy on the raw data and on the same bin shares."""
import numpy as np
import pytest
from scipy import stats
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr

from analysis.drift import PsiBand, js_divergence, ks_binned, psi
from analysis.sketch import Histogram

EDGES = tuple(np.linspace(0.0, 1.0, 11))


def scores(seed, a, b, n):
    return Histogram(EDGES).update(np.random.default_rng(seed).beta(a, b, n))


def test_psi_equals_symmetrised_kl_divergence_from_scipy():
    edges = (-np.inf, -1.0, -0.5, 0.0, 0.5, 1.0, np.inf)  # no empty bin: no floor applies
    rng = np.random.default_rng(1)
    reference = Histogram(edges).update(rng.normal(0.0, 1.0, 20_000))
    current = Histogram(edges).update(rng.normal(0.2, 1.1, 15_000))
    r = np.asarray(reference.counts) / reference.count
    c = np.asarray(current.counts) / current.count
    assert psi(reference, current) == pytest.approx(
        np.sum(rel_entr(c, r)) + np.sum(rel_entr(r, c)), rel=1e-12)


def test_psi_is_zero_for_identical_shares_and_finite_for_empty_bins():
    reference = Histogram((0.0, 0.5, 1.0), (10, 10))
    assert psi(reference, Histogram((0.0, 0.5, 1.0), (3, 3))) == 0.0
    assert np.isfinite(psi(reference, Histogram((0.0, 0.5, 1.0), (0, 5))))


@pytest.mark.parametrize("value,band", [(0.0, PsiBand.STABLE), (0.0999, PsiBand.STABLE),
                                        (0.1, PsiBand.MODERATE), (0.1999, PsiBand.MODERATE),
                                        (0.2, PsiBand.SHIFTED), (3.0, PsiBand.SHIFTED)])
def test_psi_bands(value, band):
    assert PsiBand.of(value) is band


@pytest.mark.parametrize("seed", range(4))
def test_ks_on_data_binned_at_unique_values_equals_scipy_ks_2samp(seed):
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(0, 1, int(rng.integers(200, 3000))), 1)
    b = np.round(rng.normal(0.1 * seed, 1.1, int(rng.integers(200, 3000))), 1)
    unique = np.unique(np.concatenate([a, b]))
    edges = tuple(np.append(unique, unique[-1] + 1.0))
    result = ks_binned(Histogram(edges).update(a), Histogram(edges).update(b))
    want = stats.ks_2samp(a, b, method="asymp")
    assert result.statistic == pytest.approx(want.statistic, rel=1e-12)
    assert result.p_value == pytest.approx(want.pvalue, rel=1e-9, abs=1e-300)


def test_ks_on_coarse_bins_is_at_most_the_raw_statistic():
    rng = np.random.default_rng(5)
    a, b = rng.beta(2, 5, 3000), rng.beta(2.2, 5, 3000)
    binned = ks_binned(Histogram(EDGES).update(a), Histogram(EDGES).update(b))
    assert binned.statistic <= stats.ks_2samp(a, b).statistic


def test_js_divergence_is_scipy_jensenshannon_base_2_squared():
    reference, current = scores(3, 2, 5, 10_000), scores(4, 5, 2, 10_000)
    r = np.asarray(reference.counts) / reference.count
    c = np.asarray(current.counts) / current.count
    assert js_divergence(reference, current) == pytest.approx(
        jensenshannon(r, c, base=2) ** 2, rel=1e-9)
    disjoint = js_divergence(Histogram((0, 1, 2), (5, 0)), Histogram((0, 1, 2), (0, 7)))
    assert disjoint == pytest.approx(1.0, rel=1e-12)


def test_drift_needs_same_edges():
    with pytest.raises(ValueError, match="same edges"):
        psi(Histogram((0.0, 1.0), (1,)), Histogram((0.0, 2.0), (1,)))
