-- Every Decision event (schemas/decision.v1.avsc) the workers published: the history of
-- each experiment's statistics and verdicts. (kafka_partition, kafka_offset) identifies a
-- decision on its topic; the sink never writes one twice.

CREATE TABLE IF NOT EXISTS {db}.decisions
(
    experiment_id LowCardinality(String),
    config_version Int32,
    decision_time DateTime64(3, 'UTC'),
    watermark_time DateTime64(3, 'UTC'),
    runtime_s Float64,
    verdict LowCardinality(String),
    verdict_variant Nullable(String),
    reason String,
    method LowCardinality(String),
    alpha Float64,
    variants Array(Tuple(variant String, units Int64, weight Float64)),
    comparisons Array(Tuple(
        metric String, primary Bool, variant String,
        control_mean Nullable(Float64), treatment_mean Nullable(Float64),
        lift Nullable(Float64), ci_low Nullable(Float64), ci_high Nullable(Float64),
        p_value Nullable(Float64), adjusted_p_value Nullable(Float64),
        chance_to_win Nullable(Float64), risk_control Nullable(Float64), risk_treatment Nullable(Float64))),
    statistics Array(Tuple(metric String, variant String, units Int64, sums Array(Float64))),
    srm_p_value Nullable(Float64),
    srm_flag Bool,
    outcome_fates Map(LowCardinality(String), Int64),
    assignment_inconsistencies Int64,
    kafka_partition UInt32,
    kafka_offset UInt64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(decision_time)
ORDER BY (experiment_id, decision_time);
