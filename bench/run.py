"""`make bench`: abstream's benchmark (issue 10), one JSON file per run.

A fresh local Apache Kafka broker (its own port and data dir, stopped at the end) and real
worker processes (``streams.processes.start_worker``, the same code as ``abstream worker``).
Every phase has its own topic prefix, consumer groups, tables and ClickHouse directory, so
phases never see each other's data. Parts:

- ceilings: ``Codec().decode`` over the corpus in one process; a bare aiokafka consumer
  reading the same four input topics;
- throughput: the corpus published as fast as possible to one worker, then to two, in
  three pairs measured back to back (the median pair's figures);
- latency: a paced producer offers a fixed rate; publication -> first decision that counts
  an outcome, and guardrail-breaching prediction -> kill switch;
- sink: the same paced load through a worker holding the ClickHouse sink role;
- memory: N events over a fixed unit population, worker RSS at N/2 and N;
- profile (not in the default run): py-spy on one worker under the throughput load.

    .venv/bin/python bench/run.py                       # the full default run -> bench/results.json
    .venv/bin/python bench/run.py --only throughput --events 200000 --out bench/out/dev.json

Figures come from one run on a shared machine: compare the ratios inside a run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition  # noqa: E402
from confluent_kafka.admin import AdminClient  # noqa: E402

from streams import local_kafka  # noqa: E402
from streams.codec import Codec, ControlKind, DeadLetter, EventKind  # noqa: E402
from streams.experiments import ExperimentConfig, publish_config, start  # noqa: E402
from streams.processes import start_sink, start_worker, stop_worker, wait_healthy  # noqa: E402
from streams.scenario import ArmTruth, ExperimentScenario, scenario_events, shadow_events  # noqa: E402
from streams.settings import Settings  # noqa: E402
from streams.topics import DECISIONS, INPUT_TOPICS, KILLSWITCH, STAGE1_STATE, ensure_topics, producer_config  # noqa: E402

PARTS = ("ceilings", "throughput", "scaling", "latency", "sink", "memory")
OUT_DIR = ROOT / "bench" / "out"
WINDOW_S = 600
MEAN_OUTCOME_LAG_S = 30.0
RAW_TABLES = ("assignments", "predictions", "shadow", "outcomes")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# the corpus: a realistic mix from streams.scenario, pre-encoded


@dataclass
class Corpus:
    """Messages in publication order, and what the statistics must show once all are in."""

    kinds: list[EventKind]
    keys: list[bytes]
    values: list[bytes]
    experiments: list[str]
    # Per message: (experiment, k) when it is the k-th distinct outcome of its experiment, else None.
    outcome_rank: list[tuple[str, int] | None]
    units: dict[str, int]          # distinct exposed units per experiment
    outcomes: dict[str, int]       # distinct outcomes per experiment
    configs: list[ExperimentConfig]
    distinct: list[bool] = field(default_factory=list)  # first occurrence of its event identity
    distinct_by_kind: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values)

    def slice(self, n: int) -> "Corpus":
        return Corpus(self.kinds[:n], self.keys[:n], self.values[:n], self.experiments[:n], self.outcome_rank[:n],
                      {}, {}, self.configs, self.distinct[:n])


BENCH_EXPERIMENTS = (
    ("bench-effect", ArmTruth(0.10), ArmTruth(0.13, revenue_per_conversion=24), {"control": 0.5, "treatment": 0.5}),
    ("bench-aa", ArmTruth(0.12), ArmTruth(0.12), {"control": 0.5, "treatment": 0.5}),
    ("bench-slow", ArmTruth(0.08), ArmTruth(0.08, latency_ms=55), {"control": 0.5, "treatment": 0.5}),
    ("bench-srm", ArmTruth(0.05), ArmTruth(0.05), {"control": 0.52, "treatment": 0.48}),
)


def experiment_config(experiment_id: str, **fields: Any) -> ExperimentConfig:
    mapping = {"experiment_id": experiment_id, "variants": ["control", "treatment"], "control": "control",
               "primary_metric": {"name": "conversion", "kind": "binary"},
               "secondary_metrics": [{"name": "revenue", "kind": "continuous"}],
               "attribution_window_s": WINDOW_S, "min_sample_per_variant": 200, **fields}
    return start(ExperimentConfig.from_mapping(mapping))


def build_corpus(n_events: int, seed: int = 10) -> Corpus:
    """About n_events messages: four experiments from streams.scenario (assignments,
    predictions, delayed outcomes inside and beyond the window, outcomes before exposure and
    for never-exposed units, 1% duplicates, 0.5% inconsistent assignments) plus shadow runs
    (10% of the volume) on the first experiment's units, merged in arrival order."""
    per_unit = 2.76  # scenario messages per unit with the defaults below (measured)
    units = max(200, int(n_events * 0.9 / len(BENCH_EXPERIMENTS) / per_unit))
    # Event time spans 40 mean outcome lags, so that delayed outcomes are spread through the
    # stream (a steady mix) rather than bunched at its end.
    span_s = 40 * MEAN_OUTCOME_LAG_S
    exposures_per_s = units / span_s
    timeline: list[tuple[int, EventKind, dict]] = []
    for i, (experiment_id, control, treatment, split) in enumerate(BENCH_EXPERIMENTS):
        scenario = ExperimentScenario(experiment_id, {"control": control, "treatment": treatment}, split, units=units,
                                      window_s=WINDOW_S, mean_lag_s=MEAN_OUTCOME_LAG_S, exposures_per_s=exposures_per_s,
                                      seed=seed + i)
        timeline += scenario_events(scenario)
    runs = max(0, n_events - len(timeline))
    timeline += shadow_events(BENCH_EXPERIMENTS[0][0], runs, disagreement=0.02, runs_per_s=max(1.0, runs / span_s),
                              seed=seed + 99)
    timeline.sort(key=lambda item: item[0])
    timeline = timeline[:n_events]
    codec = Codec()
    corpus = Corpus([], [], [], [], [], defaultdict(int), defaultdict(int),
                    [experiment_config(e[0]) for e in BENCH_EXPERIMENTS])
    seen: set[tuple] = set()
    exposed: set[tuple[str, str]] = set()
    distinct: dict[str, int] = defaultdict(int)
    for _, kind, record in timeline:
        experiment_id = record["experiment_id"]
        corpus.kinds.append(kind)
        corpus.keys.append(record["unit_id"].encode())
        corpus.values.append(codec.encode(kind, record))
        corpus.experiments.append(experiment_id)
        identity = (kind, experiment_id, record["unit_id"], record["event_id"])
        rank = None
        corpus.distinct.append(identity not in seen)
        if identity not in seen:
            seen.add(identity)
            distinct[kind.value] += 1
            if kind is EventKind.OUTCOME:
                rank = (experiment_id, corpus.outcomes[experiment_id])
                corpus.outcomes[experiment_id] += 1
            elif kind is EventKind.ASSIGNMENT and (experiment_id, record["unit_id"]) not in exposed:
                exposed.add((experiment_id, record["unit_id"]))
                corpus.units[experiment_id] += 1
        corpus.outcome_rank.append(rank)
    corpus.units, corpus.outcomes, corpus.distinct_by_kind = dict(corpus.units), dict(corpus.outcomes), dict(distinct)
    return corpus


# --------------------------------------------------------------------------------------
# broker, settings, workers, watchers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Bench:
    def __init__(self, args: argparse.Namespace, bootstrap: str, work: Path):
        self.args = args
        self.bootstrap = bootstrap
        self.work = work
        self.tag = uuid.uuid4().hex[:6]
        self.broker_pid: int | None = None

    def settings(self, phase: str) -> Settings:
        """Settings of one phase: own prefix, home, database. Engine settings are the defaults."""
        home = self.work / phase
        home.mkdir(parents=True, exist_ok=True)
        return replace(Settings.from_env({}), home=home, kafka_bootstrap=self.bootstrap,
                       topic_prefix=f"b{self.tag}-{phase}.", clickhouse_dsn=f"chdb://{home / 'chdb'}",
                       clickhouse_database=f"b{self.tag}_{phase.replace('-', '_')}", web_port=free_port())

    def prepare(self, settings: Settings, configs: list[ExperimentConfig]) -> None:
        ensure_topics(settings)
        for config in configs:
            publish_config(settings, config)

    def start_workers(self, settings: Settings, n: int, *, sink: bool = False,
                      worker_cores: float | None = None) -> list["Worker"]:
        """n workers, and with ``sink`` an `abstream sink` process last in the list (the sink
        role in a process of its own, as the README recommends under load); with
        ``worker_cores``, each worker is held to that many cores (:class:`CpuLimit`)."""
        workers = []
        for i in range(n):
            s = replace(settings, web_port=free_port() if i else settings.web_port, home=settings.home / f"worker{i}")
            s.home.mkdir(parents=True, exist_ok=True)
            log_path = s.home / "worker.log"
            worker = Worker(s, start_worker(s, sink=False, log_path=log_path), log_path)
            workers.append(worker)
            if worker_cores is not None:
                try:
                    worker.limit = CpuLimit(f"abstream-bench-{self.tag}-{s.topic_prefix.rstrip('.')}-w{i}", worker_cores)
                    worker.limit.add(worker.pid)
                except OSError:
                    for w in workers:
                        w.stop()
                    raise
        if sink:
            s = replace(settings, web_port=free_port(), home=settings.home / "sink")
            s.home.mkdir(parents=True, exist_ok=True)
            workers.append(Worker(s, start_sink(s, log_path=s.home / "sink.log"), s.home / "sink.log"))
        for w in workers:
            wait_healthy(w.settings, w.process, timeout_s=90)
        wait_group_stable(settings, n)
        return workers


