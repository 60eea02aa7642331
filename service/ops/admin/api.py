"""The admin API under `/admin/api` (bearer `ADMIN_TOKEN`), its OpenAPI text and the dashboard.

With no `ADMIN_TOKEN` configured none of these routes exist (404): an admin API that anyone can
call is worse than none. The token is compared in constant time. Everything a handler needs
comes from the app: the admin repository, the runtime parts (worker, intake) and lock sources.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Any

from aiohttp import web

from service import __version__
from service.cluster.processes import list_processes
from service.db.admin_store import ADMIN_STORE, AdminStore, DeadFilter, SubmissionQuery
from service.delivery.control import DELIVERY_CONTROL
from service.errors import BadInput, FieldError
from service.intake.normalize import normalize_email, normalize_phone
from service.ops.admin import panels as admin_panels
from service.ops.admin import privacy as admin_privacy
from service.ops.admin import webhooks as admin_webhooks
from service.ops.admin.dashboard import dashboard
from service.ops.admin.locks import (
    LOCK_SOURCES,
    ClusterPersonLocks,
    LockRefused,
    LockSource,
    PersonLeases,
    ProcessLocks,
)
from service.ops.admin.openapi import spec
from service.ops.admin.params import (
    BadQuery,
    choice_param,
    guarded,
    is_number,
    job_id_param,
    json_body,
    limit_param,
    text_param,
    time_param,
)
from service.ops.runtime import RUNTIME
from service.web import PROCESS_NAME, SETTINGS, answer

log = logging.getLogger(__name__)

JOB_STATES = ("pending", "running", "done", "dead")
SUBMISSION_STATES = ("pending", "delivered", "dead")


def _identities(request: web.Request) -> list[str] | None:
    """phone / email query parameters normalised exactly as intake stores them."""
    region = request.app[SETTINGS].intake.default_phone_region
    found = []
    try:
        if phone := text_param(request.query, "phone"):
            found.append(f"phone:{normalize_phone(phone, region)}")
        if email := text_param(request.query, "email"):
            found.append(f"email:{normalize_email(email)}")
    except BadInput as exc:
        error: FieldError = exc.errors[0]
        raise BadQuery(error.field, error.message) from None
    return found or None


def _dead_filter(params: Any) -> DeadFilter:
    return DeadFilter(
        form=text_param(params, "form"),
        error=text_param(params, "error"),
        since=time_param(params, "since"),
        until=time_param(params, "until"),
    )


def _store(request: web.Request) -> AdminStore:
    return request.app[ADMIN_STORE]


# --- handlers -------------------------------------------------------------------------------


async def submissions(request: web.Request) -> web.Response:
    q = request.query
    query = SubmissionQuery(
        identities=_identities(request),
        form=text_param(q, "form"),
        since=time_param(q, "since"),
        until=time_param(q, "until"),
        state=choice_param(q, "state", SUBMISSION_STATES),
        limit=limit_param(request),
    )
    items = await _store(request).find_submissions(query)
    template = admin_panels.lead_url_template(request.app[SETTINGS].crm)
    for item in items:
        item["crm_lead_url"] = admin_panels.lead_url(template, item.get("crm_lead_id"))
    return answer({"ok": True, "submissions": items})


async def jobs(request: web.Request) -> web.Response:
    state = choice_param(request.query, "state", JOB_STATES)
    items = await _store(request).jobs(state, limit_param(request))
    return answer({"ok": True, "jobs": items})


async def dead_letters(request: web.Request) -> web.Response:
    f = _dead_filter(request.query)
    items = await _store(request).dead_letters(f, limit_param(request))
    return answer({"ok": True, "dead_letters": items})


async def replay_one(request: web.Request) -> web.Response:
    job_id = job_id_param(request)
    if not await _store(request).replay_one(job_id):
        return answer({"ok": False, "error": f"job {job_id} is not a dead letter"}, status=404)
    log.info("dead letter replayed", extra={"action": "admin_replay", "job_id": job_id})
    return answer({"ok": True, "replayed": [job_id]})


async def replay_many(request: web.Request) -> web.Response:
    body = await json_body(request)
    f = _dead_filter(body)
    if f.is_empty() and body.get("all") is not True:
        raise BadQuery("body", 'give form, error, since or until, or {"all": true}')
    replayed = await _store(request).replay_matching(f)
    log.info(
        "dead letters replayed",
        extra={"action": "admin_replay", "jobs": len(replayed), "filter": asdict(f)},
    )
    return answer({"ok": True, "replayed": replayed})


async def discard(request: web.Request) -> web.Response:
    job_id = job_id_param(request)
    note = text_param(await json_body(request), "note") or ""
    if not await _store(request).discard(job_id, note):
        return answer(
            {"ok": False, "error": f"job {job_id} is not an undiscarded dead letter"}, status=404
        )
    log.info("dead letter discarded", extra={"action": "admin_discard", "job_id": job_id})
    return answer({"ok": True, "discarded": job_id})


async def locks(request: web.Request) -> web.Response:
    out = {}
    for source in request.app[LOCK_SOURCES]:
        out[source.name] = await source.held()
    return answer({"ok": True, "locks": out})


async def release_lock(request: web.Request) -> web.Response:
    name, key = request.match_info["source"], request.match_info["key"]
    source = next((s for s in request.app[LOCK_SOURCES] if s.name == name), None)
    if source is None:
        return answer({"ok": False, "error": f"no lock source {name!r}"}, status=404)
    try:
        released = await source.release(key)
    except LockRefused as exc:
        return answer({"ok": False, "error": str(exc)}, status=409)
    if not released:
        return answer({"ok": False, "error": f"{name} lock {key!r} is not held"}, status=404)
    log.warning(
        "lock force-released", extra={"action": "admin_release_lock", "source": name, "key": key}
    )
    return answer({"ok": True, "released": {"source": name, "key": key}})


def _delivery_state(request: web.Request) -> dict[str, Any]:
    worker = request.app[RUNTIME].worker
    return {
        "worker": worker is not None,  # whether this process runs one
        "running": bool(worker and worker.running),
        **request.app[DELIVERY_CONTROL].state(),  # paused, by whom, when: for the cluster
    }


async def delivery(request: web.Request) -> web.Response:
    await request.app[DELIVERY_CONTROL].read()
    return answer({"ok": True, **_delivery_state(request)})


async def pause(request: web.Request) -> web.Response:
    return await _set_paused(request, True)


async def resume(request: web.Request) -> web.Response:
    return await _set_paused(request, False)


async def _set_paused(request: web.Request, paused: bool) -> web.Response:
    """Every process's delivery, whichever process is asked (service/delivery/control.py)."""
    by = f"admin@{request.app[PROCESS_NAME]}"
    await request.app[DELIVERY_CONTROL].set(paused, by)
    action = "delivery_paused" if paused else "delivery_resumed"
    log.warning(
        "delivery %s by an operator for the cluster", action.split("_")[1], extra={"action": action}
    )
    return answer({"ok": True, **_delivery_state(request)})


