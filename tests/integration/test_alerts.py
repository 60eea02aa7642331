"""Alerts over real HTTP to a capturing Telegram/Slack stand-in: each condition fires once,
resolves once, crashes are noticed at the next start, and a hanging channel blocks nothing."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from service.app import CLUSTER, GATE, WORKER, Roles
from service.db.store import Store
from service.errors import StoreUnavailable
from service.intake.forms import INTAKE
from service.ops.alerts import Observation, Throttle, Watcher
from service.ops.runtime import Runtime
from service.settings import RetryPolicy
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import Service, ServiceFactory, wait_for


class Inbox:
    """A Telegram Bot API and Slack-webhook stand-in on a real port."""

    def __init__(self) -> None:
        self.telegram: list[dict[str, Any]] = []
        self.webhook: list[dict[str, Any]] = []
        self.hang_s = 0.0
        self.url = ""

    async def _telegram(self, request: web.Request) -> web.Response:
        assert request.match_info["token"] == "botT0K"
        self.telegram.append(await request.json())
        return web.json_response({"ok": True})

    async def _webhook(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.hang_s)
        self.webhook.append(await request.json())
        return web.Response(text="ok")

    def texts(self, needle: str) -> list[str]:
        return [m["text"] for m in self.webhook if needle in m["text"]]

    def settings(self, **overrides: Any) -> dict[str, Any]:
        return {
            "alert_webhook_url": f"{self.url}/hook",
            "telegram_bot_token": "T0K",
            "telegram_chat_id": "42",
            "telegram_api_url": self.url,
            "alert_check_s": 0.1,
            "alert_interval_s": 60.0,
            **overrides,
        }


@pytest.fixture
async def inbox() -> AsyncIterator[Inbox]:
    box = Inbox()
    app = web.Application()
    app.add_routes(
        [web.post("/{token}/sendMessage", box._telegram), web.post("/hook", box._webhook)]
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    box.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield box
    await runner.cleanup()


async def arrives(box: Inbox, needle: str, n: int = 1) -> None:
    async def seen() -> bool:
        return len(box.texts(needle)) >= n

    await wait_for(seen, timeout=15)


def test_throttle_says_each_thing_once_per_interval() -> None:
    t = Throttle(interval_s=60)
    on, off = Observation("c", True, "broken"), Observation("c", False, "fixed")
    assert t.step(off, 0) is None  # never fired: nothing to resolve
    assert t.step(on, 0) == "🔴 broken"
    assert t.step(on, 10) is None  # same news
    assert t.step(Observation("c", True, "worse", worse=True), 20) is None  # within the interval
    assert t.step(on, 61) == "🔴 broken"  # the held-back news, once the interval passed
    assert t.step(off, 62) == "✅ resolved: fixed"
    assert t.step(off, 63) is None
    assert t.step(on, 64) is None  # flapping: held back until the interval passes
    assert t.step(on, 122) == "🔴 broken"
    assert t.step(off, 123) == "✅ resolved: fixed"


async def test_dead_letters_circuit_and_spool_fire_once_and_resolve(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
    inbox: Inbox,
) -> None:
    svc = await service_factory(
        retry=RetryPolicy(base_s=0.05, max_s=0.5, max_attempts=1), **inbox.settings()
    )
    simulator[0].config.error_rate = 1.0
    await svc.submit("course", {"name": "A", "phone": "+77015550401"})
    await arrives(inbox, "1 dead letter(s) waiting")
    simulator[0].config.error_rate = 0.0
    await db.execute("INSERT INTO discarded_jobs (job_id) SELECT id FROM jobs WHERE state='dead'")
    await arrives(inbox, "resolved: no dead letters left")

    svc.app[GATE].open_circuit("CrmBlocked: amoCRM 403 account blocked", 60)
    await arrives(inbox, "CRM blocked the account")
    svc.app[GATE].close_circuit()
    await arrives(inbox, "resolved: CRM no longer blocked")
    svc.app[GATE].open_circuit("CrmUnauthorized: 401", 60)
    await arrives(inbox, "CRM circuit opened")
    svc.app[GATE].close_circuit()
    await arrives(inbox, "resolved: CRM circuit closed")

    svc.app[INTAKE].commit.skip_database(5)  # as after a failed write
    assert (await svc.submit("course", {"phone": "+77015550402"}))[1].get("spooled")
    svc.app[INTAKE].commit.skip_database(0)
    await arrives(inbox, "local spool")
    await arrives(inbox, "resolved: spool drained")

    await asyncio.sleep(0.5)  # several more checks: nothing is said twice
    for needle in ("dead letter(s) waiting", "CRM blocked", "CRM circuit opened", "local spool"):
        assert len(inbox.texts(needle)) == 1, (needle, inbox.webhook)
    assert len(inbox.telegram) == len(inbox.webhook)
    assert {m["chat_id"] for m in inbox.telegram} == {"42"}
    assert all(m["text"].startswith("crm-relay@") for m in inbox.webhook)


async def test_several_processes_say_a_cluster_wide_condition_once(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
    inbox: Inbox,
) -> None:
    """Three processes on one database all see the dead letter and the open circuit; the
    channel hears each once (and each "resolved" once), not three times."""
    one_try = RetryPolicy(base_s=0.05, max_s=0.5, max_attempts=1)
    services = [await service_factory(retry=one_try, **inbox.settings()) for _ in range(3)]
    simulator[0].config.error_rate = 1.0
    await services[0].submit("course", {"name": "A", "phone": "+77015550411"})
    await arrives(inbox, "1 dead letter(s) waiting")
    for svc in services:
        svc.app[GATE].open_circuit("CrmBlocked: amoCRM 403 account blocked", 60)
    await arrives(inbox, "CRM blocked the account")
    simulator[0].config.error_rate = 0.0
    await db.execute("INSERT INTO discarded_jobs (job_id) SELECT id FROM jobs WHERE state='dead'")
    for svc in services:
        svc.app[GATE].close_circuit()
    await arrives(inbox, "resolved: no dead letters left")
    await arrives(inbox, "resolved: CRM no longer blocked")

    await asyncio.sleep(0.5)  # several more checks by every process: nothing is said again
    for needle in (
        "dead letter(s) waiting",
        "CRM blocked the account",
        "resolved: no dead letters left",
        "resolved: CRM no longer blocked",
    ):
        assert len(inbox.texts(needle)) == 1, (needle, inbox.webhook)
    said_by = await db.fetch("SELECT condition, kind FROM alert_claims ORDER BY 1, 2")
    assert [tuple(r) for r in said_by] == [
        ("crm_blocked", "firing"),
        ("crm_blocked", "resolved"),
        ("dead_letters", "firing"),
        ("dead_letters", "resolved"),
    ]


async def test_delivery_lag_over_threshold(service_factory: ServiceFactory, inbox: Inbox) -> None:
    svc = await service_factory(Roles(worker=False), **inbox.settings(alert_lag_s=0.3))
    await svc.submit("course", {"name": "Lag", "phone": "+77015550501"})
    await arrives(inbox, "delivery lag")
    assert "1 job(s) due" in inbox.texts("delivery lag")[0]


async def test_database_unreachable_is_observed(db_dsn: str) -> None:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=1)
    await pool.close()
    watcher = Watcher(Runtime(store=Store(pool)), None, lag_s=600)
    found = {o.key: o for o in await watcher.observe()}
    assert found["db_unreachable"].active
    assert "database unreachable" in found["db_unreachable"].text


async def test_a_stopped_worker_and_a_failing_heartbeat_are_said_once_with_why(
    service_factory: ServiceFactory,
    inbox: Inbox,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What a transaction pooler did to them (a prepared statement gone): ERROR once with the
    cause, not a WARNING per try; /readyz names the part and why; the channel hears each once,
    and the heartbeat's return."""
    svc = await service_factory(**inbox.settings())
    cluster, worker = svc.app[CLUSTER], svc.app[WORKER]
    gone = 'prepared statement "__asyncpg_stmt_5__" does not exist'

    async def refused(*_: object) -> None:
        raise StoreUnavailable(f"database error: InvalidSQLStatementNameError: {gone}")

    async def claim_refused(*_: object) -> None:
        raise RuntimeError(gone)

    real_beat = cluster.members.rows.beat
    with caplog.at_level(logging.WARNING):
        monkeypatch.setattr(cluster.members.rows, "beat", refused)
        monkeypatch.setattr(worker.queue, "claim", claim_refused)
        cluster.members.beat_s = 0.1  # from the next beat on
        await arrives(inbox, "heartbeat failing")
        await arrives(inbox, "worker not running: worker-claims ended (RuntimeError")
        async with svc.http.get(f"{svc.url}/readyz") as r:
            reasons = (await r.json())["reasons"]
        assert r.status == 503
        assert f"worker not running: worker-claims ended (RuntimeError: {gone})" in reasons
        assert [x for x in reasons if x.startswith("heartbeat failing for ")], reasons
        assert all(gone in x for x in reasons if x.startswith("heartbeat")), reasons
        await asyncio.sleep(0.5)  # five more failed beats
        monkeypatch.setattr(cluster.members.rows, "beat", real_beat)
        await arrives(inbox, "resolved: heartbeat running again")
    beats = [r for r in caplog.records if getattr(r, "action", "") == "heartbeat_failed"]
    assert [(r.levelname, gone in r.getMessage()) for r in beats] == [("ERROR", True)]
    assert [r.levelname for r in caplog.records if r.getMessage().startswith("heartbeat work")] == [
        "WARNING"
    ]
    assert len(inbox.texts("heartbeat failing")) == 1 and len(inbox.texts("worker not")) == 1


