"""The client library: sticky assignment and its bucket layout (pure), kill switches and
allocations (pure, then through the real broker), the publisher and the shadow helper
(through the real broker, decoded with the workers' Codec)."""
from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from hypothesis import given, settings as hypothesis_settings, strategies as st

from streams import client, experiments
from streams.client import (
    BUCKETS, Allocation, AllocationReason, ControlFollower, EventPublisher, InvalidEvent, KillAction, KillSwitch,
    ModelRef, PublishError, Router, ShadowRunner, UnknownExperiment, assign, assigner, basis_points, sampled,
    unit_bucket,
)
from streams.codec import Codec, ControlKind, EventKind, RegistryCatalogue, schema_source
from streams.experiments import ExperimentConfig
from streams.topics import INPUT_TOPICS, KILLSWITCH, ensure_topics, make_producer

ROOT = Path(__file__).resolve().parent.parent
UNITS = [f"user-{i}" for i in range(10_000)]


def config(weights: dict[str, float], experiment_id: str = "ranker", **extra) -> ExperimentConfig:
    return ExperimentConfig.from_mapping({
        "experiment_id": experiment_id,
        "variants": [{"name": name, "weight": w, "model_name": f"model-{name}", "model_version": "v1"}
                     for name, w in weights.items()],
        "primary_metric": {"name": "conversion", "kind": "binary"},
        **extra,
    })


def variants_of(assign_from, units=UNITS) -> dict[str, str]:
    return {u: assign_from.variant_for(u) for u in units}


def moved(before: dict[str, str], after: dict[str, str]) -> Counter:
    return Counter((before[u], after[u]) for u in before if before[u] != after[u])


# -- assignment (pure) ------------------------------------------------------------------

def test_the_bucket_is_sha256_of_salt_and_unit_and_never_changes():
    # Pinned values: a change of the hash, the separator or the byte order would reshuffle
    # every running experiment, and must fail here. Computed outside Python:
    #   printf "ranker:user-0" | sha256sum -> first 16 hex digits, as an integer, mod 10,000.
    assert [unit_bucket("ranker", u) for u in ("user-0", "user-1", "ü-ñ")] == [7929, 5172, 7354]
    digest = hashlib.sha256("salt:unit".encode()).hexdigest()
    assert unit_bucket("salt", "unit") == int(digest[:16], 16) % BUCKETS


@pytest.mark.parametrize("weights", [
    {"control": 0.5, "challenger": 0.5},
    {"control": 0.9, "challenger": 0.1},
    {"control": 0.5, "b": 0.3, "c": 0.2},
    {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25},
])
def test_ten_thousand_units_give_the_configured_split_within_one_point(weights):
    shares = Counter(variants_of(assigner(config(weights))).values()).items()
    for name, count in shares:
        assert abs(count / len(UNITS) - weights[name]) < 0.01, (name, count)
    assert {name for name, _ in shares} == set(weights)


def test_the_same_unit_gets_the_same_variant_in_a_fresh_process():
    cfg = config({"control": 0.34, "b": 0.33, "c": 0.33})
    here = variants_of(assigner(cfg), UNITS[:2000])
    assert variants_of(assigner(cfg), UNITS[:2000]) == here
    code = ("import json, sys; from streams.client import assign; "
            "w = {'control': 0.34, 'b': 0.33, 'c': 0.33}; "
            "print(json.dumps({f'user-{i}': assign(w, f'user-{i}', 'ranker') for i in range(2000)}))")
    # A different PYTHONHASHSEED: the assignment must not depend on Python's hash().
    child = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert json.loads(child.stdout) == here


def test_salt_defaults_to_the_experiment_id_and_changing_it_reshuffles():
    cfg = config({"control": 0.5, "challenger": 0.5})
    assert variants_of(assigner(cfg)) == variants_of(assigner(cfg.weights, "ranker"))
    salted = variants_of(assigner(replace(cfg, salt="other")))
    assert 0.4 < sum(salted[u] != v for u, v in variants_of(assigner(cfg)).items()) / len(UNITS) < 0.6


