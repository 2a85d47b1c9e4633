"""Prometheus metrics of a worker, all in one place. Labels are bounded: topic short names,
dead-letter reasons and ClickHouse tables, never units or requests."""
from __future__ import annotations

import bisect
import gc
import itertools
import threading
import time

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

# The *_created series double the output and no rule or dashboard reads them.
disable_created_metrics()

EVENTS_CONSUMED = Counter(
    "abstream_events_consumed_total", "Messages read from the input topics by the stream agents.", ["topic"]
)
EVENTS_DUPLICATE = Counter(
    "abstream_events_duplicate_total", "Valid events dropped because their event_id was already seen.", ["topic"]
)
EVENTS_IGNORED = Counter(
    "abstream_events_ignored_total",
    "Valid events not counted because their experiment is in draft or stopped, by topic and reason.", ["topic", "reason"]
)
UNITS_OFF_PARTITION = Counter(
    "abstream_units_off_partition_total",
    "Units (per experiment) new to an input partition that Kafka's default partitioner (murmur2 of unit_id) puts "
    "on another one, by the topic that brought them: a producer keys or partitions otherwise, and a unit's events "
    "are split.",
    ["topic"],
)
DEADLETTERS = Counter(
    "abstream_deadletters_total", "Messages sent to the dead-letter topic, by source topic and reason.", ["topic", "reason"]
)
BATCH_EVENTS = Histogram(
    "abstream_batch_events", "Events per batch taken by the stream agent.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000, 10000),
)
BATCH_SECONDS = Histogram(
    "abstream_batch_seconds", "Time to fold one stage-1 batch and get its writes into Kafka.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
BATCH_PHASE_SECONDS = Histogram(
    "abstream_batch_phase_seconds",
    "Time of one phase of a stage-1 batch: fold (decode, fold), state_write (state-log transactions), producer_flush.",
    ["phase"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
BATCH_DELAY_SECONDS = Histogram(
    "abstream_batch_delay_seconds",
    "Age of a stage-1 batch's oldest event (from its Kafka timestamp) once the batch is written.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
SINK_ROWS = Counter("abstream_sink_rows_total", "Rows written to ClickHouse, by table.", ["table"])
SINK_DUPLICATES = Counter(
    "abstream_sink_duplicates_total", "Rows the sink did not write because the table already held them.", ["table"]
)
SINK_FAILURES = Counter("abstream_sink_failures_total", "Times the sink stopped on an unexpected error (see /health).")
SINK_RETRIES = Counter("abstream_sink_retries_total", "Failed ClickHouse writes the sink retried.")
SINK_BATCH_ROWS = Histogram(
    "abstream_sink_batch_rows", "Rows per sink batch.", buckets=(1, 10, 100, 500, 1000, 5000, 10000, 50000)
)
SINK_INSERT_SECONDS = Histogram("abstream_sink_insert_seconds", "Time to check and write one sink batch.")

INPUT_LAG = Gauge(
    "abstream_input_lag_messages", "Messages on the input topics not yet processed by this worker, by role (stage1, sink).", ["role"]
)
SINK_LAG_SECONDS = Gauge(
    "abstream_sink_lag_seconds", "Age of the oldest message of the last sink batch when it reached ClickHouse (0 when caught up)."
)
PREDICTIONS = Counter(
    "abstream_predictions_total", "Predictions per experiment, variant and status (ok, error, timeout).",
    ["experiment", "variant", "status"]
)
class BatchedHistogram:
    """A labelled Prometheus histogram that takes a batch's observations in one call.

    Why: ``Histogram.observe`` takes two mutexes per observation, and stage 1 observed every
    prediction's latency: 15% of a worker's main thread in py-spy (make bench, memory part).
    Stage 1 counts a batch's observations per bucket (:meth:`bucket` is a bisect) and adds them
    once; the exposition is a standard histogram (``_bucket``, ``_sum``, ``_count``).
    """

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...], buckets: tuple[float, ...]):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self.bounds = tuple(buckets)
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()
        REGISTRY.register(self)

    def bucket(self, value: float) -> int:
        """The index of the bucket that counts ``value`` (len(bounds) for +Inf)."""
        return bisect.bisect_left(self.bounds, value)

    def add(self, labels: tuple[str, ...], counts: dict[int, int], total: float) -> None:
        with self._lock:
            mine = self._counts.setdefault(labels, [0] * (len(self.bounds) + 1))
            for index, n in counts.items():
                mine[index] += n
            self._sums[labels] = self._sums.get(labels, 0.0) + total

    def collect(self):
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        with self._lock:
            for labels, counts in self._counts.items():
                cumulative = list(itertools.accumulate(counts))
                bounds = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
                family.add_metric(list(labels), list(zip(bounds, cumulative)), self._sums[labels])
        yield family

    def describe(self):
        yield HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)


PREDICTION_LATENCY = BatchedHistogram(
    "abstream_prediction_latency_seconds", "Model latency reported by prediction events.", ("experiment", "variant"),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0),
)
PARTIALS_STALE = Counter(
    "abstream_partials_stale_total",
    "Partials stage 2 did not take because it held a newer one of their source partition (read again after a "
    "rebalance or a restart, or come late from the partition's last owner).",
)
EVALUATION_ERRORS = Counter(
    "abstream_evaluation_errors_total", "Looks at an experiment that failed with an error (see the worker log).", ["experiment"]
)
REGISTRY_ERRORS = Counter(
    "abstream_registry_errors_total", "Promotions the model registry hook failed to record (see the worker log)."
)
ALERTS = Counter(
    "abstream_alerts_total", "Guardrail alerts raised (state transitions, not repeats).", ["experiment", "guardrail", "severity"]
)
KILLSWITCH = Counter("abstream_killswitch_total", "Kill-switch events published, by action.", ["experiment", "action"])
UNIT_STATES = Gauge("abstream_unit_states", "Unit states (experiment x unit) held by this worker's stage 1.")
STATE_WRITE_FAILURES = Counter(
    "abstream_state_write_failures_total",
    "Stage-1 state-log transactions Kafka did not take (per partition); that batch of the partition is read again."
)
INPUT_HELD_BACK = Counter(
    "abstream_input_held_back_total",
    "Input messages fetched for a partition this worker could not claim (its stage-1 state unreadable, the broker "
    "away), left unacknowledged; the partition is then paused until a claim succeeds.",
)
STATE_UNREADABLE = Gauge(
    "abstream_state_unreadable",
    "1 while this worker cannot apply an input partition's stage-1 state log (its messages wait, unprocessed).",
    ["partition"],
)
SCHEMA_REGISTRY_UNAVAILABLE = Gauge(
    "abstream_schema_registry_unavailable",
    "1 while the schema registry cannot say what a schema id of the input is, or register the schema of what "
    "stage 2 writes (role decisions): what needs it waits, unprocessed.",
    ["role"],
)
SINK_LAST_WRITE = Gauge("abstream_sink_last_write_timestamp_seconds", "Unix time of the sink's last successful write.")
SHADOW_DISAGREEMENT = Gauge(
    "abstream_shadow_disagreement_ratio", "Share of compared shadow runs where the challenger disagrees with the champion.",
    ["experiment", "challenger"]
)
DRIFT_PSI = Gauge("abstream_drift_psi", "PSI of a variant's score distribution, latest hour against the first.", ["experiment", "variant"])
EXPERIMENT_DECISION_TIME = Gauge(
    "abstream_experiment_decision_timestamp_seconds", "Unix time of the experiment's last decision on this worker.", ["experiment"]
)
EXPERIMENT_CONTROL = Gauge("abstream_experiment_control", "1 on the experiment's control variant.", ["experiment", "variant"])
EXPERIMENT_WEIGHT = Gauge("abstream_experiment_weight", "Current allocation weight per experiment and variant.", ["experiment", "variant"])
EXPERIMENT_UNITS = Gauge("abstream_experiment_units", "Units exposed per experiment and variant.", ["experiment", "variant"])
EXPERIMENT_LIFT = Gauge("abstream_experiment_lift", "Relative lift of the primary metric against control.", ["experiment", "variant"])
EXPERIMENT_LIFT_LOW = Gauge("abstream_experiment_lift_ci_low", "Lower end of the lift's always-valid interval.", ["experiment", "variant"])
EXPERIMENT_LIFT_HIGH = Gauge("abstream_experiment_lift_ci_high", "Upper end of the lift's always-valid interval.", ["experiment", "variant"])
EXPERIMENT_P_VALUE = Gauge("abstream_experiment_p_value", "Always-valid p-value of the primary metric.", ["experiment", "variant"])
EXPERIMENT_SRM_P_VALUE = Gauge("abstream_experiment_srm_p_value", "Sequential sample-ratio-mismatch p-value.", ["experiment"])
EXPERIMENT_SRM_FLAG = Gauge("abstream_experiment_srm_flag", "1 while the experiment's sample ratio mismatches.", ["experiment"])
EXPERIMENT_VERDICT = Gauge("abstream_experiment_verdict", "1 for the experiment's current verdict, 0 for the others.", ["experiment", "verdict"])
EXPERIMENT_OUTCOMES = Gauge("abstream_experiment_outcomes", "Outcomes of the experiment by fate (attributed, late, ...).", ["experiment", "fate"])
EXPERIMENT_INCONSISTENCIES = Gauge(
    "abstream_experiment_assignment_inconsistencies", "Assignments or predictions naming another variant than the unit's.", ["experiment"]
)
GC_PAUSE_SECONDS = Histogram(
    "abstream_gc_pause_seconds", "Pauses of Python's cyclic garbage collector in a worker, by generation.",
    ["generation"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
)
_VERDICTS = ("continue", "ship", "stop_harm", "inconclusive")


def observe_decision(record: dict, control: str) -> None:
    """Set the experiment gauges from a Decision record (labels: experiments and variants only)."""
    experiment = record["experiment_id"]
    EXPERIMENT_DECISION_TIME.labels(experiment).set(record["decision_time"] / 1000)
    EXPERIMENT_CONTROL.labels(experiment, control).set(1)
    for v in record["variants"]:
        EXPERIMENT_UNITS.labels(experiment, v["variant"]).set(v["units"])
        EXPERIMENT_WEIGHT.labels(experiment, v["variant"]).set(v["weight"])
    for c in record["comparisons"]:
        if c["primary"] and c["lift"] is not None:
            EXPERIMENT_LIFT.labels(experiment, c["variant"]).set(c["lift"])
            EXPERIMENT_LIFT_LOW.labels(experiment, c["variant"]).set(c["ci_low"])
            EXPERIMENT_LIFT_HIGH.labels(experiment, c["variant"]).set(c["ci_high"])
            EXPERIMENT_P_VALUE.labels(experiment, c["variant"]).set(c["p_value"])
    if record["srm_p_value"] is not None:
        EXPERIMENT_SRM_P_VALUE.labels(experiment).set(record["srm_p_value"])
    EXPERIMENT_SRM_FLAG.labels(experiment).set(1 if record["srm_flag"] else 0)
    for verdict in _VERDICTS:
        EXPERIMENT_VERDICT.labels(experiment, verdict).set(1 if record["verdict"] == verdict else 0)
    for fate, count in record["outcome_fates"].items():
        EXPERIMENT_OUTCOMES.labels(experiment, fate).set(count)
    EXPERIMENT_INCONSISTENCIES.labels(experiment).set(record["assignment_inconsistencies"])


_GC_GENERATIONS = ("0", "1", "2")
_gc_started = 0.0


def _on_gc(phase: str, info: dict) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    else:
        GC_PAUSE_SECONDS.labels(_GC_GENERATIONS[info["generation"]]).observe(time.perf_counter() - _gc_started)


def watch_gc_pauses() -> None:
    """Observe every collection's pause in GC_PAUSE_SECONDS. A full collection stops the event
    loop for as long as it scans every tracked object: it was the cause of late decisions once
    (unit states as objects, bench/PROFILE.md), and this is how a deployment sees it again."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
