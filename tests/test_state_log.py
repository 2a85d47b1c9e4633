"""The state log against the real broker: what a new owner loads is exactly the accepted
transactions, whatever stale owners, half-written transactions and truncations left in the log."""
from __future__ import annotations

import os
import re
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic

from streams.state_log import (MAX_CHUNK_BYTES, SNAPSHOT, PartitionTakenOver, StateLog, StateLogError,
                               StateWriteFailed, ensure_state_topic)
from tests.support import free_port, make_settings


@pytest.fixture
def topic(settings) -> str:
    name = settings.topic("stage1-state")
    ensure_state_topic(settings, name, partitions=2)
    return name


@pytest.fixture
def open_log(settings, topic):
    """Makes StateLogs on the test's topic (one per owner) and closes them at the end."""
    logs: list[StateLog] = []

    def make(owner: str, cls=StateLog, **kwargs) -> StateLog:
        log = cls(settings, topic, owner, **kwargs)
        logs.append(log)
        return log

    yield make
    for log in logs:
        log.close()


def contents(loaded_or_transactions) -> list[tuple[str, list[bytes]]]:
    transactions = getattr(loaded_or_transactions, "transactions", loaded_or_transactions)
    return [(t.type, t.chunks) for t in transactions]


def write(log: StateLog, partition: int, type_: str, chunks: list[bytes]) -> tuple[str, list[bytes]]:
    """One transaction appended and flushed; what a loader should see of it."""
    log.append(partition, type_, chunks)
    log.flush()
    return type_, chunks


def load(open_log, partition: int = 0, owner: str = "observer"):
    """What a new owner loads (it claims the partition, as any owner does)."""
    return open_log(owner).acquire(partition)


def write_raw(settings, topic: str, partition: int, *records: tuple[list, bytes]) -> None:
    """Records written by hand with a plain producer, as a writer outside StateLog would."""
    offsets: list = []
    producer = Producer(settings.kafka_config(**{"enable.idempotence": "true"}))
    for headers, value in records:
        producer.produce(topic, value, partition=partition, headers=headers,
                         on_delivery=lambda error, message: offsets.append(error or message.offset()))
    assert producer.flush(10) == 0
    assert all(isinstance(o, int) for o in offsets), offsets


def chunk(base: int, txn: bytes, value: bytes) -> tuple[list, bytes]:
    return [("kind", b"chunk"), ("base", str(base).encode()), ("txn", txn), ("owner", b"hand")], value


def commit(base: int, txn: bytes, chunks: int, type_: str = "delta") -> tuple[list, bytes]:
    return [("kind", b"commit"), ("base", str(base).encode()), ("txn", txn), ("owner", b"hand"),
            ("type", type_.encode()), ("chunks", str(chunks).encode())], b""


def watermarks(settings, topic: str, partition: int = 0) -> tuple[int, int]:
    consumer = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}test-probe"}))
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10, cached=False)
    finally:
        consumer.close()


def records(settings, topic: str, partition: int = 0) -> list[dict]:
    """Headers of every record of the partition from its log start, in offset order (offset included)."""
    consumer = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}test-probe",
                                                  "enable.auto.commit": "false"}))
    try:
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10, cached=False)
        consumer.assign([TopicPartition(topic, partition, low)])
        found: list[dict] = []
        deadline = time.monotonic() + 10
        while (found[-1]["offset"] + 1 if found else low) < high:
            assert time.monotonic() < deadline, f"{topic} [{partition}] did not deliver up to offset {high}"
            found += [{"offset": m.offset(), **dict(m.headers())}
                      for m in consumer.consume(100, 0.2) if m.error() is None]
        return found
    finally:
        consumer.close()