async def overview(request: web.Request) -> web.Response:
    """The dashboard's header: queue, dead letters, worker, circuit, the CRM rate gate."""
    rt = request.app[RUNTIME]
    queue = asdict(await rt.store.queue_counts()) if rt.store else None
    gate = rt.gate
    return answer(
        {
            "ok": True,
            "version": __version__,
            "queue": queue,
            "dead_letters": await _store(request).dead_letter_count(),
            "delivery": _delivery_state(request),
            "delivered": rt.worker.delivered if rt.worker else None,
            "circuit": {"open": gate.circuit.is_open, "reason": gate.circuit.reason}
            if gate
            else None,
            "crm": admin_panels.crm_gate(request),
        }
    )


async def timeline(request: web.Request) -> web.Response:
    raw = request.query.get("minutes", "60")
    if not is_number(raw) or not 1 <= int(raw) <= 1440:
        raise BadQuery("minutes", "an integer from 1 to 1440")
    points = await _store(request).timeline(int(raw))
    return answer({"ok": True, "points": points})


async def processes(request: web.Request) -> web.Response:
    """Every process that beat in the last day (live or not), and this one's view of the mode."""
    rt = request.app[RUNTIME]
    if rt.store is None or rt.cluster is None:
        return answer({"ok": False, "error": "cluster not running"}, status=503)
    rows = await list_processes(rt.store.pool)  # StoreUnavailable: guarded answers 503
    return answer({"ok": True, "cluster": rt.cluster.state(), "processes": rows})


