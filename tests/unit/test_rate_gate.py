"""The one gate for every CRM call (service.delivery.limits): never over the CRM's limit, a 429
holds everyone, a blocked account opens the circuit, and no turn of the limit is ever lost or
given twice.

Found by mutation testing (scripts/mutate limits): each test fails with a mutant that once
survived. Time is a fake clock wherever the code takes one; a fake bucket hands out numbered
turns, so a lost or doubled turn shows without waiting for the real limiter.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import pytest

from service.delivery.limits import (
    POLL_S,
    FrontOfLine,
    LocalBucket,
    RateGate,
    SendLog,
    capacity_window,
)
from service.errors import CircuitOpen

HUNG_S = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountedBucket:
    """A bucket whose turns the test hands out (`grant`), each a new ticket; it checks that
    every ticket comes back exactly once."""

    mode = "single"
    paused_until = 0.0

    def __init__(self) -> None:
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()
        self._ready: collections.deque[int] = collections.deque()
        self._next = 100
        self.issued: list[int] = []
        self.released: list[int] = []
        self.shared_pauses: list[float] = []
        self.fail: Exception | None = None
        self.ready = 0.0  # what `ready_in` says

    def ready_in(self) -> float:
        return self.ready

    def grant(self, n: int = 1) -> None:
        """The next `n` turns: to the callers waiting, first come first served, else kept."""
        for _ in range(n):
            ticket, self._next = self._next, self._next + 1
            while self._waiters and self._waiters[0].done():  # cancelled
                self._waiters.popleft()
            if self._waiters:
                self._waiters.popleft().set_result(ticket)
            else:
                self._ready.append(ticket)

    async def acquire(self) -> int:
        if self.fail is not None:
            raise self.fail
        if self._ready:
            ticket = self._ready.popleft()
        else:
            turn: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._waiters.append(turn)
            ticket = await turn
        self.issued.append(ticket)
        return ticket

    def release(self, ticket: int) -> None:
        assert ticket in self.issued, f"released {ticket!r}, never issued"
        assert ticket not in self.released, f"released {ticket} twice"
        self.released.append(ticket)

    def share_pause(self, seconds: float) -> None:
        self.shared_pauses.append(seconds)


async def take(gate: RateGate | FrontOfLine) -> None:
    async with gate.slot():
        pass


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


# --- the limit as "n calls in any window" -----------------------------------------------------


def test_the_limit_counts_whole_calls_per_second_and_spreads_slow_ones() -> None:
    assert capacity_window(100) == (100, 1.0)
    assert capacity_window(6.5) == (6, 1.0)  # a CRM counts whole requests in a second
    assert capacity_window(1) == (1, 1.0)
    assert capacity_window(0.5) == (1, 2.0)  # one call in any 2 s
    assert capacity_window(0.25) == (1, 4.0)


# --- this process's calls, for the shared limit -----------------------------------------------


def test_a_call_counts_until_one_window_after_its_answer() -> None:
    clock = Clock()
    log = SendLog(1.0, clock=clock)
    assert log.wait(2) == 0.0 and log.count() == 0
    log.admit(1)
    log.admit(2)
    assert log.count() == 2
    assert log.wait(3) == 0.0  # one more fits
    assert log.wait(2) == POLL_S  # both in flight: when a turn frees up is unknown
    clock.now += 0.3
    log.release(1)
    log.release(1)  # a second release of the same call changes nothing
    log.release(99)  # nor does one of a call never admitted
    assert log.count() == 2
    clock.now += 0.4
    assert log.wait(2) == pytest.approx(0.6)  # 1 s after the answer, not after the admission
    assert list(log.recent()) == [(2, None), (1, pytest.approx(0.4))]
    clock.now += 0.7
    assert log.count() == 1 and log.wait(2) == 0.0
    assert list(log.recent()) == [(2, None)]


def test_the_wait_is_for_the_oldest_answer_that_keeps_the_log_full() -> None:
    clock = Clock()
    log = SendLog(1.0, clock=clock)
    for ticket in (1, 2, 3):
        log.admit(ticket)
    for ticket in (1, 2, 3):
        clock.now += 0.1
        log.release(ticket)  # answered at +0.1, +0.2, +0.3
    assert log.count() == 3
    assert log.wait(3) == pytest.approx(0.8)  # the first answer leaves the window at +1.1
    assert log.wait(2) == pytest.approx(0.9)  # two must leave: the second at +1.2
    assert log.wait(1) == pytest.approx(1.0)
    assert log.wait(4) == 0.0


# --- the circuit ---------------------------------------------------------------------------


async def test_a_refusal_while_the_circuit_is_open_names_the_reason_and_sends_nothing() -> None:
    clock = Clock()
    bucket = CountedBucket()
    gate = RateGate(10, bucket, clock=clock)
    gate.open_circuit("CrmBlocked: 403 account blocked", 60)
    with pytest.raises(CircuitOpen, match="403 account blocked"):
        async with gate.slot():
            pass
    assert bucket.issued == []


async def test_a_second_block_while_open_pushes_the_probe_back() -> None:
    """Another 403 (say, the probe's) starts the cool-down again from now."""
    clock = Clock()
    gate = RateGate(10, CountedBucket(), clock=clock)
    gate.open_circuit("403", 60)
    clock.now += 30
    gate.open_circuit("403 again", 60)
    clock.now += 59  # 89 s after the first: still cooling down
    with pytest.raises(CircuitOpen):
        gate.check_circuit()
    assert gate.circuit.reason == "403"  # the first reason stays (the alert named it)
    clock.now += 2
    gate.check_circuit()


def test_the_circuit_and_a_pause_are_logged_for_the_operator(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What operations.md tells to look for: the circuit opening (ERROR, with its reason),
    closing, and a pause (WARNING, with its length)."""
    gate = RateGate(10, CountedBucket(), clock=Clock())
    with caplog.at_level(logging.WARNING, logger="service.delivery.limits"):
        gate.pause(2.5)
        gate.open_circuit("CrmBlocked: 403", 60)
        gate.open_circuit("CrmBlocked: 403", 60)  # already open: not logged again
        gate.close_circuit()
        gate.close_circuit()  # already closed: not logged again
    logged = [
        (r.levelname, r.getMessage(), getattr(r, "action", None), getattr(r, "reason", None))
        for r in caplog.records
    ]
    assert logged == [
        ("WARNING", "crm rate limit: pausing all calls", "crm_pause", None),
        ("ERROR", "crm circuit opened", "circuit_open", "CrmBlocked: 403"),
        ("WARNING", "crm circuit closed", "circuit_closed", None),
    ]
    assert caplog.records[0].seconds == 2.5  # type: ignore[attr-defined]


# --- the pause ---------------------------------------------------------------------------------


async def test_a_pause_is_shared_with_the_other_processes_and_never_shortened() -> None:
    bucket = CountedBucket()
    gate = RateGate(10, bucket)
    gate.pause(30)
    until = gate.paused_until
    gate.pause(1)  # a shorter pause later does not cut the longer one short
    assert gate.paused_until == until
    assert bucket.shared_pauses == [30, 1]  # the others keep the longer one the same way


async def test_a_pause_shorter_than_a_second_holds_callers_without_using_up_turns() -> None:
    """A caller sleeps the pause out, then takes one turn: it does not spin through the
    bucket's turns meanwhile (each one a turn of the shared limit that nobody used)."""
    bucket = CountedBucket()
    gate = RateGate(10, bucket)
    sent_at: list[float] = []

    async def call() -> None:
        async with gate.slot():
            sent_at.append(time.monotonic())

    gate.pause(0.5)
    paused_until = gate.paused_until
    caller = asyncio.create_task(call())
    bucket.grant(3)
    await asyncio.wait_for(caller, HUNG_S)
    assert sent_at[0] >= paused_until  # a bound from below: a loaded machine only sends later
    assert len(bucket.issued) == 1, "turns were taken during the pause"
    assert bucket.released == bucket.issued


async def test_the_gate_reports_the_rate_it_keeps_and_the_rate_it_sent() -> None:
    bucket = CountedBucket()
    gate = RateGate(7.5, bucket)
    assert gate.rate == 7.5 and gate.mode == "single"
    bucket.grant(3)
    for _ in range(3):
        async with gate.slot():
            pass
    assert gate.observed_rate(60) == pytest.approx(3 / 60)
    assert gate.paused_until == 0.0  # never paused


# --- turns: never lost, never given twice ---------------------------------------------------


async def test_a_turn_handed_to_the_front_of_the_line_comes_back_once() -> None:
    """A token refresh takes the next turn: the caller admitted next hands it over and queues
    again. Every turn is used once and comes back once."""
    bucket = CountedBucket()
    gate = RateGate(10, bucket)
    order: list[str] = []

    async def take(name: str, front: bool) -> None:
        async with gate.front().slot() if front else gate.slot():
            order.append(name)

    queued = asyncio.create_task(take("queued", False))
    await settle()
    refresh = asyncio.create_task(take("refresh", True))
    await settle()
    bucket.grant(1)  # the queued caller gets it, and hands it to the refresh
    await asyncio.wait_for(refresh, HUNG_S)
    assert order == ["refresh"]
    bucket.grant(1)  # the queued caller's next turn (the refresh no longer asks for its own)
    await asyncio.wait_for(queued, HUNG_S)
    assert order == ["refresh", "queued"]
    assert bucket.released == bucket.issued == [100, 101]


async def test_a_front_waiter_cancelled_just_as_its_turn_arrives_gives_the_turn_back() -> None:
    bucket = CountedBucket()
    gate = RateGate(10, bucket)
    queued = asyncio.create_task(gate.slot().__aenter__())
    await settle()

    async def refresh() -> None:
        async with gate.front().slot():
            pytest.fail("a cancelled refresh went on")

    front = asyncio.create_task(refresh())
    await settle()
    bucket.grant(1)
    await asyncio.sleep(0)  # the queued caller takes the turn and hands it over...
    front.cancel()  # ...and the refresh is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await front
    await settle()
    assert bucket.issued and bucket.released == bucket.issued[:1]
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued


async def test_a_failing_bucket_fails_the_front_of_the_line_instead_of_hanging_it() -> None:
    bucket = CountedBucket()
    bucket.fail = ConnectionError("the shared limit is unreachable")
    gate = RateGate(10, bucket)
    with pytest.raises(ConnectionError):
        await asyncio.wait_for(gate.front().slot().__aenter__(), HUNG_S)


def test_a_limit_between_one_and_two_a_second_allows_one_call_in_any_second() -> None:
    assert capacity_window(1.5) == (1, 1.0)  # not one call every 0.67 s: two in some second


async def test_the_observed_rate_is_over_the_last_minute_and_its_history_is_bounded() -> None:
    bucket = CountedBucket()
    gate = RateGate(10, bucket)
    bucket.grant(10_050)
    for _ in range(10_050):
        async with gate.slot():
            pass
    assert gate.observed_rate() == pytest.approx(10_000 / 60)  # at most 10,000 send times kept
    assert gate.observed_rate(1e9) == pytest.approx(10_000 / 1e9)


async def test_a_pause_that_begins_while_a_caller_waits_for_its_turn_gives_the_turn_back() -> None:
    bucket = CountedBucket()
    gate = RateGate(10, bucket)
    caller = asyncio.create_task(take(gate))
    await settle()  # queued for a turn
    gate.pause(0.2)  # a 429 meanwhile
    bucket.grant(2)  # its turn comes during the pause: given back, and the next one taken after
    await asyncio.wait_for(caller, HUNG_S)
    assert bucket.issued == bucket.released == [100, 101]


async def test_a_refresh_with_nobody_queued_takes_and_gives_back_the_buckets_own_turn() -> None:
    bucket = CountedBucket()
    gate = RateGate(10, bucket)
    bucket.grant(1)
    async with gate.front().slot():
        pass
    assert bucket.issued == bucket.released == [100]


async def test_a_turn_the_refresh_no_longer_needs_goes_back_to_the_bucket() -> None:
    """Two turns at once: the queued caller's, handed to the refresh, and the refresh's own,
    which comes too late and must go back (in Redis, a turn never given back blocks a slot
    of the shared limit until it ages out)."""
    bucket = CountedBucket()
    gate = RateGate(10, bucket)
    queued = asyncio.create_task(take(gate))
    await settle()
    refresh = asyncio.create_task(take(gate.front()))
    await settle()
    bucket.grant(2)
    await asyncio.wait_for(refresh, HUNG_S)
    await settle()
    assert bucket.issued == [100, 101] and sorted(bucket.released) == [100, 101]
    bucket.grant(1)
    await asyncio.wait_for(queued, HUNG_S)
    assert bucket.issued == sorted(bucket.released) == [100, 101, 102]


async def test_refreshes_on_an_idle_line_leave_no_waiter_behind() -> None:
    """Token refreshes with no other call going: each takes its own turn and leaves the line
    of front waiters empty (it would grow by one a refresh, for ever)."""
    bucket = CountedBucket()
    gate = RateGate(10, bucket)
    for _ in range(3):
        bucket.grant(1)
        async with gate.front().slot():
            pass
    assert len(gate._firsts) == 0


async def test_the_worker_looks_again_later_while_callers_are_queued_for_the_next_turn() -> None:
    """Bind late without taking a queued caller's turn: with a caller queued, a turn the bucket
    has free is that caller's, so `ready_in` says "look again after it" (POLL_S), never "now"
    (the worker would claim a round that then waits behind the queue)."""
    bucket = CountedBucket()
    gate = RateGate(10, bucket)
    assert gate.ready_in() == 0.0  # idle: a lone lead is claimed at once
    caller = asyncio.create_task(take(gate))
    await settle()
    assert gate.waiting == 1 and gate.ready_in() == POLL_S
    bucket.ready = 0.3
    assert gate.ready_in() == 0.3  # the bucket's own wait, when longer
    bucket.grant(1)
    await asyncio.wait_for(caller, HUNG_S)
    bucket.ready = 0.0
    assert gate.ready_in() == 0.0


async def test_the_gate_is_idle_from_its_last_turn_and_never_while_a_caller_is_queued() -> None:
    """The worker overlaps a round still at work only once the gate has been idle for a while
    (`idle_for`): a gate never used has been idle for ever; one with a caller queued is not
    idle at all; otherwise the time since the last turn was granted."""
    bucket = CountedBucket()
    gate = RateGate(10, bucket)
    assert gate.idle_for() == float("inf")
    caller = asyncio.create_task(take(gate))
    await settle()
    assert gate.idle_for() == 0.0  # queued: not idle, even though no turn was ever granted
    before = time.monotonic()
    bucket.grant(1)
    await asyncio.wait_for(caller, HUNG_S)
    assert 0.0 <= gate.idle_for() <= time.monotonic() - before


async def test_a_bucket_never_used_has_a_turn_free_at_once_however_young_the_clock() -> None:
    """A lone lead is claimed and sent at once, even on a loop clock that started moments ago
    (the monotonic clock counts from boot) and a slow limit: the first turn is free before
    any was taken."""
    loop = asyncio.get_running_loop()
    real_time = loop.time
    loop.time = lambda: 0.0  # type: ignore[method-assign]
    try:
        assert LocalBucket(0.01).ready_in() == 0.0  # a turn every 102 s, none taken yet
    finally:
        loop.time = real_time  # type: ignore[method-assign]


def test_the_probe_may_go_at_the_instant_the_cool_down_ends() -> None:
    """The worker claims again once `now < open_until` no longer holds (worker.py); the gate
    must let that probe through at the same instant, not refuse the round it just claimed."""
    clock = Clock()
    gate = RateGate(10, CountedBucket(), clock=clock)
    gate.open_circuit("403", 60)
    clock.now += 59.5
    with pytest.raises(CircuitOpen):
        gate.check_circuit()
    clock.now = gate.circuit.open_until
    gate.check_circuit()


def test_a_call_stops_counting_exactly_one_window_after_its_answer() -> None:
    """The shared limit is kept, not undercut: a call answered `window_s` ago no longer counts,
    so the next call may go then (a window later than that would waste a turn each second)."""
    clock = Clock()
    log = SendLog(1.0, clock=clock)
    log.admit(1)
    clock.now += 0.5
    log.release(1)
    clock.now += 0.5
    assert log.count() == 1 and log.wait(1) == 0.5
    clock.now += 0.5  # exactly one window after the answer (1000.5 → 1001.5)
    assert log.count() == 0 and log.wait(1) == 0.0
