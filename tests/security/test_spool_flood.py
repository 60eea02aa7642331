"""Spool flooding while the database is away: past its byte cap the spool takes nothing more,
and the senders are told to come back (503 with `Retry-After`); nothing acknowledged is lost.

Before, the spool had no cap: a database outage plus a flood of valid-looking submissions
filled the data volume (the embedded database's too) until writes failed with 500s. A refused
submission that was already in the stalled transaction may be stored anyway; sent again, it is
answered as a repeat of that one, so no person gets two leads.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import asyncpg

from service.db.database import EmbeddedPostgres
from service.intake.forms import INTAKE
from tests.conftest import ServiceFactory, wait_for
from tests.integration.test_resilience import person
from tests.security.test_spool_poison import postmaster, service_backends, stopped

SPOOL_MAX = 16 * 1024  # ~25 spooled submissions
SENT = 80


async def test_spool_flood_past_its_cap_is_answered_503_and_nothing_acknowledged_is_lost(
    service_factory: ServiceFactory,
    db: asyncpg.Connection,
    pg_server: tuple[EmbeddedPostgres, str],
) -> None:
    svc = await service_factory(spool_max_bytes=SPOOL_MAX)
    status, _ = await svc.submit("course", person(SENT + 1, prefix="775"))
    assert status == 200
    answers: list[tuple[int, str | None, dict[str, Any]]] = []
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def send(data: dict[str, Any]) -> None:
        async with http.post(f"{svc.url}/api/v1/forms/course", json=data) as r:
            answers.append((r.status, r.headers.get("Retry-After"), await r.json()))

    t0 = time.monotonic()
    try:
        with stopped([postmaster(pg_server), *await service_backends(db)]):
            await asyncio.gather(*(send(person(i, prefix="775")) for i in range(SENT)))
            await send({"comment": "bad input while the spool is full " * 200})
    finally:
        await http.close()
    t_stall = time.monotonic() - t0
    *leads, (bad_status, _, bad) = answers
    assert bad_status == 200 and bad["ok"] is False and bad["kept"] is False, bad
    taken = {a["id"] for st, _, a in leads if st == 200 and a["ok"] is True}
    refused = [(st, retry, a) for st, retry, a in leads if st != 200]
    assert taken and refused, (len(taken), len(refused))
    assert all(st == 503 and retry and a["retry"] is True for st, retry, a in refused), refused
    assert len(taken) + len(refused) == SENT

    async def drained() -> bool:
        return not svc.app[INTAKE].spool.pending_files()

    t0 = time.monotonic()
    await wait_for(drained, timeout=30)
    print(f"\nstall {t_stall:.1f} s, drained in {time.monotonic() - t0:.1f} s")
    stored = {r["id"] for r in await db.fetch("SELECT id::text AS id FROM submissions")}
    assert taken <= stored
    # a refused submission may still have been in the stalled transaction, and stored: sent
    # again, it is a repeat of that one, never a second lead
    for i in range(SENT):
        status, answer = await svc.submit("course", person(i, prefix="775"))
        assert status == 200 and answer["ok"] is True, answer
    assert await db.fetchval("SELECT count(*) FROM submissions") == SENT + 1
