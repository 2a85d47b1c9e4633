-- Raw events, one table per event kind, columns named as the Avro fields, then where the
-- sink read the event.
-- Applied idempotently at sink start; {db} is the database from ABSTREAM_CLICKHOUSE_DATABASE.
-- Order keys put the experiment first: analysts filter by experiment, then unit, then time.
-- (kafka_partition, kafka_offset) is the input topic's partition and offset: the sink's
-- exactly-once ledger is rebuilt from them after a restart (see streams/sink.py); -1 in rows
-- written by versions that did not keep them.

CREATE DATABASE IF NOT EXISTS {db};

CREATE TABLE IF NOT EXISTS {db}.assignments
(
    event_id String,
    event_time DateTime64(3, 'UTC'),
    experiment_id LowCardinality(String),
    unit_id String,
    variant LowCardinality(String),
    allocation_version Int64,
    segment Map(LowCardinality(String), String),
    kafka_partition Int32 DEFAULT -1,
    kafka_offset Int64 DEFAULT -1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (experiment_id, unit_id, event_time);

-- Assignment v2 widened allocation_version to long; tables made before keep working after this.
ALTER TABLE {db}.assignments MODIFY COLUMN allocation_version Int64;

CREATE TABLE IF NOT EXISTS {db}.predictions
(
    event_id String,
    event_time DateTime64(3, 'UTC'),
    experiment_id LowCardinality(String),
    unit_id String,
    request_id String,
    variant LowCardinality(String),
    model_name LowCardinality(String),
    model_version LowCardinality(String),
    score Nullable(Float64),
    label Nullable(String),
    latency_ms Float64,
    status LowCardinality(String),
    kafka_partition Int32 DEFAULT -1,
    kafka_offset Int64 DEFAULT -1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (experiment_id, unit_id, event_time);

CREATE TABLE IF NOT EXISTS {db}.shadow
(
    event_id String,
    event_time DateTime64(3, 'UTC'),
    experiment_id LowCardinality(String),
    unit_id String,
    request_id String,
    champion_model LowCardinality(String),
    champion_version LowCardinality(String),
    challenger_model LowCardinality(String),
    challenger_version LowCardinality(String),
    champion_score Nullable(Float64),
    challenger_score Nullable(Float64),
    champion_label Nullable(String),
    challenger_label Nullable(String),
    champion_latency_ms Float64,
    challenger_latency_ms Nullable(Float64),
    challenger_status LowCardinality(String),
    kafka_partition Int32 DEFAULT -1,
    kafka_offset Int64 DEFAULT -1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (experiment_id, unit_id, event_time);

CREATE TABLE IF NOT EXISTS {db}.outcomes
(
    event_id String,
    event_time DateTime64(3, 'UTC'),
    experiment_id LowCardinality(String),
    unit_id String,
    metric LowCardinality(String),
    value Float64,
    request_id Nullable(String),
    kafka_partition Int32 DEFAULT -1,
    kafka_offset Int64 DEFAULT -1
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(event_time)
ORDER BY (experiment_id, unit_id, event_time);

-- Tables made before the sink kept Kafka coordinates get them (and keep working).
ALTER TABLE {db}.assignments ADD COLUMN IF NOT EXISTS kafka_partition Int32 DEFAULT -1;
ALTER TABLE {db}.assignments ADD COLUMN IF NOT EXISTS kafka_offset Int64 DEFAULT -1 AFTER kafka_partition;
ALTER TABLE {db}.predictions ADD COLUMN IF NOT EXISTS kafka_partition Int32 DEFAULT -1;
ALTER TABLE {db}.predictions ADD COLUMN IF NOT EXISTS kafka_offset Int64 DEFAULT -1 AFTER kafka_partition;
ALTER TABLE {db}.shadow ADD COLUMN IF NOT EXISTS kafka_partition Int32 DEFAULT -1;
ALTER TABLE {db}.shadow ADD COLUMN IF NOT EXISTS kafka_offset Int64 DEFAULT -1 AFTER kafka_partition;
ALTER TABLE {db}.outcomes ADD COLUMN IF NOT EXISTS kafka_partition Int32 DEFAULT -1;
ALTER TABLE {db}.outcomes ADD COLUMN IF NOT EXISTS kafka_offset Int64 DEFAULT -1 AFTER kafka_partition;

-- Every message that could not be decoded or validated, with its original bytes.
-- (topic, partition, offset) identifies it; the sink never writes one twice.
CREATE TABLE IF NOT EXISTS {db}.deadletter
(
    topic LowCardinality(String),
    partition UInt32,
    offset UInt64,
    reason LowCardinality(String),
    detail String,
    key Nullable(String),
    payload String,
    received_time DateTime64(3, 'UTC')
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(received_time)
ORDER BY (topic, partition, offset);
