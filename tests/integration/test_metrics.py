"""`/metrics` and `/health` after a real scenario: every figure the issue lists, and right."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from service.app import CLUSTER as CLUSTER_KEY
from service.app import FORWARDER, GATE, STORE, Roles
from service.intake.forms import INTAKE
from service.settings import RetryPolicy
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import Service, ServiceFactory, wait_for
from tests.integration.test_webhooks import FORM, SECRET, amo_body, amo_status
from tests.unit.test_monitoring import assert_monitoring_names_exist

if TYPE_CHECKING:  # imported by pytest as a plugin (below), before this module
    from tests.redis_fixtures import RedisServer

pytest_plugins = ("tests.redis_fixtures",)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
CLUSTER = {"scope": "cluster"}  # the figures read from the database


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
    svc.app[INTAKE].commit.skip_database(5)
    assert (await svc.submit("course", {"phone": "+77015550102"}))[1].get("spooled")
    svc.app[INTAKE].commit.skip_database(0)

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
    assert value(m, "crm_relay_jobs", state="done", **CLUSTER) == 2
    assert value(m, "crm_relay_jobs", state="dead", **CLUSTER) == 1
    assert value(m, "crm_relay_dead_letters", **CLUSTER) == 1
    assert ("crm_relay_jobs_due", (("scope", "cluster"),)) in m
    assert ("crm_relay_oldest_due_job_age_seconds", (("scope", "cluster"),)) in m
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
    # the standard collectors, next to ours: the memory figure to hold against the pod's limit
    assert value(m, "process_resident_memory_bytes") > 10 * 2**20
    assert value(m, "python_gc_objects_collected_total", generation="0") >= 0
    assert any(name == "python_info" for name, _ in m)

    # attempts were counted as the jobs finished: a replay does not make them fall, the job's
    # second death counts once more
    assert value(m, "crm_relay_job_attempts_count", state="dead") == 1
    assert await svc.app[STORE].replay(None) == 1

    async def died_again() -> bool:
        return value(await scrape(svc), "crm_relay_job_attempts_count", state="dead") == 2

    await wait_for(died_again)
    after = await scrape(svc)
    assert value(after, "crm_relay_jobs", state="dead", **CLUSTER) == 1
    assert value(after, "crm_relay_job_attempts_count", state="done") == 2
    assert_monitoring_names_exist(after)


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


async def get(svc: Service, path: str) -> tuple[int, dict[str, Any]]:
    async with svc.http.get(f"{svc.url}{path}") as r:
        return r.status, await r.json()


@pytest.fixture
async def refusing_receiver() -> AsyncIterator[str]:
    """A downstream that answers 500 to everything: with one attempt, forwards die."""

    async def refuse(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=500)

    app = web.Application()
    app.router.add_post("/hook", refuse)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    await runner.cleanup()


async def test_webhooks_forwarder_outbox_and_cluster_in_health_and_metrics(
    service_factory: ServiceFactory, refusing_receiver: str, db: asyncpg.Connection
) -> None:
    svc = await service_factory(
        webhook_secret=SECRET,
        webhook_forward_url=refusing_receiver,
        retry=RetryPolicy(base_s=0.05, max_s=0.2, max_attempts=1),
    )
    body = amo_body(amo_status(25399013, 142, 1700000100))
    async with svc.http.post(f"{svc.url}/webhooks/amocrm/{SECRET}", data=body, headers=FORM) as r:
        assert r.status == 200

    async def forward_dead() -> bool:
        return await db_count(db, "SELECT count(*) FROM forward_jobs WHERE state = 'dead'") == 1

    await wait_for(forward_dead)

    status, h = await get(svc, "/health")
    assert status == 200, h  # a dead forward job is for operators, not a failed probe
    assert h["webhooks"]["intake"]["events"] == 1
    assert h["webhooks"]["answers"] == {"/webhooks/amocrm/{secret} 200": 1}
    fwd = h["forwarder"]
    assert fwd["running"] is True and (fwd["processed"], fwd["failed"]) == (1, 1), fwd
    assert h["forward_jobs"] == {
        "by_kind": {"process": {"done": 1}, "forward": {"dead": 1}},
        "dead": 1,
    }
    assert h["limiter"]["mode"] == "single" and h["cluster"]["mode"] == "single"
    [me] = h["cluster"]["processes"]
    assert me["name"] == svc.app[CLUSTER_KEY].name and me["live"] is True
    assert "redis" not in h  # no REDIS_URL: no probe

    m = await scrape(svc)
    assert value(m, "crm_relay_webhook_events_total", outcome="events") == 1
    assert value(m, "crm_relay_webhook_events_total", outcome="duplicate") == 0
    assert value(m, "crm_relay_forwarder_jobs_total", outcome="processed") == 1
    assert value(m, "crm_relay_forwarder_jobs_total", outcome="failed") == 1
    assert value(m, "crm_relay_forwarder_running") == 1
    assert value(m, "crm_relay_forward_jobs", kind="forward", state="dead", **CLUSTER) == 1
    assert value(m, "crm_relay_forward_jobs", kind="process", state="done", **CLUSTER) == 1
    assert value(m, "crm_relay_forward_dead_jobs", **CLUSTER) == 1
    assert value(m, "crm_relay_cluster_mode", mode="single") == 1
    assert value(m, "crm_relay_cluster_mode", mode="redis") == 0
    assert value(m, "crm_relay_cluster_live_senders") == 1
    assert value(m, "crm_relay_cluster_processes", **CLUSTER) == 1
    assert ("crm_relay_redis_up", ()) not in m


async def test_readyz_requires_a_running_forwarder(service_factory: ServiceFactory) -> None:
    svc = await service_factory()
    assert (await get(svc, "/readyz"))[0] == 200
    forwarder = svc.app[FORWARDER]
    await forwarder.stop()

    async def stopped() -> bool:
        return not forwarder.running

    await wait_for(stopped, timeout=10)
    status, body = await get(svc, "/readyz")
    assert status == 503 and body["reasons"] == ["forwarder not running"], body
    status, h = await get(svc, "/health")
    assert status == 503 and "forwarder not running" in h["reasons"]
    # intake only (`serve --no-worker`) runs no forwarder and expects none
    intake_only = await service_factory(Roles(worker=False))
    assert (await get(intake_only, "/readyz"))[0] == 200


async def test_health_reports_redis_and_its_loss(
    redis_server: RedisServer, service_factory: ServiceFactory
) -> None:
    svc = await service_factory(redis_url=redis_server.url)
    status, h = await get(svc, "/health")
    assert status == 200, h
    assert h["redis"]["ok"] is True and h["redis"]["latency_ms"] >= 0
    assert h["cluster"]["mode"] == "redis" and h["limiter"]["mode"] == "redis"
    m = await scrape(svc)
    assert value(m, "crm_relay_redis_up") == 1
    assert value(m, "crm_relay_cluster_mode", mode="redis") == 1

    redis_server.kill()
    status, h = await get(svc, "/health")
    assert status == 503 and "redis unreachable" in h["reasons"], h
    assert h["redis"]["ok"] is False and h["redis"]["error"]
    assert h["cluster"]["mode"] == "local-share"
    assert value(await scrape(svc), "crm_relay_redis_up") == 0

    redis_server.start()

    async def healthy() -> bool:
        return (await get(svc, "/health"))[0] == 200

    await wait_for(healthy, timeout=10)
