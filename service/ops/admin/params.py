"""What every admin handler shares: the bearer guard and the readers of query and body values.

`guarded` checks the token in constant time and maps what handlers raise to answers: `BadQuery`
→ 400 naming the field, `StoreUnavailable` → 503.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from service.errors import StoreUnavailable
from service.web import SETTINGS, answer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
MAX_LIMIT = 500


class BadQuery(Exception):
    """A query parameter or body field the admin API cannot use; answered 400."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def guarded(handler: Handler) -> Handler:
    """Bearer-token check (constant time), then the handler; 400/503 for bad input/no database."""

    async def check(request: web.Request) -> web.StreamResponse:
        expected = request.app[SETTINGS].admin.token or ""
        sent = request.headers.get("Authorization", "")
        scheme, _, token = sent.partition(" ")
        # a header that is not UTF-8 arrives with surrogate escapes: its bytes, never a 500
        ok = scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("utf-8", "surrogateescape"), expected.encode()
        )
        if not expected or not ok:
            return web.Response(
                body=orjson.dumps({"ok": False, "error": "unauthorized"}),
                status=401,
                content_type="application/json",
                headers={"WWW-Authenticate": 'Bearer realm="crm-relay admin"'},
            )
        try:
            return await handler(request)
        except BadQuery as exc:
            error = {"field": exc.field, "message": exc.message}
            return answer({"ok": False, "errors": [error]}, status=400)
        except StoreUnavailable as exc:
            return answer({"ok": False, "error": str(exc)}, status=503)

    return check


def is_number(raw: str) -> bool:
    """ASCII digits only: `str.isdigit` also takes "²" and "٣", which `int()` refuses or
    reads as another number."""
    return raw.isascii() and raw.isdigit()


def text_param(params: Any, name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadQuery(name, "must be text")
    return value.strip() or None


def limit_param(request: web.Request, default: int = 50) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not is_number(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadQuery("limit", f"an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def time_param(params: Any, name: str) -> dt.datetime | None:
    """ISO 8601 date or date-time; no zone means UTC."""
    raw = text_param(params, name)
    if raw is None:
        return None
    try:
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery(name, "an ISO 8601 date or date-time, e.g. 2024-05-01T10:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


def choice_param(params: Any, name: str, options: tuple[str, ...]) -> str | None:
    value = text_param(params, name)
    if value is not None and value not in options:
        raise BadQuery(name, f"one of {', '.join(options)}")
    return value


def job_id_param(request: web.Request, name: str = "job_id") -> int:
    raw = request.match_info[name]
    if not is_number(raw) or len(raw) > 18:
        raise BadQuery(name, "an integer")
    return int(raw)


async def json_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadQuery("body", "must be a JSON object") from None
    if not isinstance(data, dict):
        raise BadQuery("body", "must be a JSON object")
    return data
