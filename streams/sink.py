"""The ClickHouse sink role: every raw event, dead letter and decision exactly once.

The sink consumes, in its own consumer group (``<prefix>sink``), the input topics (into the
raw tables), the dead-letter topic (into ``deadletter``, so that the table holds exactly
what the topic holds) and the decisions topic (into ``decisions``). Input messages that do
not decode are skipped here: the stage-1 agent dead-letters them. With a ``chdb://`` DSN
exactly one process takes this role (chDB locks its directory).

Exactly once, how: consumption is at least once (offsets are committed only after a batch
is in ClickHouse), and every write is idempotent. An event's identity is (unit_id, event_id),
and each raw row also keeps where it was read (kafka_partition, kafka_offset). The rule: a
message at offset o is written unless its table holds a row of the same identity read from
the same partition at an offset in [o - W, o], W = ``ABSTREAM_SINK_RESEND_WINDOW``. At o
itself, that is a replay (the same message read again after a crash, a hand-over or a failed
commit); below it, a re-send (a producer sent the event twice; a unit's events share a
partition). The sink applies the rule from a :class:`PartitionLedger` per input partition,
the identities and offsets of the rows it holds from W offsets back, rebuilt from the table
by their coordinates when the sink gains the partition, or after a failed write (which may
have landed: the answer was lost). Decisions and alerts are identified by their offset alone
(a ledger with W = 0); dead letters, by the coordinates of the message they stand for,
checked against the table per batch (they are rare).

Why a ledger: the sink used to ask the table about every event of every batch, at any
distance. Look-ups of a few thousand random keys read every granule of a table ordered by
(experiment_id, unit_id, event_time), and the lists of literals alone cost ~60 ms per query
in chDB: the check was 38% of the sink's time and grew with the table (bench/PROFILE.md). The
cost of the rule above does not grow with the table, and its answer for a message depends
only on messages before it, so a replay decides as the first reading did. Its price, in the
README: a re-send more than W offsets after its first copy is written again (stage 1 counts
a re-send once if it is among the unit's 64 latest events).

This was chosen over ClickHouse's insert deduplication token because a replay after a crash
need not cut the same batches, and over a ReplacingMergeTree because analysts would see
duplicates until a merge and have to remember FINAL.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Iterable, Sequence

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from streams import metrics
from streams.codec import Codec, ControlKind, DeadLetter, EventKind, SchemaRegistryUnavailable
from streams.settings import Settings
from streams.topics import ALERTS, DEADLETTER, DECISIONS, input_topic_names
from streams.warehouse import (ALERTS_TABLE, DEADLETTER_COLUMNS, DEADLETTER_TABLE, DECISIONS_TABLE, RAW_TABLES,
                               Warehouse, WarehouseError, event_columns)

log = logging.getLogger("abstream.sink")


class Sink:
    """Consumes the raw, dead-letter and decision topics and writes columnar batches to the
    warehouse until stopped."""

    def __init__(self, settings: Settings, warehouse: Warehouse, codec: Codec, *, batch_max: int = 5000,
                 retry_max_s: float = 5.0):
        self.settings = settings
        self._ledgers: dict[tuple[str, int], PartitionLedger] = {}
        self._uncommitted: dict[tuple[str, int], int] = {}  # offsets written, not committed yet
        self.warehouse = warehouse
        self.codec = codec
        self.batch_max = batch_max
        self.retry_max_s = retry_max_s
        self._kinds = input_topic_names(settings)
        self._deadletter_topic = settings.topic(DEADLETTER)
        # Control-plane topics written to a table of their own, identified by (partition, offset).
        self._control = {settings.topic(DECISIONS): (ControlKind.DECISION, DECISIONS_TABLE, DECISION_COLUMNS),
                         settings.topic(ALERTS): (ControlKind.ALERT, ALERTS_TABLE, ALERT_COLUMNS)}
        self._columns = {kind: event_columns(kind) for kind in EventKind}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: str | None = None  # why the sink stopped on its own, for /health

    def start(self) -> None:
        self.warehouse.apply_schema()
        self._thread = threading.Thread(target=self.run, name="abstream-sink", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def run(self, consumer: Consumer | None = None) -> None:
        """Consume and write until stopped; ``consumer``: one made by :meth:`subscribed_consumer`."""
        consumer = consumer or self.subscribed_consumer()
        try:
            self._consume(consumer)
        except Exception as exc:  # the sink must not vanish silently: /health turns to failing
            self.failure = f"{type(exc).__name__}: {exc}"
            metrics.SINK_FAILURES.inc()
            log.exception("the ClickHouse sink stopped")
        finally:
            consumer.close()

    def subscribed_consumer(self) -> Consumer:
        consumer = Consumer(self.settings.kafka_config(**{
            "group.id": f"{self.settings.topic_prefix}sink",
            "enable.auto.commit": "false",
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "cooperative-sticky",
        }))
        consumer.subscribe(sorted(self._kinds) + [self._deadletter_topic, *self._control],
                           on_revoke=lambda c, partitions: self._hand_over(c, partitions, revoked=True),
                           on_lost=lambda c, partitions: self._hand_over(c, partitions, revoked=False))
        return consumer

    def _consume(self, consumer: Consumer) -> None:
        lag_measured = 0.0
        while not self._stop.is_set():
            messages = consumer.consume(num_messages=self.batch_max, timeout=0.5)
            messages = [m for m in messages if self._usable(m)]
            if time.monotonic() - lag_measured > 5:
                try:
                    metrics.INPUT_LAG.labels("sink").set(_input_lag(consumer, self._kinds))
                except KafkaException:
                    pass  # the broker is away: the gauge keeps its last value
                lag_measured = time.monotonic()
            if not messages:
                metrics.SINK_LAG_SECONDS.set(0)
                self._commit(consumer)
                continue
            if not self._write_until_done(messages):
                return  # stopping: the batch is not committed and will be read again
            for tp in _next_offsets(messages):
                self._uncommitted[(tp.topic, tp.partition)] = tp.offset
            self._commit(consumer)
            oldest_ms = min(m.timestamp()[1] for m in messages)
            metrics.SINK_LAG_SECONDS.set(max(0.0, time.time() - oldest_ms / 1000))

    def _commit(self, consumer: Consumer) -> None:
        """Commit the offsets written and not committed yet. A failed commit (the broker or
        its group coordinator is away) is tried again after the next batch or idle poll:
        "the next batch's commit covers it" is not enough when the stream has ended, and the
        group would show the written batches as lag for ever. A replay meanwhile writes
        nothing twice."""
        if not self._uncommitted:
            return
        try:
            consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in self._uncommitted.items()],
                            asynchronous=False)
            self._uncommitted.clear()
        except KafkaException as exc:
            log.warning("sink commit failed, trying again: %s", exc.args[0].str())

    def _usable(self, message: Message) -> bool:
        if message.error() is not None:
            log.warning("sink consumer: %s", message.error().str())
            return False
        return True

    def _write_until_done(self, messages: Sequence[Message]) -> bool:
        """Write the batch, retrying while ClickHouse fails or the schema registry cannot be
        asked (back-pressure: no more is read meanwhile); False when the sink is stopped before
        the batch could be written."""
        delay_s = 0.1
        while True:
            try:
                self.write(messages)
                metrics.SINK_LAST_WRITE.set(time.time())
                metrics.SCHEMA_REGISTRY_UNAVAILABLE.labels("sink").set(0)
                return True
            except (WarehouseError, SchemaRegistryUnavailable) as exc:
                if isinstance(exc, WarehouseError):
                    metrics.SINK_RETRIES.inc()
                else:
                    metrics.SCHEMA_REGISTRY_UNAVAILABLE.labels("sink").set(1)
                # The batch waits: its age is the sink's lag, and on-call should see it grow.
                metrics.SINK_LAG_SECONDS.set(max(0.0, time.time() - min(m.timestamp()[1] for m in messages) / 1000))
                log.warning("sink batch not written, retrying in %.1f s: %s", delay_s, exc)
                if self._stop.wait(delay_s):
                    return False
                delay_s = min(self.retry_max_s, delay_s * 2)

    def write(self, messages: Sequence[Message]) -> None:
        """Write what the warehouse does not hold yet of a batch (idempotent)."""
        started = time.perf_counter()
        events: dict[str, list[tuple[int, int, dict]]] = defaultdict(list)
        dead: dict[tuple[str, int], dict[int, tuple]] = defaultdict(dict)
        control: dict[str, list[tuple[int, int, tuple]]] = defaultdict(list)
        for message in messages:
            topic = message.topic()
            if topic == self._deadletter_topic:
                row = _deadletter_row(message)
                dead[(row[0], row[1])][row[2]] = row
            elif topic in self._control:
                kind, _, columns = self._control[topic]
                decoded = self.codec.decode(kind, message.value())
                if isinstance(decoded, DeadLetter):
                    log.warning("skipping an undecodable %s at offset %d: %s", kind.value, message.offset(), decoded.detail)
                else:
                    control[topic].append((message.partition(), message.offset(),
                                           _control_row(decoded, message.partition(), message.offset(), columns)))
            else:
                decoded = self.codec.decode(self._kinds[topic], message.value())
                if not isinstance(decoded, DeadLetter):
                    events[topic].append((message.partition(), message.offset(), decoded))
        written = 0
        for topic, items in events.items():
            written += self._write_events(topic, items)
        for (topic, partition), rows in dead.items():
            written += self._write_new(DEADLETTER_TABLE, {"topic": topic, "partition": partition}, "offset",
                                       rows, DEADLETTER_COLUMNS)
        for topic, items in control.items():
            written += self._write_control(topic, items)
        metrics.SINK_BATCH_ROWS.observe(written)
        metrics.SINK_INSERT_SECONDS.observe(time.perf_counter() - started)

    def _write_events(self, topic: str, items: list[tuple[int, int, dict]]) -> int:
        """Write the events (partition, offset, record) of one input topic that the table does
        not hold; returns how many."""
        kind = self._kinds[topic]
        table = RAW_TABLES[kind]
        ledgers = self._ledgers_for(topic, table, items, self.settings.sink_resend_window)
        fresh = [(partition, offset, record) for partition, offset, record in items
                 if ledgers[partition].admit(_identity(record["unit_id"], record["event_id"]), offset)]
        if fresh:
            columns = self._columns[kind]
            data = [[r[c] for _, _, r in fresh] for c in columns]
            data += [[p for p, _, _ in fresh], [o for _, o, _ in fresh]]
            self._insert(topic, ledgers, table, (*columns, "kafka_partition", "kafka_offset"), data)
            metrics.SINK_ROWS.labels(table).inc(len(fresh))
        metrics.SINK_DUPLICATES.labels(table).inc(len(items) - len(fresh))
        return len(fresh)

    def _write_control(self, topic: str, items: list[tuple[int, int, tuple]]) -> int:
        """Write the decisions or alerts (partition, offset, row) the table does not hold yet."""
        _, table, columns = self._control[topic]
        ledgers = self._ledgers_for(topic, table, items, 0)
        fresh = [row for partition, offset, row in items if ledgers[partition].admit(offset, offset)]
        if fresh:
            self._insert(topic, ledgers, table, columns, list(map(list, zip(*fresh))))
            metrics.SINK_ROWS.labels(table).inc(len(fresh))
        metrics.SINK_DUPLICATES.labels(table).inc(len(items) - len(fresh))
        return len(fresh)

    def _insert(self, topic: str, ledgers: dict[int, "PartitionLedger"], table: str, columns: Sequence[str],
                data: list[list]) -> None:
        try:
            self.warehouse.insert(table, columns, data)
        except WarehouseError:
            # The ledgers admitted rows that may not have landed, or may have (the answer was
            # lost): they are rebuilt from what the table holds before the batch is tried again.
            self._forget([TopicPartition(topic, p) for p in ledgers])
            raise
        for ledger in ledgers.values():
            ledger.close_batch()

    def _ledgers_for(self, topic: str, table: str, items: list[tuple[int, int, object]],
                     window: int) -> dict[int, "PartitionLedger"]:
        """The ledgers of the partitions in a batch, each holding at least the rows a window
        back from the batch's first offset: rebuilt from the table where missing or short."""
        first: dict[int, int] = {}
        for partition, offset, _ in items:
            if offset < first.get(partition, offset + 1):
                first[partition] = offset
        # Identities as the table holds them: (unit_id, event_id) of an event; a decision's or
        # an alert's own offset.
        columns = ("kafka_offset", "unit_id", "event_id") if window else ("kafka_offset",)
        floors = {p: max(0, offset - window) for p, offset in first.items()}
        short = {p: floor for p, floor in floors.items()
                 if (topic, p) not in self._ledgers or self._ledgers[(topic, p)].floor > floor}
        if short:
            held: dict[int, list[tuple[int, int]]] = {p: [] for p in short}
            for partition, offset, *event in self.warehouse.rows_since(table, short, columns):
                held[partition].append((_identity(*event) if window else offset, offset))
            for partition, floor in short.items():
                self._ledgers[(topic, partition)] = PartitionLedger(floor, held[partition], window)
        return {p: self._ledgers[(topic, p)] for p in first}

    def _forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drop the ledgers of these partitions (revoked, lost, or after a failed write)."""
        for tp in partitions:
            self._ledgers.pop((tp.topic, tp.partition), None)

    def _hand_over(self, consumer: Consumer, partitions: list[TopicPartition], *, revoked: bool) -> None:
        """Partitions revoked or lost: their ledgers go (another sink may write them now), and
        so do their uncommitted offsets, committed first if still possible (a lost partition's
        new owner reads them again and writes nothing twice)."""
        mine = {(tp.topic, tp.partition) for tp in partitions}
        handed = [TopicPartition(t, p, o) for (t, p), o in self._uncommitted.items() if (t, p) in mine]
        if revoked and handed:
            try:
                consumer.commit(offsets=handed, asynchronous=False)
            except KafkaException as exc:
                log.warning("sink commit at hand-over failed: %s", exc.args[0].str())
        self._forget(partitions)
        for key in mine:
            self._uncommitted.pop(key, None)

    def _write_new(self, table: str, where: dict, offset_column: str, rows: dict[int, tuple],
                   columns: Sequence[str]) -> int:
        """Write the rows (by offset) whose offsets the table does not hold yet."""
        held = self.warehouse.existing_offsets(table, where, offset_column, rows)
        fresh = [row for offset, row in rows.items() if offset not in held]
        metrics.SINK_DUPLICATES.labels(table).inc(len(rows) - len(fresh))
        if fresh:
            self.warehouse.insert(table, columns, list(map(list, zip(*fresh))))
            metrics.SINK_ROWS.labels(table).inc(len(fresh))
        return len(fresh)


def _identity(unit_id: str, event_id: str) -> int:
    """An event's identity in a ledger (see PartitionLedger)."""
    return hash((unit_id, event_id))


