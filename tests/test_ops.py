"""Operations files against the tools that read them and against a live worker.

- the alert rules pass `promtool check rules` and their unit tests (`promtool test rules`),
  and every alert has a firing and a non-firing case;
- prometheus.yml passes `promtool check config`, alertmanager.yml `amtool check-config`
  (where amtool is installed) and a structural check;
- a live worker's /metrics passes `promtool check metrics`, and every metric the dashboard
  and the rules name is one the worker exports, with series once an experiment runs;
- the README's kcat recipes work against the session's broker;
- infra/install-ops-tools.sh installs what is missing and nothing else.

A missing promtool or kcat fails these tests (make setup installs them): they are the only
check of files that nothing else reads before production does.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from aiokafka.partitioner import murmur2
from prometheus_client.parser import text_string_to_metric_families

from streams.codec import Codec, EventKind
from streams.experiments import ExperimentConfig, publish_config, start
from streams.processes import start_worker, stop_worker, wait_healthy
from streams.scenario import ArmTruth, ExperimentScenario, scenario_events
from streams.simulate import SimulatedMessage, publish
from streams.topics import DEADLETTER, INPUT_TOPICS, ensure_topics
from tests.support import make_settings

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "infra" / "prometheus" / "rules" / "abstream.rules.yml"
RULE_TESTS = sorted((ROOT / "infra" / "prometheus" / "tests").glob("*.yml"))
PROMETHEUS_CONFIG = ROOT / "infra" / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = ROOT / "infra" / "alertmanager" / "alertmanager.yml"
DASHBOARD = ROOT / "infra" / "grafana" / "dashboards" / "abstream.json"
INSTALL_SCRIPT = ROOT / "infra" / "install-ops-tools.sh"

# Named by the dashboard before the worker exports them (shadow agreement and drift are
# being built). The test below fails as soon as the worker exports one of them: then it
# must leave this set and be checked like every other metric.
PENDING_METRICS: set[str] = set()
# Exported, but without series in the scenario below (no guardrail fires, no experiment is
# stopped or in draft).
# Exported, but this scenario has no alert, kill, ignored event, shadow run, second hour of scores
# or unit on a partition murmur2 does not name.
NO_SERIES_IN_SCENARIO = {"abstream_alerts_total", "abstream_killswitch_total", "abstream_events_ignored_total",
                         "abstream_shadow_disagreement_ratio", "abstream_drift_psi", "abstream_state_unreadable",
                         "abstream_units_off_partition_total"}
# Series that Prometheus makes itself.
PROMETHEUS_SERIES = {"up"}

TOOL_INSTALL = {
    "promtool": "apt-get install -y prometheus",
    "kcat": "apt-get install -y kcat",
}


def tool(name: str) -> str:
    path = shutil.which(name) or (shutil.which("kafkacat") if name == "kcat" else None)
    if path is None:
        pytest.fail(f"{name} not found: run `make setup` (infra/install-ops-tools.sh) or `{TOOL_INSTALL[name]}`",
                    pytrace=False)
    return path


def run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


# --- rules -------------------------------------------------------------------------------

def test_promtool_check_rules():
    result = run([tool("promtool"), "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests_pass():
    assert RULE_TESTS
    result = run([tool("promtool"), "test", "rules", *map(str, RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_non_firing_unit_test():
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    firing, quiet = set(), set()
    for path in RULE_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts - firing == set(), "alerts without a firing case"
    assert alerts - quiet == set(), "alerts without a non-firing case"
    assert len(alerts) >= 10


def test_every_alert_is_labelled_for_routing():
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                assert rule["labels"]["service"] == "abstream", rule["alert"]
                assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
                assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_promtool_check_prometheus_config():
    result = run([tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- alertmanager -------------------------------------------------------------------------

def test_alertmanager_config_routes_critical_abstream_alerts_to_a_webhook():
    config = yaml.safe_load(ALERTMANAGER_CONFIG.read_text())
    receivers = {r["name"]: r for r in config["receivers"]}
    assert config["route"]["receiver"] in receivers
    critical = [r for r in config["route"]["routes"]
                if {'service="abstream"', 'severity="critical"'} <= set(r.get("matchers", []))]
    assert len(critical) == 1
    [webhook] = receivers[critical[0]["receiver"]]["webhook_configs"]
    assert webhook["url"].startswith("http") and webhook["send_resolved"] is True
    for route in config["route"]["routes"]:
        assert route["receiver"] in receivers
    for inhibit in config.get("inhibit_rules", []):
        assert inhibit["source_matchers"] and inhibit["target_matchers"] and inhibit["equal"]


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool not installed (prometheus-alertmanager); "
                    "the structural check above still runs")
def test_amtool_checks_the_config_and_routes():
    amtool = shutil.which("amtool")
    result = run([amtool, "check-config", str(ALERTMANAGER_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr

    def receiver(*labels: str) -> str:
        routed = run([amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *labels])
        return routed.stdout.strip()

    assert receiver("service=abstream", "severity=critical", "alertname=AbstreamWorkerDown") == "abstream-oncall"
    assert receiver("service=abstream", "severity=warning", "alertname=AbstreamSinkLag") == "abstream-team"
    assert receiver("service=other", "severity=critical") == "default"


# --- dashboard ----------------------------------------------------------------------------

def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target and query variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((\w+),\s*\w+\)", variable["definition"])
        assert match, variable["definition"]
        queries.append((f"variable {variable['name']}", match.group(1)))
    return queries


def metric_names(expr: str) -> set[str]:
    """Metric names (and recording rules) an abstream PromQL expression reads."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    names = set(re.findall(r"\babstream[_:][a-zA-Z0-9_:]+", expr))
    return names | {n for n in PROMETHEUS_SERIES if re.search(rf"\b{n}\b\s*\{{", expr)}


