"""Sample size and duration against statsmodels' NormalIndPower."""
import math

import pytest
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize

from analysis.planning import duration_days, sample_size


def statsmodels_n(effect_size, alpha=0.05, power=0.8, ratio=1.0, alternative="two-sided"):
    return NormalIndPower().solve_power(effect_size=effect_size, alpha=alpha, power=power,
                                        ratio=ratio, alternative=alternative)


def test_acceptance_plan_baseline_018_relative_mde_minus_10_percent():
    plan = sample_size(0.18, -0.10)
    want = statsmodels_n(abs(proportion_effectsize(0.162, 0.18)))
    assert plan.n_control == plan.n_treatment
    assert plan.n_control == pytest.approx(want, rel=0.01)
    assert plan.n_control == math.ceil(want)


@pytest.mark.parametrize("baseline,mde,relative,share", [(0.05, 0.2, True, 0.5),
                                                         (0.5, -0.01, False, 0.5),
                                                         (0.02, 0.004, False, 0.2),
                                                         (0.9, 0.03, True, 0.7)])
@pytest.mark.parametrize("two_sided", [True, False])
def test_proportions_match_normal_ind_power(baseline, mde, relative, share, two_sided):
    plan = sample_size(baseline, mde, relative=relative, treatment_share=share,
                       two_sided=two_sided, alpha=0.01, power=0.9)
    target = baseline * (1 + mde) if relative else baseline + mde
    h = abs(proportion_effectsize(target, baseline))
    ratio = share / (1 - share)
    want = statsmodels_n(h, alpha=0.01, power=0.9, ratio=ratio,
                         alternative="two-sided" if two_sided else "larger")
    assert plan.n_control == pytest.approx(want, rel=1e-3, abs=1)
    assert plan.n_treatment == pytest.approx(want * ratio, rel=1e-3, abs=1)
    achieved = NormalIndPower().power(h, plan.n_control, 0.01, ratio=plan.n_treatment
                                      / plan.n_control,
                                      alternative="two-sided" if two_sided else "larger")
    assert achieved >= 0.9


@pytest.mark.parametrize("relative", [True, False])
def test_means_match_normal_ind_power(relative):
    plan = sample_size(120.0, 0.02 if relative else 2.4, relative=relative, sd=45.0)
    assert plan.effect_size == pytest.approx(2.4 / 45.0, rel=1e-12)
    assert plan.n_control == pytest.approx(statsmodels_n(2.4 / 45.0), rel=1e-4)


def test_duration_covers_both_arms_with_an_uneven_split():
    plan = sample_size(0.18, -0.10, treatment_share=0.2)
    days = duration_days(plan, daily_units=5000)
    assert days * 5000 * 0.2 >= plan.n_treatment
    assert days * 5000 * 0.8 >= plan.n_control
    assert (days - 1) * 5000 * 0.2 < plan.n_treatment or (days - 1) * 5000 * 0.8 < plan.n_control


def test_rejects_impossible_plans():
    with pytest.raises(ValueError, match="stay in"):
        sample_size(0.95, 0.1)
    with pytest.raises(ValueError, match="non-zero"):
        sample_size(0.2, 0.0)
