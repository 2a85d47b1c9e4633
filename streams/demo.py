"""``abstream demo``: a simulated production day over five experiments, each telling one story.

1. ``ranker-canary``: a better challenger under a canary plan (5% -> 25% -> 50% -> 100%) is
   promoted; the always-valid test says ``ship`` on the way, and the view shows the units it
   took beside the fixed-horizon sample size (planned MDE and true effect).
2. ``ranker-latency``: the challenger's latency triples at midday; the p95 guardrail fires,
   the engine kills it, and the simulated router (``streams.client.Router``, following the
   kill-switch and allocation topics) stops sending it traffic.
3. ``ranker-shadow``: a challenger in shadow disagrees with the champion on Android users;
   the shadow guardrail fires.
4. ``ranker-aa``: an A/A test watched continuously never declares a winner, beside a count
   of how often naive peeking (a fixed-horizon z test at every look) would have.
5. ``ranker-srm``: a router deployed with stale 55/45 weights on a 50/50 experiment; the
   sample-ratio-mismatch guardrail fires.

Every run gets a run id; its topics live under the prefix ``demo-<run>.`` and its
ClickHouse tables in the database ``demo_<run>``, so that runs never see each other's
events, consumer groups, engine state or rows, and the experiment ids can stay readable.
Event time runs from 2026-01-01 00:00 UTC, ``speed`` times faster than the wall clock, and
events are published in event-time order, one small step at a time, so the engine sees
time pass (canary steps and attribution windows are in event time).
"""
from __future__ import annotations

import heapq
import json
import logging
import math
import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from streams.codec import Codec, ControlKind, DeadLetter, EventKind, SchemaRegistryUnavailable, schema_source
from streams.settings import Settings

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, the simulated day's midnight
DAY_S = 86_400
WINDOW_S = 3_600
CANARY, LATENCY, SHADOW, AA, SRM = "ranker-canary", "ranker-latency", "ranker-shadow", "ranker-aa", "ranker-srm"
EXPERIMENTS = (CANARY, LATENCY, SHADOW, AA, SRM)
STORIES = {
    CANARY: "better ranker, canary 5>25>50>100%",
    LATENCY: "latency regression at noon",
    SHADOW: "shadow v3 disagrees on Android",
    AA: "A/A, watched continuously",
    SRM: "router with stale 55/45 weights",
}
CANARY_STEPS = (0.05, 0.25, 0.5, 1.0)
CANARY_PLANNED_MDE = 0.15
TRUE_RATES = {CANARY: (0.10, 0.15)}


class DemoError(Exception):
    """Something the user can fix stopped the demo; the message is one line."""


@dataclass(frozen=True)
class Pace:
    """How fast and how big: units per simulated second per experiment are ``rates`` x ``scale``."""

    wall_s: float  # wall seconds for the simulated day
    scale: float
    step_wall_s: float = 0.5
    canary_min_step_s: int = 3 * 3600
    seed: int = 7

    @property
    def speed(self) -> float:
        return DAY_S / self.wall_s


FULL = Pace(wall_s=170.0, scale=1.0)
SHORT = Pace(wall_s=45.0, scale=0.45)
RATES_PER_S = {CANARY: 0.2, LATENCY: 0.1, SHADOW: 0.05, AA: 0.1, SRM: 0.1}


# ------------------------------------------------------------------------------ experiments

