"""`POST /api/v1/forms/{form}`: every request that reaches it gets a clear 200 answer.

`{"ok": true, "id", "duplicate"}` once the submission is durable (database or spool);
`{"ok": false, "errors": [...]}` for bad input, with the raw request kept; 413 over the size limit.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web

from service.bodies import parse_body
from service.errors import BadInput, FieldError, StoreUnavailable
from service.ingest import Intake
from service.normalize import normalize
from service.settings import Settings

log = logging.getLogger(__name__)

INTAKE = web.AppKey("intake", Intake)
SETTINGS = web.AppKey("settings", Settings)


def answer(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


async def read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None when it is over `limit` bytes (read no further than that)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def too_large(limit: int) -> web.Response:
    return answer(
        {
            "ok": False,
            "errors": [{"field": "body", "message": f"body is larger than {limit} bytes"}],
        },
        status=413,
    )


async def submit_form(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS]
    intake = request.app[INTAKE]
    raw = await read_limited(request, settings.max_body_bytes)
    if raw is None:
        return too_large(settings.max_body_bytes)
    form = request.match_info["form"]
    content_type = request.headers.get("Content-Type")
    try:
        data = parse_body(content_type, raw)
        lead = normalize(form, data, default_region=settings.default_phone_region)
        receipt = await intake.submit(lead, request.headers.get("Idempotency-Key"))
    except BadInput as exc:
        await keep_rejected(intake, f"forms/{form}", content_type, raw, exc.errors)
        return answer({"ok": False, "errors": [e.__dict__ for e in exc.errors]})
    body: dict[str, Any] = {"ok": True, "id": str(receipt.id), "duplicate": receipt.duplicate}
    if receipt.spooled:
        body["spooled"] = True
    return answer(body)


async def keep_rejected(
    intake: Intake, endpoint: str, content_type: str | None, raw: bytes, errors: list[FieldError]
) -> None:
    """Keep what was sent, in the database or else in the spool: bad input is never lost."""
    errs = [e.__dict__ for e in errors]
    try:
        await intake.store.save_rejected(endpoint, content_type, raw, errs)
    except StoreUnavailable:
        await intake.spool.append(
            {
                "type": "rejected",
                "endpoint": endpoint,
                "content_type": content_type,
                "body": raw.decode("latin-1"),
                "errors": errs,
            }
        )


def routes() -> list[web.RouteDef]:
    return [web.post("/api/v1/forms/{form}", submit_form)]
