"""The abstream worker: a faust-streaming app running both stages of the pipeline.

- stage 1 (a batch handler on the input topics, streams/fetch.py): streams/stage1.py folds
  each batch into the unit tables and partials of its input partitions, and each partition's
  changes go to the stage-1 state log (streams/state_log.py) as one transaction;
- after each batch's writes are in Kafka, the changed partials are published to
  ``<prefix>partials`` (keyed by experiment), at most every ``PARTIALS_GAP_S``;
- stage 2 (agent ``stage2`` on the partials topic): keeps each source partition's newest
  partial, by position (stage2.with_partial), in the changelogged ``experiments`` table; a
  fast timer evaluates each changed experiment once its last decision is
  ``decision_interval_s`` old, and publishes Decision events to ``<prefix>decisions``;
- agent ``orders`` on ``<prefix>killswitch`` brings a person's kill or resume into the
  control state stage 2 keeps with each experiment.

A worker started with ``--sink`` also runs the ClickHouse sink role (streams/sink.py) in a
thread and serves read-only SQL on its loopback HTTP port.

Agent concurrency stays 1: faust-streaming loses messages with concurrency > 1. The
experiments table is written once per touched key per batch, through :func:`write_table`.
"""
from __future__ import annotations

import asyncio
import gc
import json
import ssl
import logging
import os
import socket
import time
import uuid
from typing import Any, Callable, TypeVar

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams import fetch, metrics
from streams.codec import (Codec, ControlKind, DeadLetter, SchemaLookupNeeded, SchemaRegistryUnavailable,
                           SchemaRejected, schema_source)
from streams.experiments import ExperimentCatalogue
from streams.settings import Settings
from streams.registry import ModelRegistry, model_registry
from streams.sink import Sink, sink_endpoint_file, sql_answer
from streams.stage1 import Stage1, StateUnreadable, expired
from streams.state_log import StateLog, StateLogError, StateWriteFailed
from streams.stage2 import (ControlState, apply_order, control, decision_record, evaluate, merged_partial,
                            stored_or_new, with_partial)
from streams.topics import (ALERTS, ALLOCATIONS, DEADLETTER, DECISIONS, KILLSWITCH, PARTIALS, STAGE1_STATE,
                            deadletter_headers, input_topic_names)
from streams.warehouse import Warehouse

log = logging.getLogger("abstream.worker")
# Partials are published after a batch at most this often; stage 2 collects them for this long.
PARTIALS_GAP_S = 0.1
STAGE2_WITHIN_S = 0.05
# A batch Kafka refused the state of (or the schema registry could not decode) is read again
# after this wait, doubled on each failure in a row.
STATE_RETRY_MIN_S, STATE_RETRY_MAX_S = 0.25, 5.0
# A partition whose state log cannot be applied is tried again after this long (it reads the log).
STATE_UNREADABLE_RETRY_S = 60.0
# Allocations (net of deallocations) between young collections; Python's default is 700.
GC_YOUNG_THRESHOLD = 50_000

T = TypeVar("T")


def longer_wait(delay_s: float) -> float:
    """The wait after one more failure in a row (a refused state, a registry that does not
    answer): STATE_RETRY_MIN_S, doubled each time up to STATE_RETRY_MAX_S."""
    return min(STATE_RETRY_MAX_S, max(STATE_RETRY_MIN_S, 2 * delay_s))


def write_table(table: faust.Table, partition: int, key: Any, value: Any) -> None:
    """Set a table key and send its changelog record to ``partition``.

    Faust's ``table[key] = value`` takes the changelog partition from the stream's current
    event, which a batch taken with ``take_events`` does not have; the partition is known
    here (it is the source partition of the events that changed the key), so it is passed
    explicitly through the table's public ``send_changelog``.
    """
    table.data[key] = value
    table.send_changelog(partition, key, value)


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """Faust's (aiokafka's) credentials from the same ``ABSTREAM_KAFKA_*`` security settings
    that the confluent-kafka clients take as they are."""
    security = settings.kafka_security
    protocol = security.get("security.protocol", "PLAINTEXT").upper()
    ssl_context = None
    if protocol in ("SSL", "SASL_SSL"):
        ssl_context = ssl.create_default_context(cafile=security.get("ssl.ca.location"))
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(username=security.get("sasl.username"), password=security.get("sasl.password"),
                                     mechanism=security.get("sasl.mechanism", "PLAIN"), ssl_context=ssl_context)
    return faust.SSLCredentials(ssl_context) if ssl_context else None


