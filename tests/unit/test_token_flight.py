"""The token discipline shared by both CRM clients (service/crm/http.py) and the gate's front of
the line (service/delivery/limits.py), step by step with a gate whose turns the test hands out.

- the token is read when the slot is granted, not when the call starts queueing;
- one refresh per process however many callers meet the refused token, and nobody holds a slot
  while it runs;
- a token exchange that needs a slot of the gate gets the next one, not one behind the queue.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from service.crm.http import Answer, Credentials, send_with_token
from service.delivery.limits import RateGate
from service.errors import CrmUnauthorized


class HandedGate:
    """A Gate whose turns the test grants one by one, in the order they were asked for."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[None]] = []
        self.active = 0
        self.granted = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(turn)
        await turn
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    def grant(self, n: int) -> None:
        for _ in range(n):
            self.waiting.pop(0).set_result(None)
            self.granted += 1


class Tokens:
    """A TokenSource whose refresh waits until the test lets it finish."""

    def __init__(self, gate: HandedGate) -> None:
        self.gate = gate
        self.token = "old"
        self.loads = 0
        self.refreshed: list[str] = []
        self.slots_held_during_refresh: list[int] = []
        self.finish = asyncio.Event()

    async def access_token(self) -> str:
        self.loads += 1
        return self.token

    async def refresh(self, stale_access_token: str) -> str:
        self.refreshed.append(stale_access_token)
        await self.finish.wait()
        self.slots_held_during_refresh.append(self.gate.active)
        self.token = "new"
        return self.token


async def drain(gate: HandedGate, calls: list[asyncio.Task[Answer]]) -> list[Answer]:
    """Grant every turn asked for until all calls are done (bounded)."""
    for _ in range(1000):
        if all(c.done() for c in calls):
            return [c.result() for c in calls]
        gate.grant(len(gate.waiting))
        await asyncio.sleep(0.001)
    raise AssertionError("the calls did not finish")


