"""The backbone's guarantees against the Bitrix24 simulator, and batch delivery's own cases.

The duplicate tests of test_delivery.py are imported here and run again with this module's
`simulator` and `crm_settings` fixtures, i.e. over real HTTP to the Bitrix24 simulator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.app import WORKER, Roles
from service.db.store import load_queries
from service.simulators.bitrix24.server import (
    BitrixSimulator,
)
from tests.conftest import ServiceFactory, wait_for
from tests.integration.bitrix24_sim import roomy_simulator
from tests.integration.crm_faults import crash_after_crm
from tests.integration.test_delivery import (  # noqa: F401 - collected again, against Bitrix24
    all_delivered,
    no_duplicates,
    test_fifty_identical_submissions_make_one_lead,
    test_two_hundred_submissions_for_forty_people,
)


@pytest.fixture
async def simulator() -> AsyncIterator[tuple[BitrixSimulator, str]]:
    async with roomy_simulator() as started:
        yield started


@pytest.fixture
def crm_settings(simulator: tuple[BitrixSimulator, str]) -> dict[str, Any]:
    sim, url = simulator
    return {"crm_kind": "bitrix24", "bitrix24_webhook_url": sim.webhook_url(url)}


def person(i: int) -> dict[str, Any]:
    return {"name": f"Клиент {i}", "phone": f"+7705{i:07d}", "email": f"c{i}@example.kz"}


async def queue_then_drain(
    service_factory: ServiceFactory, bodies: list[dict[str, Any]], **settings: Any
) -> None:
    """Queue everything with the worker off, so the worker meets it as one backlog."""
    intake = await service_factory(Roles(worker=False))
    answers = await asyncio.gather(*(intake.submit("course", b) for b in bodies))
    assert all(a["ok"] for _, a in answers)
    await service_factory(Roles(http=False), **settings)


async def test_backlog_of_fifty_new_people_takes_a_few_requests(
    service_factory: ServiceFactory,
    simulator: tuple[BitrixSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim = simulator[0]
    await queue_then_drain(service_factory, [person(i) for i in range(50)])
    await wait_for(lambda: all_delivered(db, 50))
    report = sim.report()
    assert len(report["contacts"]) == 50 and len(report["deals"]) == 50
    no_duplicates(report)
    assert report["requests_total"] <= 5, report["requests_by_endpoint"]  # ≤ 0.1 per lead


async def test_one_bad_command_in_a_batch_fails_only_its_own_job(
    service_factory: ServiceFactory,
    simulator: tuple[BitrixSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim = simulator[0]
    sim.fail_command("crm.deal.add", count=1, error="ERROR_CORE", description="bad stage")
    await queue_then_drain(service_factory, [person(i) for i in range(50)])

    async def settled() -> bool:
        n = await db.fetchval("SELECT count(*) FROM jobs WHERE state IN ('done', 'dead')")
        return bool(n == 50)

    await wait_for(settled)
    states = dict(await db.fetch("SELECT state, count(*) FROM jobs GROUP BY state"))
    assert states == {"done": 49, "dead": 1}, states
    assert "ERROR_CORE" in await db.fetchval("SELECT last_error FROM jobs WHERE state = 'dead'")

    # replay (the `replay` query, as the CLI runs it): the retry finds the contact its first
    # attempt created, so there is no second contact
    await db.fetchval(load_queries()["replay"], None)
    await db.execute(load_queries()["notify_jobs"])
    await wait_for(lambda: all_delivered(db, 50))
    report = sim.report()
    assert len(report["contacts"]) == 50 and len(report["deals"]) == 50
    no_duplicates(report)


async def test_returning_people_in_one_backlog_get_their_deal_updated(
    service_factory: ServiceFactory,
    simulator: tuple[BitrixSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim = simulator[0]
    bodies = [dict(person(i), visit=n) for i in range(20) for n in range(3)]
    await queue_then_drain(service_factory, bodies)
    await wait_for(lambda: all_delivered(db, 60))
    report = sim.report()
    assert len(report["contacts"]) == 20 and len(report["deals"]) == 20
    no_duplicates(report)
    assert len(report["comments"]) >= 40  # every later submission is on the deal's timeline


async def test_crash_after_the_crm_call_makes_no_duplicate(
    service_factory: ServiceFactory,
    simulator: tuple[BitrixSimulator, str],
    db: asyncpg.Connection,
) -> None:
    svc = await service_factory(lease_s=1.5)
    crashed = crash_after_crm(svc.app[WORKER])
    await svc.submit("course", person(1))
    await wait_for(lambda: all_delivered(db, 1))
    assert crashed
    report = simulator[0].report()
    assert len(report["contacts"]) == 1 and len(report["deals"]) == 1
    no_duplicates(report)


async def test_bucket_is_never_overflowed_at_the_portal_rate(
    service_factory: ServiceFactory,
    simulator: tuple[BitrixSimulator, str],
    db: asyncpg.Connection,
) -> None:
    """Bitrix24's real bucket: drains 2/s, holds 50. At CRM_RATE_LIMIT=2 we never see a 503."""
    sim = simulator[0]
    sim.config.drain_per_s, sim.config.burst = 2.0, 50
    await queue_then_drain(service_factory, [person(i) for i in range(60)], crm_rate_limit=2.0)
    await wait_for(lambda: all_delivered(db, 60), timeout=30)
    report = sim.report()
    assert report["violations"] == 0
    assert report["answers_by_status"].get("503", 0) == 0
    no_duplicates(report)


async def test_one_refused_batch_pauses_everyone_once(
    service_factory: ServiceFactory,
    simulator: tuple[BitrixSimulator, str],
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """QUERY_LIMIT_EXCEEDED on a batch carrying 50 deliveries is one refusal: one pause of the
    base length (CRM_PAUSE_BASE_S, 0.2 s here), not fifty pauses doubling up to the longest."""
    sim = simulator[0]
    limited = {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}
    sim.fail_next("POST", "*/batch.json", 503, body=limited)
    with caplog.at_level(logging.WARNING, logger="service.delivery.limits"):
        await queue_then_drain(service_factory, [person(i) for i in range(50)])
        await wait_for(lambda: all_delivered(db, 50))
    pauses = [r.seconds for r in caplog.records if getattr(r, "action", "") == "crm_pause"]
    assert pauses == [0.2], pauses
    assert sim.report()["answers_by_status"]["503"] == 1
    # one attempt each, the delivery itself: the pause is not counted
    assert await db.fetchval("SELECT max(attempts) FROM jobs") == 1
