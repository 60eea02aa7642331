"""The forwarding worker: processes stored webhook events and relays them downstream.

Two kinds of outbox job (`forward_jobs`), claimed with FOR UPDATE SKIP LOCKED under a lease that a
heartbeat keeps alive, woken by LISTEN `relay_events`:
- `process` (one per event): recognise our own echo, update `crm_lead_state`, fetch the Bitrix24
  deal when a fetcher is configured, and create one `forward` job per destination — all in one
  transaction with the job's completion, so an event is processed once.
- `forward` (one per event and destination): POST the event as JSON with
  `X-Relay-Event-Id` (the same on every retry: receivers dedupe by it) and, with a key
  (FORWARD_SIGNING_SECRET, else WEBHOOK_SECRET), two signatures: `X-Relay-Signature:
  sha256=<hex HMAC-SHA256 of the body>` and Standard Webhooks' `webhook-id`, `webhook-timestamp`,
  `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`; 2xx → done; 408/425/429/5xx,
  timeouts and connection errors → retry with `settings.retry` backoff and jitter; other answers
  or exhausted attempts → dead (replayable). Each destination has its own aiolimiter bucket.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import replace
from typing import Any

import aiohttp
import orjson
from aiolimiter import AsyncLimiter

from service.crm.bitrix24.api import Bitrix24Api, BitrixNotFound
from service.db.event_store import EventStore, ForwardJob, Processed
from service.delivery.limits import RateGate
from service.delivery.outcomes import DEAD, CrmOutcomes, Decision, Kind, backoff, classify
from service.errors import CrmError, StoreUnavailable
from service.jobs import IDLE_WAIT_S, JobLoop
from service.model import LeadChange
from service.settings import DeliverySettings, LeadSettings, WebhookSettings
from service.webhooks.events import OurWrite, is_echo, lead_change, sign, standard_signature

log = logging.getLogger(__name__)

CHANNEL = "relay_events"
# A delivery in flight may be about to record the very lead an event is about: an event younger
# than this is looked at again (not counted as an attempt) until those deliveries have committed.
ECHO_SETTLE_S = 5.0
ECHO_RECHECK_S = 1.0
RETRYABLE_STATUS = frozenset({408, 425, 429})
# Shutdown waits this long for forwards in flight; one cut short is retried after its lease
# (at least once: receivers dedupe by X-Relay-Event-Id).
STOP_WAIT_S = 3.0

DealFetcher = Callable[[int], Awaitable[dict[str, Any] | None]]


def bitrix24_deal_fetcher(api: Bitrix24Api) -> DealFetcher:
    """`crm.deal.get` through the shared CRM gate; None for a deal Bitrix24 does not know."""

    async def fetch(deal_id: int) -> dict[str, Any] | None:
        try:
            deal = await api.call("crm.deal.get", {"id": deal_id})
        except BitrixNotFound:
            return None
        return deal if isinstance(deal, dict) else None

    return fetch


class ForwardFailed(Exception):
    """A destination did not take the event; `retryable` says whether to try again."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        self.retryable = retryable
        self.retry_after = retry_after
        super().__init__(message)


def envelope(job: ForwardJob) -> bytes:
    """What receivers get: byte-identical on every retry, so the signature is too."""
    body = {
        "id": str(job.event_id),
        "source": job.source,
        "kind": job.event_kind,
        "key": job.event_key,
        "entity_id": job.entity_id,
        "received_at": job.received_at.isoformat(),
        **job.payload,
    }
    return orjson.dumps(body)


