"""Stage 1's per-partition state, kept as a chain of atomic transactions in a Kafka topic.

Why: stage 1 holds, per input partition, unit states and partition-level counters. A
changelog record per unit costs a Python produce per touched unit and cannot keep the
counters consistent with the units after a crash. Instead, per input partition and per
processed batch, the owner writes ONE transaction to ``<prefix>stage1-state`` (state
partition p belongs to input partition p): the batch's state changes and the input
positions they cover. Whoever owns the partition next rebuilds the state by replaying that
partition of the topic. The replay must be exact: a transaction counts entirely or not at
all, and nothing written by a stale owner (a "zombie" that lost the partition but still
finishes a write) may count once a new owner has taken over.

Records (all in one topic partition, produced by one idempotent producer; metadata in
headers, values are the caller's bytes):

    kind=chunk   base, txn, owner                  value: one chunk of the transaction
    kind=commit  base, txn, owner, type, chunks    value: empty; ``chunks`` = how many
    kind=claim   base, owner                       value: empty

Header values are ASCII: ``base`` and ``chunks`` in decimal, ``txn`` an id unique to the
transaction, ``type`` the writer's name for it, ``owner`` the writer's name (for people).
A writer appends one transaction per partition at a time: the next one is chained to this
one's commit offset, which the delivery report tells.

The chain. ``base`` is the offset of the last ACCEPTED record (commit or claim) that its
writer had applied when it wrote the record. A reader replays the partition from its log
start, holding ``tip``, the offset of the last accepted record:

- the initial tip is -1 when the log starts at offset 0; after a truncation (below) it is
  the base of the first record;
- a chunk with base == tip is kept as pending for its txn; any other chunk is ignored;
- a commit with base == tip whose txn has exactly the announced number of pending chunks is
  accepted: its transaction counts, tip becomes its offset, pending chunks are dropped;
  any other commit is ignored;
- a claim with base == tip is accepted: tip becomes its offset.

Acceptance depends only on the records before it, so every reader, at any time, accepts the
same records: the chain is the single history of the partition. A writer's record counts
only if nothing was accepted between the writer's last applied record and it. A
transaction whose chunk or commit never landed is never accepted (the count does not match,
or there is no commit), and whatever follows it is written by a writer that did not apply
it, so it stays out forever.

Taking a partition over (``acquire``): load the chain, write a claim chained to the loaded
tip, wait for its delivery, and replay the records between the load and the claim. If the
chain accepts the claim, nothing was appended meanwhile and the claim is verified: from
then on every record chained to an earlier tip (a zombie's late commit, above all) is dead,
because the tip has moved past its base and never comes back. If something was accepted
meanwhile (a zombie's last commit, another owner's claim), the claim is dead: the new
owner applies what was accepted and claims again from the new tip.

What a writer knows without reading. After its verified claim, a writer's transaction
whose records land right after its tip (no foreign record in between, which the delivery
offsets show) is accepted for sure. Once a foreign record lands among its own, it no
longer knows, short of reading the log: a zombie's tip looks just like an owner's.

Coming back (``acquire(since_tip=...)``). A caller that kept its state at ``since_tip`` may
read only the records after it, but only if the chain accepted ``since_tip``: the replay
from it then equals the full replay, whatever follows. So the incremental load is taken
only for a tip this StateLog knew to be accepted when it released the partition, and only
while the log still holds every record after it; otherwise the load starts from the log
start. (Checking merely that the records after ``since_tip`` chain from it would not do: a
zombie's dead tip with no later record passes that check.)

Snapshots and truncation. A transaction of type ``snapshot`` replaces all state before
it, so a load returns the last accepted snapshot and what follows. ``truncate`` then
deletes the records before the snapshot's first record. That is safe only if the snapshot
was accepted (else a zombie could cut away the new owner's claim and make its own dead
snapshot the start of history), so a writer that cannot tell from offsets reads the log
to make sure first (see ``StateLog.truncate``). After it, the reader's tip just before the
snapshot's first record was the snapshot's base, which is exactly the initial tip a reader
takes from the first record of the truncated log: the replay of the truncated log accepts
what the full log did from the snapshot on. A truncation that overtakes a load makes the
load start again from the new log start.

The topic therefore must never lose records by itself: cleanup.policy=delete with
retention.ms=-1 and retention.bytes=-1 (``ensure_state_topic`` creates it so and refuses a
topic configured otherwise).
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from streams.settings import Settings

SNAPSHOT = "snapshot"
# librdkafka's default message.max.bytes is 1,000,000 for a record with its headers; the
# broker's default max.message.bytes is about 1 MiB for a whole batch.
MAX_CHUNK_BYTES = 900_000
TOPIC_CONFIG = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}

# Errors of a partition whose topic was created a moment ago (its leader is being elected).
_NOT_READY = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
              KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._TIMED_OUT}
# A read position below the log start: a truncation ran while we read.
_LOG_MOVED = {KafkaError.OFFSET_OUT_OF_RANGE, KafkaError._AUTO_OFFSET_RESET}


@dataclass(frozen=True)
class Transaction:
    type: str  # the writer's name for it: "delta", "snapshot", "drop", ...
    chunks: list[bytes]
    offset: int  # offset of its commit record


@dataclass(frozen=True)
class Loaded:
    """What a new owner applies: with ``from_start``, to an empty state (the transactions start
    from scratch; the first is usually a snapshot); otherwise to its state at ``since_tip``."""
    partition: int
    from_start: bool
    transactions: list[Transaction]
    tip: int  # the verified claim's offset


class StateLogError(RuntimeError):
    """Kafka cannot be reached, the topic is missing or misconfigured, or the log is unusable."""


class StateWriteFailed(StateLogError):
    """Writes to these partitions did not all land: re-acquire them (their tips are forgotten)."""

    def __init__(self, message: str, partitions: set[int]):
        super().__init__(message)
        self.partitions = partitions


class PartitionTakenOver(StateWriteFailed):
    """Another owner claimed the partition: this writer's later transactions do not count."""


