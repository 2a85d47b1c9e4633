"""The abstream worker: a faust-streaming app whose stage-1 agent reads the input topics.

Stage 1 (this skeleton): take a batch, decode and validate it, send what is bad to the
dead-letter topic with its reason and original bytes, and drop duplicates by (unit_id,
event_id). A worker started with ``--sink`` also runs the ClickHouse sink role
(streams/sink.py) in a thread and serves read-only SQL on its loopback HTTP port.

Agent concurrency stays 1: faust-streaming loses messages with concurrency > 1.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams import metrics
from streams.codec import Codec, DeadLetter, schema_source
from streams.settings import Settings
from streams.sink import Sink
from streams.topics import DEADLETTER, deadletter_headers, input_topic_names
from streams.warehouse import Warehouse, WarehouseError

log = logging.getLogger("abstream.worker")


class DedupWindow:
    """Identities (unit_id, event_id) seen in one partition within ``window_s`` of event time.

    Bounded by the event rate times the window: entries expire once the partition's
    watermark (its highest event time) has moved ``window_s`` past them.
    """

    def __init__(self, window_s: float):
        self.window_ms = int(window_s * 1000)
        self.watermark_ms = 0
        self._seen: OrderedDict[tuple[str, str], int] = OrderedDict()

    def first_time(self, unit_id: str, event_id: str, event_time_ms: int) -> bool:
        key = (unit_id, event_id)
        if key in self._seen:
            return False
        self._seen[key] = event_time_ms
        if event_time_ms > self.watermark_ms:
            self.watermark_ms = event_time_ms
            horizon = self.watermark_ms - self.window_ms
            seen = self._seen
            while seen:
                oldest = next(iter(seen.values()))
                if oldest >= horizon:
                    break
                seen.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._seen)


class Stage1:
    """Decode, dead-letter and deduplicate one batch of input messages."""

    def __init__(self, settings: Settings, codec: Codec):
        self.settings = settings
        self.codec = codec
        self.kinds = input_topic_names(settings)
        self.short_names = {topic: topic[len(settings.topic_prefix):] for topic in self.kinds}
        self.dedup: dict[int, DedupWindow] = {}

    def forget_partitions(self, partitions: set[int]) -> None:
        for partition in partitions:
            self.dedup.pop(partition, None)

    def process(self, messages: Sequence[faust.types.Message]) -> tuple[list[dict], list[tuple[faust.types.Message, DeadLetter]]]:
        """(the batch's first-seen valid records, its dead letters with their messages)."""
        fresh: list[dict] = []
        dead: list[tuple[faust.types.Message, DeadLetter]] = []
        for message in messages:
            topic = message.topic
            metrics.EVENTS_CONSUMED.labels(self.short_names[topic]).inc()
            decoded = self.codec.decode(self.kinds[topic], message.value)
            if isinstance(decoded, DeadLetter):
                dead.append((message, decoded))
                metrics.DEADLETTERS.labels(self.short_names[topic], decoded.reason.value).inc()
                continue
            window = self.dedup.get(message.partition)
            if window is None:
                window = self.dedup[message.partition] = DedupWindow(self.settings.dedup_window_s)
            if window.first_time(decoded["unit_id"], decoded["event_id"], decoded["event_time"]):
                fresh.append(decoded)
            else:
                metrics.EVENTS_DUPLICATE.labels(self.short_names[topic]).inc()
        metrics.BATCH_EVENTS.observe(len(messages))
        return fresh, dead


def create_app(settings: Settings, *, warehouse: Warehouse | None = None) -> faust.App:
    """The Faust app of a worker; ``warehouse`` is set when this worker holds the sink role."""
    app = faust.App(
        f"{settings.topic_prefix}worker",
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        store="memory://",
        autodiscover=False,
        topic_partitions=settings.partitions,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.broker_session_timeout_s / 3),
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        datadir=str(settings.home / "faust"),
    )
    inputs = app.topic(*input_topic_names(settings), key_serializer="raw", value_serializer="raw")
    deadletters = app.topic(settings.topic(DEADLETTER), key_serializer="raw", value_serializer="raw")
    stage1 = Stage1(settings, Codec(schema_source(settings.schema_registry_url)))

    @app.agent(inputs, concurrency=1, name="stage1")
    async def stage1_agent(stream):
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_within_s):
            _, dead = stage1.process([event.message for event in events])
            for message, letter in dead:
                await deadletters.send(
                    key=message.key, value=message.value,
                    headers=deadletter_headers(letter, message.topic, message.partition, message.offset),
                )

    @app.on_partitions_revoked.connect
    async def on_revoked(app_, revoked, **kwargs):
        stage1.forget_partitions({tp.partition for tp in revoked})

    @app.page("/metrics")
    async def metrics_page(web, request):
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/health")
    async def health_page(web, request):
        return web.json({"status": "ok", "sink": warehouse is not None})

    @app.page("/sql")
    async def sql_page(web, request):
        # Read-only SQL on the embedded ClickHouse this process owns; loopback clients only.
        if warehouse is None:
            return web.json({"error": "this worker does not hold the sink role"}, status=404)
        if not ipaddress.ip_address(request.remote or "0.0.0.0").is_loopback:
            return web.json({"error": "SQL is served to loopback clients only"}, status=403)
        sql = request.query.get("query", "")
        try:
            result = await app.loop.run_in_executor(None, warehouse.query, sql)
        except WarehouseError as exc:
            return web.json({"error": str(exc)}, status=400)
        return web.bytes(
            json.dumps({"columns": result.column_names, "rows": result.rows}, default=str).encode(),
            content_type="application/json",
        )

    return app


def sink_endpoint_file(settings: Settings) -> Path:
    """Where the sink-holding worker writes its SQL endpoint while it runs."""
    return settings.home / "sink.json"


def run_worker(settings: Settings, *, sink: bool, loglevel: str = "warning") -> None:
    """Run a worker until it is stopped (SIGINT/SIGTERM); never returns."""
    from streams.topics import ensure_topics

    ensure_topics(settings)
    warehouse = None
    sink_role = None
    endpoint = sink_endpoint_file(settings)
    if sink:
        warehouse = Warehouse(settings.clickhouse_dsn, settings.clickhouse_database)
        sink_role = Sink(settings, warehouse, Codec(schema_source(settings.schema_registry_url)))
        sink_role.start()
        settings.home.mkdir(parents=True, exist_ok=True)
        endpoint.write_text(json.dumps({"pid": os.getpid(), "url": f"http://{settings.web_host}:{settings.web_port}"}))
    app = create_app(settings, warehouse=warehouse)
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    try:
        worker.execute_from_commandline()
    finally:
        if sink_role is not None:
            sink_role.stop()
            endpoint.unlink(missing_ok=True)
