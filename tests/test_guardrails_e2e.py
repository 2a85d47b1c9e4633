"""Guardrails that act, end to end: real broker, a real worker process, Avro alerts,
kill switches and allocations read back from their topics."""
from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import replace

import numpy as np
import pytest

from streams.codec import Codec, ControlKind, EventKind
from streams.experiments import ExperimentConfig, publish_config, start, stop
from streams.processes import start_worker, stop_worker, wait_healthy
from streams.scenario import ArmTruth, ExperimentScenario, scenario_events, shadow_events
from streams.simulate import SimulatedMessage, publish
from streams.topics import ALERTS, ALLOCATIONS, KILLSWITCH, ensure_topics
from tests.support import read_all, wait_until

pytestmark = pytest.mark.kafka
CODEC = Codec()


def config(experiment_id: str, **fields) -> ExperimentConfig:
    mapping = {"experiment_id": experiment_id, "variants": ["control", "treatment"], "control": "control",
               "primary_metric": {"name": "conversion", "kind": "binary"}, "attribution_window_s": 3600, **fields}
    return start(ExperimentConfig.from_mapping(mapping))


def messages(events) -> list[SimulatedMessage]:
    return [SimulatedMessage(kind, r["unit_id"].encode(), CODEC.encode(kind, r), r) for _, kind, r in events]


def records(settings, topic: str, kind: ControlKind, experiment_id: str) -> list[dict]:
    decoded = [CODEC.decode(kind, m.value()) for m in read_all(settings, settings.topic(topic))]
    return [r for r in decoded if r["experiment_id"] == experiment_id]


def unit_states(settings) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/metrics", timeout=10) as r:
        line = next(l for l in r.read().decode().splitlines() if l.startswith("abstream_unit_states "))
    return float(line.split()[1])


