"""An amoCRM API v4 simulator: a real HTTP server that limits, blocks and misbehaves like amoCRM.

Used by integration tests (started in-process on a real port), by `crm-relay fake-crm`, and by
`crm-relay serve` when no CRM is configured. Every request to `/api/*` and `/oauth2/*` goes
through one gate, in this order:

1. it is logged and counted in the sliding 1-second window at its arrival time;
2. a blocked account answers 403 to everything;
3. more than `rate_limit` arrivals in the window answers 429 (and counts towards the block);
4. a scripted `fail_next` answer, if one matches;
5. random faults: a 5xx *instead of* doing the work, or — after the work was done — a hang or a
   dropped connection. The latter two are what makes duplicates: the write landed, the client
   cannot know;
6. `latency_s`, the Bearer token check, and the endpoint itself.

`/_sim/*` is the control and inspection API; it needs no token and is never limited or logged.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from service.crm.simulator_amocrm import AmoApi, Tokens, read_json, validation_problem
from service.crm.simulator_common import (
    Blocker,
    Faults,
    RequestLog,
    ScriptedAnswer,
    SlidingWindowLimit,
    drop_connection,
    json_answer,
    problem,
)
from service.crm.simulator_state import AmoStore, Pipeline, ValidationFailed

__all__ = [
    "SIMULATOR_KEY",
    "AmoCrmSimulator",
    "SimulatorConfig",
    "run_fake_crm",
    "start_simulator",
]

_GATED = ("/api/", "/oauth2/")
# What `POST /_sim/faults` may change, with the JSON type each value must have.
_FAULT_FIELDS: dict[str, type] = {
    "latency_s": float,
    "error_rate": float,
    "timeout_rate": float,
    "hang_s": float,
    "reset_rate": float,
    "rate_limit": int,
    "block_after": int,
    "block_window_s": float,
    "merge_duplicates": bool,
}


@dataclass
class SimulatorConfig:
    """How the simulated account behaves; mutable while the simulator runs."""

    rate_limit: int = 7  # max requests in any sliding 1-second window
    block_after: int = 20  # this many 429s within block_window_s block the account (403)
    block_window_s: float = 60.0
    access_token: str = "sim-access-token"  # long-lived token, valid until expire_tokens()
    client_id: str = "sim-client"
    client_secret: str = "sim-secret"
    refresh_token: str = "sim-refresh-0"  # the first valid refresh token (single-use)
    token_ttl_s: float = 86400.0
    latency_s: float = 0.0  # added to every API answer
    error_rate: float = 0.0  # fraction answered 500/502/503/504 without doing the work
    timeout_rate: float = 0.0  # fraction that hang for hang_s after doing the work
    hang_s: float = 60.0
    reset_rate: float = 0.0  # fraction whose connection is dropped after doing the work
    merge_duplicates: bool = False  # amoCRM's own duplicate control on leads/complex
    seed: int | None = None


class AmoCrmSimulator:
    """One simulated amoCRM account: data, tokens, limits, faults and the request log."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = config or SimulatorConfig()
        self.clock: Callable[[], float] = time.monotonic
        self.store = AmoStore()
        self.tokens = Tokens(self.config.refresh_token)
        self.log = RequestLog()
        self.window = SlidingWindowLimit(1.0)
        self.blocker = Blocker()
        self.faults = Faults(self.config.seed)
        self.api = AmoApi(self.store, self.tokens, lambda: self.config, lambda: self.clock())

    def make_app(self) -> web.Application:
        """A fresh aiohttp application serving this simulator's state."""
        app = web.Application(middlewares=[self._gate])
        app[SIMULATOR_KEY] = self
        app.add_routes(self.api.routes())
        app.add_routes(self._control_routes())
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    # ---- helpers for tests and the control API ------------------------------------------------

    def report(self) -> dict[str, Any]:
        """Everything `GET /_sim/state` answers: data, traffic counters, duplicates."""
        leads_by_contact = self.store.lead_ids_by_contact()
        return {
            "contacts": [
                c.to_json(leads_by_contact.get(c.id, [])) for c in self.store.contacts.values()
            ],
            "leads": [lead.to_json() for lead in self.store.leads.values()],
            "notes": [note.to_json() for note in self.store.notes.values()],
            "requests_total": len(self.log.entries),
            "requests_by_endpoint": self.log.by_endpoint(),
            "contact_reads": dict(self.api.contact_reads),
            "answers_by_status": self.log.by_status(),
            "violations": self.blocker.violations,
            "max_in_any_second": self.log.max_in_any_second(),
            "blocked": self.blocker.blocked,
            "refresh_token": self.tokens.refresh_token,
            "duplicates": self.store.duplicates(),
        }

    def expire_tokens(self) -> None:
        """Every access token, the long-lived one included, now answers 401."""
        self.tokens.expire_all()

    def unblock(self) -> None:
        """Lift the block as support would: later, so the limit window starts empty."""
        self.blocker.unblock()
        self.window.clear()

    def reset(self) -> None:
        """Forget data, tokens, traffic and scripted faults; keep config and pipelines."""
        self.store.clear()
        self.api.contact_reads.clear()
        self.log.clear()
        self.window.clear()
        self.blocker.clear()
        self.faults.reset(self.config.seed)
        self.tokens.reset(self.config.refresh_token)

    def seed_contacts(self, contacts: list[dict[str, Any]]) -> list[int]:
        """Contacts made by a manager, not through the API: not counted, not limited."""
        return [made["id"] for made in self.store.seed_contacts(contacts)]

    def delete_contact(self, contact_id: int) -> bool:
        """A manager deletes a contact; False if there is no such contact."""
        return self.store.delete_contact(contact_id)

    def add_pipeline(self, pipeline_id: int, statuses: list[int], name: str = "") -> Pipeline:
        """Add a pipeline; its first status is where new leads land; 142/143 are added."""
        return self.store.add_pipeline(pipeline_id, statuses, name)

    def fail_next(
        self,
        method: str,
        path: str,
        status: int,
        count: int = 1,
        body: Any = None,
        apply: bool = False,
    ) -> None:
        """Script the next `count` answers to matching requests (patterns like `/api/v4/*`)."""
        self.faults.scripted.append(
            ScriptedAnswer(method.upper(), path, status, count, body, apply)
        )

    def set_faults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply a `POST /_sim/faults` body all-or-nothing; ValueError says what is wrong."""
        changes = dict(changes)
        scripted = changes.pop("fail_next", [])
        if not isinstance(scripted, list):
            raise ValueError("fail_next must be an array")
        answers = [ScriptedAnswer.from_json(item) for item in scripted]
        for key, value in changes.items():
            _check_fault_value(key, value)
        for key, value in changes.items():
            setattr(self.config, key, value)
        self.faults.scripted.extend(answers)
        return self._config_json()

    def _config_json(self) -> dict[str, Any]:
        return asdict(self.config) | {"fail_next": [a.to_json() for a in self.faults.scripted]}

    # ---- the gate -----------------------------------------------------------------------------

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(_GATED):
            return await _route(request, handler)
        now = self.clock()
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else request.path
        entry = self.log.start(now, request.method, request.path, endpoint)
        response = await self._answer(request, handler, now)
        if response is None:
            entry.status = "reset"
            # the transport is gone; aiohttp drops whatever is returned
            return web.Response(status=500)
        entry.status = response.status
        return response

    async def _answer(
        self, request: web.Request, handler: Handler, now: float
    ) -> web.StreamResponse | None:
        config = self.config
        if self.blocker.blocked:
            return problem(403, "Account is blocked")
        if not self.window.arrive(now, config.rate_limit):
            self.blocker.violation(now, config.block_after, config.block_window_s)
            return problem(429)
        scripted = self.faults.take_scripted(request.method, request.path)
        if scripted is not None:
            if scripted.apply:
                await self._serve(request, handler)
            return scripted.response()
        if self.faults.roll(config.error_rate):
            return self.faults.server_error()
        await self.faults.sleep(config.latency_s)
        response = await self._serve(request, handler)
        if self.faults.roll(config.timeout_rate):
            await self.faults.sleep(config.hang_s)
        if self.faults.roll(config.reset_rate):
            drop_connection(request)
            return None
        return response

    async def _serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api/") and not self.api.authorized(request):
            return problem(401, "Missing, unknown or expired access token")
        return await _route(request, handler)

    # ---- control API --------------------------------------------------------------------------

    def _control_routes(self) -> list[web.RouteDef]:
        return [
            web.get("/_sim/state", self._state),
            web.get("/_sim/requests", self._requests),
            web.post("/_sim/faults", self._faults),
            web.post("/_sim/expire-tokens", self._expire_tokens),
            web.post("/_sim/unblock", self._unblock),
            web.post("/_sim/reset", self._reset),
            web.post("/_sim/pipelines", self._pipelines),
            web.post("/_sim/contacts", self._seed_contacts),
            web.delete(r"/_sim/contacts/{id:\d+}", self._delete_contact),
        ]

    async def _state(self, request: web.Request) -> web.Response:
        return json_answer(self.report())

    async def _requests(self, request: web.Request) -> web.Response:
        return json_answer(self.log.to_json())

    async def _faults(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            if not isinstance(body, dict):
                raise ValueError("Expected a JSON object")
            return json_answer(self.set_faults(body))
        except (ValueError, ValidationFailed) as exc:
            return problem(400, str(exc))

    async def _expire_tokens(self, request: web.Request) -> web.Response:
        self.expire_tokens()
        return json_answer({"expired": True})

    async def _unblock(self, request: web.Request) -> web.Response:
        self.unblock()
        return json_answer({"blocked": False})

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return json_answer({"reset": True})

    async def _seed_contacts(self, request: web.Request) -> web.Response:
        """`POST /_sim/contacts`: a contact or an array of them, as a manager would make them."""
        try:
            made = self.store.seed_contacts(await read_json(request))
        except ValidationFailed as exc:
            return validation_problem(exc)
        return json_answer({"_embedded": {"contacts": made}})

    async def _delete_contact(self, request: web.Request) -> web.Response:
        if not self.delete_contact(int(request.match_info["id"])):
            return problem(404, "Contact not found")
        return web.Response(status=204)

    async def _pipelines(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
        except ValidationFailed as exc:
            return validation_problem(exc)
        statuses = body.get("statuses") if isinstance(body, dict) else None
        valid = isinstance(statuses, list) and all(type(s) is int for s in statuses)
        if not (valid and statuses and type(body.get("id")) is int):
            return problem(400, 'Expected {"id": int, "statuses": [int, ...], "name"?: str}')
        pipeline = self.add_pipeline(body["id"], statuses, str(body.get("name") or ""))
        return json_answer(pipeline.to_json())

    # ---- lifecycle ----------------------------------------------------------------------------

    async def _on_startup(self, app: web.Application) -> None:
        self.faults.stopping.clear()

    async def _on_shutdown(self, app: web.Application) -> None:
        # Hanging answers would hold the server's graceful shutdown for hang_s; end them now.
        self.faults.stopping.set()


SIMULATOR_KEY = web.AppKey("amocrm_simulator", AmoCrmSimulator)


async def _route(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Run the routed handler; the router's own 404/405 become problem+json like the rest."""
    try:
        response: web.StreamResponse = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem(exc.status, exc.reason)
    return response


