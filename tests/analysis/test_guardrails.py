"""Guardrail readings, alert transitions and the canary rule, on raw data and by hand."""
from __future__ import annotations

import numpy as np
import pytest

from analysis.guardrails import (CanaryState, ExperimentHealth, GuardrailSpec, GuardrailStates, Reading,
                                 canary_next, read_guardrails, transition)
from analysis.sketch import QuantileSketch
from analysis.stats import ProportionStats


def health(**overrides) -> ExperimentHealth:
    base = dict(control="control", alpha=0.05, increase_is_better={}, status={}, latency={}, metrics={},
                exposures={}, weights={"control": 0.5, "treatment": 0.5}, shadow={}, scores_by_hour={})
    return ExperimentHealth(**{**base, **overrides})


def reading(breached: bool, recovered: bool, guardrail: str = "latency", variant: str = "treatment") -> Reading:
    return Reading(guardrail, "latency_p95", variant, breached, recovered, None, 1.0, None, "")


def test_alerts_fire_once_per_breach_and_rearm_after_recovery():
    states = GuardrailStates()
    sequence = [(False, True), (True, False), (True, False), (False, False), (True, False),
                (False, True), (False, True), (True, False)]
    emitted = []
    for breached, recovered in sequence:
        states, events = transition(states, [reading(breached, recovered)])
        emitted += [(e.state, e.firing_number) for e in events]
    # Fires at the first breach, stays quiet while it persists or hovers in the band,
    # resolves on clear recovery, and fires again (the second time) after re-arming.
    assert emitted == [("firing", 1), ("resolved", 1), ("firing", 2)]
    assert GuardrailStates.from_dict(states.to_dict()) == states


def test_latency_ceiling_reads_the_sketch_within_its_accuracy():
    rng = np.random.default_rng(1)
    control = rng.lognormal(np.log(40), 0.3, 5000)
    treatment = rng.lognormal(np.log(80), 0.3, 5000)
    sketches = {"control": QuantileSketch(0.02).update(control), "treatment": QuantileSketch(0.02).update(treatment)}
    spec = GuardrailSpec("latency", "latency_p95", 1.5, relative_to_control=True, min_count=100)
    [r] = read_guardrails([spec], health(latency=sketches))
    exact = np.quantile(treatment, 0.95, method="lower")
    assert abs(r.observed - exact) <= 0.02 * exact
    assert abs(r.threshold - 1.5 * np.quantile(control, 0.95, method="lower")) <= 0.02 * r.threshold
    assert r.breached and not r.recovered
    absolute = GuardrailSpec("latency", "latency_p95", 500.0, min_count=100)
    [calm] = read_guardrails([absolute], health(latency=sketches))
    assert not calm.breached and calm.recovered


def test_error_rate_relative_to_control_needs_an_always_valid_difference():
    spec = GuardrailSpec("errors", "error_rate", 2.0, relative_to_control=True, min_count=100)
    worse = health(status={"control": {"ok": 990, "error": 10}, "treatment": {"ok": 940, "error": 60}})
    [r] = read_guardrails([spec], worse)
    assert r.breached and r.p_value < 0.05
    noisy = health(status={"control": {"ok": 99, "error": 1}, "treatment": {"ok": 97, "error": 3}})
    [r] = read_guardrails([spec], noisy)
    assert not r.breached  # 3x control, but 3 errors in 100 prove nothing yet


def test_metric_harm_and_srm():
    harm = GuardrailSpec("harm", "metric_harm", 0.05, metric="conversion", margin=0.0, min_count=100)
    arms = {"control": ProportionStats(5000, 600), "treatment": ProportionStats(5000, 400)}
    [r] = read_guardrails([harm], health(metrics={"conversion": arms}))
    assert r.breached
    srm = GuardrailSpec("srm", "srm", 0.01)
    [r] = read_guardrails([srm], health(exposures={"control": 10_400, "treatment": 9_600}))
    assert r.breached and r.variant == "*"
    [r] = read_guardrails([srm], health(exposures={"control": 10_020, "treatment": 9_980}))
    assert not r.breached


def test_shadow_disagreement_threshold():
    spec = GuardrailSpec("shadow", "shadow_disagreement", 0.05)
    at = lambda rate: {"m:v2": {"runs": 1000, "ok": 1000, "compared": 1000, "disagree": rate * 1000}}
    [high] = read_guardrails([spec], health(shadow=at(0.08)))
    [low] = read_guardrails([spec], health(shadow=at(0.02)))
    assert high.breached and high.variant == "m:v2"
    assert not low.breached and low.recovered


@pytest.mark.parametrize("blocked", [False, True])
def test_canary_walks_its_steps_and_promotes_at_full_weight(blocked):
    steps = [0.05, 0.25, 0.5, 1.0]
    state = canary_next(CanaryState(), steps, watermark_ms=0, challenger_units=0, min_step_s=60, min_step_sample=100,
                        blocked=blocked)
    seen = [state.step]
    for minute in range(1, 10):
        state = canary_next(state, steps, watermark_ms=minute * 60_000, challenger_units=minute * 150,
                            min_step_s=60, min_step_sample=100, blocked=blocked)
        seen.append(state.step)
    if blocked:
        assert seen == [0] * 10 and state.done is None
    else:
        assert seen[:5] == [0, 1, 2, 3, 3] and state.done == "promoted"


def test_canary_waits_for_time_and_sample():
    state = CanaryState(0, 0, 0)
    assert canary_next(state, [0.1, 1.0], watermark_ms=30_000, challenger_units=500, min_step_s=60,
                       min_step_sample=100, blocked=False).step == 0
    assert canary_next(state, [0.1, 1.0], watermark_ms=90_000, challenger_units=50, min_step_s=60,
                       min_step_sample=100, blocked=False).step == 0