@pytest.mark.parametrize("steps", [[0.01, 0.05, 0.10, 0.25, 0.5, 1.0]])
def test_canary_steps_only_move_units_from_control_to_the_challenger(steps):
    previous = None
    for step in steps:
        now = variants_of(assigner({"control": 1 - step, "challenger": step}, "canary"))
        if previous is not None:
            grew = {u for u, v in now.items() if v == "challenger"} - {u for u, v in previous.items() if v == "challenger"}
            assert {u for u in now if now[u] != previous[u]} == grew
            assert set(moved(previous, now)) <= {("control", "challenger")}
        previous = now


@pytest.mark.parametrize("changed", ["b", "c"])
def test_changing_one_treatment_moves_units_only_between_it_and_control(changed):
    before = {"control": 0.6, "b": 0.2, "c": 0.2}
    after = {**before, changed: 0.3, "control": 0.5}
    a, b = variants_of(assigner(before, "s")), variants_of(assigner(after, "s"))
    assert set(moved(a, b)) == {("control", changed)}
    for name in before:
        if name not in ("control", changed):
            assert {u for u, v in a.items() if v == name} == {u for u, v in b.items() if v == name}
    # Exactly the share it must: 10 points of the buckets, not of the sample.
    assert assigner(after, "s").layout.size(changed) - assigner(before, "s").layout.size(changed) == 1000


def test_kill_sends_only_the_killed_variants_units_to_control_and_resume_restores_them():
    cfg = config({"control": 0.5, "b": 0.25, "c": 0.25})
    base = variants_of(assigner(cfg))
    for victim in ("b", "c"):
        killed = variants_of(assigner(cfg, killswitch=KillSwitch("ranker", KillAction.KILL, victim, 1)))
        assert victim not in killed.values()
        assert {u for u in base if base[u] != killed[u]} == {u for u, v in base.items() if v == victim}
        assert set(moved(base, killed)) == {(victim, "control")}
    resumed = variants_of(assigner(cfg, killswitch=KillSwitch("ranker", KillAction.RESUME, "b", 2)))
    assert resumed == base


def test_rollback_promote_and_ignored_orders():
    cfg = config({"control": 0.5, "b": 0.25, "c": 0.25})
    base = variants_of(assigner(cfg), UNITS[:1000])
    everyone = lambda action, variant: set(variants_of(  # noqa: E731
        assigner(cfg, killswitch=KillSwitch("ranker", action, variant, 1)), UNITS[:1000]).values())
    assert everyone(KillAction.ROLLBACK, "*") == {"control"}
    assert everyone(KillAction.PROMOTE, "c") == {"c"}
    rolled_back = variants_of(assigner(cfg, killswitch=KillSwitch("ranker", KillAction.ROLLBACK, "b", 1)), UNITS[:1000])
    assert set(moved(base, rolled_back)) == {("b", "control")}
    # Control cannot be killed and unknown variants are ignored: nothing moves.
    for variant in ("control", "nonexistent"):
        assert variants_of(assigner(cfg, killswitch=KillSwitch("ranker", KillAction.KILL, variant, 1)),
                           UNITS[:1000]) == base


def test_an_allocation_overrides_the_config_weights_and_a_kill_applies_on_top():
    cfg = config({"control": 0.5, "challenger": 0.5})
    allocation = Allocation("ranker", {"control": 0.8, "challenger": 0.2}, 3, AllocationReason.BANDIT)
    current = assigner(cfg, allocation=allocation)
    assert current.allocation_version == 3
    shares = Counter(variants_of(current).values())
    assert abs(shares["challenger"] / len(UNITS) - 0.2) < 0.01
    killed = assigner(cfg, allocation=allocation, killswitch=KillSwitch("ranker", KillAction.KILL, "challenger", 1))
    assert set(variants_of(killed).values()) == {"control"}
    # Variants an allocation does not name get nothing; unknown names are ignored; an
    # allocation without a positive known weight leaves the config's weights in force.
    only = assigner(cfg, allocation=Allocation("ranker", {"challenger": 1.0, "ghost": 5.0}, 4))
    assert set(variants_of(only, UNITS[:500]).values()) == {"challenger"}
    empty = assigner(cfg, allocation=Allocation("ranker", {"ghost": 1.0}, 5))
    assert variants_of(empty) == variants_of(assigner(cfg))


