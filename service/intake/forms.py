"""`POST /api/v1/forms/{form}`: every request that reaches it gets a clear 200 answer.

`{"ok": true, "id", "duplicate"}` once the submission is durable (database or spool);
`{"ok": false, "errors": [...]}` for bad input, with the raw request kept; 413 over the size limit.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from service.errors import BadInput, FieldError, StoreUnavailable
from service.intake.bodies import parse_body
from service.intake.ingest import Intake
from service.intake.normalize import normalize
from service.settings import Settings

log = logging.getLogger(__name__)

INTAKE = web.AppKey("intake", Intake)
SETTINGS = web.AppKey("settings", Settings)


# (rejected?, submission id) of an intake or webhook answer, for the request log and metrics
OUTCOME = web.RequestKey("outcome", tuple[bool, str | None])


def answer(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def reply(request: web.Request, data: dict[str, Any], status: int = 200) -> web.Response:
    """`answer`, noting its outcome on the request so the middleware need not parse the body."""
    sid = data.get("id")
    request[OUTCOME] = (data.get("ok") is False, sid if isinstance(sid, str) else None)
    return answer(data, status)


class _ClientProtocolErrors(logging.Filter):
    """aiohttp logs a client's malformed request at ERROR: a body whose Content-Encoding does not
    decode (it answers 400 itself, or our handler answers and its lingering close meets the same
    error again). The client got a 4xx or our answer; nothing failed on our side, so these
    records are kept at INFO, where they do not look like our own faults."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RequestPayloadError | HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


CLIENT_PROTOCOL_ERRORS = _ClientProtocolErrors()


def quiet_client_protocol_errors() -> None:
    """Put `CLIENT_PROTOCOL_ERRORS` on aiohttp's server logger. Called by create_app, not done
    at import: importing a module must not change logging for the whole process. Calling it
    again changes nothing (a logger keeps one of each filter)."""
    logging.getLogger("aiohttp.server").addFilter(CLIENT_PROTOCOL_ERRORS)


class UnreadableBody(BadInput):
    """The body could not be read as sent (e.g. a Content-Encoding that does not decode)."""


async def read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None when it is over `limit` bytes (read no further than that).

    Raises UnreadableBody when aiohttp cannot decode the transfer (bad gzip/deflate/br)."""
    length = request.content_length
    if length is not None and length > limit:
        return None
    chunks, size = [], 0
    try:
        if length is not None and "Content-Encoding" not in request.headers:
            return await request.read()  # no more than Content-Length bytes are ever read
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
    except RequestPayloadError as exc:
        encoding = request.headers.get("Content-Encoding", "")
        message = f"body could not be decoded (Content-Encoding {encoding!r}): {exc}"
        raise UnreadableBody([FieldError("body", message[:300])]) from None
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
        await keep_rejected(intake, f"forms/{form}", content_type, raw, exc.errors)
        return reply(request, {"ok": False, "errors": [e.__dict__ for e in exc.errors]})
    body: dict[str, Any] = {"ok": True, "id": str(receipt.id), "duplicate": receipt.duplicate}
    if receipt.spooled:
        body["spooled"] = True
    return reply(request, body)


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
