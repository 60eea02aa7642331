"""The contact index reads amoCRM politely (CRM_FACTS.md, "amoCRM politeness": Kommo restricts
by IP, then 403s everything, clients that iterate over all data without need or read the same
data again and again): its own small share of the limit, a full read that resumes where it
stopped, and changes re-read at most every few seconds rather than before every batch."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import pytest

from service.app import Roles
from service.crm.amocrm.adapter import AmoCrmAdapter
from service.crm.amocrm.api import AmoCrmApi, StaticToken
from service.crm.amocrm.index import ContactIndex, reuse_window
from service.crm.base import Delivery, Link
from service.db.database import create_pool
from service.delivery.limits import RateGate
from service.errors import CrmRetryable
from service.model import Lead
from service.settings import AmoCrmSettings, LeadSettings
from service.simulators.amocrm.server import AmoCrmSimulator
from service.simulators.common import max_in_window
from tests.conftest import ServiceFactory, wait_for
from tests.integration.test_contact_index import (
    crm_identities,
    indexed,
    manager_contact,
    reads,
    sync_state,
)
from tests.integration.test_delivery import all_delivered, no_duplicates


@pytest.fixture
async def amo_parts(
    db_dsn: str, simulator: tuple[AmoCrmSimulator, str]
) -> AsyncIterator[tuple[AmoCrmApi, asyncpg.Pool, asyncpg.Pool]]:
    """A client of the simulator and two pools on the test's database (two processes' worth)."""
    sim, url = simulator
    pools = [await create_pool(db_dsn, min_size=1, max_size=3) for _ in range(2)]
    async with aiohttp.ClientSession() as http:
        yield AmoCrmApi(http, url, StaticToken(sim.config.access_token), RateGate(1000.0)), *pools
    for pool in pools:
        await pool.close()


def seed(sim: AmoCrmSimulator, n: int) -> None:
    sim.seed_contacts([manager_contact(f"+7707{i:07d}", updated_at=1000 + i) for i in range(n)])


def list_times(sim: AmoCrmSimulator) -> list[float]:
    return [e.t for e in sim.log.entries if e.endpoint == "GET /api/v4/contacts"]


async def test_the_index_reads_at_its_own_share_of_the_limit(
    amo_parts: tuple[AmoCrmApi, asyncpg.Pool, asyncpg.Pool],
    simulator: tuple[AmoCrmSimulator, str],
) -> None:
    """A 12/s account, a third of it for the index: its list requests never exceed 4 in any
    second, however many pages there are to read (here 8, in one go)."""
    sim, _ = simulator
    api, pool, _ = amo_parts
    seed(sim, 750)
    index = ContactIndex(api, pool, page_limit=100, pages_per_round=10, rate=12 / 3)
    assert await index.refresh() is True
    times = list_times(sim)
    assert len(times) == 8
    assert max_in_window(times, 1.0) <= 4, times


async def test_a_full_read_resumes_where_it_stopped(
    amo_parts: tuple[AmoCrmApi, asyncpg.Pool, asyncpg.Pool],
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    """The first read of a big account stops twice — a failed request, then the process gone
    (another takes over, as after a restart) — and reads no page of it twice."""
    sim, _ = simulator
    api, pool_a, pool_b = amo_parts
    seed(sim, 1000)
    first = ContactIndex(api, pool_a, page_limit=100, pages_per_round=3)
    assert await first.refresh() is False  # pages 1-3 of 10 (and one short page at the end)
    sim.fail_next("GET", "/api/v4/contacts", 503)
    with pytest.raises(Exception, match="503"):
        await first.refresh()
    assert await first.refresh() is False  # pages 4-6
    # the process is gone; another one reads the rest in the background
    second = ContactIndex(api, pool_b, page_limit=100, pages_per_round=3)
    await asyncio.wait_for(second.scan(), timeout=30)
    # what one uninterrupted read costs (11 pages: each starts one second before the last one
    # seen); the refused request never reached the list
    assert reads(sim) == {"list": 11}
    assert (await sync_state(db))["full_scan_done"]
    assert await indexed(db) == crm_identities(sim)


async def test_changes_are_re_read_at_most_every_reuse_window(
    amo_parts: tuple[AmoCrmApi, asyncpg.Pool, asyncpg.Pool],
    simulator: tuple[AmoCrmSimulator, str],
) -> None:
    sim, _ = simulator
    api, pool, _ = amo_parts
    seed(sim, 10)
    now = [100.0]
    index = ContactIndex(api, pool, reuse_s=2.0, clock=lambda: now[0])
    assert await index.refresh() is True
    for step in (0.5, 1.0, 0.4):  # batches within 2 s of the round: no request
        now[0] += step
        assert await index.refresh() is True
    assert reads(sim) == {"list": 1}
    now[0] += 0.2  # 2.1 s after the round started: read what changed
    assert await index.refresh() is True
    assert reads(sim) == {"list": 2}


def test_the_reuse_window_is_at_most_half_a_lease() -> None:
    assert reuse_window(5.0, lease_s=30.0) == 5.0
    assert reuse_window(5.0, lease_s=4.0) == 2.0  # a dead worker's delivery: half a lease


async def test_a_retry_after_a_lost_answer_reads_within_the_window_and_finds_its_contact(
    amo_parts: tuple[AmoCrmApi, asyncpg.Pool, asyncpg.Pool],
    simulator: tuple[AmoCrmSimulator, str],
) -> None:
    """Batches of first attempts share a round for the whole window, the contacts they make
    going into the index from the CRM's answers; a retry (a counted attempt before: its write
    may have landed unanswered) has a round of its own and finds the contact it made."""
    sim, url = simulator
    api, pool, _ = amo_parts
    adapter = AmoCrmAdapter(api, AmoCrmSettings(base_url=url), LeadSettings(), pool)
    adapter.index = ContactIndex(api, pool, reuse_s=60.0)
    first = Lead(form="course", phone="+77010000041", email=None, name=None)
    [made] = await adapter.deliver_batch([Delivery(1, 1, uuid.uuid4(), first, Link())])
    assert isinstance(made, Link)
    assert reads(sim) == {"list": 1}

    lost = Lead(form="course", phone="+77010000042", email="lost@example.kz", name=None)
    sim.config.reset_rate = 1.0  # the contact and lead are made, the answer never comes
    [failed] = await adapter.deliver_batch([Delivery(2, 2, uuid.uuid4(), lost, Link())])
    sim.config.reset_rate = 0.0
    assert isinstance(failed, CrmRetryable)
    assert reads(sim) == {"list": 1}  # the first round answered: within the window
    assert len(sim.report()["contacts"]) == 2

    [retried] = await adapter.deliver_batch(
        [Delivery(2, 2, uuid.uuid4(), lost, Link(), attempts=1)]
    )
    assert reads(sim)["list"] == 2  # its own round, then its contact read back
    report = sim.report()
    assert len(report["contacts"]) == 2 and len(report["leads"]) == 2
    assert isinstance(retried, Link) and retried.contact_id == max(
        c["id"] for c in report["contacts"]
    )
    no_duplicates(report)


async def test_the_service_reads_a_big_account_in_the_background(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    """Nobody has submitted anything yet: the worker's process reads the account at the index's
    share (a third of 30/s here) until the index can answer, and then stops reading."""
    sim, _ = simulator
    seed(sim, 1200)
    await service_factory(Roles(http=False), crm_rate_limit=30.0)

    async def done() -> bool:
        row = await db.fetchrow("SELECT full_scan_done, caught_up FROM contact_index_sync")
        return row is not None and row["full_scan_done"] and row["caught_up"]

    await wait_for(done, timeout=30)
    await asyncio.sleep(0.5)
    times = list_times(sim)
    assert len(times) == 5  # 4 full pages of 250 and a short one, nothing after
    assert max_in_window(times, 1.0) <= 10, times
    assert await indexed(db) == crm_identities(sim)


async def test_new_people_wait_for_a_first_read_rather_than_being_searched(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    """People who arrive while the index reads a new account wait for it (no attempt counted)
    instead of costing one or two searches each; one of them is a manager's contact."""
    sim, _ = simulator
    seed(sim, 1500)
    svc = await service_factory(crm_rate_limit=15.0)  # the index reads 5 pages a second
    people = [{"name": f"P{i}", "phone": f"+7701{i:07d}"} for i in range(20)]
    people.append({"name": "Known", "phone": "8 707 000 00 42"})  # seeded as +77070000042
    for body in people:
        assert (await svc.submit("course", body))[1]["ok"]
    await wait_for(lambda: all_delivered(db, 21), timeout=30)
    assert "search" not in reads(sim), reads(sim)
    assert await db.fetchval("SELECT max(attempts) FROM jobs") == 1
    report = sim.report()
    assert len(report["contacts"]) == 1500 + 20
    no_duplicates(report)