class _LogMoved(Exception):
    """A truncation moved the log start past the read position: load again."""


def ensure_state_topic(settings: Settings, topic: str, partitions: int, timeout_s: float = 30.0) -> None:
    """Create the state topic with ``partitions`` partitions if missing (one per input
    partition); refuse an existing one with another partition count or a config that lets
    the broker delete records on its own."""
    admin = AdminClient(settings.kafka_config())
    deadline = time.monotonic() + timeout_s
    try:
        existing = admin.list_topics(timeout=timeout_s).topics
        if topic not in existing:
            future = admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=-1,
                                                   config=TOPIC_CONFIG)], operation_timeout=timeout_s)[topic]
            try:
                future.result(timeout=timeout_s)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
        while (found := admin.list_topics(topic, timeout=timeout_s).topics[topic]).error is not None:
            if time.monotonic() > deadline:
                raise StateLogError(f"topic {topic} did not appear within {timeout_s:g} s")
            time.sleep(0.1)
        described = admin.describe_configs([ConfigResource("topic", topic)])
        configs = next(iter(described.values())).result(timeout=timeout_s)
    except KafkaException as exc:
        raise StateLogError(f"cannot create or check {topic} at {settings.kafka_bootstrap}: "
                            f"{exc.args[0].str()}") from None
    if len(found.partitions) != partitions:
        raise StateLogError(f"topic {topic} has {len(found.partitions)} partitions, expected {partitions} "
                            "(one per input partition): delete it or fix ABSTREAM_PARTITIONS")
    wrong = {k: configs[k].value for k, v in TOPIC_CONFIG.items() if configs[k].value != v}
    if wrong:
        wanted = ", ".join(f"{k}={v}" for k, v in TOPIC_CONFIG.items())
        raise StateLogError(f"topic {topic} has {wrong}; the state log needs {wanted} "
                            "(the broker must never delete its records): alter or delete the topic")


