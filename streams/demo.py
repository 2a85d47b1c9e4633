"""``abstream demo``: the whole pipeline on the embedded defaults, start to finish.

Starts the local broker if none answers, a worker holding the sink role, publishes
simulated traffic with duplicates and malformed messages, waits until ClickHouse holds
every distinct valid event, prints what reached each table, and stops what it started.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from rich.console import Console
from rich.table import Table

from streams.settings import Settings
from streams.warehouse import DEADLETTER_TABLE, RAW_TABLES

COUNTS_SQL = " UNION ALL ".join(
    f"SELECT '{table}' AS table, count() AS rows FROM {{db}}.{table}" for table in [*RAW_TABLES.values(), DEADLETTER_TABLE]
)


def start_worker(settings: Settings, *, sink: bool, web_port: int, env: dict[str, str] | None = None,
                 log_path=None) -> subprocess.Popen:
    """A worker in its own process (and process group), started with the current settings."""
    args = [sys.executable, "-m", "streams.cli", "worker", "--web-port", str(web_port)] + (["--sink"] if sink else [])
    log = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(args, env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_healthy(web_port: int, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the worker exited with code {process.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/health", timeout=1) as response:
                if json.loads(response.read())["status"] == "ok":
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the worker did not answer on port {web_port} within {timeout_s:.0f} s")


def stop_worker(process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_demo(settings: Settings, *, events: int) -> int:
    from streams import local_kafka
    from streams.cli import _publish_with_progress, run_query
    from streams.simulate import simulated_messages
    from streams.topics import ensure_topics

    console = Console()
    data_dir = settings.home / "kafka"
    port = int(settings.kafka_bootstrap.rsplit(":", 1)[1])
    was_running = local_kafka.status(data_dir=data_dir, port=port).running
    with console.status("starting the local Kafka broker"):
        broker = local_kafka.start(data_dir=data_dir, port=port)
    console.print(f"kafka: {broker.bootstrap} (pid {broker.pid})")
    ensure_topics(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    worker = start_worker(settings, sink=True, web_port=settings.web_port, log_path=settings.home / "worker.log")
    try:
        with console.status("starting a worker with the ClickHouse sink role"):
            wait_healthy(settings.web_port, worker)
        duplicates, malformed = events // 50, events // 200
        run = int(time.time())
        messages = simulated_messages(events, duplicates=duplicates, malformed=malformed, seed=run, run_id=f"{run}-")
        _publish_with_progress(settings, messages, quiet=False)
        console.print(f"published {len(messages)} messages ({duplicates} duplicates, {malformed} malformed)")
        expected = len(messages) - duplicates
        with console.status("waiting for ClickHouse to hold every event"):
            deadline = time.monotonic() + 120
            while True:
                _, rows = run_query(settings, COUNTS_SQL)
                if sum(int(r[1]) for r in rows) >= expected or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        table = Table("ClickHouse table", "rows", title=f"database {settings.clickhouse_database}")
        for name, count in sorted(rows):
            table.add_row(name, str(count))
        console.print(table)
        console.print(f"worker log: {settings.home / 'worker.log'}; query the tables with: "
                      "abstream query \"SELECT variant, count() FROM {db}.assignments GROUP BY variant\"")
    finally:
        stop_worker(worker)
        if not was_running:
            local_kafka.stop(data_dir=data_dir)
    return 0
