"""The alerts bridge against the real broker and a real HTTP receiver standing in for
Alertmanager's API (a loopback server that records what it is sent)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from streams.codec import Codec, ControlKind
from streams.topics import ALERTS, ensure_topics, make_producer

pytestmark = pytest.mark.kafka
ABSTREAM = str(Path(sys.executable).parent / "abstream")


def alert(state: str, n: int = 1) -> dict:
    return {"alert_id": f"exp/p95/treatment/{n}", "experiment_id": "exp", "variant": "treatment", "guardrail": "p95",
            "kind": "latency_p95", "state": state, "severity": "critical", "action": "kill", "observed": 217.0,
            "threshold": 98.0, "p_value": None, "evidence": "p95 latency 217 ms against a ceiling of 98 ms",
            "event_time": 1_767_225_600_000, "emitted_time": 1_767_225_660_000}


@pytest.fixture
def receiver():
    received: list = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()


def test_alerts_reach_alertmanager_as_firing_then_resolved(settings, receiver):
    url, received = receiver
    ensure_topics(settings)
    producer = make_producer(settings)
    for state in ("firing", "resolved"):
        producer.produce(settings.topic(ALERTS), key=b"exp", value=Codec().encode(ControlKind.ALERT, alert(state)))
    assert producer.flush(10) == 0
    run = subprocess.run([ABSTREAM, "alerts-bridge", "--alertmanager", url, "--once"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, **settings.to_env()})
    assert run.returncode == 0, run.stderr
    assert "forwarded 2 alerts" in run.stdout
    sent = [a for path, body in received for a in body]
    assert {path for path, _ in received} == {"/api/v2/alerts"}
    assert [a["labels"]["alertname"] for a in sent] == ["AbstreamGuardrail"] * 2
    assert sent[0]["labels"] == sent[1]["labels"]  # one alert to Alertmanager: same labels
    assert "endsAt" not in sent[0] and sent[1]["endsAt"].startswith("2026-01-01T00:01:00")
    assert sent[0]["labels"]["severity"] == "critical" and sent[0]["annotations"]["alert_id"] == "exp/p95/treatment/1"
    again = subprocess.run([ABSTREAM, "alerts-bridge", "--alertmanager", url, "--once"], capture_output=True, text=True,
                           timeout=60, env={**os.environ, **settings.to_env()})
    assert "forwarded 0 alerts" in again.stdout  # committed after Alertmanager's 2xx: not sent twice


def test_an_unreachable_alertmanager_is_one_line_and_nothing_is_committed(settings):
    ensure_topics(settings)
    producer = make_producer(settings)
    producer.produce(settings.topic(ALERTS), key=b"exp", value=Codec().encode(ControlKind.ALERT, alert("firing")))
    assert producer.flush(10) == 0
    run = subprocess.run([ABSTREAM, "alerts-bridge", "--alertmanager", "http://127.0.0.1:1", "--once"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, **settings.to_env()})
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1
    assert "cannot reach Alertmanager" in run.stderr