def create_app(settings: Settings, experiments: ExperimentCatalogue, *, warehouse: Warehouse | None = None,
               sink: Sink | None = None, registry: ModelRegistry | None = None) -> faust.App:
    """The Faust app of a worker; ``warehouse`` is set when this worker holds the sink role."""
    app = faust.App(
        f"{settings.topic_prefix}worker",
        # The consumer hands stage 1 one batch per fetch (streams/fetch.py); the producer is Faust's own.
        broker_consumer=[f"{fetch.SCHEME}://{host}" for host in settings.kafka_bootstrap.split(",")],
        broker_producer=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        broker=[f"kafka://{host}" for host in settings.kafka_bootstrap.split(",")],
        broker_credentials=broker_credentials(settings),
        store="memory://",
        autodiscover=False,
        topic_partitions=settings.partitions,
        table_standby_replicas=0,
        broker_max_poll_records=settings.batch_max_events,
        # Each batch ends with a producer flush: with Faust's defaults (16 KiB batches, no
        # linger) its changelog went out as many small requests one after another; larger
        # batches doubled one worker's rate in make bench (bench/PROFILE.md).
        producer_max_batch_size=1_000_000,
        producer_linger=0.005,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.broker_session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.broker_session_timeout_s / 3),
        web_bind=settings.web_host,
        web_host=settings.web_host,
        web_port=settings.web_port,
        datadir=str(settings.home / "faust"),
    )
    # It never asks the schema registry on the event loop (see answered).
    codec = Codec(schema_source(settings.schema_registry_url, ask_inline=False))
    input_names = set(input_topic_names(settings))
    inputs = app.topic(*input_names, key_serializer="raw", value_serializer="raw")
    deadletters = app.topic(settings.topic(DEADLETTER), key_serializer="raw", value_serializer="raw")
    partials_topic = app.topic(settings.topic(PARTIALS), key_serializer="raw", value_serializer="json",
                               partitions=settings.partitions)
    decisions_topic = app.topic(settings.topic(DECISIONS), key_serializer="raw", value_serializer="raw")
    control_topics = {kind: app.topic(settings.topic(name), key_serializer="raw", value_serializer="raw")
                      for kind, name in ((ControlKind.ALERT, ALERTS), (ControlKind.KILLSWITCH, KILLSWITCH),
                                         (ControlKind.ALLOCATION, ALLOCATIONS))}
    # The experiments table (stage 2) is JSON, Faust's default. Stage 1 keeps its state itself
    # (streams/stage1.py) and makes it durable in its state log, one transaction per partition
    # and batch: a Faust table costs a record (and a Python produce) per unit.
    experiment_partials = app.Table("experiments", default=None, partitions=settings.partitions)
    stage1 = Stage1(settings, codec, experiments)
    state_log = StateLog(settings, settings.topic(STAGE1_STATE), owner=f"{socket.gethostname()}-{os.getpid()}-"
                                                                        f"{uuid.uuid4().hex[:8]}")
    # Input partitions this worker claimed in the state log (it may write their transactions),
    # and the log position of partitions it held before a rebalance (to continue from there).
    claimed: set[int] = set()
    held_tips: dict[int, int] = {}
    retry_delay_s = 0.0  # the wait before a batch that could not be done is read again
    # Per input (topic, partition) whose batch state was refused: the offset after the last
    # message dead-lettered from it. The batch is read again, and its letters are not re-sent.
    lettered: dict[tuple[str, int], int] = {}
    # Input partitions whose state log this version cannot apply: when to try again.
    unreadable: dict[int, float] = {}
    # Input partitions paused because they could not be claimed (see hold_back).
    held_back: set[int] = set()
    changed_experiments: set[str] = set()
    last_evaluated: dict[str, float] = {}
    latest_decisions: dict[str, dict] = {}
    last_published = 0.0
    settled_generation: int | None = None
    # After a look the schema registry could not register a schema for: the wait, and until when.
    registry_delay_s, registry_retry_at = 0.0, 0.0
    partials_name = partials_topic.get_topic_name()
    # Held from a batch's fold until its writes are in Kafka: the timer must not publish
    # partials that include unit states not yet written.
    batch_in_flight = asyncio.Lock()
    evaluating = asyncio.Lock()

    async def publish_partials_when_due() -> None:
        """Publish the changed partials, at most every PARTIALS_GAP_S; the caller holds
        batch_in_flight."""
        nonlocal last_published
        if not stage1.dirty or time.monotonic() - last_published < PARTIALS_GAP_S:
            return
        last_published = time.monotonic()
        for partition, experiment_id, partial, position in stage1.take_dirty():
            await partials_topic.send(key=experiment_id.encode(), value={
                "source_partition": partition, "position": position, "partial": partial.to_dict()})

    async def stage1_batch(batch) -> set[tuple[str, int]]:
        async with batch_in_flight:
            started = time.time()
            unwritten = await fold_and_write(batch)
            done = time.time()
            metrics.BATCH_SECONDS.observe(done - started)
            oldest_ms = min((records[0].timestamp for records in batch.values() if records[0].timestamp is not None),
                            default=None)
            if oldest_ms is not None:
                metrics.BATCH_DELAY_SECONDS.observe(max(0.0, done - oldest_ms / 1000))
            return unwritten

    async def answered(do: Callable[[], T]) -> T:
        """do(), once the schema registry has answered what it needs. The worker's catalogue
        raises SchemaLookupNeeded rather than ask on the event loop, where a registry that hangs
        would stop the worker, its health page included, for the client's timeout (3 s, twice);
        the question is asked in a thread and do() tried again. Whatever do() did before it
        raised must not count: stage 1 decodes a whole batch before it changes anything."""
        while True:
            try:
                return do()
            except SchemaLookupNeeded as need:
                await app.loop.run_in_executor(None, codec.schemas.ask, need)

    async def acquire(partitions: set[int]) -> set[int]:
        """Claim input partitions in the state log and load their state (the caller holds
        batch_in_flight); a partition this worker held before continues from where it was.
        Returns the partitions that could not be claimed now (the broker away, say)."""
        failed = set()
        for partition in sorted(partitions - claimed):
            if time.monotonic() < unreadable.get(partition, 0.0):
                failed.add(partition)
                continue
            since = held_tips.get(partition) if partition in stage1.partitions else None
            try:
                loaded = await app.loop.run_in_executor(None, state_log.acquire, partition, since)
            except StateLogError as exc:
                log.warning("could not claim input partition %d's stage-1 state, will try again: %s", partition, exc)
                failed.add(partition)
                continue
            held_tips.pop(partition, None)
            try:
                stage1.load(partition, [(t.type, t.chunks) for t in loaded.transactions], from_start=loaded.from_start)
            except StateUnreadable as exc:
                # One partition's state must not stop the others (nor, by a crash, every worker the
                # partition moves to): its messages wait in Kafka, unacknowledged, until it is fixed.
                state_log.release(partition)
                unreadable[partition] = time.monotonic() + STATE_UNREADABLE_RETRY_S
                metrics.STATE_UNREADABLE.labels(str(partition)).set(1)
                log.error("%s: its messages wait, unprocessed, until it can be read (restore %s, or start a new "
                          "ABSTREAM_TOPIC_PREFIX); trying again in %g s", exc, state_log.topic, STATE_UNREADABLE_RETRY_S)
                failed.add(partition)
                continue
            if unreadable.pop(partition, None) is not None:
                metrics.STATE_UNREADABLE.labels(str(partition)).set(0)
            claimed.add(partition)
            if partition in held_back:
                held_back.discard(partition)
                app.consumer.resume_partitions(input_partitions({partition}))
        return failed

    def input_partitions(partitions: set[int]) -> set:
        """The assigned input topic-partitions of these partition numbers."""
        return {tp for tp in app.consumer.assignment() if tp.topic in input_names and tp.partition in partitions}

    def hold_back(partitions: set[int]) -> None:
        """Pause fetching input partitions that could not be claimed. Their records wait in the
        fetcher's buffer until settle_ownership claims them (each tick); read and sought back on
        every batch instead, they kept a worker busy with nothing to show (Faust resumes every
        partition after a rebalance; the next batch pauses them again)."""
        app.consumer.pause_partitions(input_partitions(partitions))
        held_back.update(partitions)

    def let_go(partition: int) -> None:
        """Forget a partition's stage-1 state and claim: it is read from its log if it comes back."""
        stage1.forget(partition)
        claimed.discard(partition)
        held_tips.pop(partition, None)

    def write_state(transactions: dict[int, list[bytes]]) -> tuple[set[int], set[int]]:
        """Write each partition's transaction, then the snapshots that came due, and wait until
        they are in Kafka (run off the event loop; the caller holds batch_in_flight). Returns the
        partitions whose batch is not in the log, and those whose snapshot is not: both lost
        their claim and must be loaded again."""
        for partition, chunks in transactions.items():
            state_log.append(partition, "delta", chunks)
        try:
            state_log.flush()
        except StateWriteFailed as failure:
            log.warning("stage-1 state of partitions %s not written (%s): they are read again", sorted(failure.partitions),
                        failure)
            return set(failure.partitions), set()
        due = [p for p in transactions if stage1.snapshot_due(p)]
        try:
            write_snapshots(due)
        except StateWriteFailed as failure:
            log.warning("snapshot of stage-1 partitions %s not written: %s", sorted(failure.partitions), failure)
            return set(), set(failure.partitions)
        return set(), set()

    async def fold_and_write(batch) -> set[tuple[str, int]]:
        started = time.time()
        not_claimed = await acquire({partition for _, partition in batch})
        if not_claimed:  # read again, once they are claimed
            metrics.INPUT_HELD_BACK.inc(sum(len(records) for tp, records in batch.items() if tp[1] in not_claimed))
            hold_back(not_claimed)
            batch = {tp: records for tp, records in batch.items() if tp[1] not in not_claimed}
        nonlocal retry_delay_s
        try:
            result = await answered(lambda: stage1.process(batch))
        except SchemaRegistryUnavailable as exc:
            # Nothing of the batch was judged or counted: it is read again once the registry
            # answers, rather than its events dead-lettered for a schema nobody could look up.
            metrics.SCHEMA_REGISTRY_UNAVAILABLE.labels("stage1").set(1)
            retry_delay_s = longer_wait(retry_delay_s)
            log.warning("%s; the batch waits and is read again in %g s", exc, retry_delay_s)
            await asyncio.sleep(retry_delay_s)
            return set(batch) | {(topic, partition) for topic in input_names for partition in not_claimed}
        metrics.SCHEMA_REGISTRY_UNAVAILABLE.labels("stage1").set(0)
        for message, letter in result.dead:
            if message.offset < lettered.get((message.topic, message.partition), 0):
                continue  # sent before this batch's state was refused
            await deadletters.send(
                # Kafka refuses a record with neither key nor value: an empty value stands for a tombstone.
                key=message.key, value=message.value if message.value is not None or message.key is not None else b"",
                headers=deadletter_headers(letter, message.topic, message.partition, message.offset),
            )
        folded = time.time()
        metrics.BATCH_PHASE_SECONDS.labels("fold").observe(folded - started)
        # The dead letters before the state that records their messages as done: a crash in
        # between must not leave a message judged but its letter lost.
        if result.dead:
            await app.producer.flush()
        unwritten, unsnapshotted = await app.loop.run_in_executor(None, write_state, result.transactions)
        metrics.STATE_WRITE_FAILURES.inc(len(unwritten | unsnapshotted))
        for partition in unwritten | unsnapshotted:
            let_go(partition)
        for tp in batch:
            if tp[1] not in unwritten:
                lettered.pop(tp, None)
        for message, _ in result.dead:
            if message.partition in unwritten:
                tp = (message.topic, message.partition)
                lettered[tp] = max(lettered.get(tp, 0), message.offset + 1)
        if unwritten:
            # Kafka refuses the state (or another worker took the partition over): read it again
            # after a while, not at once and in a loop.
            retry_delay_s = longer_wait(retry_delay_s)
            await asyncio.sleep(retry_delay_s)
        else:
            retry_delay_s = 0.0
        flushed = time.time()
        metrics.BATCH_PHASE_SECONDS.labels("state_write").observe(flushed - folded)
        # The batch's offsets are acked after this returns: its effects must be in Kafka first.
        await app.producer.flush()
        metrics.BATCH_PHASE_SECONDS.labels("producer_flush").observe(time.time() - flushed)
        # Partials only after the state they sum is in Kafka (a crash in between would publish
        # sums the recovered state does not hold).
        await publish_partials_when_due()
        return {(topic, partition) for topic, partition in batch if partition in unwritten} | \
            {(topic, partition) for topic in input_names for partition in not_claimed}

    # Stage 1 is not an agent: the consumer hands it one batch per fetch (streams/fetch.py).
    app.topics.add(inputs)
    app.abstream_batch_handler = stage1_batch
    app.abstream_batch_topics = frozenset(input_names)

    @app.agent(partials_topic, concurrency=1, name="stage2")
    async def stage2_agent(stream):
        async for events in stream.take_events(settings.batch_max_events, within=STAGE2_WITHIN_S):
            # In the order read; with_partial keeps each source partition's newest partial.
            updated: dict[str, tuple[int, dict]] = {}
            for event in events:
                experiment_id = event.message.key.decode()
                stored = updated[experiment_id][1] if experiment_id in updated \
                    else experiment_partials.data.get(experiment_id)
                stored = with_partial(stored, event.value["source_partition"], event.value["partial"],
                                      event.value.get("position"), event.message.partition)
                if stored is None:
                    metrics.PARTIALS_STALE.inc()
                else:
                    updated[experiment_id] = event.message.partition, stored
            for experiment_id, (table_partition, stored) in updated.items():
                write_table(experiment_partials, table_partition, experiment_id, stored)
                changed_experiments.add(experiment_id)
            # Decide now what is due rather than at the next tick (the tick comes late under load).
            await evaluate_due()

    def owned_experiment_partitions() -> set[int] | None:
        """The stage-2 table partitions this worker owns now; None while a rebalance is under
        way (from the revoke until the tables are recovered), when it owns none for sure."""
        if app.rebalancing or not app.tables.recovery.completed.is_set():
            return None
        return {tp.partition for tp in app.consumer.assignment() if tp.topic == partials_name}

    async def settle_ownership() -> None:
        """After a rebalance: claim and load the input partitions assigned here (their partials
        are then published: the last owner may have died before publishing them, and no new
        event may ever come to trigger it), and let go of the state of partitions that went to
        another worker.

        Memory tables are not emptied on revoke (Faust drops only the keys its recovery wrote,
        not the ones written here). A worker that kept a lost experiment's state and its pending
        change evaluated it once more after the hand-over and published a decision from partials
        older than the new owner's: the newest decision went back in time (a flaky
        test_one_and_two_workers_give_identical_decisions). Only owners evaluate
        (owned_experiment_partitions); this makes sure no stale state is left to read.
        """
        nonlocal settled_generation
        owned = owned_experiment_partitions()
        if owned is None:
            return
        inputs_owned = {tp.partition for tp in app.consumer.assignment() if tp.topic in input_names}
        if inputs_owned - claimed and not batch_in_flight.locked():  # else that batch claims its own
            async with batch_in_flight:
                await acquire(inputs_owned)  # what fails is tried again at the next tick
        if settled_generation == app.consumer_generation_id:
            return
        settled_generation = app.consumer_generation_id
        for partition in set(stage1.partitions) - inputs_owned:
            let_go(partition)
        for partition in set(unreadable) - inputs_owned:  # its new owner says so, if it must
            del unreadable[partition]
            metrics.STATE_UNREADABLE.labels(str(partition)).set(0)
        stage2_states = experiment_partials.data.data
        for experiment_id in [e for e, s in stage2_states.items() if s.get("partition") not in owned]:
            del stage2_states[experiment_id]
            latest_decisions.pop(experiment_id, None)
            changed_experiments.discard(experiment_id)

    async def decoded_order(value: bytes):
        """A kill-switch record, waited for while the schema registry does not answer: a
        person's kill must not be skipped (nor crash the agent) for an outage."""
        delay_s = 0.0
        while True:
            try:
                order = await answered(lambda: codec.decode(ControlKind.KILLSWITCH, value))
            except SchemaRegistryUnavailable as exc:
                metrics.SCHEMA_REGISTRY_UNAVAILABLE.labels("orders").set(1)
                delay_s = longer_wait(delay_s)
                log.warning("%s; the kill-switch record waits %g s", exc, delay_s)
                await asyncio.sleep(delay_s)
                continue
            metrics.SCHEMA_REGISTRY_UNAVAILABLE.labels("orders").set(0)
            return order

    @app.agent(control_topics[ControlKind.KILLSWITCH], concurrency=1, name="orders")
    async def orders_agent(stream):
        # A person's kill or resume (stage2.apply_order); stage 2's own records pass unchanged.
        # Co-partitioned with the experiments table: this worker owns the experiment.
        async for event in stream.events():
            order = await decoded_order(event.message.value)
            if isinstance(order, DeadLetter):
                log.warning("skipped a kill-switch record at offset %d: %s", event.message.offset, order.detail)
                continue
            config = experiments.get(order["experiment_id"])
            if config is None:
                continue
            async with evaluating:  # an evaluation in flight writes the control state it read
                stored = stored_or_new(experiment_partials.data.get(config.experiment_id), event.message.partition)
                state = apply_order(config, ControlState.from_dict(stored["control"]), order)
                if state is None:
                    continue
                log.warning("%s of %s/%s by a person: %s", order["action"], config.experiment_id, order["variant"],
                            order["reason"])
                write_table(experiment_partials, stored["partition"], config.experiment_id,
                            {**stored, "control": state.to_dict()})
                if stored["partials"]:
                    changed_experiments.add(config.experiment_id)
                    last_evaluated.pop(config.experiment_id, None)  # the decision shows the new split at once

    @app.timer(interval=min(settings.decision_interval_s, PARTIALS_GAP_S))
    async def cadence():
        # Decisions on change: a changed experiment is evaluated as soon as its last decision
        # is decision_interval_s old (the issue-10 latency target is p99 <= 1 s end to end);
        # stage 2 evaluates on arrival, this tick catches what became due in between.
        await settle_ownership()
        if not batch_in_flight.locked():  # else the batch in flight publishes when its writes are in
            async with batch_in_flight:
                await publish_partials_when_due()  # partitions without new batches (adopted ones)
        metrics.INPUT_LAG.labels("stage1").set(stage1_lag())
        await evaluate_due()

    async def evaluate_due() -> None:
        """Evaluate each changed experiment whose last decision is decision_interval_s old.
        Called by stage 2 when partials arrive and by the timer for what became due since."""
        nonlocal registry_delay_s, registry_retry_at
        owned = owned_experiment_partitions()
        if evaluating.locked() or owned is None or time.monotonic() < registry_retry_at:
            return  # the pass running now, or the next tick after the rebalance, takes what is left
        async with evaluating:
            now = time.monotonic()
            looked = registry_failed = False
            for experiment_id in sorted(changed_experiments):
                if now - last_evaluated.get(experiment_id, 0.0) < settings.decision_interval_s:
                    continue
                last_evaluated[experiment_id] = now
                changed_experiments.discard(experiment_id)
                config = experiments.get(experiment_id)
                stored = experiment_partials.data.get(experiment_id)
                if config is None or stored is None or stored["partition"] not in owned:
                    continue
                looked = True
                try:
                    await evaluate_experiment(config, stored)
                except SchemaRegistryUnavailable as exc:
                    # Nothing of the look went out (evaluate_experiment encodes first). It is
                    # taken again later: no new event may come to prompt it. The others wait
                    # too rather than each wait out the registry's timeout in turn.
                    registry_failed = True
                    changed_experiments.add(experiment_id)
                    registry_delay_s = longer_wait(registry_delay_s)
                    registry_retry_at = time.monotonic() + registry_delay_s
                    log.warning("experiment %s not evaluated, tried again in %g s: %s", experiment_id,
                                registry_delay_s, exc)
                    break
                except SchemaRejected as exc:
                    metrics.EVALUATION_ERRORS.labels(experiment_id).inc()
                    log.error("experiment %s not evaluated: %s", experiment_id, exc)
                except Exception:  # one experiment's failure must not stop the others or the worker
                    metrics.EVALUATION_ERRORS.labels(experiment_id).inc()
                    log.exception("evaluating experiment %s failed", experiment_id)
            if looked:
                metrics.SCHEMA_REGISTRY_UNAVAILABLE.labels("decisions").set(1 if registry_failed else 0)
                if not registry_failed:
                    registry_delay_s = 0.0

    def stage1_lag() -> int:
        """Messages of the assigned input partitions beyond what stage 1 processed (partitions
        not fetched yet have no high watermark and count as caught up)."""
        lag = 0
        for tp in app.consumer.assignment():
            high = app.consumer.highwater(tp) if tp.topic in input_names else None
            if high is not None:
                state = stage1.partitions.get(tp.partition)
                lag += max(0, high - (state.positions.get(tp.topic, high) if state is not None else high))
        return lag

    async def evaluate_experiment(config, stored: dict) -> None:
        now_ms = int(time.time() * 1000)
        key = config.experiment_id.encode()
        partial = merged_partial(stored)
        state = ControlState.from_dict(stored["control"])
        new_state, actions = control(config, partial, state, now_ms)
        record = decision_record(config, evaluate(config, partial, new_state.weights), partial, now_ms, new_state.weights)
        # Everything is encoded before anything is sent or written: the first record of each
        # kind after a start registers its schema, and a registry that cannot answer then
        # leaves the whole look to be taken again, not half of its records out.
        controls, decision = await answered(lambda: (
            [(kind, codec.encode(kind, r)) for kind, records in (
                (ControlKind.ALERT, actions.alerts), (ControlKind.KILLSWITCH, actions.killswitches),
                (ControlKind.ALLOCATION, actions.allocations)) for r in records],
            codec.encode(ControlKind.DECISION, record)))
        for kind, value in controls:
            await control_topics[kind].send(key=key, value=value)
        for alert in actions.alerts:
            if alert["state"] == "firing":
                metrics.ALERTS.labels(config.experiment_id, alert["guardrail"], alert["severity"]).inc()
            log.warning("alert %s %s: %s", alert["state"], alert["alert_id"], alert["evidence"])
        for order in actions.killswitches:
            metrics.KILLSWITCH.labels(config.experiment_id, order["action"]).inc()
        for r in actions.readings:
            if r.observed is not None and r.kind == "shadow_disagreement":
                metrics.SHADOW_DISAGREEMENT.labels(config.experiment_id, r.variant).set(r.observed)
            elif r.observed is not None and r.kind == "drift":
                metrics.DRIFT_PSI.labels(config.experiment_id, r.variant).set(r.observed)
        if actions.promoted and registry is not None:
            variant = next(v for v in config.variants if v.name == actions.promoted)
            try:
                await app.loop.run_in_executor(None, registry.promote, config.experiment_id, variant.name,
                                               variant.model_name, variant.model_version)
            except Exception:  # the promote kill-switch record stands whatever the registry says
                metrics.REGISTRY_ERRORS.inc()
                log.exception("the model registry did not record the promotion of %s", variant.name)
        if new_state.to_dict() != state.to_dict():
            # The partials as they are now: the stage-2 agent may have stored newer ones while
            # the sends above waited, and writing back the ones read before would undo them.
            current = experiment_partials.data.get(config.experiment_id) or stored
            write_table(experiment_partials, current["partition"], config.experiment_id,
                        {**current, "control": new_state.to_dict()})
        latest_decisions[config.experiment_id] = record
        metrics.observe_decision(record, config.control)
        await decisions_topic.send(key=key, value=decision)

    @app.timer(interval=max(settings.decision_interval_s, 10.0))
    async def retention():
        # Unit state of experiments stopped longer than the retention is dropped; each partition
        # that held some is written again as a snapshot, and the log before it deleted.
        gone = expired(experiments.all(), int(time.time() * 1000), settings.exposure_retention_s)
        async with batch_in_flight:
            # Claimed partitions only: a held one continues from its log when it comes back.
            changed = stage1.expire(gone, claimed)
            try:
                await app.loop.run_in_executor(None, write_snapshots, changed)
            except StateWriteFailed as failure:  # read from its log again (expired again at the next tick)
                log.warning("snapshot of stage-1 partitions %s not written: %s", sorted(failure.partitions), failure)
                for partition in failure.partitions:
                    let_go(partition)
        metrics.UNIT_STATES.set(stage1.unit_states())

    def write_snapshots(partitions: list[int]) -> None:
        """Write the partitions' snapshots and delete their log before them (off the event loop)."""
        if not partitions:
            return
        for partition in partitions:
            state_log.append(partition, "snapshot", stage1.snapshot(partition))
        state_log.flush()
        for partition in partitions:
            state_log.truncate(partition)

    @app.on_partitions_revoked.connect
    async def on_revoked(app_, revoked, **kwargs):
        # The state stays in memory: if the partition comes back, its log is read on from here.
        async with batch_in_flight:
            for partition in {tp.partition for tp in revoked if tp.topic in input_names} & claimed:
                held_tips[partition] = state_log.tip(partition)
                state_log.release(partition)
                claimed.discard(partition)
            held_back.difference_update(tp.partition for tp in revoked if tp.topic in input_names)  # Faust unpauses them

    @app.page("/metrics")
    async def metrics_page(web, request):
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/health")
    async def health_page(web, request):
        if sink is not None and sink.failure is not None:
            return web.json({"status": "failing", "sink": warehouse is not None, "reason": sink.failure}, status=503)
        return web.json({"status": "ok", "sink": warehouse is not None})

    @app.page("/experiments/{experiment_id}")
    async def experiment_page(web, request, experiment_id: str):
        # Served by the worker that evaluates the experiment; `abstream status` reads the
        # decisions topic and works from anywhere.
        record = latest_decisions.get(experiment_id)
        stored = experiment_partials.data.get(experiment_id)
        if record is None or stored is None or stored["partition"] not in (owned_experiment_partitions() or ()):
            return web.json({"error": "this worker has no decision for that experiment"}, status=404)
        return web.json(record)

    @app.page("/sql")
    async def sql_page(web, request):
        status, body = await app.loop.run_in_executor(None, sql_answer, warehouse, request.remote,
                                                      request.query.get("query", ""), request.query.get("params"))
        if isinstance(body, bytes):
            return web.bytes(body, content_type="application/json")
        return web.json(body, status=status)

    return app


