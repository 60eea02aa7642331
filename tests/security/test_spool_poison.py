"""A poison spool entry and a stalled database: acknowledged leads still arrive, bad input is
still answered in time.

The database is stalled, not refused: the embedded postmaster and every backend serving the
service are stopped (SIGSTOP), so connections and statements hang as on a frozen host. During
the stall 100 good submissions, one with a NUL in a field and one bad-input submission arrive;
then the database resumes (SIGCONT). Before, the NUL made the spooled batch unstorable
(`jsonb` refuses \\u0000): the drain raised every second and the poison lead and those next to it
never reached the CRM; keeping the bad input waited on the database with no timeout.

A second test writes what the database would still refuse (a spooled entry of an older
version, a NUL in a stored field) among good entries straight into the spool: the good ones
are stored, the poison is quarantined and listed by the admin API, the spool is emptied.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import asyncpg
import orjson

from service.db.database import EmbeddedPostgres
from service.intake.forms import INTAKE
from service.settings import GenericSource
from tests.conftest import ServiceFactory, wait_for
from tests.integration.test_resilience import no_duplicates, person, spool_files

GOOD = 100
STALL_S = 4.0
ANSWER_WITHIN_S = 2.0 + 1.5  # the write timeout, plus the spool's fsync on a busy machine
TOKEN = "t" * 40


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def service_backends(db: asyncpg.Connection) -> list[int]:
    rows = await db.fetch(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid()"
    )
    return [r["pid"] for r in rows]


def postmaster(pg_server: tuple[EmbeddedPostgres, str]) -> int:
    return int((pg_server[0].pgdata / "postmaster.pid").read_text().split()[0])


async def test_spool_poison_nul_lead_in_a_stalled_database_is_delivered_once_cleaned(
    service_factory: ServiceFactory,
    simulator: tuple[Any, str],
    db: asyncpg.Connection,
    pg_server: tuple[EmbeddedPostgres, str],
) -> None:
    sim = simulator[0]
    svc = await service_factory(generic_sources={"site": GenericSource(verify="none")})
    status, warm = await svc.submit("course", person(GOOD + 10, prefix="778"))
    assert status == 200 and warm["ok"] is True, warm
    await wait_for(lambda: _all_delivered(db, 1), timeout=30)
    t0 = time.monotonic()

    # a session of its own without a connection limit: every request is sent at once
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def send(form: str, data: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        async with http.post(f"{svc.url}/api/v1/forms/{form}", json=data) as r:
            return time.monotonic() - t0, r.status, await r.json(content_type=None)

    async def hook(data: dict[str, Any]) -> tuple[float, int, dict[str, Any]]:
        async with http.post(f"{svc.url}/webhooks/generic/site", json=data) as r:
            return time.monotonic() - t0, r.status, await r.json(content_type=None)

    poison = {**person(GOOD, prefix="778"), "name": "Nul\x00Person", "comment": "a\x00b"}
    try:
        with stopped([postmaster(pg_server), *await service_backends(db)]):
            t0 = time.monotonic()
            event = asyncio.create_task(hook({"event": "paid\x00", "n\x00te": "a\x00b"}))
            results = await asyncio.gather(
                *(send("course", person(i, prefix="778")) for i in range(GOOD)),
                send("course", poison),
                send("course", {"name": "no contact at all", "comment": "bad input"}),
            )
            _, event_status, event_answer = await event
            await asyncio.sleep(max(0.0, STALL_S - (time.monotonic() - t0)))
    finally:
        await http.close()
    *good, (bad_s, bad_status, bad) = results
    assert bad_status == 200 and bad["ok"] is False and "kept" not in bad, bad
    assert bad_s < ANSWER_WITHIN_S, f"bad input answered after {bad_s:.2f} s"
    slowest = max(s for s, _, _ in good)
    assert slowest < ANSWER_WITHIN_S, slowest
    assert all(st == 200 and a["ok"] is True for _, st, a in good), good
    ids = {a["id"] for _, _, a in good}
    # a webhook event with NUL in it, acknowledged from the spool: stored as an event, cleaned
    assert event_status == 200 and event_answer["ok"] is True, event_answer

    await wait_for(lambda: _all_delivered(db, GOOD + 2), timeout=60, every=0.2)
    stored = {r["id"] for r in await db.fetch("SELECT id::text AS id FROM submissions")}
    assert ids <= stored
    spool = svc.app[INTAKE].spool
    await wait_for(lambda: _spool_empty(spool), timeout=10)
    assert spool.quarantine_files() == []
    cleaned = await db.fetchval(
        "SELECT lead FROM submissions WHERE id = $1", uuid.UUID(good[GOOD][2]["id"])
    )
    lead = orjson.loads(cleaned)
    assert lead["name"] == "NulPerson" and lead["fields"]["comment"] == "ab", lead
    rejected = await db.fetchval("SELECT count(*) FROM rejected WHERE endpoint = 'forms/course'")
    assert rejected == 1
    payload = await db.fetchval(
        "SELECT payload FROM webhook_events WHERE id = $1", uuid.UUID(event_answer["id"])
    )
    assert payload is not None and "\\u0000" not in payload and "a" in payload
    report = sim.report()
    assert len(report["leads"]) == GOOD + 2
    no_duplicates(report)


async def _all_delivered(db: asyncpg.Connection, n: int) -> bool:
    rows = await db.fetch("SELECT state FROM submissions")
    return len(rows) == n and all(r["state"] == "delivered" for r in rows)


async def _spool_empty(spool: Any) -> bool:
    return not spool.pending_files()


def _entry(i: int, **lead: Any) -> dict[str, Any]:
    phone = f"+7747{i:07d}"
    body = {"form": "old", "phone": phone, "email": None, "name": f"Old {i}", "utm": {}}
    return {
        "type": "submission",
        "id": str(uuid.uuid4()),
        "idem_key": f"h:old:spooled-{i}",
        "form": "old",
        "lead": {**body, "fields": {}, **lead},
        "identities": [f"phone:{phone}"],
        "received_at": "2026-01-01T00:00:00+00:00",
    }


async def test_spool_poison_entry_is_quarantined_and_the_rest_stored(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory(admin_token=TOKEN)
    spool = svc.app[INTAKE].spool
    entries = [_entry(i) for i in range(5)]
    entries.insert(2, _entry(99, fields={"note": "spooled by an older version \x00"}))
    errors = [{"field": "phone", "message": "\x00"}]
    old_rejected = {"type": "rejected", "endpoint": "forms/old", "body": "x\x00y"}
    entries.append({**old_rejected, "content_type": None, "errors": errors})
    spool.directory.mkdir(parents=True, exist_ok=True)
    path = spool.directory / "spool-1-0badf00d.jsonl"
    path.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in entries))

    async def drained() -> bool:
        return not spool_files(spool.directory)

    await wait_for(drained, timeout=15)
    keys = {r["idem_key"] for r in await db.fetch("SELECT idem_key FROM submissions")}
    assert keys == {f"h:old:spooled-{i}" for i in range(5)}
    assert await db.fetchval("SELECT count(*) FROM rejected WHERE endpoint = 'forms/old'") == 1
    async with svc.http.get(
        f"{svc.url}/admin/api/spool", headers={"Authorization": f"Bearer {TOKEN}"}
    ) as r:
        assert r.status == 200
        seen = await r.json()
    [q] = seen["quarantined"]
    assert q["type"] == "submission" and "spooled-99" in q["entry"], q
    assert "UntranslatableCharacter" in q["error"] or "Refused" in q["error"], q
    assert q["spool_file"] == path.name
    assert seen["pending_bytes"] == 0 and seen["quarantine_bytes"] > 0
    async with svc.http.get(f"{svc.url}/health") as r:
        assert (await r.json())["spool"]["quarantined"] == 1
