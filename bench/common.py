"""Helpers every benchmark shares: an embedded PostgreSQL, server subprocesses, wrk or an aiohttp
load generator, CPU and RSS readings from /proc, and the facts a figure must be written down with
(date, commit, cores)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from service.db.database import EmbeddedPostgres, migrate, prepare_environment

REPO = Path(__file__).resolve().parent.parent
# +7 mobile prefixes, all valid by phonenumbers (KZ 7xx, then RU 9xx but 930): one per run keeps
# every run's phones new, 8 million phones per run
KZ_MOBILE = ("701", "702", "705", "707", "708", "747", "771", "775", "776", "777", "778")
PHONE_PREFIXES = (*KZ_MOBILE, *(f"9{n:02d}" for n in range(100) if n != 30))
PER_THREAD = 4_000_000  # phones one load thread may use in one run (7 digits, at most 2 threads)
MAX_THREADS = 2
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the facts a figure is recorded with ---------------------------------------------------


def machine_facts() -> dict[str, Any]:
    """Date, commit, cores, load: printed with every result so it can be written down."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        commit, dirty = "", ""
    commit = commit or os.environ.get("BENCH_COMMIT", "unknown")
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit + ("+dirty" if dirty else ""),
        "nproc": os.cpu_count(),
        "loadavg": os.getloadavg()[0],
        "python": sys.version.split()[0],
    }


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def phone(run: int, thread: int, n: int) -> str:
    """A valid, unique phone for request `n` of load thread `thread` in run `run` (each run has
    a mobile prefix of its own)."""
    if run >= len(PHONE_PREFIXES) or thread >= MAX_THREADS or n >= PER_THREAD:
        raise ValueError(f"no unique phone left for run {run}, thread {thread}, request {n}")
    prefix = PHONE_PREFIXES[run % len(PHONE_PREFIXES)]
    return f"+7{prefix}{thread * PER_THREAD + n:07d}"


# ---- PostgreSQL ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Postgres:
    dsn: str
    pgdata: Path

    @property
    def postmaster_pid(self) -> int:
        return int((self.pgdata / "postmaster.pid").read_text().split()[0])


@contextlib.contextmanager
def embedded_postgres() -> Iterator[Postgres]:
    """One embedded PostgreSQL server in a temporary directory."""
    # short path: the server's Unix socket lives in it (108-byte limit on socket paths)
    root = Path(tempfile.mkdtemp(prefix="crb-", dir="/tmp"))
    prepare_environment(os.environ)  # as main() does before an embedded server starts
    server = EmbeddedPostgres(root)
    try:
        yield Postgres(server.start(), server.pgdata)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def dsn_for(base_dsn: str, database: str) -> str:
    """The embedded server's URI names database `postgres`; swap in another."""
    return base_dsn.replace("/postgres?", f"/{database}?", 1)


async def create_database(base_dsn: str, name: str, *, migrated: bool) -> str:
    """A fresh database on the server (with our migrations if `migrated`); its DSN."""
    conn = await asyncpg.connect(base_dsn)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    dsn = dsn_for(base_dsn, name)
    if migrated:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()
    return dsn


async def durability(dsn: str) -> dict[str, str]:
    """The settings that decide what a COMMIT costs (the same server serves both sides)."""
    conn = await asyncpg.connect(dsn)
    try:
        names = (
            "fsync",
            "synchronous_commit",
            "wal_sync_method",
            "full_page_writes",
            "commit_delay",
            "wal_init_zero",  # off on our embedded server (service.db.database.SERVER_SETTINGS)
        )
        return {n: str(await conn.fetchval(f"SHOW {n}")) for n in names}
    finally:
        await conn.close()


