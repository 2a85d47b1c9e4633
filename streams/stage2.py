"""Stage 2, per experiment: merge the newest partial of every source partition, decide, act.

Partials are cumulative snapshots, so stage 2 keeps only the newest per source partition
(the last one received wins: a partition's snapshots travel in order on the partials topic,
keyed by experiment). The experiment's statistics are their sum, exact whatever the number
of stage-1 workers. On a cadence, for experiments whose partials changed, stage 2
evaluates the decision and the guardrails (:func:`control`): alert transitions, kill
switches, canary steps, bandit weights. The control state (firing guardrails, canary step,
killed variants, allocation) is stored with the partials, so it survives a rebalance.
"""
from __future__ import annotations

import math
from typing import Any

from dataclasses import dataclass, field

from analysis.bandit import thompson_weights
from analysis.guardrails import (DEFAULT_DRIFT_PSI, DEFAULT_SHADOW_DISAGREEMENT, CanaryState, ExperimentHealth,
                                 GuardrailSpec, GuardrailStates, canary_next, read_guardrails, transition)
from analysis.sketch import QuantileSketch
from analysis.verdict import Decision, DecisionPolicy, Verdict, decide
from streams.partials import LATENCY_SKETCH, SCORE_BINS, Partial, merge_all

_VERDICT_SYMBOL = {Verdict.CONTINUE: "continue", Verdict.SHIP: "ship", Verdict.STOP_HARM: "stop_harm",
                   Verdict.INCONCLUSIVE: "inconclusive"}
DEFAULT_SRM_ALPHA = 0.01
BANDIT_FLOOR = 0.05
BANDIT_MIN_CHANGE = 0.01


def stored_or_new(stored: dict | None, table_partition: int) -> dict:
    """An experiment's stage-2 table value, or the one it starts with: {"partials": {source
    partition: partial}, "positions": {source partition: its partial's position}, "control":
    control state, "partition": the table partition of the experiment (where its changelog
    goes)}."""
    return stored or {"partials": {}, "positions": {}, "control": None, "partition": table_partition}


def with_partial(stored: dict | None, source_partition: int, partial: dict, position: int | None,
                 table_partition: int) -> dict | None:
    """The stage-2 table value after a partial snapshot from ``source_partition`` arrived, or
    None when it is older than the one stored.

    ``position`` is how much of its source partition's input the partial sums (Stage1.take_dirty):
    it only grows. Stage 2 reads its topic at least once, and after a rebalance or a restart it
    reads again from its group's last commit over a table recovered with newer partials; taken
    as they came, those took an experiment's decision back by seconds of data and resolved a
    firing guardrail. A partial without a position (a worker before positions) is taken."""
    stored = stored_or_new(stored, table_partition)
    positions = dict(stored.get("positions", {}))
    known = positions.pop(str(source_partition), None)
    if position is not None and known is not None and position < known:
        return None
    if position is not None:
        positions[str(source_partition)] = position
    return {**stored, "partials": {**stored["partials"], str(source_partition): partial}, "positions": positions,
            "partition": table_partition}


def merged_partial(stored: dict) -> Partial:
    return merge_all(Partial.from_dict(d) for _, d in sorted(stored["partials"].items()))


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


def evaluate(config: Any, partial: Partial, weights: dict[str, float] | None = None) -> Decision:
    """The decision for an experiment's merged statistics under the allocation in force.
    The sample ratio is checked only while the configured fixed split is in force: after a
    canary step, a bandit update or a kill, the counts come from several splits."""
    check_srm = srm_applies(config, weights)
    weights = weights or config.weights
    return decide(
        policy_of(config),
        config.primary_metric.name,
        partial.stats(config.primary_metric),
        {m.name: partial.stats(m) for m in config.secondary_metrics},
        partial.exposures(),
        {v: w for v, w in weights.items() if w > 0},
        partial.runtime_s,
        check_srm=check_srm,
    )


def guardrail_specs(config: Any) -> list[GuardrailSpec]:
    """The configured guardrails plus the implicit ones every experiment has unless it
    configures its own: SRM (fixed allocations only), shadow disagreement (5%), drift (PSI 0.2,
    once both hours compared have 1000 scores)."""
    specs = [GuardrailSpec(g.name, g.kind.value, g.threshold, g.relative_to_control, g.metric, g.margin,
                           g.min_count, g.action.value) for g in config.guardrails]
    kinds = {s.kind for s in specs}
    if "srm" not in kinds:
        specs.append(GuardrailSpec("srm", "srm", DEFAULT_SRM_ALPHA))
    if "shadow_disagreement" not in kinds:
        specs.append(GuardrailSpec("shadow_disagreement", "shadow_disagreement", DEFAULT_SHADOW_DISAGREEMENT))
    if "drift" not in kinds:
        # PSI of 20 bins is noise of about 19 (1/n + 1/m) on its own: 1000 scores per hour
        # keep an unchanged distribution well below the 0.1 band.
        specs.append(GuardrailSpec("drift", "drift", DEFAULT_DRIFT_PSI, min_count=1000))
    if config.allocation.value != "fixed":
        specs = [s for s in specs if s.kind != "srm"]
    return specs