class CpuLimit:
    """A CPU quota (CFS bandwidth) for one process and its threads: a cgroup of the cpu
    controller, v1 (/sys/fs/cgroup/cpu) or v2 (/sys/fs/cgroup with cpu.max)."""

    PERIOD_US = 100_000
    V1 = Path("/sys/fs/cgroup/cpu")
    V2 = Path("/sys/fs/cgroup")

    def __init__(self, name: str, cores: float):
        v1 = (self.V1 / "cpu.cfs_quota_us").exists()
        self.root = self.V1 if v1 else self.V2
        self.path = self.root / name
        self.path.mkdir()
        quota = int(cores * self.PERIOD_US)
        try:
            if v1:
                (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                (self.path / "cpu.cfs_quota_us").write_text(str(quota))
            else:  # needs the cpu controller enabled for the root's children
                (self.path / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
        except OSError:
            self.path.rmdir()
            raise

    @classmethod
    def unavailable(cls) -> str | None:
        """Why no process can be limited here (None: it can)."""
        try:
            probe = cls(f"abstream-bench-probe-{os.getpid()}", 0.5)
        except OSError as exc:
            return f"cannot create a cpu cgroup with a quota ({exc.strerror}: {exc.filename}); needs root and a " \
                   "writable cpu controller"
        probe.remove()
        return None

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))  # the whole process, threads to come included

    def remove(self) -> None:
        for pid in (self.path / "cgroup.procs").read_text().split():
            try:
                (self.root / "cgroup.procs").write_text(pid)
            except OSError:
                pass  # it exited meanwhile
        self.path.rmdir()


@dataclass
class Worker:
    settings: Settings
    process: subprocess.Popen
    log_path: Path
    limit: CpuLimit | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def metrics(self) -> dict[str, list[tuple[dict, float]]]:
        """name -> [(labels, value)] from the worker's /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://{self.settings.web_host}:{self.settings.web_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        out: dict[str, list[tuple[dict, float]]] = defaultdict(list)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                out[sample.name].append((sample.labels, sample.value))
        return out

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise LookupError(f"no VmRSS for pid {self.pid}")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        stop_worker(self.process)
        if self.limit is not None:
            self.limit.remove()


def metric_sum(samples: dict, name: str, **labels: str) -> float:
    return sum(v for l, v in samples.get(name, []) if all(l.get(k) == x for k, x in labels.items()))


def wait_group_stable(settings: Settings, members: int, timeout_s: float = 90.0) -> None:
    """Until the workers' consumer group is Stable with ``members`` members that between them
    hold every input partition (so that no rebalance falls inside a measurement)."""
    from confluent_kafka import ConsumerGroupState

    admin = AdminClient(settings.kafka_config())
    group = f"{settings.topic_prefix}worker"
    inputs = {settings.topic(name) for name in INPUT_TOPICS.values()}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            description = admin.describe_consumer_groups([group])[group].result(timeout=10)
            held = {(tp.topic, tp.partition) for m in description.members
                    for tp in (m.assignment.topic_partitions if m.assignment else []) if tp.topic in inputs}
            if description.state == ConsumerGroupState.STABLE and len(description.members) == members \
                    and len(held) == len(inputs) * settings.partitions:
                return
        except Exception:  # noqa: BLE001 - the group may not exist yet
            pass
        time.sleep(0.5)
    raise RuntimeError(f"consumer group {group} did not become stable with {members} members in {timeout_s:.0f} s")


class TopicWatcher(threading.Thread):
    """Reads a control topic from the beginning, decoding every record, with its Kafka
    timestamp (the producer's CreateTime: when the worker published it)."""

    def __init__(self, settings: Settings, topic: str, kind: ControlKind):
        super().__init__(daemon=True, name=f"watch-{topic}")
        self.settings, self.topic, self.kind = settings, topic, kind
        self.records: list[tuple[float, dict]] = []
        self.lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        codec = Codec()
        consumer = Consumer(self.settings.kafka_config(**{"group.id": f"{self.settings.topic_prefix}bench-watch",
                                                          "enable.auto.commit": "false"}))
        partitions = consumer.list_topics(self.topic, timeout=10).topics[self.topic].partitions
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in partitions])
        try:
            while not self._halt.is_set():
                for message in consumer.consume(num_messages=1000, timeout=0.1):
                    if message.error() is not None:
                        continue
                    record = codec.decode(self.kind, message.value())
                    if not isinstance(record, DeadLetter):
                        with self.lock:
                            self.records.append((message.timestamp()[1] / 1000, record))
        finally:
            consumer.close()

    def snapshot(self) -> list[tuple[float, dict]]:
        with self.lock:
            return list(self.records)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


class Scraper(threading.Thread):
    """Samples the workers' counters every ``interval_s``: (time, consumed, sink rows, lags)."""

    def __init__(self, workers: list[Worker], interval_s: float):
        super().__init__(daemon=True, name="scraper")
        self.workers, self.interval_s = workers, interval_s
        self.samples: list[dict] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            t = time.time()
            row = {"t": t, "consumed": 0.0, "sink_rows": 0.0, "sink_lag_s": None, "sink_input_lag": None,
                   "stage1_input_lag": 0.0, "unit_states": 0.0}
            try:
                for w in self.workers:
                    m = w.metrics()
                    row["consumed"] += metric_sum(m, "abstream_events_consumed_total")
                    row["sink_rows"] += sum(metric_sum(m, "abstream_sink_rows_total", table=t) for t in RAW_TABLES)
                    row["stage1_input_lag"] += metric_sum(m, "abstream_input_lag_messages", role="stage1")
                    row["unit_states"] += metric_sum(m, "abstream_unit_states")
                    if m.get("abstream_sink_lag_seconds"):
                        row["sink_lag_s"] = metric_sum(m, "abstream_sink_lag_seconds")
                        row["sink_input_lag"] = metric_sum(m, "abstream_input_lag_messages", role="sink")
                self.samples.append(row)
            except OSError:
                pass
            self._halt.wait(max(0.0, self.interval_s - (time.time() - t)))

    def first_time(self, key: str, at_least: float) -> float | None:
        return next((s["t"] for s in self.samples if s[key] >= at_least), None)

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def topic_of(settings: Settings, kind: EventKind) -> str:
    return settings.topic(INPUT_TOPICS[kind])


def make_bench_producer(settings: Settings, **extra: Any) -> Producer:
    # Reports for failed messages only: a Python callback per delivered message cost the
    # producer, which shares the machine with the workers it measures, ~0.3 us each.
    return Producer(producer_config(settings, **{"linger.ms": "20", "batch.num.messages": "10000",
                                                 "queue.buffering.max.messages": "1000000",
                                                 "queue.buffering.max.kbytes": "1048576",
                                                 "delivery.report.only.error": True, **extra}))


def publish_all(settings: Settings, corpus: Corpus) -> dict:
    """Every message of the corpus as fast as confluent-kafka takes them; returns timing."""
    errors: list[str] = []

    def on_delivery(err, _msg):
        errors.append(err.str() if err is not None else "delivery report without an error")

    producer = make_bench_producer(settings, on_delivery=on_delivery)
    topics = {kind: topic_of(settings, kind) for kind in EventKind}
    t0 = time.time()
    for kind, key, value in zip(corpus.kinds, corpus.keys, corpus.values):
        while True:
            try:
                producer.produce(topics[kind], key=key, value=value)
                break
            except BufferError:
                producer.poll(0.01)
    t_enqueued = time.time()
    remaining = producer.flush(120)
    t1 = time.time()
    if errors or remaining:
        raise RuntimeError(f"{len(errors) + remaining} messages not delivered: {errors[:1]}")
    return {"t0": t0, "t1": t1, "enqueued_s": t_enqueued - t0, "seconds": t1 - t0, "rate": len(corpus) / (t1 - t0)}


# --------------------------------------------------------------------------------------
# 1. ceilings


def decode_ceiling(corpus: Corpus) -> dict:
    codec = Codec()
    t0, cpu0 = time.perf_counter(), time.process_time()
    dead = sum(isinstance(codec.decode(k, v), DeadLetter) for k, v in zip(corpus.kinds, corpus.values))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"events": len(corpus), "seconds": round(seconds, 3), "rate": len(corpus) / seconds, "dead": dead,
            "cpu_share": round(cpu / seconds, 3), "rate_per_cpu_s": len(corpus) / cpu,
            "method": "streams.codec.Codec().decode(kind, value) over every message of the corpus, one process, "
                      "one thread, payloads already in memory (what stage 1 does first with each message)"}


def raw_consume_ceiling(settings: Settings, n: int) -> dict:
    """A bare aiokafka consumer (defaults, new group) over the phase's four input topics."""
    from aiokafka import AIOKafkaConsumer

    async def loop() -> dict:
        consumer = AIOKafkaConsumer(*[topic_of(settings, k) for k in EventKind], bootstrap_servers=settings.kafka_bootstrap,
                                    group_id=f"{settings.topic_prefix}bench-raw-{uuid.uuid4().hex[:6]}",
                                    auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        count = first = 0
        t_first = None
        try:
            deadline = time.monotonic() + 120
            while count < n and time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=1000)
                got = sum(len(records) for records in batch.values())
                if got and t_first is None:
                    t_first, first = time.perf_counter(), got
                count += got
            t_last = time.perf_counter()
        finally:
            await consumer.stop()
        seconds = max(1e-9, t_last - (t_first or t_last))
        rate = (count - first) / seconds if count > first else None  # None: the topic came in one batch
        return {"events": count, "complete": count >= n, "seconds": round(seconds, 3), "rate": rate,
                "method": "bare aiokafka AIOKafkaConsumer (defaults) subscribed to the same four input topics, "
                          "getmany() loop, no decoding; rate counted from the arrival of the first batch (not counted) "
                          "to the last message"}

    return asyncio.run(loop())


# --------------------------------------------------------------------------------------
# 2. throughput


def complete_time(decisions: list[tuple[float, dict]], corpus: Corpus) -> float | None:
    """Kafka time of the first decision, per experiment, that counts all its exposed units and
    all its distinct outcomes; the latest of those over the experiments (None if any missing)."""
    done: dict[str, float] = {}
    for ts, d in decisions:
        e = d["experiment_id"]
        if e in corpus.units and e not in done and sum(v["units"] for v in d["variants"]) == corpus.units[e] \
                and sum(d["outcome_fates"].values()) == corpus.outcomes.get(e, 0):
            done[e] = ts
    return max(done.values()) if len(done) == len(corpus.units) else None


