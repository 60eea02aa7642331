"""Bitrix24 over OAuth app tokens: tokens expire while two worker processes drain a backlog, and
every lead still arrives once, with one refresh per expiry and the pair in use stored."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.app import Roles
from service.simulators.bitrix24.server import (
    BitrixSimulator,
)
from tests.conftest import ServiceFactory, wait_for
from tests.integration.bitrix24_sim import roomy_simulator
from tests.integration.test_delivery import no_duplicates

PEOPLE = 60


@pytest.fixture
async def simulator() -> AsyncIterator[tuple[BitrixSimulator, str]]:
    async with roomy_simulator() as started:
        yield started


@pytest.fixture
def crm_settings(simulator: tuple[BitrixSimulator, str]) -> dict[str, Any]:
    sim, url = simulator
    app = sim.config.oauth
    return {
        "crm_kind": "bitrix24",
        "bitrix24_portal_url": sim.portal_url(url),
        "bitrix24_oauth_url": sim.oauth_url(url),
        "bitrix24_client_id": app.client_id,
        "bitrix24_client_secret": app.client_secret,
        "bitrix24_refresh_token": app.refresh_token,
    }


def person(i: int) -> dict[str, Any]:
    return {"name": f"Клиент {i}", "phone": f"+7706{i:07d}", "email": f"o{i}@example.kz"}


async def test_tokens_expiring_mid_run_deliver_every_lead_once(
    service_factory: ServiceFactory,
    simulator: tuple[BitrixSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim = simulator[0]
    intake = await service_factory(Roles(worker=False))
    answers = await asyncio.gather(*(intake.submit("course", person(i)) for i in range(PEOPLE)))
    assert all(a["ok"] for _, a in answers)
    # two worker processes (each its own pool and token cache) share the one stored pair;
    # small batches at a modest rate make the drain last long enough for several expiries
    for _ in range(2):
        await service_factory(Roles(http=False), crm_rate_limit=24.0, worker_round=4)

    # every token dies three times mid-run (tokens live an hour, so one expiry per drain is
    # already more than real life: expiring faster than a call's wait for the gate would only
    # test that a token refreshed for a call may be dead before the call is repeated)
    thresholds = [10, 25, 40]
    expiries = 0

    async def expire_at_thresholds() -> bool:
        nonlocal expiries
        done = await db.fetchval("SELECT count(*) FROM submissions WHERE state = 'delivered'")
        # one expiry at a time: the next only once the last one's refresh has happened
        recovered = sim.tokens.refreshes == expiries + 1
        if thresholds and done >= thresholds[0] and recovered:
            thresholds.pop(0)
            sim.expire_tokens()
            expiries += 1
        return bool(done == PEOPLE)

    await wait_for(expire_at_thresholds, timeout=60, every=0.05)
    report = sim.report()
    assert len(report["contacts"]) == PEOPLE and len(report["deals"]) == PEOPLE
    no_duplicates(report)
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE state <> 'done'") == 0
    oauth = report["oauth"]
    statuses = report["answers_by_status"]
    assert expiries == 3 and statuses.get("401", 0) >= 3, (expiries, statuses)
    # one refresh for the start and one per expiry, however many callers in two processes saw
    # it; none refused: nobody spent a refresh token that someone else had already spent
    assert (oauth["refreshes"], oauth["refused"]) == (expiries + 1, 0), (statuses, oauth)
    stored = await db.fetchval("SELECT refresh_token FROM oauth_tokens WHERE crm = 'bitrix24'")
    assert stored == oauth["refresh_token"]