async def test_restart_after_a_crash_is_reported_and_clean_stop_leaves_no_marker(
    service_factory: ServiceFactory, inbox: Inbox, tmp_path: Path
) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    run_dir = tmp_path / "var" / "run"
    run_dir.mkdir(parents=True)
    info = {"pid": gone.pid, "host": socket.gethostname(), "started": 1e9}
    (run_dir / "old.json").write_bytes(orjson.dumps(info))
    svc: Service = await service_factory(**inbox.settings())
    await arrives(inbox, "restarted after a crash")
    assert f"pid {gone.pid}" in inbox.texts("restarted after a crash")[0]
    assert len(list(run_dir.glob("*.json"))) == 1  # ours; the dead one's was taken
    await svc.close()
    assert list(run_dir.glob("*.json")) == []


async def test_a_hanging_channel_blocks_neither_intake_nor_delivery(
    service_factory: ServiceFactory, inbox: Inbox, db: asyncpg.Connection
) -> None:
    inbox.hang_s = 6.0
    svc = await service_factory(**inbox.settings(alert_interval_s=0))
    svc.app[GATE].open_circuit("CrmUnauthorized: 401", 0.01)  # an alert now stuck in sending
    await asyncio.sleep(0.3)
    svc.app[GATE].close_circuit()
    for i in range(5):
        status, body = await svc.submit("course", {"phone": f"+7701555060{i}"})
        assert status == 200 and body["ok"]
    # all answered while the alert still hangs (the channel answers after 6 s): intake did not
    # wait for it, however slow the machine
    assert inbox.webhook == []

    async def delivered() -> bool:
        return bool(await db.fetchval("SELECT count(*) = 5 FROM jobs WHERE state = 'done'"))

    await wait_for(delivered, timeout=10)
