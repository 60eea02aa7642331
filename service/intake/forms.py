"""`POST /api/v1/forms/{form}`: every request that reaches it gets a clear 200 answer.

`{"ok": true, "id", "duplicate"}` once the submission is durable (database or spool);
`{"ok": false, "errors": [...]}` for bad input, with the raw request kept (`"kept": false` when
the data volume is low or the spool full: service.intake.rejected); 413 over the size limit; 503
with `Retry-After` when the database is away and the spool full (web.spool_full).
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from service.errors import BadInput
from service.intake.bodies import parse_body
from service.intake.ingest import Intake
from service.intake.normalize import normalize
from service.web import SETTINGS, read_limited, reply, too_large

log = logging.getLogger(__name__)

INTAKE = web.AppKey("intake", Intake)
async def submit_form(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS].intake
    intake = request.app[INTAKE]
    form = request.match_info["form"]
    content_type = request.headers.get("Content-Type")
    raw = b""
    try:
        read = await read_limited(request, settings.max_body_bytes)
        if read is None:
            return too_large(settings.max_body_bytes)
        raw = read
        data = parse_body(content_type, raw)
        lead = normalize(form, data, default_region=settings.default_phone_region)
        receipt = await intake.submit(lead, request.headers.get("Idempotency-Key"))
    except BadInput as exc:
        kept = await intake.rejected.keep(f"forms/{form}", content_type, raw, exc.errors)
        refused: dict[str, Any] = {"ok": False, "errors": [e.__dict__ for e in exc.errors]}
        if not kept:
            refused["kept"] = False  # the data volume is low or the spool full: not kept
        return reply(request, refused)
    body: dict[str, Any] = {"ok": True, "id": str(receipt.id), "duplicate": receipt.duplicate}
    if receipt.spooled:
        body["spooled"] = True
    return reply(request, body)


def routes() -> list[web.RouteDef]:
    return [web.post("/api/v1/forms/{form}", submit_form)]
