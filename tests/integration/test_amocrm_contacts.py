"""amoCRM answers that move a person's contact under our feet: duplicate control merging two
leads of one `leads/complex` request (a shorter answer), and a contact deleted between our read
and our write ("Contact is not found")."""

from __future__ import annotations

from typing import Any

import asyncpg

from service.app import Roles
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import ServiceFactory, wait_for
from tests.integration.test_delivery import all_delivered, no_duplicates

PHONE, EMAIL = "+79161234567", "ivan@example.kz"


def seeded(sim: AmoCrmSimulator, *values: tuple[str, str]) -> int:
    fields = [{"field_code": code, "values": [{"value": v}]} for code, v in values]
    [contact_id] = sim.seed_contacts([{"name": "Manager's", "custom_fields_values": fields}])
    return contact_id


async def test_a_shorter_complex_answer_is_matched_by_request_id(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    """Two people of ours (a phone-only and an email-only submission) are one contact a manager
    entered with both; with no lookup (`trust`) both go out in one `leads/complex`, duplicate
    control merges the second into the first's contact and answers one item for two. The first
    gets its lead once; the second, left out of the answer, is retried — not given the first's
    lead by position, and the first is not sent again."""
    sim = simulator[0]
    sim.config.merge_duplicates = True
    contact_id = seeded(sim, ("PHONE", PHONE), ("EMAIL", EMAIL))
    intake = await service_factory(Roles(worker=False))
    for body in ({"name": "Phone", "phone": PHONE}, {"name": "Mail", "email": EMAIL}):
        assert (await intake.submit("course", body))[1]["ok"]
    await service_factory(Roles(http=False), amocrm_dedup="trust")  # one batch for both
    await wait_for(lambda: all_delivered(db, 2))

    report = sim.report()
    assert [c["id"] for c in report["contacts"]] == [contact_id]
    names = sorted(lead["name"] for lead in report["leads"])
    assert names == ["course: Mail", "course: Phone"], names  # each made once
    attempts = dict(
        await db.fetch(
            "SELECT s.lead->>'name', j.attempts FROM jobs j"
            " JOIN submissions s ON s.id = j.submission_id"
        )
    )
    assert attempts == {"Phone": 1, "Mail": 2}, attempts


async def seed_with_open_lead(sim: AmoCrmSimulator) -> tuple[int, int]:
    contact_id = seeded(sim, ("PHONE", PHONE))
    [lead] = sim.store.create_leads(
        [{"name": "open", "_embedded": {"contacts": [{"id": contact_id}]}}]
    )
    return contact_id, lead["id"]


async def test_a_contact_deleted_before_our_write_is_resolved_again(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    """Search finds the manager's contact, then the manager deletes it before we link a new
    lead to it: amoCRM answers 400 "Contact is not found". The person is resolved again (the
    search now finds nothing) and gets a new contact and lead, instead of a dead letter."""
    sim = simulator[0]
    contact_id = seeded(sim, ("PHONE", PHONE))
    deleted: list[Any] = []

    original = sim.store.search_contacts

    def search_then_delete(query: str) -> Any:
        found = original(query)
        if found and not deleted:
            deleted.append(sim.delete_contact(contact_id))  # right after the lookup answered
        return found

    sim.store.search_contacts = search_then_delete  # type: ignore[method-assign]
    svc = await service_factory(amocrm_dedup="search")
    assert (await svc.submit("course", {"name": "Ivan", "phone": PHONE, "email": EMAIL}))[1]["ok"]
    await wait_for(lambda: all_delivered(db, 1))

    report = sim.report()
    assert deleted == [True]
    [contact] = report["contacts"]
    assert contact["id"] != contact_id
    [lead] = report["leads"]
    assert [c["id"] for c in lead["_embedded"]["contacts"]] == [contact["id"]]
    no_duplicates(report)


async def test_a_deleted_contact_whose_person_another_contact_holds_goes_there(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    """Two contacts hold the phone (a manager is merging them): the older is found, then
    deleted before our write. The search now finds the other one: the delivery waits for the
    next round (no attempt counted) and goes to that contact — no third contact is made."""
    sim = simulator[0]
    older = seeded(sim, ("PHONE", PHONE))
    newer = seeded(sim, ("PHONE", PHONE), ("EMAIL", EMAIL))
    deleted: list[bool] = []
    original = sim.store.search_contacts

    def search_then_delete(query: str) -> Any:
        found = original(query)
        if found and not deleted:
            deleted.append(sim.delete_contact(older))
        return found

    sim.store.search_contacts = search_then_delete  # type: ignore[method-assign]
    svc = await service_factory(amocrm_dedup="search")
    assert (await svc.submit("course", {"name": "Ivan", "phone": PHONE, "email": EMAIL}))[1]["ok"]
    await wait_for(lambda: all_delivered(db, 1))

    report = sim.report()
    assert [c["id"] for c in report["contacts"]] == [newer]
    [lead] = report["leads"]
    assert [c["id"] for c in lead["_embedded"]["contacts"]] == [newer]
    assert await db.fetchval("SELECT attempts FROM jobs") == 1
    no_duplicates(report)
