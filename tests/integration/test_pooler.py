"""crm-relay behind a real PgBouncer in transaction mode, as on managed PostgreSQL.

Through the pooler each transaction may run on another server session: named prepared
statements, LISTEN and session advisory locks do not survive it. With DATABASE_DIRECT_URL beside
DATABASE_URL the service works as on a direct connection (intake, delivery, repeats); without it,
start-up stops at once with one line naming DATABASE_DIRECT_URL. The SIGKILL run and the
multi-process run go through the pooler too (`database_urls` in test_resilience.py and
test_cluster.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest

from service.app import DATABASE
from service.db import database
from service.db.database import Endpoints, endpoints, transaction_pooled
from service.errors import RelayError, SettingsError
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import ServiceFactory, wait_for
from tests.integration.test_resilience import (
    REPO,
    SERVICE_VAR_PREFIXES,
    free_port,
    no_duplicates,
    person,
)
from tests.pgbouncer_fixtures import PgBouncer, pooled

PEOPLE = 20
REFUSAL_TIMEOUT_S = 15.0


async def test_start_up_tells_a_transaction_pooler_from_a_session_of_its_own(
    db_dsn: str, pgbouncer: PgBouncer, pgbouncer_session_mode: PgBouncer
) -> None:
    via_pooler = pooled(pgbouncer, db_dsn)
    via_session_pooler = pooled(pgbouncer_session_mode, db_dsn)
    assert not await transaction_pooled(db_dsn)
    assert await transaction_pooled(via_pooler)
    assert not await transaction_pooled(via_session_pooler)  # needs nothing special

    assert await endpoints(db_dsn, None) == Endpoints.same(db_dsn)
    assert await endpoints(via_session_pooler, None) == Endpoints.same(via_session_pooler)
    # the pools on the pooler keep no prepared statements; sessions go to the direct URL
    assert await endpoints(via_pooler, db_dsn) == Endpoints(via_pooler, db_dsn, pooled=True)
    for direct in (None, via_pooler):  # nowhere for LISTEN, advisory locks, migrations
        with pytest.raises(SettingsError, match=r"^DATABASE_DIRECT_URL: .*transaction mode"):
            await endpoints(via_pooler, direct)
    with pytest.raises(SettingsError, match=r"^DATABASE_DIRECT_URL: .*transaction mode"):
        await endpoints(db_dsn, via_pooler)  # the "direct" one is a transaction pooler too


async def test_intake_delivery_and_repeats_through_pgbouncer(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    pgbouncer: PgBouncer,
    db_dsn: str,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    sim = simulator[0]
    via_pooler = pooled(pgbouncer, db_dsn)
    with caplog.at_level(logging.WARNING):
        svc = await service_factory(database_url=via_pooler, direct_url=db_dsn)
        assert svc.app[DATABASE] == Endpoints(via_pooler, db_dsn, pooled=True)

        async def ready() -> bool:
            async with svc.http.get(f"{svc.url}/readyz") as r:
                return r.status == 200

        await wait_for(ready, timeout=5)

        async def send(i: int) -> dict[str, str]:
            status, answer = await svc.submit("course", person(i), {"Idempotency-Key": f"p-{i}"})
            assert status == 200 and answer["ok"] is True, (i, status, answer)
            return answer

        first = await asyncio.gather(*(send(i) for i in range(PEOPLE)))
        assert not any(a["duplicate"] or a.get("spooled") for a in first), first
        again = await asyncio.gather(*(send(i) for i in range(PEOPLE)))
        assert [a["id"] for a in again] == [a["id"] for a in first]
        assert all(a["duplicate"] for a in again), again

        async def all_delivered() -> bool:
            n = await db.fetchval("SELECT count(*) FROM submissions WHERE state = 'delivered'")
            return bool(n == PEOPLE)

        await wait_for(all_delivered, timeout=20, every=0.1)
        async with svc.http.get(f"{svc.url}/readyz") as r:  # worker, forwarder, heartbeat
            assert r.status == 200, await r.text()
    assert await db.fetchval("SELECT count(*) FROM submissions") == PEOPLE
    report = sim.report()
    assert len(report["leads"]) == PEOPLE and len(report["contacts"]) == PEOPLE
    no_duplicates(report)
    assert report["violations"] == 0
    loud = [f"{r.levelname} {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert loud == []  # no statement lost between transactions, no part failing


def refused(command: str, pgbouncer: PgBouncer, db_dsn: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_VAR_PREFIXES)}
    env.update(
        DATABASE_URL=pooled(pgbouncer, db_dsn),
        CRM_RELAY_DATA_DIR=str(tmp_path / "var"),
        HOST="127.0.0.1",
        PORT=str(free_port()),
    )
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "service", command],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=REFUSAL_TIMEOUT_S,
    )
    took = time.monotonic() - t0
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 2, (done.returncode, lines)  # as any other bad setting
    assert len(lines) == 1, lines
    assert lines[0].startswith("crm-relay: bad setting DATABASE_DIRECT_URL: "), lines
    assert "DATABASE_URL leads to a connection pooler in transaction mode" in lines[0]
    assert took < REFUSAL_TIMEOUT_S, took  # at once, not after minutes of retries


def test_a_transaction_pooler_without_a_direct_url_is_refused_in_one_line(
    pgbouncer: PgBouncer, db_dsn: str, tmp_path: Path
) -> None:
    for command in ("serve", "migrate"):
        refused(command, pgbouncer, db_dsn, tmp_path)


async def test_a_pooler_the_check_cannot_see_is_named_at_its_first_failure(
    service_factory: ServiceFactory,
    pgbouncer: PgBouncer,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Should a pooler hide from the start-up check, the first statement it loses says what to
    do: at start-up (if the pooler moved a connection already then), or at ERROR and in /readyz
    once running; never a WARNING every 2 s."""

    async def looks_direct(_dsn: str) -> bool:
        return False

    monkeypatch.setattr(database, "transaction_pooled", looks_direct)
    with caplog.at_level(logging.ERROR):
        try:
            svc = await service_factory(database_url=pooled(pgbouncer, db_dsn))
        except RelayError as exc:  # `serve` prints it and exits 1
            assert "set DATABASE_DIRECT_URL" in str(exc), exc
            return
        reasons: list[str] = []

        async def says_why() -> bool:
            async with svc.http.get(f"{svc.url}/readyz") as r:
                reasons[:] = (await r.json())["reasons"]
            return r.status == 503 and any("set DATABASE_DIRECT_URL" in x for x in reasons)

        await wait_for(says_why, timeout=15)
    said = [r for r in caplog.records if "set DATABASE_DIRECT_URL" in r.getMessage()]
    assert said, [r.getMessage() for r in caplog.records]
