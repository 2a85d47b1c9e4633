"""The fault matrix (issue 7): real broker, real worker processes, embedded ClickHouse.

Each test publishes a known stream (a scenario with delayed outcomes and duplicates, plus
malformed messages and events of an experiment nobody defined), injects one fault while the
stream flows, lets the system settle (polls with deadlines), and then requires, exactly:

- the newest decision's statistics, outcome fates and assignment inconsistencies equal the
  ground truth computed from the published records (tests/test_engine.py's rules);
- every ClickHouse raw table holds one row per distinct valid event, the deadletter table one
  row per dead letter (read through the sink worker's /sql endpoint);
- the dead-letter topic holds every rejected message, with its reason and original bytes.

What is expected is never hard-coded: every published payload is classified with
``Codec().decode`` (and the experiment catalogue) exactly as stage 1 would judge it.
"""
from __future__ import annotations

import io
import json
import logging
import math
import random
import struct
import threading
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import fastavro
from aiokafka.partitioner import murmur2
import numpy as np
import pytest

from streams import local_kafka
from streams.client import EventPublisher
from streams.codec import Codec, ControlKind, DeadLetter, EventKind, LocalCatalogue
from streams.decisions import latest_decisions
from streams.experiments import ExperimentConfig, order, publish_config, start
from streams.processes import stop_worker, wait_healthy
from streams.scenario import ArmTruth, ExperimentScenario, scenario_events
from streams.settings import Settings
from streams.state_log import StateLog
from streams.simulate import malformed_payloads
from streams.topics import (ALERTS, DEADLETTER, INPUT_TOPICS, KILLSWITCH, PARTIALS, STAGE1_STATE, ensure_topics,
                           make_producer)
from streams.warehouse import RAW_TABLES
from tests.support import (CatalogueRegistry, clickhouse_fault_env, decisions_going_back, free_port, group_lag,
                           kill_worker, make_settings, partition_lag, published_decisions, read_all, rss_bytes,
                           start_worker_process, wait_until)
from tests.test_engine import (WINDOW_S, config_for, decision_statistics, ground_truth, served_decision, sql,
                               statistics_from_totals)
from tests.test_pipeline import scrape, total

pytestmark = pytest.mark.kafka

GHOST_EXPERIMENT = "ghost"
SETTLE_S = 150


# --- the stream: what is published and what must come out ---------------------------------

@dataclass(frozen=True)
class Outgoing:
    kind: EventKind           # the topic it is published to
    key: bytes | None
    value: bytes | None
    record: dict | None       # the generator's record, published through EventPublisher; else raw bytes


@dataclass
class Expected:
    """What the engine must end with for a list of outgoing messages, in publish order."""

    truths: dict[str, dict]
    statistics: dict[str, dict]
    rows: dict[str, int]                       # table -> rows
    dead: dict[int, str]                       # index of a dead message -> reason
    valid_records: dict[int, dict] = field(default_factory=dict)


def expected_outcome(messages: list[Outgoing], configs: dict[str, ExperimentConfig]) -> Expected:
    """Judge every payload as the engine must: the codec, then the experiment catalogue."""
    codec = Codec()
    by_experiment: dict[str, list] = defaultdict(list)
    distinct: dict[EventKind, set] = defaultdict(set)
    dead: dict[int, str] = {}
    valid: dict[int, dict] = {}
    for i, m in enumerate(messages):
        decoded = codec.decode(m.kind, m.value)
        if isinstance(decoded, DeadLetter):
            dead[i] = decoded.reason.value
            continue
        valid[i] = decoded
        distinct[m.kind].add((decoded["unit_id"], decoded["event_id"]))
        if decoded["experiment_id"] not in configs:
            dead[i] = "unknown_experiment"
        else:
            by_experiment[decoded["experiment_id"]].append((i, m.kind, decoded))
    truths = {e: ground_truth(events, WINDOW_S) for e, events in by_experiment.items()}
    statistics = {e: expected_statistics(configs[e], truth) for e, truth in truths.items()}
    rows = {table: len(distinct[kind]) for kind, table in RAW_TABLES.items()}
    rows["deadletter"] = len(dead)
    return Expected(truths, statistics, rows, dead, valid)


def expected_statistics(config: ExperimentConfig, truth: dict) -> dict:
    """(metric, variant) -> (units, sums), with numpy, for every variant a unit was exposed to."""
    names = {m.name for m in config.metrics}
    if names == {"conversion", "revenue"} and {v for v, _ in truth["exposure"].values()} <= {"control", "treatment"}:
        return statistics_from_totals(truth["exposure"], truth["totals"])
    assert names == {"conversion"}, "only conversion/revenue experiments are modelled here"
    result = {}
    for variant in sorted({v for v, _ in truth["exposure"].values()}):
        units = [u for u, (v, _) in truth["exposure"].items() if v == variant]
        conversion = np.array([truth["totals"].get((u, "conversion"), 0.0) for u in units])
        result[("conversion", variant)] = (len(units), [float(np.sum(conversion > 0))])
    return result


def scenario(experiment_id: str, units: int, seed: int) -> ExperimentScenario:
    return ExperimentScenario(experiment_id, {"control": ArmTruth(0.10), "treatment": ArmTruth(0.14, revenue_per_conversion=22)},
                              {"control": 0.5, "treatment": 0.5}, units=units, window_s=WINDOW_S, seed=seed)


def fault_stream(units: int = 2500, malformed: int = 60, ghosts: int = 20, seed: int = 1) -> tuple[list[Outgoing], dict]:
    """A scenario's events in arrival order (delayed outcomes, duplicates, inconsistent
    assignments), with malformed payloads and events of an undefined experiment mixed in."""
    s = scenario("fault", units, seed)
    codec = Codec()
    events = scenario_events(s)
    messages = [Outgoing(kind, r["unit_id"].encode(), codec.encode(kind, r), r) for _, kind, r in events]
    rng = random.Random(seed)
    extra = [Outgoing(kind, f"fault-u{rng.randrange(units):06d}".encode(), payload, None)
             for kind, payload in malformed_payloads(codec, malformed, seed=7)]
    for j, (_, kind, r) in enumerate(rng.sample(events, ghosts)):
        r = {**r, "experiment_id": GHOST_EXPERIMENT, "event_id": f"ghost-{j}"}
        extra.append(Outgoing(kind, r["unit_id"].encode(), codec.encode(kind, r), None))
    for m in extra:
        messages.insert(rng.randrange(len(messages) + 1), m)
    return messages, {"fault": config_for(s)}


