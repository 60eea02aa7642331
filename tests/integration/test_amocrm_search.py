"""amoCRM's `?query=` search is a substring search over what a manager typed (CRM_FACTS.md,
"amoCRM search"): the relay searches by the national number and re-checks exactly, so a contact
typed as "8 (916) 123-45-67" is found for "+79161234567" instead of being created again."""

from __future__ import annotations

import asyncpg
import pytest

from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import ServiceFactory, wait_for
from tests.integration.test_delivery import all_delivered, no_duplicates


@pytest.mark.parametrize("typed", ["8 (916) 123-45-67", "+7 916 123 4567", "89161234567"])
async def test_a_contact_typed_by_hand_is_found_by_its_national_number(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
    typed: str,
) -> None:
    sim = simulator[0]
    phone = {"field_code": "PHONE", "values": [{"value": typed, "enum_code": "WORK"}]}
    [contact_id] = sim.seed_contacts([{"name": "Manager's", "custom_fields_values": [phone]}])
    [lead] = sim.store.create_leads(
        [{"name": "open", "_embedded": {"contacts": [{"id": contact_id}]}}]
    )
    svc = await service_factory(amocrm_dedup="search")
    answer = (await svc.submit("course", {"name": "Ivan", "phone": "+79161234567"}))[1]
    assert answer["ok"], answer
    await wait_for(lambda: all_delivered(db, 1))
    report = sim.report()
    assert [c["id"] for c in report["contacts"]] == [contact_id]
    assert [lead_["id"] for lead_ in report["leads"]] == [lead["id"]]
    assert [n["entity_id"] for n in report["notes"]] == [lead["id"]]
    no_duplicates(report)