def test_dashboard_panels_cover_the_brief():
    names = set().union(*(metric_names(e) for _, e in dashboard_queries()))
    assert {"abstream_experiment_units", "abstream_experiment_weight", "abstream_experiment_lift",
            "abstream_experiment_lift_ci_low", "abstream_experiment_lift_ci_high", "abstream_experiment_p_value",
            "abstream_experiment_verdict", "abstream_prediction_latency_seconds_bucket", "abstream_predictions_total",
            "abstream_shadow_disagreement_ratio", "abstream_drift_psi", "abstream_input_lag_messages",
            "abstream_sink_lag_seconds", "abstream_deadletters_total"} <= names
    for title, expr in dashboard_queries():
        assert metric_names(expr), f"panel {title!r} names no metric: {expr}"


def test_dashboard_queries_are_valid_promql(tmp_path):
    # promtool has no expression checker offline; a rules file of the queries is checked instead.
    substitutions = {"$experiment": ".*", "$__rate_interval": "1m", "$__range": "1h"}
    rules = []
    for i, (_, expr) in enumerate(dashboard_queries()):
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([tool("promtool"), "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- a live worker ------------------------------------------------------------------------

OPS_SCENARIO = ExperimentScenario(
    "ops-exp", {"control": ArmTruth(0.2, error_rate=0.02), "treatment": ArmTruth(0.3, latency_ms=60, error_rate=0.05)},
    {"control": 0.5, "treatment": 0.5}, units=600, window_s=3600, seed=21)
MALFORMED = [b"not an avro record", b"\x00\x00\x00\x00\x07garbage", b"\x00\xff\xff\xff\xffunknown schema id"]


def scrape_text(settings) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/metrics", timeout=10) as response:
        return response.read().decode()


def exported(text: str) -> tuple[set[str], set[str]]:
    """(names the worker exports, names with at least one series): families with their
    sample names (_total, _bucket, _count, _sum) included."""
    families, with_series = set(), set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        if family.type == "counter":
            families.add(family.name + "_total")
        if family.type == "histogram":
            families |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
        for sample in family.samples:
            families.add(sample.name)
            with_series.add(sample.name)
            if family.type == "histogram":
                with_series.add(family.name)
    return families, with_series


@pytest.fixture(scope="module")
def live_worker(kafka_broker, tmp_path_factory):
    """A sink-holding worker that has processed a started experiment's events and a few
    malformed messages; yields (settings, scrape text) and stops the worker afterwards."""
    tmp = tmp_path_factory.mktemp("ops")
    settings = make_settings(kafka_broker, tmp, f"chdb://{tmp / 'worker-chdb'}")
    ensure_topics(settings)
    publish_config(settings, start(ExperimentConfig.from_mapping({
        "experiment_id": OPS_SCENARIO.experiment_id,
        "variants": [{"name": "control", "weight": 50}, {"name": "treatment", "weight": 50}],
        "control": "control",
        "primary_metric": {"name": "conversion", "kind": "binary"},
        "min_sample_per_variant": 20,
        "sequential_method": "sequential",
        "attribution_window_s": 3600,
    })))
    codec = Codec()
    messages = [SimulatedMessage(kind, record["unit_id"].encode(), codec.encode(kind, record), record)
                for _, kind, record in scenario_events(OPS_SCENARIO)]
    messages += [SimulatedMessage(EventKind.PREDICTION, f"ops-bad-{i}".encode(), value, None)
                 for i, value in enumerate(MALFORMED)]
    worker = start_worker(settings, sink=True, log_path=tmp / "worker.log")
    try:
        wait_healthy(settings, worker)
        publish(settings, messages)
        deadline = time.monotonic() + 120
        while True:
            text = scrape_text(settings)
            _, series = exported(text)
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for f in text_string_to_metric_families(text) for s in f.samples}
            consumed = sum(v for (n, _), v in samples.items() if n == "abstream_events_consumed_total")
            dead_rows = sum(v for (n, ls), v in samples.items()
                            if n == "abstream_sink_rows_total" and dict(ls).get("table") == "deadletter")
            roles = {dict(ls).get("role") for (n, ls) in samples if n == "abstream_input_lag_messages"}
            if consumed >= len(messages) and dead_rows >= len(MALFORMED) and roles >= {"stage1", "sink"} \
                    and {"abstream_experiment_lift", "abstream_experiment_verdict"} <= series:
                break
            assert worker.poll() is None, (tmp / "worker.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"the worker did not process the scenario: consumed {consumed}"
            time.sleep(0.5)
        yield settings, text
    finally:
        stop_worker(worker)


@pytest.mark.kafka
def test_promtool_check_metrics_finds_no_problem_in_a_live_worker(live_worker):
    _, text = live_worker
    result = run([tool("promtool"), "check", "metrics"], input=text)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr


@pytest.mark.kafka
def test_dashboard_and_rules_name_only_metrics_the_worker_exports(live_worker):
    _, text = live_worker
    families, with_series = exported(text)
    recorded = {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}
    named = {name: title for title, expr in dashboard_queries() for name in metric_names(expr)}
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            named.update({n: f"rule {rule.get('alert') or rule.get('record')}" for n in metric_names(rule["expr"])})

    now_exported = PENDING_METRICS & families
    assert not now_exported, f"{sorted(now_exported)} are exported now: remove them from PENDING_METRICS"
    for name, where in sorted(named.items()):
        if name in PENDING_METRICS or name in PROMETHEUS_SERIES:
            continue
        if ":" in name:
            assert name in recorded, f"{where} reads {name}, which no recording rule defines"
            continue
        assert name in families, f"{where} reads {name}, which the worker does not export"
        if name not in NO_SERIES_IN_SCENARIO:
            assert name in with_series, f"{where} reads {name}, which has no series after a running experiment"


# --- kcat recipes (README) ---------------------------------------------------------------

@pytest.mark.kafka
def test_kcat_recipe_reads_dead_letter_headers(live_worker):
    settings, _ = live_worker
    result = run([tool("kcat"), "-b", settings.kafka_bootstrap, "-C", "-t", settings.topic(DEADLETTER),
                  "-o", "beginning", "-e", "-q", "-f", "%k\t%p\t%o\t%h\n"])
    assert result.returncode == 0, result.stderr
    letters = {}
    for line in result.stdout.splitlines():
        key, _, _, headers = line.split("\t")
        # kcat joins headers with "," and details may hold commas: split before each name.
        letters[key] = dict(h.split("=", 1) for h in re.split(r",(?=abstream\.)", headers))
    for i in range(len(MALFORMED)):
        headers = letters[f"ops-bad-{i}"]
        assert headers["abstream.topic"] == settings.topic("predictions")
        assert headers["abstream.reason"] in {"not_wire_format", "unknown_schema", "wrong_kind", "bad_avro"}
        assert headers["abstream.detail"] and int(headers["abstream.offset"]) >= 0
    assert letters["ops-bad-0"]["abstream.reason"] == "not_wire_format"
    assert letters["ops-bad-2"]["abstream.reason"] == "unknown_schema"


@pytest.mark.kafka
def test_kcat_recipe_publishes_an_outcome_on_the_units_partition(live_worker, tmp_path):
    settings, _ = live_worker
    unit = f"{OPS_SCENARIO.run_id}{OPS_SCENARIO.experiment_id}-u000007"
    outcome = tmp_path / "outcome.avro"
    outcome.write_bytes(Codec().encode(EventKind.OUTCOME, {
        "event_id": "kcat-outcome-1", "event_time": OPS_SCENARIO.start_ms + 60_000,
        "experiment_id": OPS_SCENARIO.experiment_id, "unit_id": unit, "metric": "conversion", "value": 1.0,
        "request_id": None}))
    topic = settings.topic(INPUT_TOPICS[EventKind.OUTCOME])
    before = counters(settings)
    produced = run([tool("kcat"), "-b", settings.kafka_bootstrap, "-P", "-t", topic, "-k", unit,
                    "-X", "partitioner=murmur2_random", str(outcome)])
    assert produced.returncode == 0, produced.stderr
    consumed = run([tool("kcat"), "-b", settings.kafka_bootstrap, "-C", "-t", topic, "-o", "beginning", "-e", "-q",
                    "-f", "%k\t%p\t%S\n"])
    assert consumed.returncode == 0, consumed.stderr
    partitions = {line.split("\t")[1] for line in consumed.stdout.splitlines()
                  if line.split("\t")[0] == unit and line.split("\t")[2] == str(outcome.stat().st_size)}
    # The partition Java clients, aiokafka and abstream's producers choose for this key.
    assert partitions == {str((murmur2(unit.encode()) & 0x7FFFFFFF) % settings.partitions)}

    # The worker reads it as a valid event: consumed, and not a dead letter.
    deadline = time.monotonic() + 30
    while (after := counters(settings))[0] < before[0] + 1:
        assert time.monotonic() < deadline, "the worker did not consume the outcome"
        time.sleep(0.3)
    assert after == (before[0] + 1, before[1])


def counters(settings) -> tuple[float, float]:
    """(outcomes consumed, dead letters) of the live worker."""
    samples = [s for f in text_string_to_metric_families(scrape_text(settings)) for s in f.samples]
    return (sum(s.value for s in samples if s.name == "abstream_events_consumed_total" and s.labels["topic"] == "outcomes"),
            sum(s.value for s in samples if s.name == "abstream_deadletters_total"))


# --- install script ----------------------------------------------------------------------

def fake_bin(folder: Path, commands: dict[str, str]) -> Path:
    folder.mkdir()
    for name, body in commands.items():
        path = folder / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    return folder


def install(path: Path) -> subprocess.CompletedProcess:
    return run(["/bin/sh", str(INSTALL_SCRIPT)], env={"PATH": str(path)})


def test_install_script_is_a_no_op_when_the_tools_are_there(tmp_path):
    log = tmp_path / "apt.log"
    bin_ = fake_bin(tmp_path / "bin", {"promtool": "", "kcat": "", "amtool": "", "id": "echo 0",
                                       "apt-get": f'echo "$@" >> {log}'})
    result = install(bin_)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not log.exists()


def test_install_script_installs_what_is_missing_with_apt_get(tmp_path):
    log = tmp_path / "apt.log"
    bin_ = fake_bin(tmp_path / "bin", {"kcat": "", "id": "echo 0", "apt-get": f'echo "$@" >> {log}',
                                       "apt-cache": "exit 0"})
    result = install(bin_)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "update -qq"
    assert [c.split()[-1] for c in calls[1:]] == ["prometheus", "prometheus-alertmanager"]


def test_install_script_without_apt_get_says_so_in_one_line(tmp_path):
    result = install(fake_bin(tmp_path / "bin", {"id": "echo 0"}))
    assert result.returncode == 0
    assert len(result.stdout.strip().splitlines()) == 1 and "apt-get not found" in result.stdout
