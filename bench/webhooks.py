"""Webhook answer times under load, with the database stalled for a while in the middle.

    .venv/bin/python -m bench.webhooks --senders 64 --requests 5000 --stall-s 3

Loopback only, bounded by --requests and --timeout. One embedded PostgreSQL; the service is a
subprocess (`python -m service serve`: handlers, delivery worker, forwarder) forwarding to a
receiver in this process. `--senders` closed-loop clients send `--requests` requests: 60 %
amoCRM status changes (urlencoded, nested keys), 20 % Bitrix24 ONCRMDEALUPDATE, 10 % generic
JSON with an HMAC signature, 10 % re-sends of an earlier request (duplicates). After `--stall-at`
seconds a separate connection holds `LOCK TABLE webhook_events IN ACCESS EXCLUSIVE MODE` for
`--stall-s` seconds: every write blocks, as when the database is slow or gone.

Printed: answer-time p50/p90/p99/max overall and for requests sent during the stall, answers by
status, spooled answers, CPU seconds per 1,000 requests of the relay process (handlers and, at
the same time, the forwarder), of its PostgreSQL server and of this load client; then, once the
spool has drained and the forwarder is done (`drain_after_load_s`): events stored (must equal the
unique events sent: none lost, none twice), forward jobs done, and distinct events the receiver
got (none twice).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg
import orjson
from aiohttp import web

from bench.common import (
    Server,
    clean_env,
    cpu_seconds,
    create_database,
    embedded_postgres,
    free_port,
    machine_facts,
    percentile,
    postgres_cpu_seconds,
)
from service.webhooks.events import sign

SECRET = "bench-secret-0123456789abcdef-0123456789"  # 32+ characters, as start-up insists
B24_TOKEN = "bench-b24-token"
Request = tuple[str, bytes, dict[str, str]]


def amo(n: int) -> Request:
    p = "leads[status][0]"
    fields = {
        f"{p}[id]": str(10_000_000 + n),
        f"{p}[status_id]": "142",
        f"{p}[old_status_id]": "10001",
        f"{p}[pipeline_id]": "1000",
        f"{p}[updated_at]": str(1_700_000_000 + n),
        f"{p}[name]": f"Заявка {n}",
        "account[subdomain]": "bench",
        "account[id]": "1",
    }
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return f"/webhooks/amocrm/{SECRET}", urlencode(fields).encode(), headers


def bitrix(n: int) -> Request:
    fields = {
        "event": "ONCRMDEALUPDATE",
        "data[FIELDS][ID]": str(n),
        "ts": str(1_700_000_000 + n),
        "auth[domain]": "bench.bitrix24.kz",
        "auth[application_token]": B24_TOKEN,
    }
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    return "/webhooks/bitrix24", urlencode(fields).encode(), headers


def generic(n: int) -> Request:
    body = orjson.dumps({"type": "order.paid", "order": {"id": n}})
    headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": f"order-{n}",
        "X-Relay-Signature": sign(SECRET, body),
    }
    return "/webhooks/generic/shop", body, headers


def plan(total: int) -> tuple[list[Request], int]:
    """The requests in order, and how many distinct events they carry."""
    requests: list[Request] = []
    for n in range(total):
        slot = n % 10
        if slot < 6:
            requests.append(amo(n))
        elif slot < 8:
            requests.append(bitrix(n))
        elif slot == 8 or n < 10:
            requests.append(generic(n))
        else:
            requests.append(requests[n - 7])  # a re-delivery of an earlier request
    unique = len({(path, body) for path, body, _ in requests})
    return requests, unique


@dataclass
class Answers:
    latencies: list[float] = field(default_factory=list)
    stalled: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    spooled: int = 0


async def send_all(
    url: str, requests: list[Request], senders: int, stall: tuple[float, float]
) -> Answers:
    out = Answers()
    queue: asyncio.Queue[Request] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)

    async def sender(http: aiohttp.ClientSession) -> None:
        while not queue.empty():
            path, body, headers = queue.get_nowait()
            t0 = time.monotonic()
            try:
                async with http.post(url + path, data=body, headers=headers) as r:
                    answer = await r.read()
                    status = r.status
            except (aiohttp.ClientError, TimeoutError):
                status, answer = 599, b""
            elapsed = time.monotonic() - t0
            out.latencies.append(elapsed)
            if stall[0] <= t0 < stall[1]:
                out.stalled.append(elapsed)
            out.statuses[status] += 1
            out.spooled += b'"spooled":true' in answer

    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=senders)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
        await asyncio.gather(*(sender(http) for _ in range(senders)))
    return out


async def hold_lock(dsn: str, at_s: float, for_s: float) -> None:
    """Block every write to webhook_events for `for_s` seconds, `at_s` seconds from now."""
    if for_s <= 0:
        return
    conn = await asyncpg.connect(dsn)
    try:
        await asyncio.sleep(at_s)
        async with conn.transaction():
            await conn.execute("LOCK TABLE webhook_events IN ACCESS EXCLUSIVE MODE")
            await asyncio.sleep(for_s)
    finally:
        await conn.close()


async def settle(dsn: str, unique: int, timeout_s: float) -> dict[str, Any]:
    """Wait for the spool to drain and the outbox to empty; the final counts."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            events = await conn.fetchval("SELECT count(*) FROM webhook_events")
            open_jobs = await conn.fetchval(
                "SELECT count(*) FROM forward_jobs WHERE state IN ('pending', 'running')"
            )
            if (events >= unique and open_jobs == 0) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        forwarded = await conn.fetchval(
            "SELECT count(*) FROM forward_jobs WHERE kind = 'forward' AND state = 'done'"
        )
        return {"events": events, "open_jobs": open_jobs, "forwarded_jobs_done": forwarded}
    finally:
        await conn.close()


