"""The app factory: every resource is a cleanup context, stored under a typed AppKey.

Start order: database (embedded server, pool, migrations) → cluster (heartbeats, Redis link)
→ CRM (HTTP session, in-process simulator when no CRM is configured, adapter, rate gate) →
intake (group commit, spool drainer) → worker. Shutdown runs the same list backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from service.cluster.processes import Cluster, connect_redis, process_name
from service.crm.amocrm.adapter import AmoCrmAdapter
from service.crm.amocrm.api import AmoCrmApi, StaticToken, TokenSource
from service.crm.bitrix24.adapter import Bitrix24Adapter
from service.crm.bitrix24.api import Bitrix24Api
from service.crm.oauth import Bitrix24OAuthTokens, OAuthTokens
from service.crm.protocol import CrmAdapter
from service.db.database import EmbeddedPostgres, create_pool, migrate
from service.db.event_store import EventStore
from service.db.store import Store
from service.delivery.cluster_bucket import cluster_gate
from service.delivery.control import DELIVERY_CONTROL, DeliveryControl
from service.delivery.limits import RateGate
from service.delivery.worker import Worker
from service.errors import StoreUnavailable
from service.intake import forms as intake
from service.intake.ingest import Intake
from service.intake.keys import IdempotencyWindow
from service.intake.locks import KeyLocks
from service.intake.rejected import TRIM_EVERY_S, DiskGuard, RejectedKeeper
from service.intake.shared_keys import SharedKeys
from service.intake.spool import Spool
from service.ops import alerts, health, metrics
from service.ops.admin import api as admin
from service.ops.runtime import RUNTIME, Runtime
from service.settings import CrmSettings, Settings
from service.web import PROCESS_NAME, SETTINGS, quiet_client_protocol_errors, spool_full
from service.webhooks import handlers as webhooks
from service.webhooks.forwarder import STOP_WAIT_S, Forwarder, bitrix24_deal_fetcher

log = logging.getLogger(__name__)

STORE = web.AppKey("store", Store)
DSN = web.AppKey("dsn", str)
GATE = web.AppKey("gate", RateGate)
ADAPTER = web.AppKey("adapter", CrmAdapter)
WORKER = web.AppKey("worker", Worker)
CLUSTER = web.AppKey("cluster", Cluster)
FORWARDER = web.AppKey("forwarder", Forwarder)
# the data volume's free-space guard; set before start-up to read free space another way
DISK_GUARD = web.AppKey("disk_guard", DiskGuard)
SPOOL_DRAIN_EVERY_S = 1.0
FORWARDER_POOL_SIZE = 4


@dataclass(frozen=True)
class Roles:
    """Which parts this process runs (`serve --no-worker` / `--worker-only`)."""

    http: bool = True
    worker: bool = True


@contextlib.asynccontextmanager
async def background(
    coro: Coroutine[Any, Any, None], name: str
) -> AsyncIterator[asyncio.Task[None]]:
    """create_task → yield → cancel → await, as every background task here does."""
    task = asyncio.create_task(coro, name=name)
    yield task
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(settings: Settings, roles: Roles = Roles()) -> web.Application:
    """Build the aiohttp application for `settings`."""
    app = web.Application(client_max_size=settings.intake.max_body_bytes + 1024)
    app[SETTINGS] = settings
    app[PROCESS_NAME] = process_name()
    quiet_client_protocol_errors()
    # the forwarder runs wherever the worker does (forwarder_ctx below)
    app[RUNTIME] = Runtime(
        worker_expected=roles.worker, forwarder_expected=roles.worker, crm=settings.crm.kind
    )
    app[metrics.METRICS] = metrics.Metrics(app[RUNTIME])
    app.middlewares.append(metrics.observe)
    app.middlewares.append(spool_full)  # inside observe: the 503 is counted and logged
    app.cleanup_ctx.extend([database_ctx, cluster_ctx, crm_ctx, intake_ctx])
    if roles.worker:
        app.cleanup_ctx.append(worker_ctx)
        app.cleanup_ctx.append(forwarder_ctx)
    app.cleanup_ctx.extend([admin.admin_ctx, alerts.alerts_ctx])
    app.on_shutdown.append(_mark_shutting_down)
    app.add_routes(health.routes())
    app.add_routes(metrics.routes())
    app.add_routes(admin.routes(enabled=bool(settings.admin.token)))
    if roles.http:
        app.add_routes(intake.routes())
        app.add_routes(webhooks.routes())
    return app


async def _mark_shutting_down(app: web.Application) -> None:
    app[RUNTIME].shutting_down = True


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    embedded = None
    dsn = settings.database.url
    if dsn is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        dsn = await asyncio.to_thread(embedded.start)
        log.info(
            "embedded PostgreSQL running",
            extra={"action": "db_embedded", "pgdata": str(embedded.pgdata)},
        )
    # the process's name on its connections too: pg_locks and pg_stat_activity show whose they are
    pool = await create_pool(dsn, application_name=app[PROCESS_NAME])
    async with pool.acquire() as conn:
        await migrate(conn)
    app[DSN] = dsn
    app[STORE] = app[RUNTIME].store = Store(pool)
    app[DELIVERY_CONTROL] = DeliveryControl(pool, dsn)
    yield
    await pool.close()
    if embedded is not None:
        await asyncio.to_thread(embedded.stop)


async def cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    """Heartbeats in PostgreSQL and the Redis link: the mode the cluster runs in (cluster.py)."""
    redis_url = app[SETTINGS].cluster.redis_url
    redis = connect_redis(redis_url) if redis_url else None
    rt = app[RUNTIME]
    cluster = app[CLUSTER] = rt.cluster = Cluster(
        app[STORE].pool, redis, sends=rt.worker_expected, name=app[PROCESS_NAME]
    )
    if redis is not None:
        rt.probes["redis"] = health.redis_probe(cluster.redis)
    await cluster.start()
    async with background(cluster.run(), "cluster"):
        yield
    # our last CRM calls still count in the others' window for a moment: leave after it
    await cluster.close(leave_after_s=cluster.members.window_s + 1.0)


async def crm_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    crm = settings.crm
    gate, bucket = cluster_gate(app[CLUSTER], crm)
    app[GATE] = app[RUNTIME].gate = gate
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(bucket.close)
        # the trace counts every CRM call by outcome for /metrics
        trace = metrics.crm_trace(app[metrics.METRICS])
        session = await stack.enter_async_context(aiohttp.ClientSession(trace_configs=[trace]))
        if crm.kind == "bitrix24":
            b24 = await _bitrix24_api(app, crm, session, gate)
            app[ADAPTER] = Bitrix24Adapter(b24, crm.bitrix24, settings.leads)
        else:
            base_url, tokens = await _crm_endpoint(app, crm, session, gate, stack)
            api = AmoCrmApi(session, base_url, tokens, gate, timeout_s=crm.timeout_s)
            region = settings.intake.default_phone_region
            app[ADAPTER] = AmoCrmAdapter(
                api, crm.amocrm, settings.leads, app[STORE].pool, region=region
            )
        yield


async def _bitrix24_api(
    app: web.Application, crm: CrmSettings, session: aiohttp.ClientSession, gate: RateGate
) -> Bitrix24Api:
    """OAuth app tokens when they are configured (Settings insists on all of them), else the
    incoming webhook."""
    timeout, b24 = crm.timeout_s, crm.bitrix24
    if b24.portal_url:
        tokens = Bitrix24OAuthTokens(app[STORE], session, crm, gate.front())
        await tokens.seed()
        return Bitrix24Api(session, b24.portal_url, gate, timeout_s=timeout, tokens=tokens)
    assert b24.webhook_url is not None  # checked by Settings
    return Bitrix24Api(session, b24.webhook_url, gate, timeout_s=timeout)


async def _crm_endpoint(
    app: web.Application,
    crm: CrmSettings,
    session: aiohttp.ClientSession,
    gate: RateGate,
    stack: contextlib.AsyncExitStack,
) -> tuple[str, TokenSource]:
    if crm.kind == "simulator":
        from service.simulators.amocrm.server import (
            AmoCrmSimulator,
            SimulatorConfig,
            start_simulator,
        )

        sim = AmoCrmSimulator(SimulatorConfig(rate_limit=7))
        runner, url = await start_simulator(sim)
        stack.push_async_callback(runner.cleanup)
        print(
            f"*** crm-relay: no CRM configured: leads go to the IN-PROCESS amoCRM SIMULATOR at "
            f"{url} (inspect {url}/_sim/state). Set CRM=amocrm and AMOCRM_* for real delivery ***",
            file=sys.stderr,
            flush=True,
        )
        return url, StaticToken(sim.config.access_token)
    amo = crm.amocrm
    assert amo.base_url is not None  # checked by Settings
    if amo.access_token:
        return amo.base_url, StaticToken(amo.access_token)
    tokens = OAuthTokens(app[STORE], session, crm, gate.front())
    await tokens.seed()
    return amo.base_url, tokens


async def intake_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    cfg = settings.intake
    store = app[STORE]
    limits = settings.storage
    spool = Spool(
        settings.spool_dir,
        max_bytes=limits.spool_max_bytes,
        quarantine_days=limits.quarantine_days,
    )
    # one window and one set of key locks per process, for forms and webhooks alike
    window = IdempotencyWindow(
        cfg.idempotency_window_s,
        cfg.idempotency_window_size,
        max_bytes=cfg.idempotency_window_bytes,
    )
    locks = KeyLocks()
    cluster = app[CLUSTER]
    if DISK_GUARD not in app:
        app[DISK_GUARD] = DiskGuard(settings.data_dir, limits.min_free_bytes)
    rejected = RejectedKeeper(
        store, spool, limits, app[DISK_GUARD], write_timeout_s=cfg.db_write_timeout_s
    )
    service = Intake(
        store,
        spool,
        window=window,
        locks=locks,
        rejected=rejected,
        write_timeout_s=cfg.db_write_timeout_s,
        shared_keys=SharedKeys(cluster.redis, cfg.idempotency_window_s),
    )
    app[intake.INTAKE] = app[RUNTIME].intake = service
    events = app[webhooks.EVENTS] = webhooks.EventIntake(
        EventStore(store.pool),
        spool,
        write_timeout_s=cfg.db_write_timeout_s,
        window=window,
        locks=locks,
    )
    app[RUNTIME].events, app[RUNTIME].event_store = events, events.store
    handlers = {
        "submission": service.drain_spooled,
        "rejected": rejected.drain_spooled,
        "event": events.drain_spooled,
    }
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(background(service.commit.run(), "group-commit"))
        await stack.enter_async_context(background(events.commit.run(), "event-commit"))
        await stack.enter_async_context(background(rejected.commit.run(), "rejected-commit"))
        await stack.enter_async_context(
            background(_drain_spool(spool, handlers, store.ping), "spool-drain")
        )
        await stack.enter_async_context(background(_trim_rejected(rejected), "rejected-trim"))
        yield
    spool.close()


async def _trim_rejected(rejected: RejectedKeeper) -> None:
    """Keep `rejected` within its caps: every TRIM_EVERY_S, or at once when much was kept."""
    while True:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TRIM_EVERY_S):
                await rejected.trim_wanted.wait()
        rejected.trim_wanted.clear()
        try:
            await rejected.trim()
        except StoreUnavailable:
            continue
        except Exception:
            log.exception("rejected trim failed", extra={"action": "rejected_trim_error"})


async def _drain_spool(
    spool: Spool, handlers: dict[str, Any], ping: Callable[[], Awaitable[None]]
) -> None:
    """Re-ingest spooled work whenever there is some and the database answers (an entry that
    fails on its own while it does is quarantined: Spool.drain)."""
    while True:
        await asyncio.sleep(SPOOL_DRAIN_EVERY_S)
        if not spool.pending_files():
            continue
        try:
            n = await spool.drain(handlers, ping)
        except StoreUnavailable:
            continue
        except Exception:
            # e.g. a deadlock while re-ingesting: the file stays, the next pass tries again
            log.exception("spool drain failed", extra={"action": "spool_drain_error"})
            continue
        if n:
            log.info("spooled entries stored", extra={"action": "spool_drain", "entries": n})


async def worker_ctx(app: web.Application) -> AsyncIterator[None]:
    delivery = app[SETTINGS].delivery
    name = app[PROCESS_NAME]  # lease owner: the name the admin API and pg_stat_activity show
    worker = Worker(app[STORE], app[ADAPTER], app[GATE], delivery, app[DSN], name=name)
    app[WORKER] = app[RUNTIME].worker = worker
    # an operator's pause holds for every process, this one from its first claim on
    control = app[DELIVERY_CONTROL]
    with contextlib.suppress(StoreUnavailable):
        await control.read()
    control.follow(lambda paused: _apply_pause(worker, paused))
    following = asyncio.create_task(control.run(), name="delivery-control")
    task = asyncio.create_task(worker.run(), name="worker")
    yield
    t0 = time.monotonic()
    await worker.stop(timeout_s=8.0)
    for running in (task, following):
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    log.info(
        "worker stopped",
        extra={"action": "worker_stopped", "seconds": round(time.monotonic() - t0, 2)},
    )


def _apply_pause(worker: Worker, paused: bool) -> None:
    worker.paused = paused
    if not paused:
        worker.wake()  # claim what became due while paused now, not after the idle wait


async def forwarder_ctx(app: web.Application) -> AsyncIterator[None]:
    """Processes and forwards stored webhook events (service/webhooks/forwarder.py)."""
    settings = app[SETTINGS]
    # a pool of its own: a backlog of events to forward must never keep the handlers waiting
    # for a connection (they answer only after their write)
    pool = await create_pool(app[DSN], min_size=1, max_size=FORWARDER_POOL_SIZE)
    # Bitrix24 deal events carry only an id: with Bitrix24 configured the deal is fetched
    # (crm.deal.get, through the shared CRM gate) before it is forwarded
    adapter = app[ADAPTER]
    fetch = bitrix24_deal_fetcher(adapter.api) if isinstance(adapter, Bitrix24Adapter) else None
    store, name, gate = EventStore(pool), app[PROCESS_NAME], app[GATE]
    forwarder = Forwarder(
        store,
        settings.webhook,
        settings.delivery,
        app[DSN],
        name=name,
        gate=gate,
        leads=settings.leads,
        fetch_deal=fetch,
    )
    app[FORWARDER] = app[RUNTIME].forwarder = forwarder
    task = asyncio.create_task(forwarder.run(), name="forwarder")
    yield
    await forwarder.stop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), STOP_WAIT_S + 1)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await pool.close()
