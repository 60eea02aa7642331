"""The Bitrix24 simulator's control and inspection API under `/_sim/`: no secret, never limited
or logged.

- `GET /_sim/state` — the report (data, traffic, limits, duplicates, OAuth, storm);
- `GET /_sim/requests` — every gated request;
- `POST /_sim/faults` — change fault and limit settings, script `fail_next` / `fail_command`;
- `POST /_sim/storm` — `{"seconds": s}`: every REST call answers 503 `QUERY_LIMIT_EXCEEDED` for
  `s` seconds (0 ends a storm);
- `POST /_sim/expire-tokens`, `/_sim/unblock`, `/_sim/reset`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from service.crm.simulator_bitrix24_wire import error_answer
from service.crm.simulator_common import json_answer

if TYPE_CHECKING:
    from service.crm.simulator_bitrix24 import BitrixSimulator

__all__ = ["BitrixControl"]


class BitrixControl:
    """The `/_sim/*` routes of one simulator."""

    def __init__(self, sim: BitrixSimulator) -> None:
        self.sim = sim

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_sim/state", self._state),
            web.get("/_sim/requests", self._requests),
            web.post("/_sim/faults", self._faults),
            web.post("/_sim/storm", self._storm),
            web.post("/_sim/unblock", self._unblock),
            web.post("/_sim/reset", self._reset),
            web.post("/_sim/expire-tokens", self._expire_tokens),
        ]

    async def _state(self, request: web.Request) -> web.Response:
        return json_answer(self.sim.report())

    async def _requests(self, request: web.Request) -> web.Response:
        return json_answer(self.sim.log.to_json())

    async def _faults(self, request: web.Request) -> web.Response:
        try:
            return json_answer(self.sim.set_faults(await _object(request)))
        except ValueError as exc:
            return error_answer(400, "INVALID_REQUEST", str(exc))

    async def _storm(self, request: web.Request) -> web.Response:
        try:
            seconds = _seconds((await _object(request)).get("seconds"))
        except ValueError as exc:
            return error_answer(400, "INVALID_REQUEST", str(exc))
        self.sim.storm(seconds)
        return json_answer(self.sim.faults.storm.to_json(self.sim.clock()))

    async def _unblock(self, request: web.Request) -> web.Response:
        self.sim.unblock()
        return json_answer({"blocked": False})

    async def _reset(self, request: web.Request) -> web.Response:
        self.sim.reset()
        return json_answer({"reset": True})

    async def _expire_tokens(self, request: web.Request) -> web.Response:
        self.sim.expire_tokens()
        return json_answer({"expired": True})


async def _object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body; ValueError (orjson's decode error is one) otherwise."""
    body = orjson.loads(await request.read())
    if not isinstance(body, dict):
        raise ValueError("Expected a JSON object")
    return body


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError('Expected {"seconds": a non-negative number}')
    if not math.isfinite(value) or value < 0:
        raise ValueError('Expected {"seconds": a non-negative number}')
    return float(value)
