"""Sufficient statistics of one arm: small frozen value objects of sums.

Each class holds only the sums its tests need, builds new objects with ``update`` (from
raw values) and ``merge`` / ``+`` (with another partial), and has a stable plain dict
form. ``mean`` is the point estimate of the metric and ``variance`` the per-unit variance,
so ``variance / n`` is the variance of ``mean``; tests in analysis/ read only ``n``,
``mean`` and ``variance`` (the :class:`Moments` protocol).

The design follows GrowthBook's gbstats (``gbstats/models/statistics.py``):
``ProportionStatistic``, ``SampleMeanStatistic``, ``RatioStatistic`` and
``RegressionAdjustedStatistic``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol, Self

import numpy as np
from numpy.typing import ArrayLike


class Moments(Protocol):
    """What a test needs from one arm: unit count, point estimate, per-unit variance."""

    @property
    def n(self) -> int: ...

    @property
    def mean(self) -> float: ...

    @property
    def variance(self) -> float: ...


class _Sums:
    """Shared dict form and ``+`` for the dataclasses below (all fields are sums)."""

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a plain dict (ints stay ints, sums are floats)."""
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        """Return the statistic stored by :meth:`to_dict`; unknown or missing keys raise."""
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if set(d) != names:
            raise ValueError(f"{cls.__name__} needs keys {sorted(names)}, got {sorted(d)}")
        return cls(**d)

    def merge(self, other: Self) -> Self:
        """Return the statistic of both partials together (field-wise sum)."""
        if type(other) is not type(self):
            raise TypeError(f"cannot merge {type(self).__name__} with {type(other).__name__}")
        return type(self)(*(getattr(self, f.name) + getattr(other, f.name)
                            for f in fields(self)))  # type: ignore[arg-type]

    def __add__(self, other: Self) -> Self:
        return self.merge(other)


def _require_units(n: int, needed: int, what: str) -> None:
    if n < needed:
        raise ValueError(f"{what} needs at least {needed} unit(s), have n={n}")


def _as_float_array(values: ArrayLike) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if not np.all(np.isfinite(array)):
        raise ValueError("values must be finite numbers")
    return array


@dataclass(frozen=True)
class ProportionStats(_Sums):
    """Binary metric of one arm: units and units with a success (gbstats ProportionStatistic)."""

    n: int
    successes: int

    def __post_init__(self) -> None:
        if not 0 <= self.successes <= self.n:
            raise ValueError(f"need 0 <= successes <= n, got n={self.n}, "
                             f"successes={self.successes}")

    @classmethod
    def from_values(cls, values: ArrayLike) -> ProportionStats:
        """Return the statistic of an array of 0/1 or booleans."""
        return cls(0, 0).update(values)

    def update(self, values: ArrayLike) -> ProportionStats:
        """Return a new statistic with ``values`` (0/1 or booleans) added."""
        array = np.asarray(values).ravel()
        if array.dtype != bool and not np.all((array == 0) | (array == 1)):
            raise ValueError("proportion values must be 0, 1 or booleans")
        return ProportionStats(self.n + array.size, self.successes + int(np.count_nonzero(array)))

    @property
    def mean(self) -> float:
        """Return the success rate successes / n."""
        _require_units(self.n, 1, "a proportion")
        return self.successes / self.n

    @property
    def variance(self) -> float:
        """Return the per-unit Bernoulli variance p (1 - p) (no n - 1 correction, as gbstats)."""
        p = self.mean
        return p * (1.0 - p)


