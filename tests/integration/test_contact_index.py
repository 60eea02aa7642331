"""The amoCRM contact index end to end: real HTTP in, real PostgreSQL, real HTTP to the simulator.

Contacts "made by a manager" are seeded through the simulator's control API (not counted, not
limited, phones written as people write them); `report()["contact_reads"]` tells searches
(`?query=`) from list reads (the sync) from reads of one contact.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from service.app import WORKER, Roles
from service.crm.amocrm.adapter import AmoCrmAdapter
from service.crm.amocrm.api import AmoCrmApi, StaticToken
from service.crm.amocrm.index import ContactIndex, account_of
from service.crm.base import Delivery, Link
from service.db.contact_index_store import SYNC_LOCK_SPACE
from service.db.database import create_pool
from service.delivery.limits import RateGate
from service.errors import BadInput, CrmRetryable
from service.intake.normalize import normalize_email, normalize_phone
from service.model import Lead
from service.settings import AmoCrmSettings, LeadSettings
from service.simulators.amocrm.entities import field_values
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import ServiceFactory, wait_for
from tests.integration.test_delivery import all_delivered, no_duplicates

MESSY = "8 (916) 123-45-67"  # how a manager types +79161234567


def manager_contact(
    phone: str | None = None, email: str | None = None, updated_at: int | None = None
) -> dict[str, Any]:
    fields = [
        {"field_code": code, "values": [{"value": value, "enum_code": "WORK"}]}
        for code, value in (("PHONE", phone), ("EMAIL", email))
        if value
    ]
    made: dict[str, Any] = {"first_name": "Made by a manager", "custom_fields_values": fields}
    return made if updated_at is None else made | {"updated_at": updated_at}


def reads(sim: AmoCrmSimulator) -> dict[str, int]:
    return dict(sim.report()["contact_reads"])


async def indexed(db: asyncpg.Connection) -> set[tuple[str, int]]:
    rows = await db.fetch("SELECT identity, contact_id FROM contact_index")
    return {(r["identity"], r["contact_id"]) for r in rows}


def crm_identities(sim: AmoCrmSimulator) -> set[tuple[str, int]]:
    """What the index should hold: every contact's valid phones and emails, normalised."""
    found = set()
    for contact in sim.store.contacts.values():
        for code, normalise in (
            ("PHONE", lambda v: normalize_phone(v, None)),
            ("EMAIL", normalize_email),
        ):
            for value in field_values(contact.fields, code):
                try:
                    found.add((normalise(value), contact.id))
                except BadInput:
                    pass
    assert found, "no valid phone or email: the comparison would prove nothing"
    return found


async def sync_state(db: asyncpg.Connection) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM contact_index_sync")
    assert row is not None
    return row


async def contact_of(db: asyncpg.Connection, phone: str) -> int:
    contact_id: int = await db.fetchval(
        "SELECT crm_contact_id FROM submissions WHERE lead->>'phone' = $1", phone
    )
    return contact_id


# --- through the service -----------------------------------------------------------------------


