"""How the simulated portal reads a REST request and writes its answers: parameters from the
query string and the body, Bitrix24's error shape, and `fail_next` answers in that shape."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from service.errors import BadInput
from service.intake.bodies import parse_nested_pairs
from service.simulators.bitrix24.entities import BitrixFault
from service.simulators.common import ScriptedAnswer, json_answer, server_error

__all__ = ["error_answer", "request_params", "scripted_response"]

# The error code a scripted 4xx without a body answers with.
_SCRIPTED_CODES = {
    401: "INVALID_CREDENTIALS",
    403: "ACCESS_DENIED",
    404: "ERROR_METHOD_NOT_FOUND",
    429: "OPERATION_TIME_LIMIT",
}


def error_answer(status: int, code: str, description: str) -> web.Response:
    """Bitrix24's error shape: `{"error": code, "error_description": description}`."""
    return json_answer({"error": code, "error_description": description}, status)


def scripted_response(answer: ScriptedAnswer) -> web.Response:
    """A `fail_next` answer: its own body, a gateway's 5xx, or a Bitrix24 error for its status."""
    if answer.body is not None:
        return json_answer(answer.body, answer.status)
    if answer.status >= 500:
        return server_error(answer.status)
    code = _SCRIPTED_CODES.get(answer.status, "ERROR_CORE")
    return error_answer(answer.status, code, "Scripted")


async def request_params(request: web.Request) -> dict[str, Any]:
    """Query string merged with the body (JSON or urlencoded with PHP-style keys)."""
    try:
        params = parse_nested_pairs(request.query.items())
        raw = await request.read()
        if not raw.strip():
            return params
        if request.content_type == "application/x-www-form-urlencoded":
            body: Any = parse_nested_pairs(parse_qsl(raw.decode(), keep_blank_values=True))
        else:
            body = orjson.loads(raw)
    except (BadInput, UnicodeDecodeError, orjson.JSONDecodeError):
        raise BitrixFault("INVALID_REQUEST", "The request body cannot be parsed") from None
    if not isinstance(body, dict):
        raise BitrixFault("INVALID_REQUEST", "The request body must be an object")
    return params | body