class _Chain:
    """The reader's side of the chain (module docstring): replays records in offset order and
    keeps the accepted transactions since the last accepted snapshot."""

    def __init__(self, tip: int | None):
        self.tip = tip  # None: take the first record's base (a truncated log)
        self.transactions: list[Transaction] = []
        self.restarted = False  # a snapshot was accepted: the transactions start from scratch
        self._pending: dict[bytes, list[bytes]] = {}

    def feed(self, message) -> None:
        headers = dict(message.headers() or ())
        try:
            kind, base = headers["kind"], int(headers["base"])
        except (KeyError, ValueError):
            if self.tip is None:
                raise StateLogError(f"the first record of {message.topic()} [{message.partition()}] "
                                    f"(offset {message.offset()}) is not a state-log record") from None
            return  # not ours: nothing accepts it
        if self.tip is None:
            self.tip = base
        if base != self.tip:
            return
        if kind == b"chunk":
            self._pending.setdefault(headers.get("txn"), []).append(message.value() or b"")
        elif kind == b"commit":
            try:
                txn, type_, count = headers["txn"], headers["type"].decode(), int(headers["chunks"])
            except (KeyError, ValueError, UnicodeDecodeError):
                return
            chunks = self._pending.get(txn, [])
            if len(chunks) != count:
                return
            transaction = Transaction(type_, chunks, message.offset())
            if type_ == SNAPSHOT:
                self.transactions = [transaction]
                self.restarted = True
            else:
                self.transactions.append(transaction)
            self._accept(message.offset())
        elif kind == b"claim":
            self._accept(message.offset())

    def _accept(self, offset: int) -> None:
        self.tip = offset
        self._pending = {}


class _Reader:
    """One partition read in offset order from ``start`` by a group-less consumer."""

    def __init__(self, consumer: Consumer, topic: str, partition: int, start: int, timeout_s: float):
        consumer.assign([TopicPartition(topic, partition, start)])
        self._consumer = consumer
        self._where = f"{topic} [{partition}]"
        self._timeout_s = timeout_s
        self._held: list = []  # read past the last call's target: the next call's first records
        self.next = start

    def feed_through(self, last: int, chain: _Chain) -> None:
        """Feed the records up to offset ``last`` (inclusive) to ``chain``."""
        stalled_since = time.monotonic()
        last_error = ""
        while self.next <= last:
            # Offsets have no gaps here (no compaction, no transaction markers): asking for exactly
            # what is left returns as soon as it is read, rather than at the timeout.
            wanted = min(1000, last - self.next + 1)
            messages, self._held = self._held or self._consumer.consume(wanted, 0.5), []
            for i, message in enumerate(messages):
                error = message.error()
                if error is not None:
                    if error.code() in _LOG_MOVED:
                        raise _LogMoved()
                    if error.fatal():
                        raise StateLogError(f"cannot read {self._where}: {error.str()}")
                    last_error = f": {error.str()}"
                    continue  # librdkafka retries transient errors itself
                if message.offset() > last:
                    self._held = messages[i:]
                    break
                chain.feed(message)
                self.next = message.offset() + 1
                stalled_since = time.monotonic()
            if time.monotonic() - stalled_since > self._timeout_s:
                raise StateLogError(f"no progress reading {self._where} at offset {self.next} "
                                    f"for {self._timeout_s:g} s{last_error}")


@dataclass
class _Txn:
    """Delivery of one queued transaction, filled by its records' delivery reports."""
    type: str
    records: int
    delivered: int = 0
    first: int | None = None  # offset of its first record
    commit: int = -1  # offset of its commit (the last record)
    errors: list[str] = field(default_factory=list)

    def on_delivery(self, error, message) -> None:
        if error is not None:
            self.errors.append(error.str())
            return
        offset = message.offset()
        self.delivered += 1
        self.first = offset if self.first is None else min(self.first, offset)
        self.commit = max(self.commit, offset)

    @property
    def landed(self) -> bool:
        return self.delivered == self.records and not self.errors


@dataclass
class _Owned:
    """This writer's view of one acquired partition."""
    tip: int
    # The chain is known to accept every record of ours up to this offset (one of ours): set
    # by the verified claim, advanced while our transactions land right after each other
    # (no foreign record between them), or by reading the log in truncate().
    verified: int
    queued: _Txn | None = None
    snapshot: tuple[int, int] | None = None  # (first record, commit) of the last delivered snapshot


