"""Scaling out: aggregate intake throughput and CRM rate ÷ limit for 1, 2 and 3 processes.

    .venv/bin/python -m bench.scale                 # with Redis (a redis-server of its own)
    .venv/bin/python -m bench.scale --no-redis      # shares counted by PostgreSQL heartbeats

For each process count: a fresh database on one embedded PostgreSQL, an empty Redis, a fresh
amoCRM simulator (in this process, limit `--limit`, never blocking), and N `python -m service
serve` processes (intake and worker). Then `--seconds` of closed-loop load (wrk, else an aiohttp
client) spread evenly over the processes, every request a new person; then `--measure` seconds in
which the workers drain the backlog. Printed per N: intake requests/s (sum over processes), the
CRM request rate in the measuring window ÷ the limit, the most requests the simulator saw in any
sliding second, 429s. Loopback only; bounded (about 30 s per process count).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from bench.common import (
    Server,
    clean_env,
    create_database,
    embedded_postgres,
    free_port,
    have_wrk,
    machine_facts,
    run_load,
)
from service.simulators.amocrm.server import AmoCrmSimulator, SimulatorConfig, start_simulator
from service.simulators.common import max_in_window

FORM_PATH = "/api/v1/forms/scale"


@contextlib.contextmanager
def redis_server(root: Path) -> Iterator[str]:
    """A redis-server of our own: free port, no persistence, killed at the end."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server not found (apt-get install redis-server), or --no-redis")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(
        [*argv, "--dir", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        cli = shutil.which("redis-cli") or "redis-cli"
        for _ in range(200):
            ping = subprocess.run([cli, "-p", str(port), "ping"], capture_output=True, text=True)
            if ping.stdout.strip() == "PONG":
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


async def one_count(
    n: int, args: argparse.Namespace, base_dsn: str, redis_url: str | None, root: Path
) -> dict[str, Any]:
    """N processes: load, then drain; what the clients and the CRM saw."""
    dsn = await create_database(base_dsn, f"scale{n}", migrated=True)
    if redis_url:
        subprocess.run(["redis-cli", "-u", redis_url, "flushall"], capture_output=True, check=True)
    sim = AmoCrmSimulator(SimulatorConfig(rate_limit=args.limit, block_after=10**9))
    runner, sim_url = await start_simulator(sim)
    servers = [
        Server(
            f"relay{i}",
            [sys.executable, "-m", "service", "serve"],
            _env(dsn, sim_url, redis_url, args.limit, root / f"var{n}-{i}", port := free_port()),
            port,
            "/readyz",
            root / f"relay{n}-{i}.log",
        )
        for i in range(n)
    ]
    try:
        await asyncio.gather(*(s.start() for s in servers))
        tool = "wrk" if have_wrk() and not args.aiohttp else "aiohttp"
        loads = await asyncio.gather(
            *(
                run_load(
                    s.url,
                    FORM_PATH,
                    connections=max(1, args.connections // n),
                    seconds=args.seconds,
                    threads=1,
                    run=i,
                    tool=tool,
                )
                for i, s in enumerate(servers)
            )
        )
        t0 = sim.clock()
        await asyncio.sleep(args.measure)
        t1 = sim.clock()
    finally:
        for s in servers:
            await asyncio.to_thread(s.stop)
        await runner.cleanup()
    times = [e.t for e in sim.log.entries]
    report = sim.report()
    in_window = sum(t0 <= t < t1 for t in times)
    return {
        "processes": n,
        "tool": loads[0].tool,
        "intake_rps": round(sum(r.requests for r in loads) / max(r.seconds for r in loads), 1),
        "answered": sum(r.requests for r in loads),
        "errors": sum(r.errors for r in loads),
        "crm_rate": round(in_window / (t1 - t0), 2),
        "crm_rate_over_limit": round(in_window / (t1 - t0) / args.limit, 3),
        "max_in_any_second": max_in_window(times, 1.0),
        "violations": report["violations"],
        "crm_requests": len(times),
    }


def _env(
    dsn: str, sim_url: str, redis_url: str | None, limit: int, data_dir: Path, port: int
) -> dict[str, str]:
    env = clean_env(
        DATABASE_URL=dsn,
        CRM="amocrm",
        AMOCRM_BASE_URL=sim_url,
        AMOCRM_ACCESS_TOKEN=SimulatorConfig().access_token,
        CRM_RATE_LIMIT=str(limit),
        CRM_RELAY_DATA_DIR=str(data_dir),
        HOST="127.0.0.1",
        PORT=str(port),
        LOG_LEVEL="WARNING",
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


async def main(args: argparse.Namespace) -> None:
    facts = machine_facts()
    print(f"# {facts}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="crs-", dir="/tmp"))
    results = []
    try:
        with contextlib.ExitStack() as stack:
            pg = stack.enter_context(embedded_postgres())
            redis_url = None if args.no_redis else stack.enter_context(redis_server(root))
            for n in args.processes:
                result = await one_count(n, args, pg.dsn, redis_url, root)
                results.append(result)
                print(orjson.dumps(result).decode(), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    mode = "PostgreSQL shares (no Redis)" if args.no_redis else "Redis"
    print(
        f"\n{mode}, CRM_RATE_LIMIT={args.limit}, {args.seconds:g} s load, tool {results[0]['tool']}"
    )
    print("| processes | intake req/s | CRM req/s | ÷ limit | max in any second | 429s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['processes']} | {r['intake_rps']} | {r['crm_rate']} | "
            f"{r['crm_rate_over_limit']} | {r['max_in_any_second']} | {r['violations']} |"
        )


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--limit", type=int, default=20, help="CRM_RATE_LIMIT and the simulator's")
    p.add_argument("--seconds", type=float, default=8.0, help="load duration per count")
    p.add_argument("--measure", type=float, default=10.0, help="CRM rate window after the load")
    p.add_argument("--connections", type=int, default=48, help="closed-loop clients, in all")
    p.add_argument("--no-redis", action="store_true")
    p.add_argument("--aiohttp", action="store_true", help="the aiohttp client even if wrk exists")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