def experiment_configs(pace: Pace) -> list:
    """The five experiments, started (status running)."""
    from streams.experiments import ExperimentConfig, start

    # The implicit drift guardrail compares the latest (partial) hour of scores with the first;
    # with the few hundred scores an hour these experiments see, 20-bin PSI noise alone is
    # about 0.2, so the demo asks for more scores before judging drift.
    drift = {"kind": "drift", "threshold": 0.2, "min_count": 1500}
    common = {"primary_metric": {"name": "conversion", "kind": "binary"}, "attribution_window_s": WINDOW_S,
              "min_sample_per_variant": 200}
    mappings = [
        {"experiment_id": CANARY, "description": STORIES[CANARY],
         "variants": [{"name": "control", "model_name": "ranker", "model_version": "v1"},
                      {"name": "challenger", "model_name": "ranker", "model_version": "v2"}],
         "allocation": "canary", "canary_steps": list(CANARY_STEPS), "canary_min_step_s": pace.canary_min_step_s,
         "canary_min_step_sample": 50, "mde": CANARY_PLANNED_MDE, "guardrails": [drift], **common},
        {"experiment_id": LATENCY, "description": STORIES[LATENCY],
         "variants": [{"name": "control", "model_name": "ranker", "model_version": "v1"},
                      {"name": "challenger", "model_name": "ranker", "model_version": "v2-fast"}],
         "guardrails": [{"name": "p95_latency", "kind": "latency_p95", "threshold": 1.5, "relative_to_control": True,
                         "min_count": 200, "action": "kill"}, drift], **common},
        {"experiment_id": SHADOW, "description": STORIES[SHADOW],
         # A shadow deployment: the champion serves every unit, the challenger only runs beside it.
         "variants": [{"name": "champion", "weight": 1.0, "model_name": "ranker", "model_version": "v1"},
                      {"name": "challenger", "weight": 1e-9, "model_name": "ranker", "model_version": "v3"}],
         "guardrails": [drift], **common},
        {"experiment_id": AA, "description": STORIES[AA],
         "variants": [{"name": "control", "model_name": "ranker", "model_version": "v1"},
                      {"name": "treatment", "model_name": "ranker", "model_version": "v1"}],
         "guardrails": [drift], **common},
        {"experiment_id": SRM, "description": STORIES[SRM],
         "variants": [{"name": "control", "model_name": "ranker", "model_version": "v1"},
                      {"name": "treatment", "model_name": "ranker", "model_version": "v1.1"}],
         "guardrails": [drift], **common},
    ]
    return [start(ExperimentConfig.from_mapping(m)) for m in mappings]


# ------------------------------------------------------------------------------ simulation

@dataclass
class Traffic:
    """What the simulated routers did: exposures per variant, in total and per simulated hour."""

    units: dict[str, dict[str, int]] = field(default_factory=dict)
    by_hour: dict[str, dict[int, dict[str, int]]] = field(default_factory=dict)
    published: dict[str, int] = field(default_factory=lambda: {k.value: 0 for k in EventKind})

    def expose(self, experiment_id: str, variant: str, t_ms: int) -> None:
        per = self.units.setdefault(experiment_id, {})
        per[variant] = per.get(variant, 0) + 1
        hour = (t_ms - START_MS) // 3_600_000
        slot = self.by_hour.setdefault(experiment_id, {}).setdefault(hour, {})
        slot[variant] = slot.get(variant, 0) + 1


