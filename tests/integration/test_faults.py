"""Delivery under CRM trouble: crashes, the rate limit, 429/5xx/timeouts/401, permanent errors."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import asyncpg
import pytest

from service.app import WORKER, Roles
from service.cli import main as cli_main
from service.settings import FormRule, RetryPolicy
from service.simulators.amocrm.server import AmoCrmSimulator, SimulatorConfig
from tests.conftest import ServiceFactory, wait_for
from tests.integration.crm_faults import crash_after_crm
from tests.integration.test_delivery import all_delivered, no_duplicates


def lead_of(i: int) -> dict[str, Any]:
    return {"name": f"Lead {i}", "phone": f"+7702{i:07d}", "email": f"lead{i}@example.kz"}


async def test_crash_between_crm_create_and_local_commit_makes_no_duplicate(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    svc = await service_factory(lease_s=1.5)
    crashes = crash_after_crm(svc.app[WORKER])
    _, answer = await svc.submit("course", lead_of(1))
    await wait_for(lambda: all_delivered(db, 1), timeout=20)

    assert crashes, "the crash never happened"
    report = simulator[0].report()
    assert len(report["contacts"]) == 1
    assert len(report["leads"]) == 1
    no_duplicates(report)
    # the retry found the contact by search and added the submission as a note instead
    assert any(answer["id"] in n["params"]["text"] for n in report["notes"]), report["notes"]


async def test_backlog_drains_at_the_limit_without_a_single_429(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim = simulator[0]
    sim.config.rate_limit = 5
    intake = await service_factory(Roles(worker=False))
    for batch in range(0, 300, 50):
        await asyncio.gather(
            *(intake.submit("course", lead_of(i)) for i in range(batch, batch + 50))
        )
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE state = 'pending'") == 300

    # the contact index's re-read window as by default: its sync answers the batches of the
    # next 2 s (re-reading before every tiny batch would go at the index's own third of the
    # limit)
    await service_factory(
        Roles(http=False), crm_rate_limit=5.0, worker_round=4, amocrm_index_refresh_s=2.0
    )
    await wait_for(lambda: _requests_after_first(sim, 10.5), timeout=30)

    times = sorted(e.t for e in sim.log.entries)
    in_window = sum(1 for t in times if times[0] <= t < times[0] + 10.0)
    report = sim.report()
    assert report["violations"] == 0
    assert report["answers_by_status"].get("429", 0) == 0
    assert report["max_in_any_second"] <= 5
    # it drains, never over the limit. How much of the limit it uses is a figure for
    # bench/delivery.py (rate ÷ limit), not a threshold here: on a 2-core machine at load
    # average 9 this drain measured 2.4 requests/s of the 5 allowed
    assert in_window >= 10, f"{in_window / 10:.2f} req/s: the backlog is not draining"


async def _requests_after_first(sim: AmoCrmSimulator, seconds: float) -> bool:
    entries = sim.log.entries
    return bool(entries) and entries[-1].t - entries[0].t >= seconds


async def test_storm_of_429_5xx_timeouts_and_a_token_expiry_all_deliver(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim = simulator[0]
    cfg = SimulatorConfig()
    svc = await service_factory(
        amocrm_access_token=None,
        amocrm_client_id=cfg.client_id,
        amocrm_client_secret=cfg.client_secret,
        amocrm_refresh_token=cfg.refresh_token,
        amocrm_redirect_uri="https://relay.example/oauth",
        crm_timeout_s=0.5,
        retry=RetryPolicy(base_s=0.05, max_s=0.5, max_attempts=15),
    )
    # phase 1: the first call fetches a token through the refresh flow
    await asyncio.gather(*(svc.submit("course", lead_of(i)) for i in range(5)))
    await wait_for(lambda: all_delivered(db, 5))
    # phase 2: every token dies; the next call gets 401, refreshes once, repeats
    sim.expire_tokens()
    await asyncio.gather(*(svc.submit("course", lead_of(i)) for i in range(5, 10)))
    await wait_for(lambda: all_delivered(db, 10))
    # phase 3: a 429 storm, 5xx answers and hangs past our timeout. (Not during a refresh: a
    # refresh whose answer is lost has spent the single-use refresh token for good.)
    sim.fail_next("*", "/api/v4/*", 429, count=6)
    # then two certain 5xx (the random ones below may miss a phase this short): counted attempts
    sim.fail_next("*", "/api/v4/*", 500, count=2)
    sim.config.error_rate = 0.15
    sim.config.timeout_rate = 0.05
    sim.config.hang_s = 3.0
    await asyncio.gather(*(svc.submit("course", lead_of(i)) for i in range(10, 30)))
    try:
        await wait_for(lambda: all_delivered(db, 30), timeout=60)
    except AssertionError:
        rows = await db.fetch("SELECT state, attempts, last_error FROM jobs WHERE state <> 'done'")
        raise AssertionError([dict(r) for r in rows]) from None
    sim.config.error_rate = sim.config.timeout_rate = 0.0
    report = sim.report()
    assert len(report["contacts"]) == 30
    assert len(report["leads"]) == 30
    no_duplicates(report)
    statuses = report["answers_by_status"]
    assert statuses.get("429", 0) >= 6 and statuses.get("401", 0) >= 1, statuses
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE attempts > 1") > 0
    # the refreshed pair was stored before use: the database holds the simulator's current one
    stored = await db.fetchval("SELECT refresh_token FROM oauth_tokens WHERE crm = 'amocrm'")
    assert stored == report["refresh_token"]


async def test_permanent_error_goes_dead_and_replay_delivers_after_the_fix(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
    db_dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim = simulator[0]
    sim.add_pipeline(777, [77701])  # there at start-up (which checks it), deleted afterwards
    svc = await service_factory(forms={"promo": FormRule(pipeline_id=777)})
    del sim.store.pipelines[777]
    _, answer = await svc.submit("promo", lead_of(1))

    async def dead() -> bool:
        return bool(await db.fetchval("SELECT count(*) FROM jobs WHERE state = 'dead'") == 1)

    await wait_for(dead)
    error = await db.fetchval("SELECT last_error FROM jobs")
    assert "CrmPermanent" in error and "pipeline_id" in error, error
    assert await db.fetchval("SELECT attempts FROM jobs") == 1  # permanent: no retries

    # the CLI sets up logging for its process: give the root logger back afterwards
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    monkeypatch.setenv("DATABASE_URL", db_dsn)
    for var in ("CRM", "AMOCRM_BASE_URL", "CRM_RELAY_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    assert await asyncio.to_thread(cli_main, ["status"]) == 0
    assert answer["id"] in capsys.readouterr().out

    sim.add_pipeline(777, [77701])
    assert await asyncio.to_thread(cli_main, ["replay", "--all"]) == 0
    assert "replayed 1" in capsys.readouterr().out
    await wait_for(lambda: all_delivered(db, 1))
    assert [lead["pipeline_id"] for lead in sim.report()["leads"]] == [777]


async def test_blocked_account_opens_the_circuit_and_intake_goes_on(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim = simulator[0]
    svc = await service_factory(circuit_cooldown_s=0.5)
    sim.fail_next("*", "/api/v4/*", 403, count=3, body={"title": "Forbidden", "status": 403})
    statuses = [await svc.submit("course", lead_of(i)) for i in range(5)]
    assert all(status == 200 and a["ok"] for status, a in statuses)
    await wait_for(lambda: all_delivered(db, 5), timeout=30)
    no_duplicates(sim.report())
    assert await db.fetchval("SELECT count(*) FROM jobs WHERE state = 'dead'") == 0


def test_environment_is_not_read_outside_settings() -> None:
    """Settings are read once in main(); other modules must not reach for os.environ."""
    import service

    root = os.path.dirname(service.__file__)
    allowed = os.path.join(root, "settings")  # the package that reads them
    offenders = []
    for dirpath, _, files in os.walk(root):
        if dirpath == allowed:
            continue
        for name in files:
            if name.endswith(".py") and name != "cli.py":
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    text = f.read()
                if "os.environ" in text or "getenv(" in text:
                    offenders.append(name)
    assert offenders == []