async def start_receiver() -> tuple[web.AppRunner, str, Counter[str]]:
    got: Counter[str] = Counter()

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        got[request.headers.get("X-Relay-Event-Id", "")] += 1
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/hook", got


def ms(values: list[float], p: float) -> float:
    return round(percentile(values, p) * 1000, 1) if values else float("nan")


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    requests, unique = plan(args.requests)
    tmp = Path(tempfile.mkdtemp(prefix="crw-", dir="/tmp"))
    receiver, hook_url, got = await start_receiver()
    try:
        with embedded_postgres() as pg:
            dsn = await create_database(pg.dsn, "bench_webhooks", migrated=True)
            env = clean_env(
                DATABASE_URL=dsn, HOST="127.0.0.1", PORT=str(port := free_port()),
                CRM_RELAY_DATA_DIR=str(tmp / "var"), WEBHOOK_SECRET=SECRET,
                BITRIX24_APP_TOKEN=B24_TOKEN, WEBHOOK_FORWARD_URL=hook_url,
                WEBHOOK_FORWARD_RATE="1000", LOG_LEVEL="ERROR",
            )  # fmt: skip
            server = Server(
                "relay", [sys.executable, "-m", "service", "serve", *args.serve_flags], env, port,
                "/readyz" if not args.serve_flags else "/healthz",
                tmp / "relay.log",
            )  # fmt: skip
            await server.start()
            try:
                pg_pid = pg.postmaster_pid
                cpu0 = (cpu_seconds(server.pid), postgres_cpu_seconds(pg_pid), time.process_time())
                t0 = time.monotonic()
                stall = (t0 + args.stall_at, t0 + args.stall_at + args.stall_s)
                lock = asyncio.create_task(hold_lock(dsn, args.stall_at, args.stall_s))
                answers = await send_all(server.url, requests, args.senders, stall)
                wall = time.monotonic() - t0
                cpu1 = (cpu_seconds(server.pid), postgres_cpu_seconds(pg_pid), time.process_time())
                await lock
                t1 = time.monotonic()
                final = await settle(dsn, unique, args.timeout)
                final["drain_after_load_s"] = round(time.monotonic() - t1, 1)
            finally:
                server.stop()
    finally:
        await receiver.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    lat, stalled = answers.latencies, answers.stalled
    return {
        **machine_facts(),
        "command": " ".join(["python -m bench.webhooks", *sys.argv[1:]]),
        "requests": len(lat),
        "senders": args.senders,
        "requests_per_s": round(len(lat) / wall, 1),
        "answer_ms": {p: ms(lat, q) for p, q in (("p50", 50), ("p90", 90), ("p99", 99))}
        | {"max": round(max(lat) * 1000, 1)},
        "during_stall": {"requests": len(stalled), "p50_ms": ms(stalled, 50),
                         "p99_ms": ms(stalled, 99)},
        "statuses": {str(k): v for k, v in answers.statuses.items()},
        "spooled_answers": answers.spooled,
        "cpu_s_per_1000_requests": {
            name: round((b - a) / len(lat) * 1000, 2)
            for name, a, b in zip(("relay", "postgres", "load_client"), cpu0, cpu1, strict=True)
        },
        "unique_events_sent": unique,
        **final,
        "forwarded_distinct": len(got),
        "forwarded_twice": sum(1 for n in got.values() if n > 1),
    }  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.webhooks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--senders", type=int, default=64)
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--stall-at", type=float, default=1.0, help="seconds into the run")
    p.add_argument("--stall-s", type=float, default=3.0, help="0: no stall")
    p.add_argument("--timeout", type=float, default=120.0, help="for the drain after the load")
    p.add_argument(
        "--no-worker",
        dest="serve_flags",
        action="store_const",
        const=["--no-worker"],
        default=[],
        help="handlers only: no delivery worker, no forwarder",
    )
    return p


def main() -> None:
    result = asyncio.run(bench(parser().parse_args()))
    with contextlib.suppress(BrokenPipeError):
        print(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