class Day:
    """The simulated day's events, generated one step of event time at a time.

    Units arrive as Poisson processes; each is assigned by the router (sticky hashing that
    follows kill switches and allocations), makes predictions, and may convert after a lag.
    Events scheduled for later (predictions, conversions) wait in a heap until their time.
    """

    def __init__(self, router, pace: Pace, run_id: str):
        from streams.client import assigner

        self.router = router
        self.pace = pace
        self.run_id = run_id
        self.rng = np.random.default_rng(pace.seed)
        self.pending: list[tuple[int, int, EventKind, dict]] = []
        self.sequence = 0
        self.next_unit = {e: 0 for e in EXPERIMENTS}
        self.traffic = Traffic()
        # The assignment bug: this router was deployed with last month's 55/45 weights.
        self.stale = assigner({"control": 0.55, "treatment": 0.45}, salt=SRM, control="control")
        self.kill_seen_ms: int | None = None
        self.last_ms: dict[str, int] = {}
        self.allocations_seen: dict[str, list[int]] = {}

    def _push(self, t_ms: int, kind: EventKind, record: dict) -> None:
        self.sequence += 1
        record = {"event_id": f"{self.run_id}-{self.sequence}", "event_time": int(t_ms), **record}
        heapq.heappush(self.pending, (int(t_ms), self.sequence, kind, record))

    def step(self, t0_ms: int, t1_ms: int) -> list[tuple[EventKind, dict]]:
        """Every event with event time in [t0, t1), in event-time order."""
        if self.kill_seen_ms is None and self.router.weights(LATENCY).get("challenger", 1.0) == 0.0:
            self.kill_seen_ms = t0_ms
        for experiment_id in EXPERIMENTS:
            rate = RATES_PER_S[experiment_id] * self.pace.scale
            arrivals = self.rng.poisson(rate * (t1_ms - t0_ms) / 1000)
            for t in np.sort(self.rng.integers(t0_ms, t1_ms, size=arrivals)):
                self._unit(experiment_id, int(t))
        out = []
        while self.pending and self.pending[0][0] < t1_ms:
            _, _, kind, record = heapq.heappop(self.pending)
            out.append((kind, record))
            self.traffic.published[kind.value] += 1
            self.last_ms[record["experiment_id"]] = record["event_time"]
        return out

    def _allocation_number(self, experiment_id: str) -> int:
        # Allocation versions are publication times (ms) and do not fit the exposure's
        # 32-bit allocation_version: the exposure carries the allocation's ordinal instead.
        allocation = self.router.control.allocation(experiment_id)
        seen = self.allocations_seen.setdefault(experiment_id, [])
        if allocation is not None and (not seen or seen[-1] != allocation.version):
            seen.append(allocation.version)
        return len(seen)

    def _unit(self, experiment_id: str, t: int) -> None:
        rng = self.rng
        i = self.next_unit[experiment_id]
        self.next_unit[experiment_id] += 1
        unit = f"{experiment_id}-u{i:06d}"
        segment = {"country": str(rng.choice(("de", "fr", "us"))), "platform": str(rng.choice(("ios", "android", "web")))}
        if experiment_id == SRM:
            variant = self.stale.variant_for(unit)
        else:
            variant = self.router.variant_for(experiment_id, unit)
        self.traffic.expose(experiment_id, variant, t)
        base = {"experiment_id": experiment_id, "unit_id": unit}
        self._push(t, EventKind.ASSIGNMENT, {**base, "variant": variant, "segment": segment,
                                             "allocation_version": self._allocation_number(experiment_id)})
        model = self.router.model_of(experiment_id, variant)
        day_share = (t - START_MS) / (DAY_S * 1000)
        slow = 3.0 if experiment_id == LATENCY and variant == "challenger" and day_share >= 0.5 else 1.0
        for r in range(2 if experiment_id == LATENCY else 1):
            tp = t + int(rng.integers(0, 30_000))
            failed = rng.random() < 0.003
            score = None if failed else float(rng.random())
            self._push(tp, EventKind.PREDICTION, {
                **base, "request_id": f"{unit}-r{r}", "variant": variant, "model_name": model.name,
                "model_version": model.version, "score": score, "label": None,
                "latency_ms": float(rng.lognormal(math.log(40.0 * slow), 0.25)),
                "status": "error" if failed else "ok"})
            if experiment_id == SHADOW and score is not None:
                flip = segment["platform"] == "android" and rng.random() < 0.3
                challenger = 1.0 - score if flip else float(np.clip(score + rng.normal(0, 0.02), 0, 1))
                if not flip and (challenger >= 0.5) != (score >= 0.5):
                    challenger = score
                self._push(tp + 5, EventKind.SHADOW, {
                    **base, "request_id": f"{unit}-r{r}", "champion_model": "ranker", "champion_version": "v1",
                    "challenger_model": "ranker", "challenger_version": "v3", "champion_score": score,
                    "challenger_score": challenger, "champion_label": None, "challenger_label": None,
                    "champion_latency_ms": float(rng.lognormal(math.log(40.0), 0.25)),
                    "challenger_latency_ms": float(rng.lognormal(math.log(46.0), 0.25)), "challenger_status": "ok"})
        rates = TRUE_RATES.get(experiment_id, (0.10, 0.10))
        rate = rates[1] if variant == "challenger" else rates[0]
        if rng.random() < rate:
            lag_ms = int(1000 * min(rng.exponential(600.0), WINDOW_S * 0.95))
            self._push(t + lag_ms, EventKind.OUTCOME, {**base, "metric": "conversion", "value": 1.0, "request_id": None})


