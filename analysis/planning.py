"""Experiment planning: units per variant for a minimum detectable effect, and duration."""
from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from analysis.fixed import cohens_h


@dataclass(frozen=True)
class SamplePlan:
    """Units needed per arm to detect ``effect_size`` (Cohen's h or d) at alpha and power."""

    n_control: int
    n_treatment: int
    effect_size: float
    alpha: float
    power: float
    two_sided: bool
    treatment_share: float

    @property
    def n_total(self) -> int:
        """Return the units needed over both arms."""
        return self.n_control + self.n_treatment


def sample_size(baseline: float, mde: float, *, relative: bool = True,
                sd: float | None = None, alpha: float = 0.05, power: float = 0.8,
                two_sided: bool = True, treatment_share: float = 0.5) -> SamplePlan:
    """Return the units per arm to detect a change of ``mde`` from ``baseline``.

    Without ``sd`` the metric is a proportion and the effect is Cohen's h between baseline
    and baseline + change (arcsine transform); with ``sd`` it is a mean and the effect is
    Cohen's d = change / sd. ``mde`` is a fraction of the baseline when ``relative`` (e.g.
    -0.10 for a 10% drop), else absolute. n_control = ((z_(1-alpha/k) + z_power) / effect)^2
    (1 + 1/r) with r = n_treatment / n_control = share / (1 - share) (Cohen 1988, ch. 6);
    this is statsmodels ``NormalIndPower().solve_power`` except that the two-sided power
    ignores the far tail, which makes n larger by far less than one unit in practice.
    """
    if not (0 < alpha < 1 and 0 < power < 1 and 0 < treatment_share < 1):
        raise ValueError("alpha, power and treatment_share must lie strictly between 0 and 1")
    change = mde * baseline if relative else mde
    if change == 0:
        raise ValueError("the minimum detectable effect must be non-zero")
    if sd is None:
        if not (0 < baseline < 1 and 0 < baseline + change < 1):
            raise ValueError(f"proportions must stay in (0, 1): baseline {baseline}, "
                             f"target {baseline + change}")
        effect_size = cohens_h(baseline, baseline + change)
    else:
        if sd <= 0:
            raise ValueError(f"sd must be positive, got {sd}")
        effect_size = change / sd
    ratio = treatment_share / (1.0 - treatment_share)
    z_alpha = stats.norm.ppf(1.0 - alpha / (2.0 if two_sided else 1.0))
    n_control = ((z_alpha + stats.norm.ppf(power)) / effect_size) ** 2 * (1.0 + 1.0 / ratio)
    return SamplePlan(math.ceil(n_control), math.ceil(n_control * ratio), effect_size, alpha,
                      power, two_sided, treatment_share)


def duration_days(plan: SamplePlan, daily_units: float) -> int:
    """Return the whole days until both arms reach their planned size.

    ``daily_units`` is the number of new units entering the experiment per day, split
    between the arms by the plan's treatment share.
    """
    if daily_units <= 0:
        raise ValueError(f"daily_units must be positive, got {daily_units}")
    share = plan.treatment_share
    return math.ceil(max(plan.n_control / (daily_units * (1.0 - share)),
                         plan.n_treatment / (daily_units * share)))
