"""Where does a Faust agent's consumption rate go? (issue 10)

One run measures, against a real local Apache Kafka broker, on the same preloaded topic:

- ceilings: a bare aiokafka ``getmany`` loop, a bare confluent-kafka ``consume`` loop,
  ``Codec().decode`` over the same payloads in one process (and aiokafka + decode);
- Faust consumption shapes, each in its own worker subprocess and consumer group
  (supported API: per-event ``async for``, ``take_events``, ``noack`` + manual ack,
  ``noack_take``; private internals: a replaced conductor callback, a replaced
  ``Consumer._drain_messages``), and a sweep of the settings that plausibly limit flow.

Each Faust run counts messages from the first one received until all N are consumed (or
``--max-run-s`` passes) and reports msgs/s over that interval, plus the CPU the worker
process used in it (``cpu_share`` = process CPU seconds / wall seconds; 1.0 = one core).

    .venv/bin/python bench/faust_probe.py --messages 300000 --out bench/out/faust_probe.json

The broker is started on --port from --data-dir and stopped at the end unless
--keep-broker; topics are reused when they already hold exactly N messages.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# --------------------------------------------------------------------------------------
# payloads and topics


def payloads(n: int) -> list[tuple[bytes, bytes]]:
    """n realistic (key, value) pairs: the simulator's four event kinds, Avro wire format."""
    from streams.simulate import simulated_messages

    return [(m.key, m.value) for m in simulated_messages(n, seed=10)]


def preload(bootstrap: str, topic: str, partitions: int, messages: list[tuple[bytes, bytes]]) -> float:
    """Create ``topic`` and fill it with ``messages`` unless it already holds exactly them;
    returns seconds spent producing (0 when reused)."""
    from confluent_kafka import Consumer, Producer, TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    meta = admin.list_topics(timeout=10)
    if topic in meta.topics:
        probe = Consumer({"bootstrap.servers": bootstrap, "group.id": "probe-watermarks"})
        total = sum(probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in meta.topics[topic].partitions)
        probe.close()
        if total == len(messages):
            return 0.0
        admin.delete_topics([topic])[topic].result()
        time.sleep(2)
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result()
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "partitioner": "murmur2_random",
                         "queue.buffering.max.messages": 500_000, "compression.type": "none"})
    t0 = time.perf_counter()
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError(f"preloading {topic}: messages not delivered")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# ceilings


def decode_ceiling(messages: list[tuple[bytes, bytes]]) -> dict:
    """Codec().decode over every payload, one process, one core."""
    from streams.codec import Codec, DeadLetter

    codec = Codec()
    kind_of = _kind_by_schema_id(codec)
    t0 = time.perf_counter()
    bad = 0
    for _, value in messages:
        if isinstance(codec.decode(kind_of[value[1:5]], value), DeadLetter):
            bad += 1
    elapsed = time.perf_counter() - t0
    return {"count": len(messages), "seconds": elapsed, "rate": len(messages) / elapsed, "dead": bad}


def _kind_by_schema_id(codec) -> dict[bytes, Any]:
    """Map the wire format's 4 schema-id bytes to the event kind (the probe topic mixes kinds)."""
    import struct

    from streams.codec import EventKind

    return {struct.pack(">I", codec.schemas.id_for(kind)): kind for kind in EventKind}


async def _aiokafka_loop(bootstrap: str, topic: str, n: int, decode: bool, **kwargs: Any) -> dict:
    from aiokafka import AIOKafkaConsumer

    max_records = kwargs.pop("max_records", None)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=f"probe-aio-{uuid.uuid4().hex[:8]}",
                                auto_offset_reset="earliest", enable_auto_commit=False, **kwargs)
    codec = kind_of = None
    if decode:
        from streams.codec import Codec

        codec = Codec()
        kind_of = _kind_by_schema_id(codec)
    await consumer.start()
    count = first_batch = 0
    t_first = None
    cpu_first = 0.0
    try:
        while count < n:
            batch = await consumer.getmany(timeout_ms=1000, max_records=max_records)
            if batch and t_first is None:
                t_first, cpu_first = time.perf_counter(), time.process_time()
                first_batch = sum(len(records) for records in batch.values())
            for records in batch.values():
                if codec is not None:
                    for record in records:
                        codec.decode(kind_of[record.value[1:5]], record.value)
                count += len(records)
        t_last, cpu_last = time.perf_counter(), time.process_time()
    finally:
        await consumer.stop()
    return _rate(count, first_batch, t_first, t_last, cpu_first, cpu_last, n)


