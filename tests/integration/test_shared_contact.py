"""Two of our people, one CRM contact: one open lead (deal), whatever the batching.

Locally a person is their identities. A contact a manager made can hold a phone and an e-mail,
so a phone-only and an e-mail-only submission of one human are two people to us and one contact
to the CRM. Each run here seeds such a contact (phone P, e-mail E), then delivers one submission
with only P and one with only E, and expects one open lead on that contact, the other submission
delivered onto it as a note (amoCRM) or a timeline comment (Bitrix24), nothing dead, one
attempt each (waiting for the next round is not an attempt).

The two deliveries meet in one batch, in two batches of one worker, in two workers on one
database (two processes' worth: a pool and a lock connection each), or one after the other
with the first lead closed in between. Every test runs against amoCRM (contact index, and
search) and Bitrix24, over real HTTP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import asyncpg
import pytest

from service.app import WORKER, Roles
from service.db.contact_locks import ContactGuard
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.chaos import crms
from tests.conftest import ServiceFactory, wait_for
from tests.integration.test_delivery import all_delivered, no_duplicates

PHONE = "+77015550011"
EMAIL = "dana@example.kz"
MANAGER_PHONE = "8 (701) 555-00-11"  # how a manager types PHONE in amoCRM...
# ...and in Bitrix24, whose findbycomm (and simulator) compares digits: 8… is not +7… there
BITRIX_MANAGER_PHONE = "+7 (701) 555-00-11"
KINDS = [("amocrm", "index"), ("amocrm", "search"), ("bitrix24", None)]


@pytest.fixture(params=KINDS, ids=["amocrm-index", "amocrm-search", "bitrix24"])
def kind(request: pytest.FixtureRequest) -> tuple[str, str | None]:
    kind: tuple[str, str | None] = request.param
    return kind


@pytest.fixture
async def simulator(kind: tuple[str, str | None]) -> AsyncIterator[tuple[crms.Simulator, str]]:
    async for started in crms.start(kind[0]):
        yield started


@pytest.fixture
def crm_settings(
    simulator: tuple[crms.Simulator, str], kind: tuple[str, str | None]
) -> dict[str, Any]:
    settings = crms.crm_settings(*simulator)
    return settings if kind[1] is None else {**settings, "amocrm_dedup": kind[1]}


async def seed_manager_contact(sim: crms.Simulator, url: str) -> int:
    """A contact with both identities, made in the CRM by hand (not through its API)."""
    if isinstance(sim, AmoCrmSimulator):
        fields = [
            {"field_code": "PHONE", "values": [{"value": MANAGER_PHONE, "enum_code": "WORK"}]},
            {"field_code": "EMAIL", "values": [{"value": EMAIL, "enum_code": "WORK"}]},
        ]
        body = [{"first_name": "Dana (by a manager)", "custom_fields_values": fields}]
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{url}/_sim/contacts", json=body) as r,
        ):
            assert r.status == 200, await r.text()
            answer = await r.json()
        # {"_embedded": {"contacts": [...]}} like the API's own answers (a bare list before)
        [made] = answer["_embedded"]["contacts"] if isinstance(answer, dict) else answer
        contact_id: int = made["id"]
        return contact_id
    # the Bitrix24 simulator's control API has no seeding route: its store is the portal's data
    return sim.store.contact_add(
        {
            "fields": {
                "NAME": "Dana (by a manager)",
                "PHONE": [{"VALUE": BITRIX_MANAGER_PHONE, "VALUE_TYPE": "WORK"}],
                "EMAIL": [{"VALUE": EMAIL, "VALUE_TYPE": "WORK"}],
            }
        }
    )


def leads_of(sim: crms.Simulator) -> list[dict[str, Any]]:
    report = sim.report()
    return list(report["leads"] if isinstance(sim, AmoCrmSimulator) else report["deals"])


def open_leads_of(sim: crms.Simulator, contact_id: int) -> list[int]:
    """The open leads (deals) linked to the contact, as the simulator reports them."""
    if isinstance(sim, AmoCrmSimulator):
        return [
            lead["id"]
            for lead in sim.report()["leads"]
            if lead["status_id"] not in (142, 143)
            and contact_id in [c["id"] for c in lead["_embedded"]["contacts"]]
        ]
    return [
        deal["id"]
        for deal in sim.report()["deals"]
        if deal["is_open"] and contact_id in deal["contact_ids"]
    ]


def remarks_on(sim: crms.Simulator, lead_id: int) -> list[str]:
    """The notes (amoCRM) or timeline comments (Bitrix24) on a lead (deal)."""
    if isinstance(sim, AmoCrmSimulator):
        return [n["params"]["text"] for n in sim.report()["notes"] if n["entity_id"] == lead_id]
    return [
        c["COMMENT"]
        for c in sim.report()["comments"]
        if c["ENTITY_TYPE"] == "deal" and c["ENTITY_ID"] == str(lead_id)
    ]


async def delivered_as(db: asyncpg.Connection) -> dict[str, tuple[int, int, int]]:
    """Submission id → (contact id, lead id, attempts of its job)."""
    rows = await db.fetch(
        "SELECT s.id, s.crm_contact_id, s.crm_lead_id, j.attempts"
        "  FROM submissions s JOIN jobs j ON j.submission_id = s.id"
    )
    return {str(r["id"]): (r["crm_contact_id"], r["crm_lead_id"], r["attempts"]) for r in rows}


async def check_one_open_lead(
    sim: crms.Simulator, db: asyncpg.Connection, contact_id: int, first: str, second: str
) -> None:
    """One open lead on the contact, both submissions on it, the later one as a note/comment,
    one attempt each (a wait for the next round is not an attempt), nothing dead."""
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE state = 'dead'") == 0
    report = sim.report()
    no_duplicates(report)
    [lead_id] = open_leads_of(sim, contact_id)
    assert len(leads_of(sim)) == 1  # and no lead elsewhere
    assert len(report["contacts"]) == 1  # no second contact either
    delivered = await delivered_as(db)
    assert delivered == {first: (contact_id, lead_id, 1), second: (contact_id, lead_id, 1)}
    remarks = remarks_on(sim, lead_id)
    assert len(remarks) == 1 and second in remarks[0], remarks


class Meeting:
    """The first `n` arrivals wait for one another (bounded), later ones pass straight on."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.arrived = 0
        self.everyone = asyncio.Event()

    async def arrive(self) -> None:
        self.arrived += 1
        if self.arrived >= self.n:
            self.everyone.set()
        if self.arrived <= self.n:
            await asyncio.wait_for(self.everyone.wait(), 15)


