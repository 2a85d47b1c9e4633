"""Adjusted p-values against statsmodels' multipletests."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from statsmodels.stats.multitest import multipletests

from analysis.multiple import benjamini_hochberg, bonferroni, holm

METHODS = [(bonferroni, "bonferroni"), (holm, "holm"), (benjamini_hochberg, "fdr_bh")]


@pytest.mark.parametrize("adjust,name", METHODS)
@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=30))
def test_adjusted_pvalues_match_statsmodels(adjust, name, pvalues):
    want = multipletests(pvalues, method=name)[1]
    # atol: statsmodels multiplies in another order, so subnormal p-values round apart
    np.testing.assert_allclose(adjust(pvalues), want, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("adjust,name", METHODS)
def test_adjusted_pvalues_with_ties_match_statsmodels(adjust, name):
    pvalues = [0.01, 0.04, 0.04, 0.03, 0.2, 0.01, 0.5]
    np.testing.assert_allclose(adjust(pvalues), multipletests(pvalues, method=name)[1],
                               rtol=1e-12)


def test_rejects_values_outside_unit_interval():
    with pytest.raises(ValueError):
        holm([0.1, 1.2])
