"""The delivery worker: claims due jobs, delivers them through the CRM adapter, records outcomes.

Several workers (in one or many processes) share the queue: a person is leased to one worker at a
time (see the `claim` query), leases are kept alive by a heartbeat and retaken when a worker dies,
and LISTEN/NOTIFY wakes idle workers the moment a job is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
import uuid
from collections.abc import Callable

from service.crm.base import Deferred, Delivery, Link
from service.crm.protocol import CrmAdapter
from service.db.contact_locks import ContactGuard
from service.db.database import listen_forever
from service.db.store import Job, Store
from service.delivery.limits import RateGate
from service.errors import (
    CrmBlocked,
    CrmError,
    CrmPermanent,
    CrmRateLimited,
    CrmRetryable,
    CrmUnauthorized,
    StoreUnavailable,
)
from service.settings import Settings

log = logging.getLogger(__name__)

CHANNEL = "relay_jobs"
IDLE_WAIT_S = 5.0
REAP_EVERY_S = 2.0


class Worker:
    """One delivery loop; `run()` until cancelled or `stop()`ped."""

    def __init__(
        self, store: Store, adapter: CrmAdapter, gate: RateGate, settings: Settings, dsn: str
    ) -> None:
        self.store = store
        self.adapter = adapter
        self.gate = gate
        self.settings = settings
        self.dsn = dsn
        self.owner = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        # one delivery at a time per existing CRM contact, across processes (contact_guard.py)
        self.guard = ContactGuard(dsn, self.owner)
        self.paused = False
        self.running = False
        self.in_flight: dict[int, list[Job]] = {}  # person id → its claimed jobs
        self.delivered = 0
        self.last_success: float | None = None
        self.last_failure: tuple[float, str] | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._rate_limit_streak = 0
        # the refusal behind the current pause, and that pause (see `_pause_for`)
        self._last_refusal: CrmRateLimited | None = None
        self._last_pause = 0.0
        # test hook: called after the CRM accepted a job and before we commit it ("crash here")
        self.after_crm: Callable[[Job], None] | None = None

    def wake(self, *_: object) -> None:
        self._wake.set()

    async def run(self) -> None:
        """Claim and deliver until stopped; survive database outages."""
        self.running = True
        listener = asyncio.create_task(self._listen())
        beat = asyncio.create_task(self._heartbeat())
        try:
            await self._loop()
        finally:
            self.running = False
            for t in (listener, beat):
                t.cancel()
            for t in (listener, beat):
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            if not self._tasks:  # else `stop()` closes it once they are over
                await self.guard.close()

    async def _loop(self) -> None:
        last_reap = 0.0
        while not self._stopping:
            try:
                if time.monotonic() - last_reap > REAP_EVERY_S:
                    await self.store.reap_expired()
                    last_reap = time.monotonic()
                if not await self._claim():
                    await self._sleep(await self._idle_wait())
            except StoreUnavailable as exc:
                # every database step of the loop is in here: an outage must never end it
                log.warning(
                    "worker: database unavailable",
                    extra={"action": "worker_db_down", "error": str(exc)},
                )
                await self._sleep(1.0)

    async def _claim(self) -> bool:
        free = self.settings.worker_concurrency - len(self.in_flight)
        if self.paused or free <= 0 or (self.gate.circuit.is_open and self._circuit_waiting()):
            return False
        jobs = await self.store.claim(
            self.owner, min(free, self.settings.worker_batch), self.settings.lease_s
        )
        if not jobs:
            return False
        people: dict[int, list[Job]] = {}
        for job in sorted(jobs, key=lambda j: j.id):
            people.setdefault(job.person_id, []).append(job)
        self.in_flight.update(people)
        task = asyncio.create_task(self._deliver_people(people))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    def _circuit_waiting(self) -> bool:
        return time.monotonic() < self.gate.circuit.open_until

    async def _idle_wait(self) -> float:
        if self.paused or len(self.in_flight) >= self.settings.worker_concurrency:
            return IDLE_WAIT_S
        if self.gate.circuit.is_open:
            return max(0.05, self.gate.circuit.open_until - time.monotonic())
        due_in = await self.store.next_due_in()
        return IDLE_WAIT_S if due_in is None else min(IDLE_WAIT_S, max(due_in, 0.01))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        self._wake.clear()

    async def _deliver_people(self, people: dict[int, list[Job]]) -> None:
        """Deliver the claimed people's jobs in rounds: each round sends every person's oldest
        job in adapter-sized batches, so one person never has two deliveries in flight."""
        queues = {pid: list(jobs) for pid, jobs in people.items()}
        links = {pid: Link(jobs[0].contact_id, jobs[0].lead_id) for pid, jobs in people.items()}
        try:
            while queues and not self._stopping:
                heads = [q[0] for q in queues.values()]
                for start in range(0, len(heads), self.adapter.max_batch):
                    chunk = heads[start : start + self.adapter.max_batch]
                    outcomes = await self._deliver_chunk(chunk, links)
                    for job, outcome in zip(chunk, outcomes, strict=True):
                        await self._advance(job, outcome, queues, links)
            for queue in queues.values():
                await self._put_back(queue, 0.0, "worker stopped before this job")
        except StoreUnavailable as exc:
            # our leases will lapse and the jobs will be retaken: nothing is lost
            log.warning(
                "worker: cannot record outcome",
                extra={"action": "worker_db_down", "error": str(exc)},
            )
        finally:
            for pid in people:
                self.in_flight.pop(pid, None)
            with contextlib.suppress(StoreUnavailable):
                await self.store.release_people(self.owner, list(people))
            self.wake()

    async def _advance(
        self,
        job: Job,
        outcome: Link | float,
        queues: dict[int, list[Job]],
        links: dict[int, Link],
    ) -> None:
        queue = queues[job.person_id]
        if isinstance(outcome, Link):
            links[job.person_id] = outcome
            queue.pop(0)
            if not queue:
                del queues[job.person_id]
            return
        # the person's later jobs wait for this one, in order
        await self._put_back(queue[1:], outcome, "waiting for an earlier job")
        del queues[job.person_id]

    async def _deliver_chunk(self, jobs: list[Job], links: dict[int, Link]) -> list[Link | float]:
        """One adapter call for `jobs` (one per person); each outcome recorded on its own."""
        items = [
            Delivery(j.id, j.person_id, j.submission_id, j.lead, links[j.person_id]) for j in jobs
        ]
        try:
            results = await self.adapter.deliver_batch(items, self.guard)
        except CrmError as exc:
            results = [exc] * len(items)
        except Exception as exc:  # a bug in an adapter must not kill the worker or lose jobs
            log.exception("worker: unexpected error", extra={"action": "job_error"})
            results = [CrmRetryable(f"unexpected {exc.__class__.__name__}: {exc}")] * len(items)
        outcomes: list[Link | float] = []
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, CrmError):
                outcomes.append(await self._failed(job, result))
            else:
                outcomes.append(await self._done(job, result))
        return outcomes

    async def _done(self, job: Job, link: Link) -> Link:
        if self.after_crm is not None:
            self.after_crm(job)
        await self.store.job_done(job, self.owner, link.contact_id, link.lead_id)
        self._succeeded()
        log.info(
            "job delivered",
            extra={
                "action": "job_success",
                "job_id": job.id,
                "submission_id": str(job.submission_id),
            },
        )
        return link

    def _succeeded(self) -> None:
        self.delivered += 1
        self.last_success = time.time()
        self._rate_limit_streak = 0
        if self.gate.circuit.is_open:
            self.gate.close_circuit()

    async def _failed(self, job: Job, exc: CrmError) -> float:
        """The one place where a CRM error becomes behaviour; returns the job's delay."""
        error = f"{exc.__class__.__name__}: {exc}"
        extra = {"job_id": job.id, "submission_id": str(job.submission_id), "error": error}
        if isinstance(exc, Deferred):  # not a failure: another delivery writes to its contact
            log.info("job deferred", extra={"action": "job_deferred", **extra})
            return await self._reschedule(job, counted=False, delay=exc.delay_s, error=error)
        self.last_failure = (time.time(), error)
        if isinstance(exc, CrmRateLimited):
            pause = self._pause_for(exc)
            return await self._reschedule(job, counted=False, delay=pause, error=error)
        if isinstance(exc, CrmBlocked | CrmUnauthorized):
            cooldown = self.settings.circuit_cooldown_s
            self.gate.open_circuit(error, cooldown)
            return await self._reschedule(job, counted=False, delay=cooldown, error=error)
        if isinstance(exc, CrmPermanent) or job.attempts + 1 >= self.settings.retry.max_attempts:
            await self.store.job_dead(job, self.owner, error)
            log.error("job dead", extra={"action": "job_dead", **extra})
            return 0.0
        delay = self.settings.retry.delay(job.attempts + 1, random.random())
        log.warning("job retry", extra={"action": "job_retry", "delay_s": round(delay, 2), **extra})
        return await self._reschedule(job, counted=True, delay=delay, error=error)

    def _pause_for(self, exc: CrmRateLimited) -> float:
        """Pause every sender once per refusal. A refused batch request fails each of its jobs
        with the same error object: that is one 429 in a row, not fifty (counting it per job
        would take one refusal of a 50-lead batch straight to the longest pause)."""
        if exc is not self._last_refusal:
            self._last_refusal = exc
            self._rate_limit_streak += 1
            s = self.settings
            backoff = s.pause_base_s * 2.0 ** min(self._rate_limit_streak - 1, 16)
            self._last_pause = exc.retry_after or min(s.pause_max_s, backoff)
            self.gate.pause(self._last_pause)
        return self._last_pause

    async def _reschedule(self, job: Job, *, counted: bool, delay: float, error: str) -> float:
        await self.store.job_retry(job, self.owner, counted=counted, delay_s=delay, error=error)
        return delay

    async def _put_back(self, jobs: list[Job], delay: float, why: str) -> None:
        for job in jobs:
            await self.store.job_retry(job, self.owner, counted=False, delay_s=delay, error=why)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_s / 3)
            people = list(self.in_flight)
            jobs = [j.id for group in self.in_flight.values() for j in group]
            if people:
                with contextlib.suppress(StoreUnavailable):
                    await self.store.heartbeat(self.owner, people, jobs, self.settings.lease_s)

    async def _listen(self) -> None:
        await listen_forever(self.dsn, CHANNEL, self.wake)

    async def stop(self, timeout_s: float = 8.0) -> None:
        """Stop claiming, let in-flight CRM calls finish, give back what was not started."""
        self._stopping = True
        self.wake()
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        await self.guard.close()
        with contextlib.suppress(StoreUnavailable):
            await self.store.release_people(self.owner, list(self.in_flight))
