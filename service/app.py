"""The app factory: every resource is a cleanup context, stored under a typed AppKey.

Start order: database (embedded server, pool, migrations) → cluster (heartbeats, Redis link)
→ CRM (HTTP session, in-process simulator when no CRM is configured, adapter, rate gate) →
intake (group commit, spool drainer) → worker. Shutdown runs the same list backwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from service.cluster.processes import Cluster, connect_redis, process_name
from service.crm.amocrm.adapter import AmoCrmAdapter
from service.crm.amocrm.api import AmoCrmApi, StaticToken, TokenSource
from service.crm.amocrm.funnels import check_pipelines
from service.crm.amocrm.index import reuse_window
from service.crm.bitrix24.adapter import Bitrix24Adapter
from service.crm.bitrix24.api import Bitrix24Api
from service.crm.bitrix24.funnels import check_stages
from service.crm.oauth import Bitrix24OAuthTokens, OAuthTokens
from service.crm.protocol import CrmAdapter
from service.db.database import EmbeddedPostgres, Endpoints, create_pool, endpoints, migrate_at
from service.db.event_store import EventStore
from service.db.store import Pool, Store
from service.db.token_cipher import TokenCipher
from service.delivery.cluster_bucket import cluster_gate
from service.delivery.control import DELIVERY_CONTROL, DeliveryControl
from service.delivery.limits import RateGate
from service.delivery.worker import Worker
from service.errors import CrmError, StoreUnavailable
from service.intake import forms as intake
from service.intake.ingest import Intake
from service.intake.keys import IdempotencyWindow
from service.intake.locks import KeyLocks
from service.intake.rejected import TRIM_EVERY_S, DiskGuard, RejectedKeeper
from service.intake.shared_keys import SharedKeys
from service.intake.spam import Captcha, SpamGuard
from service.intake.spool import Spool
from service.logs import mask_url
from service.ops import alerts, health, metrics, retention, startup
from service.ops.admin import api as admin
from service.ops.runtime import RUNTIME, Runtime
from service.settings import CrmSettings, Settings
from service.web import (
    PROCESS_NAME,
    SETTINGS,
    quiet_client_protocol_errors,
    split_ports,
    spool_full,
)
from service.webhooks import handlers as webhooks
from service.webhooks.forwarder import STOP_WAIT_S, Forwarder, bitrix24_deal_fetcher

log = logging.getLogger(__name__)

STORE = web.AppKey("store", Store)
# where connections go: pools on DATABASE_URL, sessions on DATABASE_DIRECT_URL (db/database.py)
DATABASE = web.AppKey("database", Endpoints)
# a small pool of connections that keep their session (the contact index's sync lock)
SESSIONS = web.AppKey("sessions", Pool)
DATABASE_SAID = web.AppKey("database_said", str)  # what the start-up block says of it, no password
GATE = web.AppKey("gate", RateGate)
ADAPTER = web.AppKey("adapter", CrmAdapter)
WORKER = web.AppKey("worker", Worker)
CLUSTER = web.AppKey("cluster", Cluster)
FORWARDER = web.AppKey("forwarder", Forwarder)
SIMULATOR_URL = web.AppKey("simulator_url", str)  # the in-process CRM simulator, when it runs
# the data volume's free-space guard; set before start-up to read free space another way
DISK_GUARD = web.AppKey("disk_guard", DiskGuard)
SPOOL_DRAIN_EVERY_S = 1.0
FORWARDER_POOL_SIZE = 4


@dataclass(frozen=True)
class Roles:
    """Which parts this process runs (`serve --no-worker` / `--worker-only`)."""

    http: bool = True
    worker: bool = True


ROLES = web.AppKey("roles", Roles)


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
    # aiohttp's limit is one for the whole app: the largest route's, and each handler holds its
    # own route to its limit (read_limited): forms MAX_BODY_BYTES, webhooks WEBHOOK_MAX_BODY_BYTES
    largest = max(settings.intake.max_body_bytes, settings.webhook.max_body_bytes)
    app = web.Application(client_max_size=largest + 1024)
    app[SETTINGS] = settings
    app[ROLES] = roles
    app[PROCESS_NAME] = process_name()
    quiet_client_protocol_errors()
    # the forwarder runs wherever the worker does (forwarder_ctx below)
    app[RUNTIME] = Runtime(
        worker_expected=roles.worker, forwarder_expected=roles.worker, crm=settings.crm.kind
    )
    app[metrics.METRICS] = metrics.Metrics(app[RUNTIME])
    app.middlewares.append(metrics.observe)
    if settings.http.ops_port is not None:
        app.middlewares.append(split_ports(settings.http.ops_port))
    app.middlewares.append(spool_full)  # inside observe: the 503 is counted and logged
    app.cleanup_ctx.extend([database_ctx, cluster_ctx, crm_ctx, intake_ctx])
    if roles.worker:
        app.cleanup_ctx.append(worker_ctx)
        app.cleanup_ctx.append(forwarder_ctx)
    app.cleanup_ctx.extend([admin.admin_ctx, alerts.alerts_ctx, retention.retention_ctx])
    app.on_shutdown.append(_mark_shutting_down)
    app.add_routes(health.routes())
    app.add_routes(metrics.routes())
    app.add_routes(admin.routes(enabled=bool(settings.admin.token)))
    if roles.http:
        app.add_routes(intake.routes())
        app.add_routes(webhooks.routes())
    return app


def announce(app: web.Application) -> None:
    """The start-up block (service/ops/startup.py), once the server listens."""
    settings = app[SETTINGS]
    facts = startup.started(
        settings,
        database=app[DATABASE_SAID],
        simulator_url=app.get(SIMULATOR_URL),
        delivery=app[ROLES].worker,
    )
    startup.announce(facts, settings.log.format)


async def _mark_shutting_down(app: web.Application) -> None:
    app[RUNTIME].shutting_down = True


async def database_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    embedded = None
    if settings.database.url is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        where = Endpoints.same(await asyncio.to_thread(embedded.start))
        app[DATABASE_SAID] = f"embedded PostgreSQL, data in {embedded.pgdata} (or set DATABASE_URL)"
        log.debug(
            "embedded PostgreSQL running",
            extra={"action": "db_embedded", "pgdata": str(embedded.pgdata)},
        )
    else:
        app[DATABASE_SAID] = f"DATABASE_URL {mask_url(settings.database.url)}"
        # refuses a transaction-mode pooler without DATABASE_DIRECT_URL (SettingsError)
        where = await endpoints(settings.database.url, settings.database.direct_url)
    # the process's name on its connections too: pg_locks and pg_stat_activity show whose they are
    name = app[PROCESS_NAME]
    pool = await create_pool(where.url, application_name=name, pooled=where.pooled)
    sessions = pool
    if where.direct_url != where.url:
        sessions = await create_pool(
            where.direct_url, min_size=0, max_size=2, application_name=f"{name} sessions"
        )
    applied = await migrate_at(where.direct_url)
    if applied:
        log.info(
            "database schema brought up to date",
            extra={"action": "migrated", "applied": len(applied), "last": applied[-1]},
        )
    app[DATABASE] = where
    app[SESSIONS] = sessions
    keys = settings.crm.token_keys
    cipher = TokenCipher(keys) if keys else None
    app[STORE] = app[RUNTIME].store = Store(pool, token_cipher=cipher)
    app[DELIVERY_CONTROL] = DeliveryControl(pool, where.direct_url)
    yield
    await pool.close()
    if sessions is not pool:
        await sessions.close()
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
            await _checked(check_stages(b24, settings.leads))
        else:
            base_url, tokens = await _crm_endpoint(app, crm, session, gate, stack)
            api = AmoCrmApi(session, base_url, tokens, gate, timeout_s=crm.timeout_s)
            adapter = app[ADAPTER] = _amocrm_adapter(app, api)
            await _checked(check_pipelines(api, settings.leads))
            if adapter.index is not None and app[RUNTIME].worker_expected:
                # the first full read of the account, in the background at the index's share
                await stack.enter_async_context(background(adapter.index.scan(), "index-scan"))
        yield


def _amocrm_adapter(app: web.Application, api: AmoCrmApi) -> AmoCrmAdapter:
    settings = app[SETTINGS]
    amo, delivery = settings.crm.amocrm, settings.delivery
    return AmoCrmAdapter(
        api,
        amo,
        settings.leads,
        app[STORE].pool,
        sessions=app[SESSIONS],
        region=settings.intake.default_phone_region,
        index_rate=settings.crm.rate_limit * amo.index_share,
        index_reuse_s=reuse_window(amo.index_refresh_s, delivery.lease_s),
    )


async def _checked(check: Coroutine[Any, Any, None]) -> None:
    """The start-up check of the lead settings against the CRM (a wrong id raises
    SettingsError and stops start-up). A CRM that cannot answer now must not keep intake from
    starting: that is logged, and the first deliveries will say the rest."""
    try:
        await check
    except CrmError as exc:
        log.warning(
            "could not check the pipeline/stage settings against the CRM at start-up",
            extra={"action": "crm_settings_unchecked", "error": str(exc)},
        )


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
        app[SIMULATOR_URL] = url  # the start-up block says so (announce)
        log.info(
            "no CRM configured: leads go to the in-process amoCRM simulator",
            extra={"action": "crm_simulator", "url": url},
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
        "spam": service.drain_spam,
    }
    async with contextlib.AsyncExitStack() as stack:
        captcha = None
        if any(rule.spam.captcha for rule in settings.leads.forms.values()):
            session = await stack.enter_async_context(aiohttp.ClientSession())
            captcha = Captcha(session, settings.spam)
        service.guard = SpamGuard(settings.spam, captcha)
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
    worker = Worker(
        app[STORE], app[ADAPTER], app[GATE], delivery, app[DATABASE].direct_url, name=name
    )
    app[WORKER] = app[RUNTIME].worker = worker
    # an operator's pause holds for every process, this one from its first claim on
    control = app[RUNTIME].control = app[DELIVERY_CONTROL]
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
    where = app[DATABASE]
    pool = await create_pool(
        where.url, min_size=1, max_size=FORWARDER_POOL_SIZE, pooled=where.pooled
    )
    # Bitrix24 deal events carry only an id: with Bitrix24 configured the deal is fetched
    # (crm.deal.get, through the shared CRM gate) before it is forwarded
    adapter = app[ADAPTER]
    fetch = bitrix24_deal_fetcher(adapter.api) if isinstance(adapter, Bitrix24Adapter) else None
    store, name, gate = EventStore(pool), app[PROCESS_NAME], app[GATE]
    forwarder = Forwarder(
        store,
        settings.webhook,
        settings.delivery,
        where.direct_url,
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
