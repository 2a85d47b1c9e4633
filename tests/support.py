"""Helpers shared by the fixtures and the tests that need settings outside a fixture."""
from __future__ import annotations

import socket
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable

from streams.settings import Settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_settings(bootstrap: str, tmp: Path, clickhouse_dsn: str | None = None) -> Settings:
    """Settings of one test: its own topic prefix, home, database and web port."""
    tag = uuid.uuid4().hex[:10]
    return replace(
        Settings.from_env({}),
        home=tmp / "home",
        kafka_bootstrap=bootstrap,
        topic_prefix=f"t{tag}.",
        clickhouse_dsn=clickhouse_dsn or f"chdb://{tmp / 'chdb'}",
        clickhouse_database=f"t{tag}",
        web_port=free_port(),
        broker_session_timeout_s=6.0,
    )


def read_all(settings: Settings, topic: str, timeout_s: float = 10.0) -> list:
    """Every message of a topic (all partitions, from the beginning, up to its end now)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}test-reader",
                                                  "enable.auto.commit": "false"}))
    try:
        partitions = consumer.list_topics(topic, timeout=timeout_s).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)[1] for p in partitions}
        consumer.assign([TopicPartition(topic, p, 0) for p, end in ends.items() if end > 0])
        pending = {p: end for p, end in ends.items() if end > 0}
        messages = []
        while pending:
            message = consumer.poll(timeout_s)
            if message is None:
                raise TimeoutError(f"{topic} did not deliver up to its end")
            if message.error() is not None:
                continue
            messages.append(message)
            if message.offset() + 1 >= pending.get(message.partition(), 0):
                pending.pop(message.partition(), None)
        return messages
    finally:
        consumer.close()


def published_decisions(settings: Settings, since_ms: int = 0) -> list[tuple[str, dict]]:
    """(experiment_id, Decision record) of every decision published from ``since_ms`` (Kafka
    timestamp) on; an experiment's in the order published (its key puts them on one partition)."""
    from streams.codec import Codec, ControlKind, schema_source
    from streams.topics import DECISIONS

    codec = Codec(schema_source(settings.schema_registry_url))
    return [(m.key().decode(), codec.decode(ControlKind.DECISION, m.value()))
            for m in read_all(settings, settings.topic(DECISIONS)) if m.timestamp()[1] >= since_ms]


def decisions_going_back(settings: Settings, experiment_ids) -> list[str]:
    """Where one of these experiments' decisions had fewer units in a variant, or an earlier
    watermark, than the one it published before."""
    previous: dict[str, dict] = {}
    back = []
    for experiment_id, d in published_decisions(settings):
        if experiment_id not in experiment_ids:
            continue
        units = {v["variant"]: v["units"] for v in d["variants"]}
        last = previous.get(experiment_id)
        if last is not None and (d["watermark_time"] < last["watermark_time"]
                                 or any(n < last["units"].get(v, 0) for v, n in units.items())):
            back.append(f"{experiment_id}: {units} at watermark {d['watermark_time']} after {last['units']} at "
                        f"{last['watermark_time']}")
        previous[experiment_id] = {"watermark_time": d["watermark_time"], "units": units}
    return back


# --- fault tests: worker processes, consumer-group lag, memory, failure injection ---------

