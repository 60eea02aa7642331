"""Liveness under load: /healthz answer times while the service takes a stream of submissions.

    .venv/bin/python -m bench.healthz --connections 64 --seconds 10

Starts `python -m service serve` on embedded defaults (its own data dir, in-process simulator),
drives POST /api/v1/forms/bench with --connections concurrent clients, and probes /healthz every
50 ms on its own connection. Prints probe p50/p99/max and the intake rate. Loopback only; bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{url}/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("service not ready")


async def load(url: str, connections: int, until: float) -> int:
    numbers = itertools.count()
    done = 0

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.monotonic() < until:
            n = next(numbers)
            body = {"name": f"P{n}", "phone": f"+7701{n % 10_000_000:07d}"}
            async with http.post(f"{url}/api/v1/forms/bench", json=body) as r:
                await r.read()
            done += 1

    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as http:
        await asyncio.gather(*(client(http) for _ in range(connections)))
    return done


async def probe(url: str, until: float) -> list[float]:
    times: list[float] = []
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            async with http.get(f"{url}/healthz") as r:
                await r.read()
                assert r.status == 200
            times.append((time.perf_counter() - t0) * 1000)
            await asyncio.sleep(0.05)
    return times


async def main(args: argparse.Namespace) -> None:
    root = Path(tempfile.mkdtemp(prefix="crh-", dir="/tmp"))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMOCRM_", "BITRIX24_"))}
    for var in ("DATABASE_URL", "CRM", "REDIS_URL", "CRM_RELAY_CONFIG"):
        env.pop(var, None)
    env.update(CRM_RELAY_DATA_DIR=str(root / "var"), PORT=str(port), HOST="127.0.0.1")
    env.update(LOG_LEVEL="WARNING")
    proc = subprocess.Popen(
        [sys.executable, "-m", "service", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url)
        until = time.monotonic() + args.seconds
        done, times = await asyncio.gather(load(url, args.connections, until), probe(url, until))
        q = statistics.quantiles(times, n=100)
        print(f"intake: {done / args.seconds:.0f} submissions/s with {args.connections} clients")
        print(
            f"/healthz over {len(times)} probes: p50 {q[49]:.1f} ms, p99 {q[98]:.1f} ms, "
            f"max {max(times):.1f} ms"
        )
    finally:
        proc.terminate()
        proc.wait(15)
        shutil.rmtree(root, ignore_errors=True)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0)
    asyncio.run(main(p.parse_args()))


if __name__ == "__main__":
    cli()
