"""`GET /metrics` (Prometheus) and the HTTP middleware that feeds it and the request log.

Most figures already live in the running parts (intake counts, worker counters, the rate gate,
the idempotency window, the key locks): a custom collector (`service.ops.collector`) reads them at
scrape time, so the hot paths carry no metrics calls. Queue figures come from the database, read
by the scrape handler just before rendering. Only what nothing else counts is counted here: HTTP
requests (in the middleware) and CRM calls (an aiohttp trace on the CRM client session).
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import logging
import re
import secrets
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from service import logs
from service.db.admin_store import ADMIN_STORE
from service.ops.collector import DbSnapshot, RuntimeCollector, read_db
from service.web import OUTCOME

if TYPE_CHECKING:
    from service.ops.runtime import Runtime

log = logging.getLogger(__name__)
# one line per request, built from masked parts only (logs.PREMASKED: the mask filter skips it)
ACCESS_LOG = logging.getLogger(logs.ACCESS_LOGGER)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/health", "/metrics"})
SCRAPE_DB_TIMEOUT_S = 1.0
MAX_ROUTE_CHILDREN = 1_000  # (method, route, status) label sets; routes are templates: few
_REQUEST_ID = re.compile(r"^[\w.:\-]{1,128}$")


class Metrics:
    """One registry per application, so several apps in one process (tests) never collide."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        # the standard process_* (memory, CPU, open files), python_gc_* and python_info figures
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        self.http = HttpRequests()
        r.register(self.http)
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
        self.db = await read_db(self.runtime, app.get(ADMIN_STORE), SCRAPE_DB_TIMEOUT_S)


class HttpRequests:
    """`crm_relay_http_requests_total{method,route,status}` and
    `crm_relay_http_request_duration_seconds{method,route}`, the Histogram's default buckets.

    Counted in plain dicts on the request path and rendered as Prometheus families when scraped,
    instead of three locked increments per request on a Counter and a Histogram child
    (tests/unit/test_http_metrics.py: the same exposition). Routes are templates, so the label
    sets are few; past MAX_ROUTE_CHILDREN a new one counts under method "other"."""

    BUCKETS = Histogram.DEFAULT_BUCKETS  # ends with +Inf
    LE = tuple(floatToGoString(b) for b in BUCKETS)  # type: ignore[no-untyped-call]

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = {}
        # (method, route) → per-bucket counts (not cumulative) and, last, the sum of seconds
        self.durations: dict[tuple[str, str], list[float]] = {}

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        key = (method, route, status)
        count = self.counts.get(key)
        if count is None and len(self.counts) >= MAX_ROUTE_CHILDREN:
            key = ("other", route, status)
            count = self.counts.get(key)
        self.counts[key] = (count or 0) + 1
        slots = self.durations.get(key[:2])
        if slots is None:
            slots = self.durations[key[:2]] = [0.0] * (len(self.BUCKETS) + 1)
        slots[bisect.bisect_left(self.BUCKETS, seconds)] += 1
        slots[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "crm_relay_http_requests",
            "HTTP requests answered",
            labels=["method", "route", "status"],
        )
        for (method, route, status), n in list(self.counts.items()):
            requests.add_metric([method, route, str(status)], n)
        yield requests
        latency = HistogramMetricFamily(
            "crm_relay_http_request_duration_seconds",
            "Time to answer an HTTP request",
            labels=["method", "route"],
        )
        for labels, slots in list(self.durations.items()):
            cumulative = list(itertools.accumulate(slots[:-1]))
            buckets = list(zip(self.LE, cumulative, strict=True))
            latency.add_metric(list(labels), buckets, slots[-1])
        yield latency


# --- HTTP middleware ------------------------------------------------------------------------


def _route(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


# made request ids: 16 random hex digits for this process, then a counter (32 hex digits as a
# uuid4's hex, unique across processes and restarts alike, without a uuid4 per request)
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def _request_id(request: web.Request) -> str:
    sent = request.headers.get("X-Request-Id")
    if sent is not None and _REQUEST_ID.match(sent):
        return sent
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


# The amoCRM hook's secret is its path: anything under it is logged as the route template (a
# path that matched no route too: a mistyped secret is still most of the secret).
SECRET_PATHS = (("/webhooks/amocrm/", "/webhooks/amocrm/{secret}"),)
# most requests go to a handful of paths (each form's): each is worked out once; only short
# paths are cached, so strangers' made-up paths cannot fill it (1,024 × 256 characters at most)
_MAX_CACHED_PATH = 256


def _log_form(path: str) -> str:
    """The path as the request log writes it: no secret, phones and emails masked, control
    characters escaped (a percent-encoded CR/LF must not start a forged line)."""
    for prefix, template in SECRET_PATHS:
        if prefix in path:
            return template
    return logs.escape_controls(logs.mask_text(path))


_logged_short_path = functools.lru_cache(maxsize=1024)(_log_form)


def _logged_path(path: str) -> str:
    return _logged_short_path(path) if len(path) <= _MAX_CACHED_PATH else _log_form(path)


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
    m.http.observe(request.method, route, status, seconds)
    # set by the intake and webhook handlers (service.web.reply): nothing to parse here
    rejected, submission_id = request.get(OUTCOME, (False, None))
    path = request.path
    if path.startswith("/webhooks/"):
        m.webhooks[f"{route} {status}"] += 1
    elif rejected:
        m.rejected += 1  # webhook events are not submissions: they count under `webhooks` only
    level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
    if not ACCESS_LOG.isEnabledFor(level):
        return
    path = _logged_path(path)  # never the query string: admin lookups carry phones and emails
    method = request.method
    extra: dict[str, Any] = {
        "action": "http_request",
        "method": method,
        "route": route,
        "path": path,
        "status": status,
        "ms": round(seconds * 1000, 2),
    }
    if submission_id:
        extra["submission_id"] = submission_id
    logs.log_direct(ACCESS_LOG, level, f"{method} {path} {status}", extra)


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
