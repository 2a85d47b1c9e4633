"""End to end through the real broker, a worker process and its embedded ClickHouse."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
import urllib.error
import urllib.parse
import urllib.request

import pytest
from aiokafka.partitioner import murmur2
from confluent_kafka import Consumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from streams.codec import EventKind
from streams.codec import Codec
from streams.experiments import load_config_file, publish_config, start, stop
from streams.processes import start_sink, start_worker, stop_worker, wait_healthy
from streams.simulate import SimulatedMessage, publish, simulate_records, simulated_messages
from streams.topics import DEADLETTER, INPUT_TOPICS, ensure_topics, make_producer
from streams.warehouse import RAW_TABLES, event_columns
from tests.support import free_port, wait_until

pytestmark = pytest.mark.kafka
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "experiments"


def sql(settings, query: str) -> list[list]:
    url = f"http://127.0.0.1:{settings.web_port}/sql?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())["rows"]


def scrape(settings) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def read_topic(settings, topic: str, expected: int, timeout_s: float = 60) -> list:
    consumer = Consumer(settings.kafka_config(**{"group.id": f"{settings.topic_prefix}reader", "auto.offset.reset": "earliest"}))
    consumer.assign([TopicPartition(topic, p, 0) for p in range(settings.partitions)])
    messages = []
    deadline = time.monotonic() + timeout_s
    while len(messages) < expected and time.monotonic() < deadline:
        messages += [m for m in consumer.consume(500, timeout=0.5) if m.error() is None]
    # Read on briefly: more than expected must fail the test, not go unseen.
    messages += [m for m in consumer.consume(500, timeout=1.0) if m.error() is None]
    consumer.close()
    return messages


SELECT_AS_AVRO = {
    kind: ", ".join("toUnixTimestamp64Milli(event_time)" if c == "event_time" else c for c in event_columns(kind))
    for kind in EventKind
}


def test_ten_thousand_events_reach_clickhouse_exactly_once(worker_settings, tmp_path):
    settings = worker_settings
    ensure_topics(settings)
    for example in ("ranker-conversion.yaml", "checkout-revenue.yaml"):  # the experiments of the simulated traffic
        publish_config(settings, start(load_config_file(EXAMPLES / example)))
    # Valid events of an experiment nobody defined (dead letters) and of a stopped one (ignored, counted).
    stopped = load_config_file(EXAMPLES / "ranker-conversion.yaml")
    stopped = replace(stopped, experiment_id="exp-retired")
    publish_config(settings, stop(start(stopped)))
    strays = [replace(m, record={**m.record, "experiment_id": experiment, "event_id": f"{experiment}-{m.record['event_id']}"})
              for experiment, batch in (("exp-ghost", simulate_records(30, seed=8)), ("exp-retired", simulate_records(20, seed=9)))
              for m in [SimulatedMessage(k, r["unit_id"].encode(), b"", r) for k, r in batch]]
    codec = Codec()
    strays = [replace(m, value=codec.encode(m.kind, m.record)) for m in strays]
    messages = simulated_messages(10_000, duplicates=200, malformed=50, n_units=800, seed=7) + strays
    distinct = {(m.kind, m.record["unit_id"], m.record["event_id"]): m.record for m in messages if m.record is not None}
    malformed = [m for m in messages if m.record is None]
    unknown = [m for m in strays if m.record["experiment_id"] == "exp-ghost"]
    assert len(distinct) == 9_800 and len(malformed) == 50 and len(unknown) == 30

    worker = start_worker(settings, sink=True, log_path=tmp_path / "worker.log")
    try:
        wait_healthy(settings, worker)
        assert publish(settings, messages) == 10_050

        def landed():
            rows = sql(settings, " UNION ALL ".join(
                f"SELECT '{t}', count() FROM {{db}}.{t}" for t in [*RAW_TABLES.values(), "deadletter"]))
            counts = {name: int(n) for name, n in rows}
            return counts if sum(counts.values()) >= 9_880 else None

        counts = wait_until(landed, 120, "ClickHouse to hold every event")
        wait_until(lambda: total(scrape(settings), "abstream_events_consumed_total") >= 10_050, 60, "the agent to consume all")
        time.sleep(2)  # anything beyond the expected counts would have had time to land too

        for kind, table in RAW_TABLES.items():
            expected = sorted(
                tuple(record[c] for c in event_columns(kind))
                for (k, _, _), record in distinct.items() if k is kind
            )
            got = sorted(
                tuple({} if v is None and c == "segment" else v for c, v in zip(event_columns(kind), row))
                for row in sql(settings, f"SELECT {SELECT_AS_AVRO[kind]} FROM {{db}}.{table}")
            )
            assert got == expected, f"{table} differs from the published events"
        assert counts["deadletter"] == 80

        # The deadletter table mirrors the dead-letter topic: the malformed and the unknown experiment's.
        dead_rows = sql(settings, "SELECT reason, hex(payload) FROM {db}.deadletter")
        assert sorted(bytes.fromhex(h) for _, h in dead_rows) == sorted(m.value for m in malformed + unknown)
        assert sorted(r for r, _ in dead_rows if r == "unknown_experiment") == ["unknown_experiment"] * 30

        letters = read_topic(settings, settings.topic(DEADLETTER), 80)
        assert len(letters) == 80
        assert sorted(m.value() for m in letters) == sorted(m.value for m in malformed + unknown)
        for letter in letters:
            headers = dict(letter.headers())
            assert headers["abstream.reason"].decode() in {
                "not_wire_format", "unknown_schema", "bad_avro", "invalid_field", "wrong_kind", "unknown_experiment"}
            assert headers["abstream.detail"] and headers["abstream.topic"].decode().startswith(settings.topic_prefix)

        samples = scrape(settings)
        assert total(samples, "abstream_events_consumed_total") == 10_050
        assert total(samples, "abstream_events_duplicate_total") == 200
        assert total(samples, "abstream_deadletters_total") == 80
        assert total(samples, "abstream_deadletters_total", reason="unknown_experiment") == 30
        assert total(samples, "abstream_events_ignored_total", reason="experiment_stopped") == 20
        for table in RAW_TABLES.values():
            assert total(samples, "abstream_sink_rows_total", table=table) == counts[table]
        assert total(samples, "abstream_sink_rows_total", table="deadletter") == 80
        assert total(samples, "abstream_sink_duplicates_total") == 200

        # A reader in another process reaches the embedded ClickHouse through the worker.
        cli = subprocess.run(
            [str(Path(sys.executable).parent / "abstream"), "query", "--json", "SELECT count() FROM {db}.outcomes"],
            capture_output=True, text=True, timeout=60, env={**os.environ, **settings.to_env()})
        assert cli.returncode == 0, cli.stderr
        assert json.loads(cli.stdout)["rows"] == [[counts["outcomes"]]]
    finally:
        stop_worker(worker)
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]


def test_a_worker_reads_input_compressed_with_every_codec_kafka_offers(worker_settings, tmp_path):
    """Services publish with whatever compression.type their producer sets: a quarter of the
    stream each with gzip, snappy, lz4 and zstd, and every event is counted, none dead-lettered."""
    settings = worker_settings
    ensure_topics(settings)
    for example in ("ranker-conversion.yaml", "checkout-revenue.yaml"):  # the experiments of the simulated traffic
        publish_config(settings, start(load_config_file(EXAMPLES / example)))
    messages = simulated_messages(2_000, duplicates=0, malformed=0, n_units=200, seed=13)
    worker = start_worker(settings, sink=False, log_path=tmp_path / "worker.log")
    try:
        wait_healthy(settings, worker)
        codecs = ("gzip", "snappy", "lz4", "zstd")
        for i, codec in enumerate(codecs):
            producer = make_producer(settings, **{"compression.type": codec})
            for m in messages[i::len(codecs)]:
                producer.produce(settings.topic(INPUT_TOPICS[m.kind]), key=m.key, value=m.value)
            assert producer.flush(60) == 0, codec
        wait_until(lambda: total(scrape(settings), "abstream_events_consumed_total") >= len(messages), 60,
                   "the worker to consume every event", interval_s=0.5)
        samples = scrape(settings)
        assert total(samples, "abstream_events_consumed_total") == len(messages)
        assert total(samples, "abstream_deadletters_total") == 0
        assert total(samples, "abstream_units_off_partition_total") == 0

        # A service on librdkafka's default partitioner (CRC32) puts some units elsewhere than
        # murmur2 does: each such unit is counted once per experiment, whatever its events.
        landed: dict[str, int] = {}
        crc32 = make_producer(settings, partitioner="consistent_random")
        strays = [r for k, r in simulate_records(300, seed=14) if k is EventKind.ASSIGNMENT]
        for record in strays + strays:
            record = {**record, "unit_id": f"crc-{record['unit_id']}"}
            crc32.produce(settings.topic(INPUT_TOPICS[EventKind.ASSIGNMENT]), key=record["unit_id"].encode(),
                          value=Codec().encode(EventKind.ASSIGNMENT, record),
                          on_delivery=lambda err, msg: landed.__setitem__(msg.key().decode(), msg.partition()))
        assert crc32.flush(60) == 0
        pairs = {(r["experiment_id"], f"crc-{r['unit_id']}") for r in strays}
        elsewhere = sum(landed[u] != (murmur2(u.encode()) & 0x7FFFFFFF) % settings.partitions for _, u in pairs)
        assert 0 < elsewhere < len(pairs)
        wait_until(lambda: total(scrape(settings), "abstream_events_consumed_total") >= len(messages) + 2 * len(strays),
                   60, "the worker to consume the strays", interval_s=0.5)
        assert total(scrape(settings), "abstream_units_off_partition_total", topic="assignments") == elsewhere
        assert worker.poll() is None
    finally:
        stop_worker(worker)
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]


def test_a_trickle_of_events_is_folded_in_batches_of_up_to_50_ms_not_one_per_fetch(worker_settings, tmp_path):
    """A batch's fixed cost is paid per batch: with fetches answered at the first record, a
    trickle of events made a batch each and a worker took most of a core at 1,500 events/s.
    The broker now holds a fetch until 1 MiB or 50 ms (streams/fetch.py): 59 events sent one
    every 10 ms or so made 12 batches here, and 50 without the minimum (a busy machine only
    makes batches larger)."""
    settings = worker_settings
    ensure_topics(settings)
    publish_config(settings, start(load_config_file(EXAMPLES / "ranker-conversion.yaml")))
    messages = simulated_messages(60, duplicates=0, malformed=0, n_units=20, seed=21)
    worker = start_worker(settings, sink=False, log_path=tmp_path / "worker.log")
    try:
        wait_healthy(settings, worker)
        producer = make_producer(settings)

        def send(m: SimulatedMessage) -> None:
            producer.produce(settings.topic(INPUT_TOPICS[m.kind]), key=m.key, value=m.value)
            assert producer.flush(10) == 0

        send(messages[0])  # the worker is consuming once its first event is counted
        wait_until(lambda: total(scrape(settings), "abstream_events_consumed_total") >= 1, 60,
                   "the worker to consume its first event", interval_s=0.2)
        before = total(scrape(settings), "abstream_batch_events_count")
        trickle = messages[1:]
        for m in trickle:
            send(m)
            time.sleep(0.01)
        wait_until(lambda: total(scrape(settings), "abstream_events_consumed_total") >= len(messages), 60,
                   "the worker to consume every event", interval_s=0.5)
        samples = scrape(settings)
        assert total(samples, "abstream_events_consumed_total") == len(messages)
        batches = total(samples, "abstream_batch_events_count") - before
        assert 1 <= batches <= len(trickle) / 2, batches
    finally:
        stop_worker(worker)
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]


def test_events_of_an_aborted_transaction_are_neither_counted_nor_stored(worker_settings, tmp_path):
    """A service publishing through a transactional producer: what it aborted is in the log
    (flushed before the abort) but stage 1 and the sink both read committed records only."""
    settings = worker_settings
    ensure_topics(settings)
    for example in ("ranker-conversion.yaml", "checkout-revenue.yaml"):  # the experiments of the simulated traffic
        publish_config(settings, start(load_config_file(EXAMPLES / example)))
    messages = simulated_messages(1_000, duplicates=0, malformed=0, n_units=100, seed=17)
    aborted, committed = messages[:400], messages[400:]
    worker = start_worker(settings, sink=True, log_path=tmp_path / "worker.log")
    try:
        wait_healthy(settings, worker)
        producer = make_producer(settings, **{"transactional.id": f"{settings.topic_prefix}router"})
        producer.init_transactions(30)
        for part, commit in ((aborted, False), (committed, True)):
            producer.begin_transaction()
            for m in part:
                producer.produce(settings.topic(INPUT_TOPICS[m.kind]), key=m.key, value=m.value)
            assert producer.flush(60) == 0
            (producer.commit_transaction if commit else producer.abort_transaction)(30)

        def stored() -> int:
            return sum(int(n) for [n] in sql(settings, " UNION ALL ".join(
                f"SELECT count() FROM {{db}}.{t}" for t in RAW_TABLES.values())))

        wait_until(lambda: stored() >= len(committed), 120, "ClickHouse to hold the committed events")
        wait_until(lambda: total(scrape(settings), "abstream_events_consumed_total") >= len(committed), 60,
                   "stage 1 to consume the committed events")
        time.sleep(2)  # anything beyond the expected counts would have had time to land too
        assert stored() == len(committed)
        samples = scrape(settings)
        assert total(samples, "abstream_events_consumed_total") == len(committed)
        assert total(samples, "abstream_deadletters_total") == 0
    finally:
        stop_worker(worker)
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]


def test_the_sink_role_runs_in_a_process_of_its_own(worker_settings, tmp_path):
    # `abstream sink` holds the embedded ClickHouse; the worker beside it holds no sink role.
    settings = worker_settings
    sink_settings = replace(settings, web_port=free_port())
    ensure_topics(settings)
    publish_config(settings, start(load_config_file(EXAMPLES / "ranker-conversion.yaml")))
    messages = simulated_messages(2_000, duplicates=40, malformed=0, n_units=200, seed=11)
    distinct = {(m.kind, m.record["unit_id"], m.record["event_id"]) for m in messages}
    worker = start_worker(settings, sink=False, log_path=tmp_path / "worker.log")
    sink = start_sink(sink_settings, log_path=tmp_path / "sink.log")
    try:
        wait_healthy(settings, worker)
        wait_healthy(sink_settings, sink)
        assert publish(settings, messages) == 2_000

        def landed():
            rows = sql(sink_settings, " UNION ALL ".join(f"SELECT count() FROM {{db}}.{t}" for t in RAW_TABLES.values()))
            return sum(int(n) for [n] in rows) >= len(distinct)

        wait_until(landed, 120, "ClickHouse to hold every distinct event")
        time.sleep(2)
        by_kind = {kind: sum(1 for k, _, _ in distinct if k is kind) for kind in EventKind}
        for kind, table in RAW_TABLES.items():
            assert sql(sink_settings, f"SELECT count() FROM {{db}}.{table}") == [[by_kind[kind]]]
        assert total(scrape(sink_settings), "abstream_sink_duplicates_total") == 40
        with pytest.raises(urllib.error.HTTPError) as refused:
            sql(settings, "SELECT 1")  # the worker has no ClickHouse to answer from
        assert refused.value.code == 404
        # `abstream query` finds the sink process through its endpoint file.
        abstream = str(Path(sys.executable).parent / "abstream")
        env = {**os.environ, **settings.to_env()}
        out = subprocess.run([abstream, "query", f"SELECT count() FROM {{db}}.{RAW_TABLES[EventKind.ASSIGNMENT]}", "--json"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["rows"] == [[by_kind[EventKind.ASSIGNMENT]]]
    finally:
        stop_worker(sink)
        stop_worker(worker)
    assert sink.returncode == 0 and not (settings.home / "sink.json").exists()