@hypothesis_settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=100.0), min_size=1, max_size=6),
       st.floats(min_value=0.0, max_value=100.0), st.data())
def test_basis_points_cover_all_buckets_and_a_treatment_depends_only_on_its_own_share(treatments, control_w, data):
    weights = {"control": control_w, **{f"t{i}": w for i, w in enumerate(treatments)}}
    if sum(weights.values()) <= 0:
        with pytest.raises(ValueError):
            basis_points(weights, "control")
        return
    points = basis_points(weights, "control")
    assert sum(points.values()) == BUCKETS and min(points.values()) >= 0
    total = sum(weights.values())
    if control_w / total * BUCKETS >= len(treatments):  # no overshoot to take back
        for name, w in weights.items():
            if name != "control":
                assert abs(points[name] - w / total * BUCKETS) <= 0.5 + 1e-6
        # Moving weight between control and one treatment leaves the others' sizes alone
        # (while control keeps enough share that nothing overshoots).
        i = data.draw(st.integers(0, len(treatments) - 1))
        shift = data.draw(st.floats(min_value=0.0, max_value=max(0.0, control_w - len(treatments) * total / BUCKETS)))
        changed = {**weights, f"t{i}": weights[f"t{i}"] + shift, "control": control_w - shift}
        again = basis_points(changed, "control")
        assert all(again[n] == points[n] for n in weights if n not in ("control", f"t{i}"))


@pytest.mark.parametrize("weights, message", [
    ({"control": -1.0, "b": 1.0}, "finite number >= 0"),
    ({"control": math.nan, "b": 1.0}, "finite number >= 0"),
    ({"control": 0.0, "b": 0.0}, "sum to 0"),
])
def test_bad_weights_say_what_is_wrong(weights, message):
    with pytest.raises(ValueError, match=message):
        assign(weights, "u", "s")


def test_shadow_sampling_is_deterministic_and_near_its_rate():
    picked = [sampled("shadow", f"req-{i}", 0.1) for i in range(10_000)]
    assert picked == [sampled("shadow", f"req-{i}", 0.1) for i in range(10_000)]
    assert abs(sum(picked) / 10_000 - 0.1) < 0.01
    assert not any(sampled("shadow", f"req-{i}", 0.0) for i in range(1000))
    assert all(sampled("shadow", f"req-{i}", 1.0) for i in range(1000))


# -- the real broker --------------------------------------------------------------------

def read_topic(settings, name: str, count: int, timeout_s: float = 20.0) -> list:
    """The first ``count`` messages of the topic (all partitions), polling up to a deadline."""
    topic = settings.topic(name)
    consumer = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}test-reader",
                                                 "enable.auto.commit": "false"}))
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        messages, deadline = [], time.monotonic() + timeout_s
        while len(messages) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                messages.append(msg)
        return messages
    finally:
        consumer.close()


def publish_control(settings, kind: ControlKind, record: dict, topic: str) -> None:
    producer = make_producer(settings)
    producer.produce(settings.topic(topic), key=record["experiment_id"].encode(), value=Codec().encode(kind, record))
    assert producer.flush(10) == 0


