"""Stage 1's consumption: one batch per Kafka fetch, acknowledged after its effects are written.

Why: faust-streaming spends ~80-100 us of event-loop work per message before an agent sees
it (a `wait_first` with four futures per message in the fetcher, the conductor's per-event
Event, the stream iterator's per-event sleep and ack). On Apache Kafka 3.9 that held every
supported consumption shape (per-event, take_events, noack_take) to ~10% of the fastavro
decode ceiling, whatever the fetch settings; py-spy showed the event loop busy, not idle
(bench/FAUST_THROUGHPUT.md). Handing the input topics' records to stage 1 as one batch per
`getmany` removes those layers and keeps what Faust is good at: group membership,
rebalances, partition assignment, offset tracking and commits.

How: :class:`BatchConsumer` replaces the fetcher loop (`_drain_messages`, private API of
faust-streaming 0.15, pinned in pyproject). Records of the batch topics go to the app's
batch handler as one dict of lists (per topic and partition); records of every other topic
(the partials topic of the stage-2 agent, for one) take Faust's ordinary path. Messages are
acked only after the handler returned, and the handler writes the batch's state and dead
letters first, so an offset is never committed before its message's effects are in Kafka
(at-least-once; stage 1's input positions make replays idempotent); the partitions whose
state it could not write are not acked but read again. The handler gets aiokafka's records as
they are; one Faust message per partition (its last record in the batch) is tracked as Faust
tracks an agent's, so a rebalance waits for the batch in flight and commits it before the
partitions move, and the offsets before it are acknowledged in one step on the consumer's
offset books. A
batch fetched under a consumer generation that has since changed (a rebalance began) is
dropped unprocessed: its partitions are re-read by their next owner from the committed
offsets.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
import traceback
from typing import Awaitable, Callable, Sequence

from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka
from aiokafka.structs import ConsumerRecord
from faust.types.tuples import ack_lock

# How long the broker may hold a fetch that has found less than FETCH_MIN_BYTES.
FETCH_MAX_WAIT_MS = 50
# A fetch is answered once this much has come in (a backlog: at once), else after
# FETCH_MAX_WAIT_MS. Answered with whatever had arrived (aiokafka's default of 1 byte), fetches
# followed each other as fast as stage 1 folded them: a batch's fixed cost (~10 ms of numpy
# calls per batch, whatever its size) was paid for a few dozen events, and a worker took 0.9 of
# a core at 1,500 events/s offered, as much as at 10,000 (py-spy: ~80% in stage-1 batches).
FETCH_MIN_BYTES = 1 << 20
# A batch is folded and written in milliseconds. One in flight this long waits on something
# (a registry that hangs, a state write the broker does not acknowledge, a bug), and a
# rebalance waits on it too: the worker says where, then again at each doubling of its age.
STUCK_BATCH_S = 5.0
# The handler gets aiokafka's records as they are, per (topic, partition), in offset order, and
# returns the (topic, partition) whose records it could not make durable: not acked, read again.
BatchHandler = Callable[[dict[tuple[str, int], Sequence[ConsumerRecord]]], Awaitable[set[tuple[str, int]]]]
SCHEME = "abstream"
log = logging.getLogger(__name__)


class BatchConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self):
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def _drain_messages(self, fetcher) -> None:  # replaces faust's per-message loop
        app = self.app
        handler: BatchHandler = app.abstream_batch_handler
        batch_topics: frozenset[str] = app.abstream_batch_topics
        async def next_records() -> tuple[dict, int]:
            records, _ = await self._wait_next_records(1.0)
            return records or {}, app.consumer_generation_id

        # The next batch is fetched (aiokafka builds its records) while this one's state is written:
        # each took 10-20 ms per 10,000 events in make bench, one after the other before.
        prefetched: asyncio.Future | None = None
        try:
            while not (self._stopped.is_set() or fetcher._stopped.is_set()):
                records, generation = await (prefetched or next_records())
                prefetched = None
                await self.sleep(0)
                if not records or self.should_stop:
                    continue
                batch = {}
                spans = {}
                for tp, tp_records in records.items():
                    if tp.topic in batch_topics:
                        batch[(tp.topic, tp.partition)] = tp_records
                        spans[tp] = (tp_records[0].offset, tp_records[-1])
                    else:
                        for record in tp_records:
                            await self.wait_first(self.callback(self._to_message(tp, record)), self.suspend_flow.wait())
                if batch and self.flow_active and generation == app.consumer_generation_id:
                    # One Faust message per partition stands for the batch's records of it (a Faust
                    # message, tracked and acked, per record was ~10% of a worker in py-spy). Tracked
                    # messages are what Faust's revoke path waits for (wait_empty) before its last
                    # commit: a hand-over then commits this batch instead of leaving it to the next
                    # owner to process (and dead-letter) again.
                    markers = {tp: self._to_message(tp, last) for tp, (_, last) in spans.items()}
                    for marker in markers.values():
                        self.track_message(marker)
                    processing = asyncio.ensure_future(handler(batch))
                    prefetched = asyncio.ensure_future(next_records())
                    try:
                        unwritten = await _watched(processing)
                    except asyncio.CancelledError:
                        # The worker is stopping: finish the batch and ack it, so that the
                        # consumer's last commit covers it rather than its next owner redoing it.
                        prefetched.cancel()
                        await self._ack_written(await processing, spans, markers)
                        raise
                    if unwritten:
                        # Those partitions are read again from the batch's start: the fetch in
                        # flight must end before the seek (what it returns of them is stale and
                        # dropped; a fetch across the seek could return the re-read records, and
                        # dropping those would lose them).
                        records, generation = await prefetched
                        prefetched = asyncio.get_running_loop().create_future()
                        prefetched.set_result(({tp: r for tp, r in records.items()
                                                if (tp.topic, tp.partition) not in unwritten}, generation))
                    await self._ack_written(unwritten, spans, markers)
                if self._commit_every is not None and self._n_acked >= self._commit_every:
                    self._n_acked = 0
                    await self.commit()
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise
        finally:
            if prefetched is not None:
                prefetched.cancel()

    async def _ack_written(self, unwritten: set[tuple[str, int]], spans: dict, markers: dict) -> None:
        """Ack the batch's records except those of partitions whose state could not be written:
        those are read again from the batch's first offset (the handler reloads the partition's
        state from its log, which says where it really got to)."""
        for tp in [tp for tp in spans if (tp.topic, tp.partition) in unwritten]:
            first, _ = spans.pop(tp)
            self._unacked_messages.discard(markers.pop(tp))
            await self.seek(tp, first)
        self._ack_batch(spans, markers)

    def _ack_batch(self, spans: dict, markers: dict) -> None:
        """Acknowledge every offset of the batch: the ones before each partition's last record
        in one step (what ``Consumer.ack`` does per message, on its private offset books), then
        the last record's message, which also wakes a revoke waiting for it."""
        with ack_lock:
            for tp, (first, last) in spans.items():
                committed = self._committed_offset[tp]
                index = self._acked_index[tp]
                fresh = [o for o in range(first, last.offset) if (committed is None or o >= committed) and o not in index]
                index.update(fresh)
                self._acked[tp].extend(fresh)
                self._n_acked += len(fresh)
        for marker in markers.values():
            self.ack(marker)


