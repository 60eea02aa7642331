"""Pieces every CRM simulator shares: the request log, rate-limit windows, faults, problem bodies
and the duplicates report.

Nothing here knows about amoCRM or Bitrix24 payloads, so a second simulator can gate its own
endpoints with the same log, limit and fault machinery and report them the same way.
"""

from __future__ import annotations

import asyncio
import fnmatch
import random
from collections import Counter, defaultdict, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Protocol, TypeVar

import orjson
from aiohttp import web

__all__ = [
    "Blocker",
    "Faults",
    "LogEntry",
    "RandomFaultRates",
    "RequestLog",
    "ScriptedAnswer",
    "SlidingWindowLimit",
    "Storm",
    "drop_connection",
    "duplicates_report",
    "json_answer",
    "max_in_window",
    "problem",
]

PROBLEM_JSON = "application/problem+json"
SERVER_ERRORS = (500, 502, 503, 504)
# Gateways (nginx in front of the CRM) answer 502/504 with an HTML page, not JSON: clients
# must cope with an error body they cannot parse.
_GATEWAY_PAGE = (
    "<html><head><title>{0} {1}</title></head><body><center><h1>{0} {1}</h1></center>"
    "<hr><center>nginx</center></body></html>"
)


def json_answer(
    data: Any, status: int = 200, content_type: str = "application/json"
) -> web.Response:
    """A JSON response serialised with orjson."""
    return web.Response(body=orjson.dumps(data), status=status, content_type=content_type)


def problem(status: int, detail: str | None = None, **extra: Any) -> web.Response:
    """An `application/problem+json` answer, the error shape amoCRM uses."""
    body: dict[str, Any] = {
        "title": _reason(status),
        "type": f"https://httpstatus.es/{status}",
        "status": status,
    }
    if detail is not None:
        body["detail"] = detail
    body.update(extra)
    return json_answer(body, status, PROBLEM_JSON)


def server_error(status: int) -> web.Response:
    """A 5xx the way it reaches a client: JSON from the app, HTML from the gateway."""
    if status in (502, 504):
        page = _GATEWAY_PAGE.format(status, _reason(status))
        return web.Response(text=page, status=status, content_type="text/html")
    return problem(status)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def duplicates_report(
    contacts: Iterable[tuple[int, Iterable[str]]],
    open_leads: Iterable[tuple[int, Iterable[int]]],
) -> dict[str, list[dict[str, Any]]]:
    """What a relay must never produce, as `/_sim/state` reports it: one person split over
    contacts, or twice in work. `contacts` are (id, identities); `open_leads` (id, contact ids)
    of the open leads or deals."""
    owners: dict[str, list[int]] = defaultdict(list)
    for contact_id, found in contacts:
        for identity in sorted(found):
            owners[identity].append(contact_id)
    in_work: dict[int, list[int]] = defaultdict(list)
    for lead_id, contact_ids in open_leads:
        for contact_id in contact_ids:
            in_work[contact_id].append(lead_id)
    return {
        "contacts_sharing_identity": [
            {"identity": i, "contact_ids": ids} for i, ids in sorted(owners.items()) if len(ids) > 1
        ],
        "contacts_with_several_open_leads": [
            {"contact_id": c, "lead_ids": ids} for c, ids in sorted(in_work.items()) if len(ids) > 1
        ],
    }


def drop_connection(request: web.Request) -> None:
    """Close the client's connection without an answer (a reset, as a flaky network does it)."""
    if request.transport is not None:
        request.transport.abort()


@dataclass
class LogEntry:
    """One request as the simulator saw it; `status` stays None while it is being answered."""

    t: float
    method: str
    path: str
    endpoint: str
    status: int | str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "method": self.method, "path": self.path, "status": self.status}


class RequestLog:
    """Every gated request in arrival order, with the counters `/_sim/state` reports."""

    def __init__(self) -> None:
        self.entries: list[LogEntry] = []

    def start(self, t: float, method: str, path: str, endpoint: str) -> LogEntry:
        """Record an arrival; the caller fills in `status` when the answer is known."""
        entry = LogEntry(t=t, method=method, path=path, endpoint=f"{method} {endpoint}")
        self.entries.append(entry)
        return entry

    def clear(self) -> None:
        self.entries.clear()

    def by_endpoint(self) -> dict[str, int]:
        return dict(Counter(e.endpoint for e in self.entries))

    def by_status(self) -> dict[str, int]:
        return dict(Counter(str(e.status) for e in self.entries if e.status is not None))

    def max_in_any_second(self) -> int:
        return max_in_window((e.t for e in self.entries), 1.0)

    def to_json(self) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.entries]


def max_in_window(times: Iterable[float], window_s: float) -> int:
    """The most timestamps that fall into any half-open window (t - window_s, t]."""
    window: deque[float] = deque()
    best = 0
    for t in sorted(times):
        window.append(t)
        while window[0] <= t - window_s:
            window.popleft()
        best = max(best, len(window))
    return best


class SlidingWindowLimit:
    """At most `limit` arrivals in any sliding window of `window_s` seconds.

    Every arrival counts, including the ones refused: a client hammering a limited account keeps
    it limited, while a client that never sends more than `limit` per window never sees a refusal.
    The window is half-open, (now - window_s, now], the same rule `max_in_window` reports by.
    """

    def __init__(self, window_s: float = 1.0) -> None:
        self.window_s = window_s
        self._arrivals: deque[float] = deque()

    def arrive(self, now: float, limit: int) -> bool:
        """Count an arrival at `now`; False if it makes more than `limit` in the window."""
        while self._arrivals and self._arrivals[0] <= now - self.window_s:
            self._arrivals.popleft()
        self._arrivals.append(now)
        return len(self._arrivals) <= limit

    def clear(self) -> None:
        self._arrivals.clear()