def poll_until(condition, timeout_s: float = 15.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not hold within {timeout_s} s")


@pytest.mark.kafka
def test_the_publisher_delivers_every_kind_and_the_workers_codec_decodes_it(settings):
    ensure_topics(settings)
    common = {"experiment_id": "ranker", "unit_id": "user-7"}
    with EventPublisher(settings) as publisher:
        before_ms = int(time.time() * 1000)
        assert publisher.assignment(**common, variant="b", allocation_version=2, segment={"country": "fr"})
        assert publisher.prediction(**common, request_id="r1", variant="b", model_name="m", model_version="v2",
                                    latency_ms=12.5, score=0.75)
        assert publisher.shadow(**common, request_id="r1", champion_model="m", champion_version="v1",
                                challenger_model="m", challenger_version="v2", champion_latency_ms=3.0,
                                challenger_status="timeout")
        assert publisher.outcome(**common, metric="conversion", value=1.0, request_id="r1",
                                 event_id="fixed-id", event_time_ms=before_ms - 5)
        assert publisher.flush(10) == 0
        stats = publisher.stats()
    assert (stats.delivered, stats.failed, stats.dropped, stats.pending) == (4, 0, 0, 0)
    codec = Codec()
    decoded = {}
    for kind, name in INPUT_TOPICS.items():
        [msg] = read_topic(settings, name, 1)
        assert msg.key() == b"user-7"
        decoded[kind] = codec.decode(kind, msg.value())
        assert isinstance(decoded[kind], dict), decoded[kind]
    assert decoded[EventKind.ASSIGNMENT]["segment"] == {"country": "fr"}
    assert decoded[EventKind.ASSIGNMENT]["allocation_version"] == 2
    assert decoded[EventKind.PREDICTION]["score"] == 0.75 and decoded[EventKind.PREDICTION]["status"] == "ok"
    assert decoded[EventKind.SHADOW]["challenger_status"] == "timeout"
    assert decoded[EventKind.OUTCOME]["event_id"] == "fixed-id"
    assert decoded[EventKind.OUTCOME]["event_time"] == before_ms - 5
    ids = {decoded[k]["event_id"] for k in (EventKind.ASSIGNMENT, EventKind.PREDICTION, EventKind.SHADOW)}
    assert len(ids) == 3 and all(len(i) == 36 for i in ids)  # filled: uuid4 text
    assert all(before_ms <= decoded[k]["event_time"] <= before_ms + 60_000
               for k in (EventKind.ASSIGNMENT, EventKind.PREDICTION, EventKind.SHADOW))


@pytest.mark.kafka
def test_invalid_events_raise_and_are_not_published(settings):
    with EventPublisher(settings) as publisher:
        with pytest.raises(InvalidEvent, match="latency_ms is nan"):
            publisher.prediction("ranker", "u", request_id="r", variant="b", model_name="m", model_version="v",
                                 latency_ms=math.nan)
        with pytest.raises(InvalidEvent, match="unit_id is empty"):
            publisher.outcome("ranker", "", "conversion", 1.0)
        with pytest.raises(InvalidEvent, match="cannot be encoded"):
            publisher.publish(EventKind.OUTCOME, {"experiment_id": "ranker", "unit_id": "u"})
        assert publisher.stats().pending == 0



def test_a_registry_that_cannot_register_the_schema_is_a_publish_error_not_an_invalid_event(settings, monkeypatch):
    """While the registry cannot register the schemas (503) or refuses them (409), publishing
    says so with PublishError; the publisher's thread keeps trying and publishing resumes."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    from tests.support import fail_schema_registrations

    registry = SchemaRegistryClient.new_client({"url": "mock://abstream-client-register"})
    answer = {"status": 503}
    fail_schema_registrations(monkeypatch, registry, lambda: answer["status"])
    ensure_topics(settings)
    with EventPublisher(settings, codec=Codec(RegistryCatalogue(registry))) as publisher:
        def refusal() -> str:
            try:
                publisher.outcome("ranker", "u", "conversion", 1.0)
            except PublishError as exc:
                return str(exc)
            return "published"

        poll_until(lambda: re.search("did not register abstream's outcome schema.*503", refusal()), 10, "a 503")
        answer["status"] = 409
        poll_until(lambda: "refused abstream's outcome schema" in refusal(), 10, "a refusal")
        assert publisher.stats().delivered == 0
        answer["status"] = None
        poll_until(lambda: refusal() == "published", 10, "the schema to be registered")
        assert publisher.flush(10) == 0
        assert publisher.stats().delivered == 1


@pytest.mark.kafka
def test_a_registry_that_hangs_holds_no_publishing_call_longer_than_its_bound(settings):
    """Asked inline, a registry that hangs held every call for its client's timeout (3 s,
    twice) while the outage lasted; a router's request path with it."""
    from tests.support import CatalogueRegistry

    ensure_topics(settings)
    with CatalogueRegistry() as registry:
        registry.hanging_registrations = True
        with EventPublisher(settings, codec=Codec(schema_source(registry.url)), max_block_s=0.05) as publisher:
            slowest = 0.0
            for _ in range(5):
                started = time.monotonic()
                with pytest.raises(PublishError, match="prediction event: its schema is not registered yet"):
                    publisher.prediction("ranker", "u", request_id="r", variant="b", model_name="m",
                                         model_version="v", latency_ms=1.0)
                slowest = max(slowest, time.monotonic() - started)
            assert slowest < 1.0  # 0.05 s and scheduling; the inline ask took 6 s
            assert not publisher.wait_for_schemas(0.1)
            registry.hanging_registrations = False
            assert publisher.wait_for_schemas(30)
            assert publisher.prediction("ranker", "u", request_id="r", variant="b", model_name="m",
                                        model_version="v", latency_ms=1.0)
            assert publisher.flush(10) == 0