async def _watched(processing: asyncio.Task) -> set[tuple[str, int]]:
    """The batch's result. Like ``asyncio.shield``, cancelling the caller leaves the batch
    running; unlike it, a batch that takes STUCK_BATCH_S and longer is reported with where it
    waits."""
    age, report_at = 0.0, STUCK_BATCH_S
    while True:
        done, _ = await asyncio.wait({processing}, timeout=report_at - age)
        if done:
            return processing.result()
        age = report_at
        report_at *= 2
        log.warning("a stage-1 batch has been in flight for %g s; where it waits:\n%s", age, where_waiting(processing))


def where_waiting(task: asyncio.Task) -> str:
    """A task's await chain, innermost last, and the stack of every other thread (where an
    executor's work, a registry look-up or a state write, stands)."""
    lines = ["the batch's task:"]
    awaited = task.get_coro()
    while awaited is not None:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
        if frame is None:  # a future (an executor's work, a broker's answer): the chain ends
            lines.append(f"  awaiting {type(awaited).__name__}")
            break
        lines.append(f'  File "{frame.f_code.co_filename}", line {frame.f_lineno}, in {frame.f_code.co_name}')
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
    names = {t.ident: t.name for t in threading.enumerate()}
    for ident, frame in sys._current_frames().items():
        if ident != threading.get_ident():
            lines.append(f"thread {names.get(ident, ident)}:")
            lines += [line.rstrip() for line in traceback.format_stack(frame)]
    return "\n".join(lines)


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        # Faust asks for fetch_max_wait_ms=1500. aiokafka keeps one fetch in flight per broker
        # and leaves out the partitions whose records are still buffered, so while stage 1
        # folds a batch it sends a fetch for the quiet partitions only (partials, changelogs),
        # which the broker may hold for fetch_max_wait_ms while the input partitions wait
        # behind it. make bench saw 1 s stalls followed by 9,000-event batches, and a decision
        # p99 of 3-5 s at 10,000 events/s (bench/PROFILE.md). A private attribute of aiokafka,
        # read when the consumer starts.
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        # Faust reads uncommitted records unless it runs exactly-once itself, so a service that
        # publishes through a transactional producer would have its aborted events counted by
        # stage 1, while the sink (librdkafka, read_committed by default) leaves them out.
        # Also private, read when the consumer starts.
        consumer._isolation_level = "read_committed"
        return consumer


class Transport(faust_aiokafka.Transport):
    Consumer = BatchConsumer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