# ------------------------------------------------------------------------------ control plane

class ControlPlaneLog:
    """Decisions, alerts, kill switches and allocations, read from their topics as they come
    (every record kept, in order) by a background thread."""

    def __init__(self, settings: Settings):
        from streams.topics import ALERTS, ALLOCATIONS, DECISIONS, KILLSWITCH

        self.settings = settings
        self.kinds = {settings.topic(DECISIONS): ControlKind.DECISION, settings.topic(ALERTS): ControlKind.ALERT,
                      settings.topic(KILLSWITCH): ControlKind.KILLSWITCH,
                      settings.topic(ALLOCATIONS): ControlKind.ALLOCATION}
        self.records: dict[ControlKind, list[dict]] = {k: [] for k in self.kinds.values()}
        self.lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "ControlPlaneLog":
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        consumer = Consumer(self.settings.kafka_config(**{
            "group.id": f"{self.settings.topic_prefix}demo-view", "enable.auto.commit": "false",
            "logger": _quiet_log}))
        metadata = consumer.list_topics(timeout=10).topics
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t in self.kinds for p in metadata[t].partitions])
        self._thread = threading.Thread(target=self._follow, args=(consumer,), name="demo-view", daemon=True)
        self._thread.start()
        return self

    def _follow(self, consumer) -> None:
        codec = Codec(schema_source(self.settings.schema_registry_url))
        try:
            while not self._stopping.is_set():
                for msg in consumer.consume(500, 0.2):
                    if msg.error() is not None or msg.value() is None:
                        continue
                    kind = self.kinds[msg.topic()]
                    record = self._decode(codec, kind, msg.value())
                    if record is not None and not isinstance(record, DeadLetter):
                        with self.lock:
                            self.records[kind].append(record)
        finally:
            consumer.close()

    def _decode(self, codec: Codec, kind: ControlKind, value: bytes) -> dict | DeadLetter | None:
        """The record, waiting while the schema registry does not answer (None: stopping)."""
        while True:
            try:
                return codec.decode(kind, value)
            except SchemaRegistryUnavailable:
                if self._stopping.wait(1.0):
                    return None

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)

    def of(self, kind: ControlKind, experiment_id: str) -> list[dict]:
        with self.lock:
            return [r for r in self.records[kind] if r["experiment_id"] == experiment_id]

    def latest_decision(self, experiment_id: str) -> dict | None:
        decisions = self.of(ControlKind.DECISION, experiment_id)
        return max(decisions, key=lambda d: d["decision_time"]) if decisions else None


_quiet_log = logging.getLogger("streams.demo.librdkafka")