def test_a_new_owner_loads_exactly_the_transactions_written_in_order(open_log):
    a = open_log("A")
    first = a.acquire(0)
    assert (first.from_start, first.transactions, first.tip, a.tip(0)) == (True, [], 0, 0)  # the claim is record 0

    written, commits = [], []
    largest = os.urandom(MAX_CHUNK_BYTES)  # random: lz4 cannot shrink it, the broker takes it as is
    for type_, chunks in [("delta", [b"u1", b"u2"]), ("delta", []), ("drop", [largest]), ("delta", [b""] * 3)]:
        written.append(write(a, 0, type_, chunks))
        commits.append(a.tip(0))
    assert commits == [3, 4, 6, 10]  # chunks then commit, one after the other

    b = open_log("B")
    loaded = b.acquire(0)
    assert (loaded.partition, loaded.from_start, loaded.tip, b.tip(0)) == (0, True, 11, 11)
    assert contents(loaded) == written
    assert [t.offset for t in loaded.transactions] == commits
    assert load(open_log, partition=1).transactions == []  # partitions are separate logs


def test_append_refuses_what_it_cannot_write_exactly(open_log):
    a = open_log("A")
    with pytest.raises(StateLogError, match="not acquired"):
        a.append(0, "delta", [b"x"])
    a.acquire(0)
    with pytest.raises(ValueError, match=f"exceeds the state log's limit of {MAX_CHUNK_BYTES}"):
        a.append(0, "delta", [b"ok", b"x" * (MAX_CHUNK_BYTES + 1)])
    a.append(0, "delta", [b"one"])
    with pytest.raises(StateLogError, match="flush"):
        a.append(0, "delta", [b"two"])
    a.flush()
    with pytest.raises(StateLogError, match="already acquired"):
        a.acquire(0)
    assert contents(load(open_log)) == [("delta", [b"one"])]  # the refused chunk queued nothing


def test_a_transaction_without_its_commit_or_with_a_missing_chunk_does_not_count(settings, topic, open_log):
    a = open_log("A")
    a.acquire(0)
    kept = [write(a, 0, "delta", [b"kept"])]
    tip = a.tip(0)
    write_raw(settings, topic, 0,
              chunk(tip, b"no-commit", b"lost 1"), chunk(tip, b"no-commit", b"lost 2"),  # the writer died here
              chunk(tip, b"short", b"lost 3"), commit(tip, b"short", chunks=2),  # one of two chunks
              chunk(tip - 1, b"stale", b"lost 4"), commit(tip, b"stale", chunks=1),  # its chunk chained elsewhere
              commit(tip + 1, b"ahead", chunks=0))  # chained to a record that was never accepted
    # None of them moved the tip: A's next transaction, chained to it, still counts ...
    kept.append(write(a, 0, "delta", [b"after"]))
    # ... and so does a well-formed one written by hand: the format is what the module says.
    tip = a.tip(0)
    write_raw(settings, topic, 0, chunk(tip, b"by-hand", b"h1"), chunk(tip, b"by-hand", b"h2"),
              commit(tip, b"by-hand", chunks=2, type_="drop"))
    kept.append(("drop", [b"h1", b"h2"]))

    loaded = load(open_log)
    assert contents(loaded) == kept
    assert loaded.from_start


def test_a_zombie_write_after_a_takeover_never_counts(settings, topic, open_log):
    a, b = open_log("A"), open_log("B")
    a.acquire(0)
    a1 = write(a, 0, "delta", [b"a1"])

    b_loaded = b.acquire(0)  # A has lost the partition but does not know it yet
    assert contents(b_loaded) == [a1]
    bases = [a.tip(0)]
    write(a, 0, "delta", [b"a2 (zombie)"])  # lands, chained to A's tip from before B's claim
    bases.append(a.tip(0))
    b_state = contents(b_loaded) + [write(b, 0, "delta", [b"b1"]), write(b, 0, "delta", [b"b2"])]
    write(a, 0, SNAPSHOT, [b"zombie snapshot"])

    late_commits = [r for r in records(settings, topic)
                    if r["owner"] == b"A" and r["kind"] == b"commit" and r["offset"] > b_loaded.tip]
    assert [int(r["base"]) for r in late_commits] == bases  # both late writes landed, on A's old chain
    # A stale owner may not make its snapshot the start of the log: it would cut B's claim away.
    with pytest.raises(PartitionTakenOver) as refused:
        a.truncate(0)
    assert refused.value.partitions == {0} and a.tip(0) is None
    assert watermarks(settings, topic)[0] == 0

    c_loaded = load(open_log, owner="C")
    assert contents(c_loaded) == b_state == [a1, ("delta", [b"b1"]), ("delta", [b"b2"])]