def srm_applies(config: Any, weights: dict[str, float] | None) -> bool:
    return config.allocation.value == "fixed" and (weights is None or weights == config.weights)


def experiment_health(config: Any, partial: Partial, weights: dict[str, float]) -> ExperimentHealth:
    latency = {}
    for variant, counts in partial.counts("latency").items():
        latency[variant] = QuantileSketch.from_counts(
            LATENCY_SKETCH.relative_accuracy, int(counts.get("z", 0)),
            {int(k): int(c) for k, c in counts.items() if k != "z"})
    scores: dict[str, dict[int, list[float]]] = {}
    for variant, counts in partial.counts("score").items():
        for key, count in counts.items():
            hour, bin_ = (int(x) for x in key.split(":"))
            scores.setdefault(variant, {}).setdefault(hour, [0.0] * SCORE_BINS)[bin_] += count
    return ExperimentHealth(
        control=config.control, alpha=config.alpha,
        increase_is_better={m.name: m.direction.value == "increase" for m in config.metrics},
        status=partial.counts("status"), latency=latency,
        metrics={m.name: partial.stats(m) for m in config.metrics},
        exposures=partial.exposures(), weights=weights,
        shadow=partial.counts("shadow"), scores_by_hour=scores,
    )


@dataclass
class ControlState:
    guardrails: GuardrailStates = field(default_factory=GuardrailStates)
    canary: CanaryState = field(default_factory=CanaryState)
    killed: dict[str, str] = field(default_factory=dict)
    weights: dict[str, float] | None = None
    allocation_version: int = 0
    killswitch_version: int = 0

    def to_dict(self) -> dict:
        return {"guardrails": self.guardrails.to_dict(), "canary": self.canary.to_dict(), "killed": self.killed,
                "weights": self.weights, "allocation_version": self.allocation_version,
                "killswitch_version": self.killswitch_version}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ControlState":
        if not d:
            return cls()
        return cls(GuardrailStates.from_dict(d["guardrails"]), CanaryState.from_dict(d["canary"]), dict(d["killed"]),
                   d["weights"], d["allocation_version"], d["killswitch_version"])


@dataclass
class ControlActions:
    alerts: list[dict] = field(default_factory=list)
    killswitches: list[dict] = field(default_factory=list)
    allocations: list[dict] = field(default_factory=list)
    promoted: str | None = None
    readings: list = field(default_factory=list)


def _without(weights: dict[str, float], variant: str, control: str) -> dict[str, float]:
    """Weights with ``variant`` at zero, its share given to control."""
    return {v: (0.0 if v == variant else w + (weights.get(variant, 0.0) if v == control else 0.0))
            for v, w in weights.items()}


