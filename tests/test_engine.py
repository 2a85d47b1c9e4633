"""The streaming engine end to end: real broker, real worker processes, embedded ClickHouse.

Three experiments run at once: a treatment with a true effect, an A/A test, and an
assignment bug (52/48 on a 50/50 config). Their statistics must equal, exactly, both the
ground truth computed here with numpy from the generator's own records and a recomputation
from the raw rows in ClickHouse; one worker and two workers must give identical decisions.
"""
from __future__ import annotations

import json
import time
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest

from streams.codec import Codec, EventKind
from streams.decisions import latest_decisions
from streams.experiments import ExperimentConfig, publish_config, start
from streams.processes import start_worker, stop_worker, wait_healthy
from streams.scenario import ArmTruth, ExperimentScenario, scenario_events
from streams.simulate import SimulatedMessage, publish
from streams.topics import ensure_topics
from tests.support import free_port, make_settings

pytestmark = pytest.mark.kafka

WINDOW_S = 3600
SCENARIOS = [
    ExperimentScenario("effect", {"control": ArmTruth(0.10), "treatment": ArmTruth(0.16, revenue_per_conversion=24)},
                       {"control": 0.5, "treatment": 0.5}, units=4000, window_s=WINDOW_S, seed=11),
    ExperimentScenario("aa", {"control": ArmTruth(0.12), "treatment": ArmTruth(0.12)},
                       {"control": 0.5, "treatment": 0.5}, units=4000, window_s=WINDOW_S, seed=12),
    ExperimentScenario("srm", {"control": ArmTruth(0.05), "treatment": ArmTruth(0.05)},
                       {"control": 0.52, "treatment": 0.48}, units=12000, window_s=WINDOW_S,
                       predictions_per_unit=0.0, seed=13),
]


def config_for(scenario: ExperimentScenario) -> ExperimentConfig:
    return start(ExperimentConfig.from_mapping({
        "experiment_id": scenario.experiment_id,
        "variants": [{"name": "control", "weight": 50}, {"name": "treatment", "weight": 50}],
        "control": "control",
        "primary_metric": {"name": "conversion", "kind": "binary"},
        "secondary_metrics": [{"name": "revenue", "kind": "continuous"}],
        "min_sample_per_variant": 200,
        "sequential_method": "sequential",
        "attribution_window_s": WINDOW_S,
    }))


def ground_truth(events, window_s: float) -> dict:
    """The attribution rules applied by hand to the generator's records, in arrival order."""
    seen, exposure, inconsistencies = set(), {}, 0
    outcomes, predictions = [], []
    for _, kind, r in events:
        identity = (kind, r["unit_id"], r["event_id"])
        if identity in seen:
            continue
        seen.add(identity)
        if kind is EventKind.ASSIGNMENT:
            if r["unit_id"] not in exposure:
                exposure[r["unit_id"]] = (r["variant"], r["event_time"])
            elif exposure[r["unit_id"]][0] != r["variant"]:
                inconsistencies += 1
        elif kind is EventKind.PREDICTION:
            predictions.append(r)
        elif kind is EventKind.OUTCOME:
            outcomes.append(r)
    # A prediction is inconsistent when it names another variant than its unit's exposure,
    # whichever arrived first (they travel on different topics).
    inconsistencies += sum(1 for p in predictions if p["unit_id"] in exposure and exposure[p["unit_id"]][0] != p["variant"])
    fates = defaultdict(int)
    totals = defaultdict(float)
    for o in outcomes:
        if o["unit_id"] not in exposure:
            fates["awaiting_exposure"] += 1
            continue
        t0 = exposure[o["unit_id"]][1]
        if o["event_time"] < t0:
            fates["before_exposure"] += 1
        elif o["event_time"] >= t0 + window_s * 1000:
            fates["after_window"] += 1
        else:
            fates["attributed"] += 1
            totals[(o["unit_id"], o["metric"])] += o["value"]
    return {"exposure": exposure, "totals": totals, "fates": dict(fates), "inconsistencies": inconsistencies}


def statistics_from_totals(exposure: dict, totals: dict) -> dict:
    """(metric, variant) -> (units, sums) computed with numpy from per-unit totals."""
    result = {}
    for variant in ("control", "treatment"):
        units = [u for u, (v, _) in exposure.items() if v == variant]
        conversion = np.array([totals.get((u, "conversion"), 0.0) for u in units])
        revenue = np.array([totals.get((u, "revenue"), 0.0) for u in units])
        result[("conversion", variant)] = (len(units), [float(np.sum(conversion > 0))])
        result[("revenue", variant)] = (len(units), [float(np.sum(revenue)), float(np.sum(revenue ** 2))])
    return result


