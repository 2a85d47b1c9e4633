"""The verdict of an experiment from its current statistics: pure, no I/O.

Rules (documented in the README's "Decisions" section):

1. Until every variant has ``min_sample_per_variant`` units and the experiment has run
   ``min_runtime_s`` (in event time), the verdict is ``continue``.
2. The primary metric of each treatment is compared with control by the configured
   anytime-valid method (confidence sequence or mixture SPRT) on the relative lift, at
   level alpha / (number of treatments) (Bonferroni across treatments). Because the
   interval is valid at every look, acting on the first verdict other than ``continue``
   keeps the error rate at alpha.
3. A sample-ratio mismatch (sequential SRM p-value below ``srm_alpha``) blocks every
   verdict but ``continue``: the numbers are not trustworthy.
4. A treatment whose interval lies entirely on the wrong side of zero (given the metric's
   direction) stops the experiment as ``stop: harm``; otherwise the best treatment whose
   interval lies entirely on the good side is shipped.
5. With neither, once the experiment has run ``max_duration_s``, the verdict is
   ``inconclusive at max duration``.

The verdict depends on the current statistics only, never on the history of looks, so the
same events give the same decision however many workers computed it and whenever it was
evaluated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Mapping

from analysis.bayesian import gaussian_test
from analysis.multiple import holm
from analysis.results import ComparisonResult
from analysis.sequential import confidence_sequence, msprt, sequential_srm_pvalue
from analysis.stats import Moments

SEQUENTIAL_METHODS = {"sequential": confidence_sequence, "msprt": msprt}


class Verdict(str, Enum):
    CONTINUE = "continue"
    SHIP = "ship"
    STOP_HARM = "stop: harm"
    INCONCLUSIVE = "inconclusive at max duration"


@dataclass(frozen=True)
class DecisionPolicy:
    control: str
    alpha: float = 0.05
    method: str = "sequential"
    increase_is_better: bool = True
    min_sample_per_variant: int = 100
    min_runtime_s: float = 0.0
    max_duration_s: float | None = None
    srm_alpha: float = 0.01


@dataclass(frozen=True)
class ArmComparison:
    """One treatment against control on one metric; ``test`` is None while undefined
    (too few units, zero variance, a control mean of zero)."""

    metric: str
    variant: str
    control_mean: float
    treatment_mean: float
    test: ComparisonResult | None
    bayes: ComparisonResult | None
    adjusted_p_value: float | None = None


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    variant: str | None
    reason: str
    exposures: Mapping[str, int]
    primary: tuple[ArmComparison, ...]
    secondary: tuple[ArmComparison, ...]
    srm_p_value: float
    srm_alpha: float
    runtime_s: float

    @property
    def srm_flag(self) -> bool:
        return not math.isnan(self.srm_p_value) and self.srm_p_value < self.srm_alpha


def _comparisons(metric: str, arms: Mapping[str, Moments], policy: DecisionPolicy, alpha: float) -> list[ArmComparison]:
    control = arms.get(policy.control)
    result = []
    for name in sorted(arms):
        if name == policy.control:
            continue
        treatment = arms[name]
        test = bayes = None
        if control is not None and control.n >= 2 and treatment.n >= 2:
            try:
                test = SEQUENTIAL_METHODS[policy.method](control, treatment, alpha=alpha, relative=True)
                bayes = gaussian_test(control, treatment, relative=True, alpha=alpha)
            except ValueError:
                test = bayes = None  # undefined at this look (e.g. no variation yet)
        result.append(ArmComparison(metric, name, control.mean if control and control.n else math.nan,
                                    treatment.mean if treatment.n else math.nan, test, bayes))
    return result


def decide(policy: DecisionPolicy, primary_metric: str, primary: Mapping[str, Moments],
           secondary: Mapping[str, Mapping[str, Moments]], exposures: Mapping[str, int],
           weights: Mapping[str, float], runtime_s: float, *, check_srm: bool = True) -> Decision:
    """The decision for the experiment's current statistics (see the module's rules).
    ``check_srm`` is false when the allocation changes over time (canary, bandit): the
    counts then come from several splits and no single planned ratio applies."""
    variants = sorted(weights)
    treatments = [v for v in variants if v != policy.control]
    alpha_each = policy.alpha / max(1, len(treatments))
    arms = {v: primary.get(v) for v in variants}
    counts = [exposures.get(v, 0) for v in variants]
    check_srm = check_srm and len(variants) >= 2 and sum(counts) > 0
    srm_p = sequential_srm_pvalue(counts, [weights[v] for v in variants]) if check_srm else math.nan
    primary_results = tuple(_comparisons(primary_metric, {v: a for v, a in arms.items() if a is not None}, policy, alpha_each))

    secondary_results: list[ArmComparison] = []
    for metric, metric_arms in secondary.items():
        secondary_results += _comparisons(metric, metric_arms, policy, policy.alpha)
    defined = [i for i, r in enumerate(secondary_results) if r.test is not None]
    adjusted = holm([secondary_results[i].test.p_value for i in defined]) if defined else []
    for i, p in zip(defined, adjusted):
        r = secondary_results[i]
        secondary_results[i] = ArmComparison(r.metric, r.variant, r.control_mean, r.treatment_mean, r.test, r.bayes, float(p))

    def made(verdict: Verdict, variant: str | None, reason: str) -> Decision:
        return Decision(verdict, variant, reason, dict(exposures), primary_results, tuple(secondary_results),
                        srm_p, policy.srm_alpha, runtime_s)

    smallest = min(counts) if counts else 0
    if smallest < policy.min_sample_per_variant:
        return made(Verdict.CONTINUE, None, f"waiting for {policy.min_sample_per_variant} units per variant "
                                            f"(smallest has {smallest})")
    if runtime_s < policy.min_runtime_s:
        return made(Verdict.CONTINUE, None, f"minimum runtime {policy.min_runtime_s:.0f} s not reached "
                                            f"({runtime_s:.0f} s so far)")
    if not math.isnan(srm_p) and srm_p < policy.srm_alpha:
        return made(Verdict.CONTINUE, None, f"sample ratio mismatch (sequential p = {srm_p:.2g} < {policy.srm_alpha}): "
                                            "results are not trustworthy; check the assignment")
    sign = 1.0 if policy.increase_is_better else -1.0
    harmful = [r for r in primary_results if r.test and sign * r.test.ci_high < 0 and sign * r.test.ci_low < 0]
    if harmful:
        worst = min(harmful, key=lambda r: sign * r.test.estimate)
        return made(Verdict.STOP_HARM, worst.variant,
                    f"{worst.variant} is worse than {policy.control} on {primary_metric}: lift {worst.test.estimate:+.2%} "
                    f"[{worst.test.ci_low:+.2%}, {worst.test.ci_high:+.2%}]")
    winners = [r for r in primary_results if r.test and sign * r.test.ci_low > 0 and sign * r.test.ci_high > 0]
    if winners:
        best = max(winners, key=lambda r: sign * r.test.estimate)
        return made(Verdict.SHIP, best.variant,
                    f"{best.variant} beats {policy.control} on {primary_metric}: lift {best.test.estimate:+.2%} "
                    f"[{best.test.ci_low:+.2%}, {best.test.ci_high:+.2%}], always-valid p = {best.test.p_value:.2g}")
    if policy.max_duration_s is not None and runtime_s >= policy.max_duration_s:
        return made(Verdict.INCONCLUSIVE, None, f"no variant differs from {policy.control} on {primary_metric} "
                                                f"after the maximum duration of {policy.max_duration_s:.0f} s")
    return made(Verdict.CONTINUE, None, f"no variant differs from {policy.control} on {primary_metric} yet")
