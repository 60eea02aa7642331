"""`GET /metrics` (Prometheus) and the HTTP middleware that feeds it and the request log.

Most figures already live in the running parts (intake counts, worker counters, the rate gate,
the idempotency window, the key locks): a custom collector reads them at scrape time, so the hot
paths carry no metrics calls. Queue figures come from the database, read by the scrape handler
just before rendering. Only what nothing else counts is counted here: HTTP requests (in the
middleware) and CRM calls (an aiohttp trace on the CRM client session).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest

from service import __version__, logs
from service.admin_store import ADMIN_STORE
from service.errors import StoreUnavailable
from service.store import QueueCounts

if TYPE_CHECKING:
    from service.health import Runtime

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
INTAKE_PREFIXES = ("/api/v1/forms/", "/webhooks/")
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/health", "/metrics"})
ATTEMPT_BUCKETS = (1, 2, 3, 5, 8, 12, 20)
SCRAPE_DB_TIMEOUT_S = 1.0
_REQUEST_ID = re.compile(r"^[\w.:\-]{1,128}$")


@dataclass
class DbSnapshot:
    """What the scrape read from the database just before rendering."""

    up: bool = False
    queue: QueueCounts | None = None
    dead_letters: int | None = None
    attempts: list[tuple[str, int, int]] = field(default_factory=list)


class Metrics:
    """One registry per application, so several apps in one process (tests) never collide."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.requests = Counter(
            "crm_relay_http_requests",
            "HTTP requests answered",
            ["method", "route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "crm_relay_http_request_duration_seconds",
            "Time to answer an HTTP request",
            ["method", "route"],
            registry=r,
        )
        self.crm_calls = Counter(
            "crm_relay_crm_calls", "Outbound CRM HTTP calls by outcome", ["outcome"], registry=r
        )
        self.crm_latency = Histogram(
            "crm_relay_crm_call_duration_seconds",
            "CRM call duration",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.rejected = 0  # intake answers {"ok": false}: bad input, counted by the middleware
        self.webhooks: Tally[str] = Tally()  # "route status" → count, for /health
        self.db = DbSnapshot()
        r.register(RuntimeCollector(self))

    async def refresh_db(self, app: web.Application) -> None:
        """Read the database figures for this scrape (bounded: a scrape must not hang)."""
        snap = DbSnapshot()
        store, admin = self.runtime.store, app.get(ADMIN_STORE)
        if store is not None:
            try:
                async with asyncio.timeout(SCRAPE_DB_TIMEOUT_S):
                    snap.queue = await store.queue_counts()
                    if admin is not None:
                        snap.dead_letters = await admin.dead_letter_count()
                        snap.attempts = await admin.finished_attempts()
                snap.up = True
            except (StoreUnavailable, TimeoutError):
                snap.up = False
        self.db = snap


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(name, doc, value=value)


class RuntimeCollector:
    """Reads the running parts' own counters and gauges at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        rt = self.m.runtime
        info = GaugeMetricFamily("crm_relay_build_info", "Version", labels=["version", "crm"])
        info.add_metric([__version__, rt.crm], 1)
        yield info
        yield from _gauge(
            "crm_relay_uptime_seconds", "Seconds since start", time.time() - rt.started
        )
        yield from self._intake()
        yield from self._worker()
        yield from self._limiter()
        yield from self._database()

    def _intake(self) -> Iterator[Metric]:
        intake = self.m.runtime.intake
        subs = CounterMetricFamily(
            "crm_relay_submissions", "Submissions by outcome", labels=["outcome"]
        )
        counts = dict(intake.counts) if intake else {}
        for outcome in ("accepted", "duplicate", "spooled"):
            subs.add_metric([outcome], counts.get(outcome, 0))
        subs.add_metric(["rejected"], self.m.rejected)
        yield subs
        if intake is None:
            return
        yield _counter(
            "crm_relay_lock_waits", "Key-lock acquisitions that waited", intake.locks.waits
        )
        yield _counter(
            "crm_relay_idempotency_window_hits", "Repeats answered from memory", intake.window.hits
        )
        yield from _gauge(
            "crm_relay_idempotency_window_entries", "Keys in the window", len(intake.window)
        )
        yield from _gauge(
            "crm_relay_spool_bytes",
            "Bytes waiting in the local spool",
            intake.spool.pending_bytes(),
        )
        yield _counter(
            "crm_relay_spool_appended", "Entries written to the spool", intake.spool.appended
        )

    def _worker(self) -> Iterator[Metric]:
        w = self.m.runtime.worker
        if w is None:
            return
        yield _counter("crm_relay_delivered", "Jobs delivered by this process", w.delivered)
        yield from _gauge("crm_relay_worker_running", "Delivery loop running", float(w.running))
        yield from _gauge(
            "crm_relay_worker_paused", "Delivery paused by an operator", float(w.paused)
        )
        yield from _gauge(
            "crm_relay_worker_in_flight_people", "People being delivered", len(w.in_flight)
        )
        if w.last_success is not None:
            yield from _gauge(
                "crm_relay_last_success_timestamp_seconds", "Last delivery", w.last_success
            )
        if w.last_failure is not None:
            yield from _gauge(
                "crm_relay_last_failure_timestamp_seconds", "Last failed attempt", w.last_failure[0]
            )

    def _limiter(self) -> Iterator[Metric]:
        gate = self.m.runtime.gate
        if gate is None:
            return
        yield from _gauge("crm_relay_limiter_rate", "Configured CRM requests per second", gate.rate)
        yield from _gauge(
            "crm_relay_limiter_observed_rate",
            "CRM requests per second, last minute",
            gate.observed_rate(),
        )
        yield from _gauge(
            "crm_relay_limiter_paused_seconds",
            "Seconds left in a rate-limit pause",
            max(0.0, gate.paused_until - time.monotonic()),
        )
        circuit = GaugeMetricFamily("crm_relay_circuit_open", "CRM circuit open", labels=["crm"])
        circuit.add_metric([self.m.runtime.crm], float(gate.circuit.is_open))
        yield circuit

    def _database(self) -> Iterator[Metric]:
        db = self.m.db
        yield from _gauge("crm_relay_database_up", "Database answered the scrape", float(db.up))
        if db.queue is not None:
            jobs = GaugeMetricFamily("crm_relay_jobs", "Jobs by state", labels=["state"])
            for state in ("pending", "running", "done", "dead"):
                jobs.add_metric([state], getattr(db.queue, state))
            yield jobs
            yield from _gauge("crm_relay_jobs_due", "Jobs due now", db.queue.due)
            yield from _gauge(
                "crm_relay_oldest_due_job_age_seconds",
                "Age of the oldest due job (delivery lag)",
                db.queue.oldest_due_age_s or 0.0,
            )
        yield from _gauge("crm_relay_dead_letters", "Dead letters not discarded", db.dead_letters)
        if db.attempts:
            yield from _attempts_histogram(db.attempts)


def _attempts_histogram(rows: list[tuple[str, int, int]]) -> Iterator[Metric]:
    family = HistogramMetricFamily(
        "crm_relay_job_attempts", "Attempts a finished job took, by final state", labels=["state"]
    )
    for state in ("done", "dead"):
        mine = [(attempts, n) for s, attempts, n in rows if s == state]
        buckets = [
            (str(float(b)), float(sum(n for a, n in mine if a <= b))) for b in ATTEMPT_BUCKETS
        ]
        buckets.append(("+Inf", float(sum(n for _, n in mine))))
        family.add_metric([state], buckets, sum_value=float(sum(a * n for a, n in mine)))
    yield family


# --- HTTP middleware ------------------------------------------------------------------------


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


def _request_id(request: web.Request) -> str:
    sent = request.headers.get("X-Request-Id", "")
    return sent if _REQUEST_ID.match(sent) else uuid.uuid4().hex


def _intake_outcome(path: str, response: web.StreamResponse | None) -> tuple[bool, str | None]:
    """(rejected?, submission id) of an intake answer; the handlers are not ours to change."""
    if not path.startswith(INTAKE_PREFIXES) or not isinstance(response, web.Response):
        return False, None
    body = response.body
    if not isinstance(body, bytes) or len(body) > 4096:
        return False, None
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False, None
    if not isinstance(data, dict):
        return False, None
    return data.get("ok") is False, data.get("id") if isinstance(data.get("id"), str) else None


@web.middleware
async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id (X-Request-Id honoured or made), metrics and one log line per request."""
    rid = _request_id(request)
    token = logs.REQUEST_ID.set(rid)
    t0 = time.perf_counter()
    status, response = 500, None
    try:
        response = await handler(request)
        status = response.status
    except web.HTTPException as exc:
        status = exc.status
        exc.headers["X-Request-Id"] = rid
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away
        raise
    finally:
        _record(request, status, response, time.perf_counter() - t0)
        logs.REQUEST_ID.reset(token)
    if not response.prepared:
        response.headers["X-Request-Id"] = rid
    return response


def _record(
    request: web.Request, status: int, response: web.StreamResponse | None, seconds: float
) -> None:
    m = request.app[METRICS]
    route = _route(request)
    m.requests.labels(request.method, route, str(status)).inc()
    m.latency.labels(request.method, route).observe(seconds)
    rejected, submission_id = _intake_outcome(request.path, response)
    # webhook events are not submissions: their answers count under `webhooks` only
    m.rejected += rejected and request.path.startswith(INTAKE_PREFIXES[0])
    if request.path.startswith("/webhooks/"):
        m.webhooks[f"{route} {status}"] += 1
    extra: dict[str, Any] = {
        "action": "http_request",
        "method": request.method,
        "route": route,
        "path": request.path,  # never the query string: admin lookups carry phones and emails
        "status": status,
        "ms": round(seconds * 1000, 2),
    }
    if submission_id:
        extra["submission_id"] = submission_id
    level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
    log.log(level, "%s %s %s", request.method, request.path, status, extra=extra)


# --- CRM calls ------------------------------------------------------------------------------


def crm_trace(metrics: Metrics) -> aiohttp.TraceConfig:
    """Counts every call on the CRM client session by outcome: ok, 429, 403, 4xx, 5xx, timeout."""
    trace = aiohttp.TraceConfig()

    async def start(_s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: Any) -> None:
        ctx.t0 = time.perf_counter()

    async def end(_s: aiohttp.ClientSession, ctx: SimpleNamespace, p: Any) -> None:
        metrics.crm_latency.observe(time.perf_counter() - ctx.t0)
        metrics.crm_calls.labels(_outcome(p.response.status)).inc()

    async def failed(_s: aiohttp.ClientSession, ctx: SimpleNamespace, p: Any) -> None:
        metrics.crm_latency.observe(time.perf_counter() - ctx.t0)
        timeout = isinstance(p.exception, TimeoutError | asyncio.TimeoutError)
        metrics.crm_calls.labels("timeout" if timeout else "error").inc()

    trace.on_request_start.append(start)
    trace.on_request_end.append(end)
    trace.on_request_exception.append(failed)
    return trace


def _outcome(status: int) -> str:
    if status < 400:
        return "ok"
    if status in (403, 429):
        return str(status)
    return "5xx" if status >= 500 else "4xx"


async def metrics_handler(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    await m.refresh_db(request.app)
    body = generate_latest(m.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def routes() -> list[web.RouteDef]:
    return [web.get("/metrics", metrics_handler)]


METRICS = web.AppKey("metrics", Metrics)