async def spool(request: web.Request) -> web.Response:
    """This host's spool: bytes waiting and the cap; the quarantined entries (newest first),
    each with when, why and its start; bad input kept, spooled and not kept."""
    rt = request.app[RUNTIME]
    limit = limit_param(request)
    if rt.intake is None:
        return answer({"ok": False, "error": "intake not running"}, status=503)
    s, rejected = rt.intake.spool, rt.intake.rejected
    quarantined = await asyncio.to_thread(s.quarantined_entries, limit)
    return answer(
        {
            "ok": True,
            "pending_bytes": s.pending_bytes(),
            "max_bytes": s.max_bytes,
            "refused": s.refused,
            "quarantine_bytes": s.quarantine_bytes(),
            "quarantine_days": s.quarantine_days,
            "quarantined": quarantined,
            "rejected": rejected.counts,
            "disk": {
                "free_bytes": rejected.disk.free_bytes,
                "min_free_bytes": rejected.disk.min_free_bytes,
                "low": rejected.disk.low,
            },
        }
    )


async def openapi(request: web.Request) -> web.Response:
    return answer(spec(__version__))


async def to_dashboard(request: web.Request) -> web.Response:
    raise web.HTTPFound("/admin/")


# --- wiring ---------------------------------------------------------------------------------


async def admin_ctx(app: web.Application) -> AsyncIterator[None]:
    """The admin repository and the lock sources (a Redis lock source appends itself here)."""
    rt = app[RUNTIME]
    assert rt.store is not None, "admin_ctx runs after database_ctx"
    store = app[ADMIN_STORE] = AdminStore(rt.store.pool)
    intake = rt.intake
    sources: list[LockSource] = [ProcessLocks(intake.locks if intake else None)]
    app[LOCK_SOURCES] = [*sources, PersonLeases(store), ClusterPersonLocks(rt.store.pool)]
    yield


def routes(enabled: bool) -> list[web.RouteDef]:
    """Every admin route, or none when no ADMIN_TOKEN is configured."""
    if not enabled:
        return []
    api = "/admin/api"
    return [
        *admin_webhooks.routes(api),
        *admin_privacy.routes(api),
        *admin_panels.routes(api),
        web.get("/admin", to_dashboard),
        web.get("/admin/", dashboard),
        web.get("/admin/openapi.json", openapi),
        web.get(f"{api}/overview", guarded(overview)),
        web.get(f"{api}/timeline", guarded(timeline)),
        web.get(f"{api}/submissions", guarded(submissions)),
        web.get(f"{api}/jobs", guarded(jobs)),
        web.get(f"{api}/dead-letters", guarded(dead_letters)),
        web.post(f"{api}/dead-letters/replay", guarded(replay_many)),
        web.post(f"{api}/dead-letters/{{job_id}}/replay", guarded(replay_one)),
        web.post(f"{api}/dead-letters/{{job_id}}/discard", guarded(discard)),
        web.get(f"{api}/locks", guarded(locks)),
        web.delete(f"{api}/locks/{{source}}/{{key:.+}}", guarded(release_lock)),
        web.get(f"{api}/delivery", guarded(delivery)),
        web.post(f"{api}/delivery/pause", guarded(pause)),
        web.post(f"{api}/delivery/resume", guarded(resume)),
        web.get(f"{api}/processes", guarded(processes)),
        web.get(f"{api}/spool", guarded(spool)),
    ]