def throughput(bench: Bench, corpus: Corpus, n_workers: int, phase: str, *, profile_s: float = 0.0,
               raw_ceiling: bool = False, worker_cores: float | None = None) -> dict:
    settings = bench.settings(phase)
    bench.prepare(settings, corpus.configs)
    workers = bench.start_workers(settings, n_workers, worker_cores=worker_cores)
    decisions = TopicWatcher(settings, settings.topic(DECISIONS), ControlKind.DECISION)
    decisions.start()
    scraper = Scraper(workers, 0.25)
    scraper.start()
    n = len(corpus)
    result: dict[str, Any] = {"workers": n_workers, "events": n}
    try:
        cpu0 = [w.cpu_seconds() for w in workers]
        broker_cpu0, broker_jit0 = process_cpu_seconds(bench.broker_pid), jit_threads_cpu(bench.broker_pid)
        bench_cpu0, machine0 = time.process_time(), machine_busy_seconds()
        result["loadavg_at_start"] = list(os.getloadavg())
        pub = publish_all(settings, corpus)
        result["producer"] = {"seconds": round(pub["seconds"], 3), "rate": round(pub["rate"])}
        log(f"{phase}: published {n:,} in {pub['seconds']:.1f} s ({pub['rate']:,.0f}/s)")
        profile_proc = None
        deadline = time.time() + max(180.0, n / 1500)
        t_end = None
        while time.time() < deadline:
            if profile_s and profile_proc is None and (scraper.samples and scraper.samples[-1]["consumed"] > 0.05 * n):
                profile_proc = start_pyspy(workers[0].pid, profile_s)
            for w in workers:
                if w.process.poll() is not None:
                    raise RuntimeError(f"worker exited: {w.log_path.read_text()[-2000:]}")
            t_stats = complete_time(decisions.snapshot(), corpus)
            t_consumed = scraper.first_time("consumed", n)
            if t_stats is not None and t_consumed is not None:
                t_end = max(t_stats, t_consumed)
                break
            time.sleep(0.5)
        cpu1 = [w.cpu_seconds() for w in workers]
        broker_cpu1, broker_jit1 = process_cpu_seconds(bench.broker_pid), jit_threads_cpu(bench.broker_pid)
        bench_cpu1, machine1 = time.process_time(), machine_busy_seconds()
        result["loadavg_at_end"] = list(os.getloadavg())
        if profile_proc is not None:
            profile_proc.wait(profile_s + 60)
        t_first = scraper.first_time("consumed", 1)
        result["method"] = (
            "workers started on empty topics and waited for (consumer group Stable, every input partition "
            "assigned); then the corpus is published as fast as possible. rate = events / (t_end - t_publish_start), "
            "t_end = the later of (a) the Kafka time of the first decision, per experiment, whose units and "
            "outcome-fate total equal the corpus's distinct exposed units and distinct outcomes (latest over the "
            "experiments) and (b) the scrape (every 0.25 s) at which abstream_events_consumed_total summed over the "
            "workers reached the event count (shadow runs and predictions do not show in a decision). Includes the "
            "decision cadence (~1-2 s) and the producer's CPU while it publishes. steady_rate = slope of "
            "abstream_events_consumed_total between 10% and 90% of the events. rate_after_publish = its slope from "
            "the end of publishing to 98% of the events (at least 2 s of scrapes; else null): the workers' rate with "
            "no producer on the machine.")
        if t_end is None:
            result.update(complete=False, rate=None, consumed=scraper.samples[-1]["consumed"] if scraper.samples else 0)
            return result
        seconds = t_end - pub["t0"]
        t10, t90 = scraper.first_time("consumed", 0.1 * n), scraper.first_time("consumed", 0.9 * n)
        c10 = next(s["consumed"] for s in scraper.samples if s["t"] == t10)
        c90 = next(s["consumed"] for s in scraper.samples if s["t"] == t90)
        steady = (c90 - c10) / (t90 - t10) if t90 and t10 and t90 > t10 else None
        # Once the producer is done, the workers share the machine with the broker only.
        published = pub["t0"] + pub["seconds"]
        after = [x for x in scraper.samples if published <= x["t"] and x["consumed"] < 0.98 * n]
        after_publish = ((after[-1]["consumed"] - after[0]["consumed"]) / (after[-1]["t"] - after[0]["t"])
                         if len(after) >= 8 else None)
        result.update(
            complete=True, seconds=round(seconds, 3), rate=n / seconds,
            steady_rate=steady, rate_after_publish=after_publish,
            first_consumed_after_s=round(t_first - pub["t0"], 3) if t_first else None,
            last_decision_after_s=round(t_stats - pub["t0"], 3), all_consumed_after_s=round(t_consumed - pub["t0"], 3),
            worker_cpu_share=[round((b - a) / seconds, 3) for a, b in zip(cpu0, cpu1)],
            rate_per_worker_cpu_s=n / max(1e-9, sum(cpu1) - sum(cpu0)),
            broker_cpu_share=round((broker_cpu1 - broker_cpu0) / seconds, 3),
            worker_rss_mb=[round(w.rss_bytes() / 2**20, 1) for w in workers],
            cpu_seconds={
                "workers": [round(b - a, 2) for a, b in zip(cpu0, cpu1)],
                "broker": round(broker_cpu1 - broker_cpu0, 2),
                "broker_jit_compiler": round(jit_seconds_between(broker_jit0, broker_jit1), 2),
                "bench_process": round(bench_cpu1 - bench_cpu0, 2),
                "machine_busy": round(machine1 - machine0, 2), "cores": os.cpu_count(),
                "method": "CPU-seconds (user + system, all threads) from the start of publishing to t_end: each "
                          "worker, the broker, this process (the producer publishing the corpus, the scrapers, the "
                          "decision watcher); broker_jit_compiler = the part of the broker's in its JIT compiler "
                          "threads alive at t_end (HotSpot stops idle ones; one that exits before is not counted); "
                          "machine_busy = every core's non-idle time from /proc/stat, neighbours "
                          "included"},
            batches=[batch_histograms(w) for w in workers])
        if n_workers == 1 and not profile_s and worker_cores is None:
            written = state_log_figures(settings)
            input_bytes = sum(map(len, corpus.values)) + sum(map(len, corpus.keys))
            result["state_log"] = {
                **written, "records_per_input_event": round(written.get("records", 0) / n, 4),
                "bytes_per_input_byte": round(written.get("bytes", 0) / input_bytes, 3),
                "method": "every record of <prefix>stage1-state after the run (value + headers), against the input "
                          "messages' key + value bytes: what stage 1 keeps in Kafka per event read (records before "
                          "a partition's newest snapshot are deleted, so it wrote at least this much)"}
        if raw_ceiling:
            result["raw_consume_ceiling"] = raw_consume_ceiling(settings, n)
        return result
    finally:
        scraper.stop()
        decisions.stop()
        for w in workers:
            w.stop()


def machine_busy_seconds() -> float:
    """Non-idle CPU-seconds of all cores since boot (/proc/stat: everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def jit_threads_cpu(pid: int | None) -> dict[str, int]:
    """Clock ticks of each of a JVM's JIT compiler threads (HotSpot names them "C1/C2 CompilerThre")."""
    ticks: dict[str, int] = {}
    for task in Path(f"/proc/{pid}/task").glob("*") if pid is not None else ():
        try:
            if " CompilerThre" in (task / "comm").read_text():
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                ticks[task.name] = int(fields[11]) + int(fields[12])
        except OSError:
            continue  # the thread exited
    return ticks


def jit_seconds_between(start: dict[str, int], end: dict[str, int]) -> float:
    """CPU-seconds the compiler threads alive at `end` spent since `start` (HotSpot starts and stops them)."""
    return sum(t - start.get(tid, 0) for tid, t in end.items()) / os.sysconf("SC_CLK_TCK")