def naive_z_p_value(decision: dict) -> float | None:
    """Two-sided p of a plain fixed-horizon two-proportion z test (pooled) on the primary
    metric's statistics of a decision: what a naive peek at this look would conclude."""
    stats = {s["variant"]: s for s in decision["statistics"] if s["metric"] == "conversion"}
    if len(stats) != 2:
        return None
    (a, b) = stats.values()
    n1, n2 = a["units"], b["units"]
    if min(n1, n2) < 1:
        return None
    x1, x2 = a["sums"][0], b["sums"][0]
    pooled = (x1 + x2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return None
    z = (x2 / n2 - x1 / n1) / se
    return math.erfc(abs(z) / math.sqrt(2))


@dataclass(frozen=True)
class ShipPoint:
    units: int
    challenger_share: float
    time_ms: int
    fixed_true: int
    fixed_planned: int


def first_ship(decisions: list[dict]) -> ShipPoint | None:
    """The first ``ship`` decision of the canary, with the fixed-horizon sample sizes
    (analysis.planning.sample_size, alpha 0.05, power 0.8, the same challenger share) for
    the true effect and for the planned MDE."""
    from analysis.planning import sample_size

    for d in sorted(decisions, key=lambda d: d["decision_time"]):
        if d["verdict"] == "ship":
            units = {v["variant"]: v["units"] for v in d["variants"]}
            total = sum(units.values())
            share = units.get("challenger", 0) / total
            p0, p1 = TRUE_RATES[CANARY]
            fixed_true = sample_size(p0, p1 / p0 - 1, treatment_share=share).n_total
            fixed_planned = sample_size(p0, CANARY_PLANNED_MDE, treatment_share=share).n_total
            return ShipPoint(total, share, d["watermark_time"], fixed_true, fixed_planned)
    return None


def peeking(decisions: list[dict]) -> tuple[int, int]:
    """(looks at which naive peeking would have declared a winner, looks)."""
    ps = [naive_z_p_value(d) for d in decisions]
    ps = [p for p in ps if p is not None]
    return sum(p < 0.05 for p in ps), len(ps)


# ------------------------------------------------------------------------------ processes

def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers_as_kafka(bootstrap: str) -> bool | None:
    """True if a Kafka broker answers; None if nothing listens; False if something else does."""
    host, port = bootstrap.split(",")[0].rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            pass
    except OSError:
        return None
    from confluent_kafka.admin import AdminClient

    try:
        return bool(AdminClient({"bootstrap.servers": bootstrap, "logger": _quiet_log}).list_topics(timeout=8).brokers)
    except Exception:  # noqa: BLE001 - any failure means "not a Kafka broker we can use"
        return False


@dataclass
class Started:
    """Everything the demo started, so that it can stop exactly that."""

    workers: list[subprocess.Popen] = field(default_factory=list)
    broker_dir: Path | None = None

    def stop(self) -> None:
        from streams import local_kafka

        for w in self.workers:
            if w.poll() is None:
                try:
                    os.killpg(w.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 8  # then SIGKILL: an interrupted demo must end promptly
        for w in self.workers:
            try:
                w.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(w.pid, signal.SIGKILL)
                w.wait()
        if self.broker_dir is not None:
            local_kafka.stop(data_dir=self.broker_dir, timeout_s=10)


def _start_broker(settings: Settings, started: Started, say) -> None:
    from streams import local_kafka

    answer = _answers_as_kafka(settings.kafka_bootstrap)
    if answer:
        say(f"kafka: using the broker at {settings.kafka_bootstrap}")
        return
    host, port = settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)
    if answer is False:
        raise DemoError(f"something listens on {host}:{port} but does not answer as a Kafka broker; "
                        "stop it, or point ABSTREAM_KAFKA_BOOTSTRAP at a broker")
    if host not in ("127.0.0.1", "localhost"):
        raise DemoError(f"no Kafka broker answers at {settings.kafka_bootstrap}; start it, or unset "
                        "ABSTREAM_KAFKA_BOOTSTRAP to let the demo start a local one")
    data_dir = settings.home / "kafka"
    say(f"kafka: starting a local broker on port {port} (data in {data_dir})")
    started.broker_dir = data_dir  # set first: an interrupted start is still stopped
    status = local_kafka.start(data_dir=data_dir, port=int(port))
    say(f"kafka: broker up at {status.bootstrap} (pid {status.pid})")


def _start_workers(settings: Settings, started: Started, say) -> tuple[Settings, Settings]:
    from streams.processes import start_worker, wait_healthy
    from streams.sink import sink_endpoint_file

    endpoint = sink_endpoint_file(settings)
    if settings.embedded_clickhouse and endpoint.exists():
        try:
            owner = json.loads(endpoint.read_text())
            os.kill(owner["pid"], 0)
            raise DemoError(f"a worker with the sink role (pid {owner['pid']}) holds the embedded ClickHouse in "
                            f"{settings.chdb_path}; stop it first (the demo runs its own)")
        except (ProcessLookupError, ValueError, KeyError):
            pass
    ports = [p for p in (settings.web_port, settings.web_port + 1) if _port_free(p)]
    while len(ports) < 2:
        ports.append(_free_port())
    sink_settings, plain_settings = replace(settings, web_port=ports[0]), replace(settings, web_port=ports[1])
    logs = [settings.home / f"demo-worker-{i}.log" for i in (1, 2)]
    for s, sink, log in ((sink_settings, True, logs[0]), (plain_settings, False, logs[1])):
        started.workers.append(start_worker(s, sink=sink, log_path=log))
    for s, w, log in zip((sink_settings, plain_settings), started.workers, logs):
        try:
            wait_healthy(s, w, timeout_s=90)
        except RuntimeError as exc:
            raise DemoError(f"{exc}; see {log}") from None
    say(f"workers: two up (sink + ClickHouse on :{ports[0]}, stage 1/2 on both; metrics on :{ports[0]} and "
        f":{ports[1]}); logs {logs[0].parent}/demo-worker-*.log")
    return sink_settings, plain_settings


# ------------------------------------------------------------------------------ the run

def queries(database: str) -> list[tuple[str, str]]:
    """(what it shows, SQL) of the queries printed at the end; each runs as printed."""
    return [
        ("the killed challenger's traffic, per simulated hour",
         f"SELECT toStartOfHour(event_time) AS hour, countIf(variant = 'control') AS control, "
         f"countIf(variant = 'challenger') AS challenger FROM {database}.assignments "
         f"WHERE experiment_id = '{LATENCY}' GROUP BY hour ORDER BY hour"),
        ("shadow disagreement by platform",
         f"SELECT e.segment['platform'] AS platform, count() AS compared, round(avg(s.disagree), 3) AS disagreement "
         f"FROM {database}.shadow_pairs AS s INNER JOIN {database}.exposures AS e "
         f"ON s.experiment_id = e.experiment_id AND s.unit_id = e.unit_id "
         f"WHERE s.experiment_id = '{SHADOW}' AND s.compared GROUP BY platform ORDER BY platform"),
        ("every alert of the run",
         f"SELECT event_time, experiment_id, guardrail, variant, state, round(observed, 4) AS observed, threshold "
         f"FROM {database}.alerts ORDER BY event_time"),
    ]


def run_demo(settings: Settings, *, short: bool = False, out: Path | None = None) -> int:
    """Run the demo; return the exit code. Raises DemoError (one line) for what a user can fix."""
    from rich.console import Console

    console = Console()
    pace = SHORT if short else FULL
    run_id = time.strftime("%Y%m%d%H%M%S", time.gmtime()) + secrets.token_hex(2)
    settings = replace(settings, topic_prefix=f"demo-{run_id}.", clickhouse_database=f"demo_{run_id}")
    out = Path(out) if out else Path("reports") / f"demo-{run_id}"
    settings.home.mkdir(parents=True, exist_ok=True)
    # Client warnings (librdkafka retries while the broker warms up) go to a log, not over the view.
    log_handler = logging.FileHandler(settings.home / "demo.log")
    log_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logging.getLogger("streams").addHandler(log_handler)
    started = Started()
    say = console.print
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)
    t_begin = time.monotonic()
    try:
        say(f"[bold]abstream demo[/] run {run_id}: topics demo-{run_id}.*, ClickHouse database demo_{run_id}")
        _start_broker(settings, started, say)
        code = _run(settings, pace, run_id, out, started, console)
        say(f"finished in {time.monotonic() - t_begin:.0f} s; stopping what the demo started")
        return code
    except KeyboardInterrupt:
        pass  # the clean-up below runs, then the one-line report of what was stopped
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the clean-up
        started.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, previous)
        logging.getLogger("streams").removeHandler(log_handler)
    if not console.is_terminal:
        console.print()  # the live view's last frame ends without a newline off a terminal
    what = [f"{len(started.workers)} workers"] + (["the Kafka broker"] if started.broker_dir else [])
    print(f"abstream: demo interrupted; stopped the {' and '.join(what)} it started", flush=True)
    return 130


