"""``abstream demo``: the whole pipeline on the embedded defaults, start to finish.

Starts the local broker if none answers, a worker holding the sink role, publishes
simulated traffic with duplicates and malformed messages, waits until ClickHouse holds
every distinct valid event, prints what reached each table, and stops what it started.
"""
from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from streams.processes import start_worker, stop_worker, wait_healthy
from streams.settings import Settings
from streams.warehouse import DEADLETTER_TABLE, RAW_TABLES

COUNTS_SQL = " UNION ALL ".join(
    f"SELECT '{table}' AS table, count() AS rows FROM {{db}}.{table}" for table in [*RAW_TABLES.values(), DEADLETTER_TABLE]
)


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
    worker = start_worker(settings, sink=True, log_path=settings.home / "worker.log")
    try:
        with console.status("starting a worker with the ClickHouse sink role"):
            wait_healthy(settings, worker)
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
