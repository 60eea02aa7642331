"""Migrations: applied once, recorded, safe when several processes start at once."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from service.db.database import migrate, migration_files, pending_migrations
from tests.conftest import dsn_for


async def test_concurrent_migrations_apply_each_file_once(pg_template: str) -> None:
    name = f"m_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_template)
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        conns = [await asyncpg.connect(dsn_for(pg_template, name)) for _ in range(4)]
        try:
            applied = await asyncio.gather(*(migrate(c) for c in conns))
            assert sorted(n for names in applied for n in names) == [
                p.name for p in migration_files()
            ]
            assert await pending_migrations(conns[0]) == []
            assert await migrate(conns[0]) == []
        finally:
            for c in conns:
                await c.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_embedded_server_runs_with_our_settings(db: asyncpg.Connection) -> None:
    """service.db.database.SERVER_SETTINGS: new WAL segments are not zero-filled (a 30-40 ms stall
    of a COMMIT each under sustained intake); durability settings untouched."""
    assert await db.fetchval("SHOW wal_init_zero") == "off"
    for name in ("fsync", "synchronous_commit", "full_page_writes"):
        assert await db.fetchval(f"SHOW {name}") == "on", name
