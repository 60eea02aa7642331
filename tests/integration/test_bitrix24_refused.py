"""One person the portal refuses, among many it takes: Bitrix24's batch leniency made harmless.

Bitrix24 runs a command that refers to a failed one (`$result[c1]` after `c1` failed) anyway,
with the whole result section in place of the id: a deal bound to no contact or the wrong one
(CRM_FACTS.md, "Where a lenient simulator hides a production failure"). The simulator does the
same; these tests show that no deal of ours depends on such a reference.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest

from service.simulators.bitrix24.server import (
    BitrixSimulator,
)
from tests.conftest import ServiceFactory, wait_for
from tests.integration.bitrix24_sim import roomy_simulator
from tests.integration.test_delivery import no_duplicates

REFUSED = 42
# Our intake takes it (it only catches junk); Bitrix24's check_email does not: ERROR_CORE.
REFUSED_EMAIL = "c42..typo@example.kz"


@pytest.fixture
async def simulator() -> AsyncIterator[tuple[BitrixSimulator, str]]:
    async with roomy_simulator() as started:
        yield started


@pytest.fixture
def crm_settings(simulator: tuple[BitrixSimulator, str]) -> dict[str, Any]:
    sim, url = simulator
    return {"crm_kind": "bitrix24", "bitrix24_webhook_url": sim.webhook_url(url)}


def person(i: int) -> dict[str, Any]:
    email = REFUSED_EMAIL if i == REFUSED else f"c{i}@example.kz"
    return {"name": f"Клиент {i}", "phone": f"+7705{i:07d}", "email": email}


async def settled(db: asyncpg.Connection, n: int) -> bool:
    count = await db.fetchval("SELECT count(*) FROM jobs WHERE state IN ('done', 'dead')")
    return bool(count == n)


async def sim_state(url: str) -> dict[str, Any]:
    """The simulator's report over its control API, as an operator would read it."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/_sim/state") as resp:
        assert resp.status == 200
        state: dict[str, Any] = await resp.json()
        return state


def assert_every_deal_has_its_own_contact(state: dict[str, Any]) -> None:
    """Each deal is bound to exactly one existing contact, the person the deal is for."""
    contacts = {int(c["ID"]): c for c in state["contacts"]}
    for deal in state["deals"]:
        assert len(deal["contact_ids"]) == 1, deal
        contact = contacts.get(deal["contact_ids"][0])
        assert contact is not None, deal
        assert deal["TITLE"].endswith(contact["NAME"]), (deal, contact)


async def test_one_refused_contact_in_a_burst_of_100(
    service_factory: ServiceFactory,
    simulator: tuple[BitrixSimulator, str],
    db: asyncpg.Connection,
) -> None:
    svc = await service_factory()
    answers = await asyncio.gather(*(svc.submit("course", person(i)) for i in range(100)))
    assert all(status == 200 and a["ok"] for status, a in answers)
    await wait_for(lambda: settled(db, 100), timeout=60)

    states = dict(await db.fetch("SELECT state, count(*) FROM jobs GROUP BY state"))
    assert states == {"done": 99, "dead": 1}, states
    dead = await db.fetchrow(
        "SELECT s.lead::text AS payload, j.last_error FROM jobs j"
        " JOIN submissions s ON s.id = j.submission_id WHERE j.state = 'dead'"
    )
    assert REFUSED_EMAIL in str(dead["payload"]), dead
    assert "ERROR_CORE" in dead["last_error"] and "Invalid e-mail" in dead["last_error"], dead

    state = await sim_state(simulator[1])
    assert len(state["contacts"]) == 99 and len(state["deals"]) == 99
    assert_every_deal_has_its_own_contact(state)
    assert REFUSED_EMAIL not in str(state["contacts"])
    no_duplicates(state)


async def test_a_refused_contact_leaves_no_orphan_deal(
    service_factory: ServiceFactory,
    simulator: tuple[BitrixSimulator, str],
    db: asyncpg.Connection,
) -> None:
    """Three people in one batch, the middle one refused: nothing of theirs reaches the portal,
    and the others' deals are bound to their own contacts."""
    svc = await service_factory()
    intake = [person(i) for i in (41, REFUSED, 43)]
    for body in intake:
        assert (await svc.submit("course", body))[1]["ok"]
    await wait_for(lambda: settled(db, 3), timeout=30)
    state = await sim_state(simulator[1])
    assert len(state["deals"]) == 2, state["deals"]
    assert_every_deal_has_its_own_contact(state)