def start_pyspy(pid: int, seconds: float) -> subprocess.Popen:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    pyspy = Path(sys.executable).parent / "py-spy"
    return subprocess.Popen([str(pyspy), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate", "100",
                             "--nonblocking", "--threads", "--idle", "--format", "raw", "--output", str(OUT_DIR / "profile-worker.txt")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarize_profile(path: Path, top: int = 25) -> dict:
    """Self and inclusive shares of the main thread's samples (py-spy raw: 'thread;frame;... count')."""
    self_counts: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    threads: dict[str, int] = defaultdict(int)
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        c = int(count)
        threads[frames[0]] += c
        if "MainThread" not in frames[0]:
            continue
        if any(w in frames[-1] for w in ("EpollSelector.select", "select (selectors", "poll (selectors")):
            idle += c
            continue
        total += c
        self_counts[frames[-1]] += c
        for frame in set(frames[1:]):
            incl[frame] += c
    share = lambda d: [[k, round(v / max(1, total), 3)] for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]
    return {"main_thread_active_samples": total, "main_thread_idle_share": round(idle / max(1, idle + total), 3),
            "threads": dict(threads), "self": share(self_counts), "inclusive": share(incl),
            "method": "py-spy record --rate 100 --nonblocking --threads --idle on the worker; shares are of the main "
                      "thread's non-idle samples (idle = in the event loop's select). Wall-clock sampling: on a loaded "
                      "machine a runnable but descheduled thread is sampled where it stands."}


# --------------------------------------------------------------------------------------
# 3. latency and 5. sink: a paced producer


@dataclass
class Regression:
    """A latency-regression experiment with a kill guardrail: its scheduled events and the
    index (among its treatment predictions) of the one that makes the guardrail breach."""

    experiment_id: str
    schedule: list[tuple[float, EventKind, bytes, bytes]]
    breach_offset_s: float
    breach_index: int  # index into schedule


P95_THRESHOLD_MS = 200.0
MIN_COUNT = 200


def regression_experiments(count: int, first_s: float, every_s: float) -> tuple[list[ExperimentConfig], list[Regression]]:
    """Each: 100 units per variant exposed at 1 s, 300 predictions per variant at 40 ms over
    2-12 s, then from first_s + i * every_s treatment predictions at 1000 ms (50/s, 3 s).
    The breaching prediction is the first after which numpy's p95 (method "lower", what the
    DDSketch approximates within 2%) of the treatment's latencies exceeds 200 ms with at least
    min_count predictions: with 40 ms vs 1000 ms the sketch's error cannot move it."""
    codec = Codec()
    configs, regressions = [], []
    base_ms = 1_767_225_600_000
    for i in range(count):
        eid = f"regress-{i}"
        configs.append(experiment_config(eid, guardrails=[{"name": "p95", "kind": "latency_p95", "threshold": P95_THRESHOLD_MS,
                                                           "min_count": MIN_COUNT, "action": "kill"}]))
        events: list[tuple[float, EventKind, dict]] = []
        n = iter(range(10**9))

        def ev(kind: EventKind, at_s: float, unit: str, **f: Any) -> None:
            events.append((at_s, kind, {"event_id": f"{eid}-{next(n)}", "event_time": base_ms + int(at_s * 1000),
                                        "experiment_id": eid, "unit_id": unit, **f}))

        for variant in ("control", "treatment"):
            for u in range(100):
                ev(EventKind.ASSIGNMENT, 1.0 + u * 0.002, f"{eid}-{variant}-{u}", variant=variant, allocation_version=1,
                   segment={})

        def prediction(at_s: float, variant: str, j: int, latency: float) -> None:
            ev(EventKind.PREDICTION, at_s, f"{eid}-{variant}-{j % 100}", request_id=f"r{j}", variant=variant,
               model_name="m", model_version=variant, score=0.5, label=None, latency_ms=latency, status="ok")

        for j in range(300):
            for variant in ("control", "treatment"):
                prediction(2.0 + j * (10.0 / 300), variant, j, 40.0)
        start_s = first_s + i * every_s
        for j in range(150):
            prediction(start_s + j * 0.02, "treatment", 300 + j, 1000.0)
            prediction(start_s + j * 0.02 + 0.01, "control", 300 + j, 40.0)
        events.sort(key=lambda e: e[0])
        latencies, breach = [], None
        for idx, (_, kind, r) in enumerate(events):
            if kind is EventKind.PREDICTION and r["variant"] == "treatment":
                latencies.append(r["latency_ms"])
                ordered = sorted(latencies)
                if len(latencies) >= MIN_COUNT and ordered[math.floor(0.95 * (len(ordered) - 1))] > P95_THRESHOLD_MS:
                    breach = idx
                    break
        schedule = [(at, kind, r["unit_id"].encode(), codec.encode(kind, r)) for at, kind, r in events]
        regressions.append(Regression(eid, schedule, events[breach][0], breach))
    return configs, regressions


def paced_run(bench: Bench, corpus: Corpus, phase: str, rate: float, seconds: float, *, sink: bool,
              regressions: list[Regression], extra_configs: list[ExperimentConfig], warmup_s: float,
              n_workers: int = 1) -> dict:
    """``n_workers`` workers; ``rate`` events/s of the corpus for ``seconds`` (+ the regression events)."""
    n_bg = min(len(corpus), int(rate * seconds))
    settings = bench.settings(phase)
    bench.prepare(settings, corpus.configs + extra_configs)
    workers = bench.start_workers(settings, n_workers, sink=sink)
    decisions = TopicWatcher(settings, settings.topic(DECISIONS), ControlKind.DECISION)
    kills = TopicWatcher(settings, settings.topic(KILLSWITCH), ControlKind.KILLSWITCH)
    decisions.start()
    kills.start()
    scraper = Scraper(workers, 1.0)
    scraper.start()
    # (offset s, kind, key, value, tag): tag = ("o", experiment, k) for outcomes, ("b", regression i) for breaches
    schedule: list[tuple[float, EventKind, bytes, bytes, Any]] = [
        (i / rate, corpus.kinds[i], corpus.keys[i], corpus.values[i],
         ("o",) + corpus.outcome_rank[i] if corpus.outcome_rank[i] else None) for i in range(n_bg)]
    for r_i, reg in enumerate(regressions):
        schedule += [(at, k, key, value, ("b", r_i) if idx == reg.breach_index else None)
                     for idx, (at, k, key, value) in enumerate(reg.schedule)]
    schedule.sort(key=lambda item: item[0])
    producer = Producer(producer_config(settings, **{"linger.ms": "5", "queue.buffering.max.messages": "1000000"}))
    topics = {kind: topic_of(settings, kind) for kind in EventKind}
    published: dict[tuple, float] = {}
    result: dict[str, Any] = {"offered_rate": rate, "seconds": seconds, "events": len(schedule), "sink_role": sink,
                              "workers": n_workers}
    try:
        cpu0 = [w.cpu_seconds() for w in workers[:n_workers]]
        result["loadavg_at_start"] = list(os.getloadavg())
        t0 = time.time()
        behind_max = 0.0
        for offset, kind, key, value, tag in schedule:
            now = time.time() - t0
            # Sleep only when 2 ms ahead: a sleep per event cost the bench ~half a core at 10,000/s,
            # taken from the workers it measures on a 2-core machine.
            if offset > now + 0.002:
                time.sleep(offset - now)
            elif offset < now:
                behind_max = max(behind_max, now - offset)
            producer.produce(topics[kind], key=key, value=value)
            if tag is not None:
                published[tag] = time.time()
            producer.poll(0)
        producer.flush(60)
        t_pub_end = time.time()
        result["worker_cpu_share_while_paced"] = [round((w.cpu_seconds() - c) / (t_pub_end - t0), 3)
                                                  for w, c in zip(workers, cpu0)]
        window = [x for x in scraper.samples if t0 + warmup_s <= x["t"] <= t_pub_end]
        if len(window) >= 2:
            result["processed_rate_while_paced"] = round((window[-1]["consumed"] - window[0]["consumed"])
                                                         / (window[-1]["t"] - window[0]["t"]))
        result["producer"] = {"achieved_rate": round(len(schedule) / (t_pub_end - t0)), "max_behind_schedule_s": round(behind_max, 3)}
        log(f"{phase}: paced {len(schedule):,} events in {t_pub_end - t0:.1f} s")
        # Drain: wait until every outcome shows in a decision, every kill switch is out and
        # (with the sink) every distinct event is in ClickHouse, or the deadline.
        last_rank: dict[str, int] = {}
        for tag in published:
            if tag[0] == "o":
                last_rank[tag[1]] = max(last_rank.get(tag[1], -1), tag[2])
        sink_target = sum(corpus.distinct[:n_bg]) + sum(len(r.schedule) for r in regressions)
        deadline = time.time() + max(30.0, seconds)
        t_sink_drained = None
        while time.time() < deadline:
            counts: dict[str, int] = defaultdict(int)
            for _, d in decisions.snapshot():
                counts[d["experiment_id"]] = max(counts[d["experiment_id"]], sum(d["outcome_fates"].values()))
            if sink and t_sink_drained is None:
                t_sink_drained = scraper.first_time("sink_rows", sink_target)
            if all(counts[e] > k for e, k in last_rank.items()) and len(kills.snapshot()) >= len(regressions) \
                    and (not sink or t_sink_drained is not None):
                break
            time.sleep(1.0)
        if sink:
            result["sink"] = sink_figures(scraper, t0 + warmup_s, t_pub_end, t0)
            result["sink"]["rows_expected"] = sink_target
            result["sink"]["drained_after_producer_stopped_s"] = (round(t_sink_drained - t_pub_end, 1)
                                                                  if t_sink_drained else None)
        result["decision_latency"] = decision_latency(decisions.snapshot(), published, t0 + warmup_s, t_pub_end)
        result["killswitch_latency"] = killswitch_latency(kills.snapshot(), published, regressions)
        result["stage1_input_lag_max"] = max((s["stage1_input_lag"] for s in scraper.samples), default=None)
        result["stage1_batches"] = [batch_histograms(w) for w in workers[:n_workers]]
        result["worker_rss_mb"] = [round(w.rss_bytes() / 2**20, 1) for w in workers[:n_workers]]
        return result
    finally:
        scraper.stop()
        decisions.stop()
        kills.stop()
        for w in workers:
            w.stop()


def batch_histograms(worker: Worker) -> dict:
    """A worker's stage-1 batch histograms over the whole run: count, mean and the cumulative
    share at each bucket bound (where the engine's time goes: folding, or waiting to be read)."""
    samples = worker.metrics()
    out = {}
    series = [(name, {}) for name in ("abstream_batch_seconds", "abstream_batch_delay_seconds", "abstream_batch_events")]
    series += [("abstream_batch_phase_seconds", {"phase": phase}) for phase in ("fold", "state_write", "producer_flush")]
    series += [("abstream_gc_pause_seconds", {"generation": generation}) for generation in ("0", "1", "2")]
    for name, labels in series:
        count = metric_sum(samples, f"{name}_count", **labels)
        total = metric_sum(samples, f"{name}_sum", **labels)
        buckets = {b["le"]: value for b, value in samples.get(f"{name}_bucket", []) if all(b.get(k) == v for k, v in labels.items())}
        out[name + "".join(f"{{{k}={v}}}" for k, v in labels.items())] = {
            "count": count, "mean": round(total / count, 4) if count else None,
            "share_at_or_below": {le: round(v / count, 3) for le, v in buckets.items()} if count else {}}
    return out


def percentiles(values: list[float]) -> dict:
    import numpy as np

    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=float)
    finite = a[np.isfinite(a)]
    out = {"count": int(a.size), "missing": int(a.size - finite.size)}
    for q in (50, 95, 99):
        v = float(np.percentile(a, q, method="higher"))
        out[f"p{q}_s"] = round(v, 3) if math.isfinite(v) else None
    out["max_s"] = round(float(finite.max()), 3) if finite.size else None
    return out


def decision_latency(decisions: list[tuple[float, dict]], published: dict[tuple, float], from_t: float, to_t: float) -> dict:
    """Per distinct outcome published in [from_t, to_t]: the Kafka time of the first decision of
    its experiment whose outcome-fate total is > its rank k, minus its publication time."""
    by_experiment: dict[str, list[tuple[float, int]]] = defaultdict(list)
    for ts, d in sorted(decisions, key=lambda x: x[0]):
        by_experiment[d["experiment_id"]].append((ts, sum(d["outcome_fates"].values())))
    latencies, when = [], []
    for tag, t_pub in published.items():
        if tag[0] != "o" or not from_t <= t_pub <= to_t:
            continue
        _, experiment, k = tag
        seen = next((ts for ts, count in by_experiment.get(experiment, []) if count > k and ts >= t_pub - 0.005), None)
        latencies.append(seen - t_pub if seen is not None else math.inf)
        when.append((t_pub - from_t, experiment))
    out = percentiles(latencies)
    # When the slowest 1% were published (seconds into the window, and their experiments):
    # stalls of the whole worker show as a cluster in time, a slow experiment as one name.
    slowest = sorted(range(len(latencies)), key=latencies.__getitem__)[-max(1, len(latencies) // 100):] if latencies else []
    out["slowest_1pct"] = {
        "published_at_s": sorted({round(when[i][0]) for i in slowest}),
        "experiments": dict(Counter(when[i][1] for i in slowest).most_common(5))}
    out["method"] = (
        "Each experiment's outcomes are ranked in publication order (distinct ones only). The k-th outcome counts "
        "as included in the first decision of its experiment whose outcome_fates total exceeds k (every distinct "
        "outcome processed is counted under exactly one fate; partitions are consumed concurrently, so this is "
        "exact up to the order in which partitions are read). latency = that decision's Kafka timestamp "
        "(CreateTime, set when the worker publishes it) - the outcome's publication time (taken at produce()). "
        "Outcomes published after the warm-up and before the paced producer stopped; a missing one counts as "
        "infinite.")
    return out


def killswitch_latency(kills: list[tuple[float, dict]], published: dict[tuple, float], regressions: list[Regression]) -> dict:
    values, per = [], []
    for i, reg in enumerate(regressions):
        t_breach = published.get(("b", i))
        t_kill = next((ts for ts, k in kills if k["experiment_id"] == reg.experiment_id and k["action"] == "kill"), None)
        lat = (t_kill - t_breach) if (t_kill is not None and t_breach is not None) else math.inf
        values.append(lat)
        per.append({"experiment": reg.experiment_id, "latency_s": round(lat, 3) if math.isfinite(lat) else None})
    out = percentiles(values)
    out["per_experiment"] = per
    out["method"] = (
        f"{len(regressions)} experiments, each with guardrail latency_p95 > {P95_THRESHOLD_MS:g} ms "
        f"(min_count {MIN_COUNT}, action kill): 300 predictions per variant at 40 ms, then treatment predictions "
        "at 1000 ms (50/s) starting at staggered times inside the paced load. The breaching event is the first "
        "treatment prediction after which numpy's p95 (method lower, what the engine's DDSketch approximates "
        "within 2%) of the treatment's published latencies exceeds the threshold. latency = the kill-switch "
        "record's Kafka timestamp - that prediction's publication time.")
    return out


def sink_figures(scraper: Scraper, from_t: float, to_t: float, t0: float) -> dict:
    import numpy as np

    window = [s for s in scraper.samples if from_t <= s["t"] <= to_t and s["sink_lag_s"] is not None]
    if len(window) < 2:
        return {"error": "too few samples in the steady window"}
    rows_rate = (window[-1]["sink_rows"] - window[0]["sink_rows"]) / (window[-1]["t"] - window[0]["t"])
    lags = np.array([s["sink_lag_s"] for s in window])
    backlog = np.array([s["sink_input_lag"] for s in window])
    return {
        "rows_per_s": round(rows_rate), "sink_lag_s": {"p50": round(float(np.median(lags)), 3),
                                                       "p95": round(float(np.percentile(lags, 95)), 3),
                                                       "max": round(float(lags.max()), 3)},
        "sink_input_lag_messages": {"p50": float(np.median(backlog)), "max": float(backlog.max())},
        "window_s": [round(window[0]["t"] - t0, 1), round(window[-1]["t"] - t0, 1)],
        "method": "one worker and `abstream sink` (the sink role in a process of its own, chdb embedded) under "
                  "the paced load. Scraped /metrics every 1 s; steady window = after the warm-up "
                  "until the paced producer stopped. rows/s = slope of abstream_sink_rows_total over the raw tables; "
                  "abstream_sink_lag_seconds and abstream_input_lag_messages{role=\"sink\"} sampled (the latter is "
                  "refreshed by the sink every 5 s).",
    }


# --------------------------------------------------------------------------------------
# 4. memory at a fixed unit population


def memory_run(bench: Bench, n_events: int, n_units: int, timeout_s: float) -> dict:
    """One worker; first one assignment per unit (the whole population), then predictions,
    shadow runs and outcomes for random units of that population, until n_events in all.
    Payloads are spliced from per-unit templates (a fixed-width event_id), so the producer
    outruns the worker; RSS read from /proc when abstream_events_consumed_total passes N/2, N."""
    experiments = [f"mem-{i}" for i in range(4)]
    configs = [experiment_config(e) for e in experiments]
    settings = bench.settings("memory")
    bench.prepare(settings, configs)
    [worker] = bench.start_workers(settings, 1)
    scraper = Scraper([worker], 1.0)
    scraper.start()
    codec = Codec()
    rng = random.Random(7)
    base_ms = 1_767_225_600_000
    placeholder = "#" * 12
    topics = {kind: topic_of(settings, kind) for kind in EventKind}
    result: dict[str, Any] = {"events": n_events, "units": n_units, "experiments": len(experiments)}
    try:
        time.sleep(2.0)
        rss_idle = worker.rss_bytes()
        producer = make_bench_producer(settings)
        templates: list[tuple[bytes, list[tuple[EventKind, bytes, bytes]]]] = []
        for u in range(n_units):
            experiment = experiments[u % len(experiments)]
            unit = f"m{u:08d}"
            variant = "control" if rng.random() < 0.5 else "treatment"
            t_ms = base_ms + u
            common = {"event_time": t_ms, "experiment_id": experiment, "unit_id": unit}
            producer.produce(topics[EventKind.ASSIGNMENT], key=unit.encode(), value=codec.encode(
                EventKind.ASSIGNMENT, {"event_id": f"a{u:011d}", **common, "variant": variant, "allocation_version": 1,
                                       "segment": {"country": "de", "platform": "web"}}))
            per_unit = []
            for kind, record in (
                (EventKind.PREDICTION, {"request_id": "r", "variant": variant, "model_name": "ranker",
                                        "model_version": variant, "score": 0.25 + 0.5 * rng.random(), "label": None,
                                        "latency_ms": 20 + 40 * rng.random(), "status": "ok"}),
                (EventKind.SHADOW, {"request_id": "r", "champion_model": "ranker", "champion_version": "v1",
                                    "challenger_model": "ranker", "challenger_version": "v3", "champion_score": 0.3,
                                    "challenger_score": 0.32, "champion_label": None, "challenger_label": None,
                                    "champion_latency_ms": 30.0, "challenger_latency_ms": 33.0, "challenger_status": "ok"}),
                (EventKind.OUTCOME, {"metric": "revenue", "value": float(rng.randint(1, 40)), "request_id": None}),
            ):
                encoded = codec.encode(kind, {"event_id": placeholder, **common, **record, "event_time": t_ms + 60_000})
                cut = encoded.index(placeholder.encode())
                per_unit.append((kind, encoded[:cut], encoded[cut + len(placeholder):]))
            templates.append((unit.encode(), per_unit))
            if u % 10000 == 9999:
                producer.poll(0)
        producer.flush(120)
        pop_deadline = time.time() + timeout_s
        while scraper.first_time("consumed", n_units) is None and time.time() < pop_deadline:
            time.sleep(1.0)
        time.sleep(1.0)
        rss_population = worker.rss_bytes()
        log(f"memory: population of {n_units:,} units in; RSS {rss_population / 2**20:.0f} MiB (idle {rss_idle / 2**20:.0f})")
        t0 = time.time()
        kinds_weights = (0, 0, 0, 0, 0, 0, 1, 1, 2, 2)  # 60% predictions, 20% shadow, 20% outcomes
        n_rest = n_events - n_units
        for i in range(n_rest):
            key, per_unit = templates[rng.randrange(n_units)]
            kind, head, tail = per_unit[kinds_weights[i % 10]]
            value = head + f"{i:012d}".encode() + tail
            while True:
                try:
                    producer.produce(topics[kind], key=key, value=value)
                    break
                except BufferError:
                    producer.poll(0.01)
        producer.flush(300)
        log(f"memory: published {n_rest:,} more events in {time.time() - t0:.1f} s")
        marks = {}
        deadline = time.time() + timeout_s
        for label, target in (("half", n_events // 2), ("full", n_events)):
            while time.time() < deadline and scraper.first_time("consumed", target) is None:
                if worker.process.poll() is not None:
                    raise RuntimeError(f"worker exited: {worker.log_path.read_text()[-2000:]}")
                time.sleep(0.5)
            if scraper.first_time("consumed", target) is None:
                break
            marks[label] = {"after_s": round(time.time() - t0, 1), "rss_mb": round(worker.rss_bytes() / 2**20, 1),
                            "consumed": scraper.samples[-1]["consumed"]}
            log(f"memory: {label} ({target:,} events): RSS {marks[label]['rss_mb']} MiB")
        result["marks"] = marks
        result["complete"] = "full" in marks
        if "half" in marks and "full" in marks:
            result["rss_growth_half_to_full"] = round(marks["full"]["rss_mb"] / marks["half"]["rss_mb"] - 1, 4)
        # The unit-state gauge is refreshed every 10 s by the retention timer.
        t_gauge = time.time()
        while time.time() < t_gauge + 25 and not any(s["t"] > t_gauge + 11 for s in scraper.samples):
            time.sleep(1)
        unit_states = scraper.samples[-1]["unit_states"] if scraper.samples else None
        result["unit_states_gauge"] = unit_states
        result["rss_idle_mb"] = round(rss_idle / 2**20, 1)
        result["rss_after_population_mb"] = round(rss_population / 2**20, 1)
        if unit_states:
            result["rss_per_unit_bytes_after_population"] = round((rss_population - rss_idle) / unit_states)
            if "full" in marks:
                result["rss_per_unit_bytes_at_n"] = round((marks["full"]["rss_mb"] * 2**20 - rss_idle) / unit_states)
        result["events_per_unit_at_half_and_full"] = [round(n_events / 2 / n_units, 1), round(n_events / n_units, 1)]
        written = state_log_figures(settings)
        result["state_log"] = written
        if written.get("newest_snapshot_bytes") and unit_states:
            result["snapshot_bytes_per_unit"] = round(written["newest_snapshot_bytes"] / unit_states)
        result["method"] = (
            "one worker (no sink). Population: one assignment per unit (4 experiments), then predictions 60%, "
            "shadow runs 20%, outcomes 20% for units drawn uniformly from that population, published as fast as "
            "possible (the worker consumes a backlog). RSS = VmRSS of the worker process when the scraped "
            "abstream_events_consumed_total first reaches N/2 and N (assignments included in N). rss_per_unit = "
            "(RSS - RSS of the idle worker) / abstream_unit_states. snapshot_bytes_per_unit = the newest snapshot of "
            "every partition in the stage-1 state log (its chunks' bytes) / abstream_unit_states: a unit state's stored "
            "size.")
        return result
    finally:
        scraper.stop()
        worker.stop()


def state_log_figures(settings: Settings) -> dict:
    """Every record of the stage-1 state log (streams/state_log.py) after a run: records and
    bytes (value + headers), transactions by type, and the bytes of each partition's newest
    snapshot (its chunks), read raw without claiming anything."""
    topic = settings.topic(STAGE1_STATE)
    consumer = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}bench-state",
                                                 "enable.auto.commit": "false"}))
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or not meta.partitions:
            return {"error": f"no topic {topic}"}
        records = size = 0
        by_type: dict[str, int] = defaultdict(int)
        snapshot_bytes: dict[int, int] = {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, p, low)])
            chunk_bytes: dict[str, int] = defaultdict(int)
            position = low
            while position < high:
                for m in consumer.consume(num_messages=5000, timeout=5):
                    if m.error() is not None:
                        continue
                    headers = dict(m.headers() or [])
                    length = len(m.value() or b"") + sum(len(k) + len(v or b"") for k, v in headers.items())
                    records, size, position = records + 1, size + length, m.offset() + 1
                    txn = (headers.get("txn") or b"").decode()
                    if headers.get("kind") == b"chunk":
                        chunk_bytes[txn] += len(m.value() or b"")
                    elif headers.get("kind") == b"commit":
                        kind = headers["type"].decode()
                        by_type[kind] += 1
                        if kind == "snapshot":
                            snapshot_bytes[p] = chunk_bytes[txn]
        return {"records": records, "bytes": size, "transactions": dict(by_type),
                "newest_snapshot_bytes": sum(snapshot_bytes.values()) if snapshot_bytes else None}
    finally:
        consumer.close()