def test_a_claim_contested_by_a_write_after_the_load_is_made_again(settings, topic, open_log):
    a = open_log("A")
    a.acquire(0)
    a1 = write(a, 0, "delta", [b"a1"])

    class Contested(StateLog):
        """Lets A append once between this owner's load and its first claim."""
        contested = False

        def _claim(self, partition: int, base: int) -> int:
            if not self.contested:
                self.contested = True
                write(a, 0, "delta", [b"a2, after B's load"])
            return super()._claim(partition, base)

    b = open_log("B", cls=Contested)
    loaded = b.acquire(0)
    a2 = ("delta", [b"a2, after B's load"])
    assert contents(loaded) == [a1, a2]  # B applies what beat its first claim
    claims = [r for r in records(settings, topic) if r["kind"] == b"claim" and r["owner"] == b"B"]
    assert len(claims) == 2 and claims[1]["offset"] == loaded.tip
    assert int(claims[1]["base"]) == loaded.transactions[-1].offset  # claimed again after A's commit

    write(a, 0, "delta", [b"a3, after B's second claim"])  # A is now the zombie
    b1 = write(b, 0, "delta", [b"b1"])
    assert contents(load(open_log)) == [a1, a2, b1]


def test_truncate_keeps_the_last_snapshot_and_what_follows(settings, topic, open_log):
    a = open_log("A")
    a.acquire(0)
    a.truncate(0)  # no snapshot yet: nothing to do
    assert watermarks(settings, topic)[0] == 0
    write(a, 0, "delta", [b"d1"])
    write(a, 0, "delta", [b"d2"])
    # A stale writer's record among A's: A can no longer tell from offsets alone that the chain
    # accepts its snapshot, so truncate() reads the log from its last verified record to be sure.
    write_raw(settings, topic, 0, commit(-1, b"stale", chunks=0))
    snapshot = write(a, 0, SNAPSHOT, [b"s1", b"s2", b"s3"])
    snapshot_commit = a.tip(0)
    d3 = write(a, 0, "delta", [b"d3"])
    a.truncate(0)
    assert watermarks(settings, topic)[0] == snapshot_commit - 3  # the snapshot's first chunk
    before = load(open_log, owner="after truncation")
    assert contents(before) == [snapshot, d3] and before.from_start  # the deltas before it are moot
    b = open_log("B")
    assert contents(b.acquire(0)) == [snapshot, d3]
    b.truncate(0)  # no snapshot of B's own: nothing to do
    assert watermarks(settings, topic)[0] == snapshot_commit - 3


def test_truncating_to_a_snapshot_chained_to_the_first_record_of_the_log(settings, topic, open_log):
    a = open_log("A")
    a.acquire(0)  # its claim is record 0, the base of the snapshot below
    first = write(a, 0, SNAPSHOT, [b"first"])
    a.truncate(0)
    assert watermarks(settings, topic)[0] == 1
    b = open_log("B")
    assert contents(b.acquire(0)) == [first]

    empty = write(b, 0, SNAPSHOT, [])
    b.truncate(0)
    start = watermarks(settings, topic)[0]
    assert start == b.tip(0)  # a snapshot without chunks: the log now starts with its commit,
    second = write(b, 0, SNAPSHOT, [b"second"])  # the base of this one
    first_record = records(settings, topic)[0]
    assert (first_record["offset"], first_record["kind"], first_record["type"]) == (start, b"commit", b"snapshot")
    b.truncate(0)
    assert watermarks(settings, topic)[0] == start + 1
    d = write(b, 0, "delta", [b"d"])
    assert contents(load(open_log)) == [second, d] and empty not in contents(load(open_log, owner="D"))


