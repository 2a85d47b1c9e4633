"""The sink's exactly-once ledger: as a pure object, and through the real broker and chDB,
replaying batches the way a crash, a restart, a long outage and an ambiguous write do."""
from __future__ import annotations

import threading
from collections import Counter
from dataclasses import replace

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from streams.codec import Codec, EventKind
from streams.simulate import publish, simulated_messages
from streams.sink import PartitionLedger, Sink
from streams.topics import ensure_topics, input_topic_names
from streams.warehouse import RAW_TABLES, Warehouse, WarehouseError
from tests.support import group_lag, wait_until

# --- the ledger alone ----------------------------------------------------------------------


def test_a_ledger_admits_an_identity_once_within_its_window():
    ledger = PartitionLedger(0, [], window=10)
    assert ledger.admit(7, 0) and ledger.admit(8, 1)
    assert not ledger.admit(7, 5)        # a re-send 5 offsets after its first copy
    assert not ledger.admit(7, 0)        # a replay of the first copy itself
    assert ledger.admit(7, 11)           # 11 offsets after: beyond the window, a new event
    assert not ledger.admit(7, 12)       # ...and now held twice


def test_a_ledger_forgets_whole_batches_beyond_its_window_and_raises_its_floor():
    ledger = PartitionLedger(0, [], window=4)
    for identity, offset in ((1, 0), (2, 1), (3, 2)):
        assert ledger.admit(identity, offset)
    ledger.close_batch()
    assert ledger.admit(4, 6)
    ledger.close_batch()                  # offsets 0..2 lie more than 4 back from 6: forgotten
    assert ledger.floor == 3 and len(ledger) == 1
    assert ledger.admit(5, 7)
    ledger.close_batch()
    assert ledger.floor == 3 and len(ledger) == 2  # offset 6 is within 4 of 7: kept


def test_a_ledger_rebuilt_from_the_table_judges_replays_as_the_first_reading_did():
    # Offsets 0..5 of a partition, judged live with a window of 2: the re-send at 4 (of 3)
    # was dropped, the one at 5 (of 1, four back) written.
    stream = [(10, 0), (11, 1), (12, 2), (13, 3), (13, 4), (11, 5)]
    live = PartitionLedger(0, [], window=2)
    written = [(i, o) for i, o in stream if live.admit(i, o)]
    assert written == [(10, 0), (11, 1), (12, 2), (13, 3), (11, 5)]
    # Restarted from offset 3: the ledger holds the table's rows from 3 - 2 = 1 on.
    rebuilt = PartitionLedger(1, [(i, o) for i, o in written if o >= 1], window=2)
    assert [rebuilt.admit(i, o) for i, o in stream[3:]] == [False, False, False]


def test_a_ledger_without_a_window_admits_each_offset_once():
    ledger = PartitionLedger(40, [(40, 40), (41, 41)], window=0)  # the table holds offsets 40 and 41
    assert not ledger.admit(41, 41) and ledger.admit(42, 42)
    ledger.close_batch()
    assert ledger.floor == 43 and len(ledger) == 0  # the next message comes after 42


# --- through the real broker and chDB -------------------------------------------------------


def read_inputs(settings, expected: int) -> list:
    """Every message of the input topics, in offset order per partition."""
    consumer = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}reader",
                                                 "enable.auto.commit": "false"}))
    consumer.assign([TopicPartition(t, p, 0) for t in input_topic_names(settings) for p in range(settings.partitions)])
    messages: list = []
    for _ in range(200):
        messages += [m for m in consumer.consume(1000, timeout=0.5) if m.error() is None]
        if len(messages) >= expected:
            break
    consumer.close()
    assert len(messages) == expected
    return messages


def table_counts(warehouse: Warehouse) -> dict[EventKind, tuple[int, int]]:
    """(rows, distinct (unit_id, event_id)) per raw table."""
    return {kind: tuple(warehouse.query(f"SELECT count(), uniqExact(unit_id, event_id) FROM {{db}}.{table}").rows[0])
            for kind, table in RAW_TABLES.items()}


@pytest.fixture
def published(settings):
    """1,500 messages on the input topics, 60 of them re-sends of an earlier event."""
    ensure_topics(settings)
    messages = simulated_messages(1_500, duplicates=60, n_units=150, seed=21)
    assert publish(settings, messages) == len(messages)
    distinct = Counter(m.kind for m in {(m.kind, m.record["unit_id"], m.record["event_id"]): m for m in messages}.values())
    return read_inputs(settings, len(messages)), distinct


