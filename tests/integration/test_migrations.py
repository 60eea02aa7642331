"""Migrations: applied once, recorded, safe when several processes start at once."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from service.database import migrate, migration_files, pending_migrations
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
