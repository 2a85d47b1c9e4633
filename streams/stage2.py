"""Stage 2, per experiment: merge the newest partial of every source partition, decide.

Partials are cumulative snapshots, so stage 2 keeps only the newest per source partition
(the last one received wins: a partition's snapshots travel in order on the partials topic,
keyed by experiment). The experiment's statistics are their sum, exact whatever the number
of stage-1 workers. Decisions are evaluated on a cadence, for experiments whose partials
changed since the last evaluation.
"""
from __future__ import annotations

import math
from typing import Any

from analysis.verdict import Decision, DecisionPolicy, Verdict, decide
from streams.partials import Partial, merge_all

_VERDICT_SYMBOL = {Verdict.CONTINUE: "continue", Verdict.SHIP: "ship", Verdict.STOP_HARM: "stop_harm",
                   Verdict.INCONCLUSIVE: "inconclusive"}
DEFAULT_SRM_ALPHA = 0.01


def with_partial(stored: dict | None, source_partition: int, partial: dict) -> dict:
    """The stage-2 table value after a partial snapshot from ``source_partition`` arrived."""
    return {**(stored or {}), str(source_partition): partial}


def merged_partial(stored: dict) -> Partial:
    return merge_all(Partial.from_dict(d) for _, d in sorted(stored.items()))


def policy_of(config: Any) -> DecisionPolicy:
    srm = [g for g in config.guardrails if g.kind.value == "srm"]
    return DecisionPolicy(
        control=config.control,
        alpha=config.alpha,
        method=config.sequential_method.value,
        increase_is_better=config.primary_metric.direction.value == "increase",
        min_sample_per_variant=config.min_sample_per_variant,
        min_runtime_s=config.min_runtime_s,
        max_duration_s=config.max_duration_s,
        srm_alpha=srm[0].threshold if srm else DEFAULT_SRM_ALPHA,
    )


def evaluate(config: Any, partial: Partial) -> Decision:
    """The decision for an experiment's merged statistics."""
    return decide(
        policy_of(config),
        config.primary_metric.name,
        partial.stats(config.primary_metric),
        {m.name: partial.stats(m) for m in config.secondary_metrics},
        partial.exposures(),
        {v: w for v, w in config.weights.items() if w > 0},
        partial.runtime_s,
    )


def _number(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def decision_record(config: Any, decision: Decision, partial: Partial, now_ms: int) -> dict:
    """The Decision event (schemas/decision.v1.avsc) for a decision."""
    comparisons = []
    for primary, group in ((True, decision.primary), (False, decision.secondary)):
        for c in group:
            t, b = c.test, c.bayes
            comparisons.append({
                "metric": c.metric, "primary": primary, "variant": c.variant,
                "control_mean": _number(c.control_mean), "treatment_mean": _number(c.treatment_mean),
                "lift": _number(t.estimate) if t else None,
                "ci_low": _number(t.ci_low) if t else None, "ci_high": _number(t.ci_high) if t else None,
                "p_value": _number(t.p_value) if t else None, "adjusted_p_value": _number(c.adjusted_p_value),
                "chance_to_win": _number(b.chance_to_win) if b else None,
                "risk_control": _number(b.risk[0]) if b and b.risk else None,
                "risk_treatment": _number(b.risk[1]) if b and b.risk else None,
            })
    return {
        "experiment_id": config.experiment_id,
        "config_version": config.version,
        "decision_time": now_ms,
        "watermark_time": partial.watermark_ms,
        "runtime_s": decision.runtime_s,
        "verdict": _VERDICT_SYMBOL[decision.verdict],
        "verdict_variant": decision.variant,
        "reason": decision.reason,
        "method": config.sequential_method.value,
        "alpha": config.alpha,
        "variants": [{"variant": v, "units": decision.exposures.get(v, 0), "weight": w}
                     for v, w in sorted(config.weights.items())],
        "comparisons": comparisons,
        "statistics": [
            {"metric": metric.name, "variant": variant, "units": arm.units,
             "sums": list(arm.sums.get(metric.name, ()))}
            for metric in config.metrics for variant, arm in sorted(partial.variants.items())
        ],
        "srm_p_value": _number(decision.srm_p_value),
        "srm_flag": decision.srm_flag,
        "outcome_fates": dict(partial.fates),
        "assignment_inconsistencies": partial.inconsistencies,
    }