def new_sink(settings, warehouse: Warehouse) -> Sink:
    """A sink as a restarted process has it: no ledger yet."""
    return Sink(settings, warehouse, Codec())


def exactly_once(warehouse: Warehouse, distinct: Counter) -> None:
    assert table_counts(warehouse) == {kind: (distinct[kind], distinct[kind]) for kind in RAW_TABLES}


@pytest.fixture
def warehouse(settings) -> Warehouse:
    """The test's database, with abstream's tables."""
    warehouse = Warehouse(settings.clickhouse_dsn, settings.clickhouse_database)
    warehouse.apply_schema()
    return warehouse


@pytest.mark.kafka
def test_replays_after_a_restart_write_nothing_twice(settings, published, warehouse):
    messages, distinct = published
    new_sink(settings, warehouse).write(messages[:900])  # then a crash, mid-stream
    # Restarted without a commit: the whole stream again, in two batches cut elsewhere.
    restarted = new_sink(settings, warehouse)
    restarted.write(messages[:400])
    restarted.write(messages[400:])
    exactly_once(warehouse, distinct)
    # Every raw row says where it was read.
    rows = warehouse.query("SELECT count() FROM {db}.predictions WHERE kafka_partition < 0 OR kafka_offset < 0").rows
    assert rows == [(0,)]


@pytest.mark.kafka
def test_a_replay_from_the_start_in_other_batches_writes_nothing_twice(settings, published, warehouse):
    messages, distinct = published
    sink = new_sink(settings, warehouse)
    sink.write(messages[:1000])
    sink.write(messages[1000:])
    # A restarted sink reads the stream again from the start, in other batches.
    restarted = new_sink(settings, warehouse)
    for i in range(0, len(messages), 333):
        restarted.write(messages[i:i + 333])
    exactly_once(warehouse, distinct)


@pytest.mark.kafka
def test_a_resend_beyond_the_window_is_written_again(settings, warehouse):
    # The documented bound: a re-send whose first copy is more than the window's rows back in
    # its partition counts as a new event (one unit: its events share a partition per topic).
    ensure_topics(settings)
    small = replace(settings, sink_resend_window=3)
    messages = simulated_messages(40, n_units=1, seed=5)
    kind = Counter(m.kind for m in messages).most_common(1)[0][0]
    resent = next(m for m in messages if m.kind is kind)
    assert Counter(m.kind for m in messages)[kind] > 4  # so the first copy leaves the window
    assert publish(small, [*messages, resent]) == 41
    sink = new_sink(small, warehouse)
    for message in read_inputs(small, 41):  # one message per batch, as a slow stream comes
        sink.write([message])
    copies = warehouse.query(f"SELECT count() FROM {{db}}.{RAW_TABLES[kind]} WHERE event_id = %(id)s",
                             {"id": resent.record["event_id"]}).rows
    assert copies == [(2,)]


class FailingOnce(Warehouse):
    """A warehouse whose next insert fails once, after the write landed or before it did:
    the sink cannot tell which."""

    fail_next: str | None = None  # "after the write" or "before the write"

    def insert(self, table, column_names, columns) -> None:
        when, self.fail_next = self.fail_next, None
        if when == "before the write":
            raise WarehouseError(f"insert into {table} failed: ClickHouse is unreachable")
        super().insert(table, column_names, columns)
        if when == "after the write":
            raise WarehouseError(f"insert into {table} failed: the connection dropped after the write")


@pytest.mark.kafka
@pytest.mark.parametrize("when", ["after the write", "before the write"])
def test_a_failed_write_is_retried_without_a_duplicate_or_a_loss(settings, published, when):
    messages, distinct = published
    warehouse = FailingOnce(settings.clickhouse_dsn, settings.clickhouse_database)
    warehouse.apply_schema()
    sink = new_sink(settings, warehouse)
    sink.write(messages[:500])
    warehouse.fail_next = when
    with pytest.raises(WarehouseError):
        sink.write(messages[500:1000])
    sink.write(messages[500:1000])  # what _write_until_done does next
    sink.write(messages[1000:])
    exactly_once(warehouse, distinct)


