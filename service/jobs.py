"""One supervised job loop for every outbox PostgreSQL leases to this process.

Two queues are worked the same way: CRM deliveries (`delivery.worker.Worker`, table `jobs`) and
webhook events (`webhooks.forwarder.Forwarder`, table `forward_jobs`). Both claim due rows with
FOR UPDATE SKIP LOCKED under a lease, keep the leases alive while the work runs, wake on a NOTIFY
the moment a row is committed, sleep until the next row is due otherwise, and on stop let the
work in flight finish for a bounded time. Written twice, the two copies drifted apart (a fix in
one missed the other), so `JobLoop` owns that lifecycle once; a subclass says only what its own:
what a claimed batch becomes (`dispatch`), how its leases are extended (`extend_leases`), which
channel wakes it, and when it must not claim.

The side tasks (the LISTEN connection and the heartbeat) are supervised, as procrastinate's
worker watches its side tasks: one that ends stops the loop loudly (an ERROR with its traceback,
`running` false so /readyz and /health say so). A heartbeat that died quietly used to leave a
loop claiming work whose leases then lapsed under it, so other processes took the same jobs.
A part that keeps failing without ending (database steps, the lease heartbeat, the LISTEN
connection) is a `logs.Trouble`: ERROR once with its cause, and named by `problems()` (/readyz,
the alerts) until it works again.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine
from typing import Any, Generic, Protocol, TypeVar

from service.db.database import listen_forever
from service.errors import StoreUnavailable
from service.logs import Trouble
from service.settings import DeliverySettings

J = TypeVar("J")  # one claimed job
F = TypeVar("F")  # what the loop keeps in flight under one key

IDLE_WAIT_S = 5.0  # longest sleep without a NOTIFY: a lost one costs at most this
REAP_EVERY_S = 2.0
OUTAGE_WAIT_S = 1.0  # after a failed database step, before the next try
STOP_MARGIN_S = 1.0  # `stop` waits the drain time plus this for the loop to end


class JobQueue(Protocol[J]):
    """The lease operations a loop needs from its table (`Store`, `EventStore`)."""

    async def reap_expired(self) -> object: ...

    async def claim(self, owner: str, limit: int, lease_s: float, /) -> list[J]: ...

    async def next_due_in(self) -> float | None: ...


class JobLoop(abc.ABC, Generic[J, F]):
    """Claim, lease, work and give back jobs of one queue; `run()` until `stop()`ped.

    `owner` is the process's name (`cluster.processes.process_name`): lease owners then match
    what the admin API and pg_stat_activity show. `in_flight` (key → what the subclass keeps)
    counts against `worker_concurrency`; the subclass fills it in `dispatch` and empties it as
    its work ends.
    """

    def __init__(
        self,
        queue: JobQueue[J],
        settings: DeliverySettings,
        dsn: str,
        *,
        owner: str,
        channel: str,
        role: str,
        drain_s: float,
    ) -> None:
        self.queue = queue
        self.settings = settings
        self.dsn = dsn
        self.owner = owner
        self.channel = channel
        self.role = role  # "worker" | "forwarder": in log lines and their actions
        self.drain_s = drain_s
        self.running = False
        self.in_flight: dict[int, F] = {}
        # the subclass's logger, so its lines keep the names operators filter on
        self.log = logging.getLogger(type(self).__module__)
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._finished: asyncio.Event | None = None
        # why the loop is not running or not working: /readyz, /health and the alerts say it
        self.crash: str | None = None
        self.db_trouble = Trouble(self.log, f"{role}: database", f"{role}_db_down")
        self.lease_trouble = Trouble(self.log, f"{role}: lease heartbeat", f"{role}_leases_down")
        self.listen_trouble = Trouble(self.log, f"{role}: LISTEN {channel}", f"{role}_listen_down")

    # --- what a subclass says -----------------------------------------------------------

    @abc.abstractmethod
    def dispatch(self, jobs: list[J]) -> list[Coroutine[Any, Any, None]]:
        """Record `jobs` in `in_flight` and return the work that handles them (one task each)."""

    @abc.abstractmethod
    async def extend_leases(self) -> None:
        """Extend the leases of everything in `in_flight`."""

    def may_claim(self) -> bool:
        """False while the loop must not take new work (a pause, an open circuit)."""
        return True

    def idle_hint(self) -> float | None:
        """How long to sleep when nothing was claimed; None: until the next job is due."""
        return None

    def claim_limit(self) -> int:
        """How many to claim now: the free part of `worker_concurrency`, at most a batch."""
        free = self.settings.worker_concurrency - len(self.in_flight)
        return min(free, self.settings.worker_batch)

    async def before_claim(self) -> bool:
        """Called just before a claim; False: do not claim now."""
        return True

    async def listen(self) -> None:
        """Wake the loop on every NOTIFY of `channel` (a side task: it never returns)."""
        await listen_forever(self.dsn, self.channel, self.wake, self.listen_trouble)

    async def stopped(self) -> None:
        """Called once the loop has ended and its work has drained."""

    # --- the loop -----------------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    def problems(self) -> list[str]:
        """What keeps the loop from working, for /readyz and the alerts: not running (and why),
        or a part of it failing (its database steps, its LISTEN connection). A failing lease
        heartbeat is logged, not listed: the jobs it loses are retaken, and the outage behind it
        is the database's, which the probes check themselves."""
        if not self.running:
            return [f"{self.role} not running" + (f": {self.crash}" if self.crash else "")]
        troubles = (self.db_trouble, self.listen_trouble)
        return [reason for t in troubles if (reason := t.reason()) is not None]

    def wake(self, *_: object) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Claim and work jobs until stopped; survive database outages; stop loudly when a side
        task dies (see the module docstring)."""
        self.running, self.crash = True, None
        finished = self._finished = asyncio.Event()
        rounds = asyncio.create_task(self._rounds(), name=f"{self.role}-claims")
        side = [
            asyncio.create_task(self.listen(), name=f"{self.role}-listener"),
            asyncio.create_task(self._keep_leases(), name=f"{self.role}-heartbeat"),
        ]
        try:
            await self._supervise(rounds, side)
            await self._drain(self.drain_s)
        finally:
            self.running = False
            await _cancel(rounds, *side, *self._tasks)
            try:
                await self.stopped()
            finally:
                finished.set()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop claiming; return once the work in flight has finished (cut short after
        `timeout_s`, by default the loop's drain time) and the loop has ended."""
        if timeout_s is not None:
            self.drain_s = timeout_s
        self._stopping = True
        self.wake()
        if self._finished is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), self.drain_s + STOP_MARGIN_S)

    async def _supervise(self, rounds: asyncio.Task[None], side: list[asyncio.Task[None]]) -> None:
        """Wait until the claiming rounds end (a stop) or a side task does (a crash)."""
        done, _ = await asyncio.wait([rounds, *side], return_when=asyncio.FIRST_COMPLETED)
        for task in done - {rounds}:
            self._crashed(task)
        if rounds not in done:
            # no new work: leases would no longer be kept or wake-ups heard
            self.running, self._stopping = False, True
            self.wake()
            await asyncio.wait([rounds])
        if rounds.cancelled() or rounds.exception() is not None:
            self._crashed(rounds)

    def _crashed(self, task: asyncio.Task[None]) -> None:
        error = None if task.cancelled() else task.exception()
        self.running = False
        cause = "cancelled" if error is None else f"{error.__class__.__name__}: {error}"
        self.crash = f"{task.get_name()} ended ({cause})"[:500]
        self.log.error(
            "%s: %s, the loop stops",
            self.role,
            self.crash,
            exc_info=error,
            extra={"action": f"{self.role}_crashed", "task": task.get_name()},
        )

    async def _rounds(self) -> None:
        reaped_at = 0.0
        while not self._stopping:
            try:
                if time.monotonic() - reaped_at > REAP_EVERY_S:
                    await self.queue.reap_expired()
                    reaped_at = time.monotonic()
                claimed = await self._claim()
                wait = None if claimed else await self._idle_wait()
                self.db_trouble.ok()
                if wait is not None:
                    await self._sleep(wait)
            except StoreUnavailable as exc:
                # every database step of the loop is in here: an outage must never end it (said
                # at ERROR once, not at every try)
                self.db_trouble.failed(str(exc))
                await self._sleep(OUTAGE_WAIT_S)

    async def _claim(self) -> bool:
        limit = self.claim_limit()
        if limit <= 0 or not self.may_claim() or not await self.before_claim():
            return False
        if self._stopping or not self.may_claim():  # changed while before_claim waited
            return False
        jobs = await self.queue.claim(self.owner, limit, self.settings.lease_s)
        for work in self.dispatch(jobs):
            task = asyncio.create_task(work, name=f"{self.role}-work")
            self._tasks.add(task)
            task.add_done_callback(self._work_ended)
        return bool(jobs)

    def _work_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # the loop goes on: the jobs' leases lapse and they are retaken
            self.log.error(
                "%s: work failed",
                self.role,
                exc_info=error,
                extra={"action": f"{self.role}_work_error"},
            )

    async def _idle_wait(self) -> float:
        hint = self.idle_hint()
        if hint is not None:
            return hint
        due_in = await self.queue.next_due_in()
        return IDLE_WAIT_S if due_in is None else min(IDLE_WAIT_S, max(due_in, 0.01))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _keep_leases(self) -> None:
        """Extend the leases in flight every third of a lease. A database outage is survived
        (at worst the leases lapse and the jobs are retaken: nothing is lost); any other error
        ends this task, and `_supervise` stops the loop."""
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            try:
                if self.in_flight:
                    await self.extend_leases()
            except StoreUnavailable as exc:
                self.lease_trouble.failed(str(exc))
            else:
                self.lease_trouble.ok()  # extended, or nothing left to keep

    async def _drain(self, timeout_s: float) -> None:
        """Let the work in flight finish for `timeout_s`, then cancel what is left (its jobs are
        given back by the work itself, or retaken once their leases lapse)."""
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            await _cancel(*late)


async def _cancel(*tasks: asyncio.Task[None]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
