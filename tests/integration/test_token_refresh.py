"""An access token that dies while a queue of calls waits at the rate gate (amoCRM and Bitrix24).

Every call reads the token only once its slot is granted, and the first refusal starts the one
refresh of the process: the calls queued behind it wait for that refresh instead of sending the
dead token (and each opening a transaction on the token row). Measured by the simulators: how
many 401s they answered, how many refresh exchanges they served, and that no refresh token was
ever presented twice (they are single-use).

Each test runs once per CRM: `simulator` is parametrised, and `crm_settings` points the service
at it with OAuth credentials.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from service.app import GATE, WORKER, Roles
from service.delivery.control import DELIVERY_CONTROL
from service.delivery.limits import RateGate
from service.simulators.amocrm.server import AmoCrmSimulator, SimulatorConfig, start_simulator
from service.simulators.bitrix24.server import (
    BitrixSimulator,
    BitrixSimulatorConfig,
    start_bitrix_simulator,
)
from tests.conftest import Service, ServiceFactory, wait_for
from tests.integration.test_delivery import all_delivered, no_duplicates

Simulator = AmoCrmSimulator | BitrixSimulator
QUEUED = 40  # people delivered at once after the expiry: one gated call each, at least
# CRM_RATE_LIMIT: one process spaces its calls 1/RATE apart (100 ms), far longer than a 401
# takes to come back over loopback, and the queue is still long when it does
RATE = 10.0
AMO_TOKEN_ENDPOINT = "POST /oauth2/access_token"


@pytest.fixture(params=["amocrm", "bitrix24"])
async def simulator(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Simulator, str]]:
    """The CRM of this run's kind on a real port, with a roomy limit (overrides conftest's)."""
    if request.param == "amocrm":
        amo = AmoCrmSimulator(SimulatorConfig(rate_limit=200, block_after=1000))
        runner, url = await start_simulator(amo)
        sim: Simulator = amo
    else:
        config = BitrixSimulatorConfig(drain_per_s=400, burst=250, overload_after=1000)
        bitrix = BitrixSimulator(config)
        runner, url = await start_bitrix_simulator(bitrix)
        sim = bitrix
    yield sim, url
    await runner.cleanup()


@pytest.fixture
def crm_settings(simulator: tuple[Simulator, str]) -> dict[str, Any]:
    """OAuth credentials, and a delivery that costs one gated call per person at least:
    amoCRM searches every new person (no index, no batch-wide lookup); Bitrix24 delivers one
    person per batch."""
    sim, url = simulator
    if isinstance(sim, BitrixSimulator):
        app = sim.config.oauth
        return {
            "crm_kind": "bitrix24",
            "bitrix24_portal_url": sim.portal_url(url),
            "bitrix24_oauth_url": sim.oauth_url(url),
            "bitrix24_client_id": app.client_id,
            "bitrix24_client_secret": app.client_secret,
            "bitrix24_refresh_token": app.refresh_token,
            "worker_round": 1,
        }
    cfg = sim.config
    return {
        "amocrm_access_token": None,
        "amocrm_client_id": cfg.client_id,
        "amocrm_client_secret": cfg.client_secret,
        "amocrm_refresh_token": cfg.refresh_token,
        "amocrm_redirect_uri": "https://relay.example/oauth",
        "amocrm_dedup": "search",
    }


def person(i: int) -> dict[str, Any]:
    return {"name": f"Client {i}", "phone": f"+7707{i:07d}", "email": f"t{i}@example.kz"}


def exchanges(sim: Simulator) -> tuple[int, int]:
    """(refresh exchanges served, refresh tokens refused) so far."""
    if isinstance(sim, BitrixSimulator):
        oauth = sim.report()["oauth"]
        return oauth["refreshes"], oauth["refused"]
    answers = [e.status for e in sim.log.entries if e.endpoint == AMO_TOKEN_ENDPOINT]
    return answers.count(200), len(answers) - answers.count(200)


def unauthorized(sim: Simulator) -> int:
    """Calls the CRM refused for their token (401; Bitrix24: `expired_token`)."""
    return int(sim.report()["answers_by_status"].get("401", 0))


class GateQueue:
    """How many callers wait at once for a slot of the service's rate gate."""

    def __init__(self) -> None:
        self.waiting = 0
        self.most = 0

    def watch(self, gate: RateGate, monkeypatch: pytest.MonkeyPatch) -> None:
        admit = gate.slot

        @asynccontextmanager
        async def slot(*args: Any, **kwargs: Any) -> AsyncIterator[None]:
            self.waiting += 1
            self.most = max(self.most, self.waiting)
            admitted = False
            try:
                async with admit(*args, **kwargs):
                    self.waiting -= 1
                    admitted = True
                    yield
            finally:
                if not admitted:
                    self.waiting -= 1

        monkeypatch.setattr(gate, "slot", slot)


async def set_paused(intake: Service, workers: list[Service], paused: bool) -> None:
    """Pause or resume delivery for the cluster; return once every worker follows."""
    await intake.app[DELIVERY_CONTROL].set(paused, "test")

    async def followed() -> bool:
        return all(w.app[DELIVERY_CONTROL].paused == paused for w in workers)

    await wait_for(followed)


