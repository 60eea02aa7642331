"""The backbone end to end: real HTTP in, real PostgreSQL, real HTTP out to the simulator."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import asyncpg

from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import ServiceFactory, wait_for


def no_duplicates(report: dict[str, Any]) -> None:
    dups = report["duplicates"]
    assert dups["contacts_sharing_identity"] == [], dups
    assert dups["contacts_with_several_open_leads"] == [], dups


async def all_delivered(db: asyncpg.Connection, n: int) -> bool:
    done = await db.fetchval("SELECT count(*) FROM submissions WHERE state = 'delivered'")
    return bool(done == n)


async def test_fifty_identical_submissions_make_one_lead(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    svc = await service_factory()
    body = {"name": "Айгерим", "phone": "+7 701 123 45 67", "email": "Aigerim@Example.kz"}
    answers = await asyncio.gather(*(svc.submit("course", body) for _ in range(50)))

    assert {status for status, _ in answers} == {200}
    assert all(a["ok"] for _, a in answers), answers[0]
    ids = {a["id"] for _, a in answers}
    assert len(ids) == 1
    assert sum(not a["duplicate"] for _, a in answers) == 1
    assert await db.fetchval("SELECT count(*) FROM submissions") == 1
    await wait_for(lambda: all_delivered(db, 1))
    report = simulator[0].report()
    assert len(report["contacts"]) == 1
    assert len(report["leads"]) == 1
    no_duplicates(report)


def person_body(i: int, style: str, n: int) -> dict[str, Any]:
    phone = f"+7701{i:07d}"
    email = f"person{i}@example.kz"
    body: dict[str, Any] = {"name": f"Person {i}", "comment": f"submission {n}"}
    if style in ("phone", "both"):
        body["phone"] = phone
    if style in ("email", "both"):
        body["email"] = email
    return body


async def test_two_hundred_submissions_for_forty_people(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    """People identified by phone only, by email only, or by both; each person always sends
    at least the identity their first submission had, so the CRM can know them as one."""
    svc = await service_factory()
    rnd = random.Random(7)
    plan: list[dict[str, Any]] = []
    for i in range(40):
        kind = ("phone", "email", "both", "mixed-phone", "mixed-email")[i % 5]
        for n in range(5):
            if kind.startswith("mixed"):
                style = "both" if n == 0 else rnd.choice(["both", kind.split("-")[1]])
            else:
                style = kind
            plan.append(person_body(i, style, n))
    rnd.shuffle(plan)
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    for body in plan:
        queue.put_nowait(body)

    async def client() -> list[int]:
        statuses = []
        while not queue.empty():
            status, answer = await svc.submit("course", queue.get_nowait())
            assert answer["ok"], answer
            statuses.append(status)
        return statuses

    results = await asyncio.gather(*(client() for _ in range(20)))
    assert {s for r in results for s in r} == {200}
    assert await db.fetchval("SELECT count(*) FROM submissions") == 200
    await wait_for(lambda: all_delivered(db, 200), timeout=60)

    report = simulator[0].report()
    assert len(report["contacts"]) == 40
    no_duplicates(report)
    assert report["violations"] == 0


async def test_repeat_gets_original_id_from_database_after_window(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory(idempotency_window_s=0)
    headers = {"Idempotency-Key": "order-42"}
    _, first = await svc.submit("course", {"phone": "+77011112233"}, headers)
    _, second = await svc.submit("course", {"phone": "+77011112233", "x": 1}, headers)
    assert first["duplicate"] is False
    assert second == {"ok": True, "id": first["id"], "duplicate": True}
    assert await db.fetchval("SELECT count(*) FROM submissions") == 1