def aiokafka_ceiling(bootstrap: str, topic: str, n: int, decode: bool = False, **kwargs: Any) -> dict:
    return asyncio.run(_aiokafka_loop(bootstrap, topic, n, decode, **kwargs))


def confluent_ceiling(bootstrap: str, topic: str, n: int, batch: int = 10_000) -> dict:
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"probe-ck-{uuid.uuid4().hex[:8]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    count = first_batch = 0
    t_first = None
    cpu_first = 0.0
    try:
        while count < n:
            good = sum(1 for message in consumer.consume(num_messages=batch, timeout=1.0) if message.error() is None)
            if good and t_first is None:
                t_first, cpu_first = time.perf_counter(), time.process_time()
                first_batch = good
            count += good
        t_last, cpu_last = time.perf_counter(), time.process_time()
    finally:
        consumer.close()
    return _rate(count, first_batch, t_first, t_last, cpu_first, cpu_last, n)


def _rate(count: int, first_batch: int, t_first: float | None, t_last: float, cpu_first: float,
          cpu_last: float, n: int) -> dict:
    """msgs/s from the arrival of the first batch to the last message; the first batch itself
    is not counted (it arrived at t_first), so a prefetched backlog cannot inflate the rate."""
    wall = max(1e-9, t_last - (t_first or t_last))
    return {"count": count, "first_batch": first_batch, "complete": count >= n, "seconds": wall,
            "rate": (count - first_batch) / wall, "cpu_share": (cpu_last - cpu_first) / wall}


# --------------------------------------------------------------------------------------
# the Faust worker (child process)