class StateLog:
    """The state log of one topic, as written and read by one owner (a worker). Methods may be
    called from several threads; ``acquire`` blocks on the broker, run it in a thread."""

    def __init__(self, settings: Settings, topic: str, owner: str, *, timeout_s: float = 30.0):
        self.settings = settings
        self.topic = topic
        self.owner = owner
        self._owner = owner.encode()
        self._timeout_s = timeout_s
        self._txn_prefix = f"{uuid.uuid4().hex[:12]}-"  # txn ids unique across owners and restarts
        self._txn_count = 0
        self._lock = threading.Lock()
        self._owned: dict[int, _Owned] = {}
        self._released: dict[int, int] = {}  # partition -> a tip we know the chain accepted
        self._idle_readers: list[Consumer] = []
        self._partition_count: int | None = None
        self._admin: AdminClient | None = None
        self._producer = Producer(settings.kafka_config(**{
            "enable.idempotence": "true", "acks": "all", "compression.type": "lz4", "linger.ms": "5"}))

    # --- taking a partition over ---------------------------------------------------------

    def acquire(self, partition: int, since_tip: int | None = None) -> Loaded:
        """Load the partition, claim it, verify the claim, and return what the caller must apply.

        With ``since_tip`` (the tip of this StateLog when it released the partition, the
        caller having kept its state), only the records after it are read, provided this
        StateLog knows the chain accepted that tip and the log still holds the records after
        it; otherwise, or when an accepted snapshot comes after it, ``from_start`` is True."""
        with self._lock:
            if partition in self._owned:
                raise StateLogError(f"partition {partition} of {self.topic} is already acquired")
            known = self._released.get(partition)
        with self._borrowed_reader() as consumer:
            while True:
                try:
                    chain, from_start, tip = self._load_and_claim(consumer, partition,
                                                                  since_tip if since_tip == known else None)
                    break
                except _LogMoved:
                    continue  # someone truncated the log while we read it: read the new one
        with self._lock:
            self._owned[partition] = _Owned(tip=tip, verified=tip)
            self._released.pop(partition, None)
        return Loaded(partition, from_start or chain.restarted, chain.transactions, tip)

    def _load_and_claim(self, consumer: Consumer, partition: int, since_tip: int | None) -> tuple[_Chain, bool, int]:
        low, high = self._watermarks(consumer, partition)
        if since_tip is not None and low <= since_tip + 1:
            chain, start = _Chain(since_tip), since_tip + 1
        elif low == 0:
            chain, start = _Chain(-1), 0
        elif low < high:
            chain, start = _Chain(None), low
        else:
            # No record tells which tip the writers of this log agree on.
            raise StateLogError(f"{self.topic} [{partition}] was emptied by deleting its records up to offset {low}: "
                                "its state is lost; delete and recreate the topic to start over")
        reader = _Reader(consumer, self.topic, partition, start, self._timeout_s)
        reader.feed_through(high - 1, chain)
        while True:
            claim = self._claim(partition, chain.tip)
            reader.feed_through(claim, chain)
            if chain.tip == claim:
                return chain, since_tip is None, claim
            # Records were accepted between our load and our claim (now dead): claim again.

    def _claim(self, partition: int, base: int) -> int:
        """Write a claim chained to ``base``; return its offset once delivered."""
        done = threading.Event()
        outcome: list = []

        def on_delivery(error, message) -> None:
            outcome.append(error.str() if error is not None else message.offset())
            done.set()

        self._produce(partition, b"", [("kind", b"claim"), ("base", str(base).encode()), ("owner", self._owner)],
                      on_delivery)
        deadline = time.monotonic() + self._timeout_s
        while not done.is_set():  # another thread's flush() may serve our delivery report
            if time.monotonic() > deadline:
                raise StateLogError(f"the claim of {self.topic} [{partition}] was not delivered "
                                    f"within {self._timeout_s:g} s")
            self._producer.poll(0.05)
        if isinstance(outcome[0], str):
            raise StateLogError(f"cannot write a claim to {self.topic} [{partition}]: {outcome[0]}")
        return outcome[0]

    # --- writing -------------------------------------------------------------------------

    def append(self, partition: int, type: str, chunks: Sequence[bytes]) -> None:
        """Queue one transaction chained to the partition's tip. One per partition between
        flushes: the next one chains to this one's commit offset, known once delivered."""
        with self._lock:
            owned = self._owned.get(partition)
            if owned is None:
                raise StateLogError(f"partition {partition} of {self.topic} is not acquired")
            if owned.queued is not None:
                raise StateLogError(f"partition {partition} of {self.topic} has a transaction not flushed yet: "
                                    "flush() before appending the next")
            too_big = [len(c) for c in chunks if len(c) > MAX_CHUNK_BYTES]
            if too_big:
                raise ValueError(f"a chunk of {max(too_big)} bytes exceeds the state log's limit of "
                                 f"{MAX_CHUNK_BYTES} bytes per record: split the state into smaller chunks")
            self._txn_count += 1
            owned.queued = txn = _Txn(type, len(chunks) + 1)
            chain = [("base", str(owned.tip).encode()), ("txn", f"{self._txn_prefix}{self._txn_count}".encode()),
                     ("owner", self._owner)]
        for chunk in chunks:
            self._produce(partition, chunk, [("kind", b"chunk"), *chain], txn.on_delivery)
        self._produce(partition, b"", [("kind", b"commit"), *chain, ("type", type.encode()),
                                       ("chunks", str(len(chunks)).encode())], txn.on_delivery)

    def _produce(self, partition: int, value: bytes, headers: list[tuple[str, bytes]], on_delivery) -> None:
        while True:
            try:
                self._producer.produce(self.topic, value, partition=partition, headers=headers,
                                       on_delivery=on_delivery)
                return
            except BufferError:  # librdkafka's queue is full: deliver some and retry
                self._producer.poll(0.1)
            except KafkaException as exc:
                raise StateLogError(f"cannot write to {self.topic} [{partition}]: {exc.args[0].str()}") from None

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait until every queued record is delivered and advance each partition's tip to its
        last commit; raise StateWriteFailed naming the partitions with a record that did not
        land (they are no longer acquired: re-acquire them)."""
        self._producer.flush(timeout_s)
        failed: dict[int, str] = {}
        with self._lock:
            for partition, owned in list(self._owned.items()):
                txn, owned.queued = owned.queued, None
                if txn is None:
                    continue
                if not txn.landed:
                    del self._owned[partition]
                    failed[partition] = txn.errors[0] if txn.errors else f"not delivered within {timeout_s:g} s"
                    continue
                right_after = txn.first == owned.tip + 1 and txn.commit - txn.first + 1 == txn.records
                if right_after and owned.verified == owned.tip:
                    owned.verified = txn.commit  # nothing foreign between our tip and this commit
                owned.tip = txn.commit
                if txn.type == SNAPSHOT:
                    owned.snapshot = (txn.first, txn.commit)
        if failed:
            detail = "; ".join(f"[{p}] {why}" for p, why in sorted(failed.items()))
            raise StateWriteFailed(f"state writes to {self.topic} did not land: {detail}", set(failed))

    # --- truncation ----------------------------------------------------------------------

    def truncate(self, partition: int) -> None:
        """Delete the records before the first record of the partition's last delivered
        snapshot (a no-op without one).

        Only an accepted snapshot may become the start of the log. When foreign records were
        written among ours since the chain was last verified (a zombie's, or a new owner's),
        the log is read from that point to the snapshot's commit first; if the chain does not
        accept the snapshot, the partition was taken over: PartitionTakenOver, and nothing is
        deleted."""
        with self._lock:
            owned = self._acquired(partition)
            if owned.snapshot is None:
                return
            first, commit = owned.snapshot
            verified = owned.verified
        if verified < commit:
            chain = _Chain(verified)
            try:
                with self._borrowed_reader() as consumer:
                    _Reader(consumer, self.topic, partition, verified + 1, self._timeout_s).feed_through(commit, chain)
            except _LogMoved:
                chain = _Chain(None)  # truncated past our verified point: by a newer owner
            with self._lock:
                if chain.tip != commit:
                    self._owned.pop(partition, None)
                    raise PartitionTakenOver(f"{self.topic} [{partition}] was claimed by another owner: "
                                             "its snapshot does not count", {partition})
                owned.verified = max(owned.verified, commit)
        future = self._admin_client().delete_records([TopicPartition(self.topic, partition, first)],
                                                     operation_timeout=self._timeout_s,
                                                     request_timeout=self._timeout_s)
        try:
            next(iter(future.values())).result(timeout=self._timeout_s)
        except KafkaException as exc:
            raise StateLogError(f"cannot truncate {self.topic} [{partition}]: {exc.args[0].str()}") from None
        with self._lock:
            if owned.snapshot == (first, commit):
                owned.snapshot = None

    # --- ownership -----------------------------------------------------------------------

    def release(self, partition: int) -> None:
        """Stop writing the partition. Its tip is remembered for ``acquire(since_tip=...)``
        when the chain is known to accept it (flush() first)."""
        with self._lock:
            owned = self._owned.pop(partition, None)
            if owned is not None and owned.queued is None and owned.verified == owned.tip:
                self._released[partition] = owned.tip

    def tip(self, partition: int) -> int | None:
        with self._lock:
            owned = self._owned.get(partition)
            return None if owned is None else owned.tip

    def close(self) -> None:
        """Deliver what is queued (for at most the timeout), then drop the clients."""
        self._producer.flush(self._timeout_s)
        self._producer.purge()
        with self._lock:
            self._owned.clear()
            readers, self._idle_readers = self._idle_readers, []
        for consumer in readers:
            consumer.close()

    # --- clients -------------------------------------------------------------------------

    def _acquired(self, partition: int) -> _Owned:
        owned = self._owned.get(partition)
        if owned is None:
            raise StateLogError(f"partition {partition} of {self.topic} is not acquired")
        return owned

    def _admin_client(self) -> AdminClient:
        if self._admin is None:
            self._admin = AdminClient(self.settings.kafka_config())
        return self._admin

    @contextmanager
    def _borrowed_reader(self) -> Iterator[Consumer]:
        """A group-less consumer, kept for the next load unless the read failed."""
        with self._lock:
            consumer = self._idle_readers.pop() if self._idle_readers else None
        if consumer is None:
            consumer = Consumer(self.settings.kafka_config(**{
                "group.id": f"{self.settings.topic_prefix}state-reader",  # assign() only: never joins or commits
                "enable.auto.commit": "false",
                "auto.offset.reset": "error",  # a position below the log start means a truncation: see _LogMoved
                "max.partition.fetch.bytes": str(16 * 1024 * 1024),
                # A broker answers a connection's requests in order: a fetch waiting for data
                # holds back the next load's watermark request for up to this long.
                "fetch.wait.max.ms": "10"}))
        try:
            yield consumer
        except KafkaException as exc:
            consumer.close()
            raise StateLogError(f"cannot read {self.topic} at {self.settings.kafka_bootstrap}: "
                                f"{exc.args[0].str()}") from None
        except BaseException:
            consumer.close()
            raise
        consumer.unassign()
        with self._lock:
            self._idle_readers.append(consumer)

    def _watermarks(self, consumer: Consumer, partition: int) -> tuple[int, int]:
        deadline = time.monotonic() + self._timeout_s
        if self._partition_count is None:
            found = consumer.list_topics(self.topic, timeout=self._timeout_s).topics[self.topic]
            if found.error is not None:
                raise StateLogError(f"topic {self.topic} does not exist ({found.error.str()}); "
                                    "ensure_state_topic() creates it")
            self._partition_count = len(found.partitions)
        if not 0 <= partition < self._partition_count:
            raise StateLogError(f"topic {self.topic} has {self._partition_count} partitions, no partition {partition}")
        while True:
            try:
                return consumer.get_watermark_offsets(TopicPartition(self.topic, partition),
                                                      timeout=max(0.5, deadline - time.monotonic()), cached=False)
            except KafkaException as exc:
                if exc.args[0].code() not in _NOT_READY or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
