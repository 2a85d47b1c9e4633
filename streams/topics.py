"""Topic names, topic creation and the dead-letter message format."""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import numpy as np
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.codec import DeadLetter, EventKind, SchemaRegistryUnavailable
from streams.settings import Settings
from streams.state_log import StateLogError, ensure_state_topic

log = logging.getLogger("abstream.topics")

# A follower that meets a record the schema registry cannot decode for now reads it again after this long.
REGISTRY_RETRY_S = 1.0

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
STAGE1_STATE = "stage1-state"
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


_MURMUR2_SEED, _MURMUR2_M = np.uint32(0x9747B28C), np.uint32(0x5BD1E995)


def murmur2_partitions(keys: Sequence[str], partitions: int) -> np.ndarray:
    """The partition each key (its UTF-8 bytes) goes to under Kafka's default partitioner:
    ``toPositive(murmur2(key)) % partitions``, as Java's producer, aiokafka and confluent-kafka's
    ``murmur2_random`` compute it (``Utils.murmur2`` in Kafka's clients), for all keys at once."""
    encoded = [key.encode() for key in keys]
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    # Longest first, so that the keys that still have a 4-byte block j are a prefix of the rows.
    order = np.argsort(-lengths, kind="stable")
    lengths = lengths[order]
    joined = np.frombuffer(b"".join(encoded[i] for i in order.tolist()), dtype=np.uint8)
    width = 4 * (int(lengths.max(initial=0)) // 4 + 1)  # room for the tail bytes, zeros after them
    padded = np.zeros((len(encoded), width), dtype=np.uint8)
    if lengths.size and lengths[0] == lengths[-1]:
        padded[:, :lengths[0]] = joined.reshape(len(encoded), -1)
    else:
        rows = np.repeat(np.arange(len(encoded)), lengths)
        padded[rows, np.arange(rows.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = joined
    blocks = padded.view("<u4")
    m, n_blocks, at = _MURMUR2_M, lengths // 4, np.arange(len(encoded))
    with np.errstate(over="ignore"):  # 32-bit arithmetic wraps, as Java's int does
        h = _MURMUR2_SEED ^ lengths.astype(np.uint32)
        for j in range(int(n_blocks.max(initial=0))):
            n = int(np.count_nonzero(n_blocks > j))
            k = blocks[:n, j] * m
            k = (k ^ (k >> np.uint32(24))) * m
            h[:n] = (h[:n] * m) ^ k
        tail, base = lengths % 4, 4 * n_blocks
        h ^= np.where(tail == 3, padded[at, base + 2].astype(np.uint32) << np.uint32(16), np.uint32(0))
        h ^= np.where(tail >= 2, padded[at, base + 1].astype(np.uint32) << np.uint32(8), np.uint32(0))
        h = np.where(tail >= 1, (h ^ padded[at, base].astype(np.uint32)) * m, h)
        h ^= h >> np.uint32(13)
        h *= m
        h ^= h >> np.uint32(15)
    result = np.empty(len(encoded), dtype=np.int64)
    result[order] = (h & np.uint32(0x7FFFFFFF)) % np.uint32(partitions)
    return result


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
    # Stage 1's state log: one partition per input partition, and never a record deleted by the broker.
    try:
        ensure_state_topic(settings, settings.topic(STAGE1_STATE), settings.partitions, timeout_s)
    except StateLogError as exc:
        raise TopicError(str(exc)) from None


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
    from confluent_kafka import OFFSET_BEGINNING, Consumer

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


# Errors of a partition whose topic was created a moment ago (its leader is being elected).
_NOT_READY = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TIMED_OUT}


class TopicFollower:
    """Compacted topics followed from their beginning in a background thread: the state a
    subclass builds from them is kept current for as long as it runs.

    A subclass names its topics and implements :meth:`_apply`, which reads one message and
    returns whether the state changed; ``version`` then increases, so callers can compare it
    with the value they last saw or block in :meth:`wait_for_change`. Errors are raised as
    ``error_type`` (a :class:`TopicError`).
    """

    error_type: type[TopicError] = TopicError

    def __init__(self, settings: Settings, topics: list[str], *, role: str, poll_s: float = 0.2):
        self.settings = settings
        self.topics = list(topics)
        self._role = role
        self._poll_s = poll_s
        self._version = 0
        self.skipped = 0
        self._changed = threading.Condition()
        self._read_to: dict[tuple[str, int], int] = {}  # (topic, partition) -> offset after the last read
        self._start_ends: dict[tuple[str, int], int] = {}
        self._partitions: list[tuple[str, int]] = []
        self._probe = None  # asks for high watermarks, from callers' threads
        self._probe_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: str | None = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _reader(self):
        from confluent_kafka import Consumer

        # assign() only, never commits: the group id is required by librdkafka but unused.
        return Consumer(self.settings.kafka_config(**{
            "group.id": f"{self.settings.topic_prefix}{self._role}-reader", "enable.auto.commit": "false",
            "enable.partition.eof": "true", "auto.offset.reset": "earliest"}))

    def start(self, timeout_s: float = 30.0):
        """Note the topics' high watermarks and start following them from the beginning."""
        from confluent_kafka import OFFSET_BEGINNING

        if self._thread is not None:
            return self
        deadline = time.monotonic() + timeout_s
        self._probe = self._reader()
        consumer = self._reader()
        try:
            existing = consumer.list_topics(timeout=timeout_s).topics
            missing = [t for t in self.topics if t not in existing]
            if missing:
                raise self.error_type(f"topic {missing[0]} does not exist; a worker creates it (or ensure_topics())")
            self._partitions = [(t, p) for t in self.topics for p in sorted(existing[t].partitions)]
            self._start_ends = self._high_watermarks(deadline)
            consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for t, p in self._partitions])
        except KafkaException as exc:
            consumer.close()
            self._close_probe()
            raise self.error_type(f"cannot follow {', '.join(self.topics)}: {exc.args[0].str()}") from None
        except TopicError:
            consumer.close()
            self._close_probe()
            raise
        self._stopping.clear()
        self._error = None
        self._thread = threading.Thread(target=self._follow, args=(consumer,), name=f"{self._role}-follower", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._close_probe()

    def _close_probe(self) -> None:
        with self._probe_lock:
            if self._probe is not None:
                self._probe.close()
                self._probe = None

    def _high_watermarks(self, deadline: float) -> dict[tuple[str, int], int]:
        ends = {}
        with self._probe_lock:
            if self._probe is None:
                raise self.error_type(f"the {self._role} follower is not started")
            for topic, partition in self._partitions:
                while True:
                    try:
                        ends[(topic, partition)] = self._probe.get_watermark_offsets(
                            TopicPartition(topic, partition), timeout=max(0.5, deadline - time.monotonic()), cached=False)[1]
                        break
                    except KafkaException as exc:
                        if exc.args[0].code() not in _NOT_READY or time.monotonic() > deadline:
                            raise
                        time.sleep(0.1)
        return ends

    def _follow(self, consumer) -> None:
        try:
            while not self._stopping.is_set():
                message = consumer.poll(self._poll_s)
                if message is None:
                    continue
                error = message.error()
                if error is not None and error.code() != KafkaError._PARTITION_EOF:
                    if error.fatal():
                        raise self.error_type(error.str())
                    continue  # librdkafka retries transient errors itself
                try:
                    changed = self._apply(message) if error is None else False
                except SchemaRegistryUnavailable as exc:
                    # Not skipped (an experiment's config must not go missing for an outage):
                    # the record is read again once the registry answers.
                    log.warning("%s follower waits for the schema registry: %s", self._role, exc)
                    consumer.seek(TopicPartition(message.topic(), message.partition(), message.offset()))
                    self._stopping.wait(REGISTRY_RETRY_S)
                    continue
                position = message.offset() + 1 if error is None else message.offset()
                where = (message.topic(), message.partition())
                with self._changed:
                    if changed:
                        self._version += 1
                    self._read_to[where] = max(position, self._read_to.get(where, 0))
                    self._changed.notify_all()
        except Exception as exc:  # keep serving the last known state, and say why it stopped
            self._error = f"{type(exc).__name__}: {exc}"
            log.error("%s follower stopped: %s", self._role, self._error)
        finally:
            consumer.close()
            with self._changed:
                self._changed.notify_all()

    def _apply(self, message) -> bool:
        """Read one record into the state (under ``self._changed`` where it mutates shared
        state); True when the state changed."""
        raise NotImplementedError

    @property
    def version(self) -> int:
        return self._version

    @property
    def error(self) -> str | None:
        """Why the follower stopped, or None while it follows."""
        return self._error

    def _wait_until_read(self, ends: dict[tuple[str, int], int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while any(self._read_to.get(where, 0) < end for where, end in ends.items()):
                if self._error is not None:
                    raise self.error_type(f"the {self._role} follower stopped: {self._error}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise self.error_type(f"did not read {', '.join(self.topics)} to their ends within {timeout_s:g} s")
                self._changed.wait(left)

    def wait_until_caught_up(self, timeout_s: float = 30.0) -> None:
        """Return once every record up to the high watermarks seen at :meth:`start` has been read."""
        if self._thread is None:
            raise self.error_type(f"the {self._role} follower is not started")
        self._wait_until_read(self._start_ends, timeout_s)

    def refresh(self, timeout_s: float = 5.0) -> None:
        """Return once every record published before this call has been read: for a caller
        that meets a key it does not know yet. Costs one broker round trip."""
        if self._thread is None:
            raise self.error_type(f"the {self._role} follower is not started")
        try:
            ends = self._high_watermarks(time.monotonic() + timeout_s)
        except KafkaException as exc:
            raise self.error_type(f"cannot ask for the end of {', '.join(self.topics)}: {exc.args[0].str()}") from None
        self._wait_until_read(ends, timeout_s)

    def wait_for_change(self, since_version: int, timeout_s: float) -> int:
        """Block until ``version`` differs from ``since_version`` or ``timeout_s`` passes;
        return the version then."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._version == since_version and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return self._version