def test_reacquiring_after_release_reads_only_the_newer_transactions(settings, topic, open_log):
    a, b = open_log("A"), open_log("B")
    a.acquire(0)
    a1 = write(a, 0, "delta", [b"a1"])
    since = a.tip(0)
    a.release(0)
    assert a.tip(0) is None

    assert contents(b.acquire(0)) == [a1]
    b1 = write(b, 0, "delta", [b"b1"])
    b.release(0)
    again = a.acquire(0, since_tip=since)
    assert (again.from_start, contents(again)) == (False, [b1])

    # A record of a stale writer after our tip (chained to an older one) is dead in the full
    # log too: the incremental load ignores it the same way.
    a2 = write(a, 0, "delta", [b"a2"])
    since = a.tip(0)
    a.release(0)
    write_raw(settings, topic, 0, chunk(since - 2, b"stale", b"dead"), commit(since - 2, b"stale", chunks=1))
    again = a.acquire(0, since_tip=since)
    assert (again.from_start, again.transactions) == (False, [])
    assert contents(load(open_log, owner="C")) == [a1, b1, a2]

    # A tip this StateLog does not know to be accepted is not trusted: load from the start.
    a.release(0)
    stranger = open_log("D").acquire(0, since_tip=again.tip)
    assert stranger.from_start and contents(stranger) == [a1, b1, a2]


def test_reacquiring_after_a_snapshot_or_a_takeover_loads_from_the_start(settings, topic, open_log):
    a, b = open_log("A"), open_log("B")
    a.acquire(0)
    write(a, 0, "delta", [b"a1"])
    since = a.tip(0)
    a.release(0)
    b.acquire(0)
    snapshot = write(b, 0, SNAPSHOT, [b"s"])
    b1 = write(b, 0, "delta", [b"b1"])
    b.release(0)
    again = a.acquire(0, since_tip=since)  # the snapshot comes after our tip: start from it
    assert (again.from_start, contents(again)) == (True, [snapshot, b1])

    since = a.tip(0)
    a.release(0)
    b.acquire(0)
    b2 = write(b, 0, SNAPSHOT, [b"s2"])
    b.truncate(0)  # deletes A's tip: the records after it are not all there any more
    b.release(0)
    assert watermarks(settings, topic)[0] > since
    again = a.acquire(0, since_tip=since)
    assert (again.from_start, contents(again)) == (True, [b2])

    # A loses the partition to B, then writes (a zombie): its tip is dead, and B's record after
    # it does not chain from it. Re-acquiring with that tip must load from the start.
    b.acquire(0)
    a3 = write(a, 0, "delta", [b"a3 (zombie)"])
    zombie_tip = a.tip(0)
    a.release(0)
    b3 = write(b, 0, "delta", [b"b3"])
    b.release(0)
    again = a.acquire(0, since_tip=zombie_tip)
    assert (again.from_start, contents(again)) == (True, [b2, b3]) and a3 not in contents(again)