def test_a_full_queue_drops_within_the_bound_and_counts_it(tmp_path):
    # Nothing listens on port 1: messages stay in librdkafka's queue of two.
    from tests.support import make_settings

    unreachable = make_settings("127.0.0.1:1", tmp_path)
    publisher = EventPublisher(unreachable, max_block_s=0.05,
                               producer_config={"queue.buffering.max.messages": "2", "message.timeout.ms": "1000"})
    try:
        results, slowest = [], 0.0
        for i in range(6):
            started = time.monotonic()
            results.append(publisher.outcome("ranker", f"u{i}", "conversion", 1.0))
            slowest = max(slowest, time.monotonic() - started)
        assert results == [True, True, False, False, False, False]
        assert slowest < 0.5
        assert publisher.stats().dropped == 4
        publisher.flush(5)
        assert publisher.stats().failed == 2  # timed out: reported, not lost silently
    finally:
        publisher.close(0)


async def _champion() -> dict:
    await asyncio.sleep(0.01)
    return {"score": 0.9, "label": "fraud"}


@pytest.mark.kafka
def test_the_shadow_runner_returns_the_champion_at_once_and_reports_the_challenger(settings):
    ensure_topics(settings)

    async def hangs():
        await asyncio.sleep(3600)

    async def stubborn():  # ignores cancellation for a while: must hold back neither the answer nor the event
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(1.0)

    async def raises():
        await asyncio.sleep(0.005)
        raise RuntimeError("challenger broke")

    async def answers():
        await asyncio.sleep(0.02)
        return 0.4

    async def champion_fails():
        raise LookupError("champion broke")

    async def scenario(publisher):
        runner = ShadowRunner(publisher, sample_rate=1.0, timeout_s=0.3)
        refs = dict(champion_model=ModelRef("fraud", "v6"), challenger_model=ModelRef("fraud", "v7"))
        returned = {}
        for request_id, challenger in [("r-hangs", hangs), ("r-stubborn", stubborn), ("r-raises", raises),
                                       ("r-ok", answers)]:
            started = time.monotonic()
            answer = await runner.run(_champion, challenger, experiment_id="fraud", unit_id=f"u-{request_id}",
                                      request_id=request_id, **refs)
            returned[request_id] = (answer, time.monotonic() - started)
        with pytest.raises(LookupError):
            await runner.run(champion_fails, answers, experiment_id="fraud", unit_id="u", request_id="r-x", **refs)
        assert await runner.drain(5) == 0
        return runner, returned

    with EventPublisher(settings) as publisher:
        runner, returned = asyncio.run(scenario(publisher))
        assert publisher.flush(10) == 0
    for request_id, (answer, elapsed_s) in returned.items():
        assert answer == {"score": 0.9, "label": "fraud"}
        assert elapsed_s < 0.2, (request_id, elapsed_s)  # the champion's time, not the timeout
    assert (runner.published, runner.not_published) == (4, 1)
    events = {e["request_id"]: e for e in (Codec().decode(EventKind.SHADOW, m.value())
                                           for m in read_topic(settings, "shadow", 4))}
    assert {r: e["challenger_status"] for r, e in events.items()} == {
        "r-hangs": "timeout", "r-stubborn": "timeout", "r-raises": "error", "r-ok": "ok"}
    assert events["r-hangs"]["challenger_latency_ms"] is None
    assert 0 < events["r-raises"]["challenger_latency_ms"] < 300
    assert events["r-ok"]["challenger_score"] == 0.4 and events["r-ok"]["champion_score"] == 0.9
    assert events["r-ok"]["champion_label"] == "fraud" and events["r-ok"]["challenger_version"] == "v7"
    assert all(e["champion_latency_ms"] >= 10 for e in events.values())