def child(cfg: dict) -> None:
    """Run one Faust worker shape until N messages are consumed or the time cap; writes
    the result JSON to cfg['result'] and exits the process."""
    import threading

    overrides = cfg.get("aiokafka") or {}
    if overrides:
        # Faust hard-codes fetch_max_wait_ms=1500 and passes no fetch_min_bytes
        # (faust/transport/drivers/aiokafka.py, _create_worker_consumer); patch the class it calls.
        import aiokafka

        original = aiokafka.AIOKafkaConsumer

        class Patched(original):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                kwargs.update(overrides)
                super().__init__(*args, **kwargs)

        aiokafka.AIOKafkaConsumer = Patched

    import faust

    n = cfg["n"]
    mode = cfg["mode"]
    batch_max = cfg.get("batch", 1000)
    within_s = cfg.get("within_s", 0.5)
    datadir = tempfile.mkdtemp(prefix="probe-faust-")
    app = faust.App(
        cfg["app_id"], broker=f"kafka://{cfg['bootstrap']}", store="memory://", autodiscover=False,
        consumer_auto_offset_reset="earliest", web_enabled=False, datadir=datadir,
        topic_partitions=cfg["partitions"], table_standby_replicas=0, **cfg.get("settings", {}),
    )
    topic = app.topic(cfg["topic"], key_serializer="raw", value_serializer="raw", acks=cfg.get("acks", True))

    codec = kind_of = None
    if cfg.get("decode"):
        from streams.codec import Codec

        codec = Codec()
        kind_of = _kind_by_schema_id(codec)

    timing = {"wait_s": 0.0, "process_s": 0.0, "commit_s": 0.0}  # lean_drain only
    state = {"count": 0, "first_batch": 0, "t_first": None, "cpu_first": 0.0, "main_cpu_first": 0.0, "batches": 0}
    deadline_s = cfg["max_run_s"]
    profiler = None

    def begin() -> None:
        nonlocal profiler
        state["t_first"] = time.perf_counter()
        state["cpu_first"] = time.process_time()
        state["main_cpu_first"] = time.thread_time()
        if cfg.get("pyspy"):
            # All threads, idle included: shows whether the event loop waits (select) or works.
            subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(os.getpid()),
                              "--duration", str(cfg["pyspy_s"]), "--rate", "200", "--threads", "--idle",
                              "--nonblocking", "--format", "raw", "--output", cfg["pyspy"]],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if cfg.get("profile"):
            from pyinstrument import Profiler

            profiler = Profiler(interval=0.0005, async_mode="disabled")
            profiler.start()

    def finish() -> None:
        t_last, cpu_last, main_cpu_last = time.perf_counter(), time.process_time(), time.thread_time()
        result = _rate(state["count"], state["first_batch"], state["t_first"], t_last, state["cpu_first"], cpu_last, n)
        result["main_thread_cpu_share"] = (main_cpu_last - state["main_cpu_first"]) / result["seconds"]
        result["batches"] = state["batches"]
        result["threads"] = threading.active_count()
        if mode == "lean_drain":
            result["timing"] = timing
        if profiler is not None:
            profiler.stop()
            Path(cfg["profile"]).write_text(profiler.output_text(unicode=False, color=False, show_all=False))
        Path(cfg["result"]).write_text(json.dumps(result))
        os._exit(0)

    def tick(k: int) -> None:
        if state["t_first"] is None:
            begin()
            state["first_batch"] = k
        state["count"] += k
        state["batches"] += 1
        if state["count"] >= n or time.perf_counter() - state["t_first"] > deadline_s:
            finish()

    def decode_values(values) -> None:
        if codec is not None:
            for value in values:
                codec.decode(kind_of[value[1:5]], value)

    if mode == "per_event":
        @app.agent(topic)
        async def per_event(stream):
            async for value in stream:
                decode_values((value,))
                tick(1)

    elif mode == "take_events":
        @app.agent(topic)
        async def take_events(stream):
            async for events in stream.take_events(batch_max, within=within_s):
                decode_values([event.value for event in events])
                tick(len(events))

    elif mode == "noack_events":
        # Supported API: a noack() stream never acks; the agent acks each event itself once the
        # batch it belongs to is processed (here: every `batch_max` events).
        @app.agent(topic)
        async def noack_events(stream):
            pending = []
            async for event in stream.noack().events():
                pending.append(event)
                if len(pending) >= batch_max:
                    decode_values([e.value for e in pending])
                    for e in pending:
                        e.ack()
                    k = len(pending)
                    pending = []
                    tick(k)

    elif mode == "noack_take":
        # Supported API: noack_take yields events and never acks; ack after the batch's effects.
        @app.agent(topic)
        async def noack_take(stream):
            async for events in stream.noack_take(batch_max, within=within_s):
                decode_values([event.value for event in events])
                for event in events:
                    event.ack()
                tick(len(events))

    elif mode == "callback":
        # Private: the consumer hands each message to this instead of the Conductor (no channel,
        # no Event, no Stream); _drain_messages (one wait_first per message) is unchanged.
        app.topics.add(topic)
        consumer = app.consumer

        async def on_message(message):
            decode_values((message.value,))
            consumer.ack(message)
            tick(1)

        consumer.callback = on_message

    elif mode == "lean_drain":
        # Private: replace Consumer._drain_messages (run by the Fetcher service) with a loop
        # that handles each getmany() batch as a batch: no per-message task, channel or
        # Event; messages are acked after the batch is processed, offsets committed by
        # Faust's own commit machinery (commit_every / commit_interval, rebalance).
        app.topics.add(topic)
        consumer = app.consumer

        async def lean_drain(fetcher) -> None:
            commit_every = consumer._commit_every
            to_message = consumer._to_message
            clock = time.perf_counter
            while not (consumer.should_stop or fetcher.should_stop):
                t0 = clock()
                records, active = await consumer._wait_next_records(1.0)
                if state["t_first"] is not None:
                    timing["wait_s"] += clock() - t0
                if not records or consumer.should_stop:
                    continue
                generation = app.consumer_generation_id
                messages = []
                for tp, tp_records in records.items():
                    if active is None or tp in active:
                        messages.extend(to_message(tp, record) for record in tp_records)
                if not messages or generation != app.consumer_generation_id or not consumer.flow_active:
                    continue
                t1 = clock()
                decode_values([m.value for m in messages])
                for message in messages:
                    consumer.ack(message)
                t2 = clock()
                if commit_every is not None and consumer._n_acked >= commit_every:
                    consumer._n_acked = 0
                    await consumer.commit()
                if state["t_first"] is not None:
                    timing["process_s"] += t2 - t1
                    timing["commit_s"] += clock() - t2
                tick(len(messages))
                await asyncio.sleep(0)

        consumer._drain_messages = lean_drain
    else:
        raise SystemExit(f"unknown mode {mode}")

    worker = faust.Worker(app, loglevel="warning", quiet=True, override_logging=False)
    worker.execute_from_commandline()