def test_a_flush_whose_records_the_broker_refuses_names_the_partition(settings, topic, open_log):
    # The broker refuses records above the topic's max.message.bytes: a real, deterministic refusal.
    admin = AdminClient(settings.kafka_config())
    limit = ConfigEntry("max.message.bytes", "8192", incremental_operation=AlterConfigOpType.SET)
    resource = ConfigResource("topic", topic, incremental_configs=[limit])
    for future in admin.incremental_alter_configs([resource]).values():
        future.result(timeout=10)
    a = open_log("A")
    a.acquire(0)
    a.acquire(1)
    a.append(0, "delta", [b"small"])
    a.append(1, "delta", [os.urandom(20_000)])  # random: lz4 cannot shrink it under the limit
    with pytest.raises(StateWriteFailed) as failed:
        a.flush()
    assert failed.value.partitions == {1} and "[1]" in str(failed.value)
    assert a.tip(1) is None and a.tip(0) is not None  # partition 0's write landed
    with pytest.raises(StateLogError, match="not acquired"):
        a.append(1, "delta", [b"x"])

    again = a.acquire(1)  # the caller re-acquires: the refused transaction does not count
    assert again.transactions == []
    small = write(a, 1, "delta", [b"small again"])
    assert contents(load(open_log, partition=1)) == [small]
    assert contents(load(open_log, partition=0, owner="other")) == [("delta", [b"small"])]


def test_a_snapshot_of_many_megabytes_loads_byte_for_byte(open_log):
    a = open_log("A")
    a.acquire(0)
    chunks = [os.urandom(512 * 1024) for _ in range(16)]  # 8 MiB the lz4 compression cannot shrink
    write(a, 0, SNAPSHOT, chunks)
    b = open_log("B")
    started = time.monotonic()
    loaded = b.acquire(0)
    seconds = time.monotonic() - started
    assert loaded.transactions[0].chunks == chunks
    print(f"loaded 8 MiB in {seconds:.3f} s: {8 / seconds:.0f} MiB/s")


def test_errors_a_user_can_cause_say_what_is_wrong(settings, topic, tmp_path):
    missing = StateLog(settings, settings.topic("no-such-topic"), "A", timeout_s=5)
    with pytest.raises(StateLogError, match="does not exist.*ensure_state_topic"):
        missing.acquire(0)
    missing.close()
    wrong_partition = StateLog(settings, topic, "A", timeout_s=5)
    with pytest.raises(StateLogError, match="2 partitions, no partition 2"):
        wrong_partition.acquire(2)
    wrong_partition.close()

    nowhere = make_settings(f"127.0.0.1:{free_port()}", tmp_path)
    unreachable = StateLog(nowhere, topic, "A", timeout_s=1)
    with pytest.raises(StateLogError, match=re.escape(f"cannot read {topic} at {nowhere.kafka_bootstrap}")) as error:
        unreachable.acquire(0)
    assert "\n" not in str(error.value)
    unreachable.close()
    with pytest.raises(StateLogError, match=f"at {nowhere.kafka_bootstrap}"):
        ensure_state_topic(nowhere, topic, 2, timeout_s=1)

    with pytest.raises(StateLogError, match="has 2 partitions, expected 3"):
        ensure_state_topic(settings, topic, 3)
    ensure_state_topic(settings, topic, 2)  # an existing, right topic is fine
    expiring = settings.topic("expiring-state")
    admin = AdminClient(settings.kafka_config())
    admin.create_topics([NewTopic(expiring, 1, 1, config={"retention.ms": "60000"})])[expiring].result(timeout=10)
    with pytest.raises(StateLogError, match="retention.ms"):
        ensure_state_topic(settings, expiring, 1)


def test_a_load_that_a_truncation_overtakes_starts_again_from_the_new_log_start(settings, topic, open_log):
    a = open_log("A")
    a.acquire(0)
    write(a, 0, "delta", [b"d1"])
    snapshot = write(a, 0, SNAPSHOT, [b"s1", b"s2"])

    class Overtaken(StateLog):
        """Lets A truncate right after this owner has asked where the log starts."""
        starts: list[int] = []

        def _watermarks(self, consumer, partition):
            low, high = super()._watermarks(consumer, partition)
            self.starts.append(low)
            if len(self.starts) == 1:
                a.truncate(0)
            return low, high

    b = open_log("B", cls=Overtaken)
    loaded = b.acquire(0)
    assert (loaded.from_start, contents(loaded)) == (True, [snapshot])
    assert b.starts == [0, watermarks(settings, topic)[0]] and b.starts[1] > 0