# --- publishing while faults happen ---------------------------------------------------------

class Feeder(threading.Thread):
    """Publishes the stream at a steady rate, in order, while the test injects a fault.

    Valid events go through the client library's EventPublisher (idempotent producer, retries,
    delivery reports); payloads a service would never build (malformed bytes, hand-made
    events) through a plain producer of the same configuration, whose delivery reports give
    each one's (topic, partition, offset): the coordinates its dead letter must carry.
    """

    def __init__(self, settings: Settings, messages: list[Outgoing], rate_per_s: float):
        super().__init__(name="feeder", daemon=True)
        self.settings, self.messages, self.rate_per_s = settings, messages, rate_per_s
        self.sent = 0
        self.coordinates: dict[int, tuple[str, int, int]] = {}
        self.failures: list[str] = []
        self.publisher_stats = None
        self.error: BaseException | None = None
        self.stopping = threading.Event()  # set by a failing test's teardown

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # surfaced by finish()
            self.error = exc

    def _run(self) -> None:
        publisher = EventPublisher(self.settings, max_block_s=5.0)
        raw = make_producer(self.settings, logger=logging.getLogger("tests.feeder"))

        def report(index):
            def on_delivery(err, msg):
                if err is not None:
                    self.failures.append(err.str())
                else:
                    self.coordinates[index] = (msg.topic(), msg.partition(), msg.offset())
            return on_delivery

        started = time.monotonic()
        for i, m in enumerate(self.messages):
            if self.stopping.is_set():
                return
            pause = started + i / self.rate_per_s - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # pacing the stream, not waiting for a condition
            if m.record is not None:
                assert publisher.publish(m.kind, m.record), "EventPublisher dropped an event"
            else:
                while True:
                    try:
                        raw.produce(self.settings.topic(INPUT_TOPICS[m.kind]), key=m.key, value=m.value,
                                    on_delivery=report(i))
                        break
                    except BufferError:
                        raw.poll(0.1)
                raw.poll(0)
            self.sent = i + 1
        left = raw.flush(300) + publisher.close(300)
        self.publisher_stats = publisher.stats()
        if left:
            self.failures.append(f"{left} messages still undelivered")

    def finish(self, timeout_s: float = 360) -> None:
        self.join(timeout_s)
        assert not self.is_alive(), "the feeder did not finish"
        if self.error is not None:
            raise self.error
        assert not self.failures, self.failures[:3]
        stats = self.publisher_stats
        assert stats.failed == 0 and stats.dropped == 0 and stats.pending == 0, stats


def consumed(settings: Settings) -> float:
    try:
        return total(scrape(settings), "abstream_events_consumed_total")
    except OSError:
        return 0.0


# --- settling and the exact comparison ------------------------------------------------------

def input_topics(settings: Settings) -> list[str]:
    return [settings.topic(name) for name in INPUT_TOPICS.values()]


def table_counts(sink: Settings) -> dict[str, tuple[int, int]]:
    """table -> (rows, distinct identities)."""
    parts = [f"SELECT '{t}', count(), uniqExact(unit_id, event_id) FROM {{db}}.{t}" for t in RAW_TABLES.values()]
    parts.append("SELECT 'deadletter', count(), uniqExact(topic, partition, offset) FROM {db}.deadletter")
    return {name: (int(n), int(d)) for name, n, d in sql(sink, " UNION ALL ".join(parts))}


def decision_view(decision: dict | None) -> dict | None:
    if decision is None:
        return None
    return {"statistics": decision_statistics(decision), "outcome_fates": decision["outcome_fates"],
            "assignment_inconsistencies": decision["assignment_inconsistencies"]}


def expected_view(expected: Expected, experiment_id: str) -> dict:
    truth = expected.truths[experiment_id]
    return {"statistics": expected.statistics[experiment_id], "outcome_fates": truth["fates"],
            "assignment_inconsistencies": truth["inconsistencies"]}


def settle_and_check(settings: Settings, sink: Settings, expected: Expected, feeder: Feeder,
                     messages: list[Outgoing], timeout_s: float = SETTLE_S) -> dict:
    """Wait until both consumer groups have committed everything and the newest decisions and
    ClickHouse counts stop moving, then require every count to be exactly the expected one."""
    feeder.finish()
    inputs = input_topics(settings)
    state: dict = {}

    def settled() -> bool:
        state["worker_lag"] = group_lag(settings, f"{settings.topic_prefix}worker", inputs)
        state["sink_lag"] = group_lag(settings, f"{settings.topic_prefix}sink", inputs + [settings.topic(DEADLETTER)])
        decisions = latest_decisions(settings)
        state["decisions"] = {e: decision_view(decisions.get(e)) for e in expected.truths}
        try:
            state["counts"] = table_counts(sink)
        except urllib.error.HTTPError:
            return False  # the sink's ClickHouse still fails (the injected fault): not settled yet
        return (not any(state["worker_lag"].values()) and not any(state["sink_lag"].values())
                and all(state["decisions"][e] == expected_view(expected, e) for e in expected.truths)
                and {t: n for t, (n, _) in state["counts"].items()} == expected.rows)

    try:
        wait_until(settled, timeout_s, "the exact counts", interval_s=1.0)
    except AssertionError:
        pass  # the comparisons below say what differs
    assert not any(state["worker_lag"].values()), f"stage 1 did not commit everything: {state['worker_lag']}"
    assert not any(state["sink_lag"].values()), f"the sink did not commit everything: {state['sink_lag']}"
    for e in expected.truths:
        got, want = state["decisions"][e], expected_view(expected, e)
        assert got is not None, f"no decision for {e}"
        assert got["outcome_fates"] == want["outcome_fates"], e
        assert got["assignment_inconsistencies"] == want["assignment_inconsistencies"], e
        assert got["statistics"] == want["statistics"], e
    counts = state["counts"]
    assert {t: n for t, (n, _) in counts.items()} == expected.rows, "ClickHouse rows per table"
    assert all(n == d for n, d in counts.values()), f"duplicate rows in ClickHouse: {counts}"

    # A decision published later must not differ: evaluate once more after two cadences.
    time.sleep(2.5 * settings.decision_interval_s)
    decisions = latest_decisions(settings)
    for e in expected.truths:
        assert decision_view(decisions[e]) == expected_view(expected, e), f"a later decision of {e} moved"
    letters = check_deadletters(settings, expected, feeder, messages)
    return {"counts": counts, "letters": letters}


