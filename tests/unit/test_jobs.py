"""The supervised job loop (`service.jobs.JobLoop`) on an in-memory queue: claiming within the
concurrency, draining on stop, and side tasks that stop the loop loudly when they die."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest

from service.errors import StoreUnavailable
from service.jobs import JobLoop
from service.settings import DeliverySettings
from tests.conftest import wait_for

# a heartbeat every 20 ms
SETTINGS = DeliverySettings(lease_s=0.06, worker_concurrency=4, worker_batch=2)


class Queue:
    """Jobs are plain numbers; a claim takes the lowest."""

    def __init__(self, jobs: list[int]) -> None:
        self.pending = sorted(jobs)

    async def reap_expired(self) -> int:
        return 0

    async def claim(self, owner: str, limit: int, lease_s: float) -> list[int]:
        taken, self.pending = self.pending[:limit], self.pending[limit:]
        return taken

    async def next_due_in(self) -> float | None:
        return 0.01 if self.pending else None


class Loop(JobLoop[int, int]):
    """Each job waits for `release`; the heartbeat is whatever the test makes it."""

    def __init__(self, queue: Queue, beat: Callable[[], Awaitable[None]]) -> None:
        super().__init__(
            queue, SETTINGS, "unused", owner="host:1:abcdef", channel="x", role="tl", drain_s=5.0
        )
        self.beat = beat
        self.release = asyncio.Event()
        self.done: list[int] = []
        self.cut_short: list[int] = []
        self.stopped_calls = 0

    def dispatch(self, jobs: list[int]) -> list[Coroutine[Any, Any, None]]:
        for job in jobs:
            self.in_flight[job] = job
        return [self._work(job) for job in jobs]

    async def _work(self, job: int) -> None:
        try:
            await self.release.wait()
            self.done.append(job)
        except asyncio.CancelledError:
            self.cut_short.append(job)
            raise
        finally:
            self.in_flight.pop(job, None)
            self.wake()

    async def extend_leases(self) -> None:
        await self.beat()

    async def listen(self) -> None:
        await asyncio.Event().wait()  # no database here: never woken by NOTIFY

    async def stopped(self) -> None:
        self.stopped_calls += 1


class Beats:
    """A heartbeat that counts its calls and raises `error` from each, if given."""

    def __init__(self, error: Exception | None = None) -> None:
        self.calls = 0
        self.error = error

    async def __call__(self) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error


@pytest.fixture
async def running() -> AsyncIterator[Callable[[Loop], asyncio.Task[None]]]:
    tasks: list[asyncio.Task[None]] = []

    def start(loop: Loop) -> asyncio.Task[None]:
        tasks.append(asyncio.create_task(loop.run()))
        return tasks[-1]

    yield start
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def crashes(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "action", "") == "tl_crashed"]


async def test_claims_up_to_the_concurrency_and_drains_on_stop(
    running: Callable[[Loop], asyncio.Task[None]],
) -> None:
    loop = Loop(Queue(list(range(10))), Beats())
    task = running(loop)
    await wait_for(lambda: _true(len(loop.in_flight) == 4))
    await asyncio.sleep(0.1)
    assert sorted(loop.in_flight) == [0, 1, 2, 3]  # never more than worker_concurrency

    stopping = asyncio.create_task(loop.stop())
    await asyncio.sleep(0.1)
    assert not stopping.done()  # the work in flight may finish
    loop.release.set()
    await stopping
    assert task.done() and not loop.running
    assert sorted(loop.done) == [0, 1, 2, 3] and loop.stopped_calls == 1


async def test_stop_cuts_work_short_after_its_timeout(
    running: Callable[[Loop], asyncio.Task[None]],
) -> None:
    loop = Loop(Queue([1, 2]), Beats())
    task = running(loop)
    await wait_for(lambda: _true(len(loop.in_flight) == 2))
    await loop.stop(timeout_s=0.1)
    assert task.done() and sorted(loop.cut_short) == [1, 2] and loop.stopped_calls == 1


async def test_a_heartbeat_that_fails_unexpectedly_stops_the_loop_loudly(
    running: Callable[[Loop], asyncio.Task[None]], caplog: pytest.LogCaptureFixture
) -> None:
    beats = Beats(RuntimeError("a bug in the heartbeat"))
    queue = Queue([1, 2, 3, 4, 5, 6])
    loop = Loop(queue, beats)
    task = running(loop)
    await wait_for(lambda: _true(beats.calls > 0))
    await wait_for(lambda: _true(not loop.running))
    assert not task.done()  # claims no more, lets the work in flight finish
    loop.release.set()
    await asyncio.wait_for(task, 2)

    assert beats.calls == 1 and sorted(loop.done) == [1, 2, 3, 4]
    assert queue.pending == [5, 6]  # nothing claimed once the heartbeat was gone
    [record] = crashes(caplog)
    assert record.levelno == logging.ERROR and getattr(record, "task", "") == "tl-heartbeat"
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert loop.stopped_calls == 1


async def test_a_database_outage_in_the_heartbeat_is_survived(
    running: Callable[[Loop], asyncio.Task[None]], caplog: pytest.LogCaptureFixture
) -> None:
    beats = Beats(StoreUnavailable("connection refused"))
    loop = Loop(Queue([1, 2]), beats)
    running(loop)
    await wait_for(lambda: _true(beats.calls >= 3))
    assert loop.running
    loop.release.set()
    await wait_for(lambda: _true(sorted(loop.done) == [1, 2]))
    assert loop.running and not crashes(caplog)
    await loop.stop()


async def test_a_listener_that_ends_stops_the_loop_too(
    running: Callable[[Loop], asyncio.Task[None]], caplog: pytest.LogCaptureFixture
) -> None:
    loop = Loop(Queue([]), Beats())

    async def listen() -> None:
        raise ConnectionError("LISTEN gave up")

    loop.listen = listen  # type: ignore[method-assign]
    task = running(loop)
    await asyncio.wait_for(task, 2)
    assert not loop.running
    [record] = crashes(caplog)
    assert getattr(record, "task", "") == "tl-listener"
    await loop.stop()  # after the end: returns at once


async def _true(value: bool) -> bool:
    return value
