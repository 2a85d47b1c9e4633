"""Experiments as data: config validation and its messages, normalisation, durations, the
lifecycle, the Avro round trip, and the compacted topic, the CLI and the catalogue on the
real broker."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import yaml
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from streams.codec import Codec, ControlKind, SCHEMA_DIR
from streams.experiments import (
    AllocationMode,
    ConfigError,
    ExperimentCatalogue,
    ExperimentConfig,
    ExperimentStatus,
    ExperimentTopicError,
    GuardrailAction,
    GuardrailKind,
    MetricKind,
    ensure_experiments_topic,
    load_config_file,
    parse_duration_s,
    pause,
    publish_config,
    read_configs,
    revise,
    scan_configs,
    start,
    stop,
)
from streams.topics import make_producer
from tests.support import CatalogueRegistry, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples" / "experiments").glob("*.yaml"))
ABSTREAM = str(Path(sys.executable).parent / "abstream")
T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z


def minimal(**changes) -> dict:
    config = {
        "experiment_id": "exp-1",
        "variants": [{"name": "a", "weight": 0.5}, {"name": "b", "weight": 0.5}],
        "primary_metric": {"name": "conversion", "kind": "binary"},
    }
    config.update(changes)
    return {k: v for k, v in config.items() if v is not None}


def config_error(mapping) -> str:
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_mapping(mapping, now_ms=T0)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- validation: every message names the field and says why ----------------------------

BAD = [
    (minimal(variants=[{"name": "a", "weight": 1}, {"name": "b", "weight": -0.2}]),
     "variants[1].weight: must be a positive number, got -0.2"),
    (minimal(variants=[{"name": "a", "weight": 1}, {"name": "b", "weight": True}]),
     "variants[1].weight: must be a positive number, got true"),
    (minimal(variants=[{"name": "a", "weight": 1}, {"name": "b"}]),
     "variants[1].weight: required when other variants have a weight"),
    (minimal(variants=[{"name": "a"}]), "variants: an experiment needs at least two variants, got 1"),
    (minimal(variants="a,b"), "variants: must be a list"),
    (minimal(variants=["a", "a"]), "variants[1].name: 'a' is used by another variant"),
    (minimal(variants=["a", "b c"]), "variants[1].name: must be 1-64 characters of A-Z a-z 0-9 . _ -"),
    (minimal(variants=["a", {"name": "b", "wieght": 1}]), "variants[1].wieght: unknown field (did you mean weight?)"),
    (minimal(variants=["a", {"name": "b", "model_version": 2.0}]), "variants[1].model_version: must be a string, got 2.0 (quote it)"),
    (minimal(variants=["a", 7]), "variants[1]: must be a variant name or a mapping with name and weight, got 7"),
    (minimal(primary_metric={"name": "conversion", "kind": "count"}),
     "primary_metric.kind: must be one of binary, continuous, ratio, got 'count'"),
    (minimal(primary_metric={"name": "conversion"}), "primary_metric.kind: required"),
    (minimal(primary_metric=None), "primary_metric: required"),
    (minimal(primary_metric={"name": "ctr", "kind": "ratio", "numerator": "clicks"}),
     "primary_metric: a ratio metric needs numerator and denominator"),
    (minimal(primary_metric={"name": "ctr", "kind": "binary", "numerator": "clicks"}),
     "primary_metric.numerator: only a ratio metric has a numerator"),
    (minimal(primary_metric={"name": "revenue", "kind": "continuous", "direction": "up"}),
     "primary_metric.direction: must be one of increase, decrease, got 'up'"),
    (minimal(secondary_metrics=[{"name": "conversion", "kind": "binary"}]),
     "secondary_metrics[0].name: 'conversion' is already used by primary_metric"),
    (minimal(control="champion"), "control: 'champion' is not one of the variants (a, b)"),
    (minimal(alpha=0.7), "alpha: must be in (0, 0.5], got 0.7"),
    (minimal(alpha=0), "alpha: must be in (0, 0.5], got 0.0"),
    (minimal(alpha="0.05"), "alpha: must be a number, got '0.05'"),
    (minimal(power=1.0), "power: must be in (0, 1), got 1.0"),
    (minimal(mde=-0.1), "mde: must be a positive relative effect"),
    (minimal(min_sample_per_variant=0), "min_sample_per_variant: must be a whole number >= 1, got 0"),
    (minimal(attribution_window_s="soon"), "attribution_window_s: must be whole seconds or a duration like 7d, 12h, 30m, got 'soon'"),
    (minimal(attribution_window_s=0), "attribution_window_s: must be at least 1 s"),
    (minimal(min_runtime_s="14d", max_duration_s="7d"), "max_duration_s: must be at least min_runtime_s (1209600 s), got 604800 s"),
    (minimal(sequential_method="peek"), "sequential_method: must be one of sequential, msprt, got 'peek'"),
    (minimal(allocation="canary"), "canary_steps: allocation canary needs a plan"),
    (minimal(allocation="canary", canary_steps=[0.1, 0.05, 1.0]), "canary_steps: must increase and end at 1.0, got [0.1, 0.05, 1.0]"),
    (minimal(allocation="canary", canary_steps=[0.1, 0.5]), "canary_steps: must increase and end at 1.0"),
    (minimal(allocation="canary", canary_steps=[0, 1]), "canary_steps[0]: must be a challenger weight in (0, 1], got 0"),
    (minimal(canary_steps=[0.5, 1.0]), "canary_steps: only used with allocation: canary (allocation is fixed)"),
    (minimal(allocation="canary", canary_steps=[0.5, 1.0], variants=["a", "b", "c"]),
     "allocation: canary needs exactly two variants (control and one challenger), got 3"),
    (minimal(allocation="canary", canary_steps=[0.5, 1.0]), "variants[0].weight: with allocation canary the split follows canary_steps"),
    (minimal(experiment_id="bad id!"), "experiment_id: must be 1-64 characters of A-Z a-z 0-9 . _ -, got 'bad id!'"),
    (minimal(experiment_id="x" * 65), "experiment_id: must be 1-64 characters"),
    (minimal(experiment_id=""), "experiment_id: must be 1-64 characters"),
    (minimal(experiment_id=None), "experiment_id: required"),
    (minimal(experiment_id=42), "experiment_id: must be a string, got 42"),
    (minimal(description="x" * 5000), "description: must be at most 4096 characters, got 5000"),
    (minimal(primary_metric={"name": "m" * 300, "kind": "binary"}), "primary_metric.name: must be at most 256 characters"),
    (minimal(colour="blue"), "colour: unknown field"),
    (minimal(contrl="a"), "contrl: unknown field (did you mean control?)"),
    (minimal(status="running"), "status: set by abstream"),
    (minimal(version=3), "version: set by abstream"),
    (minimal(guardrails=[{"kind": "latency_p95"}]), "guardrails[0].threshold: required"),
    (minimal(guardrails=[{"kind": "latency_p50", "threshold": 1}]),
     "guardrails[0].kind: must be one of latency_p95, latency_p99, error_rate, timeout_rate, metric_harm, srm, shadow_disagreement, drift"),
    (minimal(guardrails=[{"kind": "error_rate", "threshold": 2}]), "guardrails[0].threshold: a error_rate threshold is a rate in (0, 1], got 2.0"),
    (minimal(guardrails=[{"kind": "latency_p99", "threshold": -5}]), "guardrails[0].threshold: must be a positive number, got -5.0"),
    (minimal(guardrails=[{"kind": "srm", "threshold": 0.5}, {"kind": "srm"}]), "guardrails[1].name: 'srm' is used by another guardrail"),
    (minimal(guardrails=[{"kind": "srm", "threshold": 5}]), "guardrails[0].threshold: a srm threshold is a p-value level in (0, 1)"),
    (minimal(guardrails=[{"kind": "metric_harm"}]), "guardrails[0].metric: a metric_harm guardrail names the metric it judges"),
    (minimal(guardrails=[{"kind": "metric_harm", "metric": "revenue"}]),
     "guardrails[0].metric: 'revenue' is not the primary or a secondary metric (conversion)"),
    (minimal(guardrails=[{"kind": "error_rate", "threshold": 0.1, "metric": "conversion"}]),
     "guardrails[0].metric: only a metric_harm guardrail names a metric"),
    (minimal(guardrails=[{"kind": "error_rate", "threshold": 0.1, "action": "page"}]),
     "guardrails[0].action: must be one of alert, kill, got 'page'"),
    (minimal(guardrails=[{"kind": "error_rate", "threshold": 0.1, "relative_to_control": "yes"}]),
     "guardrails[0].relative_to_control: must be true or false, got 'yes'"),
    (minimal(guardrails={"kind": "srm"}), "guardrails: must be a list"),
    ([1, 2], "config: must be a mapping of fields, got [1, 2]"),
]


@pytest.mark.parametrize("mapping, message", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_each_invalid_config_is_one_line_naming_the_field(mapping, message):
    assert config_error(mapping).startswith(message)


def test_a_valid_config_starts_as_a_draft_at_version_1():
    config = ExperimentConfig.from_mapping(minimal(), now_ms=T0)
    assert (config.status, config.version, config.updated_time_ms, config.started_time_ms) == (ExperimentStatus.DRAFT, 1, T0, None)


def test_defaults_are_the_schemas():
    schema = json.loads((SCHEMA_DIR / "experiment_config.v1.avsc").read_text())
    record = ExperimentConfig.from_mapping(minimal(), now_ms=T0).to_record()
    defaults = {f["name"]: f["default"] for f in schema["fields"] if "default" in f}
    assert {"alpha", "power", "unit", "attribution_window_s", "allocation", "canary_steps"} <= set(defaults)
    assert {name: record[name] for name in defaults} == defaults


def test_weights_are_normalised_and_default_to_an_even_split():
    config = ExperimentConfig.from_mapping(minimal(variants=[{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]), now_ms=T0)
    assert config.weights == {"a": 0.25, "b": 0.75}
    config = ExperimentConfig.from_mapping(minimal(variants=["a", "b", {"name": "c"}]), now_ms=T0)
    assert config.weights == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    config = ExperimentConfig.from_mapping(minimal(variants=[{"name": "x", "weight": 90}, {"name": "y", "weight": 10}]), now_ms=T0)
    assert config.weights == pytest.approx({"x": 0.9, "y": 0.1}) and sum(config.weights.values()) == pytest.approx(1.0)


def test_engine_helpers():
    config = ExperimentConfig.from_mapping(minimal(
        variants=["t1", "ctl", "t2"], control="ctl",
        secondary_metrics=[{"name": "revenue", "kind": "continuous"}, {"name": "rpc", "kind": "ratio", "numerator": "revenue", "denominator": "clicks"}],
    ), now_ms=T0)
    assert config.variant_names == ("t1", "ctl", "t2")
    assert config.treatments == ("t1", "t2")
    assert [m.name for m in config.metrics] == ["conversion", "revenue", "rpc"]
    assert config.metrics[2].kind is MetricKind.RATIO and config.metrics[2].denominator == "clicks"
    assert config.assignment_salt == "exp-1"
    assert not config.is_active and start(config, now_ms=T0).is_active
    assert ExperimentConfig.from_mapping(minimal(), now_ms=T0).control == "a"  # the first variant by default
    with pytest.raises(FrozenInstanceError):
        config.status = ExperimentStatus.RUNNING


def test_guardrail_defaults():
    config = ExperimentConfig.from_mapping(minimal(alpha=0.01, guardrails=[
        {"kind": "srm"}, {"kind": "metric_harm", "metric": "conversion", "margin": 0.02, "action": "kill"},
        {"name": "slow", "kind": "latency_p95", "threshold": 1.2, "relative_to_control": True},
    ]), now_ms=T0)
    srm, harm, slow = config.guardrails
    assert (srm.name, srm.threshold, srm.action, srm.min_count) == ("srm", 0.001, GuardrailAction.ALERT, 100)
    assert (harm.name, harm.threshold, harm.margin, harm.action) == ("metric_harm", 0.01, 0.02, GuardrailAction.KILL)
    assert (slow.kind, slow.threshold, slow.relative_to_control) == (GuardrailKind.LATENCY_P95, 1.2, True)


@pytest.mark.parametrize("value, seconds", [
    (3600, 3600), (3600.0, 3600), ("3600", 3600), ("45s", 45), ("30m", 1800), ("12h", 43_200), ("7d", 604_800),
    ("2w", 1_209_600), ("1h30m", 5400), ("1.5h", 5400), (" 7D ", 604_800), (0, 0),
])
def test_durations(value, seconds):
    assert parse_duration_s(value, "x") == seconds


@pytest.mark.parametrize("value", ["soon", "7 days", "", "-1h", -5, 1.5, "0.5s", True, None, [7]])
def test_bad_durations_name_the_field(value):
    with pytest.raises(ConfigError, match=r"^min_runtime_s: must be whole seconds or a duration like 7d"):
        parse_duration_s(value, "min_runtime_s")


def test_durations_in_a_config():
    config = ExperimentConfig.from_mapping(minimal(attribution_window_s="3d", min_runtime_s="12h", max_duration_s="2w",
                                                   allocation="canary", variants=["a", "b"], canary_steps=[0.1, 1],
                                                   canary_min_step_s="30m"), now_ms=T0)
    assert (config.attribution_window_s, config.min_runtime_s, config.max_duration_s, config.canary_min_step_s) == (259_200, 43_200, 1_209_600, 1800)
    assert config.allocation is AllocationMode.CANARY and config.canary_steps == (0.1, 1.0)
    assert config.weights == {"a": 0.9, "b": 0.1}  # the canary starts at its first step


# -- lifecycle ----------------------------------------------------------------------------

def test_lifecycle_transitions():
    draft = ExperimentConfig.from_mapping(minimal(), now_ms=T0)
    running = start(draft, now_ms=T0 + 1)
    assert (running.status, running.version, running.updated_time_ms, running.started_time_ms) == (ExperimentStatus.RUNNING, 2, T0 + 1, T0 + 1)
    assert draft.status is ExperimentStatus.DRAFT  # pure: the old config is untouched
    paused = pause(running, now_ms=T0 + 2)
    assert (paused.status, paused.version, paused.started_time_ms) == (ExperimentStatus.PAUSED, 3, T0 + 1)
    resumed = start(paused, now_ms=T0 + 3)
    assert (resumed.status, resumed.version, resumed.started_time_ms) == (ExperimentStatus.RUNNING, 4, T0 + 1)
    stopped = stop(resumed, now_ms=T0 + 4)
    assert (stopped.status, stopped.version) == (ExperimentStatus.STOPPED, 5)
    assert stop(paused, now_ms=T0 + 5).status is ExperimentStatus.STOPPED


@pytest.mark.parametrize("steps, transition, message", [
    ((start, stop), start, "cannot start experiment exp-1: it is stopped"),
    ((start,), start, "cannot start experiment exp-1: it is already running"),
    ((), pause, "cannot pause experiment exp-1: it is draft, not running"),
    ((start, pause), pause, "cannot pause experiment exp-1: it is paused, not running"),
    ((), stop, "cannot stop experiment exp-1: it is a draft that never started"),
    ((start, stop), stop, "cannot stop experiment exp-1: it is already stopped"),
])
def test_illegal_transitions_are_one_line(steps, transition, message):
    config = ExperimentConfig.from_mapping(minimal(), now_ms=T0)
    for step in steps:
        config = step(config, now_ms=T0)
    with pytest.raises(ConfigError) as info:
        transition(config, now_ms=T0)
    assert str(info.value) == message


def test_revise_keeps_the_lifecycle_and_bumps_the_version():
    running = pause(start(ExperimentConfig.from_mapping(minimal(), now_ms=T0), now_ms=T0 + 1), now_ms=T0 + 2)
    new = ExperimentConfig.from_mapping(minimal(description="more traffic to b", variants=[{"name": "a", "weight": 1}, {"name": "b", "weight": 4}]), now_ms=T0 + 3)
    revised = revise(running, new, now_ms=T0 + 3)
    assert (revised.status, revised.version, revised.started_time_ms, revised.updated_time_ms) == (ExperimentStatus.PAUSED, 4, T0 + 1, T0 + 3)
    assert revised.weights == {"a": 0.2, "b": 0.8} and revised.description == "more traffic to b"
    with pytest.raises(ConfigError, match="cannot replace experiment exp-1: it is stopped"):
        revise(stop(running, now_ms=T0 + 4), new)
    with pytest.raises(ConfigError, match="experiment_id"):
        revise(running, ExperimentConfig.from_mapping(minimal(experiment_id="other"), now_ms=T0))


# -- the Avro record, files and examples --------------------------------------------------

def _every_example() -> list[ExperimentConfig]:
    return [load_config_file(path, now_ms=T0) for path in EXAMPLES]


def test_the_examples_cover_binary_continuous_with_guardrails_and_canary():
    configs = _every_example()
    assert len(configs) >= 3
    assert any(c.primary_metric.kind is MetricKind.BINARY for c in configs)
    assert any(c.primary_metric.kind is MetricKind.CONTINUOUS and c.guardrails for c in configs)
    assert any(c.allocation is AllocationMode.CANARY and c.canary_steps[-1] == 1.0 for c in configs)


@pytest.mark.parametrize("transitions", [(), (start,), (start, pause), (start, stop)])
def test_avro_round_trip_through_the_codec(transitions):
    codec = Codec()
    for config in _every_example():
        for transition in transitions:
            config = transition(config, now_ms=T0 + 1000)
        payload = codec.encode(ControlKind.EXPERIMENT_CONFIG, config.to_record())
        record = codec.decode(ControlKind.EXPERIMENT_CONFIG, payload)
        assert isinstance(record, dict), record
        assert ExperimentConfig.from_record(record) == config


def test_to_mapping_round_trips_through_from_mapping():
    for config in _every_example():
        assert ExperimentConfig.from_mapping(config.to_mapping(), now_ms=T0) == config
        # the JSON form a user might save and edit
        assert ExperimentConfig.from_mapping(json.loads(json.dumps(config.to_mapping())), now_ms=T0) == config


def test_config_files(tmp_path):
    as_json = tmp_path / "exp.json"
    as_json.write_text(json.dumps(minimal(alpha=0.01)))
    assert load_config_file(as_json).alpha == 0.01
    exponent = tmp_path / "exp.yaml"
    exponent.write_text(yaml.safe_dump(minimal()) + "alpha: 1e-3\n")  # YAML 1.1 would read a string
    assert load_config_file(exponent).alpha == 0.001


@pytest.mark.parametrize("name, text, message", [
    ("missing.yaml", None, "missing.yaml: no such file"),
    ("broken.yaml", "experiment_id: [unclosed\n", "broken.yaml: not valid YAML: line 2, column 1"),
    ("broken.json", "{\"experiment_id\": ", "broken.json: not valid JSON: line 1"),
    ("twice.yaml", "experiment_id: a\nexperiment_id: b\n", "twice.yaml: not valid YAML: line 2, column 1: duplicate key 'experiment_id'"),
    ("two-docs.yaml", "a: 1\n---\nb: 2\n", "two-docs.yaml: must hold one YAML document, found 2"),
    ("empty.yaml", "", "empty.yaml: is empty"),
    ("comments.yaml", "# nothing yet\n", "comments.yaml: is empty"),
    ("list.yaml", "- a\n- b\n", "list.yaml: config: must be a mapping of fields"),
    ("weight.yaml", yaml.safe_dump(minimal(variants=[{"name": "a", "weight": 1}, {"name": "b", "weight": -0.2}])),
     "weight.yaml: variants[1].weight: must be a positive number, got -0.2"),
])
def test_bad_files_are_one_line_naming_the_file_and_field(tmp_path, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert "\n" not in str(info.value)
    assert str(info.value).startswith(f"{tmp_path}/{message}"), str(info.value)


# -- the command line, without a broker ---------------------------------------------------

def run(*args: str, env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([ABSTREAM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("abstream") and words in lines[0], lines[0]


@pytest.mark.parametrize("action", ["", "create", "start", "pause", "stop", "list", "show"])
def test_experiment_help(action):
    result = run("experiment", *([action] if action else []), "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: abstream experiment {action}".rstrip())


def test_experiment_usage_errors_exit_2():
    assert_one_line_error(run("experiment"), 2, "required: ACTION")
    assert_one_line_error(run("experiment", "start"), 2, "required: ID")
    assert_one_line_error(run("experiment", "restart", "x"), 2, "invalid choice")


def test_a_bad_file_fails_before_kafka_is_asked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(minimal(primary_metric={"name": "ctr", "kind": "ratio"})))
    # an unreachable broker: the file is judged first, so the error is about the file
    result = run("experiment", "create", str(bad), env={"ABSTREAM_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert_one_line_error(result, 1, "bad.yaml: primary_metric: a ratio metric needs numerator and denominator")


# -- the compacted topic, the CLI and the catalogue on the real broker --------------------

@pytest.mark.kafka
def test_the_cli_drives_an_experiment_through_its_lifecycle(settings, tmp_path):
    env = settings.to_env()
    ranker = str(ROOT / "examples" / "experiments" / "ranker-conversion.yaml")

    result = run("experiment", "create", ranker, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "created experiment exp-ranker (version 1, draft)"

    result = run("experiment", "list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [{
        "experiment_id": "exp-ranker", "status": "draft", "version": 1,
        "variants": {"control": 0.5, "treatment": 0.5}, "control": "control",
        "primary_metric": {"name": "conversion", "kind": "binary", "direction": "increase"},
    }]

    assert_one_line_error(run("experiment", "create", ranker, env=env), 1, "experiment exp-ranker already exists (version 1, draft); use --replace")

    result = run("experiment", "start", "exp-ranker", env=env)
    assert result.returncode == 0 and result.stdout.strip() == "started experiment exp-ranker (version 2, running)", result.stderr

    result = run("experiment", "show", "exp-ranker", "--json", env=env)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert (shown["status"], shown["version"]) == ("running", 2)
    assert shown["started_time"] is not None and shown["sequential_method"] == "msprt"
    assert ExperimentConfig.from_record(shown) == read_configs(settings)["exp-ranker"]

    result = run("experiment", "show", "exp-ranker", env=env)
    assert result.returncode == 0 and result.stdout.startswith("# exp-ranker: running, version 2"), result.stderr

    result = run("experiment", "pause", "exp-ranker", "--json", env=env)
    assert result.returncode == 0 and json.loads(result.stdout)["status"] == "paused", result.stderr
    result = run("experiment", "stop", "exp-ranker", env=env)
    assert result.returncode == 0 and result.stdout.strip() == "stopped experiment exp-ranker (version 4, stopped)", result.stderr

    assert_one_line_error(run("experiment", "start", "exp-ranker", env=env), 1, "cannot start experiment exp-ranker: it is stopped")
    assert_one_line_error(run("experiment", "pause", "exp-nothing", env=env), 1, "no experiment 'exp-nothing'")
    assert_one_line_error(run("experiment", "show", "exp-nothing", env=env), 1, "no experiment 'exp-nothing'")

    bad = tmp_path / "bad.yaml"
    bad.write_text(ROOT.joinpath("examples/experiments/checkout-revenue.yaml").read_text().replace("kind: error_rate", "kind: error_ratio"))
    assert_one_line_error(run("experiment", "create", str(bad), env=env), 1, "bad.yaml: guardrails[1].kind: must be one of")
    assert_one_line_error(run("experiment", "create", str(tmp_path / "nope.yaml"), env=env), 1, "nope.yaml: no such file")

    configs = read_configs(settings)
    assert list(configs) == ["exp-ranker"]
    assert (configs["exp-ranker"].status, configs["exp-ranker"].version) == (ExperimentStatus.STOPPED, 4)


@pytest.mark.kafka
def test_create_replace_keeps_the_status_and_bumps_the_version(settings, tmp_path):
    env = settings.to_env()
    checkout = ROOT / "examples" / "experiments" / "checkout-revenue.yaml"
    assert run("experiment", "create", str(checkout), env=env).returncode == 0
    assert run("experiment", "start", "exp-checkout", env=env).returncode == 0
    edited = tmp_path / "checkout.yaml"
    edited.write_text(checkout.read_text().replace("weight: 0.5, model_name: recommender, model_version: \"2.0\"",
                                                   "weight: 1.5, model_name: recommender, model_version: \"2.0\""))
    result = run("experiment", "create", str(edited), "--replace", "--json", env=env)
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["status"], record["version"]) == ("running", 3)
    config = read_configs(settings)["exp-checkout"]
    assert config.weights == {"control": 0.25, "treatment": 0.75} and config.version == 3


@pytest.mark.kafka
def test_the_topic_is_compacted_with_one_partition(settings):
    topic = ensure_experiments_topic(settings)
    assert ensure_experiments_topic(settings) == topic == f"{settings.topic_prefix}experiments"
    admin = AdminClient(settings.kafka_config())
    assert len(admin.list_topics(timeout=10).topics[topic].partitions) == 1
    resource = ConfigResource("topic", topic)
    assert admin.describe_configs([resource])[resource].result(timeout=10)["cleanup.policy"].value == "compact"


@pytest.mark.kafka
def test_a_topic_that_is_not_compacted_is_refused(settings):
    admin = AdminClient(settings.kafka_config())
    topic = f"{settings.topic_prefix}experiments"
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=-1)]).values():
        future.result(timeout=30)
    with pytest.raises(ExperimentTopicError, match="cleanup.policy=delete, expected compact"):
        wait_until(lambda: topic in admin.list_topics(timeout=10).topics, 10, "the topic") and ensure_experiments_topic(settings)


@pytest.mark.kafka
def test_newest_record_wins_and_undecodable_records_are_skipped(settings):
    draft = ExperimentConfig.from_mapping(minimal(), now_ms=T0)
    other = ExperimentConfig.from_mapping(minimal(experiment_id="exp-2"), now_ms=T0)
    assert read_configs(settings) == {}
    publish_config(settings, draft)
    publish_config(settings, other)
    producer = make_producer(settings)
    producer.produce(settings.topic("experiments"), key=b"exp-junk", value=b"not avro at all")
    producer.produce(settings.topic("experiments"), key=b"exp-2", value=None)  # a tombstone
    assert producer.flush(30) == 0
    publish_config(settings, start(draft, now_ms=T0 + 1))
    scan = scan_configs(settings)
    assert scan.skipped == 1
    assert scan.configs == {"exp-1": start(draft, now_ms=T0 + 1)}


@pytest.mark.kafka
def test_the_catalogue_sees_changes_published_after_it_started(settings):
    first = ExperimentConfig.from_mapping(minimal(), now_ms=T0)
    publish_config(settings, first)
    with ExperimentCatalogue(settings) as catalogue:
        catalogue.wait_until_caught_up(30)
        assert catalogue.all() == {"exp-1": first}
        seen = catalogue.version
        assert seen >= 1

        running = start(first, now_ms=T0 + 1)
        publish_config(settings, running)
        wait_until(lambda: catalogue.get("exp-1") == running, 30, "the catalogue to see the start")
        assert catalogue.version > seen and catalogue.get("exp-1").is_active

        seen = catalogue.version
        second = ExperimentConfig.from_mapping(minimal(experiment_id="exp-2"), now_ms=T0 + 2)
        publish_config(settings, second)
        assert catalogue.wait_for_change(seen, 30) > seen
        wait_until(lambda: set(catalogue.all()) == {"exp-1", "exp-2"}, 30, "the second experiment")
        assert catalogue.get("exp-missing") is None


@pytest.mark.kafka
def test_a_config_the_schema_registry_cannot_decode_for_now_is_read_again_not_skipped(settings):
    from dataclasses import replace

    config = ExperimentConfig.from_mapping(minimal(), now_ms=T0)
    publish_config(settings, config)  # written with the local catalogue's ids, which the registry serves
    with CatalogueRegistry() as registry:
        registry.refusing = True
        with ExperimentCatalogue(replace(settings, schema_registry_url=registry.url)) as catalogue:
            wait_until(lambda: registry.refused >= 2, 30, "the catalogue to ask the registry twice")
            assert catalogue.all() == {} and catalogue.skipped == 0 and catalogue.error is None
            with pytest.raises(ExperimentTopicError, match="did not read"):
                catalogue.wait_until_caught_up(0.5)
            registry.refusing = False
            catalogue.wait_until_caught_up(30)
            assert catalogue.all() == {"exp-1": config} and catalogue.skipped == 0


@pytest.mark.kafka
def test_refresh_reads_everything_published_before_it(settings):
    with ExperimentCatalogue(settings) as catalogue:
        catalogue.wait_until_caught_up(30)
        for i in range(3):
            config = ExperimentConfig.from_mapping(minimal(experiment_id=f"exp-{i}"), now_ms=T0)
            publish_config(settings, config)
            catalogue.refresh(timeout_s=30)
            assert catalogue.get(f"exp-{i}") == config  # no polling: refresh waited for it
        assert catalogue.version == 3


@pytest.mark.kafka
def test_a_catalogue_on_an_empty_topic_is_caught_up_at_once(settings):
    catalogue = ExperimentCatalogue(settings)
    with pytest.raises(ExperimentTopicError, match="not started"):
        catalogue.wait_until_caught_up(0.1)
    with catalogue:
        catalogue.wait_until_caught_up(10)
        assert catalogue.all() == {} and catalogue.version == 0


def test_an_unreachable_broker_is_a_clear_error():
    from dataclasses import replace

    from streams.settings import Settings

    settings = replace(Settings.from_env({}), kafka_bootstrap="127.0.0.1:1", topic_prefix="unreachable.")
    with pytest.raises(ExperimentTopicError, match="cannot reach Kafka at 127.0.0.1:1"):
        ensure_experiments_topic(settings, timeout_s=2)
