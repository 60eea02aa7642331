"""The admin API's read-only views behind the dashboard's panels: rejected input, webhook
events in and forwards out, per-form counts for the day, the CRM rate gate, and the CRM's own
page of a lead.

Routes are mounted by `admin.api.routes` under the same bearer guard (`admin.params`); every
list is bounded by `limit` (at most `params.MAX_LIMIT`).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from service.db.admin_store import ADMIN_STORE, AdminStore
from service.ops.admin import params
from service.ops.runtime import RUNTIME
from service.settings import CrmSettings
from service.web import SETTINGS, answer

FORWARD_STATES = ("pending", "running", "done", "dead")
RATE_WINDOW_S = 10.0  # the dashboard's "calls per second now": the last ten seconds


def _origin(url: str | None) -> str | None:
    """`https://host[:port]` of a configured URL: never its path, query or user info (a
    Bitrix24 webhook URL carries its secret in the path); None unless http(s)."""
    if not url:
        return None
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}"


def lead_url_template(crm: CrmSettings) -> str | None:
    """The CRM's page of one lead with `{id}` for the lead id, built from the configured base
    URL: an amoCRM/Kommo lead, a Bitrix24 deal; None for the simulator or an unknown base."""
    if crm.kind == "amocrm":
        base = crm.amocrm.base_url and crm.amocrm.base_url.rstrip("/")
        origin = _origin(base)
        return f"{base}/leads/detail/{{id}}" if base and origin else None
    if crm.kind == "bitrix24":
        b24 = crm.bitrix24
        origin = _origin(b24.portal_url) or _origin(b24.webhook_url)
        return f"{origin}/crm/deal/details/{{id}}/" if origin else None
    return None


def lead_url(template: str | None, lead_id: Any) -> str | None:
    if template is None or not isinstance(lead_id, int):
        return None
    return template.replace("{id}", str(lead_id))


def _destination(url: str) -> str:
    """A forward destination without user info or query string (either may hold a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else url[:100]


def _names_a_lead(crm: str, source: str, kind: str) -> bool:
    """Whether an event's entity is a lead (deal) of the configured CRM: amoCRM's `leads.*`,
    Bitrix24's `oncrmdeal*` (a contact's id is not a lead's)."""
    if source != crm:
        return False
    return kind.startswith("leads.") if crm == "amocrm" else kind.lower().startswith("oncrmdeal")


def crm_gate(request: web.Request) -> dict[str, Any] | None:
    """This process's view of the CRM rate gate: calls per second now against the limit, the
    pause a 429 started, the circuit."""
    rt = request.app[RUNTIME]
    gate = rt.gate
    if gate is None:
        return None
    now = time.monotonic()
    circuit = gate.circuit
    return {
        "kind": request.app[SETTINGS].crm.kind,
        "limit": gate.rate,
        "rate": round(gate.observed_rate(RATE_WINDOW_S), 2),
        "rate_window_s": RATE_WINDOW_S,
        "mode": gate.mode,
        "waiting": gate.waiting,
        "paused_for_s": round(max(0.0, gate.paused_until - now), 1),
        "circuit": {
            "open": circuit.is_open,
            "reason": circuit.reason or None,
            "probe_in_s": round(max(0.0, circuit.open_until - now), 1) if circuit.is_open else None,
        },
        "lead_url": lead_url_template(request.app[SETTINGS].crm),
    }


def _store(request: web.Request) -> AdminStore:
    return request.app[ADMIN_STORE]


async def rejected(request: web.Request) -> web.Response:
    items = await _store(request).rejected(params.limit_param(request))
    return answer({"ok": True, "rejected": items})


async def webhook_events(request: web.Request) -> web.Response:
    items = await _store(request).webhook_events(params.limit_param(request))
    crm = request.app[SETTINGS].crm
    template = lead_url_template(crm)
    for item in items:
        for f in item["forwards"]:
            f["destination"] = _destination(f["destination"])
        entity = item["entity_id"]
        ours = _names_a_lead(crm.kind, item["source"], item["kind"])
        number = isinstance(entity, str) and params.is_number(entity) and len(entity) < 19
        item["crm_lead_url"] = lead_url(template, int(entity) if ours and number else None)
    return answer({"ok": True, "events": items})


async def forwards(request: web.Request) -> web.Response:
    state = params.choice_param(request.query, "state", FORWARD_STATES)
    items = await _store(request).forwards(state, params.limit_param(request))
    for item in items:
        item["destination"] = _destination(item["destination"])
    return answer({"ok": True, "forwards": items})


async def forms_today(request: web.Request) -> web.Response:
    """Per form since the start of today (UTC), or since `since`."""
    since = params.time_param(request.query, "since")
    if since is None:
        since = dt.datetime.now(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    items = await _store(request).form_counts(since, params.limit_param(request))
    return answer({"ok": True, "since": since.isoformat(), "forms": items})


def routes(api: str) -> list[web.RouteDef]:
    return [
        web.get(f"{api}/rejected", params.guarded(rejected)),
        web.get(f"{api}/webhook-events", params.guarded(webhook_events)),
        web.get(f"{api}/forwards", params.guarded(forwards)),
        web.get(f"{api}/forms/today", params.guarded(forms_today)),
    ]
