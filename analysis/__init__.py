"""abstream statistics: pure value objects of sums and the tests that read them."""
from analysis.results import ComparisonResult
from analysis.stats import (CupedMoments, CupedStats, MeanStats, Moments, ProportionStats,
                            RatioStats, cuped_adjust, pooled_theta)

__all__ = ["ComparisonResult", "CupedMoments", "CupedStats", "MeanStats", "Moments",
           "ProportionStats", "RatioStats", "cuped_adjust", "pooled_theta"]
