"""What every CRM simulator does the same way around its own CRM: the `/_sim/*` control API and
what it drives, the gate's request log and fault sequence, and serving on a real port.

`SimulatorBase` holds the parts both simulators have (clock, request log, block, random and
scripted faults, storm, tokens) and serves the control API over them; it needs no token and is
never limited or logged:

- `GET /_sim/state` — the simulator's `report()` (`traffic()` is the part every report shares);
- `GET /_sim/requests` — every gated request;
- `POST /_sim/faults` — change the settings in `FAULT_FIELDS` and script `fail_next` answers,
  all or nothing;
- `POST /_sim/storm` — `{"seconds": s}`: every gated request gets the CRM's rate-limit answer for
  `s` seconds (0 ends a storm);
- `POST /_sim/expire-tokens`, `/_sim/unblock`, `/_sim/reset`.

A simulator adds what is its CRM's own: the data and endpoints, its limit, where in its gate the
storm is checked and how it answers, its error shape (`bad_request`, `render_scripted`) and any
control routes of its own.
"""

from __future__ import annotations

import asyncio
import math
import signal
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import Field, asdict
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from service.simulators.common import (
    Blocker,
    Faults,
    RandomFaultRates,
    RequestLog,
    ScriptedAnswer,
    json_answer,
)

__all__ = [
    "RANDOM_FAULT_FIELDS",
    "SimulatorBase",
    "check_fault_value",
    "fault_changes",
    "json_items",
    "serve_until_signalled",
    "start_server",
]

# The random-fault settings every simulator's `POST /_sim/faults` may change, with their JSON type.
RANDOM_FAULT_FIELDS: dict[str, type] = {
    "latency_s": float,
    "error_rate": float,
    "timeout_rate": float,
    "hang_s": float,
    "reset_rate": float,
}


class SimulatorSettings(RandomFaultRates, Protocol):
    """What the shared parts read of a simulator's config, a dataclass."""

    seed: int | None
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]


class ExpiringTokens(Protocol):
    """A simulator's token bookkeeping, as far as `/_sim/expire-tokens` needs it."""

    def expire_all(self) -> None: ...


ConfigT = TypeVar("ConfigT", bound=SimulatorSettings)
_Answer = TypeVar("_Answer", bound=web.StreamResponse)


