"""A database that hangs instead of failing: every write blocks on a lock for a few seconds.

Slower than the write timeout (`db_write_timeout_s`, 2 s), a submission must be answered from the
fsync'd spool in time, and when the lock goes the blocked transaction and the spool's copy must
make one stored submission, delivered once. Run once per CRM kind (the `simulator` fixture of
conftest.py).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg

from tests.chaos.conftest import chaos_plan
from tests.chaos.crms import Simulator
from tests.conftest import ServiceFactory, wait_for
from tests.integration.test_resilience import no_duplicates, person

PEOPLE = 40
STALL_S = 4.0
# The write timeout, plus room for the spool's fsync and a loaded machine. The lock is held
# until every answer is in, so a sender that waited for the database would never be answered
# (the test's timeout); this bound is that the timeout, not something longer, sent it to the spool.
ANSWER_WITHIN_S = 2.0 + 3.0


async def test_stalled_database_answers_from_the_spool_and_stores_once(
    service_factory: ServiceFactory,
    simulator: tuple[Simulator, str],
    db: asyncpg.Connection,
    db_dsn: str,
) -> None:
    sim = simulator[0]
    people = PEOPLE * (5 if chaos_plan().people > 1000 else 1)
    svc = await service_factory()
    locker = await asyncpg.connect(db_dsn)
    stall = locker.transaction()
    await stall.start()
    await locker.execute("LOCK TABLE submissions IN ACCESS EXCLUSIVE MODE")
    t0 = time.monotonic()

    async def send(i: int) -> tuple[float, dict[str, object]]:
        key = {"Idempotency-Key": f"stall-{i}"}
        status, answer = await svc.submit("course", person(i, prefix="707"), key)
        assert status == 200 and answer["ok"] is True, (i, status, answer)
        return time.monotonic() - t0, answer

    try:
        results = await asyncio.gather(*(send(i) for i in range(people)))
        await asyncio.sleep(max(0.0, STALL_S - (time.monotonic() - t0)))
    finally:
        await stall.rollback()
        await locker.close()
    slowest = max(t for t, _ in results)
    answers = [a for _, a in results]
    assert slowest < ANSWER_WITHIN_S, slowest
    assert all(a.get("spooled") for a in answers), answers
    ids = {str(a["id"]) for a in answers}

    async def all_delivered_once() -> bool:
        rows = await db.fetch("SELECT id::text AS id, state FROM submissions")
        return len(rows) == people and all(r["state"] == "delivered" for r in rows)

    await wait_for(all_delivered_once, timeout=30, every=0.1)
    stored = {r["id"] for r in await db.fetch("SELECT id::text AS id FROM submissions")}
    assert stored == ids
    report = sim.report()
    assert len(report["leads"]) == people and len(report["contacts"]) == people
    no_duplicates(report)
    print(f"\nstall: {people} answered from the spool, slowest {slowest:.2f} s; stored once each")
