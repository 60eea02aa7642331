"""A guessed Idempotency-Key must not swallow someone else's submission: a key is bound to the
content it first came with. The same key with the same content is a duplicate, as before; with
other content the sender is told so and what was sent is kept in `rejected` for review."""

from __future__ import annotations

import datetime as dt
import uuid

import asyncpg

from service.db.store import Pending
from service.intake.forms import INTAKE
from service.model import Lead
from tests.conftest import ServiceFactory

KEY = {"Idempotency-Key": "order-1842"}  # an order number: easy to guess


async def test_guessed_idempotency_key_does_not_swallow_another_persons_submission(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory()
    squatter = {"name": "Bot", "phone": "+77015550000"}
    status, first = await svc.submit("course", squatter, headers=KEY)
    assert status == 200 and first["ok"] and not first["duplicate"]

    real = {"name": "Айгерим", "phone": "+77011234567", "comment": "paid order 1842"}
    status, body = await svc.submit("course", real, headers=KEY)
    assert status == 200
    assert body["ok"] is False, body
    assert body["errors"][0]["field"] == "Idempotency-Key"

    kept = await db.fetchrow("SELECT body, errors FROM rejected")
    assert kept is not None and b"+77011234567" in kept["body"], "never silently dropped"
    assert "Idempotency-Key" in kept["errors"]

    # the same key with the same content is still a plain duplicate
    status, again = await svc.submit("course", squatter, headers=KEY)
    assert again == {"ok": True, "id": first["id"], "duplicate": True}


async def test_reused_key_is_caught_by_the_database_when_the_window_has_forgotten_it(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory()
    _, first = await svc.submit("course", {"phone": "+77015550001"}, headers=KEY)
    svc.app[INTAKE].window._entries.clear()  # a restart, or another process, knows nothing
    _, body = await svc.submit("course", {"phone": "+77015550002"}, headers=KEY)
    assert body["ok"] is False, body
    _status, again = await svc.submit("course", {"phone": "+77015550001"}, headers=KEY)
    assert again == {"ok": True, "id": first["id"], "duplicate": True}
    assert await db.fetchval("SELECT count(*) FROM rejected") == 1
    assert await db.fetchval("SELECT count(*) FROM submissions") == 1


async def test_reused_key_in_a_spooled_submission_is_kept_for_review_when_drained(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    """Spooled while the database was away, answered ok: on drain, a key that turns out to name
    other content is kept in `rejected`, not dropped as a duplicate."""
    svc = await service_factory()
    await svc.submit("course", {"phone": "+77015550001"}, headers=KEY)
    key = f"h:course:{KEY['Idempotency-Key']}"
    lead = Lead("course", "+77015550003", None, "Spooled")
    spooled = Pending(uuid.uuid4(), key, lead, dt.datetime.now(dt.UTC))
    await svc.app[INTAKE].drain_spooled([{"type": "submission", **spooled.to_json()}])
    body = await db.fetchval("SELECT body FROM rejected")
    assert body is not None and b"+77015550003" in body
    assert await db.fetchval("SELECT count(*) FROM submissions") == 1