def test_requests_outside_the_sample_run_only_the_champion():
    async def never():
        raise AssertionError("the challenger ran outside the sample")

    async def scenario():
        runner = ShadowRunner(publisher=None, sample_rate=0.0, timeout_s=1)  # type: ignore[arg-type]
        answer = await runner.run(_champion, never, experiment_id="e", unit_id="u", request_id="r",
                                  champion_model=ModelRef("a", "1"), challenger_model=ModelRef("b", "1"))
        return answer, runner.in_flight

    assert asyncio.run(scenario()) == ({"score": 0.9, "label": "fraud"}, 0)


def start_experiment(settings, weights: dict[str, float], experiment_id: str = "ranker") -> ExperimentConfig:
    running = experiments.start(config(weights, experiment_id))
    experiments.publish_config(settings, running)
    return running


@pytest.mark.kafka
def test_the_router_obeys_kill_switches_and_allocations_from_the_broker(settings):
    start_experiment(settings, {"control": 0.5, "challenger": 0.5})
    units = UNITS[:400]
    with Router(settings) as router:
        before = {u: router.variant_for("ranker", u) for u in units}
        on_challenger = [u for u, v in before.items() if v == "challenger"]
        assert 150 < len(on_challenger) < 250

        publish_control(settings, ControlKind.KILLSWITCH,
                        KillSwitch("ranker", KillAction.KILL, "challenger", 2, "p99 breached", "ranker/p99/challenger/1",
                                   int(time.time() * 1000)).to_record(), KILLSWITCH)
        poll_until(lambda: all(router.variant_for("ranker", u) == "control" for u in on_challenger),
                   what="the killed variant disappearing")
        assert all(router.variant_for("ranker", u) == "control" for u in units)

        # A lower version arriving later is not in force.
        publish_control(settings, ControlKind.KILLSWITCH,
                        KillSwitch("ranker", KillAction.RESUME, "challenger", 1).to_record(), KILLSWITCH)
        with ControlFollower(settings) as fresh:
            fresh.wait_until_caught_up(10)
            assert fresh.killswitch("ranker").action is KillAction.KILL

        publish_control(settings, ControlKind.KILLSWITCH,
                        KillSwitch("ranker", KillAction.RESUME, "challenger", 3).to_record(), KILLSWITCH)
        poll_until(lambda: {u: router.variant_for("ranker", u) for u in units} == before, what="the resume")

        client.publish_control(settings, Allocation("ranker", {"control": 0.9, "challenger": 0.1}, 7,
                                                    AllocationReason.CANARY_STEP))
        poll_until(lambda: router.weights("ranker") == {"control": 0.9, "challenger": 0.1}, what="the allocation")
        after = {u: router.variant_for("ranker", u) for u in units}
        assert set(moved(before, after)) == {("challenger", "control")}

    # A router started afterwards is in step before its first answer: start() read to the end.
    with Router(settings) as late:
        assert late.weights("ranker") == {"control": 0.9, "challenger": 0.1}
        assert {u: late.variant_for("ranker", u) for u in units} == after
        with pytest.raises(UnknownExperiment, match="no experiment 'nope'"):
            late.variant_for("nope", "u")