class Relay:
    """The first arrival waits for the second, which then waits until the first has let go of
    its contact: the second takes the lock after the first wrote, having read before it."""

    def __init__(self) -> None:
        self.arrived = 0
        self.second_here = asyncio.Event()
        self.first_done = asyncio.Event()

    async def arrive(self) -> None:
        self.arrived += 1
        if self.arrived == 1:
            await asyncio.wait_for(self.second_here.wait(), 15)
        elif self.arrived == 2:
            self.second_here.set()
            await asyncio.wait_for(self.first_done.wait(), 15)

    def let_go(self) -> None:
        self.first_done.set()


class StagedGuard(ContactGuard):
    """A worker's contact guard whose lock attempts are staged by a Meeting or a Relay, so that
    every delivery has read the contact (no open lead yet) before any writes."""

    def __init__(self, dsn: str, name: str, stage: Meeting | Relay) -> None:
        super().__init__(dsn, name)
        self.stage = stage

    async def take(
        self, account: str, contact_ids: Sequence[int], since: int
    ) -> tuple[set[int], set[int], int]:
        await self.stage.arrive()
        return await super().take(account, contact_ids, since)

    async def give_back(self, account: str, taken: set[int], wrote: set[int], session: int) -> None:
        await super().give_back(account, taken, wrote, session)
        if isinstance(self.stage, Relay) and taken:
            self.stage.let_go()


async def staged_workers(
    service_factory: ServiceFactory, stage: Meeting | Relay, processes: int
) -> None:
    """`processes` workers with staged guards; two people in flight in all, one per batch."""
    for _ in range(processes):
        svc = await service_factory(
            Roles(http=False), worker_round=1, worker_concurrency=2 // processes
        )
        worker = svc.app[WORKER]
        worker.guard = StagedGuard(worker.dsn, worker.owner, stage)


async def submit_both(service_factory: ServiceFactory) -> tuple[str, str]:
    intake = await service_factory(Roles(worker=False))
    _, by_phone = await intake.submit("course", {"name": "Dana", "phone": PHONE})
    _, by_email = await intake.submit("course", {"name": "Dana", "email": EMAIL})
    assert by_phone["ok"] and by_email["ok"]
    return by_phone["id"], by_email["id"]