def check_deadletters(settings: Settings, expected: Expected, feeder: Feeder, messages: list[Outgoing]) -> int:
    """Every rejected message is in the dead-letter topic with its reason, key and bytes;
    returns the number of dead-letter messages (the caller decides whether repeats are allowed)."""
    letters = read_all(settings, settings.topic(DEADLETTER), timeout_s=30)
    by_source: dict[tuple[str, int, int], list] = defaultdict(list)
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers()}
        source = (headers["abstream.topic"], int(headers["abstream.partition"]), int(headers["abstream.offset"]))
        # A null value has no bytes to keep: its letter may carry b"" (Kafka refuses a record with
        # neither key nor value), as the deadletter table does.
        by_source[source].append((headers["abstream.reason"], bool(headers["abstream.detail"]), letter.key(),
                                  letter.value() or b""))
    want = {feeder.coordinates[i]: (reason, True, messages[i].key, messages[i].value or b"")
            for i, reason in expected.dead.items()}
    got = {source: entries[0] for source, entries in by_source.items()}
    assert set(got) == set(want), (f"dead letters: {len(set(want) - set(got))} missing, "
                                   f"{len(set(got) - set(want))} unexpected")
    wrong = [(s, got[s][0], want[s][0]) for s in want if got[s] != want[s]]
    assert not wrong, f"{len(wrong)} dead letters differ (reason, detail, key or bytes), e.g. {wrong[:3]}"
    assert all(len(set(entries)) == 1 for entries in by_source.values()), "repeated dead letters differ"
    return len(letters)


# --- per-test set-up ------------------------------------------------------------------------

@dataclass
class Cluster:
    settings: Settings
    tmp: Path
    workers: dict[str, object] = field(default_factory=dict)
    worker_settings: dict[str, Settings] = field(default_factory=dict)
    feeders: list[Feeder] = field(default_factory=list)

    def feed(self, messages: list[Outgoing], rate_per_s: float) -> Feeder:
        feeder = Feeder(self.settings, messages, rate_per_s)
        self.feeders.append(feeder)
        feeder.start()
        return feeder

    def start(self, name: str, *, sink: bool, env: dict | None = None, wait: bool = True):
        s = replace(self.settings, web_port=free_port(), home=self.tmp / name) if name not in self.worker_settings \
            else self.worker_settings[name]
        self.worker_settings[name] = s
        self.workers[name] = p = start_worker_process(s, sink=sink, log_path=self.tmp / f"{name}.log", env=env)
        if wait:
            wait_healthy(s, p, timeout_s=90)
        return p

    def log(self, name: str, tail: int = 4000) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-tail:]

    def stop_all(self) -> None:
        for feeder in self.feeders:
            feeder.stopping.set()
        for p in self.workers.values():
            stop_worker(p)


def prepare(settings: Settings, configs: dict[str, ExperimentConfig]) -> None:
    ensure_topics(settings)
    for config in configs.values():
        publish_config(settings, config)


@pytest.fixture
def cluster(kafka_broker, tmp_path):
    c = Cluster(make_settings(kafka_broker, tmp_path, f"chdb://{tmp_path / 'worker-chdb'}"), tmp_path)
    yield c
    c.stop_all()


def report(name: str, started: float, **facts) -> None:
    print(f"\n[{name}] {time.monotonic() - started:.1f} s " + json.dumps(facts, default=str))


# --- 1. kill -9 of the only worker, then a restart ------------------------------------------

def test_kill9_of_the_only_worker_then_restart(cluster):
    started = time.monotonic()
    messages, configs = fault_stream(seed=1)
    expected = expected_outcome(messages, configs)
    prepare(cluster.settings, configs)
    worker = cluster.start("w0", sink=True)
    s = cluster.worker_settings["w0"]
    feeder = cluster.feed(messages, rate_per_s=len(messages) / 20)
    wait_until(lambda: consumed(s) >= 0.2 * len(messages), 60, "the worker to process a fifth of the stream")
    assert feeder.sent < len(messages), "the fault must come mid-stream"
    killed_at = feeder.sent
    kill_worker(worker)
    assert worker.returncode == -9
    cluster.start("w0", sink=True)  # same settings, same home and chDB directory
    result = settle_and_check(cluster.settings, s, expected, feeder, messages)
    assert cluster.workers["w0"].poll() is None
    report("kill9-only-worker", started, killed_at=killed_at, of=len(messages), **result)


# --- 2. two workers, kill -9 of the one without the sink -------------------------------------

def test_kill9_of_one_of_two_workers_survivor_takes_over(cluster):
    started = time.monotonic()
    messages, configs = fault_stream(seed=2)
    expected = expected_outcome(messages, configs)
    prepare(cluster.settings, configs)
    cluster.start("w0", sink=True)
    victim = cluster.start("w1", sink=False)
    feeder = cluster.feed(messages, rate_per_s=len(messages) / 20)
    victim_settings = cluster.worker_settings["w1"]
    wait_until(lambda: consumed(victim_settings) >= 0.1 * len(messages), 60, "the second worker to process its share")
    assert feeder.sent < len(messages), "the fault must come mid-stream"
    killed_at = feeder.sent
    kill_worker(victim)
    del cluster.workers["w1"]
    result = settle_and_check(cluster.settings, cluster.worker_settings["w0"], expected, feeder, messages)
    assert cluster.workers["w0"].poll() is None
    report("kill9-one-of-two", started, killed_at=killed_at, of=len(messages), **result)


# --- 3. a second worker joins mid-stream, then leaves cleanly --------------------------------

def test_second_worker_joins_then_leaves_cleanly(cluster):
    started = time.monotonic()
    messages, configs = fault_stream(seed=3)
    expected = expected_outcome(messages, configs)
    prepare(cluster.settings, configs)
    cluster.start("w0", sink=True)
    feeder = cluster.feed(messages, rate_per_s=len(messages) / 30)
    wait_until(lambda: feeder.sent >= 0.15 * len(messages), 30, "the stream to flow")
    joiner = cluster.start("w1", sink=False)
    joined_at = feeder.sent
    s1 = cluster.worker_settings["w1"]
    wait_until(lambda: consumed(s1) >= 0.05 * len(messages), 60, "the joining worker to take partitions")
    left_at = feeder.sent
    assert left_at < len(messages), "the worker must leave mid-stream"
    stop_worker(joiner)
    assert joiner.returncode == 0, cluster.log("w1")
    del cluster.workers["w1"]
    result = settle_and_check(cluster.settings, cluster.worker_settings["w0"], expected, feeder, messages)
    # Exact: statistics, ClickHouse rows (deadletter table included) and the distinct dead
    # letters (settle_and_check); and a clean hand-over sends no dead letter twice: the new
    # owner reads from the state log how far the old one got.
    report("join-then-leave", started, joined_at=joined_at, left_at=left_at, of=len(messages), **result)
    assert result["letters"] == len(expected.dead), "a clean hand-over repeated dead letters"
    # Stage 2 reads partials again after each hand-over (from its group's last commit): none of
    # them may take a decision back (a crash may, see README "What is not guaranteed").
    back = decisions_going_back(cluster.settings, configs)
    assert not back, f"{len(back)} decisions went back in time, e.g. {back[:3]}"


