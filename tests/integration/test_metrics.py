"""`/metrics` and `/health` after a real scenario: every figure the issue lists, and right."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from service.app import GATE
from service.crm.simulator import AmoCrmSimulator
from service.intake import INTAKE
from service.settings import RetryPolicy
from tests.conftest import Service, ServiceFactory, wait_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(svc: Service) -> Samples:
    async with svc.http.get(f"{svc.url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def db_count(db: asyncpg.Connection, sql: str) -> int:
    n: int = await db.fetchval(sql)
    return n


async def test_metrics_after_a_scenario(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim = simulator[0]
    svc = await service_factory(retry=RetryPolicy(base_s=0.05, max_s=0.2, max_attempts=2))
    lead = {"name": "M", "phone": "+77015550101"}
    assert (await svc.submit("course", lead))[1]["duplicate"] is False
    assert (await svc.submit("course", lead))[1]["duplicate"] is True  # idempotency window
    assert (await svc.submit("course", {"name": "no contact"}))[1]["ok"] is False
    # what intake does after a failed write: skip the database for a moment, spool instead
    svc.app[INTAKE]._db_down_until = time.monotonic() + 5
    assert (await svc.submit("course", {"phone": "+77015550102"}))[1].get("spooled")
    svc.app[INTAKE]._db_down_until = 0.0

    async def delivered(n: int) -> bool:
        return await db_count(db, "SELECT count(*) FROM jobs WHERE state = 'done'") == n

    await wait_for(lambda: delivered(2))
    sim.config.error_rate = 1.0  # 5xx twice, then a dead letter
    await svc.submit("course", {"phone": "+77015550103"})
    await wait_for(lambda: db_count(db, "SELECT count(*) FROM jobs WHERE state = 'dead'"))

    m = await scrape(svc)
    form = {"method": "POST", "route": "/api/v1/forms/{form}", "status": "200"}
    assert value(m, "crm_relay_http_requests_total", **form) == 5
    latency = {"method": "POST", "route": "/api/v1/forms/{form}"}
    assert value(m, "crm_relay_http_request_duration_seconds_count", **latency) == 5
    for outcome, n in (("accepted", 2), ("duplicate", 1), ("rejected", 1), ("spooled", 1)):
        assert value(m, "crm_relay_submissions_total", outcome=outcome) == n, outcome
    assert value(m, "crm_relay_crm_calls_total", outcome="ok") >= 2
    assert value(m, "crm_relay_crm_calls_total", outcome="5xx") >= 2
    assert value(m, "crm_relay_crm_call_duration_seconds_count") >= 4
    assert value(m, "crm_relay_jobs", state="done") == 2
    assert value(m, "crm_relay_jobs", state="dead") == 1
    assert value(m, "crm_relay_dead_letters") == 1
    assert ("crm_relay_jobs_due", ()) in m and ("crm_relay_oldest_due_job_age_seconds", ()) in m
    assert value(m, "crm_relay_job_attempts_count", state="done") == 2
    assert value(m, "crm_relay_job_attempts_bucket", state="dead", le="1.0") == 0
    assert value(m, "crm_relay_job_attempts_bucket", state="dead", le="2.0") == 1
    assert value(m, "crm_relay_idempotency_window_hits_total") == 1
    assert ("crm_relay_lock_waits_total", ()) in m
    assert value(m, "crm_relay_delivered_total") == 2
    assert value(m, "crm_relay_spool_appended_total") == 1
    assert value(m, "crm_relay_database_up") == 1
    assert value(m, "crm_relay_limiter_rate") == 150
    assert value(m, "crm_relay_circuit_open", crm="amocrm") == 0
    assert value(m, "crm_relay_worker_running") == 1


async def test_lock_waits_are_counted(service_factory: ServiceFactory) -> None:
    svc = await service_factory()
    same = {"name": "W", "phone": "+77015550201"}
    await asyncio.gather(*(svc.submit("course", {**same, "comment": str(i)}) for i in range(20)))
    m = await scrape(svc)
    assert value(m, "crm_relay_lock_waits_total") >= 1


async def test_health_details_and_503_with_reasons(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory()
    await svc.submit("course", {"name": "H", "phone": "+77015550301"})
    await wait_for(lambda: db_count(db, "SELECT count(*) FROM jobs WHERE state = 'done'"))

    async def health() -> tuple[int, dict[str, Any]]:
        async with svc.http.get(f"{svc.url}/health") as r:
            return r.status, await r.json()

    status, h = await health()
    assert status == 200 and h["ok"] is True and h["reasons"] == [], h
    assert h["version"] and h["uptime_s"] >= 0
    assert h["database"]["ok"] and h["database"]["latency_ms"] >= 0
    assert h["database"]["pool_max"] >= h["database"]["pool_in_use"] >= 0
    for key in ("pending", "due", "running", "dead", "dead_letters", "oldest_due_age_s"):
        assert key in h["queue"], key
    assert h["spool"]["bytes"] == 0
    assert {"rate", "observed_rate_1m", "paused_for_s"} <= set(h["limiter"])
    assert h["circuit"] == {"amocrm": {"open": False, "reason": ""}}
    assert h["worker"]["last_success"] is not None and h["worker"]["delivered"] == 1
    assert "webhooks" in h

    svc.app[GATE].open_circuit("CrmBlocked: 403 account blocked", 60)
    status, h = await health()
    assert status == 503 and h["ok"] is False
    assert any("circuit open" in r for r in h["reasons"]), h["reasons"]
    svc.app[GATE].close_circuit()
    assert (await health())[0] == 200