class CommitsFailWhile:
    """The sink's real consumer, whose commits fail (as while the group coordinator is away)
    until ``failing`` says otherwise."""

    def __init__(self, consumer: Consumer, failing):
        self._consumer = consumer
        self._failing = failing
        self.failed = 0

    def commit(self, *args, **kwargs):
        if self._failing():
            self.failed += 1
            raise KafkaException(KafkaError(KafkaError.COORDINATOR_NOT_AVAILABLE))
        return self._consumer.commit(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._consumer, name)


@pytest.mark.kafka
def test_offsets_whose_commit_failed_are_committed_once_the_stream_has_ended(settings, published, warehouse):
    # Every commit fails until the whole stream is written, the first one at least; no message
    # comes after it. The sink must still commit, or its group shows the stream as lag for ever.
    messages, distinct = published
    sink = new_sink(settings, warehouse)
    rows = lambda: sum(n for n, _ in table_counts(warehouse).values())  # noqa: E731
    consumer = CommitsFailWhile(sink.subscribed_consumer(), lambda: not consumer.failed or rows() < sum(distinct.values()))
    thread = threading.Thread(target=sink.run, args=(consumer,), daemon=True)
    thread.start()
    try:
        inputs = sorted(input_topic_names(settings))
        wait_until(lambda: not any(group_lag(settings, f"{settings.topic_prefix}sink", inputs).values()), 60,
                   "the sink's group to have committed the whole stream")
    finally:
        sink.stop()
    assert consumer.failed > 0 and sink.failure is None
    exactly_once(warehouse, distinct)


class CountingWarehouse:
    """One sink's handle on the warehouse that two sinks share, as two sink processes share a
    ClickHouse server (chDB admits one process, so the two sinks are threads of this one; the
    Warehouse serialises their calls): counts the rows this sink inserts."""

    def __init__(self, warehouse: Warehouse):
        self._warehouse, self.inserted = warehouse, 0

    def insert(self, table, column_names, columns) -> None:
        self._warehouse.insert(table, column_names, columns)
        self.inserted += len(columns[0]) if columns else 0

    def __getattr__(self, name):
        return getattr(self._warehouse, name)


def members_holding_input_partitions(settings, inputs: list[str]) -> int:
    """Members of the sink's group that hold input partitions now (the broker's view: a
    consumer's own methods wait while its thread polls)."""
    admin = AdminClient(settings.kafka_config())
    group = f"{settings.topic_prefix}sink"
    description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    return sum(1 for m in description.members
               if m.assignment and any(tp.topic in inputs for tp in m.assignment.topic_partitions))


@pytest.mark.kafka
def test_a_second_sink_joins_and_leaves_mid_stream_and_every_row_lands_once(settings, warehouse):
    # Partitions move to the joining sink and back; re-sends of an event fall on either side
    # of each move, so each new owner must judge by the rows the
    # other wrote: its ledgers rebuilt from the table, the leaver's offsets committed.
    ensure_topics(settings)
    messages = simulated_messages(3_000, duplicates=400, n_units=600, seed=31)
    distinct = Counter(m.kind for m in {(m.kind, m.record["unit_id"], m.record["event_id"]): m for m in messages}.values())
    inputs = sorted(input_topic_names(settings))
    sinks, threads = {}, {}

    def start(name: str) -> None:
        sinks[name] = Sink(settings, CountingWarehouse(warehouse), Codec())
        threads[name] = threading.Thread(target=sinks[name].run, daemon=True)
        threads[name].start()

    def caught_up() -> bool:
        return not any(group_lag(settings, f"{settings.topic_prefix}sink", inputs).values())

    thirds = [messages[:1000], messages[1000:2000], messages[2000:]]
    try:
        assert publish(settings, thirds[0]) == 1000
        start("a")
        wait_until(caught_up, 60, "the first sink to write the first third")
        start("b")
        wait_until(lambda: members_holding_input_partitions(settings, inputs) == 2, 60,
                   "the second sink to get input partitions")
        assert publish(settings, thirds[1]) == 1000
        wait_until(lambda: caught_up() and sinks["b"].warehouse.inserted > 0, 60, "both sinks to write the second third")
        sinks["b"].stop()  # leaves the group: its partitions go back to the first sink
        threads["b"].join(30)
        before = sinks["a"].warehouse.inserted
        assert publish(settings, thirds[2]) == 1000
        wait_until(caught_up, 60, "the first sink to write the last third")
    finally:
        for sink in sinks.values():
            sink.stop()
        for thread in threads.values():
            thread.join(30)
    assert sinks["a"].warehouse.inserted > before and all(s.failure is None for s in sinks.values())
    exactly_once(warehouse, distinct)
