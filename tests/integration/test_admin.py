"""The admin API over real HTTP: token, lookups, dead letters, locks, pause/resume, OpenAPI."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from service import cli
from service.app import CLUSTER, STORE, WORKER, Roles
from service.db.store import Pending
from service.intake.locks import person_lock_key
from service.model import Lead
from service.settings import RetryPolicy
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import Service, ServiceFactory, wait_for

TOKEN = "admin-s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ONE_TRY = RetryPolicy(base_s=0.05, max_s=0.5, max_attempts=1)


async def call(
    svc: Service, method: str, path: str, *, json: Any = None, headers: dict[str, str] = AUTH
) -> tuple[int, dict[str, Any]]:
    async with svc.http.request(method, f"{svc.url}{path}", json=json, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def count(db: asyncpg.Connection, sql: str, *args: Any) -> int:
    n: int = await db.fetchval(sql, *args)
    return n


async def make_dead_letters(
    svc: Service, sim: AmoCrmSimulator, db: asyncpg.Connection, forms: list[str]
) -> None:
    sim.config.error_rate = 1.0
    for i, form in enumerate(forms):
        status, body = await svc.submit(form, {"name": f"D{i}", "phone": f"+7701555{i:04d}"})
        assert status == 200 and body["ok"], body

    async def all_dead() -> bool:
        return await count(db, "SELECT count(*) FROM jobs WHERE state = 'dead'") == len(forms)

    await wait_for(all_dead)
    sim.config.error_rate = 0.0


async def test_admin_is_absent_without_a_token(service_factory: ServiceFactory) -> None:
    svc = await service_factory()
    for path in ("/admin/", "/admin/api/jobs", "/admin/openapi.json"):
        async with svc.http.get(f"{svc.url}{path}", headers=AUTH) as r:
            assert r.status == 404, path


async def test_wrong_or_missing_token_is_401(service_factory: ServiceFactory) -> None:
    svc = await service_factory(admin_token=TOKEN)
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"}):
        async with svc.http.get(f"{svc.url}/admin/api/jobs", headers=headers) as r:
            assert r.status == 401
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    status, body = await call(svc, "GET", "/admin/api/jobs")
    assert status == 200 and body["ok"] is True


async def test_lookup_by_phone_email_form_and_date(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory(admin_token=TOKEN)
    await svc.submit("course", {"name": "Айгерим", "phone": "+7 701 123 45 67"})
    await svc.submit("webinar", {"name": "Айгерим", "email": "Aigerim@Example.kz"})
    await svc.submit("course", {"name": "Other", "phone": "+7 701 765 43 21"})

    async def delivered() -> bool:
        return await count(db, "SELECT count(*) FROM jobs WHERE state = 'done'") == 3

    await wait_for(delivered)
    # written differently from the submission: normalised the same way intake does
    status, body = await call(svc, "GET", "/admin/api/submissions?phone=8%20(701)%20123-45-67")
    assert status == 200, body
    [found] = body["submissions"]
    assert found["form"] == "course" and found["state"] == "delivered"
    assert found["job_state"] == "done" and found["attempts"] == 1
    assert found["crm_contact_id"] and found["crm_lead_id"]
    assert found["lead"]["phone"] == "+77011234567"

    _, body = await call(svc, "GET", "/admin/api/submissions?email=AIGERIM@example.KZ")
    assert [s["form"] for s in body["submissions"]] == ["webinar"]
    _, body = await call(svc, "GET", "/admin/api/submissions?form=course")
    assert len(body["submissions"]) == 2
    _, body = await call(svc, "GET", "/admin/api/submissions?since=2999-01-01")
    assert body["submissions"] == []
    _, body = await call(svc, "GET", "/admin/api/submissions?until=2999-01-01&state=delivered")
    assert len(body["submissions"]) == 3
    status, body = await call(svc, "GET", "/admin/api/submissions?phone=12")
    assert status == 400 and body["errors"][0]["field"] == "phone"
    status, body = await call(svc, "GET", "/admin/api/submissions?since=yesterday")
    assert status == 400 and body["errors"][0]["field"] == "since"
    _, body = await call(svc, "GET", "/admin/api/jobs?state=done")
    assert len(body["jobs"]) == 3 and {j["state"] for j in body["jobs"]} == {"done"}
    status, _ = await call(svc, "GET", "/admin/api/jobs?state=nonsense")
    assert status == 400


async def test_dead_letters_list_replay_and_discard(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    svc = await service_factory(admin_token=TOKEN, retry=ONE_TRY)
    await make_dead_letters(svc, simulator[0], db, ["course", "course", "webinar", "promo"])
    _, body = await call(svc, "GET", "/admin/api/dead-letters")
    dead = body["dead_letters"]
    assert len(dead) == 4 and all("CrmRetryable" in d["last_error"] for d in dead)
    promo = next(d["id"] for d in dead if d["form"] == "promo")
    webinar = next(d["id"] for d in dead if d["form"] == "webinar")

    status, body = await call(svc, "POST", f"/admin/api/dead-letters/{promo}/discard", json={})
    assert status == 200 and body["discarded"] == promo
    status, _ = await call(svc, "POST", f"/admin/api/dead-letters/{promo}/discard")
    assert status == 404  # already discarded
    _, body = await call(svc, "GET", "/admin/api/dead-letters")
    assert promo not in {d["id"] for d in body["dead_letters"]}
    await _discarded_counted_apart(svc, capsys)

    status, body = await call(svc, "POST", "/admin/api/dead-letters/replay", json={})
    assert status == 400  # no filter and no {"all": true}
    status, body = await call(
        svc, "POST", "/admin/api/dead-letters/replay", json={"form": "course", "error": "crmretry"}
    )
    assert status == 200 and len(body["replayed"]) == 2
    # a blanket replay (the CLI's `crm-relay replay`) leaves the discarded one dead
    assert await svc.app[STORE].replay(None) == 1
    assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", webinar) != "dead"
    assert await db.fetchval("SELECT state FROM jobs WHERE id = $1", promo) == "dead"
    status, body = await call(svc, "POST", f"/admin/api/dead-letters/{promo}/replay")
    assert status == 200 and body["replayed"] == [promo]
    status, _ = await call(svc, "POST", f"/admin/api/dead-letters/{promo}/replay")
    assert status == 404  # not dead any more

    async def all_delivered() -> bool:
        return await count(db, "SELECT count(*) FROM submissions WHERE state = 'delivered'") == 4

    await wait_for(all_delivered)


async def _discarded_counted_apart(svc: Service, capsys: pytest.CaptureFixture[str]) -> None:
    """Four dead letters, one discarded: "dead" is the three still waiting for a decision."""
    async with svc.http.get(f"{svc.url}/health") as r:
        queue = (await r.json())["queue"]
    assert (queue["dead"], queue["discarded"], queue["dead_letters"]) == (3, 1, 3)
    assert await cli.status(svc.app[STORE], 20) == 0
    out = capsys.readouterr().out
    assert "              dead: 3\n" in out and "         discarded: 1\n" in out
    assert "\ndead letters (newest 3):" in out
    assert "\ndiscarded dead letters (newest 1):" in out
    async with svc.http.get(f"{svc.url}/metrics") as r:
        text = await r.text()
    assert 'crm_relay_jobs{scope="cluster",state="dead"} 3.0' in text
    assert 'crm_relay_jobs{scope="cluster",state="discarded"} 1.0' in text


async def test_pause_and_resume_delivery(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory(admin_token=TOKEN)
    status, body = await call(svc, "POST", "/admin/api/delivery/pause")
    assert status == 200 and body["paused"] is True
    await svc.submit("course", {"name": "P", "phone": "+77015550001"})
    await asyncio.sleep(0.8)
    assert await count(db, "SELECT count(*) FROM jobs WHERE state = 'pending'") == 1
    _, body = await call(svc, "GET", "/admin/api/delivery")
    assert body["paused"] is True
    status, body = await call(svc, "POST", "/admin/api/delivery/resume")
    assert status == 200 and body["paused"] is False

    async def delivered() -> bool:
        return await count(db, "SELECT count(*) FROM jobs WHERE state = 'done'") == 1

    await wait_for(delivered, timeout=10)


async def test_a_pause_holds_for_every_process_and_survives_a_restart(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    """Paused through a process that runs no worker: the worker process stops claiming, a process
    started while paused stays paused, and one resume lets them all deliver."""
    front = await service_factory(Roles(http=True, worker=False), admin_token=TOKEN)
    back = await service_factory(Roles(http=False, worker=True))
    status, body = await call(front, "POST", "/admin/api/delivery/pause")
    assert status == 200 and body["paused"] is True and body["scope"] == "cluster"
    assert body["worker"] is False and body["changed_by"].startswith("admin@")

    async def back_paused() -> bool:
        return back.app[WORKER].paused

    await wait_for(back_paused, timeout=5)  # through the NOTIFY
    await front.submit("course", {"name": "P", "phone": "+77015550002"})
    late = await service_factory(Roles(http=False, worker=True))  # started while paused
    assert late.app[WORKER].paused
    await asyncio.sleep(0.8)
    assert await count(db, "SELECT count(*) FROM jobs WHERE state = 'pending'") == 1
    _, body = await call(front, "GET", "/admin/api/delivery")
    assert body["paused"] is True

    status, body = await call(front, "POST", "/admin/api/delivery/resume")
    assert status == 200 and body["paused"] is False

    async def delivered() -> bool:
        return await count(db, "SELECT count(*) FROM jobs WHERE state = 'done'") == 1

    await wait_for(delivered, timeout=10)
    assert not back.app[WORKER].paused and not late.app[WORKER].paused


async def test_locks_list_and_force_release(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory(admin_token=TOKEN)
    await svc.submit("course", {"name": "L", "phone": "+77015550002"})
    person = await db.fetchval("SELECT person_id FROM submissions")
    await wait_for(
        lambda: _scalar(db, "SELECT state = 'done' FROM jobs WHERE person_id = $1", person)
    )
    # a lease left by a worker that is stuck somewhere (not dead, so it is not reaped)
    await db.execute(
        "UPDATE people SET lease_owner = 'ghost:1', lease_until = now() + interval '1 hour' "
        "WHERE id = $1",
        person,
    )
    _, body = await call(svc, "GET", "/admin/api/locks")
    assert set(body["locks"]) >= {"process", "people"}
    [lease] = body["locks"]["people"]
    assert lease["person_id"] == person and lease["lease_owner"] == "ghost:1"

    status, body = await call(svc, "DELETE", f"/admin/api/locks/people/{person}")
    assert status == 200 and body["released"] == {"source": "people", "key": str(person)}
    assert await db.fetchval("SELECT lease_owner FROM people WHERE id = $1", person) is None
    status, _ = await call(svc, "DELETE", f"/admin/api/locks/people/{person}")
    assert status == 404
    status, body = await call(svc, "DELETE", "/admin/api/locks/process/phone:+77015550002")
    assert status == 409 and "race" in body["error"]
    status, _ = await call(svc, "DELETE", "/admin/api/locks/nowhere/1")
    assert status == 404


async def test_person_locks_listed_by_hash_and_refused_release(
    service_factory: ServiceFactory,
) -> None:
    """An ingest transaction in flight holds its people's locks: listed with the holding process
    (its connections' application_name), keyed by hash, never by phone; not releasable."""
    svc = await service_factory(admin_token=TOKEN)
    identity = "phone:+77015550009"
    lead = Lead(form="f", phone="+77015550009", email=None, name=None)
    item = Pending(uuid.uuid4(), "c:f:locks", lead, dt.datetime.now(dt.UTC)).to_json()
    async with svc.app[STORE].pool.acquire() as conn:
        writing = conn.transaction()
        await writing.start()
        await conn.fetch("SELECT * FROM relay_ingest($1::jsonb)", orjson.dumps([item]).decode())
        status, body = await call(svc, "GET", "/admin/api/locks")
        await writing.rollback()
    assert status == 200
    rows = body["locks"]["person-locks"]
    assert "77015550009" not in orjson.dumps(body).decode()  # a hash, never the phone
    expected_key = str(person_lock_key(identity) & 0xFFFFFFFF)  # pg_locks shows it unsigned
    [held] = rows
    assert held["scope"] == "cluster" and held["key"] == expected_key and held["granted"] is True
    assert held["holder"] == svc.app[CLUSTER].name

    status, body = await call(svc, "DELETE", f"/admin/api/locks/person-locks/{expected_key}")
    assert status == 409 and "held by an ingest transaction" in body["error"]
    _, body = await call(svc, "GET", "/admin/api/locks")
    assert body["locks"]["person-locks"] == []  # gone with the transaction


async def test_processes_and_cluster_mode(service_factory: ServiceFactory) -> None:
    svc = await service_factory(admin_token=TOKEN)
    status, body = await call(svc, "GET", "/admin/api/processes")
    assert status == 200 and body["cluster"]["mode"] == "single", body
    [me] = body["processes"]
    assert me["name"] == svc.app[CLUSTER].name and me["live"] is True
    assert me["mode"] == "single" and me["sends"] is True


async def _scalar(db: asyncpg.Connection, sql: str, *args: Any) -> bool:
    return bool(await db.fetchval(sql, *args))


async def test_openapi_describes_every_admin_route(service_factory: ServiceFactory) -> None:
    svc = await service_factory(admin_token=TOKEN)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{svc.url}/admin/openapi.json") as r:
            assert r.status == 200
            spec = await r.json()
    assert spec["openapi"].startswith("3.1")
    routes = [
        (route.resource.canonical, route.method.lower())
        for route in svc.app.router.routes()
        if route.resource is not None
        and route.resource.canonical.startswith("/admin")
        and route.method != "HEAD"
    ]
    assert len(routes) >= 21
    missing = [(p, m) for p, m in routes if m not in spec["paths"].get(p, {})]
    assert missing == []


async def test_dashboard_lists_are_guarded_bounded_and_checked(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory(admin_token=TOKEN)
    for i in range(3):  # bad input: no phone or email
        status, body = await svc.submit("course", {"name": f"Nobody {i}"})
        assert status == 200 and body["ok"] is False, body

    async def kept() -> bool:
        return await count(db, "SELECT count(*) FROM rejected") == 3

    await wait_for(kept)
    lists = ("rejected", "webhook-events", "forwards", "forms/today")
    for path in lists:
        assert (await call(svc, "GET", f"/admin/api/{path}", headers={}))[0] == 401, path
        for bad in ("0", "501", "x", "٣"):
            status, body = await call(svc, "GET", f"/admin/api/{path}?limit={bad}")
            assert status == 400 and body["errors"][0]["field"] == "limit", (path, bad)
    status, body = await call(svc, "GET", "/admin/api/rejected?limit=2")
    assert status == 200 and len(body["rejected"]) == 2
    first = body["rejected"][0]
    assert first["endpoint"] == "forms/course" and first["errors"][0]["field"] == "phone"
    assert "Nobody 2" in first["body_start"] and first["body_bytes"] > 0  # newest first
    status, body = await call(svc, "GET", "/admin/api/forwards?state=lost")
    assert status == 400 and body["errors"][0]["field"] == "state"
    status, body = await call(svc, "GET", "/admin/api/forms/today?since=yesterday")
    assert status == 400 and body["errors"][0]["field"] == "since"
    status, body = await call(svc, "GET", "/admin/api/forms/today")
    assert status == 200 and body["forms"] == []  # bad input is not a submission
    status, body = await call(svc, "GET", "/admin/api/overview")
    crm = body["crm"]
    assert crm["limit"] == 150.0 and crm["rate"] >= 0 and crm["paused_for_s"] == 0
    assert crm["circuit"]["open"] is False and crm["lead_url"].endswith("/leads/detail/{id}")
