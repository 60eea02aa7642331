"""Liveness under load: /healthz answer times while the service takes a stream of submissions.

    .venv/bin/python -m bench.healthz --connections 64 --seconds 10

Starts `python -m service serve` on embedded defaults (its own data dir, in-process simulator,
worker on), drives POST /api/v1/forms/bench with --connections closed-loop clients, and probes
/healthz every 50 ms, each probe on a new connection (as a kubelet or Docker HEALTHCHECK does).

The load runs outside this process (wrk, else an aiohttp client in a child process), so the
prober's own event loop does nothing but probe: an earlier version ran both in one loop and timed
its own client's queue along with the server's. Prints probe p50/p99/max and the intake rate.
Loopback only; bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

from bench.common import (
    LoadResult,
    Server,
    clean_env,
    free_port,
    have_wrk,
    machine_facts,
    run_aiohttp_load,
    run_wrk,
)

FORM_PATH = "/api/v1/forms/bench"


async def probe(url: str, seconds: float) -> list[float]:
    """/healthz every 50 ms, a new connection each time; answer times in ms."""
    times: list[float] = []
    until = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            async with http.get(f"{url}/healthz") as r:
                await r.read()
                if r.status != 200:
                    raise SystemExit(f"/healthz answered {r.status}")
            times.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.05)
    return times


async def load_elsewhere(url: str, connections: int, seconds: float, tool: str) -> LoadResult:
    if tool == "wrk":
        return await run_wrk(
            url, FORM_PATH, connections=connections, seconds=seconds, threads=2, run=0
        )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.healthz", "load", url,
        "--connections", str(connections), "--seconds", str(seconds),
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return LoadResult(**orjson.loads(out.splitlines()[-1]))


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="crh-", dir="/tmp"))
    port = free_port()
    env = clean_env(
        CRM_RELAY_DATA_DIR=str(root / "var"),
        PORT=str(port),
        HOST="127.0.0.1",
        LOG_LEVEL=args.log_level,
    )
    server = Server(
        "service", [sys.executable, "-m", "service", "serve"], env, port, "/readyz", root / "log"
    )
    try:
        await server.start()
        print(f"machine: {machine_facts()}")
        print(f"load: {args.tool}, {args.connections} connections, {args.seconds:.0f} s")
        load, times = await asyncio.gather(
            load_elsewhere(server.url, args.connections, args.seconds, args.tool),
            probe(server.url, args.seconds),
        )
        q = statistics.quantiles(times, n=100)
        print(
            f"intake: {load.rps:.0f} submissions/s with {args.connections} clients "
            f"(p50 {load.p50_ms:.1f} ms, p99 {load.p99_ms:.1f} ms, errors {load.errors})"
        )
        print(
            f"/healthz over {len(times)} probes: p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms, "
            f"max {max(times):.1f} ms"
        )
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def load_main(args: argparse.Namespace) -> None:
    """(internal) the aiohttp load in a process of its own; prints its LoadResult as JSON."""
    result = asyncio.run(
        run_aiohttp_load(
            args.url, FORM_PATH, connections=args.connections, seconds=args.seconds, run=0
        )
    )
    print(orjson.dumps(result.__dict__).decode())


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--tool", choices=["wrk", "aiohttp"], default="wrk" if have_wrk() else "aiohttp")
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="command")
    load = sub.add_parser("load", help="(internal) run the aiohttp load and print its result")
    load.add_argument("url")
    load.add_argument("--connections", type=int, default=64)
    load.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    if args.command == "load":
        load_main(args)
    else:
        asyncio.run(main(args))


if __name__ == "__main__":
    cli()