async def warm_up(intake: Service, workers: list[Service], db: asyncpg.Connection) -> int:
    """Deliver one person through each worker in turn, so that each holds the token in memory
    (the first delivery makes the first exchange: the stored row starts empty). The others are
    held paused in their own process meanwhile: which worker wakes first to a NOTIFY is the
    machine's choice, and a loaded machine let one take twenty people in a row. Returns how
    many were delivered."""
    for n, worker in enumerate(workers, start=1):
        others = [w.app[WORKER] for w in workers if w is not worker]
        for other in others:
            other.paused = True
        try:
            await intake.submit("course", person(1000 + n))
            await wait_for(lambda n=n: all_delivered(db, n))
        finally:
            for other in others:
                other.paused = False
                other.wake()
        assert worker.app[WORKER].delivered == 1
    return len(workers)


async def queue_behind_expired_token(
    intake: Service, workers: list[Service], sim: Simulator, db: asyncpg.Connection
) -> tuple[int, int, int]:
    """Warm up, then, with delivery paused, queue QUEUED more people, expire every token, and
    resume. Returns the people delivered before, and the exchanges and 401s counted then."""
    warm = await warm_up(intake, workers, db)
    await set_paused(intake, workers, True)
    answers = await asyncio.gather(
        *(intake.submit("course", person(i)) for i in range(1, QUEUED + 1))
    )
    assert all(status == 200 and a["ok"] for status, a in answers), answers
    before = warm, exchanges(sim)[0], unauthorized(sim)
    sim.expire_tokens()
    await set_paused(intake, workers, False)
    await wait_for(lambda: all_delivered(db, warm + QUEUED), timeout=60)
    return before


async def assert_delivered_once(
    sim: Simulator, db: asyncpg.Connection, crm: str, people: int
) -> None:
    report = sim.report()
    assert len(report["contacts"]) == len(report["leads"]) == people
    no_duplicates(report)
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE state <> 'done'") == 0
    # no token lost: the pair stored is the one the CRM holds now
    stored = await db.fetchval("SELECT refresh_token FROM oauth_tokens WHERE crm = $1", crm)
    assert stored == sim.tokens.refresh_token


# amoCRM only: a round searches for its people at once, so they queue at the gate. A Bitrix24
# round sends its batches one after another, and the worker binds late (claims the next round
# only when the gate has a turn nobody waits for), so one process never queues Bitrix24 calls;
# the two-process test below meets the expiry with Bitrix24 calls in flight in both.
@pytest.mark.parametrize("simulator", ["amocrm"], indirect=True)
async def test_a_queue_at_the_gate_meets_an_expired_token_with_one_refresh(
    service_factory: ServiceFactory,
    simulator: tuple[Simulator, str],
    crm_settings: dict[str, Any],
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sim = simulator[0]
    svc = await service_factory(crm_rate_limit=RATE)
    queue = GateQueue()
    queue.watch(svc.app[GATE], monkeypatch)

    warm, exchanges_before, refused_before = await queue_behind_expired_token(svc, [svc], sim, db)

    assert queue.most >= 30, queue.most  # the queue really was there
    assert (warm, exchanges_before, refused_before) == (1, 1, 0)
    statuses = sim.report()["answers_by_status"]
    # one caller meets the dead token (two if a second slot was granted while its 401 travelled)
    assert 1 <= unauthorized(sim) <= 2, statuses
    # exactly one more exchange, and no refresh token presented twice
    assert exchanges(sim) == (2, 0), statuses
    await assert_delivered_once(sim, db, crm_settings.get("crm_kind", "amocrm"), warm + QUEUED)


async def test_two_processes_on_one_database_exchange_the_refresh_token_once(
    service_factory: ServiceFactory,
    simulator: tuple[Simulator, str],
    crm_settings: dict[str, Any],
    db: asyncpg.Connection,
) -> None:
    sim = simulator[0]
    intake = await service_factory(Roles(worker=False))
    # each process takes at most 20 people at a time, so both take part in the drain
    workers = [
        await service_factory(Roles(http=False), crm_rate_limit=RATE, worker_round=20)
        for _ in range(2)
    ]
    warm, exchanges_before, refused_before = await queue_behind_expired_token(
        intake, workers, sim, db
    )

    assert (exchanges_before, refused_before) == (1, 0)
    statuses = sim.report()["answers_by_status"]
    # Two processes split the limit into shares, and a share is admitted as a burst (at most
    # share calls in flight, not spaced): each process learns of the expiry from the calls it
    # had in flight when its first 401 came back, so together at most the limit's RATE calls.
    # Sending the token read before queueing, the 40 queued calls all met it.
    assert 2 <= unauthorized(sim) <= RATE, statuses
    # both held the dead token, and one exchange served both: the other found the new pair in
    # the row (the refresh token is single-use: a second exchange of it would be refused)
    assert exchanges(sim) == (2, 0), statuses
    await assert_delivered_once(sim, db, crm_settings.get("crm_kind", "amocrm"), warm + QUEUED)
    # and the stored pair goes on working for whichever process calls next
    await intake.submit("course", person(QUEUED + 1))
    await wait_for(lambda: all_delivered(db, warm + QUEUED + 1))
    assert exchanges(sim) == (2, 0)