# --- 3b. the stage-2 hand-over: only an experiment's owner decides and serves it ---------

def experiments_on_every_partition(partitions: int) -> list[str]:
    """Experiment ids whose partials (keyed by experiment id, murmur2 like Faust's producer)
    fall on every partition, so that a joining worker takes some of them over."""
    from aiokafka.partitioner import DefaultPartitioner

    partitioner, every = DefaultPartitioner(), list(range(partitions))
    chosen: dict[int, str] = {}
    for i in range(1000):
        chosen.setdefault(partitioner(f"handover-{i}".encode(), every, every), f"handover-{i}")
    assert len(chosen) == partitions
    return [chosen[p] for p in every]


def test_a_worker_that_lost_an_experiment_neither_serves_nor_decides_it(cluster):
    """A worker keeps no state of, and publishes no decision for, an experiment whose stage-2
    partition went to another worker (it once did: its newest decision went back in time)."""
    ids = experiments_on_every_partition(cluster.settings.partitions)
    scenarios = [scenario(e, 300, seed=40 + i) for i, e in enumerate(ids)]
    configs = {s.experiment_id: config_for(s) for s in scenarios}
    codec = Codec()
    events = sorted((item for s in scenarios for item in scenario_events(s)), key=lambda item: item[0])
    messages = [Outgoing(kind, r["unit_id"].encode(), codec.encode(kind, r), r) for _, kind, r in events]
    expected = expected_outcome(messages, configs)
    prepare(cluster.settings, configs)
    cluster.start("w0", sink=False)
    w0 = cluster.worker_settings["w0"]
    cluster.feed(messages, rate_per_s=len(messages) / 5).finish()

    def decided_by(settings: Settings) -> dict[str, dict]:
        return {e: d for e in ids if (d := served_decision([settings], e)) is not None}

    wait_until(lambda: all(decision_view(d) == expected_view(expected, e) for e, d in decided_by(w0).items())
               and len(decided_by(w0)) == len(ids), 90, "the only worker to decide every experiment")
    joined_ms = int(time.time() * 1000)
    cluster.start("w1", sink=False)
    w1 = cluster.worker_settings["w1"]
    # The joining worker takes over the experiments of its partitions: it republishes the
    # partials of the input partitions it adopted, and the new owners decide.
    wait_until(lambda: decided_by(w1), 90, "the joining worker to decide the experiments it took over")
    try:
        # As long as the other waits here: under a loaded CI machine a second rebalance (and its
        # table recovery) may follow the first before every experiment has a decision again.
        wait_until(lambda: set(decided_by(w0)).isdisjoint(decided_by(w1))
                   and set(decided_by(w0)) | set(decided_by(w1)) == set(ids), 90,
                   "each experiment to be served by its owner only")
    except AssertionError as timeout:
        served = {e: [name for name, s in (("w0", w0), ("w1", w1)) if e in decided_by(s)] for e in ids}
        rebalances = {name: [line for line in cluster.log(name, tail=200_000).splitlines()
                             if "generation id" in line or "Worker ready" in line][-6:] for name in ("w0", "w1")}
        raise AssertionError(f"{timeout}; served by: {served}; rebalances: {rebalances}") from None
    time.sleep(2.5 * cluster.settings.decision_interval_s)  # a later decision, by anyone, would show below
    newest = latest_decisions(cluster.settings)
    by_owner = {**decided_by(w0), **decided_by(w1)}
    for e in ids:
        assert decision_view(newest[e]) == expected_view(expected, e), f"the newest decision of {e} is not the truth"
        assert newest[e]["decision_time"] == by_owner[e]["decision_time"], f"the newest decision of {e} is not its owner's"
    # Every event was in before the join: any decision since that is not the truth went back in time.
    since = published_decisions(cluster.settings, since_ms=joined_ms)
    assert since, "no decision since the join"
    moved = [(e, decision_view(d)["statistics"]) for e, d in since if decision_view(d) != expected_view(expected, e)]
    assert not moved, f"{len(moved)} of {len(since)} decisions since the join are not the truth, e.g. {moved[:2]}"


# --- 3c. stage 2 reads a partial again -----------------------------------------------------

def test_a_partial_read_again_does_not_take_the_decision_back(cluster):
    """Stage 2 reads the partials topic at least once: after a rebalance or a restart it reads
    again from its group's last commit, over a table recovered with newer partials (in a demo
    run a new owner published a decision from 80 units after one from 148, and resolved a
    firing guardrail, until the newer partials came by again). Here the oldest partial of every
    source partition is published again, bytes as they were; the decision must not move."""
    messages, configs = fault_stream(units=600, malformed=0, ghosts=0, seed=5)
    expected = expected_outcome(messages, configs)
    prepare(cluster.settings, configs)
    cluster.start("w0", sink=False)
    s = cluster.worker_settings["w0"]
    cluster.feed(messages, rate_per_s=len(messages) / 5).finish()
    wait_until(lambda: decision_view(latest_decisions(s).get("fault")) == expected_view(expected, "fault"), 90,
               "the decision to reach the truth")
    partials_topic = s.topic(PARTIALS)
    oldest = {}
    for m in read_all(s, partials_topic):  # each partition's in offset order
        if m.key() == b"fault":
            oldest.setdefault(json.loads(m.value())["source_partition"], m)
    assert len(oldest) > 1, "the scenario's units must span several input partitions"
    before = scrape(s)
    replayed_ms = int(time.time() * 1000)
    producer = make_producer(s, logger=logging.getLogger("tests.replay"))
    for m in oldest.values():
        producer.produce(partials_topic, key=m.key(), value=m.value(), partition=m.partition())
    assert producer.flush(30) == 0
    wait_until(lambda: not any(group_lag(s, f"{s.topic_prefix}worker", [partials_topic]).values()), 60,
               "stage 2 to read the partials published again")
    time.sleep(2.5 * s.decision_interval_s)  # a look it prompted would be published by now
    later = [d for e, d in published_decisions(s, since_ms=replayed_ms) if e == "fault"]
    assert all(decision_view(d) == expected_view(expected, "fault") for d in later), \
        [decision_view(d)["statistics"] for d in later]
    assert decision_view(latest_decisions(s)["fault"]) == expected_view(expected, "fault")
    stale = total(scrape(s), "abstream_partials_stale_total") - total(before, "abstream_partials_stale_total")
    assert stale == len(oldest)


