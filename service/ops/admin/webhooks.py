"""The admin API's webhook side: dead forward jobs (list, replay) and where our leads stand.

Routes are mounted by `admin.api.routes` under the same bearer guard (`admin.params`). Forward
jobs are the outbox of stored webhook events (`webhooks.forwarder`); a dead one is replayed
with a fresh attempt budget, like a dead delivery job.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

from aiohttp import web

from service.db.admin_store import json_ready
from service.db.event_store import EventStore
from service.errors import StoreUnavailable
from service.ops.admin import params
from service.ops.runtime import RUNTIME
from service.web import SETTINGS, answer

log = logging.getLogger(__name__)

LEAD_STATE_CRMS = ("amocrm", "bitrix24")


def _events(request: web.Request) -> EventStore:
    store = request.app[RUNTIME].event_store
    if store is None:
        raise StoreUnavailable("webhook event store not running")  # params.guarded answers 503
    return store


def _ids(body: dict[str, Any]) -> list[int] | None:
    """`{"ids": [..]}` → those ids; `{"all": true}` → None (every dead forward job)."""
    ids = body.get("ids")
    if ids is None:
        if body.get("all") is not True:
            raise params.BadQuery("body", 'give {"ids": [job ids]} or {"all": true}')
        return None
    if not isinstance(ids, list) or not ids or not all(_is_id(i) for i in ids):
        raise params.BadQuery("ids", "a non-empty list of job ids")
    return [int(i) for i in ids]


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


async def forward_dead_letters(request: web.Request) -> web.Response:
    items = await _events(request).dead_jobs(params.limit_param(request))
    return answer({"ok": True, "forward_dead_letters": [json_ready(i) for i in items]})


async def replay_forwards(request: web.Request) -> web.Response:
    ids = _ids(await params.json_body(request))
    n = await _events(request).replay(ids)
    log.info("dead forward jobs replayed", extra={"action": "admin_replay_forwards", "jobs": n})
    return answer({"ok": True, "replayed": n})


async def replay_forward(request: web.Request) -> web.Response:
    job_id = params.job_id_param(request)
    if not await _events(request).replay([job_id]):
        return answer({"ok": False, "error": f"forward job {job_id} is not dead"}, status=404)
    log.info(
        "dead forward job replayed", extra={"action": "admin_replay_forwards", "job_id": job_id}
    )
    return answer({"ok": True, "replayed": 1})


async def lead_states(request: web.Request) -> web.Response:
    """Our delivered submissions and where their leads stand now, as the CRM's webhooks say."""
    configured = request.app[SETTINGS].crm.kind
    # the simulator is an amoCRM: its lead records are amoCRM's
    default = "bitrix24" if configured == "bitrix24" else "amocrm"
    crm = params.choice_param(request.query, "crm", LEAD_STATE_CRMS) or default
    states = await _events(request).submitted_lead_states(crm, params.limit_param(request))
    return answer({"ok": True, "crm": crm, "lead_states": [json_ready(asdict(s)) for s in states]})


def routes(api: str) -> list[web.RouteDef]:
    return [
        web.get(f"{api}/forward-dead-letters", params.guarded(forward_dead_letters)),
        web.post(f"{api}/forward-dead-letters/replay", params.guarded(replay_forwards)),
        web.post(f"{api}/forward-dead-letters/{{job_id}}/replay", params.guarded(replay_forward)),
        web.get(f"{api}/lead-states", params.guarded(lead_states)),
    ]
