"""Nobody let in: SASL credentials, secrets kept out of logs, hostile ids, read-only HTTP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from streams import local_kafka
from streams.experiments import load_config_file, publish_config, start
from streams.processes import start_worker, stop_worker, wait_healthy
from tests.support import free_port, make_settings

pytestmark = pytest.mark.kafka
ABSTREAM = str(Path(sys.executable).parent / "abstream")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "experiments"
USERS = {"alice": "wonderland-7"}


@pytest.fixture(scope="module")
def sasl_broker(tmp_path_factory):
    """A broker of its own whose second listener requires SCRAM-SHA-256."""
    data_dir = tmp_path_factory.mktemp("sasl-kafka")
    sasl_port = free_port()
    local_kafka.start(data_dir=data_dir, port=free_port(), controller_port=free_port(),
                      sasl_port=sasl_port, sasl_users=USERS)
    try:
        yield f"127.0.0.1:{sasl_port}"
    finally:
        local_kafka.stop(data_dir=data_dir)


def sasl_settings(bootstrap: str, tmp: Path, password: str):
    return replace(make_settings(bootstrap, tmp), kafka_security={
        "security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "SCRAM-SHA-256",
        "sasl.username": "alice", "sasl.password": password})


def run(*args: str, settings, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([ABSTREAM, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **settings.to_env()})


def test_right_credentials_let_the_cli_and_the_worker_in(sasl_broker, tmp_path):
    settings = sasl_settings(sasl_broker, tmp_path, USERS["alice"])
    publish_config(settings, start(load_config_file(EXAMPLES / "ranker-conversion.yaml")))
    publish_config(settings, start(load_config_file(EXAMPLES / "checkout-revenue.yaml")))
    worker = start_worker(settings, sink=False, log_path=tmp_path / "worker.log")
    try:
        wait_healthy(settings, worker)
        published = run("simulate", "--events", "300", "--json", settings=settings)
        assert published.returncode == 0, published.stderr
        deadline_metrics = f"http://127.0.0.1:{settings.web_port}/metrics"
        import time

        deadline = time.monotonic() + 60
        while True:
            text = urllib.request.urlopen(deadline_metrics, timeout=10).read().decode()
            consumed = sum(float(l.split()[-1]) for l in text.splitlines() if l.startswith("abstream_events_consumed_total{"))
            if consumed >= 300:
                break
            assert time.monotonic() < deadline, f"the SASL worker consumed {consumed} of 300"
            time.sleep(0.5)
    finally:
        stop_worker(worker)
    assert USERS["alice"] not in (tmp_path / "worker.log").read_text()


def test_wrong_credentials_end_in_one_line(sasl_broker, tmp_path):
    settings = sasl_settings(sasl_broker, tmp_path, "not-the-password")
    published = run("simulate", "--events", "10", settings=settings)
    assert published.returncode == 1, published.stdout
    [line] = published.stderr.strip().splitlines()
    assert "refused the credentials" in line and "not-the-password" not in line
    worker = start_worker(settings, sink=False, log_path=tmp_path / "worker.log")
    assert worker.wait(60) == 1
    log = (tmp_path / "worker.log").read_text().strip().splitlines()
    assert len(log) == 1 and "refused the credentials" in log[0] and "Traceback" not in log[0]


def test_clickhouse_credentials_never_appear_in_logs_or_errors(kafka_broker, tmp_path):
    secret = "s3cret-ch-pass"
    port = free_port()  # nothing listens: the sink cannot connect
    settings = replace(make_settings(kafka_broker, tmp_path), clickhouse_dsn=f"http://analyst:{secret}@127.0.0.1:{port}")
    worker = start_worker(settings, sink=True, log_path=tmp_path / "worker.log")
    assert worker.wait(90) == 1
    log = (tmp_path / "worker.log").read_text()
    assert secret not in log and "analyst:***@" in log and len(log.strip().splitlines()) == 1
    query = run("query", "SELECT 1", settings=settings)
    assert query.returncode == 1 and secret not in query.stderr + query.stdout


def test_hostile_ids_through_the_cli_and_the_http_endpoints(worker_settings, tmp_path):
    settings = worker_settings
    worker = start_worker(settings, sink=True, log_path=tmp_path / "worker.log")
    try:
        wait_healthy(settings, worker)
        for hostile in ("x' OR 1=1 --", "../../etc/passwd", "exp\"; DROP TABLE assignments; --", "%00\n"):
            status = run("status", hostile, settings=settings, timeout=60)
            assert status.returncode == 1 and len(status.stderr.strip().splitlines()) == 1
            url = f"http://127.0.0.1:{settings.web_port}/experiments/{urllib.parse.quote(hostile, safe='')}"
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(url, timeout=10)
            assert refused.value.code == 404
        report = run("report", "x' OR 1=1 --", settings=settings, timeout=60)
        assert report.returncode == 1 and len(report.stderr.strip().splitlines()) == 1
        # Parameters travel as data: a hostile value cannot widen the query.
        sql = urllib.parse.urlencode({"query": "SELECT count() FROM {db}.assignments WHERE experiment_id = {e:String}",
                                      "params": json.dumps({"e": "x' OR 1=1 --"})})
        rows = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/sql?{sql}", timeout=30).read())["rows"]
        assert rows == [[0]]
    finally:
        stop_worker(worker)


def test_http_endpoints_are_read_only(worker_settings, tmp_path):
    settings = worker_settings
    worker = start_worker(settings, sink=True, log_path=tmp_path / "worker.log")
    try:
        wait_healthy(settings, worker)
        base = f"http://127.0.0.1:{settings.web_port}"
        for path in ("/sql", "/experiments/x", "/metrics"):
            request = urllib.request.Request(base + path, data=b"{}", method="POST")
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(request, timeout=10)
            assert refused.value.code in (404, 405)
        writes = urllib.parse.urlencode({"query": "CREATE TABLE {db}.intruder (x UInt8) ENGINE = Memory"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/sql?{writes}", timeout=30)
        assert refused.value.code == 400 and b"readonly" in refused.value.read().lower()
    finally:
        stop_worker(worker)