# --- 4. the broker is down for 30 s ---------------------------------------------------------

@pytest.fixture
def dedicated_broker(tmp_path):
    data_dir = tmp_path / "kafka"
    port, controller_port = free_port(), free_port()
    status = local_kafka.start(data_dir=data_dir, port=port, controller_port=controller_port)
    yield {"bootstrap": status.bootstrap, "data_dir": data_dir, "port": port, "controller_port": controller_port}
    local_kafka.stop(data_dir=data_dir)


def test_broker_down_for_30_seconds(dedicated_broker, tmp_path):
    started = time.monotonic()
    cluster = Cluster(make_settings(dedicated_broker["bootstrap"], tmp_path, f"chdb://{tmp_path / 'worker-chdb'}"),
                      tmp_path)
    try:
        messages, configs = fault_stream(seed=4)
        expected = expected_outcome(messages, configs)
        prepare(cluster.settings, configs)
        cluster.start("w0", sink=True)
        cluster.start("w1", sink=False)
        feeder = cluster.feed(messages, rate_per_s=len(messages) / 45)
        wait_until(lambda: feeder.sent >= 0.25 * len(messages), 30, "the stream to flow")
        stopped_at = feeder.sent
        local_kafka.stop(data_dir=dedicated_broker["data_dir"])
        down_since = time.monotonic()
        # The outage lasts 30 s by definition: this is the fault, not a wait for a condition.
        time.sleep(max(0.0, 30 - (time.monotonic() - down_since)))
        restarted_at = feeder.sent
        assert restarted_at < len(messages), "the stream must go on past the outage"
        local_kafka.start(data_dir=dedicated_broker["data_dir"], port=dedicated_broker["port"],
                          controller_port=dedicated_broker["controller_port"])
        for name, p in cluster.workers.items():
            assert p.poll() is None, f"{name} exited during the outage: {cluster.log(name)}"
        result = settle_and_check(cluster.settings, cluster.worker_settings["w0"], expected, feeder, messages)
        for name, p in cluster.workers.items():
            assert p.poll() is None, f"{name} did not survive: {cluster.log(name)}"
        report("broker-down-30s", started, stopped_at=stopped_at, restarted_at=restarted_at, of=len(messages), **result)
    finally:
        cluster.stop_all()


# --- 5. ClickHouse fails for 60 s -------------------------------------------------------------

def test_clickhouse_fails_for_60_seconds(cluster):
    started = time.monotonic()
    messages, configs = fault_stream(units=3000, seed=5)
    expected = expected_outcome(messages, configs)
    prepare(cluster.settings, configs)
    until_file = cluster.tmp / "clickhouse-fails-until"
    env = clickhouse_fault_env(cluster.tmp / "fault-hook", until_file)
    worker = cluster.start("w0", sink=True, env=env)
    s = cluster.worker_settings["w0"]
    sink_group, sink_topics = f"{s.topic_prefix}sink", input_topics(s)
    feeder = cluster.feed(messages, rate_per_s=len(messages) / 50)
    wait_until(lambda: total(scrape(s), "abstream_sink_rows_total") > 0, 60, "the sink to write")
    wait_until(lambda: feeder.sent >= 0.2 * len(messages), 30, "the stream to flow")
    rss_before = rss_bytes(worker.pid)
    fail_until = time.time() + 60
    until_file.write_text(str(fail_until))
    injected_at = feeder.sent
    samples = []
    while time.time() < fail_until - 1:
        metrics = scrape(s)
        samples.append({"t": round(time.time() - (fail_until - 60), 1), "sent": feeder.sent,
                        "sink_lag": sum(group_lag(s, sink_group, sink_topics).values()),
                        "stage1_lag": sum(group_lag(s, f"{s.topic_prefix}worker", sink_topics).values()),
                        "retries": total(metrics, "abstream_sink_retries_total"),
                        "sink_lag_seconds": total(metrics, "abstream_sink_lag_seconds"),
                        "rss_mb": rss_bytes(worker.pid) / 2**20})
        time.sleep(3)  # sampling interval of the observation, not a wait for a condition
    assert worker.poll() is None, cluster.log("w0")
    first, last = samples[1], samples[-1]
    # Back-pressure: the sink's committed offsets stand still while the stream goes on...
    assert last["sink_lag"] > first["sink_lag"] + 0.1 * len(messages), samples
    # ...its failed writes are retried, and the batch waiting grows old...
    assert last["retries"] > first["retries"] >= 1, samples
    assert last["sink_lag_seconds"] > 30, samples
    # ...while stage 1, which does not touch ClickHouse, keeps up,
    assert last["stage1_lag"] < 0.05 * len(messages), samples
    # and memory does not follow the backlog.
    assert max(x["rss_mb"] for x in samples) - rss_before / 2**20 < 100, samples
    result = settle_and_check(cluster.settings, s, expected, feeder, messages)
    retries = total(scrape(s), "abstream_sink_retries_total")
    assert worker.poll() is None
    report("clickhouse-down-60s", started, injected_at=injected_at, of=len(messages), retries=retries,
           rss_before_mb=rss_before / 2**20, samples=samples[::4] + samples[-1:], **result)


# --- 5b. Kafka refuses stage 1's state for 20 s -----------------------------------------------

def set_state_topic_record_limit(settings: Settings, limit: int | None) -> None:
    """Lower the stage-1 state topic's max.message.bytes (the broker then refuses a batch's state
    transaction as too large), or drop the override (None)."""
    from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource

    entry = ConfigEntry("max.message.bytes", str(limit) if limit is not None else None,
                        incremental_operation=AlterConfigOpType.SET if limit is not None else AlterConfigOpType.DELETE)
    resource = ConfigResource("topic", settings.topic(STAGE1_STATE), incremental_configs=[entry])
    admin = AdminClient(settings.kafka_config())  # held: a collected client cancels its futures
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=30)