def decision_statistics(decision: dict) -> dict:
    return {(s["metric"], s["variant"]): (s["units"], list(s["sums"])) for s in decision["statistics"]}


def sql(settings, query: str) -> list:
    url = f"http://127.0.0.1:{settings.web_port}/sql?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())["rows"]


def clickhouse_statistics(settings, experiment_id: str) -> dict:
    """The same statistics recomputed from the raw ClickHouse rows with the same rules."""
    exposures = "(SELECT unit_id, argMin(variant, event_time) AS variant, min(event_time) AS exposed " \
                f"FROM {{db}}.assignments WHERE experiment_id = '{experiment_id}' GROUP BY unit_id)"
    exposure = {u: (v, 0) for u, v in sql(settings, f"SELECT unit_id, variant FROM {exposures}")}
    rows = sql(settings, f"""
        SELECT o.unit_id, o.metric, sum(o.value) FROM {{db}}.outcomes AS o INNER JOIN {exposures} AS e USING unit_id
        WHERE o.experiment_id = '{experiment_id}' AND o.event_time >= e.exposed
          AND toUnixTimestamp64Milli(o.event_time) < toUnixTimestamp64Milli(e.exposed) + {WINDOW_S * 1000}
        GROUP BY o.unit_id, o.metric""")
    return statistics_from_totals(exposure, {(u, m): float(v) for u, m, v in rows})


def served_decision(worker_settings, experiment_id: str) -> dict | None:
    """The decision served by whichever worker evaluates the experiment."""
    for s in worker_settings:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.web_port}/experiments/{experiment_id}", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError:
            continue
    return None


def run_pipeline(settings, tmp_path, workers: int, events_by_experiment: dict) -> dict:
    ensure_topics(settings)
    for scenario in SCENARIOS:
        publish_config(settings, config_for(scenario))
    processes = []
    worker_settings = []
    for i in range(workers):
        s = replace(settings, web_port=free_port(), home=tmp_path / f"worker{i}",
                    clickhouse_dsn=f"chdb://{tmp_path / 'worker-chdb'}")
        worker_settings.append(s)
        processes.append(start_worker(s, sink=i == 0, log_path=tmp_path / f"worker{i}.log"))
    try:
        for s, p in zip(worker_settings, processes):
            wait_healthy(s, p)
        codec = Codec()
        merged = sorted((item for events in events_by_experiment.values() for item in events), key=lambda item: item[0])
        messages = [SimulatedMessage(kind, record["unit_id"].encode(), codec.encode(kind, record), record)
                    for _, kind, record in merged]
        publish(settings, messages)
        truths = {e: ground_truth(events, WINDOW_S) for e, events in events_by_experiment.items()}

        def converged() -> dict | None:
            decisions = latest_decisions(settings)
            for experiment_id, truth in truths.items():
                d = decisions.get(experiment_id)
                if d is None or sum(v["units"] for v in d["variants"]) != len(truth["exposure"]) \
                        or sum(d["outcome_fates"].values()) != sum(truth["fates"].values()):
                    return None
            return decisions

        deadline = time.monotonic() + 180
        while (decisions := converged()) is None:
            assert time.monotonic() < deadline, "decisions did not converge: " + (tmp_path / "worker0.log").read_text()[-3000:]
            assert all(p.poll() is None for p in processes), "a worker died"
            time.sleep(1)
        time.sleep(2 * settings.decision_interval_s)  # a later decision would not change anything
        decisions = latest_decisions(settings)

        def sink_caught_up() -> dict | None:
            # The sink (a thread of worker 0) may trail stage 1: wait until every published
            # row is in ClickHouse, then compare the statistics recomputed from them exactly.
            counts = dict(sql(worker_settings[0], "SELECT 'a', uniqExact(unit_id, event_id) FROM {db}.assignments "
                                                  "UNION ALL SELECT 'o', uniqExact(unit_id, event_id) FROM {db}.outcomes"))
            published = {tag: len({(m.record["unit_id"], m.record["event_id"]) for m in messages if m.kind is kind})
                         for tag, kind in (("a", EventKind.ASSIGNMENT), ("o", EventKind.OUTCOME))}
            return {e: clickhouse_statistics(worker_settings[0], e) for e in truths} if counts == published else None

        deadline = time.monotonic() + 120
        while (clickhouse := sink_caught_up()) is None:
            assert time.monotonic() < deadline, "the sink did not write every assignment and outcome"
            time.sleep(1)
        served = {e: served_decision(worker_settings, e) for e in truths}

        def decisions_landed():
            rows = sql(worker_settings[0], "SELECT experiment_id, argMax(statistics, (decision_time, kafka_offset)) "
                                           "FROM {db}.decisions GROUP BY experiment_id")
            landed = {e: stats for e, stats in rows}
            return landed if len(landed) == len(truths) else None

        deadline = time.monotonic() + 60
        while (stored_decisions := decisions_landed()) is None:
            assert time.monotonic() < deadline, "decisions did not reach ClickHouse"
            time.sleep(1)
        return {"decisions": decisions, "truths": truths, "clickhouse": clickhouse, "served": served,
                "settings": settings, "stored_decisions": stored_decisions}
    finally:
        for p in processes:
            stop_worker(p)