class PartitionLedger:
    """The rows the table holds of one input partition from offset ``floor`` on, as the
    exactly-once check needs them: each row's identity and offset.

    The rule, the same live and after a restart: a message at offset o is written unless the
    table holds a row of the same identity read at an offset in [o - window, o] (o itself: a
    replay; below it: a re-send). Rows read more than ``window`` offsets back are forgotten
    a whole batch at a time, so that every row at or above ``floor`` stays held. The decision
    for a message depends only on rows of lower offsets, which were judged before it by the
    same rule: a replay, however its batches are cut, decides exactly as the first reading.

    Identities of events are Python's 64-bit hashes of (unit_id, event_id), salted per
    process (a ledger is rebuilt, never stored); two distinct events collide with probability
    ~window/2^64 per event, the order of stage 1's hashed dedup window. Decisions and alerts
    use their own offset as identity, with a window of 0.
    """

    def __init__(self, floor: int, held: Iterable[tuple[int, int]], window: int):
        self.floor = floor
        self.window = window
        self._at: dict[int, int | list[int]] = {}  # identity -> offset(s) of its rows
        self._batches: deque[tuple[int, list[int], list[int]]] = deque()  # (last offset, identities, offsets)
        self._batch: tuple[list[int], list[int]] = ([], [])
        self._last = floor - 1
        for identity, offset in held:
            self._add(identity, offset)
        self._seal()  # not forgotten yet: the batch being judged may replay any of them

    def admit(self, identity: int, offset: int) -> bool:
        """True if the message is to be written (and the ledger now holds it)."""
        at = self._at.get(identity)
        if at is not None:
            low = offset - self.window
            if any(low <= a <= offset for a in (at if type(at) is list else (at,))):
                return False
        self._add(identity, offset)
        return True

    def close_batch(self) -> None:
        """Seal the rows admitted since the last call (they are in the table now) and forget
        the batches that no later message can need."""
        self._seal()
        # The next message comes after _last and needs the rows from _last + 1 - window on.
        while self._batches and self._batches[0][0] <= self._last - self.window:
            last, identities, offsets = self._batches.popleft()
            for identity, offset in zip(identities, offsets):
                self._remove(identity, offset)
            self.floor = max(self.floor, last + 1)

    def _seal(self) -> None:
        self._batches.append((self._last, *self._batch))
        self._batch = ([], [])

    def __len__(self) -> int:
        return sum(len(offsets) for _, _, offsets in self._batches) + len(self._batch[1])

    def _add(self, identity: int, offset: int) -> None:
        at = self._at.get(identity)
        # A second row of one identity (a re-send beyond the window) is rare: a list only then.
        self._at[identity] = offset if at is None else [*(at if type(at) is list else (at,)), offset]
        self._batch[0].append(identity)
        self._batch[1].append(offset)
        self._last = max(self._last, offset)

    def _remove(self, identity: int, offset: int) -> None:
        at = self._at[identity]
        if type(at) is list:
            at.remove(offset)
            if len(at) == 1:
                self._at[identity] = at[0]
        else:
            del self._at[identity]