@dataclass(frozen=True)
class MeanStats(_Sums):
    """Continuous per-unit metric of one arm: n, sum and sum of squares of unit totals.

    gbstats SampleMeanStatistic. ``move_unit`` keeps the sums right when a unit's total
    changes after it was counted (late outcomes): only the difference is applied.
    """

    n: int
    sum: float
    sum_squares: float

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")

    @classmethod
    def from_values(cls, values: ArrayLike) -> MeanStats:
        """Return the statistic of an array of per-unit values."""
        return cls(0, 0.0, 0.0).update(values)

    def update(self, values: ArrayLike) -> MeanStats:
        """Return a new statistic with ``values`` (one per unit) added."""
        array = _as_float_array(values)
        return MeanStats(self.n + array.size, self.sum + float(array.sum()),
                         self.sum_squares + float(np.dot(array, array)))

    def add_unit(self, total: float) -> MeanStats:
        """Return a new statistic with one more unit whose total is ``total``."""
        return MeanStats(self.n + 1, self.sum + total, self.sum_squares + total * total)

    def move_unit(self, old_total: float, new_total: float) -> MeanStats:
        """Return the statistic after an already counted unit's total moved old -> new.

        n is unchanged; sum moves by new - old and sum_squares by new^2 - old^2.
        """
        return MeanStats(self.n, self.sum + (new_total - old_total),
                         self.sum_squares + (new_total * new_total - old_total * old_total))

    @property
    def mean(self) -> float:
        """Return the sample mean sum / n."""
        _require_units(self.n, 1, "a mean")
        return self.sum / self.n

    @property
    def variance(self) -> float:
        """Return the sample variance with ddof=1, clipped at 0 against rounding."""
        _require_units(self.n, 2, "a sample variance")
        return max((self.sum_squares - self.sum * self.sum / self.n) / (self.n - 1), 0.0)


def _covariance(n: int, sum_x: float, sum_y: float, sum_xy: float) -> float:
    _require_units(n, 2, "a sample covariance")
    return (sum_xy - sum_x * sum_y / n) / (n - 1)


@dataclass(frozen=True)
class RatioStats(_Sums):
    """Ratio metric of one arm (e.g. clicks per session), numerator and denominator per unit.

    ``mean`` is num_sum / den_sum and ``variance`` the per-unit delta-method variance, so
    ``variance / n`` approximates Var(mean) (Deng, Knoblich and Lu 2018, "Applying the
    Delta Method in Metric Analytics"; gbstats RatioStatistic).
    """

    n: int
    num_sum: float
    num_sum_squares: float
    den_sum: float
    den_sum_squares: float
    num_den_sum_product: float

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")

    @classmethod
    def from_values(cls, numerators: ArrayLike, denominators: ArrayLike) -> RatioStats:
        """Return the statistic of per-unit numerator and denominator arrays."""
        return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0).update(numerators, denominators)

    def update(self, numerators: ArrayLike, denominators: ArrayLike) -> RatioStats:
        """Return a new statistic with the units (numerator, denominator pairs) added."""
        num, den = _as_float_array(numerators), _as_float_array(denominators)
        if num.size != den.size:
            raise ValueError(f"{num.size} numerators but {den.size} denominators")
        return RatioStats(self.n + num.size, self.num_sum + float(num.sum()),
                          self.num_sum_squares + float(np.dot(num, num)),
                          self.den_sum + float(den.sum()),
                          self.den_sum_squares + float(np.dot(den, den)),
                          self.num_den_sum_product + float(np.dot(num, den)))

    @property
    def numerator(self) -> MeanStats:
        """Return the numerator's per-unit statistic."""
        return MeanStats(self.n, self.num_sum, self.num_sum_squares)

    @property
    def denominator(self) -> MeanStats:
        """Return the denominator's per-unit statistic."""
        return MeanStats(self.n, self.den_sum, self.den_sum_squares)

    @property
    def covariance(self) -> float:
        """Return the sample covariance (ddof=1) of numerator and denominator."""
        return _covariance(self.n, self.num_sum, self.den_sum, self.num_den_sum_product)

    @property
    def mean(self) -> float:
        """Return the ratio of sums num_sum / den_sum."""
        if self.den_sum == 0:
            raise ValueError("ratio with a zero denominator sum")
        return self.num_sum / self.den_sum

    @property
    def variance(self) -> float:
        """Return the per-unit delta-method variance of the ratio.

        Var = s_m^2 / mu_d^2 + s_d^2 mu_m^2 / mu_d^4 - 2 cov mu_m / mu_d^3.
        """
        mu_m, mu_d = self.numerator.mean, self.denominator.mean
        return max(self.numerator.variance / mu_d**2
                   + self.denominator.variance * mu_m**2 / mu_d**4
                   - 2.0 * self.covariance * mu_m / mu_d**3, 0.0)


@dataclass(frozen=True)
class CupedMoments:
    """One arm's CUPED-adjusted metric: n, adjusted mean and per-unit adjusted variance."""

    n: int
    mean: float
    variance: float