class Forwarder(JobLoop[ForwardJob, ForwardJob]):
    """One processing/forwarding loop; `run()` until cancelled or `stop()`ped. The loop itself
    is `service.jobs.JobLoop`; a CRM error met on a deal lookup is decided by
    `delivery.outcomes`, as the worker's are. `in_flight`: job id → job."""

    def __init__(
        self,
        store: EventStore,
        webhook: WebhookSettings,
        delivery: DeliverySettings,
        dsn: str,
        *,
        name: str,
        gate: RateGate,
        leads: LeadSettings,
        fetch_deal: DealFetcher | None = None,
    ) -> None:
        drain_s = min(webhook.forward_timeout_s, STOP_WAIT_S)
        super().__init__(
            store, delivery, dsn, owner=name, channel=CHANNEL, role="forwarder", drain_s=drain_s
        )
        self.store = store
        self.webhook = webhook
        self.leads = leads  # the echo check compares with the status each form's leads get
        self.fetch_deal = fetch_deal
        self.outcomes = CrmOutcomes(gate, delivery)
        self.counts: dict[str, int] = {"processed": 0, "echo": 0, "forwarded": 0, "failed": 0}
        self._limiters: dict[str, AsyncLimiter] = {}
        self._session: aiohttp.ClientSession | None = None

    def destinations(self, source: str) -> list[str]:
        """WEBHOOK_FORWARD_URL for every source, then the `[forward.<source>]` rules."""
        urls = [self.webhook.forward_url] if self.webhook.forward_url else []
        urls += [r.url for r in self.webhook.forward_rules.get(source, ())]
        return list(dict.fromkeys(urls))

    def _limiter(self, url: str) -> AsyncLimiter:
        if url not in self._limiters:
            rates = [
                r.rate
                for rules in self.webhook.forward_rules.values()
                for r in rules
                if r.url == url and r.rate
            ]
            rate = min(rates, default=self.webhook.forward_rate)
            self._limiters[url] = AsyncLimiter(max(rate, 1.0), max(1.0, 1.0 / rate))
        return self._limiters[url]

    async def run(self) -> None:
        """The job loop, inside the HTTP session every forward goes through."""
        timeout = aiohttp.ClientTimeout(total=self.webhook.forward_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            self._session = session
            await super().run()

    def dispatch(self, jobs: list[ForwardJob]) -> list[Coroutine[Any, Any, None]]:
        """Every job on its own: forwards to one destination must not wait for another's."""
        for job in jobs:
            self.in_flight[job.id] = job
        return [self._handle(job) for job in jobs]

    def idle_hint(self) -> float | None:
        return IDLE_WAIT_S if self.in_flight else None  # a job finishing wakes us

    async def extend_leases(self) -> None:
        await self.store.heartbeat(self.owner, list(self.in_flight), self.settings.lease_s)

    async def _handle(self, job: ForwardJob) -> None:
        try:
            if job.kind == "process":
                await self._process(job)
            else:
                await self._forward(job)
        except StoreUnavailable as exc:
            # our lease will lapse and the job will be retaken: nothing is lost
            log.warning(
                "forwarder: cannot record outcome",
                extra={"action": "forwarder_db_down", "job_id": job.id, "error": str(exc)},
            )
        except (ForwardFailed, CrmError) as exc:
            await self._failed(job, exc)
        except Exception as exc:  # a bug must not kill the loop or lose the job
            log.exception("forwarder: unexpected error", extra={"action": "forward_error"})
            await self._failed(job, ForwardFailed(f"unexpected {exc!r}", retryable=True))
        finally:
            self.in_flight.pop(job.id, None)
            # claim in batches, not one query per finished job: wake when half the slots are free
            if len(self.in_flight) <= self.settings.worker_concurrency // 2:
                self.wake()

    # --- process ------------------------------------------------------------------------

    async def _process(self, job: ForwardJob) -> None:
        payload = await self._enriched(job)
        change = lead_change(job.source, job.event_kind, payload or job.payload, job.received_at)
        if change is not None:
            if await self._is_echo(change):
                await self._finish(job, Processed("echo", payload))
                return
            if await self._settling(job):
                return
        outcome = "applied" if change is not None else "forwarded-only"
        await self._finish(
            job, Processed(outcome, payload, change, tuple(self.destinations(job.source)))
        )

    async def _finish(self, job: ForwardJob, result: Processed) -> None:
        if await self.store.processed(job, self.owner, result):
            self.counts["echo" if result.outcome == "echo" else "processed"] += 1
            extra = {"event_id": str(job.event_id), "outcome": result.outcome}
            log.info("event processed", extra={"action": "event_processed", **extra})

    async def _enriched(self, job: ForwardJob) -> dict[str, Any] | None:
        """Bitrix24 deal events carry only an id: fetch the deal (through the CRM limiter)."""
        if self.fetch_deal is None or job.source != "bitrix24" or "entity" in job.payload:
            return None
        if not job.event_kind.startswith("oncrmdeal") or job.event_kind == "oncrmdealdelete":
            return None
        if job.entity_id is None or not (job.entity_id.isascii() and job.entity_id.isdigit()):
            return None
        try:
            deal = await self.fetch_deal(int(job.entity_id))
        except CrmError as exc:
            if classify(exc, job.attempts, self.settings).kind is not Kind.DEAD:
                raise  # retried with backoff (or after the CRM's pause) by _failed
            # the event itself must not be lost to a failed lookup: forward it id-only
            return {**job.payload, "entity": None, "entity_error": f"{exc}"[:500]}
        self.outcomes.succeeded()
        return {**job.payload, "entity": deal}

    async def _is_echo(self, change: LeadChange) -> bool:
        window = self.webhook.echo_window_s
        found = await self.store.our_writes(change.lead_id, change.changed_at, window)
        writes = [OurWrite(at, self._status_we_set(change.crm, form)) for form, at in found]
        return is_echo(change, writes, window)

    def _status_we_set(self, crm: str, form: str) -> str | None:
        rule = self.leads.form_rule(form)
        if crm != "amocrm":
            return rule.stage_id  # compared with the fetched deal's STAGE_ID, when there is one
        return None if rule.status_id is None else str(rule.status_id)

    async def _settling(self, job: ForwardJob) -> bool:
        """Put a young event back for a moment while deliveries are in flight (see above)."""
        age = (dt.datetime.now(dt.UTC) - job.received_at).total_seconds()
        if age >= ECHO_SETTLE_S or not await self.store.deliveries_in_flight():
            return False
        await self.store.retry(
            job,
            self.owner,
            counted=False,
            delay_s=ECHO_RECHECK_S,
            error="waiting for deliveries in flight (echo check)",
        )
        return True

    # --- forward ------------------------------------------------------------------------

    async def _forward(self, job: ForwardJob) -> None:
        assert self._session is not None  # set by run()
        body = envelope(job)
        headers = {
            "Content-Type": "application/json",
            "X-Relay-Event-Id": str(job.event_id),
            "X-Relay-Source": job.source,
        }
        if (key := self.webhook.forward_key) is not None:
            headers.update(signed_headers(key, str(job.event_id), body, int(time.time())))
        async with self._limiter(job.destination):
            try:
                # as the CRM client: a redirect is an answer (dead, "HTTP 302"), never followed
                # (it would carry the signed event to wherever the destination points)
                async with self._session.post(
                    job.destination, data=body, headers=headers, allow_redirects=False
                ) as r:
                    status, retry_after = r.status, r.headers.get("Retry-After")
                    await r.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise ForwardFailed(f"{exc.__class__.__name__}: {exc}", retryable=True) from exc
        if not 200 <= status < 300:
            raise ForwardFailed(
                f"HTTP {status}",
                retryable=status >= 500 or status in RETRYABLE_STATUS,
                retry_after=_seconds(retry_after),
            )
        if await self.store.forwarded(job, self.owner):
            self.counts["forwarded"] += 1

    async def _failed(self, job: ForwardJob, exc: ForwardFailed | CrmError) -> None:
        """Record what a failure decides: put back (counted or not), or dead."""
        self.counts["failed"] += 1
        decision = self._decide(job, exc)
        error = f"{exc.__class__.__name__}: {exc}"
        extra = {"job_id": job.id, "event_id": str(job.event_id), "error": error}
        with contextlib.suppress(StoreUnavailable):
            if decision.kind is Kind.DEAD:
                await self.store.dead(job, self.owner, error)
                log.error("forward job dead", extra={"action": "forward_dead", **extra})
                return
            delay = decision.delay_s
            await self.store.retry(
                job, self.owner, counted=decision.counted, delay_s=delay, error=error
            )
            if decision.kind is Kind.RETRY:
                log.warning(
                    "forward retry", extra={"action": "forward_retry", "delay_s": delay, **extra}
                )

    def _decide(self, job: ForwardJob, exc: ForwardFailed | CrmError) -> Decision:
        """A CRM error (a deal lookup) as every CRM caller decides it; a destination's refusal
        by the same backoff, at least as long as its Retry-After (up to RETRY_MAX_S)."""
        if isinstance(exc, CrmError):
            return self.outcomes.decide(exc, job.attempts)
        if not exc.retryable:
            return DEAD
        decision = backoff(job.attempts, self.settings.retry)
        if decision.kind is Kind.RETRY and exc.retry_after is not None:
            delay = min(max(decision.delay_s, exc.retry_after), self.settings.retry.max_s)
            return replace(decision, delay_s=delay)
        return decision


def signed_headers(key: bytes, event_id: str, body: bytes, now: int) -> dict[str, str]:
    """Both signatures of one forward attempt: the GitHub form (`X-Relay-Signature`, the body
    alone) and Standard Webhooks' three headers (the id is the event's, the same on every retry;
    the timestamp is the attempt's, so receivers can refuse a stale replay)."""
    return {
        "X-Relay-Signature": sign(key, body),
        "webhook-id": event_id,
        "webhook-timestamp": str(now),
        "webhook-signature": standard_signature(key, event_id, now, body),
    }


def _seconds(header: str | None) -> float | None:
    try:
        return max(0.0, float(header)) if header else None
    except ValueError:
        return None  # an HTTP date: our own backoff is good enough
