"""One person amoCRM refuses, among many it takes.

amoCRM answers a bad item of an array request with a 400 for the whole request, naming the item
by `request_id` — or naming nothing (CRM_FACTS.md, "amoCRM validation"). Only that person may go
dead; everyone sent with them is delivered, once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import asyncpg
import pytest

from service.settings import FormRule
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import ServiceFactory, wait_for
from tests.integration.test_delivery import no_duplicates

REFUSED = 42
COURSE_FIELD = 501  # a select field of leads: "python" or "go"


def person(i: int) -> dict[str, Any]:
    course = "cobol" if i == REFUSED else ("python", "go")[i % 2]
    return {"name": f"Person {i}", "phone": f"+7701{i:07d}", "course": course}


async def settled(db: asyncpg.Connection, n: int) -> bool:
    count = await db.fetchval("SELECT count(*) FROM jobs WHERE state IN ('done', 'dead')")
    return bool(count == n)


async def sim_state(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/_sim/state") as resp:
        assert resp.status == 200
        state: dict[str, Any] = await resp.json()
        return state


@pytest.mark.parametrize("named", [True, False], ids=["named-by-request-id", "names-nothing"])
async def test_one_refused_lead_in_a_burst_of_100(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
    named: bool,
) -> None:
    sim, url = simulator
    sim.add_lead_field(COURSE_FIELD, ["python", "go"], named=named)
    svc = await service_factory(forms={"course": FormRule(field_map={"course": COURSE_FIELD})})
    answers = await asyncio.gather(*(svc.submit("course", person(i)) for i in range(100)))
    assert all(status == 200 and a["ok"] for status, a in answers)
    await wait_for(lambda: settled(db, 100), timeout=60)

    states = dict(await db.fetch("SELECT state, count(*) FROM jobs GROUP BY state"))
    assert states == {"done": 99, "dead": 1}, states
    dead = await db.fetchrow(
        "SELECT s.lead::text AS lead, j.last_error, j.attempts FROM jobs j"
        " JOIN submissions s ON s.id = j.submission_id WHERE j.state = 'dead'"
    )
    assert "cobol" in dead["lead"], dead
    assert "not a choice of field 501" in dead["last_error"], dead  # amoCRM's own words
    assert dead["attempts"] == 1  # permanent: not retried

    state = await sim_state(url)
    assert len(state["contacts"]) == 99 and len(state["leads"]) == 99
    contacts = {c["id"]: c for c in state["contacts"]}
    for lead in state["leads"]:
        [link] = lead["_embedded"]["contacts"]
        assert lead["name"].endswith(contacts[link["id"]]["name"]), (lead, contacts[link["id"]])
    assert "cobol" not in str(state["leads"])
    no_duplicates(state)
