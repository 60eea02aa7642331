"""`POST /api/v1/forms/{form}`: every request that reaches it gets a clear 200 answer.

`{"ok": true, "id", "duplicate"}` once the submission is durable (database or spool);
`{"ok": false, "errors": [...]}` for bad input, with the raw request kept (`"kept": false` when
the data volume is low or the spool full: service.intake.rejected); 413 over the size limit; 503
with `Retry-After` when the database is away and the spool full (web.spool_full).
A submission the form's spam controls catch (service.intake.spam) is stored as spam and answered
exactly as a real one is.

Tilda posts every form of a site to one webhook URL, urlencoded, with `tranid` (one id per
submission: our idempotency key when no `Idempotency-Key` header is sent, so Tilda's own retries
are duplicates) and `formid` (kept with the other fields). When the hook is connected it posts
`test=test` alone and wants 200: that request is answered `ok` and stored nowhere
(help-ru.tilda.cc/formsscript: "test=test (POST) … expects 200 OK"; the fields: the Tilda
webhook format, Kommo + Tilda integration notes).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from service.errors import BadInput
from service.intake.bodies import parse_body
from service.intake.ingest import Intake
from service.intake.normalize import normalize
from service.intake.spam import take_controls
from service.web import SETTINGS, read_limited, reply, too_large

log = logging.getLogger(__name__)

INTAKE = web.AppKey("intake", Intake)


async def submit_form(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS].intake
    spam_rule = request.app[SETTINGS].leads.spam_rule
    intake = request.app[INTAKE]
    form = request.match_info["form"]
    content_type = request.headers.get("Content-Type")
    raw = b""
    data: dict[str, Any] = {}
    try:
        read = await read_limited(request, settings.max_body_bytes)
        if read is None:
            return too_large(settings.max_body_bytes)
        raw = read
        data = parse_body(content_type, raw)
        rule = spam_rule(form)
        data, controls = take_controls(rule, data)
        lead = normalize(form, data, default_region=settings.default_phone_region)
        header_key = request.headers.get("Idempotency-Key") or tilda_key(data)
        reason = client = None
        if rule.active:
            guard = intake.guard
            client = guard.client(request.remote, request.headers.get("X-Forwarded-For"))
            reason = await guard.reason(lead.form, rule, controls, client)
        if reason is None:
            receipt = await intake.submit(lead, header_key)
        else:
            receipt = await intake.keep_spam(lead, header_key, reason, client)
    except BadInput as exc:
        if is_tilda_test(data):
            return web.Response(text="ok")
        kept = await intake.rejected.keep(f"forms/{form}", content_type, raw, exc.errors)
        refused: dict[str, Any] = {"ok": False, "errors": [e.__dict__ for e in exc.errors]}
        if not kept:
            refused["kept"] = False  # the data volume is low or the spool full: not kept
        return reply(request, refused)
    body: dict[str, Any] = {"ok": True, "id": str(receipt.id), "duplicate": receipt.duplicate}
    if receipt.spooled:
        body["spooled"] = True
    return reply(request, body)


def tilda_key(data: dict[str, Any]) -> str | None:
    """A Tilda submission's idempotency key: its `tranid`, one per submission."""
    tranid = data.get("tranid")
    return f"tilda:{tranid.strip()}" if isinstance(tranid, str) and tranid.strip() else None


def is_tilda_test(data: dict[str, Any]) -> bool:
    """Tilda's request when a webhook is connected: `test=test`, no contact (it is checked only
    for a submission without a usable one, so a real lead that carries `test` is still a lead)."""
    return data.get("test") == "test"


def routes() -> list[web.RouteDef]:
    return [web.post("/api/v1/forms/{form}", submit_form)]
