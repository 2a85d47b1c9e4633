"""`abstream report`: numbers equal the stream's last decision and references computed from
the raw events with numpy/scipy/statsmodels; the verdict of an effect, an A/A test and an
SRM; the files; one-line failures; parameterised queries; CUPED.

One worker with --sink processes three experiments through the real broker; the report runs
as a subprocess and reads ClickHouse through the worker's loopback /sql endpoint.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import statsmodels.api as sm
from scipy import stats
from statsmodels.stats.proportion import proportions_ztest

from analysis.bootstrap import bootstrap_lift
from analysis.report import ReportError, analyse, collect
from streams.cli import report_query
from streams.codec import Codec, EventKind
from streams.decisions import latest_decisions
from streams.experiments import ExperimentConfig, publish_config, start
from streams.processes import start_worker, stop_worker, wait_healthy
from streams.scenario import ArmTruth, ExperimentScenario, scenario_events
from streams.simulate import SimulatedMessage, publish
from streams.stage2 import policy_of
from streams.topics import ensure_topics
from streams.warehouse import Warehouse
from tests.support import free_port, make_settings
from tests.test_views import attribution_truth, insert_events, shadow_events

pytestmark = pytest.mark.kafka

WINDOW_S = 3600
SCENARIOS = [
    ExperimentScenario("effect", {"control": ArmTruth(0.10), "treatment": ArmTruth(0.16, revenue_per_conversion=24)},
                       {"control": 0.5, "treatment": 0.5}, units=4000, window_s=WINDOW_S, seed=11),
    ExperimentScenario("aa", {"control": ArmTruth(0.12), "treatment": ArmTruth(0.12)},
                       {"control": 0.5, "treatment": 0.5}, units=4000, window_s=WINDOW_S, seed=12),
    ExperimentScenario("srm", {"control": ArmTruth(0.05), "treatment": ArmTruth(0.05)},
                       {"control": 0.6, "treatment": 0.4}, units=3000, window_s=WINDOW_S,
                       predictions_per_unit=0.0, seed=13),
]
ABSTREAM = str(Path(sys.executable).parent / "abstream")


def config_for(experiment_id: str, **extra) -> ExperimentConfig:
    return start(ExperimentConfig.from_mapping({
        "experiment_id": experiment_id,
        "variants": [{"name": "control", "weight": 50}, {"name": "treatment", "weight": 50}],
        "control": "control",
        "primary_metric": {"name": "conversion", "kind": "binary"},
        "secondary_metrics": [{"name": "revenue", "kind": "continuous"}],
        "min_sample_per_variant": 200, "sequential_method": "sequential", "attribution_window_s": WINDOW_S,
        "mde": 0.10, **extra,
    }))


def distinct(events) -> list:
    seen, out = set(), []
    for item in events:
        key = (item[1], item[2]["unit_id"], item[2]["event_id"])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def sql(settings, query: str) -> list:
    import urllib.parse
    import urllib.request

    url = f"http://127.0.0.1:{settings.web_port}/sql?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())["rows"]


def run_report(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([ABSTREAM, "report", *args], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def pipeline(kafka_broker, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    settings = make_settings(kafka_broker, tmp)
    events = {s.experiment_id: scenario_events(s) for s in SCENARIOS}
    events["effect"] += shadow_events(events["effect"], seed=21)
    ensure_topics(settings)
    for s in SCENARIOS:
        publish_config(settings, config_for(s.experiment_id))
    publish_config(settings, config_for("empty"))
    worker = replace(settings, web_port=free_port(), home=tmp / "worker", clickhouse_dsn=f"chdb://{tmp / 'worker-chdb'}")
    process = start_worker(worker, sink=True, log_path=tmp / "worker.log")
    try:
        wait_healthy(worker, process)
        codec = Codec()
        merged = sorted((item for e in events.values() for item in e), key=lambda item: item[0])
        publish(settings, [SimulatedMessage(kind, r["unit_id"].encode(), codec.encode(kind, r), r) for _, kind, r in merged])
        unique = {e: distinct(v) for e, v in events.items()}
        expected_units = {e: len({r["unit_id"] for _, k, r in v if k is EventKind.ASSIGNMENT}) for e, v in unique.items()}
        expected_outcomes = {e: sum(k is EventKind.OUTCOME for _, k, _ in v) for e, v in unique.items()}
        expected_rows = {t: sum(k is kind for v in unique.values() for _, k, _ in v)
                         for t, kind in (("assignments", EventKind.ASSIGNMENT), ("outcomes", EventKind.OUTCOME),
                                         ("predictions", EventKind.PREDICTION), ("shadow", EventKind.SHADOW))}

        def converged() -> bool:
            decisions = latest_decisions(settings)
            for e in expected_units:
                d = decisions.get(e)
                if d is None or sum(v["units"] for v in d["variants"]) != expected_units[e] \
                        or sum(d["outcome_fates"].values()) != expected_outcomes[e]:
                    return False
            return all(sql(worker, f"SELECT count() FROM {{db}}.{t}")[0][0] == n for t, n in expected_rows.items())

        deadline = time.monotonic() + 180
        while not converged():
            assert time.monotonic() < deadline, "no convergence: " + (tmp / "worker.log").read_text()[-3000:]
            assert process.poll() is None, "the worker died"
            time.sleep(1)
        time.sleep(2 * settings.decision_interval_s)
        decisions = latest_decisions(settings)
        env = {**os.environ, **worker.to_env()}
        reports = {}
        for e in events:
            done = run_report(env, e, "--json", "--out", str(tmp / "reports" / e))
            assert done.returncode == 0, done.stderr
            reports[e] = json.loads(done.stdout)
        yield {"decisions": decisions, "reports": reports, "events": events, "env": env, "tmp": tmp}
    finally:
        stop_worker(process)


@pytest.mark.parametrize("experiment_id", [s.experiment_id for s in SCENARIOS])
def test_numbers_equal_the_last_streaming_decision(pipeline, experiment_id):
    decision, report = pipeline["decisions"][experiment_id], pipeline["reports"][experiment_id]
    assert report["units"] == {v["variant"]: v["units"] for v in decision["variants"]}
    streamed = {(c["metric"], c["variant"]): c for c in decision["comparisons"]}
    assert len(streamed) == 2
    for c in report["comparisons"]:
        s = streamed[(c["metric"], c["variant"])]
        assert c["anytime_valid"]["estimate"] == pytest.approx(s["lift"], rel=1e-9, abs=1e-12)
        for ours, theirs in (("ci_low", "ci_low"), ("ci_high", "ci_high"), ("p_value", "p_value")):
            assert c["anytime_valid"][ours] == pytest.approx(s[theirs], rel=1e-9, abs=1e-12)
        assert c["control_mean"] == pytest.approx(s["control_mean"], rel=1e-12)
        assert c["bayesian"]["chance_to_win"] is not None
    assert report["srm"]["sequential_p_value"] == pytest.approx(decision["srm_p_value"], rel=1e-9)


def test_numbers_equal_references_from_the_raw_events(pipeline):
    report = pipeline["reports"]["effect"]
    truth = attribution_truth(pipeline["events"]["effect"], WINDOW_S)
    arms = {v: [u for u, (arm, _, _) in truth["exposure"].items() if arm == v] for v in ("control", "treatment")}
    conversion = {v: np.array([truth["totals"].get((u, "conversion"), 0) > 0 for u in units]) for v, units in arms.items()}
    revenue = {v: np.array([truth["totals"].get((u, "revenue"), 0.0) for u in units]) for v, units in arms.items()}
    primary = next(c for c in report["comparisons"] if c["primary"])
    secondary = next(c for c in report["comparisons"] if not c["primary"])
    assert (primary["control_units"], primary["treatment_units"]) == (len(arms["control"]), len(arms["treatment"]))
    assert primary["fixed"]["estimate"] == pytest.approx(conversion["treatment"].mean() / conversion["control"].mean() - 1, rel=1e-12)
    _, p = proportions_ztest([conversion["treatment"].sum(), conversion["control"].sum()],
                             [conversion["treatment"].size, conversion["control"].size])
    assert primary["fixed"]["p_value"] == pytest.approx(p, rel=1e-9)
    assert secondary["fixed"]["estimate"] == pytest.approx(revenue["treatment"].mean() / revenue["control"].mean() - 1, rel=1e-12)
    mw = stats.mannwhitneyu(revenue["treatment"], revenue["control"], method="asymptotic")
    assert secondary["mann_whitney"]["p_value"] == pytest.approx(mw.pvalue, rel=1e-9)
    scipy_boot = stats.bootstrap((revenue["control"], revenue["treatment"]), lambda c, t, axis=-1:
                                 t.mean(axis=axis) / c.mean(axis=axis) - 1, method="percentile", n_resamples=2000,
                                 random_state=np.random.default_rng(3), vectorized=True).confidence_interval
    width = scipy_boot.high - scipy_boot.low
    assert abs(secondary["bootstrap"]["ci_low"] - scipy_boot.low) < 0.1 * width
    assert abs(secondary["bootstrap"]["ci_high"] - scipy_boot.high) < 0.1 * width
    counts = [len(arms["control"]), len(arms["treatment"])]
    assert report["srm"]["chi2_p_value"] == pytest.approx(stats.chisquare(counts).pvalue, rel=1e-9)
    for seg in (s for s in report["segments"] if s["key"] == "country"):
        in_segment = {v: [u for u in units if truth["exposure"][u][2]["country"] == seg["value"]] for v, units in arms.items()}
        assert seg["units"] == {v: len(u) for v, u in in_segment.items()}
    shadow = report["shadow"][0]
    runs = {r["event_id"]: r for _, k, r in pipeline["events"]["effect"] if k is EventKind.SHADOW}
    assert shadow["runs"] == len(runs) and shadow["timeouts"] == sum(r["challenger_status"] == "timeout" for r in runs.values())


def test_verdicts(pipeline):
    reports = pipeline["reports"]
    assert (reports["effect"]["verdict"], reports["effect"]["verdict_variant"]) == ("ship", "treatment")
    assert reports["aa"]["verdict"] == "extend" and "more" in reports["aa"]["reasons"][0]
    assert reports["srm"]["verdict"] == "inconclusive" and "sample ratio mismatch" in reports["srm"]["reasons"][0]
    assert reports["srm"]["srm"]["flag"] and not reports["effect"]["srm"]["flag"]


@pytest.mark.parametrize("experiment_id", [s.experiment_id for s in SCENARIOS])
def test_files_render(pipeline, experiment_id):
    folder = pipeline["tmp"] / "reports" / experiment_id
    page = (folder / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and 'src="http' not in page
    markdown = (folder / "report.md").read_text()
    assert f"**Verdict: {pipeline['reports'][experiment_id]['verdict']}" in markdown
    for name in ("lift_over_time", "traffic_split", "latency", "shadow_agreement", "drift"):
        assert (folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name}.png)" in markdown


def test_people_output_and_one_line_failures(pipeline):
    env = pipeline["env"]
    done = run_report(env, "effect", "--out", str(pipeline["tmp"] / "people"))
    assert done.returncode == 0 and done.stdout.splitlines()[0] == "effect: ship treatment"
    for args, words in ((["no-such-experiment"], "no experiment 'no-such-experiment'"),
                        (["empty"], "no exposure of experiment 'empty'")):
        failed = run_report(env, *args, "--out", str(pipeline["tmp"] / "failed"))
        assert failed.returncode == 1 and words in failed.stderr, failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1


def test_queries_take_a_hostile_experiment_id_as_a_value(settings):
    """Server-side parameters read only the hostile experiment's rows."""
    warehouse = Warehouse(settings.clickhouse_dsn, settings.clickhouse_database)
    warehouse.apply_schema()
    hostile = "x' OR 1=1 --"
    small = ExperimentScenario("other", {"control": ArmTruth(0.2), "treatment": ArmTruth(0.2)},
                               {"control": 0.5, "treatment": 0.5}, units=300, seed=3)
    events = scenario_events(small)
    insert_events(warehouse, events)
    insert_events(warehouse, [(t, k, {**r, "experiment_id": hostile}) for t, k, r in events[:200]])
    config = replace(config_for("other"), experiment_id=hostile)
    direct = collect(config, report_query(settings))
    units = len({r["unit_id"] for _, k, r in events[:200] if k is EventKind.ASSIGNMENT})
    assert sum(r["n"] for r in direct.exposures) == units
    with pytest.raises(ReportError, match="no exposure"):
        collect(replace(config, experiment_id="' OR ''='"), report_query(settings))