@pytest.fixture(scope="module")
def scenario_events_by_experiment():
    return {s.experiment_id: scenario_events(s) for s in SCENARIOS}


@pytest.fixture(scope="module")
def one_worker(kafka_broker, tmp_path_factory, scenario_events_by_experiment):
    tmp = tmp_path_factory.mktemp("one-worker")
    return run_pipeline(make_settings(kafka_broker, tmp), tmp, 1, scenario_events_by_experiment)


@pytest.fixture(scope="module")
def two_workers(kafka_broker, tmp_path_factory, scenario_events_by_experiment):
    tmp = tmp_path_factory.mktemp("two-workers")
    return run_pipeline(make_settings(kafka_broker, tmp), tmp, 2, scenario_events_by_experiment)


@pytest.mark.parametrize("experiment_id", [s.experiment_id for s in SCENARIOS])
def test_streaming_statistics_equal_numpy_and_clickhouse_exactly(one_worker, experiment_id):
    truth = one_worker["truths"][experiment_id]
    decision = one_worker["decisions"][experiment_id]
    expected = statistics_from_totals(truth["exposure"], truth["totals"])
    assert decision_statistics(decision) == expected
    assert one_worker["clickhouse"][experiment_id] == expected
    assert decision["outcome_fates"] == truth["fates"]
    assert decision["assignment_inconsistencies"] == truth["inconsistencies"]
    assert {"attributed", "before_exposure", "after_window", "awaiting_exposure"} <= set(truth["fates"])


def test_decisions_land_in_clickhouse_with_their_statistics(one_worker):
    for experiment_id, statistics in one_worker["stored_decisions"].items():
        # Named tuples travel as JSON objects through the SQL endpoint.
        assert {(x["metric"], x["variant"]): (x["units"], list(x["sums"])) for x in statistics} == \
            decision_statistics(one_worker["decisions"][experiment_id])


def test_verdicts(one_worker):
    decisions = one_worker["decisions"]
    assert (decisions["effect"]["verdict"], decisions["effect"]["verdict_variant"]) == ("ship", "treatment")
    assert decisions["aa"]["verdict"] == "continue" and not decisions["aa"]["srm_flag"]
    assert decisions["srm"]["srm_flag"] and decisions["srm"]["verdict"] == "continue"
    assert "sample ratio mismatch" in decisions["srm"]["reason"]
    assert not decisions["effect"]["srm_flag"]


def test_decision_served_over_http_and_by_status_command(one_worker):
    settings = one_worker["settings"]
    decision = one_worker["decisions"]["effect"]
    assert decision_statistics(one_worker["served"]["effect"]) == decision_statistics(decision)
    abstream = str(Path(sys.executable).parent / "abstream")
    env = {**os.environ, **settings.to_env()}
    as_json = subprocess.run([abstream, "status", "effect", "--json"], capture_output=True, text=True, env=env, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout) == decision
    for_people = subprocess.run([abstream, "status", "effect"], capture_output=True, text=True, env=env, timeout=60)
    assert for_people.returncode == 0 and "ship treatment" in for_people.stdout.splitlines()[0]
    missing = subprocess.run([abstream, "status", "no-such-experiment"], capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1


def test_one_and_two_workers_give_identical_decisions(one_worker, two_workers):
    def comparable(decision: dict) -> dict:
        return {k: v for k, v in decision.items() if k != "decision_time"}

    for experiment_id in one_worker["truths"]:
        assert comparable(two_workers["decisions"][experiment_id]) == comparable(one_worker["decisions"][experiment_id])