def _interrupt(*_) -> None:
    raise KeyboardInterrupt


def _run(settings: Settings, pace: Pace, run_id: str, out: Path, started: Started, console) -> int:
    from rich.live import Live

    from streams.client import EventPublisher, Router
    from streams.experiments import publish_config
    from streams.live import render
    from streams.topics import ensure_topics

    ensure_topics(settings)
    configs = {c.experiment_id: c for c in experiment_configs(pace)}
    for c in configs.values():
        publish_config(settings, c)
    sink_settings, _ = _start_workers(settings, started, console.print)
    publisher = EventPublisher(settings, max_block_s=10.0)
    router = Router(settings, publisher=publisher, exposures="never").start(create_topics=False)
    view = ControlPlaneLog(settings).start()
    day = Day(router, pace, run_id)
    end_ms = START_MS + DAY_S * 1000
    step_ms = int(pace.step_wall_s * pace.speed * 1000)
    sim_ms = START_MS
    wall0 = time.monotonic()
    try:
        with Live(render(day, view, configs, sim_ms, end_ms, pace), console=console, refresh_per_second=4,
                  transient=False) as live:
            while sim_ms < end_ms:
                for w in started.workers:
                    if w.poll() is not None:
                        raise DemoError(f"a worker exited (code {w.returncode}); see {settings.home}/demo-worker-*.log")
                # Back-pressure: the clock waits while the engine is more than an hour of event time behind.
                behind = [e for e in EXPERIMENTS if (d := view.latest_decision(e)) is None
                          or d["watermark_time"] < sim_ms - 3_600_000]
                if behind and sim_ms - START_MS > 2 * 3_600_000:
                    time.sleep(0.1)
                    live.update(render(day, view, configs, sim_ms, end_ms, pace, waiting=True))
                    continue
                t1 = min(end_ms, sim_ms + step_ms)
                for kind, record in day.step(sim_ms, t1):
                    publisher.publish(kind, record)
                sim_ms = t1
                live.update(render(day, view, configs, sim_ms, end_ms, pace))
                wall0 += pace.step_wall_s
                time.sleep(max(0.0, wall0 - time.monotonic()))
            publisher.flush(30)
            deadline = time.monotonic() + 90
            while any((d := view.latest_decision(e)) is None or d["watermark_time"] < day.last_ms.get(e, 0)
                      for e in EXPERIMENTS):
                if time.monotonic() > deadline:
                    raise DemoError("the workers did not catch up with the simulated day within 90 s; "
                                    f"see {settings.home}/demo-worker-*.log")
                time.sleep(0.3)
                live.update(render(day, view, configs, sim_ms, end_ms, pace, waiting=True))
            time.sleep(2.5)  # the last looks (decisions at most every 0.25 s) and their alerts
            live.update(render(day, view, configs, sim_ms, end_ms, pace, notes=False))
        _wait_for_clickhouse(sink_settings, day, view, console)
        paths = _write_reports(sink_settings, configs, out, console)
        summary = _summary(settings, run_id, day, view, paths, out)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
        _print_ending(console, summary, settings)
        return 0
    finally:
        view.stop()
        router.close(5)
        publisher.close(5)