def _deadletter_row(message: Message) -> tuple:
    """A deadletter table row from a dead-letter message: the source coordinates and reason
    from its headers, the original key and bytes from its key and value."""
    headers = {k: v.decode("utf-8", "replace") for k, v in (message.headers() or [])}
    key = message.key()
    return (headers.get("abstream.topic", ""), int(headers.get("abstream.partition", -1)),
            int(headers.get("abstream.offset", -1)), headers.get("abstream.reason", ""),
            headers.get("abstream.detail", ""), None if key is None else key.decode("utf-8", "replace"),
            message.value() or b"", message.timestamp()[1])


DECISION_COLUMNS = ("experiment_id", "config_version", "decision_time", "watermark_time", "runtime_s", "verdict",
                    "verdict_variant", "reason", "method", "alpha", "variants", "comparisons", "statistics", "srm_p_value",
                    "srm_flag", "outcome_fates", "assignment_inconsistencies", "kafka_partition", "kafka_offset")


ALERT_COLUMNS = ("alert_id", "experiment_id", "variant", "guardrail", "kind", "state", "severity", "action",
                 "observed", "threshold", "p_value", "evidence", "event_time", "emitted_time",
                 "kafka_partition", "kafka_offset")


def _control_row(record: dict, partition: int, offset: int, columns: Sequence[str]) -> tuple:
    """A table row from a control-plane record: nested records become tuples (ClickHouse Tuple)."""
    row = {key: [tuple(item.values()) for item in value] if isinstance(value, list) and value and isinstance(value[0], dict)
           else value for key, value in record.items()}
    row.update(kafka_partition=partition, kafka_offset=offset)
    return tuple(row[c] for c in columns)