def run_worker(settings: Settings, *, sink: bool, loglevel: str = "warning") -> None:
    """Run a worker until it is stopped (SIGINT/SIGTERM); never returns."""
    from streams.topics import ensure_topics

    ensure_topics(settings)
    settings.home.mkdir(parents=True, exist_ok=True)
    experiments = ExperimentCatalogue(settings)
    experiments.start()
    experiments.wait_until_caught_up(timeout_s=30)
    warehouse = None
    sink_role = None
    endpoint = sink_endpoint_file(settings)
    if sink:
        warehouse = Warehouse(settings.clickhouse_dsn, settings.clickhouse_database)
        sink_role = Sink(settings, warehouse, Codec(schema_source(settings.schema_registry_url)))
        sink_role.start()
        endpoint.write_text(json.dumps({"pid": os.getpid(), "url": f"http://{settings.web_host}:{settings.web_port}"}))
    app = create_app(settings, experiments, warehouse=warehouse, sink=sink_role, registry=model_registry(settings))
    worker = faust.Worker(app, loglevel=loglevel, quiet=True)
    # Faust's terminal spinner sets the root logger to DEBUG so that every log call turns it:
    # every debug line of aiokafka and Faust then builds a LogRecord (8% of the worker's CPU
    # under load, measured with py-spy) and the log fills with escape codes.
    worker.spinner = None
    # Python's full collections scan every tracked object, and a scan stops the event loop:
    # make bench saw a 0.11 s pause every ~3 s at 10,000 events/s, most of it the ~110,000
    # objects of the imported modules (scipy, Faust, numpy), which live as long as the worker.
    # They are frozen out of the collector's sight; a higher first threshold lets a batch's
    # objects (~10 per event, freed by reference counting when the batch is done) die young
    # instead of being promoted while the batch is folded.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    metrics.watch_gc_pauses()
    try:
        worker.execute_from_commandline()
    finally:
        experiments.stop()
        if sink_role is not None:
            sink_role.stop()
            endpoint.unlink(missing_ok=True)