def _wait_for_clickhouse(settings: Settings, day: Day, view: ControlPlaneLog, console) -> None:
    from streams.cli import run_query

    db = settings.clickhouse_database
    tables = {"assignments": "assignment", "predictions": "prediction", "shadow": "shadow", "outcomes": "outcome"}
    sql = " UNION ALL ".join(f"SELECT '{t}', count() FROM {db}.{t}" for t in (*tables, "decisions"))
    with console.status("waiting for ClickHouse to hold every event"):
        deadline = time.monotonic() + 120
        while True:
            try:
                _, rows = run_query(settings, sql)
                counts = {name: int(n) for name, n in rows}
            except Exception:  # noqa: BLE001 - tables appear with the first batch
                counts = {}
            with view.lock:
                decisions = len(view.records[ControlKind.DECISION])
            if counts and all(counts[t] >= day.traffic.published[k] for t, k in tables.items()) \
                    and counts["decisions"] >= decisions:
                return
            if time.monotonic() > deadline:
                raise DemoError(f"ClickHouse did not receive every event within 120 s (has {counts}); "
                                f"see {settings.home}/demo-worker-1.log")
            time.sleep(0.5)


def _write_reports(settings: Settings, configs: dict, out: Path, console) -> dict[str, dict[str, Path]]:
    from analysis.report import analyse, collect, write_report
    from streams.cli import report_query
    from streams.stage2 import policy_of

    query = report_query(settings)
    paths = {}
    with console.status("writing reports") as status:
        for experiment_id, config in configs.items():
            status.update(f"writing the report of {experiment_id}")
            rows = collect(config, query)
            report = analyse(config, policy_of(config), rows, generated_ms=int(time.time() * 1000))
            paths[experiment_id] = write_report(report, out / experiment_id)
    return paths