def test_cuped_against_ols(settings):
    """CUPED with a pre-experiment covariate: the adjusted difference equals the treatment
    coefficient of OLS y ~ 1 + treatment + covariate (statsmodels) on the raw units."""
    warehouse = Warehouse(settings.clickhouse_dsn, settings.clickhouse_database)
    warehouse.apply_schema()
    rng = np.random.default_rng(8)
    n, t0 = 600, 1_767_225_600_000
    variant = np.where(rng.random(n) < 0.5, "control", "treatment")
    pre = rng.gamma(2.0, 10.0, n).round()
    revenue = np.maximum(0, (0.8 * pre + rng.normal(0, 5, n) + np.where(variant == "treatment", 2.0, 0.0))).round()
    units = [f"u{i}" for i in range(n)]
    warehouse.insert("assignments", ["event_id", "event_time", "experiment_id", "unit_id", "variant", "allocation_version", "segment"],
                     [[f"a{i}" for i in range(n)], [t0 + i for i in range(n)], ["cuped"] * n, units, list(variant), [1] * n, [{}] * n])
    outcome_rows = [(f"p{i}", t0 - 86_400_000, units[i], "revenue_pre", float(pre[i])) for i in range(n)] + \
                   [(f"r{i}", t0 + i + 1000, units[i], "revenue", float(revenue[i])) for i in range(n) if revenue[i] > 0]
    columns = list(zip(*outcome_rows))
    warehouse.insert("outcomes", ["event_id", "event_time", "experiment_id", "unit_id", "metric", "value", "request_id"],
                     [list(columns[0]), list(columns[1]), ["cuped"] * len(outcome_rows), list(columns[2]),
                      list(columns[3]), list(columns[4]), [None] * len(outcome_rows)])
    config = replace(config_for("cuped", primary_metric={"name": "revenue", "kind": "continuous"}, secondary_metrics=[],
                                cuped_covariate="revenue_pre"))
    rows = collect(config, report_query(settings))
    report = analyse(config, policy_of(config), rows, generated_ms=0, bootstrap_resamples=200)
    result = report.comparisons[0]
    treated = (variant == "treatment").astype(float)
    ols = sm.OLS(revenue, sm.add_constant(np.column_stack([treated, pre]))).fit()
    theta = ols.params[2]
    adjusted_control = revenue[variant == "control"].mean() - theta * (pre[variant == "control"].mean() - pre.mean())
    assert result.cuped.estimate * adjusted_control == pytest.approx(ols.params[1], rel=1e-9)
    assert result.cuped_variance_reduction > 0.5
    assert result.fixed.estimate == pytest.approx(revenue[variant == "treatment"].mean()
                                                  / revenue[variant == "control"].mean() - 1, rel=1e-12)


def test_bootstrap_against_scipy():
    rng = np.random.default_rng(4)
    control, treatment = rng.lognormal(0, 1.2, 800), rng.lognormal(0.1, 1.2, 900)
    ours = bootstrap_lift(control, treatment, resamples=4000, seed=1)
    theirs = stats.bootstrap((control, treatment), lambda c, t, axis=-1: t.mean(axis=axis) / c.mean(axis=axis) - 1,
                             method="percentile", n_resamples=4000, random_state=np.random.default_rng(2),
                             vectorized=True).confidence_interval
    width = theirs.high - theirs.low
    assert ours.estimate == pytest.approx(treatment.mean() / control.mean() - 1)
    assert abs(ours.ci_low - theirs.low) < 0.05 * width and abs(ours.ci_high - theirs.high) < 0.05 * width
