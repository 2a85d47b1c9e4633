"""The batch watchdog of streams/fetch.py, without Kafka: a stuck batch is reported with where
it waits, and waiting for it never cancels it."""
from __future__ import annotations

import asyncio
import logging
import threading

from streams import fetch


def hold_in_a_thread(until: threading.Event) -> str:
    until.wait(10)
    return "written"


async def batch_in_flight(until: threading.Event) -> set:
    await asyncio.get_running_loop().run_in_executor(None, hold_in_a_thread, until)
    return {("t", 1)}


def test_a_batch_in_flight_too_long_is_reported_with_where_it_waits(monkeypatch, caplog):
    monkeypatch.setattr(fetch, "STUCK_BATCH_S", 0.2)
    release = threading.Event()

    async def scenario():
        processing = asyncio.ensure_future(batch_in_flight(release))
        asyncio.get_running_loop().call_later(0.7, release.set)  # in flight 0.7 s: reported at 0.2 and 0.4 s
        return await fetch._watched(processing)

    with caplog.at_level(logging.WARNING, logger="streams.fetch"):
        assert asyncio.run(scenario()) == {("t", 1)}
    reports = [r.getMessage() for r in caplog.records]
    assert [m.split(";")[0] for m in reports] == ["a stage-1 batch has been in flight for 0.2 s",
                                                   "a stage-1 batch has been in flight for 0.4 s"]
    assert "in batch_in_flight\n  awaiting" in reports[0]
    assert "in hold_in_a_thread" in reports[0]  # the executor thread's stack


def test_a_batch_that_is_quick_is_not_reported(monkeypatch, caplog):
    monkeypatch.setattr(fetch, "STUCK_BATCH_S", 5.0)

    async def quick():
        return {("t", 0)}

    async def scenario():
        return await fetch._watched(asyncio.ensure_future(quick()))

    with caplog.at_level(logging.WARNING, logger="streams.fetch"):
        assert asyncio.run(scenario()) == {("t", 0)}
    assert not caplog.records


def test_cancelling_the_wait_leaves_the_batch_running():
    """The worker stopping cancels the fetch loop, which then finishes the batch and acks it."""
    release = threading.Event()

    async def scenario():
        processing = asyncio.ensure_future(batch_in_flight(release))
        waiting = asyncio.ensure_future(fetch._watched(processing))
        await asyncio.sleep(0.1)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert waiting.cancelled() and not processing.done()
        release.set()
        return await processing

    assert asyncio.run(scenario()) == {("t", 1)}
