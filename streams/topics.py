"""Topic names, topic creation and the dead-letter message format."""
from __future__ import annotations

import time

from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from streams.codec import DeadLetter, EventKind
from streams.settings import Settings

# Input topics are keyed by unit_id and co-partitioned, so that a unit's exposure and its
# later outcomes meet in the same partition (and worker).
INPUT_TOPICS = {
    EventKind.ASSIGNMENT: "assignments",
    EventKind.PREDICTION: "predictions",
    EventKind.SHADOW: "shadow",
    EventKind.OUTCOME: "outcomes",
}
DEADLETTER = "deadletter"


class TopicError(RuntimeError):
    """A topic is missing, mis-partitioned, or the broker cannot be reached."""


def input_topic_names(settings: Settings) -> dict[str, EventKind]:
    return {settings.topic(name): kind for kind, name in INPUT_TOPICS.items()}


def producer_config(settings: Settings, **extra: str) -> dict[str, str]:
    """confluent-kafka producer settings: idempotent, and murmur2 partitioning like Java and
    aiokafka, so that a unit lands on the same partition whoever produces it."""
    return settings.kafka_config(
        **{"enable.idempotence": "true", "partitioner": "murmur2_random", "linger.ms": "5", **extra}
    )


def make_producer(settings: Settings, **extra: str) -> Producer:
    return Producer(producer_config(settings, **extra))


def ensure_topics(settings: Settings, timeout_s: float = 30.0) -> None:
    """Create the input and dead-letter topics with ``settings.partitions`` partitions if missing;
    refuse to run when an existing one has another partition count (co-partitioning)."""
    admin = AdminClient(settings.kafka_config())
    wanted = [settings.topic(name) for name in INPUT_TOPICS.values()] + [settings.topic(DEADLETTER)]
    deadline = time.monotonic() + timeout_s
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
    except KafkaException as exc:
        raise TopicError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc.args[0].str()}") from None
    missing = [NewTopic(t, num_partitions=settings.partitions, replication_factor=-1) for t in wanted if t not in existing]
    if missing:
        for topic, future in admin.create_topics(missing, operation_timeout=timeout_s).items():
            try:
                future.result(timeout=max(1.0, deadline - time.monotonic()))
            except KafkaException as exc:
                if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    raise TopicError(f"cannot create topic {topic}: {exc.args[0].str()}") from None
    while True:
        topics = admin.list_topics(timeout=timeout_s).topics
        counts = {t: len(topics[t].partitions) for t in wanted if t in topics}
        if len(counts) == len(wanted):
            break
        if time.monotonic() > deadline:
            raise TopicError(f"topics did not appear in time: {sorted(set(wanted) - set(counts))}")
        time.sleep(0.1)
    wrong = {t: n for t, n in counts.items() if n != settings.partitions}
    if wrong:
        raise TopicError(
            f"topics {sorted(wrong)} have {sorted(set(wrong.values()))} partitions, expected {settings.partitions} "
            "(ABSTREAM_PARTITIONS): input topics must be co-partitioned"
        )


def deadletter_headers(dead: DeadLetter, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter message; its key and value are the original message's bytes."""
    return [
        ("abstream.reason", dead.reason.value.encode()),
        ("abstream.detail", dead.detail.encode("utf-8", "replace")),
        ("abstream.topic", topic.encode()),
        ("abstream.partition", str(partition).encode()),
        ("abstream.offset", str(offset).encode()),
    ]