async def test_manager_contact_with_a_messy_phone_gets_the_lead(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim, _ = simulator
    [manager] = sim.seed_contacts([manager_contact(MESSY)])
    svc = await service_factory()
    body = {"name": "Ivan", "phone": "+7 916 123 45 67", "email": "Ivan@Example.kz"}
    assert (await svc.submit("course", body))[1]["ok"]
    await wait_for(lambda: all_delivered(db, 1))

    report = sim.report()
    [contact] = report["contacts"]  # no second contact
    assert contact["id"] == manager
    [lead] = report["leads"]
    assert [c["id"] for c in lead["_embedded"]["contacts"]] == [manager]
    assert await contact_of(db, "+79161234567") == manager
    # the manager's phone stays as typed (not doubled as +7…); the email is added
    fields = {
        f["field_code"]: [v["value"] for v in f["values"]] for f in contact["custom_fields_values"]
    }
    assert fields == {"PHONE": [MESSY], "EMAIL": ["ivan@example.kz"]}
    assert "search" not in reads(sim)  # the index found it
    assert {("+79161234567", manager), ("ivan@example.kz", manager)} <= await indexed(db)


async def test_contact_made_after_the_first_sync_is_found_by_the_next(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim, _ = simulator
    svc = await service_factory()
    await svc.submit("course", {"phone": "+77010000001", "email": "first@example.kz"})
    await wait_for(lambda: all_delivered(db, 1))
    assert (await sync_state(db))["full_scan_done"]

    [manager] = sim.seed_contacts([manager_contact("+7 (701) 000-00-02", "Later@Example.kz")])
    await svc.submit("course", {"email": "later@example.kz", "name": "Later"})
    await wait_for(lambda: all_delivered(db, 2))
    # one by one: to us these are two people (no identity in common) who are one contact
    await svc.submit("course", {"phone": "87010000002"})
    await wait_for(lambda: all_delivered(db, 3))

    report = sim.report()
    assert len(report["contacts"]) == 2
    [later] = [c for c in report["contacts"] if c["id"] == manager]
    assert len(report["leads"]) == 2  # the second submission went to the lead of the first
    assert await contact_of(db, "+77010000002") == manager
    assert "search" not in reads(sim)
    assert (await sync_state(db))["caught_up"]
    no_duplicates(report)
    assert later["custom_fields_values"][0]["values"][0]["value"] == "+7 (701) 000-00-02"


async def test_two_hundred_new_people_cost_at_most_1_1_requests_each(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim, _ = simulator
    sim.seed_contacts([manager_contact(f"8 701 5{n:06d}", f"m{n}@example.kz") for n in range(30)])
    intake = await service_factory(Roles(worker=False))
    people = [
        {"name": f"P{n}", "phone": f"+7701{n:07d}", "email": f"p{n}@example.kz"} for n in range(200)
    ]
    answers = await asyncio.gather(*(intake.submit("course", p) for p in people))
    assert all(a["ok"] for _, a in answers)
    await service_factory(Roles(http=False))  # the backlog is drained by a worker alone
    await wait_for(lambda: all_delivered(db, 200), timeout=60)

    report = sim.report()
    assert report["requests_total"] / 200 <= 1.1, report["requests_by_endpoint"]
    assert report["requests_by_endpoint"]["POST /api/v4/leads/complex"] == 4
    assert "search" not in reads(sim)
    assert len(report["contacts"]) == 230
    no_duplicates(report)
    assert await indexed(db) == crm_identities(sim)


@pytest.mark.parametrize("email", [None, "gone@example.kz"])
async def test_contact_deleted_in_the_crm_leaves_the_index_and_the_person_is_new(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
    email: str | None,
) -> None:
    sim, _ = simulator
    gone_before, gone_between = sim.seed_contacts(
        [manager_contact("+77010000011"), manager_contact("+77010000012")]
    )
    svc = await service_factory()
    await svc.submit("course", {"phone": "+77010000010"})  # the first sync reads both
    await wait_for(lambda: all_delivered(db, 1))
    assert {("+77010000011", gone_before), ("+77010000012", gone_between)} <= await indexed(db)

    # one is deleted before we read it (the bulk read leaves it out); the other between our
    # read and linking a lead to it (400) — or, with an email to add, updating it (400): as
    # the batch takes its contacts' locks, after its reads and before its writes
    guard = svc.app[WORKER].guard
    take = guard.take

    async def deleted_meanwhile(account: str, ids: Any, since: int) -> Any:
        if gone_between in ids:
            sim.delete_contact(gone_between)
        return await take(account, ids, since)

    guard.take = deleted_meanwhile  # type: ignore[method-assign]
    sim.delete_contact(gone_before)
    await svc.submit("course", {"phone": "+77010000011"})
    await svc.submit("course", {"phone": "+77010000012", "email": email})
    await wait_for(lambda: all_delivered(db, 3))

    report = sim.report()
    assert {c["id"] for c in report["contacts"]}.isdisjoint({gone_before, gone_between})
    assert len(report["contacts"]) == 3
    for phone in ("+77010000011", "+77010000012"):
        contact_id = await contact_of(db, phone)
        assert contact_id not in (gone_before, gone_between)
        assert (phone, contact_id) in await indexed(db)
    assert {i for i, c in await indexed(db) if c in (gone_before, gone_between)} == set()
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE state = 'dead'") == 0
    no_duplicates(report)


async def test_search_mode_behaves_as_before(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim, _ = simulator
    [manager] = sim.seed_contacts([manager_contact(None, "known@example.kz")])
    svc = await service_factory(amocrm_dedup="search")
    await svc.submit("course", {"phone": "+77010000021", "email": "new@example.kz"})
    await wait_for(lambda: all_delivered(db, 1))
    assert sim.report()["requests_by_endpoint"] == {
        "GET /api/v4/contacts": 2,  # by phone, then by email
        "POST /api/v4/leads/complex": 1,
    }
    await svc.submit("course", {"phone": "+77010000022", "email": "known@example.kz"})
    await wait_for(lambda: all_delivered(db, 2))

    assert await contact_of(db, "+77010000022") == manager
    assert reads(sim) == {"search": 4}
    assert await db.fetchval("SELECT count(*) FROM contact_index") == 0
    assert await db.fetchval("SELECT count(*) FROM contact_index_sync") == 0
    no_duplicates(sim.report())


async def test_two_workers_syncing_at_once_share_one_index(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim, _ = simulator
    sim.config.latency_s = 0.02  # so the two workers' rounds overlap
    base = 1_700_000_000
    managers = sim.seed_contacts(
        [manager_contact(f"8 (702) {n:03d}-00-00", updated_at=base + n) for n in range(600)]
    )
    intake = await service_factory(Roles(worker=False))
    known = [{"phone": f"+7702{n:03d}0000", "email": f"k{n}@example.kz"} for n in range(0, 600, 20)]
    new = [{"phone": f"+7747{n:07d}", "email": f"n{n}@example.kz"} for n in range(60)]
    answers = await asyncio.gather(*(intake.submit("course", p) for p in known + new))
    assert all(a["ok"] for _, a in answers)
    await asyncio.gather(
        service_factory(Roles(http=False), worker_round=10),
        service_factory(Roles(http=False), worker_round=10),
    )
    await wait_for(lambda: all_delivered(db, 90), timeout=60)

    report = sim.report()
    no_duplicates(report)
    assert len(report["contacts"]) == 660
    for n, person in zip(range(0, 600, 20), known, strict=True):
        assert await contact_of(db, person["phone"]) == managers[n]
    assert await indexed(db) == crm_identities(sim)
    state = await sync_state(db)
    assert state["full_scan_done"] and state["caught_up"]


# --- the index and the adapter on their own ------------------------------------------------------


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


async def test_processes_sync_one_at_a_time_and_a_waiter_reads_only_what_changed(
    amo_parts: tuple[AmoCrmApi, asyncpg.Pool, asyncpg.Pool],
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim, _ = simulator
    api, pool_a, pool_b = amo_parts
    sim.seed_contacts([manager_contact(f"+7707{n:07d}", updated_at=1000 + n) for n in range(600)])
    a, b = ContactIndex(api, pool_a), ContactIndex(api, pool_b)

    # both at once: one reads the account (3 pages of 250); the other waits for that round and
    # then reads what changed after it (one short page), never the account again
    assert await asyncio.gather(a.refresh(), b.refresh()) == [True, True]
    assert reads(sim) == {"list": 4}
    assert await indexed(db) == crm_identities(sim)

    # a round under way in another process (here: its lock, held by the test) is waited for
    account = account_of(api.base_url)
    lock = "SELECT pg_advisory_lock($1::int, hashtext($2))"
    await db.execute(lock, SYNC_LOCK_SPACE, account)
    waiting = asyncio.create_task(b.refresh())
    await wait_for(lambda: lock_waiters(db))
    [late] = sim.seed_contacts([manager_contact("+77079999999", updated_at=1000 + 600)])
    assert reads(sim) == {"list": 4}
    await db.execute("SELECT pg_advisory_unlock($1::int, hashtext($2))", SYNC_LOCK_SPACE, account)
    assert await waiting is True
    assert reads(sim) == {"list": 5}
    assert ("+77079999999", late) in await indexed(db)

    # ... but not for ever: then the batch searches instead
    impatient = ContactIndex(api, pool_b, sync_wait_s=0.1)
    await db.execute(lock, SYNC_LOCK_SPACE, account)
    assert await impatient.refresh() is False
    await db.execute("SELECT pg_advisory_unlock($1::int, hashtext($2))", SYNC_LOCK_SPACE, account)
    assert reads(sim) == {"list": 5}


async def lock_waiters(db: asyncpg.Connection) -> bool:
    waiting = await db.fetchval(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND classid = $1::int::oid",
        SYNC_LOCK_SPACE,
    )
    return bool(waiting)


async def test_until_the_first_scan_is_done_new_people_are_searched(
    amo_parts: tuple[AmoCrmApi, asyncpg.Pool, asyncpg.Pool],
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim, url = simulator
    api, pool, _ = amo_parts
    managers = sim.seed_contacts(
        [manager_contact(f"+7705{n:07d}", updated_at=1000 + n) for n in range(1000)]
    )
    adapter = AmoCrmAdapter(api, AmoCrmSettings(base_url=url), LeadSettings(), pool)
    # read slowly: pages of 100, one page per round
    adapter.index = ContactIndex(api, pool, pages_per_round=1, page_limit=100)

    jobs = itertools.count(1)

    def delivery(phone: str, email: str) -> Delivery:
        lead = Lead(form="course", phone=phone, email=email, name=None)
        job = next(jobs)
        return Delivery(job, job, uuid.uuid4(), lead, Link())

    # the first round reads one page, which is not all: the people are searched for
    [found, made] = await adapter.deliver_batch(
        [delivery("+77050000900", "a@example.kz"), delivery("+77060000001", "b@example.kz")]
    )
    assert isinstance(found, Link) and found.contact_id == managers[900]
    assert isinstance(made, Link) and made.contact_id not in managers
    # searches: a hit by phone; a new person by phone and by email
    assert reads(sim) == {"list": 1, "search": 3}
    assert not (await sync_state(db))["full_scan_done"]

    for _ in range(20):  # bounded: ten more pages finish the scan
        if await adapter.index.refresh():
            break
    assert (await sync_state(db))["full_scan_done"]
    before = reads(sim)
    [again] = await adapter.deliver_batch([delivery("+77060000002", "c@example.kz")])
    assert isinstance(again, Link) and again.contact_id not in managers
    after = reads(sim)
    assert after["search"] == before["search"]  # the index answered
    no_duplicates(sim.report())


async def test_a_failed_sync_fails_only_the_people_it_was_for(
    amo_parts: tuple[AmoCrmApi, asyncpg.Pool, asyncpg.Pool],
    simulator: tuple[AmoCrmSimulator, str],
) -> None:
    sim, url = simulator
    api, pool, _ = amo_parts
    adapter = AmoCrmAdapter(api, AmoCrmSettings(base_url=url), LeadSettings(), pool)
    first = Lead(form="course", phone="+77010000031", email=None, name=None)
    [link] = await adapter.deliver_batch([Delivery(1, 1, uuid.uuid4(), first, Link())])
    assert isinstance(link, Link) and link.lead_id is not None

    sim.fail_next("GET", "/api/v4/contacts", 503)
    new = Lead(form="course", phone="+77010000032", email=None, name=None)
    known, failed = await adapter.deliver_batch(
        [Delivery(2, 1, uuid.uuid4(), first, link), Delivery(3, 2, uuid.uuid4(), new, Link())]
    )
    assert known == link  # the note went to the open lead
    assert isinstance(failed, CrmRetryable) and failed.status == 503
    assert len(sim.report()["contacts"]) == 1
    [retried] = await adapter.deliver_batch([Delivery(4, 2, uuid.uuid4(), new, Link())])
    assert isinstance(retried, Link) and len(sim.report()["contacts"]) == 2
    no_duplicates(sim.report())