def control(config: Any, partial: Partial, state: ControlState, now_ms: int) -> tuple[ControlState, ControlActions]:
    """Guardrails, kill switch, canary and bandit for one look at an experiment."""
    actions = ControlActions()
    weights = dict(state.weights or config.weights)
    watermark = partial.watermark_ms
    specs = {s.name: s for s in guardrail_specs(config) if s.kind != "srm" or srm_applies(config, state.weights)}
    readings = read_guardrails(list(specs.values()), experiment_health(config, partial, weights))
    guardrails, transitions = transition(state.guardrails, readings)
    actions.readings = readings
    killed = dict(state.killed)
    canary = state.canary
    allocation_version, killswitch_version = state.allocation_version, state.killswitch_version

    # Versions are publication times (ms), kept increasing: any writer (stage 2, a person
    # with `abstream experiment kill`) can order its records without coordination.
    def allocate(new_weights: dict[str, float], reason: str) -> None:
        nonlocal allocation_version, weights
        allocation_version = max(allocation_version + 1, now_ms)
        weights = new_weights
        actions.allocations.append({"experiment_id": config.experiment_id, "weights": dict(new_weights),
                                    "version": allocation_version, "reason": reason, "event_time": watermark})

    def order(action: str, variant: str, reason: str, alert_id: str | None) -> None:
        nonlocal killswitch_version
        killswitch_version = max(killswitch_version + 1, now_ms)
        actions.killswitches.append({"experiment_id": config.experiment_id, "action": action, "variant": variant,
                                     "reason": reason, "alert_id": alert_id, "event_time": watermark,
                                     "version": killswitch_version})

    for t in transitions:
        spec, r = specs[t.reading.guardrail], t.reading
        alert_id = f"{config.experiment_id}/{r.guardrail}/{r.variant}/{t.firing_number}"
        actions.alerts.append({
            "alert_id": alert_id, "experiment_id": config.experiment_id, "variant": r.variant,
            "guardrail": r.guardrail, "kind": r.kind, "state": t.state,
            "severity": "critical" if spec.action == "kill" else "warning", "action": spec.action,
            "observed": r.observed, "threshold": r.threshold, "p_value": r.p_value, "evidence": r.evidence,
            "event_time": watermark, "emitted_time": now_ms,
        })
        if t.state == "firing" and spec.action == "kill" and r.variant in config.treatments and r.variant not in killed:
            killed[r.variant] = alert_id
            order("kill", r.variant, f"guardrail {r.guardrail}: {r.evidence}", alert_id)
            allocate(_without(weights, r.variant, config.control), "rollback")
            if config.allocation.value == "canary":
                canary = CanaryState(canary.step, canary.step_started_ms, canary.step_start_units, "rolled_back")

    if config.allocation.value == "canary" and canary.done is None:
        challenger = config.treatments[0]
        stepped = canary_next(canary, list(config.canary_steps), watermark_ms=watermark,
                              challenger_units=partial.exposures().get(challenger, 0),
                              min_step_s=config.canary_min_step_s, min_step_sample=config.canary_min_step_sample,
                              blocked=bool(guardrails.firing) or bool(killed))
        if stepped.step != canary.step:
            share = config.canary_steps[stepped.step]
            allocate({config.control: round(1.0 - share, 12), challenger: share},
                     "promote" if stepped.done == "promoted" else "canary_step")
        if stepped.done == "promoted":
            order("promote", challenger, f"canary reached 100% after {len(config.canary_steps)} steps with no guardrail firing", None)
            actions.promoted = challenger
        canary = stepped

    if config.allocation.value == "thompson" and not killed:
        names = sorted(weights)
        arms = partial.stats(config.primary_metric)
        if all(name in arms and arms[name].n >= 2 for name in names):
            drawn = thompson_weights([arms[n] for n in names], floor=BANDIT_FLOOR, draws=20_000,
                                     seed=hash_seed(config.experiment_id, allocation_version))
            proposed = {n: float(w) for n, w in zip(names, drawn)}
            if max(abs(proposed[n] - weights.get(n, 0.0)) for n in names) > BANDIT_MIN_CHANGE:
                allocate(proposed, "bandit")

    new_state = ControlState(guardrails, canary, killed, weights if actions.allocations or state.weights else None,
                             allocation_version, killswitch_version)
    return new_state, actions


MANUAL = "manual"  # what ControlState.killed holds for a variant a person killed


def apply_order(config: Any, state: ControlState, order: dict) -> ControlState | None:
    """The control state after a person's kill or resume (`abstream experiment kill|resume`),
    read back from the killswitch topic, or None when the record changes nothing.

    Stage 2's own records come back on the same topic with a version it already holds (it
    stores the version of each record it publishes), and a person's record carries a newer
    one (streams.experiments.order), so the version tells them apart. The state then says
    what routers do: a killed variant gets no traffic, so the canary is rolled back and the
    bandit stops; a resume restores the config's split (routers take the newest kill-switch
    record and the person's Allocation of the config's weights), so nothing is killed any
    more and a canary starts again from its first step. Without this, a canary went on
    stepping past a person's kill and could promote the variant they had stopped.
    """
    if order["version"] <= state.killswitch_version or order["action"] not in ("kill", "resume"):
        return None
    variant = order["variant"]
    if variant not in config.weights or variant == config.control:
        return None
    canary = state.canary
    if order["action"] == "kill":
        killed = {**state.killed, variant: state.killed.get(variant, MANUAL)}
        weights = _without(dict(state.weights or config.weights), variant, config.control)
        if config.allocation.value == "canary" and canary.done is None:
            canary = CanaryState(canary.step, canary.step_started_ms, canary.step_start_units, "rolled_back")
    else:
        killed, weights = {}, None
        if config.allocation.value == "canary":
            canary = CanaryState()
    # The person's Allocation has a version near theirs: stage 2's next one must order after it.
    return ControlState(state.guardrails, canary, killed, weights, max(state.allocation_version, order["version"]),
                        order["version"])


def hash_seed(experiment_id: str, version: int) -> int:
    """A seed that is the same wherever the experiment is evaluated."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{experiment_id}:{version}".encode()).digest()[:4], "big")


def _number(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def decision_record(config: Any, decision: Decision, partial: Partial, now_ms: int,
                    weights: dict[str, float] | None = None) -> dict:
    """The Decision event (schemas/decision.v1.avsc) for a decision under ``weights``
    (the allocation in force; the config's when none was published)."""
    weights = weights or config.weights
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
                     for v, w in sorted(weights.items())],
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
