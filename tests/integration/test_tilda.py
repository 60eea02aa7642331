"""Tilda's webhook at the form endpoint, as Tilda sends it (help-ru.tilda.cc/formsscript): every
form of a site posted urlencoded to one URL with `Name`, `Phone`, `Email`, custom fields,
`formid` and `tranid`; `test=test` alone when the hook is connected, wanting 200."""

from __future__ import annotations

import asyncpg

from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import Service, ServiceFactory, wait_for
from tests.integration.test_delivery import all_delivered

FORM = {
    "Name": "Aigerim",
    "Phone": "+7 (701) 123-45-67",
    "Email": "aigerim@example.kz",
    "Course": "python",
    "formid": "form123456789",
    "tranid": "1234567:8901234567",
}


async def post_form(svc: Service, data: dict[str, str]) -> tuple[int, str]:
    async with svc.http.post(f"{svc.url}/api/v1/forms/tilda", data=data) as resp:
        return resp.status, await resp.text()


async def test_the_connection_test_is_answered_ok_and_stored_nowhere(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory()
    assert await post_form(svc, {"test": "test"}) == (200, "ok")
    assert await db.fetchval("SELECT count(*) FROM rejected") == 0
    assert await db.fetchval("SELECT count(*) FROM submissions") == 0


async def test_tranid_is_the_idempotency_key_and_formid_is_kept(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    """Tilda retries a submission it got no 200 for (twice, a minute apart) with the same body:
    the same `tranid` is the same submission; another `tranid` is another one."""
    svc = await service_factory()
    status, first = await post_form(svc, FORM)
    assert status == 200 and '"duplicate":false' in first, first
    _, again = await post_form(svc, FORM)  # Tilda's retry
    assert '"duplicate":true' in again, again
    _, other = await post_form(svc, {**FORM, "tranid": "1234567:8901234568"})
    assert '"duplicate":false' in other, other
    await wait_for(lambda: all_delivered(db, 2))

    lead = await db.fetchval("SELECT lead FROM submissions ORDER BY id LIMIT 1")
    assert '"formid": "form123456789"' in lead, lead
    assert '"phone": "+77011234567"' in lead and '"email": "aigerim@example.kz"' in lead, lead
    notes = simulator[0].report()["notes"]
    assert any("form123456789" in n["params"]["text"] for n in notes), notes
