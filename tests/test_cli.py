"""The command line as a user meets it: help everywhere, one-line errors, meaningful exit codes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ABSTREAM = str(Path(sys.executable).parent / "abstream")
SUBCOMMANDS = ["demo", "kafka", "worker", "sink", "simulate", "query", "experiment", "status", "plan", "report", "alerts-bridge"]


def run(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([ABSTREAM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, words: str) -> None:
    assert result.returncode == code, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("abstream") and words in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def test_help():
    result = run("--help")
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name):
    result = run(name, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: abstream {name}")


def test_unknown_command_is_one_line_and_exit_2():
    assert_one_line_error(run("frobnicate"), 2, "invalid choice")


def test_bad_option_value_is_one_line_and_exit_2():
    assert_one_line_error(run("kafka", "start", "--port", "ninety"), 2, "invalid int value")


def test_missing_command_is_one_line_and_exit_2():
    assert_one_line_error(run(), 2, "required")


def test_bad_setting_is_one_line_and_exit_1():
    result = run("query", "SELECT 1", env={"ABSTREAM_CLICKHOUSE_DSN": "ftp://example"})
    assert_one_line_error(result, 1, "ABSTREAM_CLICKHOUSE_DSN")


def test_bad_sql_is_one_line_and_exit_1(tmp_path):
    result = run("query", "SELEKT nothing", env={"ABSTREAM_HOME": str(tmp_path), "ABSTREAM_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch"})
    assert_one_line_error(result, 1, "query failed")


def test_query_is_read_only(tmp_path):
    env = {"ABSTREAM_HOME": str(tmp_path), "ABSTREAM_CLICKHOUSE_DSN": f"chdb://{tmp_path}/ch"}
    assert_one_line_error(run("query", "CREATE DATABASE sneaky", env=env), 1, "readonly")
    result = run("query", "SELECT 40 + 2 AS answer", "--json", env=env)
    assert result.returncode == 0 and '"rows": [[42]]' in result.stdout


def test_contradictory_simulate_options():
    assert_one_line_error(run("simulate", "--events", "10", "--duplicates", "20"), 1, "cannot exceed")


def test_kafka_status_when_not_running(tmp_path):
    result = run("kafka", "status", "--data-dir", str(tmp_path), "--port", "1")
    assert result.returncode == 1 and "not running" in result.stdout


def test_sink_on_a_taken_port_is_one_line_and_exit_1(settings, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**settings.to_env(), "ABSTREAM_HOME": str(tmp_path), "ABSTREAM_CLICKHOUSE_DSN": f"chdb://{tmp_path / 'ch'}"}
        result = run("sink", "--web-port", str(taken.getsockname()[1]), env=env)
    assert_one_line_error(result, 1, "cannot serve on 127.0.0.1")


def test_a_schema_registry_nobody_answers_is_one_line_and_exit_1(settings):
    from tests.support import free_port

    env = {**settings.to_env(), "ABSTREAM_SCHEMA_REGISTRY_URL": f"http://127.0.0.1:{free_port()}"}
    config = Path(__file__).parent.parent / "examples" / "experiments" / "checkout-revenue.yaml"
    result = run("experiment", "create", str(config), env=env)
    assert_one_line_error(result, 1, "the schema registry did not register abstream's experiment_config schema")