def test_kafka_refuses_the_state_log_for_20_seconds(cluster):
    """A batch whose state the broker does not take is neither acknowledged nor lost: the worker
    reads the partition's state back from its log and the batch's messages again, until Kafka
    takes them; the counts end exact and no dead letter is sent twice."""
    started = time.monotonic()
    messages, configs = fault_stream(seed=7)
    expected = expected_outcome(messages, configs)
    prepare(cluster.settings, configs)
    worker = cluster.start("w0", sink=True)
    s = cluster.worker_settings["w0"]
    feeder = cluster.feed(messages, rate_per_s=len(messages) / 40)
    wait_until(lambda: feeder.sent >= 0.2 * len(messages), 30, "the stream to flow")
    # Claims (no payload) still pass; a batch's rows do not.
    set_state_topic_record_limit(cluster.settings, 200)
    refused_at = feeder.sent
    wait_until(lambda: total(scrape(s), "abstream_state_write_failures_total") >= 3, 60, "refused state writes")
    fault_ends = time.monotonic() + 20
    while time.monotonic() < fault_ends:  # the fault lasts 20 s by definition
        assert worker.poll() is None, cluster.log("w0")
        time.sleep(1)
    failures = total(scrape(s), "abstream_state_write_failures_total")
    stage1_lag = sum(group_lag(s, f"{s.topic_prefix}worker", input_topics(s)).values())
    assert stage1_lag > 0, "nothing may be acknowledged while its state is refused"
    set_state_topic_record_limit(cluster.settings, None)
    restored_at = feeder.sent
    assert restored_at < len(messages), "the stream must go on past the fault"
    result = settle_and_check(cluster.settings, s, expected, feeder, messages)
    assert worker.poll() is None
    assert expected.dead, "the stream must hold rejected messages for the next check to mean anything"
    assert result["letters"] == len(expected.dead), "a batch read again after a refusal re-sent its dead letters"
    report("state-log-refused", started, refused_at=refused_at, restored_at=restored_at, of=len(messages),
           failures=failures, stage1_lag_at_end_of_fault=stage1_lag, **result)


def registry_waits(settings: Settings) -> dict[str, float]:
    """role -> abstream_schema_registry_unavailable of the worker."""
    return {dict(labels)["role"]: value for (name, labels), value in scrape(settings).items()
            if name == "abstream_schema_registry_unavailable"}


def test_a_schema_registry_outage_of_20_seconds_holds_events_back_and_loses_none(cluster):
    """The workers read schema ids through a registry that answers look-ups with 503 for 20 s
    before they have seen any of the stream's ids: nothing is dead-lettered for it, nothing is
    acknowledged, and once it answers the counts end exact (the producers wrote the same ids
    without a registry, so the expected outcome is judged by the local catalogue)."""
    started = time.monotonic()
    messages, configs = fault_stream(seed=9)
    expected = expected_outcome(messages, configs)
    prepare(cluster.settings, configs)
    with CatalogueRegistry() as registry:
        worker = cluster.start("w0", sink=True, env={"ABSTREAM_SCHEMA_REGISTRY_URL": registry.url})
        s = cluster.worker_settings["w0"]
        registry.refusing = True
        feeder = cluster.feed(messages, rate_per_s=len(messages) / 40)
        wait_until(lambda: registry.refused >= 5 and feeder.sent >= 0.2 * len(messages), 60,
                   "the worker and the sink to meet the outage")
        # A person kills the treatment meanwhile: the order waits for the registry too.
        order(cluster.settings, configs["fault"], "kill", "treatment", "test: killed during a registry outage")
        fault_ends = time.monotonic() + 20
        while time.monotonic() < fault_ends:  # the fault lasts 20 s by definition
            assert worker.poll() is None, cluster.log("w0")
            time.sleep(1)
        refused = registry.refused
        assert consumed(s) == 0, "nothing may be counted before its schema is known"
        assert sum(group_lag(s, f"{s.topic_prefix}worker", input_topics(s)).values()) > 0
        assert not read_all(s, s.topic(DEADLETTER), timeout_s=5), "an outage is not a reason to dead-letter"
        assert registry_waits(s) == {"stage1": 1.0, "sink": 1.0, "orders": 1.0}
        registry.refusing = False
        restored_at = feeder.sent
        assert restored_at < len(messages), "the stream must go on past the fault"
        result = settle_and_check(cluster.settings, s, expected, feeder, messages)
        assert worker.poll() is None
        assert expected.dead, "the stream must hold rejected messages for the next check to mean anything"
        assert result["letters"] == len(expected.dead)
        assert registry_waits(s) == {"stage1": 0.0, "sink": 0.0, "orders": 0.0, "decisions": 0.0}
        weights = {v["variant"]: v["weight"] for v in latest_decisions(cluster.settings)["fault"]["variants"]}
        assert weights["treatment"] == 0, f"the kill published during the outage was lost: {weights}"
    report("schema-registry-outage", started, restored_at=restored_at, of=len(messages), refused=refused, **result)



def test_a_registry_that_cannot_register_what_stage_2_writes_delays_the_decision_and_loses_none(cluster):
    """The worker reads the stream through a registry that answers look-ups but cannot
    register the schemas of what stage 2 writes (decisions, alerts, kill switches), as after a
    worker restart during an outage: no decision or control record goes out half-written, the
    worker says so in one line and a gauge, and once the registry answers the decision comes,
    exact, with no new event to prompt it."""
    started = time.monotonic()
    messages, configs = fault_stream(seed=13)
    expected = expected_outcome(messages, configs)
    prepare(cluster.settings, configs)
    with CatalogueRegistry() as registry:
        registry.refusing_registrations = True
        worker = cluster.start("w0", sink=False, env={"ABSTREAM_SCHEMA_REGISTRY_URL": registry.url})
        s = cluster.worker_settings["w0"]
        feeder = cluster.feed(messages, rate_per_s=len(messages) / 10)
        feeder.finish()
        inputs = input_topics(s)
        wait_until(lambda: not any(group_lag(s, f"{s.topic_prefix}worker", inputs).values()), 90,
                   "stage 1 to count the whole stream")
        wait_until(lambda: registry.registrations_refused >= 3, 60, "the worker to try its first decision again")
        assert worker.poll() is None, cluster.log("w0")
        assert "fault" not in latest_decisions(s), "a decision was published without a registered schema"
        for topic in (ALERTS, KILLSWITCH):
            assert not read_all(s, s.topic(topic), timeout_s=2), f"{topic} got a record without a registered schema"
        assert registry_waits(s).get("decisions") == 1.0
        refused = registry.registrations_refused
        registry.refusing_registrations = False
        wait_until(lambda: decision_view(latest_decisions(s).get("fault")) == expected_view(expected, "fault"),
                   60, "the decision once the registry registers its schema")
        assert registry_waits(s).get("decisions") == 0.0
        log_text = (cluster.tmp / "w0.log").read_text(errors="replace")
        assert "experiment fault not evaluated, tried again in" in log_text, log_text[-4000:]
        assert "Traceback" not in log_text, log_text[-4000:]
    report("schema-registry-refuses-registration", started, refused=refused)



