"""abstream statistics: pure value objects of sums and the tests that read them."""
from analysis.bandit import prob_best, thompson_weights
from analysis.bayesian import GaussianPrior, beta_binomial_test, gaussian_test, prob_beta_greater
from analysis.compare import METHODS, compare
from analysis.drift import KsResult, PsiBand, js_divergence, ks_binned, psi
from analysis.fixed import (Lift, MannWhitneyResult, cohens_h, lift, mann_whitney,
                            newcombe_interval, srm_pvalue, welch_df, welch_test, wilson_interval,
                            z_test)
from analysis.multiple import benjamini_hochberg, bonferroni, holm
from analysis.planning import SamplePlan, duration_days, sample_size
from analysis.results import ComparisonResult
from analysis.sequential import sequential_srm_pvalue
from analysis.sketch import Histogram, QuantileSketch
from analysis.stats import (CupedMoments, CupedStats, MeanStats, Moments, ProportionStats,
                            RatioStats, cuped_adjust, pooled_theta)

__all__ = [
    "ComparisonResult", "CupedMoments", "CupedStats", "GaussianPrior", "Histogram", "KsResult",
    "Lift", "METHODS", "MannWhitneyResult", "MeanStats", "Moments", "ProportionStats",
    "PsiBand", "QuantileSketch", "RatioStats", "SamplePlan", "benjamini_hochberg",
    "beta_binomial_test", "bonferroni", "cohens_h", "compare", "cuped_adjust", "duration_days",
    "gaussian_test", "holm", "js_divergence", "ks_binned", "lift", "mann_whitney",
    "newcombe_interval", "pooled_theta", "prob_beta_greater", "prob_best", "psi",
    "sample_size", "sequential_srm_pvalue", "srm_pvalue", "thompson_weights", "welch_df",
    "welch_test", "wilson_interval", "z_test",
]
