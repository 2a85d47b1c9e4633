"""Topic names, topic creation and the dead-letter message format."""
from __future__ import annotations

import time

from confluent_kafka import KafkaError, KafkaException, Producer
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
PARTIALS = "partials"
DECISIONS = "decisions"
ALERTS = "alerts"
KILLSWITCH = "killswitch"
ALLOCATIONS = "allocations"
# Internal and output topics: (partitions from settings?, extra topic configs).
_DERIVED_TOPICS = {
    DEADLETTER: {},
    # Stage 2 keeps the newest snapshot per source partition in its table; a day is plenty.
    PARTIALS: {"retention.ms": str(24 * 3600 * 1000)},
    # The newest decision per experiment is what `abstream status` reads; ClickHouse keeps history.
    DECISIONS: {"cleanup.policy": "compact", "segment.ms": str(600 * 1000)},
    ALERTS: {},
    # Routers read the newest kill switch and allocation of every experiment at start-up.
    KILLSWITCH: {"cleanup.policy": "compact"},
    ALLOCATIONS: {"cleanup.policy": "compact"},
}


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
    """Create the input, dead-letter, partials and decisions topics with ``settings.partitions``
    partitions if missing; refuse to run when an existing one has another partition count
    (the input topics and the tables of the workers must be co-partitioned)."""
    refused: list[str] = []

    def on_error(error) -> None:  # librdkafka reports refused credentials here, not as an exception
        if error.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            refused.append(error.str())

    admin = AdminClient(settings.kafka_config(error_cb=on_error))
    configs = {settings.topic(name): {} for name in INPUT_TOPICS.values()}
    configs.update({settings.topic(name): config for name, config in _DERIVED_TOPICS.items()})
    wanted = list(configs)
    deadline = time.monotonic() + timeout_s
    try:
        existing = _list_topics(admin, timeout_s, refused)
    except KafkaException as exc:
        if refused:
            raise TopicError(f"Kafka at {settings.kafka_bootstrap} refused the credentials "
                             f"(ABSTREAM_KAFKA_SASL_USERNAME / _PASSWORD): {refused[0]}") from None
        raise TopicError(f"cannot reach Kafka at {settings.kafka_bootstrap}: {exc.args[0].str()}") from None
    missing = [NewTopic(t, num_partitions=settings.partitions, replication_factor=-1, config=configs[t])
               for t in wanted if t not in existing]
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


def _list_topics(admin: AdminClient, timeout_s: float, refused: list[str]):
    """Topic metadata, asked in short rounds so that refused credentials fail at once rather
    than after the whole timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return admin.list_topics(timeout=min(2.0, max(0.1, deadline - time.monotonic()))).topics
        except KafkaException:
            admin.poll(0)  # error_cb runs only when the client is polled
            if refused or time.monotonic() >= deadline:
                raise


def deadletter_headers(dead: DeadLetter, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """Headers of a dead-letter message; its key and value are the original message's bytes."""
    return [
        ("abstream.reason", dead.reason.value.encode()),
        ("abstream.detail", dead.detail.encode("utf-8", "replace")),
        ("abstream.topic", topic.encode()),
        ("abstream.partition", str(partition).encode()),
        ("abstream.offset", str(offset).encode()),
    ]


def read_latest(settings: Settings, topic: str, timeout_s: float = 10.0) -> dict[bytes, tuple[int, bytes | None]]:
    """key -> (partition, value) of the newest record per key, reading the topic from its
    beginning to the high watermarks seen at the start (a compacted topic's current state)."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

    consumer = Consumer(settings.kafka_config(**{
        "group.id": f"{settings.topic_prefix}reader",  # assign() only: never joins or commits
        "enable.auto.commit": "false",
        "enable.partition.eof": "true",
    }))
    latest: dict[bytes, tuple[int, bytes | None]] = {}
    try:
        try:
            partitions = consumer.list_topics(topic, timeout=timeout_s).topics[topic].partitions
            pending = {}
            for p in partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
                if high > low:
                    pending[p] = high
        except KafkaException as exc:
            raise TopicError(f"cannot read {topic}: {exc.args[0].str()}") from None
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        deadline = time.monotonic() + timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise TopicError(f"did not read {topic} to its end within {timeout_s:g} s")
            message = consumer.poll(0.2)
            if message is None:
                continue
            if message.error() is not None:
                if message.error().code() == KafkaError._PARTITION_EOF:
                    pending.pop(message.partition(), None)
                continue
            latest[message.key()] = (message.partition(), message.value())
            if message.offset() + 1 >= pending.get(message.partition(), 0):
                pending.pop(message.partition(), None)
    finally:
        consumer.close()
    return latest