def _check_fault_value(key: str, value: Any) -> None:
    wanted = _FAULT_FIELDS.get(key)
    if wanted is None:
        raise ValueError(f"{key}: not a setting /_sim/faults can change")
    if wanted is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false")
        return
    # JSON has one number type (1 is a fine float) and bool is an int to Python, not to JSON
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if not numeric or (wanted is int and not isinstance(value, int)):
        raise ValueError(f"{key}: expected {wanted.__name__}")
    if value < 0:
        raise ValueError(f"{key}: must not be negative")


async def start_simulator(
    sim: AmoCrmSimulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve `sim` on a real TCP port; returns the runner (call `cleanup()`) and base URL."""
    runner = web.AppRunner(sim.make_app(), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    shown_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown_host}:{bound_port}"


def run_fake_crm(kind: str, host: str, port: int, config: SimulatorConfig) -> None:
    """Serve a simulator until SIGINT/SIGTERM; prints the URL it listens on. Blocks.

    For `bitrix24` only the fault settings shared by both simulators are taken from `config`;
    the portal's limits are Bitrix24's own (leaky bucket 50, draining 2/s).
    """
    if kind == "bitrix24":
        from service.crm.simulator_bitrix24 import (
            BitrixSimulator,
            BitrixSimulatorConfig,
            serve_bitrix_until_signalled,
        )

        shared = ("latency_s", "error_rate", "timeout_rate", "hang_s", "reset_rate", "seed")
        bitrix = BitrixSimulatorConfig(**{name: getattr(config, name) for name in shared})
        asyncio.run(serve_bitrix_until_signalled(BitrixSimulator(bitrix), host, port))
        return
    if kind != "amocrm":
        raise ValueError(f"unknown fake CRM kind {kind!r}; supported: amocrm, bitrix24")
    asyncio.run(_serve_until_signalled(AmoCrmSimulator(config), host, port))


async def _serve_until_signalled(sim: AmoCrmSimulator, host: str, port: int) -> None:
    runner, url = await start_simulator(sim, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"fake amocrm listening on {url}", flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