def _input_lag(consumer: Consumer, input_topics) -> int:
    """Messages on the assigned input partitions beyond the consumer's position."""
    assigned = [tp for tp in consumer.assignment() if tp.topic in input_topics]
    lag = 0
    for tp in consumer.position(assigned) if assigned else []:
        _, high = consumer.get_watermark_offsets(tp, cached=True)
        if tp.offset >= 0 and high >= 0:
            lag += max(0, high - tp.offset)
    return lag


def _next_offsets(messages: Sequence[Message]) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for m in messages:
        key = (m.topic(), m.partition())
        last[key] = max(last.get(key, -1), m.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


class SinkServiceError(RuntimeError):
    """``abstream sink`` cannot start; the message says why and what to change."""


def sink_endpoint_file(settings: Settings) -> Path:
    """Where the process holding the sink role writes its SQL endpoint while it runs."""
    return settings.home / "sink.json"


def run_sink_service(settings: Settings) -> None:
    """``abstream sink``: the sink role in a process of its own, until SIGINT/SIGTERM.

    Why a process of its own: in a worker, the sink thread shares one interpreter lock with
    stage 1 and starved it (sink lag ~27 s at 10,000 events/s in make bench). This process
    serves /metrics, /health and /sql (loopback, read-only) on the web port, like a worker.
    """
    import os
    import signal
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    from urllib.parse import parse_qs, urlsplit

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from streams.codec import schema_source
    from streams.topics import ensure_topics

    ensure_topics(settings)
    settings.home.mkdir(parents=True, exist_ok=True)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            if url.path == "/metrics":
                self._reply(200, generate_latest(), CONTENT_TYPE_LATEST)
            elif url.path == "/health":
                failing = sink.failure is not None
                body = {"status": "failing", "sink": True, "reason": sink.failure} if failing else {"status": "ok", "sink": True}
                self._reply(503 if failing else 200, json.dumps(body).encode())
            elif url.path == "/sql":
                status, body = sql_answer(warehouse, self.client_address[0], query.get("query", ""), query.get("params"))
                self._reply(status, body if isinstance(body, bytes) else json.dumps(body).encode())
            else:
                self._reply(404, b'{"error": "not found"}')

        def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # no access log on stderr
            pass

    try:
        server = ThreadingHTTPServer((settings.web_host, settings.web_port), Handler)
    except OSError as exc:
        raise SinkServiceError(f"cannot serve on {settings.web_host}:{settings.web_port} ({exc.strerror}); "
                               "set --web-port or ABSTREAM_WEB_PORT") from None
    warehouse = Warehouse(settings.clickhouse_dsn, settings.clickhouse_database)
    sink = Sink(settings, warehouse, Codec(schema_source(settings.schema_registry_url)))
    endpoint = sink_endpoint_file(settings)
    sink.start()
    endpoint.write_text(json.dumps({"pid": os.getpid(), "url": f"http://{settings.web_host}:{settings.web_port}"}))

    def stop(*_args) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        sink.stop()
        server.server_close()
        endpoint.unlink(missing_ok=True)


def sql_answer(warehouse: Warehouse | None, remote: str | None, sql: str, params: str | None) -> tuple[int, dict | bytes]:
    """The /sql endpoint of whichever process holds the sink role: read-only SQL on the
    embedded ClickHouse it owns, to loopback clients only. Returns (HTTP status, a JSON
    object or the JSON bytes of the result)."""
    if warehouse is None:
        return 404, {"error": "this worker does not hold the sink role"}
    if not ipaddress.ip_address(remote or "0.0.0.0").is_loopback:
        return 403, {"error": "SQL is served to loopback clients only"}
    try:
        parameters = json.loads(params or "{}")
    except json.JSONDecodeError:
        return 400, {"error": "params must be a JSON object of query parameters"}
    try:
        result = warehouse.query(sql, parameters or None)
    except WarehouseError as exc:
        return 400, {"error": str(exc)}
    return 200, json.dumps({"columns": result.column_names, "rows": result.rows}, default=str).encode()