async def count_rows(dsn: str, table: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        n: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
        return n
    finally:
        await conn.close()


# ---- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The outer environment without anything the service reads, plus `extra`."""
    prefixes = (
        "DATABASE_URL", "REDIS_", "CRM", "AMOCRM_", "BITRIX24_", "IDEMPOTENCY_", "ADMIN_TOKEN",
        "WEBHOOK_", "TELEGRAM_", "ALERT_", "LOG_", "DEFAULT_PHONE", "HOST", "PORT", "MAX_BODY",
        "RETRY_", "WORKER_", "LEASE_", "CIRCUIT_", "OPS_PORT", "FORWARD_", "OAUTH_",
        "PUBLIC_BASE_URL",
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra, PYTHONUNBUFFERED="1")
    return env


@dataclass
class Server:
    """An HTTP server subprocess: started, probed until ready, stopped with SIGTERM."""

    name: str
    argv: list[str]
    env: dict[str, str]
    port: int
    ready_path: str
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 60.0) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, cwd=REPO, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout_s
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited at start:\n{self.tail()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with http.get(self.url + self.ready_path) as r:
                        if r.status == 200:
                            return
                await asyncio.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready in {timeout_s} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def postgres_cpu_seconds(postmaster: int) -> float:
    """User + system CPU of one server: its postmaster and every child alive now (backends,
    WAL writer, checkpointer …; not other servers on the machine).

    Backends that exited during a run are lost from this sum; both sides keep theirs in a pool,
    so the figure is comparable between them."""
    total = cpu_seconds(postmaster)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if _parent(int(entry.name)) == postmaster:
                total += cpu_seconds(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return total


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in KiB, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


# ---- load ------------------------------------------------------------------------------------

WRK_SCRIPT = r"""
-- POST a JSON lead with a phone no other request of this benchmark uses
local counter = 0
local nthreads = 0
function setup(thread)
  thread:set("tid", nthreads)
  nthreads = nthreads + 1
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function request()
  counter = counter + 1
  local n = tid * PER_THREAD + counter
  local body = string.format(
    '{"name":"Bench %d","phone":"+7PREFIX%07d","utm_source":"wrk","comment":"load"}', n, n)
  return wrk.format(nil, "PATH", nil, body)
end
function done(summary, latency, requests)
  io.write(string.format(
    "WRK-JSON {\"requests\":%d,\"duration_us\":%d,\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d," ..
    "\"max_us\":%d,\"connect\":%d,\"read\":%d,\"write\":%d,\"status\":%d,\"timeout\":%d}\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout))
end
"""


@dataclass
class LoadResult:
    """One load run: how many requests were answered, how fast, how many failed."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    tool: str

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def have_wrk() -> bool:
    return shutil.which("wrk") is not None


async def run_wrk(
    url: str, path: str, *, connections: int, seconds: float, threads: int, run: int
) -> LoadResult:
    """wrk with a Lua script that sends unique phones; latency from wrk's own histogram."""
    phone(run, threads - 1, 0)  # raises when this run's phones would repeat an earlier run's
    prefix = PHONE_PREFIXES[run]
    script = (
        WRK_SCRIPT.replace("PER_THREAD", str(PER_THREAD))
        .replace("PREFIX", prefix)
        .replace("PATH", path)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv, "-s", f.name, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
    finally:
        os.unlink(f.name)
    line = next((ln for ln in out.decode().splitlines() if ln.startswith("WRK-JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out.decode()}\n{err.decode()}")
    d = orjson.loads(line.removeprefix("WRK-JSON "))
    errors = sum(d[k] for k in ("connect", "read", "write", "status", "timeout"))
    return LoadResult(
        d["requests"], d["duration_us"] / 1e6, d["p50_us"] / 1e3, d["p99_us"] / 1e3, errors, "wrk"
    )


async def run_aiohttp_load(
    url: str, path: str, *, connections: int, seconds: float, run: int
) -> LoadResult:
    """The fallback without wrk: `connections` closed-loop clients, one request each at a time.

    The client shares the machine's cores with the servers, so it is slower than wrk."""
    latencies: list[float] = []
    errors = 0
    numbers = itertools.count(1)
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=connections)

    async def client(tid: int, http: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            n = next(numbers)
            body = {"name": f"Bench {n}", "phone": phone(run, 0, n), "utm_source": "aiohttp"}
            t0 = time.perf_counter()
            try:
                async with http.post(url + path, json=body) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    t0 = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(i, http) for i in range(connections)))
    elapsed = time.monotonic() - t0
    return LoadResult(
        len(latencies),
        elapsed,
        percentile(latencies, 50) * 1e3,
        percentile(latencies, 99) * 1e3,
        errors,
        "aiohttp",
    )


async def run_load(
    url: str, path: str, *, connections: int, seconds: float, threads: int, run: int, tool: str
) -> LoadResult:
    if tool == "wrk":
        return await run_wrk(
            url, path, connections=connections, seconds=seconds, threads=threads, run=run
        )
    return await run_aiohttp_load(url, path, connections=connections, seconds=seconds, run=run)
