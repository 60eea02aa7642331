"""How much work one CRM request carries, over real HTTP to both simulators: a burst that arrives
while the worker runs fills whole batches (the worker binds late), and the people a manager
already has are read and written in bulk.

Counts, not times: the CRM rate is set low so that a round lasts long enough for the burst to
have arrived before the next one is claimed, whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from service.app import Roles
from service.simulators.amocrm.server import AmoCrmSimulator, SimulatorConfig, start_simulator
from service.simulators.bitrix24.server import BitrixSimulator
from tests.conftest import ServiceFactory, wait_for
from tests.integration.bitrix24_sim import roomy_simulator
from tests.integration.test_delivery import all_delivered, no_duplicates

Simulator = AmoCrmSimulator | BitrixSimulator
BURST = 100
# CRM_RATE_LIMIT: the second round is claimed a round's length after the first submission
# (Bitrix24: 3 turns of 0.51 s, amoCRM: 2 turns of 1.02 s), when the whole burst is in
RATE = {"bitrix24": 2.0, "amocrm": 1.0}


@pytest.fixture(params=["amocrm", "bitrix24"])
async def simulator(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Simulator, str]]:
    if request.param == "amocrm":
        amo = AmoCrmSimulator(SimulatorConfig(rate_limit=200, block_after=1000))
        runner, url = await start_simulator(amo)
        yield amo, url
        await runner.cleanup()
    else:
        async with roomy_simulator() as started:
            yield started


@pytest.fixture
def crm_settings(simulator: tuple[Simulator, str]) -> dict[str, Any]:
    sim, url = simulator
    if isinstance(sim, BitrixSimulator):
        return {"crm_kind": "bitrix24", "bitrix24_webhook_url": sim.webhook_url(url)}
    return {}


def person(i: int) -> dict[str, Any]:
    return {"name": f"Client {i}", "phone": f"+7708{i:07d}", "email": f"b{i}@example.kz"}


async def test_a_burst_while_the_worker_runs_fills_whole_batches(
    service_factory: ServiceFactory,
    simulator: tuple[Simulator, str],
    db: asyncpg.Connection,
) -> None:
    sim = simulator[0]
    kind = "bitrix24" if isinstance(sim, BitrixSimulator) else "amocrm"
    svc = await service_factory(crm_rate_limit=RATE[kind], amocrm_index_refresh_s=2.0)
    sem = asyncio.Semaphore(32)

    async def post(i: int) -> None:
        async with sem:
            status, answer = await svc.submit("course", person(i))
            assert status == 200 and answer["ok"], answer

    await asyncio.gather(*(post(i) for i in range(BURST)))
    await wait_for(lambda: all_delivered(db, BURST), timeout=60)

    report = sim.report()
    no_duplicates(report)
    assert len(report["contacts"]) == len(report["leads"]) == BURST
    assert report["answers_by_status"].get("429", 0) == 0
    by_endpoint = report["requests_by_endpoint"]
    if isinstance(sim, BitrixSimulator):
        # the first submission goes out alone (findbycomm, contact, deal); everything after it
        # in one round: findbycomm for all (10 commands), contacts and deals 50 to a batch
        assert by_endpoint["batch"] <= 3 + 5, by_endpoint
    else:
        # the first alone (list + complex), then the rest in complex calls of 50
        assert by_endpoint["POST /api/v4/leads/complex"] <= 1 + 2, by_endpoint
        # the contact index: its first read of the account answers every round of the next
        # AMOCRM_INDEX_REFRESH_S; the contacts those rounds made went into it from amoCRM's
        # answers, so no round re-reads them
        assert by_endpoint["GET /api/v4/contacts"] <= 2, by_endpoint


@pytest.mark.parametrize("simulator", ["amocrm"], indirect=True)
async def test_people_a_manager_has_are_read_and_written_in_bulk(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim = simulator[0]
    # 40 contacts a manager typed in (no e-mail), every other one with an open lead
    made = sim.seed_contacts(
        [
            {
                "first_name": f"Client {i}",
                "custom_fields_values": [
                    {"field_code": "PHONE", "values": [{"value": f"8 (708) {i:07d}"}]}
                ],
            }
            for i in range(40)
        ]
    )
    for cid in made[::2]:
        sim.store.create_leads([{"name": "by hand", "_embedded": {"contacts": [{"id": cid}]}}])
    intake = await service_factory(Roles(worker=False))
    answers = await asyncio.gather(*(intake.submit("course", person(i)) for i in range(50)))
    assert all(status == 200 for status, _ in answers)
    await service_factory(Roles(http=False))
    await wait_for(lambda: all_delivered(db, 50), timeout=60)

    report = sim.report()
    no_duplicates(report)
    by_endpoint = report["requests_by_endpoint"]
    # one read of the 40 contacts (with their leads), one of their 20 leads; nothing one by one
    assert report["contact_reads"].get("ids") == 1, report["contact_reads"]
    assert by_endpoint.get("GET /api/v4/leads") == 1, by_endpoint
    assert "GET /api/v4/contacts/{id}" not in by_endpoint, by_endpoint
    assert "GET /api/v4/leads/{id}" not in by_endpoint, by_endpoint
    # writes as arrays: the 40 e-mails, 20 new leads, 20 notes, 10 new people
    for endpoint in (
        "PATCH /api/v4/contacts",
        "POST /api/v4/leads",
        "POST /api/v4/leads/notes",
        "POST /api/v4/leads/complex",
    ):
        assert by_endpoint.get(endpoint) == 1, (endpoint, by_endpoint)
    contacts = {c["id"]: c for c in report["contacts"]}
    assert len(contacts) == 50 and len(report["leads"]) == 50
    assert all(len(contacts[cid]["_embedded"]["leads"]) == 1 for cid in made)
    assert len(report["notes"]) == 20
    emails = {
        v["value"]
        for cid in made
        for f in contacts[cid]["custom_fields_values"]
        if f["field_code"] == "EMAIL"
        for v in f["values"]
    }
    assert emails == {f"b{i}@example.kz" for i in range(40)}
