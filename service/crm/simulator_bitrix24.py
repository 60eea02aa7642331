"""A Bitrix24 REST simulator: a real HTTP server that limits, blocks and misbehaves like a portal.

The incoming-webhook base URL is `{base_url}/rest/1/{webhook_secret}/`; methods are
`POST {webhook}{method}.json` (or without `.json`, or GET with a query string). Every request
under `/rest/` goes through one gate, in this order:

1. it is logged;
2. a portal under manual block answers 401 `OVERLOAD_LIMIT` to everything;
3. the leaky bucket: a request that would overflow it answers 503 `QUERY_LIMIT_EXCEEDED`
   (a violation; `overload_after` of them within `overload_window_s` set the manual block);
4. the credentials: the webhook secret in the path (401 `INVALID_CREDENTIALS`), or for
   `/rest/{method}.json` an OAuth access token in `auth` (401 `expired_token` / `invalid_token`,
   see simulator_bitrix24_oauth.py; tokens come from `/oauth/token/`, `expire_tokens()` ends them);
5. a scripted `fail_next` answer, then random faults as in the amoCRM simulator: a 5xx instead
   of the work, or a hang / dropped connection after it;
6. the method, or `batch` running up to 50 of them. Each method call first checks its operating
   time (429 `OPERATION_TIME_LIMIT`, also a violation) and scripted `fail_command` errors.

`/_sim/*` is the control and inspection API: no secret, never limited or logged.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from service.bodies import parse_nested_pairs
from service.crm.simulator_bitrix24_batch import Answer, run_batch
from service.crm.simulator_bitrix24_config import BitrixSimulatorConfig, parse_faults
from service.crm.simulator_bitrix24_entities import BitrixFault, Page
from service.crm.simulator_bitrix24_limits import (
    CommandFault,
    LeakyBucket,
    OperatingTime,
    take_command_fault,
    time_envelope,
)
from service.crm.simulator_bitrix24_oauth import BitrixTokens, auth_param
from service.crm.simulator_bitrix24_store import BitrixStore
from service.crm.simulator_common import (
    Blocker,
    Faults,
    RequestLog,
    ScriptedAnswer,
    drop_connection,
    json_answer,
    server_error,
)
from service.errors import BadInput

__all__ = [
    "BITRIX_SIMULATOR_KEY",
    "BitrixSimulator",
    "BitrixSimulatorConfig",
    "serve_bitrix_until_signalled",
    "start_bitrix_simulator",
]

# The error code a scripted 4xx without a body answers with.
_SCRIPTED_CODES = {
    401: "INVALID_CREDENTIALS",
    403: "ACCESS_DENIED",
    404: "ERROR_METHOD_NOT_FOUND",
    429: "OPERATION_TIME_LIMIT",
}


class BitrixSimulator:
    """One simulated portal: CRM data, limits, faults and the request log."""

    def __init__(self, config: BitrixSimulatorConfig | None = None) -> None:
        self.config = config or BitrixSimulatorConfig()
        # Wall-clock seconds: `operating_reset_at` is a unix time. Tests replace it.
        self.clock: Callable[[], float] = time.time
        self.store = BitrixStore()
        self.log = RequestLog()
        self.bucket = LeakyBucket()
        self.operating = OperatingTime()
        self.blocker = Blocker()
        self.faults = Faults(self.config.seed)
        self.command_faults: list[CommandFault] = []
        self.commands: Counter[str] = Counter()
        self.tokens = BitrixTokens(self.config.oauth)
        self._methods: dict[str, Callable[[dict[str, Any]], Any]] = {
            "crm.duplicate.findbycomm": self.store.find_by_comm,
            "crm.contact.add": self.store.contact_add,
            "crm.contact.update": self.store.contact_update,
            "crm.contact.get": self.store.contact_get,
            "crm.deal.add": self.store.deal_add,
            "crm.deal.update": self.store.deal_update,
            "crm.deal.get": self.store.deal_get,
            "crm.deal.list": self.store.deal_list,
            "crm.timeline.comment.add": self.store.comment_add,
        }

    def make_app(self) -> web.Application:
        """A fresh aiohttp application serving this simulator's state."""
        app = web.Application()
        app[BITRIX_SIMULATOR_KEY] = self
        app.add_routes([web.route("*", "/rest/{tail:.*}", self._rest)])
        app.add_routes([web.route("*", path, self._token) for path in _TOKEN_PATHS])
        app.add_routes(self._control_routes())
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    def webhook_url(self, base_url: str, user_id: int = 1) -> str:
        """The incoming-webhook base URL a client is configured with."""
        return f"{base_url.rstrip('/')}/rest/{user_id}/{self.config.webhook_secret}/"

    def portal_url(self, base_url: str) -> str:
        """The portal's REST endpoint an OAuth app calls (`client_endpoint`)."""
        return f"{base_url.rstrip('/')}/rest/"

    def oauth_url(self, base_url: str) -> str:
        """The token server (oauth.bitrix.info in real life)."""
        return f"{base_url.rstrip('/')}{_TOKEN_PATHS[0]}"

    # ---- helpers for tests and the control API ------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Everything `GET /_sim/state` answers: data, traffic counters, duplicates.

        Deals appear under `deals` and again under `leads`, and contacts carry an amoCRM-shaped
        view (`id`, `custom_fields_values`, `_embedded.leads`), so CRM-agnostic tests can read
        either simulator's report the same way.
        """
        deals_by_contact = self.store.contact_deal_ids()
        deals = [d.report_json() for d in self.store.deals.values()]
        return {
            "contacts": [
                c.report_json(deals_by_contact.get(c.id, [])) for c in self.store.contacts.values()
            ],
            "deals": deals,
            "leads": deals,
            "comments": [c.to_json() for c in self.store.comments.values()],
            "requests_total": len(self.log.entries),
            "requests_by_endpoint": dict(
                Counter(e.endpoint.split(" ", 1)[-1] for e in self.log.entries)
            ),
            "commands_by_method": dict(self.commands),
            "answers_by_status": self.log.by_status(),
            "violations": self.blocker.violations,
            "max_bucket_level": self.bucket.max_level,
            "max_in_any_second": self.log.max_in_any_second(),
            "operating": self.operating.to_json(),
            "blocked": self.blocker.blocked,
            "duplicates": self.store.duplicates(),
            "oauth": self.tokens.to_json(),
        }

    def unblock(self) -> None:
        """Lift the manual block as support would: later, with an empty bucket."""
        self.blocker.unblock()
        self.bucket.clear()

    def expire_tokens(self) -> None:
        """Every OAuth access token issued so far now answers `expired_token`."""
        self.tokens.expire_all()

    def reset(self) -> None:
        """Forget data, tokens, traffic, limits and scripted faults; keep the config."""
        self.store.clear()
        self.log.clear()
        self.bucket.clear()
        self.operating.clear()
        self.blocker.clear()
        self.faults.reset(self.config.seed)
        self.command_faults.clear()
        self.commands.clear()
        self.tokens.reset()

    def fail_command(self, method: str, count: int = 1, **kw: Any) -> None:
        """Script the next `count` calls of `method` (in a batch or not) to answer an error."""
        self.command_faults.append(CommandFault(method, count, **kw))

    def set_faults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply a `POST /_sim/faults` body all-or-nothing; ValueError says what is wrong."""
        settings, answers, commands = parse_faults(changes)
        for key, value in settings.items():
            setattr(self.config, key, value)
        self.faults.scripted.extend(answers)
        self.command_faults.extend(commands)
        return self._config_json()

    def _config_json(self) -> dict[str, Any]:
        return asdict(self.config) | {
            "fail_next": [a.to_json() for a in self.faults.scripted],
            "fail_command": [c.to_json() for c in self.command_faults],
        }

    # ---- the gate -----------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        now = self.clock()
        method = request.match_info["tail"].rsplit("/", 1)[-1].removesuffix(".json")
        entry = self.log.start(now, request.method, request.path, method or "?")
        response = await self._answer(request, method, now)
        if response is None:
            entry.status = "reset"
            return web.Response(status=500)  # the transport is gone; aiohttp drops this
        entry.status = response.status
        return response

    async def _answer(self, request: web.Request, method: str, now: float) -> web.Response | None:
        config = self.config
        if self.blocker.blocked:
            return _error(401, "OVERLOAD_LIMIT", "REST API is blocked due to overload.")
        if not self.bucket.arrive(now, config.drain_per_s, config.burst):
            self.blocker.violation(now, config.overload_after, config.overload_window_s)
            return _error(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        scripted = self.faults.take_scripted(request.method, request.path)
        if scripted is not None:
            if scripted.apply:
                await self._serve(request, method)
            return _scripted_response(scripted)
        if self.faults.roll(config.error_rate):
            return self.faults.server_error()
        await self.faults.sleep(config.latency_s)
        response = await self._serve(request, method)
        if self.faults.roll(config.timeout_rate):
            await self.faults.sleep(config.hang_s)
        if self.faults.roll(config.reset_rate):
            drop_connection(request)
            return None
        return response

    async def _refusal(self, request: web.Request) -> web.Response | None:
        parts = request.match_info["tail"].split("/")
        if len(parts) == 1 and parts[0]:  # /rest/{method}: an OAuth app's call
            fault = self.tokens.refusal(await auth_param(request), self.clock())
            return None if fault is None else json_answer(fault.to_json(), fault.status)
        webhook = len(parts) == 3 and parts[0].isdigit() and bool(parts[2])
        if webhook and parts[1] == self.config.webhook_secret:
            return None
        return _error(401, "INVALID_CREDENTIALS", "Invalid request credentials")

    async def _serve(self, request: web.Request, method: str) -> web.Response:
        try:
            params = await _params(request)
            params.pop("auth", None)  # checked at the gate; a batch's covers its commands
            if method == "batch":
                return await self._batch(params)
            answer = await self.execute(method, params)
        except BitrixFault as fault:
            return json_answer(fault.to_json(), fault.status)
        body: dict[str, Any] = {"result": answer.result, "time": answer.time}
        if answer.total is not None:
            body["total"] = answer.total
        if answer.next is not None:
            body["next"] = answer.next
        return json_answer(body)

    async def _batch(self, params: dict[str, Any]) -> web.Response:
        start = self.clock()
        result = await run_batch(params, self.execute)
        # The wrapper spends nothing of its own: its commands were charged to their methods.
        usage = self.operating.usage("batch", start, self.config.operating_window_s)
        return json_answer({"result": result, "time": time_envelope(start, self.clock(), 0, usage)})

    async def execute(self, method: str, params: dict[str, Any]) -> Answer:
        """Run one method (a direct call or a batch command); BitrixFault is its error answer."""
        self.commands[method] += 1
        handler = self._methods.get(method)
        if handler is None:
            raise BitrixFault("ERROR_METHOD_NOT_FOUND", "Method not found!", 404)
        config, start = self.config, self.clock()
        window = config.operating_window_s
        if self.operating.exhausted(method, start, config.operating_limit_s, window):
            self.blocker.violation(start, config.overload_after, config.overload_window_s)
            fault = BitrixFault(
                "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.", 429
            )
            fault.time = time_envelope(start, start, 0, self.operating.usage(method, start, window))
            raise fault
        scripted = take_command_fault(self.command_faults, method)
        if scripted is not None and not scripted.apply:
            raise BitrixFault(scripted.error, scripted.description, scripted.status)
        cost = config.method_costs.get(method, config.method_cost_s)
        try:
            result = handler(params)
        finally:  # a refused call still used the server
            usage = self.operating.spend(method, start, cost, window)
        if scripted is not None:
            raise BitrixFault(scripted.error, scripted.description, scripted.status)
        envelope = time_envelope(start, self.clock(), cost, usage)
        if isinstance(result, Page):
            return Answer(result.rows, envelope, result.total, result.next)
        return Answer(result, envelope)

    # ---- control API --------------------------------------------------------------------------

    def _control_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_sim/state", self._state),
            web.get("/_sim/requests", self._requests),
            web.post("/_sim/faults", self._faults),
            web.post("/_sim/unblock", self._unblock),
            web.post("/_sim/reset", self._reset),
            web.post("/_sim/expire-tokens", self._expire_tokens),
        ]

    async def _state(self, request: web.Request) -> web.Response:
        return json_answer(self.report())

    async def _requests(self, request: web.Request) -> web.Response:
        return json_answer(self.log.to_json())

    async def _faults(self, request: web.Request) -> web.Response:
        try:
            body = orjson.loads(await request.read())
            if not isinstance(body, dict):
                raise ValueError("Expected a JSON object")
            return json_answer(self.set_faults(body))
        except (ValueError, orjson.JSONDecodeError) as exc:
            return _error(400, "INVALID_REQUEST", str(exc))

    async def _unblock(self, request: web.Request) -> web.Response:
        self.unblock()
        return json_answer({"blocked": False})

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return json_answer({"reset": True})

    async def _expire_tokens(self, request: web.Request) -> web.Response:
        self.expire_tokens()
        return json_answer({"expired": True})

    # ---- the token server ---------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        """Not behind the portal's bucket (oauth.bitrix.info is another server), but `fail_next`
        answers apply: with `apply` the refresh token is spent and the answer lost."""
        scripted = self.faults.take_scripted(request.method, request.path)
        if scripted is not None and not scripted.apply:
            return _scripted_response(scripted)
        response = await self.tokens.answer(request, self.clock())
        return response if scripted is None else _scripted_response(scripted)

    # ---- lifecycle ----------------------------------------------------------------------------

    async def _on_startup(self, app: web.Application) -> None:
        self.faults.stopping.clear()

    async def _on_shutdown(self, app: web.Application) -> None:
        # Hanging answers would hold the server's graceful shutdown for hang_s; end them now.
        self.faults.stopping.set()


BITRIX_SIMULATOR_KEY = web.AppKey("bitrix24_simulator", BitrixSimulator)
_TOKEN_PATHS = ("/oauth/token/", "/oauth/token")


def _error(status: int, code: str, description: str) -> web.Response:
    return json_answer({"error": code, "error_description": description}, status)


def _scripted_response(answer: ScriptedAnswer) -> web.Response:
    if answer.body is not None:
        return json_answer(answer.body, answer.status)
    if answer.status >= 500:
        return server_error(answer.status)
    return _error(answer.status, _SCRIPTED_CODES.get(answer.status, "ERROR_CORE"), "Scripted")


async def _params(request: web.Request) -> dict[str, Any]:
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


async def start_bitrix_simulator(
    sim: BitrixSimulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve `sim` on a real TCP port; returns the runner (call `cleanup()`) and the base URL.

    The webhook URL a client needs is `sim.webhook_url(base_url)`.
    """
    runner = web.AppRunner(sim.make_app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    shown_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown_host}:{bound_port}"


async def serve_bitrix_until_signalled(sim: BitrixSimulator, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, printing the webhook URL to configure the relay with."""
    runner, url = await start_bitrix_simulator(sim, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(
        f"fake bitrix24 listening on {url}; BITRIX24_WEBHOOK_URL={sim.webhook_url(url)}", flush=True
    )
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
