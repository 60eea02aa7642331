"""What every HTTP handler shares: the settings key, JSON answers and reading a bounded body.

Room-specific keys (the intake, the stores, the runtime) live with their rooms; these are the
ones every room's handlers use, so they sit below all of them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from aiohttp.web_protocol import RequestPayloadError

from service.errors import BadInput, FieldError, SpoolFull
from service.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
# host:pid:random, made once per process by the app (cluster.processes.process_name): the lease
# owner, the connections' application_name, and who paused delivery or said an alert
PROCESS_NAME = web.AppKey("process_name", str)


# (rejected?, submission id) of an intake or webhook answer, for the request log and metrics
OUTCOME = web.RequestKey("outcome", tuple[bool, str | None])


# With OPS_PORT set, what is served on that internal port alone; the probes on both ports (a
# load balancer may check the public one), forms and webhooks on the public port alone.
PROBES = frozenset({"/healthz", "/readyz"})
OPS_PATHS = frozenset({"/health", "/metrics", "/admin"})
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_ops_path(path: str) -> bool:
    return path in OPS_PATHS or path.startswith("/admin/")


def arrived_on(request: web.Request, port: int) -> bool:
    """Whether the request came in on `port`: the connection's own local port, not a header."""
    transport = request.transport
    local = transport.get_extra_info("sockname") if transport is not None else None
    return isinstance(local, tuple) and len(local) >= 2 and local[1] == port


def split_ports(ops_port: int) -> Middleware:
    """A middleware: 404 for an ops path on the public port and for anything else but the
    probes on `ops_port`."""

    @web.middleware
    async def split(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path not in PROBES and arrived_on(request, ops_port) != is_ops_path(path):
            raise web.HTTPNotFound()
        return await handler(request)

    return split


def answer(data: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def reply(request: web.Request, data: dict[str, Any], status: int = 200) -> web.Response:
    """`answer`, noting its outcome on the request so the middleware need not parse the body."""
    sid = data.get("id")
    request[OUTCOME] = (data.get("ok") is False, sid if isinstance(sid, str) else None)
    return answer(data, status)


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


SPOOL_FULL_RETRY_AFTER_S = 30


@web.middleware
async def spool_full(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Work that could only go to the spool, and the spool is full (or its volume refuses the
    write): 503 with `Retry-After`, nothing acknowledged. Senders retry; nothing is lost."""
    try:
        return await handler(request)
    except SpoolFull as exc:
        response = answer(
            {
                "ok": False,
                "retry": True,
                "errors": [{"field": "service", "message": f"try again later: {exc}"}],
            },
            status=503,
        )
        response.headers["Retry-After"] = str(SPOOL_FULL_RETRY_AFTER_S)
        return response


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