# --------------------------------------------------------------------------------------
# machine, targets, table


def machine() -> dict:
    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    mem_kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal:"))
    cpu_model = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                      if l.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "streams", "analysis", "schemas"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr.splitlines()
    return {
        "cores": os.cpu_count(), "cpu_model": cpu_model, "memory_gib": round(mem_kb / 2**20, 1),
        "loadavg_at_start": list(os.getloadavg()), "python": platform.python_version(),
        "kafka": local_kafka.KAFKA_VERSION, "java": java[0] if java else None,
        "faust_streaming": version("faust-streaming"), "aiokafka": version("aiokafka"),
        "confluent_kafka": version("confluent-kafka"), "fastavro": version("fastavro"), "chdb": version("chdb"),
        "numpy": version("numpy"),
        "git_commit": commit, "engine_tree_dirty": bool(dirty),
        # The last change to the engine the figures measure (a bench-only commit moves git_commit).
        "engine_last_commit": subprocess.run(["git", "log", "-1", "--format=%h %s", "--", "streams", "schemas"], cwd=ROOT,
                                             capture_output=True, text=True).stdout.strip(),
    }


def scaling(bench: Bench, corpus: Corpus, worker_cores: float) -> dict:
    """One and two workers, each held to the same share of a core (a cgroup quota): whether
    the engine scales out, apart from how many cores this machine has for them."""
    why_not = CpuLimit.unavailable()
    if why_not is not None:
        log(f"scaling: skipped, {why_not}")
        return {"available": False, "why": why_not}
    out: dict[str, Any] = {"worker_cores": worker_cores}
    for key, n, phase in (("one_worker", 1, "sc1"), ("two_workers", 2, "sc2")):
        out[key] = throughput(bench, corpus, n, phase, worker_cores=worker_cores)
        log(f"scaling: {n} worker(s) at {worker_cores:g} core each: {out[key].get('rate') or 0:,.0f}/s")
    one, two = out["one_worker"].get("rate"), out["two_workers"].get("rate")
    if one and two:
        out["two_vs_one"] = round(two / one, 3)
    out["method"] = (f"the throughput part's measurement, each worker process in a cgroup of its own with a CPU quota of "
                     f"{worker_cores:g} core (CFS bandwidth, all its threads), so that two workers need no more cores "
                     f"than the machine has beside the broker and the producer. two_vs_one near 2 says nothing is "
                     f"shared between workers but the broker; it is not the issue's figure, which is the throughput "
                     f"part's two_vs_one (unlimited workers on this machine's cores)")
    return out


