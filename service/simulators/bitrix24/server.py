"""A Bitrix24 REST simulator: a real HTTP server that limits, blocks and misbehaves like a portal.

The incoming-webhook base URL is `{base_url}/rest/1/{webhook_secret}/`; methods are
`POST {webhook}{method}.json` (or without `.json`, or GET with a query string). Every request
under `/rest/` goes through one gate, in this order:

1. it is logged;
2. a portal under manual block answers 401 `OVERLOAD_LIMIT` to everything;
3. during a scripted storm (`storm(seconds)`) every request answers 503 `QUERY_LIMIT_EXCEEDED`:
   the portal is busy with others, so this is not the client's violation, and like every
   refusal it adds nothing to the bucket, which keeps draining;
4. the leaky bucket: a request that would overflow it answers 503 `QUERY_LIMIT_EXCEEDED`
   (a violation; `overload_after` of them within `overload_window_s` set the manual block);
5. the credentials: the webhook secret in the path (401 `INVALID_CREDENTIALS`), or for
   `/rest/{method}.json` an OAuth access token in `auth` (401 `expired_token` / `invalid_token`,
   see simulator_bitrix24_oauth.py; tokens come from `/oauth/token/`, `expire_tokens()` ends them);
6. a scripted `fail_next` answer, then random faults as in the amoCRM simulator
   (`SimulatorBase.faulty`): a 5xx instead of the work, or a hang / dropped connection after it;
7. the method, or `batch` running up to 50 of them. Each method call first checks its operating
   time (429 `OPERATION_TIME_LIMIT`, also a violation) and scripted `fail_command` errors.

`/_sim/*` is the control and inspection API (simulator_control.py); here `/_sim/faults` also takes
`fail_command` and `method_costs`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from service.simulators.bitrix24.batch import Answer, run_batch
from service.simulators.bitrix24.config import FAULT_FIELDS, BitrixSimulatorConfig, parse_faults
from service.simulators.bitrix24.entities import BitrixFault, Page
from service.simulators.bitrix24.limits import (
    CommandFault,
    LeakyBucket,
    OperatingTime,
    take_command_fault,
    time_envelope,
)
from service.simulators.bitrix24.oauth import BitrixTokens, auth_param
from service.simulators.bitrix24.store import BitrixStore
from service.simulators.bitrix24.wire import error_answer, request_params, scripted_response
from service.simulators.common import ScriptedAnswer, json_answer
from service.simulators.control import SimulatorBase, serve_until_signalled, start_server

__all__ = [
    "BITRIX_SIMULATOR_KEY",
    "BitrixSimulator",
    "BitrixSimulatorConfig",
    "serve_bitrix_until_signalled",
    "start_bitrix_simulator",
]


class BitrixSimulator(SimulatorBase[BitrixSimulatorConfig]):
    """One simulated portal: CRM data, limits, faults and the request log."""

    FAULT_FIELDS = FAULT_FIELDS

    def __init__(self, config: BitrixSimulatorConfig | None = None) -> None:
        # Wall-clock seconds: `operating_reset_at` is a unix time.
        super().__init__(config or BitrixSimulatorConfig(), time.time)
        self.store = BitrixStore()
        self.bucket = LeakyBucket()
        self.operating = OperatingTime()
        self.command_faults: list[CommandFault] = []
        self.commands: Counter[str] = Counter()
        self.tokens: BitrixTokens = BitrixTokens(self.config.oauth)
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
            "crm.category.list": self.store.funnels.category_list,
            "crm.status.list": self.store.funnels.status_list,
        }

    def make_app(self) -> web.Application:
        """A fresh aiohttp application serving this simulator's state."""
        routes = [web.route("*", "/rest/{tail:.*}", self._rest)]
        routes += [web.route("*", path, self._token) for path in _TOKEN_PATHS]
        app = self.new_app(routes)
        app[BITRIX_SIMULATOR_KEY] = self
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
            "requests_by_endpoint": dict(
                Counter(e.endpoint.split(" ", 1)[-1] for e in self.log.entries)
            ),
            "commands_by_method": dict(self.commands),
            "max_bucket_level": self.bucket.max_level,
            "operating": self.operating.to_json(),
            "duplicates": self.store.duplicates(),
            "oauth": self.tokens.to_json(),
            **self.traffic(),
        }

    def bad_request(self, detail: str) -> web.Response:
        return error_answer(400, "INVALID_REQUEST", detail)

    def render_scripted(self, answer: ScriptedAnswer) -> web.Response:
        return scripted_response(answer)

    def unblock(self) -> None:
        """Lift the manual block as support would: later, with an empty bucket."""
        super().unblock()
        self.bucket.clear()

    def reset(self) -> None:
        """Forget data, tokens, traffic, limits and scripted faults; keep the config."""
        super().reset()
        self.store.clear()
        self.bucket.clear()
        self.operating.clear()
        self.command_faults.clear()
        self.commands.clear()
        self.tokens.reset()

    def fail_command(self, method: str, count: int = 1, **kw: Any) -> None:
        """Script the next `count` calls of `method` (in a batch or not) to answer an error."""
        self.command_faults.append(CommandFault(method, count, **kw))

    def set_faults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply a `POST /_sim/faults` body all-or-nothing; ValueError says what is wrong."""
        settings, answers, commands = parse_faults(changes)
        self.command_faults.extend(commands)
        return self.apply_faults(settings, answers)

    def config_json(self) -> dict[str, Any]:
        return super().config_json() | {
            "fail_command": [c.to_json() for c in self.command_faults],
        }

    # ---- the gate -----------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["tail"].rsplit("/", 1)[-1].removesuffix(".json")
        return await self.logged(
            request, method or "?", lambda now: self._answer(request, method, now)
        )

    async def _answer(self, request: web.Request, method: str, now: float) -> web.Response | None:
        config = self.config
        if self.blocker.blocked:
            return error_answer(401, "OVERLOAD_LIMIT", "REST API is blocked due to overload.")
        if self.faults.storm.refuse(now):
            return error_answer(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        if not self.bucket.arrive(now, config.drain_per_s, config.burst):
            self.blocker.violation(now, config.overload_after, config.overload_window_s)
            return error_answer(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        refusal = await self._refusal(request)
        if refusal is not None:
            return refusal
        return await self.faulty(request, lambda: self._serve(request, method))

    async def _refusal(self, request: web.Request) -> web.Response | None:
        parts = request.match_info["tail"].split("/")
        if len(parts) == 1 and parts[0]:  # /rest/{method}: an OAuth app's call
            fault = self.tokens.refusal(await auth_param(request), self.clock())
            return None if fault is None else json_answer(fault.to_json(), fault.status)
        webhook = len(parts) == 3 and parts[0].isdigit() and bool(parts[2])
        if webhook and parts[1] == self.config.webhook_secret:
            return None
        return error_answer(401, "INVALID_CREDENTIALS", "Invalid request credentials")

    async def _serve(self, request: web.Request, method: str) -> web.Response:
        try:
            params = await request_params(request)
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

    # ---- the token server ---------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.Response:
        """Not behind the portal's bucket (oauth.bitrix.info is another server), but `fail_next`
        answers apply: with `apply` the refresh token is spent and the answer lost."""
        scripted = self.faults.take_scripted(request.method, request.path)
        if scripted is not None and not scripted.apply:
            return scripted_response(scripted)
        response = await self.tokens.answer(request, self.clock())
        return response if scripted is None else scripted_response(scripted)


BITRIX_SIMULATOR_KEY = web.AppKey("bitrix24_simulator", BitrixSimulator)
_TOKEN_PATHS = ("/oauth/token/", "/oauth/token")


async def start_bitrix_simulator(
    sim: BitrixSimulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve `sim` on a real TCP port; returns the runner (call `cleanup()`) and the base URL.

    The webhook URL a client needs is `sim.webhook_url(base_url)`.
    """
    return await start_server(sim.make_app(), host, port)


async def serve_bitrix_until_signalled(sim: BitrixSimulator, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, printing the webhook URL to configure the relay with."""

    def banner(url: str) -> str:
        return f"fake bitrix24 listening on {url}; BITRIX24_WEBHOOK_URL={sim.webhook_url(url)}"

    await serve_until_signalled(sim.make_app(), host, port, banner)