def deferred(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(submission id, why) of every job the worker deferred."""
    return [
        (getattr(r, "submission_id", ""), getattr(r, "error", ""))
        for r in caplog.records
        if getattr(r, "action", "") == "job_deferred"
    ]


async def test_phone_only_and_email_only_in_one_batch_make_one_lead(
    service_factory: ServiceFactory,
    simulator: tuple[crms.Simulator, str],
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sim, url = simulator
    contact_id = await seed_manager_contact(sim, url)
    by_phone, by_email = await submit_both(service_factory)  # with the worker off...
    assert await db.fetchval("SELECT count(DISTINCT person_id) FROM submissions") == 2

    with caplog.at_level(logging.INFO, logger="service.delivery.worker"):
        await service_factory(Roles(http=False))  # ...so that it meets both in one batch
        await wait_for(lambda: all_delivered(db, 2))

    # the first submitted goes ahead; the other waits a round without an attempt counted
    await check_one_open_lead(sim, db, contact_id, by_phone, by_email)
    [(later, why)] = deferred(caplog)
    assert later == by_email and "of this batch" in why, why


@pytest.mark.parametrize("processes", [2, 1], ids=["two-processes", "one-process"])
async def test_two_batches_at_once_make_one_lead(
    service_factory: ServiceFactory,
    simulator: tuple[crms.Simulator, str],
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    processes: int,
) -> None:
    """Two batches (in two workers on one database, or side by side in one) have both read the
    contact, no open lead on it, when they go for its lock: one writes, the other waits."""
    sim, url = simulator
    contact_id = await seed_manager_contact(sim, url)
    meeting = Meeting(2)
    await staged_workers(service_factory, meeting, processes)
    with caplog.at_level(logging.INFO, logger="service.delivery.worker"):
        # a worker holding its people at the meeting has no room for the other one
        by_phone, by_email = await submit_both(service_factory)
        await wait_for(lambda: all_delivered(db, 2))

    assert meeting.arrived >= 2
    [(later, why)] = deferred(caplog)
    # the lock still held, or (if the writer was that quick) let go with its stamp left behind
    assert "is being written by another delivery" in why or "was written since" in why, why
    first = by_email if later == by_phone else by_phone
    await check_one_open_lead(sim, db, contact_id, first, later)


async def test_a_write_after_our_read_makes_us_read_again(
    service_factory: ServiceFactory,
    simulator: tuple[crms.Simulator, str],
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The second worker read the contact before the first wrote, and takes the lock only once
    the first has let go of it: the stamp the first left tells it that what it read is old."""
    sim, url = simulator
    contact_id = await seed_manager_contact(sim, url)
    relay = Relay()
    await staged_workers(service_factory, relay, 2)
    with caplog.at_level(logging.INFO, logger="service.delivery.worker"):
        by_phone, by_email = await submit_both(service_factory)
        await wait_for(lambda: all_delivered(db, 2))

    assert relay.arrived >= 2
    [(later, why)] = deferred(caplog)
    assert "was written since this batch read it" in why, why
    first = by_email if later == by_phone else by_phone
    await check_one_open_lead(sim, db, contact_id, first, later)


async def close_lead(sim: crms.Simulator, url: str, lead_id: int) -> None:
    """A manager closes the lead (amoCRM: lost, 143; Bitrix24: stage LOSE), through the API."""
    async with aiohttp.ClientSession() as http:
        if isinstance(sim, AmoCrmSimulator):
            token = {"Authorization": f"Bearer {sim.config.access_token}"}
            body: Any = [{"id": lead_id, "status_id": 143}]
            async with http.patch(f"{url}/api/v4/leads", json=body, headers=token) as r:
                assert r.status == 200, await r.text()
        else:
            hook = sim.webhook_url(url)
            body = {"id": lead_id, "fields": {"STAGE_ID": "LOSE"}}
            async with http.post(f"{hook}crm.deal.update.json", json=body) as r:
                assert r.status == 200, await r.text()


async def test_a_returning_person_whose_lead_was_closed_joins_the_open_one(
    service_factory: ServiceFactory,
    simulator: tuple[crms.Simulator, str],
    db: asyncpg.Connection,
) -> None:
    """One after the other: by phone (a lead), the lead closed, by e-mail (a new lead: none
    open), by phone again. We hold a link to the closed lead for the phone person, but the
    contact has an open one now: that one gets the note, no third lead."""
    sim, url = simulator
    contact_id = await seed_manager_contact(sim, url)
    svc = await service_factory()
    assert (await svc.submit("course", {"name": "Dana", "phone": PHONE}))[1]["ok"]
    await wait_for(lambda: all_delivered(db, 1))
    [closed] = open_leads_of(sim, contact_id)
    await close_lead(sim, url, closed)

    _, by_email = await svc.submit("course", {"name": "Dana", "email": EMAIL})
    await wait_for(lambda: all_delivered(db, 2))
    [reopened] = open_leads_of(sim, contact_id)
    assert reopened != closed
    _, again = await svc.submit("course", {"name": "Dana", "phone": PHONE, "visit": 2})
    await wait_for(lambda: all_delivered(db, 3))

    no_duplicates(sim.report())
    assert open_leads_of(sim, contact_id) == [reopened]
    assert len(leads_of(sim)) == 2
    delivered = await delivered_as(db)
    assert delivered[again["id"]] == (contact_id, reopened, 1)
    assert delivered[by_email["id"]] == (contact_id, reopened, 1)
    [remark] = remarks_on(sim, reopened)
    assert again["id"] in remark
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE state = 'dead'") == 0