class Blocker:
    """Blocks the account once too many limit violations fall into one window."""

    def __init__(self) -> None:
        self.blocked = False
        self.violations = 0
        self._recent: deque[float] = deque()

    def violation(self, now: float, block_after: int, window_s: float) -> None:
        """Record one refused request; block when `block_after` of them fall within `window_s`."""
        self.violations += 1
        self._recent.append(now)
        while self._recent and self._recent[0] <= now - window_s:
            self._recent.popleft()
        if len(self._recent) >= block_after:
            self.blocked = True

    def unblock(self) -> None:
        """Lift the block and forget recent violations so one more 429 does not re-block."""
        self.blocked = False
        self._recent.clear()

    def clear(self) -> None:
        self.unblock()
        self.violations = 0


@dataclass
class ScriptedAnswer:
    """A one-shot answer for the next `count` requests matching `method` and `path`.

    `path` and `method` are shell-style patterns (`/api/v4/leads/*`). With `apply` the request
    is carried out first and only its answer is replaced: the write lands, the client is told
    it failed.
    """

    method: str
    path: str
    status: int
    count: int = 1
    body: Any = None
    apply: bool = False

    @classmethod
    def from_json(cls, data: Any) -> ScriptedAnswer:
        """Parse one `fail_next` item; ValueError says what is wrong with it."""
        if not isinstance(data, dict):
            raise ValueError("fail_next items must be objects")
        try:
            answer = cls(
                method=str(data.get("method", "*")).upper(),
                path=str(data["path"]),
                status=int(data["status"]),
                count=int(data.get("count", 1)),
                body=data.get("body"),
                apply=bool(data.get("apply", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"fail_next item {data!r}: {exc}") from exc
        if answer.count < 1 or not 100 <= answer.status <= 599:
            raise ValueError(f"fail_next item {data!r}: bad count or status")
        return answer

    def matches(self, method: str, path: str) -> bool:
        return fnmatch.fnmatchcase(method, self.method) and fnmatch.fnmatchcase(path, self.path)

    def response(self) -> web.Response:
        if self.body is None:
            return server_error(self.status) if self.status >= 500 else problem(self.status)
        return json_answer(self.body, self.status)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "count": self.count,
            "body": self.body,
            "apply": self.apply,
        }


@dataclass
class Storm:
    """A timed rate-limit storm: until `until` (the simulator's clock) every gated request is
    refused as over the limit, whatever the client sent.

    It is the CRM's doing (another integration on the account, a busy portal), scripted by a
    test, so its refusals are counted here and never as violations of the client's.
    """

    until: float = float("-inf")
    refused: int = 0

    def start(self, now: float, seconds: float) -> None:
        """Refuse everything from `now` for `seconds` (extending a storm already under way)."""
        self.until = max(self.until, now + seconds)

    def stop(self) -> None:
        self.until = float("-inf")

    def active(self, now: float) -> bool:
        return now < self.until

    def refuse(self, now: float) -> bool:
        """True (and counted) if a request arriving at `now` falls into the storm."""
        if not self.active(now):
            return False
        self.refused += 1
        return True

    def to_json(self, now: float) -> dict[str, Any]:
        return {"active": self.active(now), "refused": self.refused}


class RandomFaultRates(Protocol):
    """The random-fault settings every simulator's config carries."""

    latency_s: float
    error_rate: float
    timeout_rate: float
    hang_s: float
    reset_rate: float


_Answer = TypeVar("_Answer", bound=web.StreamResponse)


@dataclass
class Faults:
    """Random and scripted misbehaviour, reproducible through `seed`."""

    seed: int | None = None
    scripted: list[ScriptedAnswer] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    storm: Storm = field(default_factory=Storm)

    def __post_init__(self) -> None:
        self.random = random.Random(self.seed)

    def reset(self, seed: int | None) -> None:
        """Forget scripted answers and any storm; restart the random sequence from `seed`."""
        self.seed = seed
        self.scripted.clear()
        self.storm = Storm()
        self.random = random.Random(seed)

    async def around_work(
        self,
        request: web.Request,
        rates: RandomFaultRates,
        work: Callable[[], Awaitable[_Answer]],
    ) -> _Answer | web.Response | None:
        """Run `work` the way a flaky CRM does: a 5xx *instead of* it (`error_rate`), else after
        `latency_s`; once it is done, a hang of `hang_s` (`timeout_rate`) or a dropped connection
        (`reset_rate`, answered None). The last two are what makes duplicates: the write landed,
        the client cannot know."""
        if self.roll(rates.error_rate):
            return self.server_error()
        await self.sleep(rates.latency_s)
        response = await work()
        if self.roll(rates.timeout_rate):
            await self.sleep(rates.hang_s)
        if self.roll(rates.reset_rate):
            drop_connection(request)
            return None
        return response

    def take_scripted(self, method: str, path: str) -> ScriptedAnswer | None:
        """Consume the first scripted answer that matches, in the order they were added."""
        for answer in self.scripted:
            if answer.matches(method, path):
                answer.count -= 1
                if answer.count == 0:
                    self.scripted.remove(answer)
                return answer
        return None

    def roll(self, rate: float) -> bool:
        """True with probability `rate`; a zero rate draws nothing, keeping sequences stable."""
        return rate > 0 and self.random.random() < rate

    def server_error(self) -> web.Response:
        return server_error(self.random.choice(SERVER_ERRORS))

    async def sleep(self, seconds: float) -> None:
        """Wait, but give up as soon as the server shuts down so cleanup is never held up."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            pass