async def until(condition: Callable[[], bool]) -> None:
    """Let the other tasks run until `condition` holds (bounded)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("condition not met")


@pytest.fixture
async def crm() -> AsyncIterator[tuple[str, list[str]]]:
    """A CRM endpoint that refuses the token "old" (401); every token it saw, in order."""
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        token = request.headers["Authorization"].removeprefix("Bearer ")
        seen.append(token)
        return web.json_response({"ok": token}, status=401 if token == "old" else 200)

    app = web.Application()
    app.router.add_get("/api", handle)
    async with TestServer(app) as server:
        yield str(server.make_url("/api")), seen


async def call(
    session: aiohttp.ClientSession, gate: HandedGate, credentials: Credentials, url: str
) -> Answer:
    return await send_with_token(
        session,
        gate,
        credentials,
        "GET",
        url,
        authorize=lambda token: (None, {"Authorization": f"Bearer {token}"}),
        refused=lambda status, _: status == 401,
        timeout_s=5,
    )


async def test_a_queue_behind_a_refused_token_waits_for_one_refresh_without_slots(
    crm: tuple[str, list[str]],
) -> None:
    url, seen = crm
    gate = HandedGate()
    tokens = Tokens(gate)
    credentials = Credentials(tokens)
    async with aiohttp.ClientSession() as session:
        calls = [asyncio.create_task(call(session, gate, credentials, url)) for _ in range(5)]
        await until(lambda: len(gate.waiting) == 5)  # all queued, the token loaded once
        assert tokens.loads == 1

        gate.grant(1)  # the first call sends "old", is refused and starts the refresh
        await until(lambda: bool(tokens.refreshed))
        gate.grant(2)  # two more turns come while the refresh runs: they send nothing
        await until(lambda: len(gate.waiting) == 2)
        assert (seen, gate.active) == (["old"], 0)

        tokens.finish.set()  # the refresh ends; every caller queues again for a slot
        await until(lambda: len(gate.waiting) == 5)
        answers = await drain(gate, calls)

    assert [status for status, _, _ in answers] == [200] * 5
    assert seen == ["old"] + ["new"] * 5  # the refused token went out once
    assert tokens.refreshed == ["old"]  # one refresh for all of them
    assert tokens.slots_held_during_refresh == [0]
    assert gate.granted == 1 + 2 + 5  # the two turns that came mid-refresh were given back


async def test_callers_refused_together_share_one_refresh(crm: tuple[str, list[str]]) -> None:
    url, seen = crm
    gate = HandedGate()
    tokens = Tokens(gate)
    tokens.finish.set()
    credentials = Credentials(tokens)
    async with aiohttp.ClientSession() as session:
        calls = [asyncio.create_task(call(session, gate, credentials, url)) for _ in range(4)]
        await until(lambda: len(gate.waiting) == 4)
        gate.grant(4)  # all four send "old" at once: all are refused
        answers = await drain(gate, calls)
    assert [status for status, _, _ in answers] == [200] * 4
    assert sorted(seen) == ["new"] * 4 + ["old"] * 4
    assert tokens.refreshed == ["old"]


async def test_a_failed_refresh_reaches_every_waiter_and_the_next_call_starts_over(
    crm: tuple[str, list[str]],
) -> None:
    url, seen = crm
    gate = HandedGate()
    attempts: list[str] = []
    fail = asyncio.Event()

    class Refusing:
        async def access_token(self) -> str:
            return "old"

        async def refresh(self, stale_access_token: str) -> str:
            attempts.append(stale_access_token)
            await fail.wait()
            raise CrmUnauthorized("refresh token revoked", status=400)

    credentials = Credentials(Refusing())
    async with aiohttp.ClientSession() as session:
        calls = [asyncio.create_task(call(session, gate, credentials, url)) for _ in range(3)]
        await until(lambda: len(gate.waiting) == 3)
        gate.grant(1)
        await until(lambda: bool(attempts))
        gate.grant(2)  # these join the refresh under way
        await until(lambda: not gate.waiting)
        fail.set()
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, CrmUnauthorized) for r in results), results
        assert attempts == ["old"]
        # the next call starts over: it loads the token again (another process may have
        # refreshed it), is refused, and tries one more refresh
        next_call = asyncio.create_task(call(session, gate, credentials, url))
        await until(lambda: len(gate.waiting) == 1)
        gate.grant(1)
        with pytest.raises(CrmUnauthorized):
            await next_call
    assert attempts == ["old", "old"]
    assert seen == ["old", "old"]


async def _take(gate: Any, name: str, order: list[str]) -> None:
    async with gate.slot():
        order.append(name)


async def test_front_of_the_line_takes_the_next_turn() -> None:
    gate = RateGate(40.0)  # a turn every 25 ms
    order: list[str] = []
    queue = [asyncio.create_task(_take(gate, f"q{i}", order)) for i in range(8)]
    await until(lambda: len(order) >= 2)
    front = asyncio.create_task(_take(gate.front(), "front", order))
    await asyncio.sleep(0)  # it asks for its turn
    ahead = len(order)
    await asyncio.gather(front, *queue)
    assert order.index("front") == ahead, order  # before the six still queued
    assert sorted(order) == sorted(["front", *(f"q{i}" for i in range(8))])


async def test_front_of_an_empty_line_takes_its_own_turn() -> None:
    gate = RateGate(1.0)  # a turn every 1.02 s
    admitted: list[float] = []

    async def take() -> None:
        async with gate.slot():
            admitted.append(time.monotonic())

    async def take_first() -> None:
        async with gate.front().slot():
            admitted.append(time.monotonic())

    await asyncio.wait_for(take_first(), timeout=5)
    # and the turn it took counts: the next caller waits for the bucket as usual (a bound from
    # below: a loaded machine only makes the wait longer)
    await asyncio.wait_for(take(), timeout=5)
    assert admitted[1] - admitted[0] >= 0.9


async def _cancelled(aw: Awaitable[None]) -> None:
    task = asyncio.ensure_future(aw)
    for _ in range(5):  # it queues for its turn (a few steps, no real time)
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_cancelled_front_waiter_leaves_the_queue_as_it_was() -> None:
    # A turn every 0.2 s: the front waiter is cancelled long before the next turn comes (at
    # 40/s a loaded machine let a turn reach it first: handed over, the queue's order changed)
    gate = RateGate(5.0)
    order: list[str] = []
    async with gate.slot():
        queue = [asyncio.create_task(_take(gate, f"q{i}", order)) for i in range(3)]
        await _cancelled(_take(gate.front(), "front", order))
    await asyncio.wait_for(asyncio.gather(*queue), timeout=5)
    assert order == ["q0", "q1", "q2"]