@dataclass(frozen=True)
class CupedStats(_Sums):
    """Per-unit metric with a pre-experiment covariate (CUPED), one arm.

    Holds the metric's n, sum and sum of squares plus the covariate's sum, sum of squares
    and the metric-covariate cross product. Adjust two arms with :func:`cuped_adjust`
    (Deng, Xu, Kohavi and Walker 2013, "Improving the Sensitivity of Online Controlled
    Experiments by Utilizing Pre-Experiment Data"; gbstats RegressionAdjustedStatistic).
    """

    n: int
    sum: float
    sum_squares: float
    covariate_sum: float
    covariate_sum_squares: float
    sum_product: float

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n must be >= 0, got {self.n}")

    @classmethod
    def from_values(cls, values: ArrayLike, covariates: ArrayLike) -> CupedStats:
        """Return the statistic of per-unit metric values and their covariates."""
        return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0).update(values, covariates)

    def update(self, values: ArrayLike, covariates: ArrayLike) -> CupedStats:
        """Return a new statistic with the units (value, covariate pairs) added."""
        y, x = _as_float_array(values), _as_float_array(covariates)
        if y.size != x.size:
            raise ValueError(f"{y.size} values but {x.size} covariates")
        return CupedStats(self.n + y.size, self.sum + float(y.sum()),
                          self.sum_squares + float(np.dot(y, y)),
                          self.covariate_sum + float(x.sum()),
                          self.covariate_sum_squares + float(np.dot(x, x)),
                          self.sum_product + float(np.dot(x, y)))

    def move_unit(self, old_total: float, new_total: float, covariate: float) -> CupedStats:
        """Return the statistic after a counted unit's metric total moved old -> new.

        The covariate is fixed before the experiment, so only the metric sums and the
        cross product (by covariate * (new - old)) move.
        """
        return CupedStats(self.n, self.sum + (new_total - old_total),
                          self.sum_squares + (new_total * new_total - old_total * old_total),
                          self.covariate_sum, self.covariate_sum_squares,
                          self.sum_product + covariate * (new_total - old_total))

    @property
    def metric(self) -> MeanStats:
        """Return the unadjusted metric statistic."""
        return MeanStats(self.n, self.sum, self.sum_squares)

    @property
    def covariate(self) -> MeanStats:
        """Return the covariate statistic."""
        return MeanStats(self.n, self.covariate_sum, self.covariate_sum_squares)

    @property
    def covariance(self) -> float:
        """Return the sample covariance (ddof=1) of metric and covariate."""
        return _covariance(self.n, self.sum, self.covariate_sum, self.sum_product)

    def adjusted(self, theta: float, covariate_mean: float) -> CupedMoments:
        """Return mean(Y - theta (X - covariate_mean)) and its per-unit variance.

        Variance: s_y^2 + theta^2 s_x^2 - 2 theta cov(x, y).
        """
        variance = (self.metric.variance + theta**2 * self.covariate.variance
                    - 2.0 * theta * self.covariance)
        mean = self.metric.mean - theta * (self.covariate.mean - covariate_mean)
        return CupedMoments(self.n, mean, max(variance, 0.0))


def pooled_theta(control: CupedStats, treatment: CupedStats) -> float:
    """Return the CUPED coefficient pooled over both arms.

    theta = (S_xy,c + S_xy,t) / (S_xx,c + S_xx,t) with S the centred sums within each arm:
    the slope of the OLS regression of the metric on the covariate with one intercept per
    arm. Pooling keeps the same theta on both arms, so the adjustment cannot create a
    treatment effect; 0 when the covariate does not vary.
    """
    sxx = sum(s.covariate.variance * (s.n - 1) for s in (control, treatment))
    sxy = sum(s.covariance * (s.n - 1) for s in (control, treatment))
    return sxy / sxx if sxx > 0 else 0.0


def cuped_adjust(control: CupedStats, treatment: CupedStats) -> tuple[CupedMoments, CupedMoments]:
    """Return both arms adjusted with the pooled theta, centred at the pooled covariate mean.

    Centring at the overall covariate mean (Deng et al. 2013) keeps adjusted means on the
    metric's scale, so relative lifts stay meaningful; the absolute difference equals
    gbstats' (which subtracts theta * mean(X) without centring). Theta is treated as known,
    as in Deng et al. and gbstats.
    """
    theta = pooled_theta(control, treatment)
    covariate_mean = ((control.covariate_sum + treatment.covariate_sum)
                      / (control.n + treatment.n))
    return control.adjusted(theta, covariate_mean), treatment.adjusted(theta, covariate_mean)
