"""Stage 2's control state and a person's orders (kill / resume from the command line), on
the pure functions the worker calls: what a canary and a bandit do after each; and which
partial of a source partition stage 2 keeps."""
from __future__ import annotations

from streams.experiments import ExperimentConfig, start
from streams.partials import Partial, VariantPartial
from streams.stage2 import MANUAL, ControlState, apply_order, control, merged_partial, with_partial

T0 = 1_767_225_600_000


def config(experiment_id: str, **extra) -> ExperimentConfig:
    mapping = {"experiment_id": experiment_id, "variants": [{"name": "control"}, {"name": "treatment"}],
               "control": "control", "primary_metric": {"name": "conversion", "kind": "binary"}, **extra}
    if "allocation" not in extra or extra["allocation"] != "canary":
        mapping["variants"] = [{"name": "control", "weight": 50}, {"name": "treatment", "weight": 50}]
    return start(ExperimentConfig.from_mapping(mapping))


def partial_of(cfg: ExperimentConfig, units_per_variant: int, converted_share: dict[str, float]) -> Partial:
    """A partial of units exposed one second apart, a share of each variant converted."""
    partial = Partial(watermark_ms=T0 + (units_per_variant - 1) * 1000, first_exposure_ms=T0)
    for variant in ("control", "treatment"):
        converted = sum(1 for i in range(units_per_variant) if i < converted_share[variant] * units_per_variant)
        partial.variants[variant] = VariantPartial(units_per_variant, {"conversion": [float(converted)]})
        partial.fates["attributed"] = partial.fates.get("attributed", 0) + converted
    return partial


def person(action: str, variant: str, version: int) -> dict:
    return {"experiment_id": "x", "action": action, "variant": variant, "reason": "paged", "alert_id": None,
            "event_time": version, "version": version}


CANARY = {"allocation": "canary", "canary_steps": [0.1, 0.5, 1.0], "canary_min_step_s": 60, "canary_min_step_sample": 50}


def test_a_canary_does_not_step_past_a_persons_kill_and_starts_over_after_a_resume():
    cfg = config("canary", **CANARY)
    partial = partial_of(cfg, 400, {"control": 0.1, "treatment": 0.1})
    first, _ = control(cfg, partial_of(cfg, 10, {"control": 0.1, "treatment": 0.1}), ControlState(), T0)
    assert first.canary.step == 0 and first.canary.step_started_ms is not None
    stepped, actions = control(cfg, partial, first, T0 + 1)
    assert stepped.canary.step == 1 and [a["reason"] for a in actions.allocations] == ["canary_step"]  # due, unkilled

    killed = apply_order(cfg, first, person("kill", "treatment", first.killswitch_version + 10))
    assert killed.killed == {"treatment": MANUAL} and killed.canary.done == "rolled_back"
    assert killed.weights == {"control": 1.0, "treatment": 0.0}
    after, actions = control(cfg, partial, killed, T0 + 2)
    assert after.canary.step == 0 and not actions.allocations and not actions.killswitches and actions.promoted is None

    resumed = apply_order(cfg, after, person("resume", "treatment", killed.killswitch_version + 10))
    assert resumed.killed == {} and resumed.weights is None and resumed.canary.step == 0 and resumed.canary.done is None


def test_a_bandit_stops_while_a_person_has_killed_an_arm_and_resumes_after():
    cfg = config("bandit", allocation="thompson")
    partial = partial_of(cfg, 300, {"control": 0.05, "treatment": 0.30})
    _, actions = control(cfg, partial, ControlState(), T0)
    assert [a["reason"] for a in actions.allocations] == ["bandit"]  # the bandit would move traffic

    killed = apply_order(cfg, ControlState(), person("kill", "treatment", T0))
    _, actions = control(cfg, partial, killed, T0 + 1)
    assert not actions.allocations
    resumed = apply_order(cfg, killed, person("resume", "treatment", T0 + 5))
    _, actions = control(cfg, partial, resumed, T0 + 6)
    assert [a["reason"] for a in actions.allocations] == ["bandit"]


def test_stage_2s_own_records_and_orders_it_cannot_follow_change_nothing():
    cfg = config("plain")
    own = ControlState(killed={"treatment": "plain/errors/treatment/1"}, killswitch_version=T0 + 3)
    assert apply_order(cfg, own, person("kill", "treatment", T0 + 3)) is None      # its own kill, read back
    assert apply_order(cfg, own, person("kill", "treatment", T0 + 2)) is None      # older than what it holds
    assert apply_order(cfg, ControlState(), person("kill", "control", T0)) is None  # the CLI refuses it too
    assert apply_order(cfg, ControlState(), person("kill", "nope", T0)) is None
    assert apply_order(cfg, ControlState(), person("promote", "treatment", T0)) is None
    # A person's kill of a variant stage 2 killed keeps the guardrail's alert as the reason.
    again = apply_order(cfg, own, person("kill", "treatment", T0 + 4))
    assert again.killed == own.killed and again.killswitch_version == T0 + 4


def test_stage_2_keeps_each_source_partitions_partial_with_the_furthest_position():
    """A partial read again (after a rebalance, from the group's last commit) or come late (from
    a partition's last owner) is older than the one stored: it must not replace it."""
    cfg = config("x")
    small = partial_of(cfg, 80, {"control": 0.1, "treatment": 0.2})
    large = partial_of(cfg, 148, {"control": 0.1, "treatment": 0.2})
    other = partial_of(cfg, 30, {"control": 0.5, "treatment": 0.5})
    stored = with_partial(None, 0, small.to_dict(), 500, table_partition=3)
    stored = with_partial(stored, 1, other.to_dict(), 40, table_partition=3)
    stored = with_partial(stored, 0, large.to_dict(), 900, table_partition=3)
    assert stored["positions"] == {"0": 900, "1": 40} and stored["partition"] == 3
    assert with_partial(stored, 0, small.to_dict(), 500, table_partition=3) is None
    again = with_partial(stored, 0, large.to_dict(), 900, table_partition=3)  # the same one again: harmless
    assert again == stored
    units = {v: p.units for v, p in merged_partial(stored).variants.items()}
    assert units == {"control": 148 + 30, "treatment": 148 + 30}
    # A partial from a worker that published no position is taken, and forgets the position.
    legacy = with_partial(stored, 0, small.to_dict(), None, table_partition=3)
    assert legacy["positions"] == {"1": 40} and merged_partial(legacy).variants["control"].units == 80 + 30
    assert with_partial(legacy, 0, large.to_dict(), 10, table_partition=3)["positions"]["0"] == 10