def feed_as_it_happens(settings, events, chunks: int) -> None:
    """Publish in event-time order, a chunk at a time, each once a decision has seen the last:
    canary steps last a stretch of event time, so the stream must not arrive all at once."""
    from streams.decisions import latest_decisions

    events = sorted(events, key=lambda e: e[0])
    size = -(-len(events) // chunks)
    for i in range(0, len(events), size):
        chunk = events[i:i + size]
        publish(settings, messages(chunk))
        newest = {}
        for _, _, r in chunk:
            newest[r["experiment_id"]] = max(newest.get(r["experiment_id"], 0), r["event_time"])

        def seen():
            decisions = latest_decisions(settings)
            return all(e in decisions and decisions[e]["watermark_time"] >= t for e, t in newest.items())

        wait_until(seen, 60, "a decision that includes the chunk")


def error_phase(experiment_id: str, n: int, error_share: float, offset: int, start_ms: int) -> list:
    """n treatment and n control predictions; a share of the treatment's fail."""
    rng = np.random.default_rng(offset)
    events = []
    for i in range(n):
        for variant in ("control", "treatment"):
            failed = variant == "treatment" and rng.random() < error_share
            t = start_ms + i * 20
            events.append((t, EventKind.PREDICTION, {
                "event_id": f"{experiment_id}-{variant}-{offset + i}", "event_time": t, "experiment_id": experiment_id,
                "unit_id": f"{experiment_id}-{variant}-u{(offset + i) % 500}", "request_id": f"r{offset + i}",
                "variant": variant, "model_name": "m", "model_version": variant, "score": None if failed else 0.5,
                "label": None, "latency_ms": 30.0, "status": "error" if failed else "ok"}))
    return events


@pytest.fixture(scope="module")
def run(kafka_broker, tmp_path_factory):
    from tests.support import make_settings

    tmp = tmp_path_factory.mktemp("guardrails")
    settings = replace(make_settings(kafka_broker, tmp), exposure_retention_s=0,
                       model_registry="tests.support:PromotionRecorder")
    ensure_topics(settings)
    canary = {"allocation": "canary", "canary_steps": [0.1, 0.5, 1.0], "canary_min_step_s": 60, "canary_min_step_sample": 50}
    for c in [
        config("latency", guardrails=[{"name": "p95", "kind": "latency_p95", "threshold": 1.5,
                                       "relative_to_control": True, "min_count": 200, "action": "kill"}]),
        config("canary-ok", **canary, variants=[{"name": "control", "model_name": "ranker", "model_version": "v1"},
                                                {"name": "treatment", "model_name": "ranker", "model_version": "v2"}]),
        config("canary-bad", **canary, guardrails=[{"name": "errors", "kind": "error_rate", "threshold": 0.05,
                                                    "min_count": 50, "action": "kill"}]),
        config("shadow-8"), config("shadow-2"),
        config("rearm", guardrails=[{"name": "errors", "kind": "error_rate", "threshold": 0.05, "min_count": 100}]),
        config("bandit", allocation="thompson"),
    ]:
        publish_config(settings, c)
    worker = start_worker(settings, sink=False, log_path=tmp / "worker.log")
    try:
        wait_healthy(settings, worker)
        slow = ExperimentScenario("latency", {"control": ArmTruth(0.1), "treatment": ArmTruth(0.1)},
                                  {"control": 0.5, "treatment": 0.5}, units=3000, predictions_per_unit=2,
                                  latency_regression={"treatment": 4.0}, regression_after=0.5, seed=21)
        events = scenario_events(slow)
        half = next(i for i, (_, k, r) in enumerate(events)
                    if k is EventKind.ASSIGNMENT and r["unit_id"].endswith(f"u{1500:06d}"))
        healthy = ExperimentScenario("canary-ok", {"control": ArmTruth(0.1), "treatment": ArmTruth(0.1)},
                                     {"control": 0.6, "treatment": 0.4}, units=3000, exposures_per_s=10, seed=22)
        erroring = ExperimentScenario("canary-bad", {"control": ArmTruth(0.1), "treatment": ArmTruth(0.1, error_rate=0.2)},
                                      {"control": 0.6, "treatment": 0.4}, units=3000, exposures_per_s=10, seed=23)
        feed_as_it_happens(settings, scenario_events(healthy) + scenario_events(erroring), chunks=8)
        better_arm = ExperimentScenario("bandit", {"control": ArmTruth(0.10), "treatment": ArmTruth(0.25)},
                                        {"control": 0.5, "treatment": 0.5}, units=2000, mean_lag_s=30, seed=26)
        publish(settings, messages(events[:half] + scenario_events(better_arm)
                                   + shadow_events("shadow-8", 3000, disagreement=0.08, seed=24)
                                   + shadow_events("shadow-2", 3000, disagreement=0.02, seed=25)
                                   + error_phase("rearm", 300, 0.2, 0, 1_767_225_600_000)))
        wait_until(lambda: any(a["state"] == "firing" for a in records(settings, ALERTS, ControlKind.ALERT, "rearm")),
                   90, "the first error-rate alert")
        regression_published = time.time()
        publish(settings, messages(events[half:]))
        kill = wait_until(lambda: [k for k in records(settings, KILLSWITCH, ControlKind.KILLSWITCH, "latency")
                                   if k["action"] == "kill"], 90, "the latency kill switch")
        kill_ms = next(m.timestamp()[1] for m in read_all(settings, settings.topic(KILLSWITCH))
                       if CODEC.decode(ControlKind.KILLSWITCH, m.value())["experiment_id"] == "latency")
        print(f"\nfrom the regression's publication to the kill switch: {kill_ms / 1000 - regression_published:.2f} s")
        publish(settings, messages(error_phase("rearm", 3000, 0.0, 300, 1_767_225_700_000)))
        wait_until(lambda: any(a["state"] == "resolved" for a in records(settings, ALERTS, ControlKind.ALERT, "rearm")),
                   90, "the error-rate alert to resolve")
        publish(settings, messages(error_phase("rearm", 600, 0.5, 3300, 1_767_225_800_000)))
        wait_until(lambda: len([a for a in records(settings, ALERTS, ControlKind.ALERT, "rearm") if a["state"] == "firing"]) >= 2,
                   90, "the error-rate alert to fire again")
        wait_until(lambda: [k for k in records(settings, KILLSWITCH, ControlKind.KILLSWITCH, "canary-ok")
                            if k["action"] == "promote"], 90, "the healthy canary's promotion")
        wait_until(lambda: [a for a in records(settings, ALERTS, ControlKind.ALERT, "shadow-8")], 90, "the shadow alert")
        time.sleep(3)  # looks after the last wait must not add alerts
        # The gauge is refreshed every 10 s: wait until two readings 11 s apart agree, so that
        # no unit of another experiment is still being added when rearm's are counted away.
        readings: list[float] = []
        units_before = wait_until(lambda: readings.append(unit_states(settings)) or
                                  (len(readings) > 1 and readings[-1] == readings[-2] and readings[-1]),
                                  120, "the unit-state count to settle", interval_s=11)
        publish_config(settings, stop(config("rearm", guardrails=[{"name": "errors", "kind": "error_rate",
                                                                   "threshold": 0.05, "min_count": 100}])))
        units_after = wait_until(lambda: (n := unit_states(settings)) < units_before and n, 60, "rearm's units to expire")
        yield settings, kill, units_before - units_after
    finally:
        stop_worker(worker)


def test_latency_regression_raises_an_alert_and_kills_the_challenger(run):
    settings, kill, _ = run
    alerts = records(settings, ALERTS, ControlKind.ALERT, "latency")
    assert [(a["guardrail"], a["variant"], a["state"], a["severity"]) for a in alerts] == \
        [("p95", "treatment", "firing", "critical")]
    assert kill[0]["variant"] == "treatment" and kill[0]["alert_id"] == alerts[0]["alert_id"]
    allocations = records(settings, ALLOCATIONS, ControlKind.ALLOCATION, "latency")
    assert allocations[-1]["weights"] == {"control": 1.0, "treatment": 0.0} and allocations[-1]["reason"] == "rollback"


def test_healthy_canary_walks_every_step_to_promote(run):
    settings, _, _ = run
    allocations = records(settings, ALLOCATIONS, ControlKind.ALLOCATION, "canary-ok")
    assert [(a["weights"]["treatment"], a["reason"]) for a in allocations] == [(0.5, "canary_step"), (1.0, "promote")]
    assert allocations[0]["version"] < allocations[1]["version"]
    orders = records(settings, KILLSWITCH, ControlKind.KILLSWITCH, "canary-ok")
    assert [(o["action"], o["variant"]) for o in orders] == [("promote", "treatment")]
    promotions = (settings.home / "promotions.jsonl").read_text().splitlines()
    assert [json.loads(p) for p in promotions] == [["canary-ok", "treatment", "ranker", "v2"]]
    assert records(settings, ALERTS, ControlKind.ALERT, "canary-ok") == []


def test_erroring_canary_is_rolled_back_at_its_current_step(run):
    settings, _, _ = run
    allocations = records(settings, ALLOCATIONS, ControlKind.ALLOCATION, "canary-bad")
    assert [(a["weights"]["treatment"], a["reason"]) for a in allocations] == [(0.0, "rollback")]
    orders = records(settings, KILLSWITCH, ControlKind.KILLSWITCH, "canary-bad")
    assert [(o["action"], o["variant"]) for o in orders] == [("kill", "treatment")]


def test_shadow_alert_at_8_percent_disagreement_not_at_2(run):
    settings, _, _ = run
    [alert] = records(settings, ALERTS, ControlKind.ALERT, "shadow-8")
    assert (alert["guardrail"], alert["variant"], alert["state"]) == ("shadow_disagreement", "ranker:v3", "firing")
    assert 0.06 < alert["observed"] < 0.10
    assert records(settings, ALERTS, ControlKind.ALERT, "shadow-2") == []


def test_alerts_are_not_repeated_and_rearm_after_recovery(run):
    settings, _, _ = run
    alerts = records(settings, ALERTS, ControlKind.ALERT, "rearm")
    assert [(a["state"], a["alert_id"].rsplit("/", 1)[1]) for a in alerts] == [("firing", "1"), ("resolved", "1"), ("firing", "2")]


def test_bandit_moves_traffic_to_the_better_arm_with_a_floor(run):
    settings, _, _ = run
    allocations = records(settings, ALLOCATIONS, ControlKind.ALLOCATION, "bandit")
    assert allocations and {a["reason"] for a in allocations} == {"bandit"}
    assert all(a["version"] < b["version"] for a, b in zip(allocations, allocations[1:]))
    final = allocations[-1]["weights"]
    assert final["treatment"] > 0.9 and final["control"] >= 0.05 - 1e-12
    assert abs(sum(final.values()) - 1.0) < 1e-9


def test_unit_state_of_a_stopped_experiment_expires_after_the_retention(run):
    _, _, expired_units = run
    assert expired_units == 1000  # rearm's 500 units per variant, retention 0 in this run


def test_a_person_kills_and_resumes_a_variant_from_the_command_line(settings):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    ensure_topics(settings)
    publish_config(settings, config("manual"))
    abstream = str(Path(sys.executable).parent / "abstream")
    env = {**os.environ, **settings.to_env()}

    def run(*args):
        return subprocess.run([abstream, "experiment", *args], capture_output=True, text=True, env=env, timeout=60)

    killed = run("kill", "manual", "--variant", "treatment", "--reason", "paged at 3am", "--json")
    assert killed.returncode == 0, killed.stderr
    resumed = run("resume", "manual", "--variant", "treatment")
    assert resumed.returncode == 0 and "treatment 50%" in resumed.stdout
    orders = records(settings, KILLSWITCH, ControlKind.KILLSWITCH, "manual")
    assert [(o["action"], o["variant"]) for o in orders] == [("kill", "treatment"), ("resume", "treatment")]
    assert orders[0]["reason"] == "paged at 3am" and orders[0]["version"] < orders[1]["version"]
    allocations = records(settings, ALLOCATIONS, ControlKind.ALLOCATION, "manual")
    assert [a["weights"]["treatment"] for a in allocations] == [0.0, 0.5]
    assert json.loads(killed.stdout)["allocation"]["weights"] == {"control": 1.0, "treatment": 0.0}
    control = run("kill", "manual", "--variant", "control")
    assert control.returncode == 1 and len(control.stderr.strip().splitlines()) == 1 and "control" in control.stderr
    unknown = run("kill", "manual", "--variant", "nope")
    assert unknown.returncode == 1 and "no variant 'nope'" in unknown.stderr


def test_stage_2_follows_a_persons_kill_and_resume(run):
    """A person's kill reaches stage 2 through the killswitch topic: the next decision reports
    the variant at weight 0 (a canary or bandit would hold), and a resume restores the split."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from streams.decisions import latest_decisions

    settings, _, _ = run
    publish_config(settings, config("held"))
    held = ExperimentScenario("held", {"control": ArmTruth(0.1), "treatment": ArmTruth(0.1)},
                              {"control": 0.5, "treatment": 0.5}, units=400, seed=27)
    publish(settings, messages(scenario_events(held)))

    def treatment_weight() -> float | None:
        decision = latest_decisions(settings).get("held")
        return None if decision is None else next(v["weight"] for v in decision["variants"] if v["variant"] == "treatment")

    wait_until(lambda: treatment_weight() == 0.5, 60, "a decision of the held experiment")
    abstream = str(Path(sys.executable).parent / "abstream")
    env = {**os.environ, **settings.to_env()}
    for action, weight in (("kill", 0.0), ("resume", 0.5)):
        done = subprocess.run([abstream, "experiment", action, "held", "--variant", "treatment"], capture_output=True,
                              text=True, env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: treatment_weight() == weight, 30, f"a decision after the {action}")


def test_a_router_stops_sending_units_to_a_killed_challenger(run):
    """A router built on the client library: the challenger's latency jumps, stage 2 kills it,
    and from the moment the router has read the kill switch no unit goes to the challenger."""
    from streams.client import Router

    settings, _, _ = run
    publish_config(settings, config("router", guardrails=[{"name": "p95", "kind": "latency_p95", "threshold": 1.5,
                                                            "relative_to_control": True, "min_count": 100,
                                                            "action": "kill"}]))
    router = Router(settings).start()
    first_breach = None
    after_kill: list[str] = []
    try:
        deadline = time.monotonic() + 120
        for i in range(1_000_000):
            assert time.monotonic() < deadline, "the router never saw the kill switch"
            killed = router.weights("router").get("treatment", 1.0) == 0.0
            variant = router.variant_for("router", f"router-u{i}")
            if killed:
                after_kill.append(variant)
                if len(after_kill) >= 1000:
                    break
                continue
            slow = variant == "treatment" and i >= 1000
            if slow and first_breach is None:
                first_breach = time.time()
            router.record_prediction("router", f"router-u{i}", request_id=f"router-r{i}", variant=variant,
                                     latency_ms=160.0 if slow else 40.0 + (i % 7), score=0.5)
            if i % 100 == 0:
                router.publisher.flush(10)
                time.sleep(0.01)  # a service's traffic arrives over time, not all at once
    finally:
        router.close()
    assert set(after_kill) == {"control"}
    [kill] = [k for k in records(settings, KILLSWITCH, ControlKind.KILLSWITCH, "router") if k["action"] == "kill"]
    kill_ms = max(m.timestamp()[1] for m in read_all(settings, settings.topic(KILLSWITCH))
                  if CODEC.decode(ControlKind.KILLSWITCH, m.value())["experiment_id"] == "router")
    print(f"\nrouter: from the first slow prediction to the kill switch: {kill_ms / 1000 - first_breach:.2f} s")
    assert kill["variant"] == "treatment"
