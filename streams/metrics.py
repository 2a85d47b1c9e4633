"""Prometheus metrics of a worker, all in one place. Labels are bounded: topic short names,
dead-letter reasons and ClickHouse tables, never units or requests."""
from __future__ import annotations

from prometheus_client import Counter, Histogram, disable_created_metrics

# The *_created series double the output and no rule or dashboard reads them.
disable_created_metrics()

EVENTS_CONSUMED = Counter(
    "abstream_events_consumed_total", "Messages read from the input topics by the stream agents.", ["topic"]
)
EVENTS_DUPLICATE = Counter(
    "abstream_events_duplicate_total", "Valid events dropped because their event_id was already seen.", ["topic"]
)
DEADLETTERS = Counter(
    "abstream_deadletters_total", "Messages sent to the dead-letter topic, by source topic and reason.", ["topic", "reason"]
)
BATCH_EVENTS = Histogram(
    "abstream_batch_events", "Events per batch taken by the stream agent.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
SINK_ROWS = Counter("abstream_sink_rows_total", "Rows written to ClickHouse, by table.", ["table"])
SINK_DUPLICATES = Counter(
    "abstream_sink_duplicates_total", "Rows the sink did not write because the table already held them.", ["table"]
)
SINK_RETRIES = Counter("abstream_sink_retries_total", "Failed ClickHouse writes the sink retried.")
SINK_BATCH_ROWS = Histogram(
    "abstream_sink_batch_rows", "Rows per sink batch.", buckets=(1, 10, 100, 500, 1000, 5000, 10000, 50000)
)
SINK_INSERT_SECONDS = Histogram("abstream_sink_insert_seconds", "Time to check and write one sink batch.")
