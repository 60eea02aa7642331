"""Probes: `/healthz` (alive), `/readyz` (can do its job), `/health` (details for people)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from aiohttp import web

from service import __version__
from service.cluster.processes import Cluster, RedisLink, RedisUnavailable, list_processes
from service.db.admin_store import ADMIN_STORE, AdminStore
from service.db.database import pending_migrations
from service.db.event_store import EventStore
from service.delivery.limits import RateGate
from service.delivery.worker import Worker
from service.errors import StoreUnavailable
from service.ops.metrics import METRICS
from service.ops.runtime import RUNTIME, Runtime
from service.web import SETTINGS, answer, arrived_on
from service.webhooks.forwarder import Forwarder

if TYPE_CHECKING:  # webhooks imports intake, as we do; only the type is needed here
    from service.webhooks.handlers import EventIntake


PROBE_TIMEOUT_S = 1.0


async def healthz(request: web.Request) -> web.Response:
    # no I/O: answers fast even when the database or the loop's other work is slow
    return answer({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    """Ready or not, and why not. With OPS_PORT set, the public port answers the bare verdict:
    the reasons (a database error, a host that cannot be reached) are for the internal one."""
    rt = request.app[RUNTIME]
    reasons = await _not_ready(rt)
    body: dict[str, Any] = {"ready": not reasons}
    ops_port = request.app[SETTINGS].http.ops_port
    if ops_port is None or arrived_on(request, ops_port):
        body["reasons"] = reasons
    return answer(body, status=503 if reasons else 200)


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
    return reasons + _stopped_loops(rt)


def _stopped_loops(rt: Runtime) -> list[str]:
    """Background parts this process is meant to run (`serve` without --no-worker) that are not
    running or keep failing, with why: a forwarder that died leaves webhook events stored but
    never forwarded, a failing heartbeat leaves this process no share of the CRM's limit."""
    return [reason for reasons in rt.stopped_parts().values() for reason in reasons]


def _spool(rt: Runtime) -> dict[str, Any] | None:
    """Bytes waiting, the cap, appends refused, quarantined entries; bad input kept or not."""
    if rt.intake is None:
        return None
    spool = rt.intake.spool
    return {
        "bytes": spool.pending_bytes(),
        "max_bytes": spool.max_bytes,
        "refused": spool.refused,
        "quarantined": spool.quarantined,
        "rejected": rt.intake.rejected.counts,
        "disk_low": rt.intake.rejected.disk.low,
    }


async def health(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME]
    reasons = await _not_ready(rt)
    queue = await _queue(rt, request.app.get(ADMIN_STORE))
    probes = await _probes(rt)
    reasons += _degraded(rt, queue, probes, request.app[SETTINGS].alert.lag_s)
    body: dict[str, Any] = {
        "ok": not reasons,
        "reasons": reasons,
        "version": __version__,
        "uptime_s": round(time.time() - rt.started, 1),
        "crm": rt.crm,
        "database": await _database(rt),
        **probes,
        "queue": queue,
        "spool": _spool(rt),
        "intake": rt.intake.counts if rt.intake else None,
        "spam": rt.intake.guard.stats() if rt.intake else None,
        "idempotency_window": rt.intake.window.stats() if rt.intake else None,
        "limiter": _limiter(rt.gate),
        "circuit": {rt.crm: _circuit(rt.gate)} if rt.gate else None,
        "worker": _worker(rt.worker),
        "webhooks": _webhooks(request.app, rt.events),
        "forwarder": _forwarder(rt.forwarder),
        "forward_jobs": await _forward_jobs(rt.event_store),
        "cluster": await _cluster(rt.cluster),
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


def _webhooks(app: web.Application, events: EventIntake | None) -> dict[str, Any]:
    """What webhook intake made of the requests (`intake`) and how they were answered."""
    m = app.get(METRICS)
    return {
        "intake": dict(events.counts) if events is not None else None,
        "answers": dict(m.webhooks) if m is not None else {},
    }


def _forwarder(forwarder: Forwarder | None) -> dict[str, Any] | None:
    if forwarder is None:
        return None
    return {
        "running": forwarder.running,
        "in_flight": len(forwarder.in_flight),
        **forwarder.counts,
    }


async def _forward_jobs(store: EventStore | None) -> dict[str, Any] | None:
    """Outbox counts by kind and state. Only counts: a dead job's destination URL may carry a
    token and /health is unauthenticated (the list is in the admin API and `crm-relay status`)."""
    if store is None:
        return None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            by_kind = await store.counts()
    except (StoreUnavailable, TimeoutError):
        return None
    dead = sum(states.get("dead", 0) for states in by_kind.values())
    return {"by_kind": by_kind, "dead": dead}


async def _cluster(cluster: Cluster | None) -> dict[str, Any] | None:
    """The mode, what it rests on, and the processes beating now."""
    if cluster is None:
        return None
    state = cluster.state()
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_S):
            rows = await list_processes(cluster.members.rows.pool)
        state["processes"] = [r for r in rows if r.live]
    except (StoreUnavailable, TimeoutError):
        state["processes"] = None
    return state


def redis_probe(link: RedisLink) -> Callable[[], Awaitable[dict[str, Any]]]:
    """The `/health` check for REDIS_URL: a ping through the cluster's own link, so between its
    probes a Redis known to be down is reported without another wait."""

    async def probe() -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            await link.call(lambda r: r.ping())
        except RedisUnavailable:
            return {"ok": False, "error": link.last_error or "down", "down_since": link.down_since}
        return {"ok": True, "latency_ms": round((time.perf_counter() - t0) * 1000, 2)}

    return probe


def _limiter(gate: RateGate | None) -> dict[str, Any] | None:
    if gate is None:
        return None
    return {
        "rate": gate.rate,
        "mode": gate.mode,
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
