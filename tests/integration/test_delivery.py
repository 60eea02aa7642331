"""The backbone end to end: real HTTP in, real PostgreSQL, real HTTP out to the simulator."""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import asyncpg
import pytest

from service.app import FORWARDER, WORKER
from service.errors import StoreUnavailable
from service.simulators.amocrm.server import AmoCrmSimulator
from service.web import PROCESS_NAME
from tests.conftest import Service, ServiceFactory, wait_for


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
    # the same content: a key is bound to what it came with (tests/security for other content)
    _, second = await svc.submit("course", {"phone": "+77011112233"}, headers)
    assert first["duplicate"] is False
    assert second == {"ok": True, "id": first["id"], "duplicate": True}
    assert await db.fetchval("SELECT count(*) FROM submissions") == 1


class FailingBeats:
    """Stands in for `Store.heartbeat`: counts its calls and raises `error` from each."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    async def __call__(self, *_: object) -> None:
        self.calls += 1
        raise self.error


async def slow_delivery_with(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    monkeypatch: pytest.MonkeyPatch,
    beats: FailingBeats,
) -> Service:
    """A service whose worker beats every 1.5 s while a delivery takes a few CRM answers of 1 s
    each: at least one heartbeat falls inside it, and its lease (4.5 s) outlasts it."""
    simulator[0].config.latency_s = 1.0
    svc = await service_factory(lease_s=4.5)
    monkeypatch.setattr(svc.app[WORKER].store, "heartbeat", beats)
    status, _ = await svc.submit("course", {"name": "Aruzhan", "phone": "+77015550101"})
    assert status == 200
    return svc


async def test_a_heartbeat_that_fails_unexpectedly_stops_the_worker_loudly(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its leases would lapse under the delivery in flight: the loop stops, and says so."""
    beats = FailingBeats(RuntimeError("a bug in the heartbeat"))
    with caplog.at_level(logging.ERROR, logger="service.delivery.worker"):
        svc = await slow_delivery_with(service_factory, simulator, monkeypatch, beats)
        worker = svc.app[WORKER]
        await wait_for(lambda: _now(not worker.running), timeout=10)
    assert beats.calls == 1

    [crash] = [r for r in caplog.records if getattr(r, "action", "") == "worker_crashed"]
    assert crash.exc_info is not None and isinstance(crash.exc_info[1], RuntimeError)
    # the probes say which part stopped and why
    why = "worker not running: worker-heartbeat ended (RuntimeError: a bug in the heartbeat)"
    async with svc.http.get(f"{svc.url}/readyz") as r:
        assert r.status == 503 and (await r.json())["reasons"] == [why]
    async with svc.http.get(f"{svc.url}/health") as r:
        assert r.status == 503 and why in (await r.json())["reasons"]


async def test_a_database_outage_in_the_heartbeat_is_survived(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    beats = FailingBeats(StoreUnavailable("connection refused"))
    svc = await slow_delivery_with(service_factory, simulator, monkeypatch, beats)
    await wait_for(lambda: all_delivered(db, 1), timeout=15)
    assert beats.calls >= 1 and svc.app[WORKER].running
    async with svc.http.get(f"{svc.url}/readyz") as r:
        assert r.status == 200, await r.text()


async def test_the_loops_hold_their_leases_under_the_process_name(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    """One name per process: lease owners, the contact locks' connection and the pool's
    application_name (what pg_stat_activity and the admin API show) are the same."""
    svc = await service_factory()
    name, worker = svc.app[PROCESS_NAME], svc.app[WORKER]
    assert worker.owner == svc.app[FORWARDER].owner == worker.guard.name == name
    rows = await db.fetch(
        "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()"
    )
    assert name[:63] in {r["application_name"] for r in rows}  # PostgreSQL keeps 63 bytes


async def _now(value: bool) -> bool:
    return value