# --------------------------------------------------------------------------------------
# the parent


def run_faust(base: dict, name: str, out_dir: Path, timeout_s: float, **cfg: Any) -> dict:
    # The app id names Faust's internal topics: only [a-zA-Z0-9._-] are legal there.
    cfg = {**base, **cfg, "app_id": f"probe-{name.replace('+', '_')}-{uuid.uuid4().hex[:6]}"}
    result_file = out_dir / f"faust-{name}.json"
    result_file.unlink(missing_ok=True)
    cfg["result"] = str(result_file)
    if cfg.get("profile") is True:
        cfg["profile"] = str(out_dir / f"profile-{name}.txt")
    if cfg.get("pyspy") is True:
        cfg["pyspy"] = str(out_dir / f"pyspy-{name}.txt")
        cfg.setdefault("pyspy_s", 6)
    log_file = out_dir / f"faust-{name}.log"
    t0 = time.perf_counter()
    with log_file.open("w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(cfg)], cwd=ROOT,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if not result_file.exists():
        return {"error": f"no result (see {log_file})", "wall_s": time.perf_counter() - t0}
    result = json.loads(result_file.read_text())
    result["wall_s"] = time.perf_counter() - t0
    if cfg.get("pyspy"):
        time.sleep(1.0)  # py-spy writes its file when the sampled process exits
        if Path(cfg["pyspy"]).exists():
            result["pyspy"] = summarize_pyspy(Path(cfg["pyspy"]))
    return result


def summarize_pyspy(path: Path, top: int = 12) -> dict:
    """Per thread: share of samples, share idle, and the heaviest leaf frames (py-spy raw format:
    'thread;frame;...;leaf count', idle samples included)."""
    threads: dict[str, dict[str, int]] = {}
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        leaf = frames[-1]
        bucket = threads.setdefault(frames[0].strip(), {})
        bucket[leaf] = bucket.get(leaf, 0) + int(count)
    total = sum(sum(b.values()) for b in threads.values()) or 1
    summary = {}
    for thread, leaves in threads.items():
        samples = sum(leaves.values())
        idle = sum(c for leaf, c in leaves.items() if any(w in leaf for w in ("select", "epoll", "wait (threading", "_wait_for_tstate_lock", "sleep")))
        summary[thread] = {"samples": samples, "idle_share": idle / samples,
                           "top_leaves": [[leaf, round(c / samples, 3)] for leaf, c in
                                          sorted(leaves.items(), key=lambda kv: -kv[1])[:top]]}
    summary["_total_samples"] = total
    return summary


def faust_runs(args: argparse.Namespace) -> list[tuple[str, str, dict]]:
    """(name, what it varies, config) for each Faust run; defaults are Faust's own."""
    p = args.partitions
    t4 = f"probe-p{p}-n{args.messages}"
    take = {"mode": "take_events", "batch": 1000, "within_s": 0.5}
    fast = {"broker_max_poll_records": 5000, "consumer_max_fetch_size": 4 * 1024 * 1024}
    runs = [
        ("per_event", "async for value in stream (defaults)", {"mode": "per_event"}),
        ("take_events", "stream.take_events(1000, within=0.5) (defaults)", take),
        ("noack_events", "stream.noack().events(), event.ack() per 1000", {"mode": "noack_events", "batch": 1000}),
        ("noack_take", "stream.noack_take(1000, within=0.5), event.ack() after batch", {"mode": "noack_take", "batch": 1000}),
        ("callback", "PRIVATE: consumer.callback replaced (no conductor/stream)", {"mode": "callback"}),
        ("lean_drain", "PRIVATE: Consumer._drain_messages replaced, batch per getmany", {"mode": "lean_drain"}),
        # settings sweep on the stage-1 shape (take_events)
        ("take_poll500", "take_events + broker_max_poll_records=500", {**take, "settings": {"broker_max_poll_records": 500}}),
        ("take_poll5000", "take_events + broker_max_poll_records=5000", {**take, "settings": {"broker_max_poll_records": 5000}}),
        ("take_fetch8m", "take_events + consumer_max_fetch_size=8 MiB", {**take, "settings": {"consumer_max_fetch_size": 8 * 1024 * 1024}}),
        ("take_buffer32k", "take_events + stream_buffer_maxsize=32768", {**take, "settings": {"stream_buffer_maxsize": 32768}}),
        ("take_buffer256", "take_events + stream_buffer_maxsize=256", {**take, "settings": {"stream_buffer_maxsize": 256}}),
        ("take_commit", "take_events + broker_commit_every=100000, broker_commit_interval=10", {**take, "settings": {"broker_commit_every": 100_000, "broker_commit_interval": 10.0}}),
        ("take_commit_often", "take_events + broker_commit_every=1000, broker_commit_interval=0.5", {**take, "settings": {"broker_commit_every": 1000, "broker_commit_interval": 0.5}}),
        ("take_nowaitempty", "take_events + stream_wait_empty=False", {**take, "settings": {"stream_wait_empty": False}}),
        ("take_proc_timeout", "take_events + stream_processing_timeout=30", {**take, "settings": {"stream_processing_timeout": 30.0}}),
        ("take_fetchwait100", "take_events + aiokafka fetch_max_wait_ms=100 (patched)", {**take, "aiokafka": {"fetch_max_wait_ms": 100}}),
        ("take_fetchmin64k", "take_events + aiokafka fetch_min_bytes=65536, fetch_max_wait_ms=100 (patched)", {**take, "aiokafka": {"fetch_min_bytes": 65536, "fetch_max_wait_ms": 100}}),
        ("take_b100", "take_events(100, within=0.5)", {**take, "batch": 100}),
        ("take_b10000", "take_events(10000, within=0.5) + stream_buffer_maxsize=32768", {**take, "batch": 10_000, "settings": {"stream_buffer_maxsize": 32768}}),
        ("take_noacks", "take_events, topic acks=False", {**take, "acks": False}),
        ("per_event_noacks", "per-event, topic acks=False", {"mode": "per_event", "acks": False}),
        ("per_event_fast", "per-event + poll 5000, fetch 4 MiB", {"mode": "per_event", "settings": fast}),
        ("lean_fast", "PRIVATE lean_drain + poll 5000, fetch 4 MiB", {"mode": "lean_drain", "settings": fast}),
        # partitions
        ("take_p1", "take_events, 1 partition", {**take, "topic": f"probe-p1-n{args.messages}", "partitions": 1}),
        ("take_p16", "take_events, 16 partitions", {**take, "topic": f"probe-p16-n{args.messages}", "partitions": 16}),
        ("lean_p1", "PRIVATE lean_drain, 1 partition", {"mode": "lean_drain", "topic": f"probe-p1-n{args.messages}", "partitions": 1}),
        # with the decode work of stage 1 (Codec().decode of every payload)
        ("per_event+decode", "per-event + decode", {"mode": "per_event", "decode": True}),
        ("take_events+decode", "take_events(1000, 0.5) + decode", {**take, "decode": True}),
        ("noack_take+decode", "noack_take(1000, 0.5) + decode, ack after batch", {"mode": "noack_take", "batch": 1000, "decode": True}),
        ("lean_drain+decode", "PRIVATE lean_drain + decode", {"mode": "lean_drain", "decode": True}),
        ("lean_fast+decode", "PRIVATE lean_drain + poll 5000, fetch 4 MiB + decode", {"mode": "lean_drain", "decode": True, "settings": fast}),
        # profiles (pyinstrument, main thread, wall clock incl. idle in select())
        ("per_event/pyspy", "per-event, py-spy all threads", {"mode": "per_event", "pyspy": True}),
        ("take_events/pyspy", "take_events, py-spy all threads", {**take, "pyspy": True}),
        ("lean_drain/pyspy", "PRIVATE lean_drain, py-spy all threads", {"mode": "lean_drain", "pyspy": True, "pyspy_s": 2}),
        ("take_events/pyinstrument", "take_events, pyinstrument main thread", {**take, "profile": True}),
        ("take_events+decode/profile", "take_events + decode, pyinstrument", {**take, "decode": True, "profile": True}),
    ]
    for _, _, cfg in runs:
        cfg.setdefault("topic", t4)
        cfg.setdefault("partitions", p)
    if args.only:
        wanted = set(args.only.split(","))
        runs = [r for r in runs if r[0] in wanted]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "faust_probe.json")
    parser.add_argument("--port", type=int, default=19500)
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/bench-kafka"))
    parser.add_argument("--max-run-s", type=float, default=40.0, help="cap on a Faust run's consumption time")
    parser.add_argument("--only", default="", help="comma-separated Faust run names (default: all)")
    parser.add_argument("--keep-broker", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return

    from streams import local_kafka

    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    status = local_kafka.start(data_dir=args.data_dir, port=args.port)
    bootstrap = status.bootstrap
    report: dict[str, Any] = {"messages": args.messages, "partitions": args.partitions, "bootstrap": bootstrap,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "ceilings": {}, "faust": {}}
    try:
        messages = payloads(args.messages)
        sizes = sorted(len(v) for _, v in messages)
        report["value_bytes"] = {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]}
        topics = {args.partitions, 1, 16} if not args.only else {args.partitions} | (
            {1} if "p1" in args.only else set()) | ({16} if "p16" in args.only else set())
        for p in sorted(topics):
            seconds = preload(bootstrap, f"probe-p{p}-n{args.messages}", p, messages)
            print(f"preloaded probe-p{p}-n{args.messages} in {seconds:.1f}s", flush=True)
        topic = f"probe-p{args.partitions}-n{args.messages}"
        n = args.messages

        def ceilings(tag: str) -> None:
            c = report["ceilings"]
            c[f"decode{tag}"] = decode_ceiling(messages)
            c[f"aiokafka_getmany{tag}"] = aiokafka_ceiling(bootstrap, topic, n)
            c[f"confluent_consume{tag}"] = confluent_ceiling(bootstrap, topic, n)
            if not tag:
                c["aiokafka_faust_fetch_settings"] = aiokafka_ceiling(bootstrap, topic, n, fetch_max_wait_ms=1500)
                c["aiokafka_getmany+decode"] = aiokafka_ceiling(bootstrap, topic, n, decode=True)
            for k in (f"decode{tag}", f"aiokafka_getmany{tag}", f"confluent_consume{tag}"):
                print(f"{k:32s} {c[k]['rate']:>10,.0f}/s", flush=True)
            args.out.write_text(json.dumps(report, indent=2))

        ceilings("")
        base = {"bootstrap": bootstrap, "n": n, "max_run_s": args.max_run_s}
        for name, what, cfg in faust_runs(args):
            result = run_faust(base, name.replace("/", "-"), out_dir, timeout_s=args.max_run_s + 90, **cfg)
            result["what"] = what
            report["faust"][name] = result
            rate = result.get("rate")
            print(f"{name:28s} {rate:>10,.0f}/s cpu={result.get('cpu_share', 0):.2f} "
                  f"main={result.get('main_thread_cpu_share', 0):.2f} n={result.get('count')}" if rate
                  else f"{name:28s} {result}", flush=True)
            args.out.write_text(json.dumps(report, indent=2))
        ceilings("_end")
        report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        args.out.write_text(json.dumps(report, indent=2))
    finally:
        if not args.keep_broker:
            local_kafka.stop(data_dir=args.data_dir)


if __name__ == "__main__":
    main()
