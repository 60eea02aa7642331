"""A real `redis-server` for tests: its own free port and directory, no persistence, killed after.

Never the machine's own Redis on 6379. Use from a test module with
`pytest_plugins = ("tests.redis_fixtures",)`. If `redis-server` is missing the fixture fails and
says so: `scripts/test` installs it with apt.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

START_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on a fixed port; it can be killed and started again there."""

    def __init__(self, executable: str, root: Path, port: int) -> None:
        self.executable = executable
        self.root = root
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.root),
            "--logfile", str(self.root / "redis.log"),
            "--daemonize", "no",
        ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._pong():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                log = (self.root / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server did not start on {self.port}:\n{log}")
            time.sleep(0.02)

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown, every client connection is cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server for one test."""
    executable = shutil.which("redis-server")
    if executable is None:
        pytest.fail(
            "redis-server is not installed: these tests need a real Redis "
            "(scripts/test installs it with apt: apt-get install redis-server)"
        )
    server = RedisServer(executable, tmp_path / "redis", free_port())
    server.start()
    try:
        yield server
    finally:
        server.kill()


RedisFactory = Callable[[], Redis]


@pytest.fixture
async def redis_factory(redis_server: RedisServer) -> AsyncIterator[RedisFactory]:
    """New clients to this test's Redis; all closed afterwards."""
    from service.cluster.processes import connect_redis

    clients: list[Redis] = []

    def make() -> Redis:
        client = connect_redis(redis_server.url)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()
