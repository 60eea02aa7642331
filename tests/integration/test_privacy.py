"""Spam release, erasure (`crm-relay forget`, POST /admin/api/forget) and retention, against the
real database and the amoCRM simulator over HTTP."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import asyncpg
import orjson
import pytest

from service import cli
from service.app import STORE
from service.db.privacy_store import PrivacyStore
from service.ops.retention import RETENTION
from service.settings import FormRule, SpamRule
from service.simulators.amocrm.server import AmoCrmSimulator
from service.web import SETTINGS
from tests.conftest import Service, ServiceFactory, wait_for

TOKEN = "admin-token-for-the-privacy-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
HONEYPOT = {"course": FormRule(spam=SpamRule(honeypot="website"))}


async def call(svc: Service, method: str, path: str, json: Any = None) -> tuple[int, Any]:
    async with svc.http.request(method, f"{svc.url}{path}", json=json, headers=AUTH) as r:
        return r.status, await r.json(content_type=None)


async def jobs_done(db: asyncpg.Connection) -> int:
    n: int = await db.fetchval("SELECT count(*) FROM jobs WHERE state = 'done'")
    return n


async def test_released_spam_is_delivered_once(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim, _ = simulator
    svc = await service_factory(admin_token=TOKEN, forms=HONEYPOT)
    data = {"name": "Real", "phone": "+77016660001", "website": "autofilled"}
    _, answered = await svc.submit("course", data)
    status, listed = await call(svc, "GET", "/admin/api/spam?reason=honeypot")
    assert status == 200 and [s["id"] for s in listed["spam"]] == [answered["id"]]
    assert listed["spam"][0]["lead"]["phone"] == "+77016660001"
    assert len(sim.store.leads) == 0

    status, released = await call(svc, "POST", f"/admin/api/spam/{answered['id']}/release")
    assert status == 200, released
    assert released == {
        "ok": True,
        "submission_id": answered["id"],  # the id the sender was given
        "duplicate": False,
        "already_released": False,
    }

    async def one_delivered() -> bool:
        return await jobs_done(db) == 1

    await wait_for(one_delivered)
    status, again = await call(svc, "POST", f"/admin/api/spam/{answered['id']}/release")
    assert again["already_released"] is True and again["submission_id"] == answered["id"]
    assert await db.fetchval("SELECT count(*) FROM jobs") == 1
    assert len(sim.store.leads) == 1
    _, listed = await call(svc, "GET", "/admin/api/spam?released=false")
    assert listed["spam"] == []
    status, _missing = await call(svc, "POST", f"/admin/api/spam/{uuid.uuid4()}/release")
    assert status == 404
    status, _bad = await call(svc, "POST", "/admin/api/spam/not-a-uuid/release")
    assert status == 400


async def test_forget_erases_one_person_here_and_says_what_it_removed(
    service_factory: ServiceFactory,
    db: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    svc = await service_factory(admin_token=TOKEN, forms=HONEYPOT)
    await svc.submit("course", {"name": "A", "phone": "+77017770001", "email": "a@example.kz"})
    await svc.submit("other", {"name": "A", "email": "A@Example.kz", "comment": "again"})
    await svc.submit("course", {"name": "A", "phone": "+77017770001", "website": "x"})
    await svc.submit("course", {"name": "B", "phone": "+77017770002"})
    # a rejected body that names A, written as a person types it, urlencoded
    async with svc.http.post(
        f"{svc.url}/api/v1/forms/course",
        data="comment=call%20me%3A%208%20(701)%20777-00-01",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as r:
        assert (await r.json())["ok"] is False

    async def all_done() -> bool:
        return await jobs_done(db) == 3

    # delivered first: an in-flight delivery would put the contact's identities back into the
    # contact index (a mirror of the CRM, which keeps the contact) after the erasure
    await wait_for(all_done)
    status, answer = await call(svc, "POST", "/admin/api/forget", {"phone": "8 701 777 00 01"})
    assert status == 200, answer
    removed = answer["removed"]
    assert removed["submissions"] == 2 and removed["jobs"] == 2  # both forms: one person
    assert removed["identities"] == 2 and removed["people"] == 1
    assert removed["spam"] == 1 and removed["rejected"] == 1
    left = await db.fetch("SELECT lead->>'name' AS name FROM submissions")
    assert [r["name"] for r in left] == ["B"]
    assert await db.fetchval("SELECT count(*) FROM identities") == 1

    status, nothing = await call(svc, "POST", "/admin/api/forget", {"email": "a@example.kz"})
    assert status == 200 and sum(nothing["removed"].values()) == 0
    status, bad = await call(svc, "POST", "/admin/api/forget", {})
    assert status == 400
    status, bad = await call(svc, "POST", "/admin/api/forget", {"phone": "12"})
    assert status == 400 and bad["errors"][0]["field"] == "phone"

    # the command line does the same
    settings = svc.app[SETTINGS]
    assert await cli.forget(svc.app[STORE], "+77017770002", None, settings) == 0
    out = capsys.readouterr().out
    assert "submissions: 1" in out and "the CRM is not changed" in out
    assert await db.fetchval("SELECT count(*) FROM submissions") == 0
    assert cli.main(["forget"]) == 2


async def age(db: asyncpg.Connection, table: str, column: str, days: int) -> None:
    await db.execute(f"UPDATE {table} SET {column} = now() - make_interval(days => {days})")


async def test_retention_purges_old_personal_data_but_never_undelivered_work(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim, _ = simulator
    svc = await service_factory(
        forms=HONEYPOT, retention_days=30.0, spam_max_rows=1, retention_check_s=3600.0
    )
    await svc.submit("course", {"name": "Old", "phone": "+77018880001"})

    async def delivered() -> bool:
        return await jobs_done(db) == 1

    await wait_for(delivered)
    sim.config.error_rate = 1.0  # the next lead keeps failing: pending, retrying
    await svc.submit("course", {"name": "Owed", "phone": "+77018880002"})
    await svc.submit("course", {"name": "Bot", "phone": "+77018880003", "website": "x"})
    await svc.submit("course", {"name": "Bot2", "phone": "+77018880004", "website": "y"})
    await svc.submit("course", {"phone": "nope"})  # rejected
    await age(db, "submissions", "received_at", 31)
    await age(db, "rejected", "received_at", 31)

    removed = await svc.app[RETENTION].run_once()
    assert removed["submissions"] == 1 and removed["rejected"] == 1
    assert removed["spam"] == 1  # past SPAM_MAX_ROWS = 1: the older one
    names = [r["n"] for r in await db.fetch("SELECT lead->>'name' AS n FROM submissions")]
    assert names == ["Owed"], "undelivered work stays whatever its age"
    assert await db.fetchval("SELECT lead->>'name' FROM spam") == "Bot2"
    assert await db.fetchval("SELECT count(*) FROM jobs") == 1


async def test_retention_keeps_webhook_events_until_forwarded(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory()
    store = PrivacyStore(svc.app[STORE].pool)
    delivery = uuid.uuid4()
    await db.execute(
        "INSERT INTO webhook_deliveries (id, source, raw, received_at) VALUES ($1, 'x', '', now())",
        delivery,
    )
    for state in ("done", "pending"):
        event = uuid.uuid4()
        await db.execute(
            "INSERT INTO webhook_events (id, delivery_id, source, event_key, kind, payload,"
            " received_at) VALUES ($1, $2, 'x', $3, 'k', $4::jsonb, now())",
            event,
            delivery,
            state,
            orjson.dumps({"phone": "+77019990001"}).decode(),
        )
        # the pending one is a retry due in an hour: the service's own forwarder, running
        # beside this test, must not take and finish it before the purge (under load it did)
        await db.execute(
            "INSERT INTO forward_jobs (event_id, kind, state, run_at)"
            " VALUES ($1, 'process', $2, now() + interval '1 hour')",
            event,
            state,
        )
    await age(db, "webhook_events", "received_at", 10)
    await age(db, "webhook_deliveries", "received_at", 10)
    removed = await store.purge(days=1, spam_days=30, spam_max_rows=100)
    assert removed["webhook_events"] == 1 and removed["webhook_deliveries"] == 0
    assert await db.fetchval("SELECT event_key FROM webhook_events") == "pending"
    assert dt.timedelta(0) < await db.fetchval("SELECT now() - received_at FROM webhook_deliveries")
