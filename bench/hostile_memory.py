"""Memory under a flood of hostile form bodies: distinct field names, ~60 KB each, no contact.

    .venv/bin/python -m bench.hostile_memory --bodies 5000 --senders 8

Loopback only, bounded by --bodies. One embedded PostgreSQL; the service is a subprocess
(`python -m service serve --no-worker`). Each body is a JSON object of 1,800 field names that
no other body uses and no phone or email, so every one is answered `{"ok": false}` and kept raw
in `rejected` (trimmed to its caps). Nothing about it may stay in the process's memory: caches
and windows keyed by what senders send are bounded in bytes.

Printed: the service's RSS after a warm-up of `--warmup` bodies and after all of them (VmRSS
from /proc), the growth in MiB, the peak (VmHWM), answers by status, and whether the service
still takes a valid lead afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
import orjson

from bench.common import (
    Server,
    clean_env,
    create_database,
    embedded_postgres,
    free_port,
    machine_facts,
    memory_kb,
)

FIELDS = 1800  # field names per body: ~60 KB of JSON (under MAX_BODY_BYTES, 64 KiB)


def hostile_body(n: int, fields: int = FIELDS) -> bytes:
    """~60 KB of JSON: `fields` field names used by no other body `n`, no contact."""
    return orjson.dumps({f"field_{n:07d}_{j:05d}_xxxxxx": "v" for j in range(fields)})


async def send_all(
    url: str, bodies: range, senders: int, statuses: Counter[int], timeout_s: float = 30.0
) -> None:
    queue = iter(bodies)
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def sender(http: aiohttp.ClientSession) -> None:
        for n in queue:
            async with http.post(
                f"{url}/api/v1/forms/flood",
                data=hostile_body(n),
                headers={"Content-Type": "application/json"},
            ) as r:
                await r.read()
                statuses[r.status] += 1

    async with aiohttp.ClientSession(timeout=timeout) as http:
        await asyncio.gather(*(sender(http) for _ in range(senders)))


async def takes_a_lead(url: str) -> bool:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{url}/api/v1/forms/after", json={"name": "After", "phone": "+77011234567"}
        ) as r,
    ):
        return r.status == 200 and (await r.json()).get("ok") is True


async def main(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="crb-mem-"))
    try:
        with embedded_postgres() as pg:
            dsn = await create_database(pg.dsn, "bench_hostile", migrated=True)
            port = free_port()
            env = clean_env(
                DATABASE_URL=dsn,
                CRM="amocrm",
                AMOCRM_BASE_URL="http://127.0.0.1:9",
                AMOCRM_ACCESS_TOKEN="bench",
                CRM_RELAY_DATA_DIR=str(tmp / "var"),
                HOST="127.0.0.1",
                PORT=str(port),
                LOG_LEVEL="WARNING",
            )
            argv = [sys.executable, "-m", "service", "serve", "--no-worker"]
            server = Server("relay", argv, env, port, "/readyz", tmp / "relay.log")
            await server.start()
            try:
                statuses: Counter[int] = Counter()
                await send_all(server.url, range(args.warmup), args.senders, statuses)
                before = memory_kb(server.pid)["VmRSS"]
                t0 = time.monotonic()
                bodies = range(args.warmup, args.warmup + args.bodies)
                await send_all(server.url, bodies, args.senders, statuses)
                seconds = time.monotonic() - t0
                after = memory_kb(server.pid)
                alive = await takes_a_lead(server.url)
            finally:
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    growth = (after["VmRSS"] - before) / 1024
    print(orjson.dumps(machine_facts()).decode())
    print(
        f"{args.bodies} hostile bodies ({FIELDS} distinct field names, "
        f"{len(hostile_body(0)) // 1024} KiB each) in {seconds:.1f} s, {args.senders} senders; "
        f"answers {dict(statuses)}"
    )
    print(
        f"RSS after warm-up {before / 1024:.1f} MiB, after {after['VmRSS'] / 1024:.1f} MiB: "
        f"growth {growth:.1f} MiB (peak {after['VmHWM'] / 1024:.1f} MiB); "
        f"takes a valid lead after: {alive}"
    )
    ok = growth < args.max_growth_mib and alive and set(statuses) == {200}
    print("PASS" if ok else f"FAIL (growth must stay under {args.max_growth_mib} MiB)")
    return 0 if ok else 1


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bodies", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--senders", type=int, default=8)
    p.add_argument("--max-growth-mib", type=float, default=64.0)
    return p.parse_args()


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
