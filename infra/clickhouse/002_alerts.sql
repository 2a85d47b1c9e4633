-- Every Alert event (schemas/alert.v1.avsc): guardrail transitions, firing and resolved.
-- (kafka_partition, kafka_offset) identifies an alert on its topic; the sink never writes one twice.

CREATE TABLE IF NOT EXISTS {db}.alerts
(
    alert_id String,
    experiment_id LowCardinality(String),
    variant LowCardinality(String),
    guardrail LowCardinality(String),
    kind LowCardinality(String),
    state LowCardinality(String),
    severity LowCardinality(String),
    action LowCardinality(String),
    observed Nullable(Float64),
    threshold Float64,
    p_value Nullable(Float64),
    evidence String,
    event_time DateTime64(3, 'UTC'),
    emitted_time DateTime64(3, 'UTC'),
    kafka_partition UInt32,
    kafka_offset UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(emitted_time)
ORDER BY (experiment_id, emitted_time);
