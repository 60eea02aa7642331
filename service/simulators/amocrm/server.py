"""An amoCRM API v4 simulator: a real HTTP server that limits, blocks and misbehaves like amoCRM.

Used by integration tests (started in-process on a real port), by `crm-relay fake-crm`, and by
`crm-relay serve` when no CRM is configured. Every request to `/api/*` and `/oauth2/*` goes
through one gate, in this order:

1. it is logged;
2. a blocked account answers 403 to everything;
3. during a scripted storm (`storm(seconds)`, `POST /_sim/storm`) everything answers 429: it is
   someone else's traffic on the account, so neither a violation nor counted in the window;
4. it is counted in the sliding 1-second window at its arrival time: more than `rate_limit`
   arrivals in the window answers 429 (and counts towards the block);
5. a scripted `fail_next` answer, if one matches;
6. random faults (`Faults.around_work`): a 5xx *instead of* doing the work, or — after the work
   was done — a hang or a dropped connection. The latter two are what makes duplicates: the
   write landed, the client cannot know;
7. `latency_s`, the Bearer token check, and the endpoint itself.

`/_sim/*` is the control and inspection API (simulator_control.py, plus amoCRM's own
`/_sim/pipelines` and `/_sim/contacts`); it needs no token and is never limited or logged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler

from service.simulators.amocrm.api import AmoApi, Tokens, read_json, validation_problem
from service.simulators.amocrm.config import SimulatorConfig
from service.simulators.amocrm.state import AmoStore, Pipeline, ValidationFailed
from service.simulators.common import SlidingWindowLimit, json_answer, problem
from service.simulators.control import (
    RANDOM_FAULT_FIELDS,
    SimulatorBase,
    serve_until_signalled,
    start_server,
)

__all__ = [
    "SIMULATOR_KEY",
    "AmoCrmSimulator",
    "SimulatorConfig",
    "run_fake_crm",
    "start_simulator",
]

_GATED = ("/api/", "/oauth2/")


class AmoCrmSimulator(SimulatorBase[SimulatorConfig]):
    """One simulated amoCRM account: data, tokens, limits, faults and the request log."""

    # What `POST /_sim/faults` may change, with the JSON type each value must have.
    FAULT_FIELDS = RANDOM_FAULT_FIELDS | {
        "rate_limit": int,
        "block_after": int,
        "block_window_s": float,
        "merge_duplicates": bool,
    }

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        super().__init__(config or SimulatorConfig(), time.monotonic)
        self.store = AmoStore()
        self.tokens: Tokens = Tokens(self.config.refresh_token)
        self.window = SlidingWindowLimit(1.0)
        self.api = AmoApi(self.store, self.tokens, lambda: self.config, lambda: self.clock())

    def make_app(self) -> web.Application:
        """A fresh aiohttp application serving this simulator's state."""
        own_control = [
            web.post("/_sim/pipelines", self._pipelines),
            web.post("/_sim/contacts", self._seed_contacts),
            web.delete(r"/_sim/contacts/{id:\d+}", self._delete_contact),
        ]
        app = self.new_app([*self.api.routes(), *own_control], middlewares=[self._gate])
        app[SIMULATOR_KEY] = self
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
            "requests_by_endpoint": self.log.by_endpoint(),
            "contact_reads": dict(self.api.contact_reads),
            "refresh_token": self.tokens.refresh_token,
            "duplicates": self.store.duplicates(),
            **self.traffic(),
        }

    def bad_request(self, detail: str) -> web.Response:
        return problem(400, detail)

    def unblock(self) -> None:
        """Lift the block as support would: later, so the limit window starts empty."""
        super().unblock()
        self.window.clear()

    def reset(self) -> None:
        """Forget data, tokens, traffic and scripted faults; keep config and pipelines."""
        super().reset()
        self.store.clear()
        self.api.contact_reads.clear()
        self.window.clear()
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

    def add_lead_field(self, field_id: int, options: list[str], named: bool = True) -> None:
        """A select custom field of leads: another value is refused with a 400 for the whole
        request, naming the item (`NotSupportedChoice`) or, with `named=False`, none."""
        self.store.add_lead_field(field_id, options, named)

    # ---- the gate -----------------------------------------------------------------------------

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(_GATED):
            return await _route(request, handler)
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else request.path
        return await self.logged(request, endpoint, lambda now: self._answer(request, handler, now))

    async def _answer(
        self, request: web.Request, handler: Handler, now: float
    ) -> web.StreamResponse | None:
        config = self.config
        if self.blocker.blocked:
            return problem(403, "Account is blocked")
        if self.faults.storm.refuse(now):
            return problem(429)  # someone else's traffic: not a violation of ours, not counted
        if not self.window.arrive(now, config.rate_limit):
            self.blocker.violation(now, config.block_after, config.block_window_s)
            return problem(429)
        return await self.faulty(request, lambda: self._serve(request, handler))

    async def _serve(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/api/") and not self.api.authorized(request):
            return problem(401, "Missing, unknown or expired access token")
        return await _route(request, handler)

    # ---- control API of amoCRM's own ----------------------------------------------------------

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


async def start_simulator(
    sim: AmoCrmSimulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve `sim` on a real TCP port; returns the runner (call `cleanup()`) and base URL."""
    return await start_server(sim.make_app(), host, port)


def run_fake_crm(kind: str, host: str, port: int, config: SimulatorConfig) -> None:
    """Serve a simulator until SIGINT/SIGTERM; prints the URL it listens on. Blocks.

    For `bitrix24` only the fault settings shared by both simulators are taken from `config`;
    the portal's limits are Bitrix24's own (leaky bucket 50, draining 2/s).
    """
    if kind == "bitrix24":
        from service.simulators.bitrix24.server import (
            BitrixSimulator,
            BitrixSimulatorConfig,
            serve_bitrix_until_signalled,
        )

        shared = (*RANDOM_FAULT_FIELDS, "seed")
        bitrix = BitrixSimulatorConfig(**{name: getattr(config, name) for name in shared})
        asyncio.run(serve_bitrix_until_signalled(BitrixSimulator(bitrix), host, port))
        return
    if kind != "amocrm":
        raise ValueError(f"unknown fake CRM kind {kind!r}; supported: amocrm, bitrix24")
    asyncio.run(serve_until_signalled(AmoCrmSimulator(config).make_app(), host, port, _banner))


def _banner(url: str) -> str:
    return f"fake amocrm listening on {url}"