def pair_figures(pairs: list[tuple[dict, dict]], decode: dict | None) -> dict:
    """The throughput figures of the one- and two-worker runs measured in pairs: each pair's
    ratio and bound (``pairs``), and the median pair's runs whole (``one_worker``,
    ``two_workers``) with its ratio (``two_vs_one``) and bound; the one-worker rate against
    the decode ceiling is the median of all one-worker runs."""
    out: dict[str, Any] = {"pairs": []}
    complete = []
    for i, (one, two) in enumerate(pairs, 1):
        row: dict[str, Any] = {"pair": i}
        for key, run in (("one_worker", one), ("two_workers", two)):
            row[key] = {k: run.get(k) for k in ("rate", "seconds", "rate_after_publish", "worker_cpu_share",
                                                 "cpu_seconds", "loadavg_at_start")}
            row[key]["cpu_seconds"] = {k: v for k, v in (run.get("cpu_seconds") or {}).items() if k != "method"}
        if one.get("rate") and two.get("rate"):
            row["two_vs_one"] = round(two["rate"] / one["rate"], 3)
            row["two_vs_one_cpu_bound"] = two_vs_one_cpu_bound(one, two)["bound"]
            row["worker_cpu_two_over_one"] = worker_cpu_two_over_one(one, two)
            if one.get("rate_after_publish") and two.get("rate_after_publish"):
                row["two_vs_one_after_publish"] = round(two["rate_after_publish"] / one["rate_after_publish"], 3)
            complete.append((row["two_vs_one"], i))
        out["pairs"].append(row)
    ones = sorted(one["rate"] for one, _ in pairs if one.get("rate"))
    if ones and decode:
        out["one_worker_vs_decode"] = round(ones[(len(ones) - 1) // 2] / decode["rate"], 3)
    if not complete:
        return out
    ratio, i = sorted(complete)[(len(complete) - 1) // 2]  # the lower median: a pair that was measured
    one, two = pairs[i - 1]
    out.update({"median_pair": i, "one_worker": one, "two_workers": two, "two_vs_one": ratio,
                "two_vs_one_cpu_bound": two_vs_one_cpu_bound(one, two),
                "worker_cpu_two_over_one": worker_cpu_two_over_one(one, two)})
    if one.get("rate_after_publish") and two.get("rate_after_publish"):
        out["two_vs_one_after_publish"] = round(two["rate_after_publish"] / one["rate_after_publish"], 3)
    if decode:
        out["one_worker_vs_decode_per_cpu_s"] = round(one["rate_per_worker_cpu_s"] / decode["rate_per_cpu_s"], 3)
    out["method"] = ("one worker and two workers measured back to back, `pairs` times, each run on topics of its "
                     "own after the warm-up; two_vs_one is the median of the pairs' ratios (the lower one for an even "
                     "count) and one_worker, two_workers, two_vs_one_cpu_bound and two_vs_one_after_publish are that "
                     "pair's; one_worker_vs_decode is the (lower) median of the one-worker rates over the decode "
                     "ceiling; worker_cpu_two_over_one = the two workers' CPU-seconds over the one worker's for the "
                     "same events: 1.0 when scaling out costs no extra work per event, whatever the cores")
    return out


def worker_cpu_two_over_one(one: dict, two: dict) -> float | None:
    ones, twos = (run.get("cpu_seconds", {}).get("workers") for run in (one, two))
    return round(sum(twos) / sum(ones), 3) if ones and twos and sum(ones) else None


def two_vs_one_cpu_bound(one: dict, two: dict) -> dict:
    """The most two workers could gain over one on this machine, given the CPU their run needed."""
    used = two["cpu_seconds"]
    ours = sum(used["workers"]) + used["broker"] + used["bench_process"]
    fastest_s = ours / used["cores"]
    return {
        "bound": round(one["seconds"] / fastest_s, 3),
        "two_workers_run_cpu_s": round(ours, 2), "cores": used["cores"],
        "machine_busy_share": round(used["machine_busy"] / (used["cores"] * two["seconds"]), 3),
        "method": "the two-worker run's processes (both workers, the broker, this process publishing the corpus) "
                  "needed two_workers_run_cpu_s CPU-seconds; on `cores` cores that work takes at least "
                  "two_workers_run_cpu_s / cores seconds, whatever the engine does, so two workers cannot beat one "
                  "by more than bound = one-worker seconds / that. An upper bound: it leaves out the neighbours' "
                  "load (machine_busy_share near 1 says the cores were saturated) and the fixed decision cadence "
                  "at the end of a run"}


def targets(report: dict) -> list[dict]:
    out = []

    def add(name: str, target: str, measured: Any, passed: bool | None) -> None:
        out.append({"name": name, "target": target, "measured": measured, "pass": passed})

    tp = report.get("throughput", {})
    if "one_worker_vs_decode" in tp:
        add("one worker vs decode ceiling", ">= 0.50", tp["one_worker_vs_decode"], tp["one_worker_vs_decode"] >= 0.5)
    if "two_vs_one" in tp:
        add("two workers vs one", ">= 1.5", tp["two_vs_one"], tp["two_vs_one"] >= 1.5)
    lat = report.get("latency", {})
    for key, name in (("decision_latency", "decision p99 at offered load"), ("killswitch_latency", "kill-switch p99 at offered load")):
        if key in lat:
            p99 = lat[key].get("p99_s")
            add(name, "<= 1 s", p99, p99 is not None and p99 <= 1.0)
    mem = report.get("memory", {})
    if "rss_growth_half_to_full" in mem:
        g = mem["rss_growth_half_to_full"]
        add("RSS growth N/2 -> N, fixed units", "<= 10%", g, g <= 0.10)
    elif mem:
        add("RSS growth N/2 -> N, fixed units", "<= 10%", None, False)
    sink = report.get("sink", {}).get("sink", {})
    if "sink_lag_s" in sink:
        add("sink lag at steady state (p95 of 1 s samples)", "<= 5 s", sink["sink_lag_s"]["p95"], sink["sink_lag_s"]["p95"] <= 5.0)
    return out


def table(report: dict) -> str:
    rows = []
    c = report.get("ceilings", {})
    if "decode" in c:
        rows.append(("decode ceiling (Codec().decode, 1 process)", f"{c['decode']['rate']:,.0f} ev/s"))
    if c.get("raw_consume", {}).get("rate"):
        rows.append(("raw consume ceiling (bare aiokafka)", f"{c['raw_consume']['rate']:,.0f} ev/s"))
    tp = report.get("throughput", {})
    for key, label in (("one_worker", "throughput, 1 worker (median pair)"), ("two_workers", "throughput, 2 workers (median pair)")):
        if tp.get(key, {}).get("rate"):
            r = tp[key]
            rows.append((label, f"{r['rate']:,.0f} ev/s (steady {r['steady_rate'] or 0:,.0f}, "
                                f"after publishing {r.get('rate_after_publish') or 0:,.0f})"))
    if "one_worker_vs_decode" in tp:
        rows.append(("1 worker / decode ceiling (median of the runs)", f"{tp['one_worker_vs_decode']:.2f}"))
    if "one_worker_vs_decode_per_cpu_s" in tp:
        rows.append(("1 worker / decode ceiling, per CPU-second", f"{tp['one_worker_vs_decode_per_cpu_s']:.2f}"
                     f" (worker CPU share {tp['one_worker'].get('worker_cpu_share')})"))
    if len(tp.get("pairs", [])) > 1:
        for row in tp["pairs"]:
            one, two = row["one_worker"].get("rate"), row["two_workers"].get("rate")
            rows.append((f"pair {row['pair']}: 1 worker, 2 workers, ratio (bound)",
                         f"{one or 0:,.0f}, {two or 0:,.0f} ev/s, {row.get('two_vs_one') or 0:.2f} "
                         f"({row.get('two_vs_one_cpu_bound') or 0:.2f})"))
    if "two_vs_one" in tp:
        rows.append((f"2 workers / 1 worker (pair {tp['median_pair']}, the median)", f"{tp['two_vs_one']:.2f}"
                     f" (worker CPU shares {tp['two_workers'].get('worker_cpu_share')})"))
    if "two_vs_one_after_publish" in tp:
        rows.append(("2 workers / 1 worker, after publishing", f"{tp['two_vs_one_after_publish']:.2f}"))
    if tp.get("worker_cpu_two_over_one"):
        rows.append(("workers' CPU-seconds, 2 workers / 1 worker, same events", f"{tp['worker_cpu_two_over_one']:.2f}"))
    sc = report.get("scaling", {})
    if "two_vs_one" in sc:
        rows.append((f"2 workers / 1 worker, each held to {sc['worker_cores']:g} core", f"{sc['two_vs_one']:.2f} "
                     f"({sc['one_worker']['rate']:,.0f} -> {sc['two_workers']['rate']:,.0f} ev/s)"))
    elif sc.get("available") is False:
        rows.append(("scaling at a fixed CPU quota per worker", "not measured: " + sc["why"]))
    if "two_vs_one_cpu_bound" in tp:
        b = tp["two_vs_one_cpu_bound"]
        rows.append(("2 workers / 1 worker, the most this machine allows (median pair)", f"{b['bound']:.2f} ({b['two_workers_run_cpu_s']} "
                     f"CPU-s on {b['cores']} cores; cores busy {b['machine_busy_share']:.0%})"))
    lat = report.get("latency", {})
    if "processed_rate_while_paced" in lat:
        rows.append((f"worker processed while {lat['offered_rate']:,.0f} ev/s offered", f"{lat['processed_rate_while_paced']:,} ev/s"))
    fmt = lambda v: "inf" if v is None else f"{v:.2f}"
    more = lat.get("more_workers", {})
    # A worker's CPU below capacity follows its batches per second, not its events (tenth round).
    for run in (lat, more, lat.get("below_capacity", {})):
        if "worker_cpu_share_while_paced" in run:
            rows.append((f"worker CPU (share of a core) @ {run['offered_rate']:,.0f} ev/s, {run['workers']} worker(s)",
                         ", ".join(f"{c:.2f}" for c in run["worker_cpu_share_while_paced"])))
    for run, suffix in ((lat, f", {lat.get('workers')} worker(s)"), (more, f", {more.get('workers')} workers"),
                        (lat.get("below_capacity", {}), " (below capacity)")):
        for key, label in (("decision_latency", "decision latency p50/p95/p99"), ("killswitch_latency", "kill-switch latency p50/p95/p99")):
            if key in run:
                d = run[key]
                rows.append((f"{label} @ {run['offered_rate']:,.0f} ev/s{suffix}",
                             f"{fmt(d.get('p50_s'))} / {fmt(d.get('p95_s'))} / {fmt(d.get('p99_s'))} s (n={d['count']})"))
    s = report.get("sink", {})
    if "processed_rate_while_paced" in s:
        rows.append((f"stage 1 beside `abstream sink`, {s['offered_rate']:,.0f} ev/s offered",
                     f"{s['processed_rate_while_paced']:,} ev/s"))
    mem = report.get("memory", {})
    if mem.get("marks"):
        m = mem["marks"]
        rows.append((f"RSS at N/2, N (N={mem['events']:,}, {mem['units']:,} units)",
                     f"{m.get('half', {}).get('rss_mb', '?')} / {m.get('full', {}).get('rss_mb', '?')} MiB"
                     + (f" ({mem['rss_growth_half_to_full']:+.1%})" if "rss_growth_half_to_full" in mem else "")))
        rows.append(("unit state: RSS/unit, snapshot bytes/unit",
                     f"{mem.get('rss_per_unit_bytes_at_n', '?')} B, {mem.get('snapshot_bytes_per_unit', '?')} B"))
    s = report.get("sink", {}).get("sink", {})
    if "rows_per_s" in s:
        rows.append(("sink rows/s, lag p50/max", f"{s['rows_per_s']:,} rows/s, {s['sink_lag_s']['p50']:.1f} / {s['sink_lag_s']['max']:.1f} s"))
    for t in report.get("targets", []):
        rows.append((f"target: {t['name']} {t['target']}", f"{'PASS' if t['pass'] else 'FAIL'} ({t['measured']})"))
    width = max(len(r[0]) for r in rows) if rows else 0
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


# --------------------------------------------------------------------------------------


_FAUST_HOOK = """
import json, os
import faust
_overrides = json.loads(os.environ.get("ABSTREAM_BENCH_FAUST_SETTINGS", "{}"))
_init = faust.App.__init__
def _patched(self, *args, **kwargs):
    kwargs.update(_overrides)
    _init(self, *args, **kwargs)
if _overrides:
    faust.App.__init__ = _patched
"""


def install_faust_overrides(work: Path, overrides: dict) -> None:
    """Experiments only (never the default run): workers start with these faust.App settings
    on top of the engine's, through a sitecustomize on their PYTHONPATH; streams/ is unchanged."""
    hook = work / "faust-hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(_FAUST_HOOK)
    os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (str(hook), os.environ.get("PYTHONPATH", "")) if x)
    os.environ["ABSTREAM_BENCH_FAUST_SETTINGS"] = json.dumps(overrides)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS),
                        help=f"comma-separated parts: {', '.join(PARTS)}, profile (default: all but profile)")
    # A million: at ~100,000 events/s a run of 300,000 took 3 s, a third of it fixed costs (the first
    # fetch, the decision cadence).
    parser.add_argument("--events", type=int, default=1_000_000, help="corpus size for ceilings and throughput")
    parser.add_argument("--rate", type=float, default=10_000, help="offered load of the latency and sink parts (events/s)")
    parser.add_argument("--latency-workers", type=int, default=1,
                        help="workers of the paced latency run (the target); a 30 s run with one more is reported beside it")
    parser.add_argument("--latency-s", type=float, default=60, help="duration of the paced latency run")
    parser.add_argument("--sink-s", type=float, default=45, help="duration of the paced sink run")
    parser.add_argument("--low-rate", type=float, default=1500,
                        help="a second, shorter latency run below capacity (0: skip)")
    parser.add_argument("--regressions", type=int, default=8, help="kill-switch experiments in the latency run")
    parser.add_argument("--memory-events", type=int, default=10_000_000,
                        help="N of the memory part; RSS is read at N/2 and N (the issue's 5 and 10 million)")
    parser.add_argument("--memory-units", type=int, default=100_000, help="fixed unit population of the memory part")
    parser.add_argument("--memory-timeout-s", type=float, default=2400)
    parser.add_argument("--profile-s", type=float, default=20)
    parser.add_argument("--faust-settings", default="",
                        help="experiments only: JSON of faust.App settings added to the workers' (e.g. "
                             "'{\"producer_max_batch_size\": 1048576}'); recorded in the JSON")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("--port", type=int, default=0, help="broker port (default: a free one)")
    parser.add_argument("--pairs", type=int, default=3,
                        help="one- and two-worker throughput runs measured back to back, this many times (median reported)")
    parser.add_argument("--scaling-worker-cores", type=float, default=0.4,
                        help="CPU quota of each worker in the scaling part (cores)")
    args = parser.parse_args()
    parts = [p.strip() for p in args.only.split(",") if p.strip()]
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    unknown = set(parts) - set(PARTS) - {"profile"}
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {', '.join(PARTS)}, profile")

    started = time.time()
    work = Path(f"/tmp/abstream-bench-{uuid.uuid4().hex[:8]}")
    if args.faust_settings:
        install_faust_overrides(work, json.loads(args.faust_settings))
    port = args.port or free_port()
    log(f"starting a broker on 127.0.0.1:{port} in {work / 'kafka'}")
    status = local_kafka.start(data_dir=work / "kafka", port=port, controller_port=free_port())
    report: dict[str, Any] = {"schema": "abstream-bench/1", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                              "parts": parts, "args": {k: str(v) for k, v in vars(args).items()}, "machine": machine()}
    try:
        bench = Bench(args, status.bootstrap, work)
        bench.broker_pid = status.pid
        corpus = None
        if {"ceilings", "throughput", "scaling", "latency", "sink", "profile"} & set(parts):
            t = time.perf_counter()
            n_corpus = max(args.events, int(args.rate * max(args.latency_s if "latency" in parts else 0,
                                                             args.sink_s if "sink" in parts else 0)))
            corpus = build_corpus(n_corpus)
            report["corpus"] = {
                "events": len(corpus), "by_kind": {k.value: corpus.kinds.count(k) for k in EventKind},
                "distinct_by_kind": corpus.distinct_by_kind, "experiments": len(corpus.units),
                "units": sum(corpus.units.values()), "value_bytes_mean": round(sum(map(len, corpus.values)) / len(corpus)),
                "build_s": round(time.perf_counter() - t, 1),
                "method": "streams.scenario.scenario_events for 4 experiments (true effect, A/A, slower model, 52/48 "
                          "assignment bug) + shadow_events on the first (10% of the volume), merged in arrival order, "
                          "encoded once with Codec().encode; every phase publishes the same bytes to its own topics"}
            log(f"corpus: {len(corpus):,} events, {report['corpus']['units']:,} units, built in {report['corpus']['build_s']} s")
        if "ceilings" in parts:
            report.setdefault("ceilings", {})["decode"] = decode_ceiling(corpus.slice(args.events))
            log(f"decode ceiling {report['ceilings']['decode']['rate']:,.0f}/s")
        tp_corpus = corpus.slice(args.events) if corpus else None
        if tp_corpus is not None:
            tp_corpus.units, tp_corpus.outcomes = truths(corpus, args.events)
        if "throughput" in parts:
            tp = report["throughput"] = {}
            # The broker is a fresh JVM: its JIT compiler ran for ~7 CPU-seconds over the first
            # two runs of a round, ~1 of them inside the two-worker run on cores it saturates.
            # A production broker has long since compiled its hot paths, so the measured runs
            # come after one whose figures are kept apart.
            warm = throughput(bench, tp_corpus, 1, "warm")
            tp["broker_warm_up"] = {
                "rate": warm.get("rate"), "seconds": warm.get("seconds"), "cpu_seconds": warm.get("cpu_seconds"),
                "method": "the one-worker run, on topics of its own, before the measured runs; not a figure of "
                          "the engine but of a fresh broker compiling its hot paths (broker_jit_compiler)"}
            log(f"broker warm-up: {warm.get('rate') or 0:,.0f}/s, broker JIT "
                f"{(warm.get('cpu_seconds') or {}).get('broker_jit_compiler')} CPU-s")
            # One and two workers measured back to back, args.pairs times: the neighbours' load on
            # a shared machine moves a single run's ratio by +-0.3 (1.18-1.88 over sixteen runs),
            # and a pair shares the load of its minute. The figures are the median pair's.
            pairs = []
            for i in range(1, args.pairs + 1):
                one = throughput(bench, tp_corpus, 1, f"tp1-{i}", raw_ceiling="ceilings" in parts and i == 1)
                if "raw_consume_ceiling" in one:
                    report.setdefault("ceilings", {})["raw_consume"] = one.pop("raw_consume_ceiling")
                    log(f"raw consume ceiling {report['ceilings']['raw_consume']['rate'] or 0:,.0f}/s")
                two = throughput(bench, tp_corpus, 2, f"tp2-{i}")
                pairs.append((one, two))
                log(f"pair {i}: one worker {one.get('rate') or 0:,.0f}/s, two workers {two.get('rate') or 0:,.0f}/s")
            tp.update(pair_figures(pairs, report.get("ceilings", {}).get("decode")))
            tp["ratios_note"] = ("one_worker_vs_decode and two_vs_one are wall-clock rates measured in this run (the "
                                 "targets); on a shared 2-core machine they move with the neighbours' load, so "
                                 "one_worker_vs_decode_per_cpu_s compares events per CPU-second of the worker with "
                                 "decodes per CPU-second, which the neighbours do not move")
        if "scaling" in parts:
            report["scaling"] = scaling(bench, tp_corpus, args.scaling_worker_cores)
        if "ceilings" in parts and "throughput" not in parts:
            settings = bench.settings("raw")
            bench.prepare(settings, [])
            publish_all(settings, tp_corpus)
            report["ceilings"]["raw_consume"] = raw_consume_ceiling(settings, len(tp_corpus))
        if "latency" in parts:
            configs, regressions = regression_experiments(args.regressions, first_s=15.0,
                                                          every_s=max(1.0, (args.latency_s - 25.0) / max(1, args.regressions)))
            report["latency"] = paced_run(bench, corpus, "latency", args.rate, args.latency_s, sink=False,
                                          regressions=regressions, extra_configs=configs, warmup_s=5.0,
                                          n_workers=args.latency_workers)
            report["latency"]["method"] = (
                f"{args.latency_workers} worker(s) without the sink role (--latency-workers); paced producer at the "
                "offered rate. One worker by default (worker_cpu_share_while_paced: the share of a core it took): on "
                "a 2-core machine that also runs the broker and the producer a second worker adds its own "
                "per-process work to the same two cores (see more_workers)")
            configs, regressions = regression_experiments(4, first_s=12.0, every_s=4.0)
            more = paced_run(bench, corpus, "latency-more", args.rate, 30.0, sink=False, regressions=regressions,
                             extra_configs=configs, warmup_s=5.0, n_workers=args.latency_workers + 1)
            more["method"] = "as latency with one more worker, 30 s, 4 kill-switch experiments; reported, not a target"
            report["latency"]["more_workers"] = more
            log(f"latency with {args.latency_workers + 1} workers: decision p99 {more['decision_latency'].get('p99_s')} s, "
                f"kill p99 {more['killswitch_latency'].get('p99_s')} s")
            if args.low_rate:
                # Below the worker's capacity the backlog stays empty: what is left is the engine's
                # own floor (batching, the partials hop, the decision cadence).
                configs, regressions = regression_experiments(4, first_s=12.0, every_s=4.0)
                low = paced_run(bench, corpus, "latency-low", args.low_rate, 30.0, sink=False,
                                regressions=regressions, extra_configs=configs, warmup_s=5.0)
                low["method"] = ("as latency, at an offered rate below one worker's capacity on this machine "
                                 "(--low-rate), 30 s, 4 kill-switch experiments; reported, not a target")
                report["latency"]["below_capacity"] = low
                log(f"latency at {args.low_rate:,.0f}/s: decision p99 {low['decision_latency'].get('p99_s')} s, "
                    f"kill p99 {low['killswitch_latency'].get('p99_s')} s")
            log(f"latency: decision p99 {report['latency']['decision_latency'].get('p99_s')} s, "
                f"kill p99 {report['latency']['killswitch_latency'].get('p99_s')} s")
        if "sink" in parts:
            report["sink"] = paced_run(bench, corpus, "sink", args.rate, args.sink_s, sink=True, regressions=[],
                                       extra_configs=[], warmup_s=10.0)
            sink_fig = report["sink"].get("sink", {})
            log(f"sink: {sink_fig.get('rows_per_s')} rows/s, lag {sink_fig.get('sink_lag_s')}")
        if "memory" in parts:
            report["memory"] = memory_run(bench, args.memory_events, args.memory_units, args.memory_timeout_s)
            if args.memory_events != 10_000_000:
                report["memory"]["note"] = (f"the issue asks N = 5 and 10 million; N here is --memory-events = "
                                            f"{args.memory_events:,}")
        if "profile" in parts:
            report["profile"] = throughput(bench, tp_corpus, 1, "profile", profile_s=args.profile_s)
            time.sleep(2)
            path = OUT_DIR / "profile-worker.txt"
            if path.exists():
                report["profile"]["pyspy"] = summarize_profile(path)
                report["profile"]["pyspy_file"] = str(path.relative_to(ROOT))
        report["targets"] = targets(report)
    finally:
        local_kafka.stop(data_dir=work / "kafka")
        report["duration_s"] = round(time.time() - started, 1)
        report["machine"]["loadavg_at_end"] = list(os.getloadavg())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(table(report))
    print(f"\nwritten {args.out} ({report['duration_s']:.0f} s)")
    return 0


def truths(corpus: Corpus, n: int) -> tuple[dict[str, int], dict[str, int]]:
    """Distinct exposed units and distinct outcomes per experiment in the first n messages."""
    codec = Codec()
    units: dict[str, set] = defaultdict(set)
    outcomes: dict[str, int] = defaultdict(int)
    for i in range(n):
        rank = corpus.outcome_rank[i]
        if rank is not None:
            outcomes[rank[0]] += 1
        if corpus.kinds[i] is EventKind.ASSIGNMENT:
            record = codec.decode(EventKind.ASSIGNMENT, corpus.values[i])
            units[record["experiment_id"]].add(record["unit_id"])
    return {e: len(u) for e, u in units.items()}, dict(outcomes)


if __name__ == "__main__":
    sys.exit(main())