def test_a_schema_registry_that_hangs_does_not_stop_the_worker(cluster):
    """The registry holds every look-up without an answer (a black hole) once the worker runs:
    the worker asks in a thread, not on its event loop, so it keeps answering /health the while
    (a liveness probe would otherwise restart it, and the restart meet the same registry);
    nothing is counted meanwhile, and once the registry answers the decision is exact."""
    started = time.monotonic()
    messages, configs = fault_stream(seed=17)
    expected = expected_outcome(messages, configs)
    prepare(cluster.settings, configs)
    with CatalogueRegistry() as registry:
        worker = cluster.start("w0", sink=False, env={"ABSTREAM_SCHEMA_REGISTRY_URL": registry.url})
        s = cluster.worker_settings["w0"]
        registry.hanging = True
        feeder = cluster.feed(messages, rate_per_s=len(messages) / 10)
        feeder.finish()
        wait_until(lambda: registry.hung >= 1, 60, "the worker to ask the registry")
        health = f"http://{s.web_host}:{s.web_port}/health"
        answered = 0
        until = time.monotonic() + 15  # past two look-ups given up (3 s, tried twice, each)
        while time.monotonic() < until:
            # Without the thread, the event loop stands still for the client's whole wait
            # (6 s a look-up); a health page answers in milliseconds.
            with urllib.request.urlopen(health, timeout=2.5) as response:
                assert response.status == 200
            answered += 1
            time.sleep(0.25)
        hung = registry.hung
        assert hung >= 2, "the worker must have asked again after giving up"
        # The batch waiting on the look-up is reported with where it waits (streams/fetch.py).
        stuck = cluster.log("w0", tail=10**8).split("a stage-1 batch has been in flight for 5 s")
        assert len(stuck) >= 2 and "in ask" in stuck[1], cluster.log("w0")
        assert consumed(s) == 0, "nothing may be counted before its schema is known"
        assert worker.poll() is None, cluster.log("w0")
        registry.hanging = False
        wait_until(lambda: decision_view(latest_decisions(s).get("fault")) == expected_view(expected, "fault"),
                   90, "the exact decision once the registry answers")
        wait_until(lambda: not any(group_lag(s, f"{s.topic_prefix}worker", input_topics(s)).values()), 30,
                   "stage 1 to commit the whole stream")
    report("schema-registry-hangs", started, hung=hung, health_answers=answered)


def corrupt_state_log(settings: Settings, partition: int) -> None:
    """Commit a transaction whose chunk is not a chunk to the partition's state log, as a
    damaged topic or an incompatible abstream version would leave it."""
    log = StateLog(settings, settings.topic(STAGE1_STATE), owner="test-corrupter")
    try:
        log.acquire(partition)
        log.append(partition, "delta", [b"\x07 not a chunk"])
        log.flush()
        log.release(partition)
    finally:
        log.close()


def test_a_partition_whose_state_cannot_be_applied_waits_and_the_others_go_on(cluster):
    """One input partition's state log holds a transaction that does not decode: the worker
    stays up, counts the other partitions exactly, acknowledges nothing of that partition,
    and says so in its log and metrics."""
    started = time.monotonic()
    messages, configs = fault_stream(seed=11)
    prepare(cluster.settings, configs)
    bad = 1
    corrupt_state_log(cluster.settings, bad)
    worker = cluster.start("w0", sink=False)
    s = cluster.worker_settings["w0"]
    feeder = cluster.feed(messages, rate_per_s=len(messages) / 10)
    feeder.finish()

    def partition_of(m: Outgoing) -> int:
        return (murmur2(m.key) & 0x7FFFFFFF) % s.partitions

    waiting = sum(1 for m in messages if m.key is not None and partition_of(m) == bad)
    expected = expected_outcome([m for m in messages if m.key is not None and partition_of(m) != bad], configs)
    inputs = input_topics(s)
    state: dict = {}

    def settled() -> bool:
        state["lag"] = partition_lag(s, f"{s.topic_prefix}worker", inputs)
        decisions = latest_decisions(s)
        state["decisions"] = {e: decision_view(decisions.get(e)) for e in expected.truths}
        return (not any(n for (_, p), n in state["lag"].items() if p != bad)
                and all(state["decisions"][e] == expected_view(expected, e) for e in expected.truths))

    wait_until(settled, 120, "the other partitions counted exactly")
    assert waiting > 0
    # Keyless messages (some malformed ones) may land on the partition too.
    assert sum(n for (_, p), n in state["lag"].items() if p == bad) >= waiting, "nothing of it may be acknowledged"
    assert worker.poll() is None, cluster.log("w0")
    samples = scrape(s)
    assert total(samples, "abstream_state_unreadable", partition=str(bad)) == 1
    assert total(samples, "abstream_state_unreadable") == 1
    # The partition is paused, not fetched and sought back again and again: with nothing new
    # published, the count of messages held back stands still.
    held_back = total(samples, "abstream_input_held_back_total")
    assert held_back >= 1
    time.sleep(5)
    assert total(scrape(s), "abstream_input_held_back_total") == held_back, "the partition is fetched again and again"
    log_text = (cluster.tmp / "w0.log").read_text(errors="replace")
    assert f"the stage-1 state of input partition {bad} cannot be applied" in log_text, log_text[-4000:]
    assert "Traceback" not in log_text and "crashed" not in log_text.lower(), log_text[-4000:]
    report("state-unreadable", started, waiting=waiting, lag=sum(state["lag"].values()))


# --- 6. ten thousand fuzzed messages ----------------------------------------------------------

FUZZ_TARGET = "fuzz-target"


