"""Probes: `/healthz` (alive), `/readyz` (can do its job), `/health` (details for people)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from aiohttp import web

from service import __version__
from service.admin_store import ADMIN_STORE, AdminStore
from service.database import pending_migrations
from service.errors import StoreUnavailable
from service.ingest import Intake
from service.intake import SETTINGS, answer
from service.limits import RateGate
from service.metrics import METRICS
from service.store import Store
from service.worker import Worker


@dataclass
class Runtime:
    """What the probes look at; filled in by the app's cleanup contexts as parts start."""

    started: float = field(default_factory=time.time)
    store: Store | None = None
    intake: Intake | None = None
    gate: RateGate | None = None
    worker: Worker | None = None
    worker_expected: bool = True
    shutting_down: bool = False
    crm: str = ""
    # more named checks for /health, e.g. "redis" when REDIS_URL is set; {"ok": False, ...}
    # from one makes /health answer 503
    probes: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = field(default_factory=dict)


RUNTIME = web.AppKey("runtime", Runtime)
PROBE_TIMEOUT_S = 1.0


async def healthz(request: web.Request) -> web.Response:
    # no I/O: answers fast even when the database or the loop's other work is slow
    return answer({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    reasons = await _not_ready(rt)
    return answer({"ready": not reasons, "reasons": reasons}, status=503 if reasons else 200)


async def _not_ready(rt: Runtime) -> list[str]:
    if rt.shutting_down:
        return ["shutting down"]
    reasons = []
    if rt.store is None:
        return ["database not connected"]
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S), rt.store.pool.acquire() as conn:
            if missing := await pending_migrations(conn):
                reasons.append(f"migrations not applied: {', '.join(missing)}")
    except (StoreUnavailable, OSError, TimeoutError, Exception) as exc:
        reasons.append(f"database unreachable: {exc.__class__.__name__}")
    if rt.worker_expected and (rt.worker is None or not rt.worker.running):
        reasons.append("worker not running")
    return reasons


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    reasons = await _not_ready(rt)
    queue = await _queue(rt, request.app.get(ADMIN_STORE))
    probes = await _probes(rt)
    reasons += _degraded(rt, queue, probes, request.app[SETTINGS].alert_lag_s)
    body: dict[str, Any] = {
        "ok": not reasons,
        "reasons": reasons,
        "version": __version__,
        "uptime_s": round(time.time() - rt.started, 1),
        "crm": rt.crm,
        "database": await _database(rt),
        **probes,
        "queue": queue,
        "spool": {"bytes": rt.intake.spool.pending_bytes()} if rt.intake else None,
        "intake": rt.intake.counts if rt.intake else None,
        "idempotency_window": rt.intake.window.stats() if rt.intake else None,
        "limiter": _limiter(rt.gate),
        "circuit": {rt.crm: _circuit(rt.gate)} if rt.gate else None,
        "worker": _worker(rt.worker),
        "webhooks": _webhooks(request.app),
    }
    return answer(body, status=503 if reasons else 200)


async def _database(rt: Runtime) -> dict[str, Any]:
    if rt.store is None:
        return {"ok": False}
    t0 = time.perf_counter()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            await rt.store.ping()
    except (StoreUnavailable, TimeoutError) as exc:
        return {"ok": False, "error": exc.__class__.__name__}
    pool = rt.store.pool
    return {
        "ok": True,
        "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
        "pool_size": pool.get_size(),
        "pool_idle": pool.get_idle_size(),
        "pool_in_use": pool.get_size() - pool.get_idle_size(),
        "pool_max": pool.get_max_size(),
    }


async def _queue(rt: Runtime, admin: AdminStore | None = None) -> dict[str, Any] | None:
    if rt.store is None:
        return None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            queue = asdict(await rt.store.queue_counts())
            if admin is not None:
                queue["dead_letters"] = await admin.dead_letter_count()  # dead, not discarded
            return queue
    except (StoreUnavailable, TimeoutError):
        return None


async def _probes(rt: Runtime) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, probe in rt.probes.items():
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                out[name] = await probe()
        except Exception as exc:  # a probe's failure is its answer, not a 500
            out[name] = {"ok": False, "error": exc.__class__.__name__}
    return out


def _degraded(
    rt: Runtime, queue: dict[str, Any] | None, probes: dict[str, Any], lag_s: float
) -> list[str]:
    """Why the service is alive and ready but not healthy: operators should look."""
    reasons = [f"{name} unreachable" for name, p in probes.items() if not p.get("ok", True)]
    if rt.gate is not None and rt.gate.circuit.is_open:
        reasons.append(f"crm circuit open: {rt.gate.circuit.reason}")
    age = (queue or {}).get("oldest_due_age_s") or 0.0
    if age > lag_s:
        reasons.append(f"delivery lag {age:.0f} s over {lag_s:.0f} s")
    return reasons


def _circuit(gate: RateGate) -> dict[str, Any]:
    return {"open": gate.circuit.is_open, "reason": gate.circuit.reason}


def _webhooks(app: web.Application) -> dict[str, int]:
    m = app.get(METRICS)
    return dict(m.webhooks) if m is not None else {}


def _limiter(gate: RateGate | None) -> dict[str, Any] | None:
    if gate is None:
        return None
    return {
        "rate": gate.rate,
        "observed_rate_1m": round(gate.observed_rate(), 3),
        "paused_for_s": round(max(0.0, gate.paused_until - time.monotonic()), 2),
        "circuit": {"open": gate.circuit.is_open, "reason": gate.circuit.reason},
    }


def _worker(worker: Worker | None) -> dict[str, Any] | None:
    if worker is None:
        return None
    return {
        "running": worker.running,
        "paused": worker.paused,
        "in_flight_people": len(worker.in_flight),
        "delivered": worker.delivered,
        "last_success": worker.last_success,
        "last_failure": worker.last_failure,
    }


def routes() -> list[web.RouteDef]:
    return [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/health", health)]