def _summary(settings: Settings, run_id: str, day: Day, view: ControlPlaneLog, paths, out: Path) -> dict:
    ship = first_ship(view.of(ControlKind.DECISION, CANARY))
    k, n = peeking(view.of(ControlKind.DECISION, AA))
    kills = [r for r in view.of(ControlKind.KILLSWITCH, LATENCY) if r["action"] == "kill"]
    return {
        "run_id": run_id, "topic_prefix": settings.topic_prefix, "database": settings.clickhouse_database,
        "reports": str(out), "report_files": {e: {k: str(v) for k, v in p.items()} for e, p in paths.items()},
        "published": day.traffic.published, "units": day.traffic.units,
        "canary_ship": ship and ship.__dict__,
        "canary_promoted": any(k["action"] == "promote" for k in view.of(ControlKind.KILLSWITCH, CANARY)),
        "kill_event_time": kills[0]["event_time"] if kills else None,
        "kill_seen_by_router_time": day.kill_seen_ms,
        "aa_peeking": {"winner_looks": k, "looks": n},
        "verdicts": {e: (view.latest_decision(e) or {}).get("verdict") for e in EXPERIMENTS},
        "verdicts_seen": {e: sorted({d["verdict"] for d in view.of(ControlKind.DECISION, e)}) for e in EXPERIMENTS},
        "alerts": [{k: a[k] for k in ("experiment_id", "guardrail", "variant", "state", "observed", "threshold")}
                   for a in view.records[ControlKind.ALERT]],
        "queries": [sql for _, sql in queries(settings.clickhouse_database)],
    }


def _print_ending(console, summary: dict, settings: Settings) -> None:
    from streams.live import story_lines

    console.print()
    for line in story_lines(summary):
        console.print(line)
    console.print()
    console.print(f"reports (Markdown, HTML, PNG) of every experiment: [bold]{summary['reports']}/[/]"
                  f"<experiment>/report.html")
    console.print(f"this run's rows are in the ClickHouse database [bold]{summary['database']}[/]; try:")
    for (what, sql) in queries(summary["database"]):
        console.print(f"  # {what}", style="dim")
        console.print(f'  abstream query "{sql}"', soft_wrap=True, highlight=False, markup=False)
