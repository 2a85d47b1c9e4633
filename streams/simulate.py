"""Simulated traffic: the four event kinds for a few experiments, with optional duplicates and
malformed messages, published keyed by unit_id exactly as model-serving services would."""
from __future__ import annotations

import math
import random
import struct
from dataclasses import dataclass
from typing import Callable, Sequence

from streams.codec import Codec, EventKind
from streams.settings import Settings
from streams.topics import INPUT_TOPICS, make_producer

EXPERIMENTS = ("exp-ranker", "exp-checkout")
VARIANTS = ("control", "treatment")
START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class SimulatedMessage:
    kind: EventKind
    key: bytes
    value: bytes
    record: dict | None  # None for a malformed message
    duplicate: bool = False


def simulate_records(n_events: int, *, n_units: int = 500, seed: int = 0, run_id: str = "") -> list[tuple[EventKind, dict]]:
    """A reproducible stream of valid events: each unit's assignment comes before its
    predictions, shadow runs and outcomes; event times increase. ``run_id`` prefixes the
    event and request ids, so that two runs never share an event's identity."""
    rng = random.Random(seed)
    records: list[tuple[EventKind, dict]] = []
    exposed: dict[tuple[str, str], str] = {}
    t = START_MS
    while len(records) < n_events:
        t += rng.randint(1, 50)
        experiment = rng.choice(EXPERIMENTS)
        unit = f"u{rng.randrange(n_units):05d}"
        base = {"event_id": f"{run_id}e{len(records):08d}", "event_time": t, "experiment_id": experiment, "unit_id": unit}
        variant = exposed.get((experiment, unit))
        if variant is None:
            variant = exposed[(experiment, unit)] = rng.choice(VARIANTS)
            segment = {"country": rng.choice(("de", "fr", "us")), "platform": rng.choice(("ios", "android", "web"))}
            records.append((EventKind.ASSIGNMENT, {**base, "variant": variant, "allocation_version": 1, "segment": segment}))
            continue
        roll = rng.random()
        request = f"{run_id}r{len(records):08d}"
        if roll < 0.55:
            status = rng.choices(("ok", "error", "timeout"), (0.97, 0.02, 0.01))[0]
            records.append((EventKind.PREDICTION, {
                **base, "request_id": request, "variant": variant, "model_name": "ranker",
                "model_version": "v2" if variant == "treatment" else "v1",
                "score": rng.random() if status == "ok" else None, "label": None,
                "latency_ms": rng.lognormvariate(3.0, 0.4), "status": status,
            }))
        elif roll < 0.70:
            champion = rng.random()
            records.append((EventKind.SHADOW, {
                **base, "request_id": request, "champion_model": "ranker", "champion_version": "v1",
                "challenger_model": "ranker", "challenger_version": "v3",
                "champion_score": champion, "challenger_score": min(1.0, max(0.0, champion + rng.gauss(0, 0.05))),
                "champion_label": None, "challenger_label": None,
                "champion_latency_ms": rng.lognormvariate(3.0, 0.4),
                "challenger_latency_ms": rng.lognormvariate(3.1, 0.4), "challenger_status": "ok",
            }))
        else:
            metric = rng.choice(("conversion", "revenue"))
            value = float(rng.random() < 0.1) if metric == "conversion" else round(rng.expovariate(0.05), 2)
            records.append((EventKind.OUTCOME, {**base, "metric": metric, "value": value, "request_id": None}))
    return records


def malformed_payloads(codec: Codec, n: int, *, seed: int = 0) -> list[tuple[EventKind, bytes]]:
    """n payloads that must be dead-lettered, cycling through the ways a message goes bad:
    random bytes, truncated Avro, an unknown schema id, a NaN score, a negative latency."""
    if n == 0:
        return []  # (a small template may hold no prediction to spoil)
    rng = random.Random(seed + 1)
    template = simulate_records(50, seed=seed + 2)
    prediction = next(r for k, r in template if k is EventKind.PREDICTION)
    payloads: list[tuple[EventKind, bytes]] = []
    for i in range(n):
        way = i % 5
        kind, record = template[rng.randrange(len(template))]
        record = {**record, "event_id": f"bad{i:06d}"}
        if way == 0:
            payloads.append((kind, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 60)))))
        elif way == 1:
            good = codec.encode(kind, record)
            payloads.append((kind, good[: rng.randint(5, len(good) - 1)]))
        elif way == 2:
            payloads.append((kind, b"\x00" + struct.pack(">I", 9000 + i) + codec.encode(kind, record)[5:]))
        elif way == 3:
            payloads.append((EventKind.PREDICTION, codec.encode(EventKind.PREDICTION, {**prediction, "event_id": f"bad{i:06d}", "score": math.nan})))
        else:
            payloads.append((EventKind.PREDICTION, codec.encode(EventKind.PREDICTION, {**prediction, "event_id": f"bad{i:06d}", "latency_ms": -5.0})))
    return payloads


def simulated_messages(n_messages: int, *, duplicates: int = 0, malformed: int = 0, n_units: int = 500,
                       seed: int = 0, run_id: str = "", codec: Codec | None = None) -> list[SimulatedMessage]:
    """n_messages in all: distinct valid events, exact duplicates of some of them (re-sent
    later, as a retrying producer would) and malformed messages, shuffled in deterministically."""
    codec = codec or Codec()
    records = simulate_records(n_messages - duplicates - malformed, n_units=n_units, seed=seed, run_id=run_id)
    messages = [SimulatedMessage(k, r["unit_id"].encode(), codec.encode(k, r), r) for k, r in records]
    rng = random.Random(seed + 3)
    for i in rng.sample(range(len(messages)), duplicates):
        original = messages[i]
        messages.insert(rng.randint(i + 1, len(messages)), SimulatedMessage(
            original.kind, original.key, original.value, original.record, duplicate=True))
    for kind, payload in malformed_payloads(codec, malformed, seed=seed):
        messages.insert(rng.randint(0, len(messages)), SimulatedMessage(kind, f"u{rng.randrange(n_units):05d}".encode(), payload, None))
    return messages


def publish(settings: Settings, messages: Sequence[SimulatedMessage],
            on_progress: Callable[[int], None] | None = None) -> int:
    """Publish and wait for every delivery report; returns the number delivered."""
    producer = make_producer(settings)
    failures: list[str] = []
    delivered = 0

    def on_delivery(err, _msg):
        nonlocal delivered
        if err is not None:
            failures.append(err.str())
        else:
            delivered += 1

    for i, message in enumerate(messages):
        topic = settings.topic(INPUT_TOPICS[message.kind])
        while True:
            try:
                producer.produce(topic, key=message.key, value=message.value, on_delivery=on_delivery)
                break
            except BufferError:
                producer.poll(0.1)
        if on_progress is not None and i % 1000 == 999:
            producer.poll(0)
            on_progress(i + 1)
    remaining = producer.flush(60)
    if failures or remaining:
        raise RuntimeError(f"{len(failures) + remaining} messages were not delivered: {failures[:1]}")
    return delivered
