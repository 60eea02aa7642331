"""The delivery worker: claims due jobs, delivers them through the CRM adapter, records outcomes.

Several workers (in one or many processes) share the queue: a person is leased to one worker at a
time (see the `claim` query). The loop itself (leases kept alive by a heartbeat, LISTEN/NOTIFY
wake-ups, idle waits, draining on stop) is `service.jobs.JobLoop`; what a CRM error does is
`outcomes`. What is the worker's own: people, not jobs, are in flight; their jobs go out in
rounds of adapter batches; the operator's pause and the open circuit hold claims back.

Binding late: the next round is claimed only when the round before it has finished its CRM
calls and the rate gate has a turn free that no call is queued for (`RateGate.ready_in`); it
takes everything due then (up to `worker_round` people). A burst of submissions thus fills
whole CRM batches instead of each NOTIFY's few people waiting at the gate with what they had;
an idle service claims at once (the gate is free), so one lead goes out as soon as it is
committed. A round's outcomes are recorded while the next one is under way. Should a round
leave the gate unused for OVERLAP_AFTER_S (a CRM answer that hangs), the next round goes ahead
beside it rather than wait for it.
"""

from __future__ import annotations

import asyncio
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
LATE_POLL_S = 0.5  # a bind-late wait looks again at least this often (a stop, a long pause)
OVERLAP_AFTER_S = 1.0  # a round that leaves the gate idle this long lets the next one go
ROUNDS_IN_FLIGHT = 4  # people in flight: at most this many rounds' worth
RECORDING = 4  # outcomes recorded at once (connections of the pool)


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
        # rounds making their CRM calls, and the gate's count when the newest was claimed
        self._sending = 0
        self._claimed_at = -1
        self._round_ended = asyncio.Event()
        self.delivered = 0
        # attempts a job took → jobs, per final state, counted as this worker finishes each
        self.finished: dict[str, Tally[int]] = {"done": Tally(), "dead": Tally()}
        self.last_success: float | None = None
        self.last_failure: tuple[float, str] | None = None

    def may_claim(self) -> bool:
        return not self.paused and not (self.gate.circuit.is_open and self._circuit_waiting())

    def claim_limit(self) -> int:
        """Everything due, up to a round; at most ROUNDS_IN_FLIGHT rounds' worth of people
        in flight (outcomes still being recorded included)."""
        most = ROUNDS_IN_FLIGHT * self.settings.worker_round
        return min(self.settings.worker_round, most - len(self.in_flight))

    async def before_claim(self) -> bool:
        """Bind late: wait until no round is making its CRM calls and the gate has a turn free
        that nobody is queued for; then claim (see the module doc)."""
        while not self.stopping:
            wait = self.gate.ready_in()
            if wait <= 0 and self._sending:
                # beside a round still at work only once it has used the gate and then left
                # it idle for OVERLAP_AFTER_S
                reached = self.gate.admitted != self._claimed_at
                wait = OVERLAP_AFTER_S - self.gate.idle_for() if reached else LATE_POLL_S
            if wait <= 0:
                return True
            self._round_ended.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._round_ended.wait(), min(wait, LATE_POLL_S))
        return False

    def _circuit_waiting(self) -> bool:
        return time.monotonic() < self.gate.circuit.open_until

    def idle_hint(self) -> float | None:
        if self.paused or self.claim_limit() <= 0:
            return IDLE_WAIT_S  # the end of a round wakes us
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
        self._sending += 1
        self._claimed_at = self.gate.admitted
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
        sending = True
        try:
            while queues and not self.stopping:
                heads = [q[0] for q in queues.values()]
                sent: list[tuple[list[Job], list[Link | CrmError]]] = []
                for start in range(0, len(heads), self.adapter.max_round):
                    chunk = heads[start : start + self.adapter.max_round]
                    sent.append((chunk, await self._send_chunk(chunk, links)))
                if sending:
                    sending = self._calls_done()
                for chunk, results in sent:
                    outcomes = await self._record(chunk, results)
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
            if sending:
                self._calls_done()
            for pid in people:
                self.in_flight.pop(pid, None)
            with contextlib.suppress(StoreUnavailable):
                await self.store.release_people(self.owner, list(people))
            self.wake()

    def _calls_done(self) -> bool:
        """The round's first CRM calls are done: the next round may be claimed."""
        self._sending -= 1
        self._round_ended.set()
        return False

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

    async def _send_chunk(self, jobs: list[Job], links: dict[int, Link]) -> list[Link | CrmError]:
        """One adapter call for `jobs` (one per person): each one's link or error."""
        items = [
            Delivery(j.id, j.person_id, j.submission_id, j.lead, links[j.person_id], j.attempts)
            for j in jobs
        ]
        try:
            return await self.adapter.deliver_batch(items, self.guard)
        except CrmError as exc:
            return [exc] * len(items)
        except Exception as exc:  # a bug in an adapter must not kill the worker or lose jobs
            log.exception("worker: unexpected error", extra={"action": "job_error"})
            return [CrmRetryable(f"unexpected {exc.__class__.__name__}: {exc}")] * len(items)

    async def _record(self, jobs: list[Job], results: list[Link | CrmError]) -> list[Link | float]:
        """Each outcome recorded on its own, RECORDING at a time (a round of hundreds would
        otherwise keep the people's later jobs waiting, and the gate idle)."""
        room = asyncio.Semaphore(RECORDING)

        async def record(job: Job, result: Link | CrmError) -> Link | float:
            async with room:
                if isinstance(result, CrmError):
                    return await self._failed(job, result)
                return await self._done(job, result)

        answers = await asyncio.gather(
            *(record(j, r) for j, r in zip(jobs, results, strict=True)), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return [a for a in answers if not isinstance(a, BaseException)]

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