def start_worker_process(settings: Settings, *, sink: bool, log_path: Path, loglevel: str = "info",
                         env: dict[str, str] | None = None):
    """A worker like streams.processes.start_worker, with a log level (Faust logs rebalances
    and table recovery at info) and extra environment (failure-injection hooks)."""
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "streams.cli", "worker", "--loglevel", loglevel] + (["--sink"] if sink else [])
    with open(log_path, "ab") as log:
        return subprocess.Popen(args, env={**os.environ, **settings.to_env(), **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def kill_worker(process) -> None:
    """kill -9 of the worker's whole process group: no shutdown code runs."""
    import os
    import signal

    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def group_lag(settings: Settings, group: str, topics: list[str], timeout_s: float = 10.0) -> dict[str, int]:
    """Messages beyond a consumer group's committed offsets, per topic (the group's real lag:
    what it would read again after a crash)."""
    lag: dict[str, int] = {t: 0 for t in topics}
    for (topic, _), n in partition_lag(settings, group, topics, timeout_s).items():
        lag[topic] += n
    return lag


def partition_lag(settings: Settings, group: str, topics: list[str],
                  timeout_s: float = 10.0) -> dict[tuple[str, int], int]:
    """:func:`group_lag` per (topic, partition)."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(settings.kafka_config(**{"group.id": group, "enable.auto.commit": "false"}))
    try:
        partitions = [TopicPartition(t, p) for t in topics
                      for p in consumer.list_topics(t, timeout=timeout_s).topics[t].partitions]
        lag: dict[tuple[str, int], int] = {}
        for tp in consumer.committed(partitions, timeout=timeout_s):
            low, high = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition), timeout=timeout_s)
            lag[(tp.topic, tp.partition)] = high - (tp.offset if tp.offset >= 0 else low)
        return lag
    finally:
        consumer.close()


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise LookupError(f"no VmRSS for pid {pid}")


CLICKHOUSE_FAULT_FILE_VAR = "ABSTREAM_TEST_FAULT_CLICKHOUSE_UNTIL_FILE"

# Installed as sitecustomize on a worker's PYTHONPATH by clickhouse_fault_env: it wraps the
# real clickhouse-connect client at the client boundary, so that every query, insert and
# command raises the driver's own OperationalError while the Unix time written in the file
# named by the variable lies in the future. Everything above the client (streams.warehouse,
# the sink's retries) runs unchanged.
_CLICKHOUSE_FAULT_HOOK = '''
import os, time
import clickhouse_connect
from clickhouse_connect.driver.exceptions import OperationalError

_until_file = os.environ.get("{var}")
_real_get_client = clickhouse_connect.get_client


def _failing():
    try:
        with open(_until_file) as f:
            return time.time() < float(f.read().strip() or 0)
    except (OSError, ValueError):
        return False


class _FlakyClient:
    def __init__(self, client):
        self._client = client

    def __getattr__(self, name):
        attribute = getattr(self._client, name)
        if name not in ("query", "insert", "command"):
            return attribute

        def call(*args, **kwargs):
            if _failing():
                raise OperationalError("injected fault: ClickHouse is unreachable")
            return attribute(*args, **kwargs)
        return call


def _get_client(*args, **kwargs):
    return _FlakyClient(_real_get_client(*args, **kwargs))


if _until_file:
    clickhouse_connect.get_client = _get_client
'''


def clickhouse_fault_env(hook_dir: Path, until_file: Path) -> dict[str, str]:
    """Environment for a worker whose ClickHouse client fails while ``until_file`` holds a
    future Unix time (write it to start the fault; nothing in streams/ changes)."""
    import os

    hook_dir.mkdir(parents=True, exist_ok=True)
    (hook_dir / "sitecustomize.py").write_text(_CLICKHOUSE_FAULT_HOOK.replace("{var}", CLICKHOUSE_FAULT_FILE_VAR))
    path = os.pathsep.join(p for p in (str(hook_dir), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, CLICKHOUSE_FAULT_FILE_VAR: str(until_file)}


class PromotionRecorder:
    """A model registry for tests (ABSTREAM_MODEL_REGISTRY=tests.support:PromotionRecorder):
    appends each promotion to <home>/promotions.jsonl."""

    def __init__(self, settings: Settings):
        self.path = settings.home / "promotions.jsonl"

    def promote(self, experiment_id: str, variant: str, model_name: str, model_version: str) -> None:
        import json

        with self.path.open("a") as f:
            f.write(json.dumps([experiment_id, variant, model_name, model_version]) + "\n")


def wait_until(condition, timeout_s: float, what: str, interval_s: float = 0.2):
    """Poll ``condition`` until it returns something truthy (and return that), or fail with
    what was awaited once ``timeout_s`` has passed. Tests wait on conditions, never on time."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def refuse_schema_lookups(monkeypatch, registry, refuse) -> list[int]:
    """Make a schema-registry client answer 503, as a registry in an outage does, to
    ``get_schema(id)`` whenever ``refuse(id, n)`` holds (n: the look-up's number, from 1);
    returns the list of ids asked for, in order."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    asked: list[int] = []
    ask = registry.get_schema

    def get_schema(schema_id, *args, **kwargs):
        asked.append(schema_id)
        if refuse(schema_id, len(asked)):
            raise SchemaRegistryError(503, 50301, "registry unavailable")
        return ask(schema_id, *args, **kwargs)

    monkeypatch.setattr(registry, "get_schema", get_schema)
    return asked


def fail_schema_registrations(monkeypatch, registry, status: Callable[[], int | None]) -> None:
    """Make a schema-registry client's registrations fail with what ``status()`` says for each
    (503: a registry in an outage; 409: one that refuses the schema as incompatible; None: it
    goes through)."""
    from confluent_kafka.schema_registry.error import SchemaRegistryError

    said = {503: (50301, "registry unavailable"), 409: (409, "incompatible")}
    register = registry.register_schema

    def register_schema(*args, **kwargs):
        now = status()
        if now is not None:
            raise SchemaRegistryError(now, *said[now])
        return register(*args, **kwargs)

    monkeypatch.setattr(registry, "register_schema", register_schema)


class CatalogueRegistry:
    """A schema registry for fault tests: the two calls of the Confluent REST API that abstream
    makes (register a schema under a subject; read a schema by id), answered over real HTTP
    from schemas/catalogue.json, so that its ids are the local catalogue's and a stream
    written without a registry reads the same through it. While ``refusing`` is set it answers
    look-ups by id with 503, as a registry in an outage does; ``refused`` counts those;
    ``refusing_registrations`` and ``registrations_refused`` do the same for registrations.
    While ``hanging`` is set it answers no look-up (a registry behind a black hole); ``hung``
    counts the look-ups it held. ``hanging_registrations`` does the same to registrations."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from streams.codec import SCHEMA_DIR

        entries = json.loads((SCHEMA_DIR / "catalogue.json").read_text())["schemas"]
        texts = {entry["id"]: (SCHEMA_DIR / entry["file"]).read_text() for entry in entries}
        ids = {json.dumps(json.loads(text), sort_keys=True): schema_id for schema_id, text in texts.items()}
        self.refusing = False
        self.refused = 0
        self.refusing_registrations = False
        self.registrations_refused = 0
        self.hanging = False
        self.hung = 0
        self.hanging_registrations = False
        self.lookups = 0
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 (http.server's name)
                parts = self.path.split("?")[0].strip("/").split("/")
                if len(parts) != 3 or parts[:2] != ["schemas", "ids"] or not parts[2].isdigit():
                    return self._answer(404, {"error_code": 404, "message": "HTTP 404 Not Found"})
                registry.lookups += 1
                if registry.hanging:
                    registry.hung += 1
                    while registry.hanging:
                        time.sleep(0.05)
                    return  # the asker has given up long ago: no answer at all
                if registry.refusing:
                    registry.refused += 1
                    return self._answer(503, {"error_code": 50301, "message": "registry unavailable (test outage)"})
                text = texts.get(int(parts[2]))
                if text is None:
                    return self._answer(404, {"error_code": 40403, "message": "Schema not found"})
                return self._answer(200, {"schema": text})

            def do_POST(self):  # noqa: N802
                parts = self.path.split("?")[0].strip("/").split("/")
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                schema_id = ids.get(json.dumps(json.loads(body.get("schema", "{}")), sort_keys=True))
                if len(parts) != 3 or parts[0] != "subjects" or parts[2] != "versions" or schema_id is None:
                    return self._answer(422, {"error_code": 42201, "message": "not a schema of schemas/catalogue.json"})
                while registry.hanging_registrations:
                    time.sleep(0.05)
                if registry.refusing_registrations:
                    registry.registrations_refused += 1
                    return self._answer(503, {"error_code": 50301, "message": "registry unavailable (test outage)"})
                return self._answer(200, {"id": schema_id})

            def log_message(self, *args):  # keep the test output quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="test-registry", daemon=True)

    def __enter__(self) -> "CatalogueRegistry":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
