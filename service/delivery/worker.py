"""The delivery worker: claims due jobs, delivers them through the CRM adapter, records outcomes.

Several workers (in one or many processes) share the queue: a person is leased to one worker at a
time (see the `claim` query). The loop itself (leases kept alive by a heartbeat, LISTEN/NOTIFY
wake-ups, idle waits, draining on stop) is `service.jobs.JobLoop`; what a CRM error does is
`outcomes`. What is the worker's own: people, not jobs, are in flight; their jobs go out in
rounds of adapter batches; the operator's pause and the open circuit hold claims back.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter as Tally
from collections.abc import Coroutine
from typing import Any

from service.crm.base import Delivery, Link
from service.crm.protocol import CrmAdapter
from service.db.contact_locks import ContactGuard
from service.db.store import Job, Store
from service.delivery.limits import RateGate
from service.delivery.outcomes import CrmOutcomes, Kind
from service.errors import CrmError, CrmRetryable, StoreRefused, StoreUnavailable
from service.jobs import IDLE_WAIT_S, JobLoop
from service.settings import DeliverySettings

log = logging.getLogger(__name__)

CHANNEL = "relay_jobs"
STOP_WAIT_S = 8.0  # CRM calls in flight at shutdown get this long to land and be recorded


class Worker(JobLoop[Job, list[Job]]):
    """One delivery loop; `run()` until cancelled or `stop()`ped. `in_flight`: person id → the
    jobs of that person claimed in one batch."""

    def __init__(
        self,
        store: Store,
        adapter: CrmAdapter,
        gate: RateGate,
        settings: DeliverySettings,
        dsn: str,
        *,
        name: str,
    ) -> None:
        super().__init__(
            store, settings, dsn, owner=name, channel=CHANNEL, role="worker", drain_s=STOP_WAIT_S
        )
        self.store = store
        self.adapter = adapter
        self.gate = gate
        self.outcomes = CrmOutcomes(gate, settings)
        # one delivery at a time per existing CRM contact, across processes (contact_guard.py)
        self.guard = ContactGuard(dsn, name)
        self.paused = False
        self.delivered = 0
        # attempts a job took → jobs, per final state, counted as this worker finishes each
        self.finished: dict[str, Tally[int]] = {"done": Tally(), "dead": Tally()}
        self.last_success: float | None = None
        self.last_failure: tuple[float, str] | None = None

    def may_claim(self) -> bool:
        return not self.paused and not (self.gate.circuit.is_open and self._circuit_waiting())

    def _circuit_waiting(self) -> bool:
        return time.monotonic() < self.gate.circuit.open_until

    def idle_hint(self) -> float | None:
        if self.paused or len(self.in_flight) >= self.settings.worker_concurrency:
            return IDLE_WAIT_S
        if self.gate.circuit.is_open:
            return max(0.05, self.gate.circuit.open_until - time.monotonic())
        return None

    def dispatch(self, jobs: list[Job]) -> list[Coroutine[Any, Any, None]]:
        """All claimed people go out together, in rounds of adapter batches."""
        if not jobs:
            return []
        people: dict[int, list[Job]] = {}
        for job in sorted(jobs, key=lambda j: j.id):
            people.setdefault(job.person_id, []).append(job)
        self.in_flight.update(people)
        return [self._deliver_people(people)]

    async def extend_leases(self) -> None:
        jobs = [j.id for group in self.in_flight.values() for j in group]
        await self.store.heartbeat(self.owner, list(self.in_flight), jobs, self.settings.lease_s)

    async def stopped(self) -> None:
        """Close the contact locks; give back the people whose work was cut short."""
        await self.guard.close()
        try:
            await self.store.release_people(self.owner, list(self.in_flight))
        except (StoreUnavailable, StoreRefused) as exc:  # their leases lapse: nothing is lost
            log.warning(
                "worker: people not given back at stop, their leases will lapse",
                extra={"action": "worker_release_failed", "error": str(exc)[:500]},
            )

    async def _deliver_people(self, people: dict[int, list[Job]]) -> None:
        """Deliver the claimed people's jobs in rounds: each round sends every person's oldest
        job in adapter-sized batches, so one person never has two deliveries in flight."""
        queues = {pid: list(jobs) for pid, jobs in people.items()}
        links = {pid: Link(jobs[0].contact_id, jobs[0].lead_id) for pid, jobs in people.items()}
        try:
            while queues and not self.stopping:
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
        if await self.store.job_done(job, self.owner, link.contact_id, link.lead_id):
            self.finished["done"][job.attempts + 1] += 1
        self.delivered += 1
        self.last_success = time.time()
        self.outcomes.succeeded()
        log.info(
            "job delivered",
            extra={
                "action": "job_success",
                "job_id": job.id,
                "submission_id": str(job.submission_id),
            },
        )
        return link

    async def _failed(self, job: Job, exc: CrmError) -> float:
        """Record what `outcomes` decided for a failed delivery; returns the job's delay."""
        decision = self.outcomes.decide(exc, job.attempts)
        error = f"{exc.__class__.__name__}: {exc}"
        extra = {"job_id": job.id, "submission_id": str(job.submission_id), "error": error}
        if decision.failure:
            self.last_failure = (time.time(), error)
        if decision.kind is Kind.DEAD:
            if await self.store.job_dead(job, self.owner, error):
                self.finished["dead"][job.attempts + 1] += 1
            log.error("job dead", extra={"action": "job_dead", **extra})
            return 0.0
        if decision.kind is Kind.DEFER:  # another delivery writes to its contact
            log.info("job deferred", extra={"action": "job_deferred", **extra})
        elif decision.kind is Kind.RETRY:
            delay = round(decision.delay_s, 2)
            log.warning("job retry", extra={"action": "job_retry", "delay_s": delay, **extra})
        await self.store.job_retry(
            job, self.owner, counted=decision.counted, delay_s=decision.delay_s, error=error
        )
        return decision.delay_s

    async def _put_back(self, jobs: list[Job], delay: float, why: str) -> None:
        for job in jobs:
            await self.store.job_retry(job, self.owner, counted=False, delay_s=delay, error=why)