@pytest.mark.kafka
def test_the_router_publishes_each_exposure_once_and_its_predictions_and_outcomes(settings):
    start_experiment(settings, {"control": 0.5, "challenger": 0.5})
    experiments.publish_config(settings, config({"control": 0.5, "b": 0.5}, "draft-one"))
    # Allocation versions are publication times (ms); the exposure's field has 32 bits.
    ensure_topics(settings)
    version_ms = int(time.time() * 1000)
    client.publish_control(settings, Allocation("ranker", {"control": 0.5, "challenger": 0.5}, version_ms))
    units = UNITS[:50]
    with Router(settings) as router:
        served = {u: router.variant_for("ranker", u, segment={"platform": "ios"}) for u in units}
        assert {u: router.variant_for("ranker", u) for u in units} == served  # no second exposure
        assert router.variant_for("draft-one", "u") == "control"  # not running: control, no exposure
        variant = served["user-0"]
        assert router.record_prediction("ranker", "user-0", request_id="r0", variant=variant, latency_ms=4.0,
                                        score=0.3)
        assert router.record_outcome("ranker", "user-0", "conversion", 1.0)
        assert router.publisher.flush(10) == 0
        assert router.publisher.stats().delivered == len(units) + 2
    exposures = [Codec().decode(EventKind.ASSIGNMENT, m.value()) for m in read_topic(settings, "assignments", 60, 3)]
    assert sorted(e["unit_id"] for e in exposures) == sorted(units)
    assert all(e["variant"] == served[e["unit_id"]] and e["segment"] == {"platform": "ios"} for e in exposures)
    assert {e["allocation_version"] for e in exposures} == {version_ms}
    [prediction] = [Codec().decode(EventKind.PREDICTION, m.value()) for m in read_topic(settings, "predictions", 1)]
    assert (prediction["model_name"], prediction["model_version"]) == (f"model-{variant}", "v1")


@pytest.mark.kafka
def test_the_example_router_serves_sticky_predictions(settings, monkeypatch):
    """examples/router/app.py, run in-process by FastAPI's test client against the real broker."""
    from fastapi.testclient import TestClient

    from streams.experiments import load_config_file, publish_config, start
    from streams.topics import ensure_topics

    ensure_topics(settings)
    publish_config(settings, start(load_config_file(ROOT / "examples" / "router" / "experiment.yaml")))
    for name, value in settings.to_env().items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("example_router_app", ROOT / "examples" / "router" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with TestClient(module.app) as client:
        first = client.get("/predict", params={"user": "u-1"})
        assert first.status_code == 200, first.text
        assert first.json()["variant"] in {"control", "challenger"}
        assert all(client.get("/predict", params={"user": "u-1"}).json()["variant"] == first.json()["variant"]
                   for _ in range(5))
        assert client.get("/click", params={"user": "u-1"}).status_code == 200
        health = client.get("/health").json()
        assert health["weights"] == {"control": 0.8, "challenger": 0.2}
        assert client.get("/predict").status_code == 422  # a bad request is refused, not a traceback