def fuzz_payloads(bases: list[tuple[EventKind, dict]], n: int, seed: int) -> list[Outgoing]:
    """n hostile messages built from valid records: random bytes, random bodies behind a real
    header, truncated and bit-flipped Avro, wrong schema ids, wrong types, huge strings, NaN
    and infinities, absurd timestamps and latencies, unknown experiments, empty ids."""
    rng = random.Random(seed)
    codec, catalogue = Codec(), LocalCatalogue()
    ids = {kind: catalogue.id_for(kind) for kind in EventKind}
    floats = {EventKind.PREDICTION: ("score", "latency_ms"), EventKind.SHADOW: ("champion_score", "champion_latency_ms"),
              EventKind.OUTCOME: ("value",), EventKind.ASSIGNMENT: ()}
    latencies = {EventKind.PREDICTION: "latency_ms", EventKind.SHADOW: "champion_latency_ms"}
    retyped_writers = {}
    for kind in EventKind:
        schema = json.loads(catalogue.schema_json(kind))
        for f in schema["fields"]:
            if f["name"] == "event_time":
                f["type"] = "string"  # the same field, written with another type
        retyped_writers[kind] = fastavro.parse_schema(schema)
    out = []
    for i in range(n):
        kind, base = bases[rng.randrange(len(bases))]
        record = {**base, "event_id": f"fz{i}-{base['event_id']}"}
        key = record["unit_id"].encode()
        good = codec.encode(kind, record)
        way = i % 13
        if way == 0:
            value = None if rng.random() < 0.02 else bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
            key = rng.choice([key, None, bytes(rng.getrandbits(8) for _ in range(8))])
        elif way == 1:
            value = good[:5] + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 120)))
        elif way == 2:
            value = good[:rng.randint(0, len(good) - 1)]
        elif way in (3, 4):
            flipped = bytearray(good)
            for _ in range(rng.randint(1, 3)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            value = bytes(flipped)
        elif way == 5:
            other = rng.choice([k for k in EventKind if k is not kind])
            schema_id = rng.choice([ids[other], 0, 9999, 2**32 - 1, catalogue.id_for(ControlKind.DECISION)])
            value = good[:1] + struct.pack(">I", schema_id) + good[5:]
        elif way == 6:
            buf = io.BytesIO()
            fastavro.schemaless_writer(buf, retyped_writers[kind], {**record, "event_time": str(record["event_time"])})
            value = good[:5] + buf.getvalue()
        elif way == 7:
            name = rng.choice(["unit_id", "event_id", "experiment_id"] + (["variant"] if "variant" in record else []))
            record[name] = "x" * rng.choice([257, 5_000, 200_000])
            value = codec.encode(kind, record)
        elif way == 8 and floats[kind]:
            record[rng.choice(floats[kind])] = rng.choice([math.nan, math.inf, -math.inf])
            value = codec.encode(kind, record)
        elif way == 9:
            record["event_time"] = rng.choice([-1, 0, 946_684_799_999, 4_102_444_800_000, 2**62, -(2**62)])
            value = codec.encode(kind, record)
        elif way == 10 and kind in latencies:
            record[latencies[kind]] = rng.choice([-1.0, -1e-9, 3_600_000.5, 1e12, 1e308])
            value = codec.encode(kind, record)
        elif way == 11:
            record["experiment_id"] = rng.choice(["exp-" + str(rng.randrange(10**6)), "", "FUZZ-TARGET", "fuzz-target "])
            value = codec.encode(kind, record)
        else:
            record[rng.choice(["event_id", "unit_id"])] = ""
            value = codec.encode(kind, record)
        out.append(Outgoing(kind, key, value, None))
    return out


def test_ten_thousand_fuzzed_messages(cluster):
    started = time.monotonic()
    codec = Codec()
    main = scenario("fuzz-main", 2000, seed=6)
    target = ExperimentScenario(FUZZ_TARGET, {"control": ArmTruth(0.2), "treatment": ArmTruth(0.2)},
                                {"control": 0.5, "treatment": 0.5}, units=400, window_s=WINDOW_S, seed=7)
    target_config = start(ExperimentConfig.from_mapping({
        "experiment_id": FUZZ_TARGET, "variants": ["control", "treatment"], "control": "control",
        "primary_metric": {"name": "conversion", "kind": "binary"}, "attribution_window_s": WINDOW_S}))
    configs = {"fuzz-main": config_for(main), FUZZ_TARGET: target_config}
    valid = sorted(scenario_events(main) + scenario_events(target), key=lambda item: item[0])
    messages = [Outgoing(kind, r["unit_id"].encode(), codec.encode(kind, r), None) for _, kind, r in valid]
    fuzz = fuzz_payloads([(k, r) for _, k, r in scenario_events(target)], 10_000, seed=8)
    rng = random.Random(9)
    slots = set(rng.sample(range(len(messages) + len(fuzz)), len(fuzz)))
    valid_iter, fuzz_iter = iter(messages), iter(fuzz)
    messages = [next(fuzz_iter) if i in slots else next(valid_iter) for i in range(len(messages) + len(fuzz))]
    # A fuzzed payload the codec accepts is a valid event: it is keyed by its own unit, as a
    # service would key it, and counted like any other.
    judged = [codec.decode(m.kind, m.value) for m in messages]
    messages = [m if isinstance(d, DeadLetter) else replace(m, key=d["unit_id"].encode()) for m, d in zip(messages, judged)]
    expected = expected_outcome(messages, configs)
    fuzz_accepted = sum(1 for i in slots if i in expected.valid_records and i not in expected.dead)
    fuzz_unknown = sum(1 for i in slots if expected.dead.get(i) == "unknown_experiment")
    reasons = Counter(expected.dead.values())
    assert len(slots & set(expected.dead)) + fuzz_accepted == 10_000, reasons
    prepare(cluster.settings, configs)
    worker = cluster.start("w0", sink=True)
    s = cluster.worker_settings["w0"]
    feeder = cluster.feed(messages, rate_per_s=10_000)
    result = settle_and_check(cluster.settings, s, expected, feeder, messages)
    assert worker.poll() is None, cluster.log("w0")
    assert result["letters"] == len(expected.dead), "each rejected message is dead-lettered once"
    samples = scrape(s)
    assert total(samples, "abstream_events_consumed_total") == len(messages)
    assert total(samples, "abstream_deadletters_total") == len(expected.dead)
    for reason, n in reasons.items():
        assert total(samples, "abstream_deadletters_total", reason=reason) == n, reason
    log_text = (cluster.tmp / "w0.log").read_text(errors="replace")
    assert "crashed" not in log_text.lower() and "Traceback" not in log_text, log_text[-4000:]
    report("fuzz-10k", started, messages=len(messages), dead=dict(reasons), fuzz_accepted=fuzz_accepted,
           fuzz_unknown_experiment=fuzz_unknown, **result)