class SimulatorBase(ABC, Generic[ConfigT]):
    """The state and control API every simulator has; subclasses add their CRM."""

    FAULT_FIELDS: ClassVar[dict[str, type]] = RANDOM_FAULT_FIELDS
    tokens: ExpiringTokens

    def __init__(self, config: ConfigT, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock  # tests replace it
        self.log = RequestLog()
        self.blocker = Blocker()
        self.faults = Faults(config.seed)

    # ---- what each CRM answers its own way ----------------------------------------------------

    @abstractmethod
    def report(self) -> dict[str, Any]:
        """Everything `GET /_sim/state` answers."""

    @abstractmethod
    def bad_request(self, detail: str) -> web.Response:
        """The CRM's 400 for a control request it cannot take."""

    def render_scripted(self, answer: ScriptedAnswer) -> web.Response:
        """A `fail_next` answer: its own body, a gateway's 5xx, or problem+json."""
        return answer.response()

    # ---- helpers for tests and the control API ------------------------------------------------

    def traffic(self) -> dict[str, Any]:
        """The counters every `/_sim/state` report carries."""
        return {
            "requests_total": len(self.log.entries),
            "answers_by_status": self.log.by_status(),
            "violations": self.blocker.violations,
            "max_in_any_second": self.log.max_in_any_second(),
            "blocked": self.blocker.blocked,
            "storm": self.faults.storm.to_json(self.clock()),
        }

    def fail_next(
        self,
        method: str,
        path: str,
        status: int,
        count: int = 1,
        body: Any = None,
        apply: bool = False,
    ) -> None:
        """Script the next `count` answers to matching requests (shell patterns such as
        `/api/v4/*`); with `apply` the work is done first and only the answer is replaced."""
        self.faults.scripted.append(
            ScriptedAnswer(method.upper(), path, status, count, body, apply)
        )

    def storm(self, seconds: float) -> None:
        """Refuse every gated request as over the limit for `seconds` (0: end a storm).

        The CRM's doing, not the client's: not counted as violations (see each gate)."""
        if seconds <= 0:
            self.faults.storm.stop()
        else:
            self.faults.storm.start(self.clock(), seconds)

    def expire_tokens(self) -> None:
        """Every access token issued so far (and a long-lived one) now answers 401: only a
        refresh gets a working one."""
        self.tokens.expire_all()

    def unblock(self) -> None:
        """Lift the block as support would; a simulator also empties its limit here."""
        self.blocker.unblock()

    def reset(self) -> None:
        """Forget traffic, the block, scripted faults and any storm; a simulator also forgets
        its data, limits and tokens here. The config stays."""
        self.log.clear()
        self.blocker.clear()
        self.faults.reset(self.config.seed)

    def set_faults(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Apply a `POST /_sim/faults` body all-or-nothing; ValueError says what is wrong."""
        return self.apply_faults(*fault_changes(self.FAULT_FIELDS, changes))

    def apply_faults(
        self, settings: dict[str, Any], answers: list[ScriptedAnswer]
    ) -> dict[str, Any]:
        """Apply checked settings and `fail_next` answers; the config as `/_sim/faults` shows it."""
        for key, value in settings.items():
            setattr(self.config, key, value)
        self.faults.scripted.extend(answers)
        return self.config_json()

    def config_json(self) -> dict[str, Any]:
        return asdict(self.config) | {"fail_next": [a.to_json() for a in self.faults.scripted]}

    # ---- the gate -----------------------------------------------------------------------------

    async def logged(
        self,
        request: web.Request,
        endpoint: str,
        answer: Callable[[float], Awaitable[web.StreamResponse | None]],
    ) -> web.StreamResponse:
        """Log a gated request, then `answer` it as of its arrival; a dropped connection (None)
        is logged as "reset"."""
        now = self.clock()
        entry = self.log.start(now, request.method, request.path, endpoint)
        response = await answer(now)
        if response is None:
            entry.status = "reset"
            return web.Response(status=500)  # the transport is gone; aiohttp drops this
        entry.status = response.status
        return response

    async def faulty(
        self, request: web.Request, work: Callable[[], Awaitable[_Answer]]
    ) -> _Answer | web.Response | None:
        """A matching `fail_next` answer (with `apply`, given after the work), else `work` with
        the random faults of `Faults.around_work`; None: the connection was dropped."""
        scripted = self.faults.take_scripted(request.method, request.path)
        if scripted is None:
            return await self.faults.around_work(request, self.config, work)
        if scripted.apply:
            await work()
        return self.render_scripted(scripted)

    # ---- the application and the control API --------------------------------------------------

    def new_app(
        self, routes: Iterable[web.RouteDef], middlewares: Iterable[Middleware] = ()
    ) -> web.Application:
        """An application serving `routes` and the control API; shutdown ends hanging answers."""
        app = web.Application(middlewares=middlewares)
        app.add_routes(routes)
        app.add_routes(
            [
                web.get("/_sim/state", self._state),
                web.get("/_sim/requests", self._requests),
                web.post("/_sim/faults", self._faults),
                web.post("/_sim/storm", self._storm),
                web.post("/_sim/expire-tokens", self._expire_tokens),
                web.post("/_sim/unblock", self._unblock),
                web.post("/_sim/reset", self._reset),
            ]
        )
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _state(self, request: web.Request) -> web.Response:
        return json_answer(self.report())

    async def _requests(self, request: web.Request) -> web.Response:
        return json_answer(self.log.to_json())

    async def _faults(self, request: web.Request) -> web.Response:
        try:
            return json_answer(self.set_faults(await _object(request)))
        except ValueError as exc:
            return self.bad_request(str(exc))

    async def _storm(self, request: web.Request) -> web.Response:
        try:
            seconds = _seconds((await _object(request)).get("seconds"))
        except ValueError as exc:
            return self.bad_request(str(exc))
        self.storm(seconds)
        return json_answer(self.faults.storm.to_json(self.clock()))

    async def _expire_tokens(self, request: web.Request) -> web.Response:
        self.expire_tokens()
        return json_answer({"expired": True})

    async def _unblock(self, request: web.Request) -> web.Response:
        self.unblock()
        return json_answer({"blocked": False})

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset()
        return json_answer({"reset": True})

    async def _on_startup(self, app: web.Application) -> None:
        self.faults.stopping.clear()

    async def _on_shutdown(self, app: web.Application) -> None:
        # Hanging answers would hold the server's graceful shutdown for hang_s; end them now.
        self.faults.stopping.set()


def fault_changes(
    fields: dict[str, type], changes: dict[str, Any]
) -> tuple[dict[str, Any], list[ScriptedAnswer]]:
    """Check a `POST /_sim/faults` body without applying anything: (the settings it changes,
    each checked against `fields`; its `fail_next` answers). ValueError says what is wrong."""
    settings = dict(changes)
    scripted = json_items(settings.pop("fail_next", []), "fail_next")
    answers = [ScriptedAnswer.from_json(item) for item in scripted]
    for key, value in settings.items():
        check_fault_value(fields, key, value)
    return settings, answers


def json_items(value: Any, name: str) -> list[Any]:
    """A JSON array of items, or one object given without its array."""
    if isinstance(value, dict):
        return [value]
    if not isinstance(value, list):
        raise ValueError(f"{name} must be an array")
    return value


def check_fault_value(fields: dict[str, type], key: str, value: Any) -> None:
    """Check one `POST /_sim/faults` setting against `fields` (name → the JSON type it takes);
    ValueError says what is wrong."""
    wanted = fields.get(key)
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


async def start_server(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve `app` on a real TCP port; returns the runner (call `cleanup()`) and base URL."""
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    shown_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown_host}:{bound_port}"


async def serve_until_signalled(
    app: web.Application, host: str, port: int, banner: Callable[[str], str]
) -> None:
    """Serve `app` until SIGINT/SIGTERM, printing `banner(base_url)` once it listens."""
    runner, url = await start_server(app, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(banner(url), flush=True)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
