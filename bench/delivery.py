"""Delivery benchmark: drain a backlog against a CRM simulator at its real limit.

    .venv/bin/python -m bench.delivery --crm amocrm --submissions 300 --people 240
    .venv/bin/python -m bench.delivery --crm amocrm --trust-duplicates
    .venv/bin/python -m bench.delivery --crm bitrix24

Queues N submissions for M people (so N - M are returning people) with the worker off, then
starts a worker-only service and drains the backlog. Prints CRM requests per delivered lead,
sustained request rate ÷ limit, 429 count, duplicates and wall time. Loopback only; bounded by
--timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from service.app import Roles, create_app
from service.database import EmbeddedPostgres, migrate
from service.settings import RetryPolicy, Settings


async def start_simulator(kind: str, rate: int) -> tuple[Any, web.AppRunner, str, dict[str, Any]]:
    """The simulator for `kind` at its real limit, and the settings that point at it."""
    if kind == "amocrm":
        from service.crm.simulator import AmoCrmSimulator, SimulatorConfig, start_simulator

        sim: Any = AmoCrmSimulator(SimulatorConfig(rate_limit=rate))
        runner, url = await start_simulator(sim)
        env = {
            "crm": "amocrm",
            "amocrm_base_url": url,
            "amocrm_access_token": sim.config.access_token,
        }
        return sim, runner, url, env
    from service.crm.simulator_bitrix24 import (  # type: ignore[import-not-found,unused-ignore]
        BitrixSimulator,
        BitrixSimulatorConfig,
        start_bitrix_simulator,
    )

    sim = BitrixSimulator(BitrixSimulatorConfig())
    runner, url = await start_bitrix_simulator(sim)
    hook = f"{url}/rest/1/{sim.config.webhook_secret}/"
    return sim, runner, url, {"crm": "bitrix24", "bitrix24_webhook_url": hook}


async def serve(settings: Settings, roles: Roles) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(settings, roles), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


async def queue_backlog(url: str, submissions: int, people: int) -> None:
    sem = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as http:

        async def one(n: int) -> None:
            i = n % people
            body = {"name": f"Person {i}", "phone": f"+7701{i:07d}", "comment": f"visit {n}"}
            if i % 2:
                body["email"] = f"p{i}@example.kz"
            async with sem, http.post(f"{url}/api/v1/forms/bench", json=body) as r:
                answer = await r.json()
                assert answer["ok"], answer

        await asyncio.gather(*(one(n) for n in range(submissions)))


async def drained(dsn: str, n: int, timeout: float) -> float:
    conn = await asyncpg.connect(dsn)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            done = await conn.fetchval("SELECT count(*) FROM submissions WHERE state <> 'pending'")
            if done >= n:
                return time.monotonic() - t0
            await asyncio.sleep(0.1)
        raise SystemExit(f"backlog not drained within {timeout} s")
    finally:
        await conn.close()


def summarise(sim: Any, args: argparse.Namespace, limit: float, wall: float) -> dict[str, Any]:
    report = sim.report()
    times = sorted(e.t for e in sim.log.entries)
    span = times[-1] - times[0] if len(times) > 1 else 1.0
    new_people = args.people
    return {
        "crm": args.crm,
        "submissions": args.submissions,
        "people": args.people,
        "returning_submissions": args.submissions - args.people,
        "crm_requests": len(times),
        "requests_per_delivered_submission": round(len(times) / args.submissions, 3),
        "requests_per_new_lead": round(len(times) / new_people, 3),
        "requests_by_endpoint": report.get("requests_by_endpoint"),
        "rate_limit": limit,
        # n requests span n - 1 intervals
        "sustained_rate": round((len(times) - 1) / span, 3) if span else None,
        "rate_over_limit": round((len(times) - 1) / span / limit, 3) if span else None,
        "answers_429": report["answers_by_status"].get("429", 0),
        "violations": report["violations"],
        "duplicates": report["duplicates"],
        "wall_time_s": round(wall, 1),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="crb-", dir="/tmp"))
    pg = EmbeddedPostgres(root)
    dsn = await asyncio.to_thread(pg.start)
    runners: list[web.AppRunner] = []
    try:
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        await conn.close()
        limit = args.rate or (7 if args.crm == "amocrm" else 2)
        sim, sim_runner, _, crm = await start_simulator(args.crm, limit)
        runners.append(sim_runner)
        settings = dataclasses.replace(
            Settings(database_url=dsn, data_dir=root / "var", crm_rate_limit=float(limit)),
            amocrm_trust_duplicates=args.trust_duplicates,
            retry=RetryPolicy(base_s=0.5, max_s=5),
            **crm,
        )
        intake, url = await serve(settings, Roles(worker=False))
        runners.append(intake)
        await queue_backlog(url, args.submissions, args.people)
        t0 = time.monotonic()
        worker, _ = await serve(settings, Roles(http=False))
        runners.append(worker)
        await drained(dsn, args.submissions, args.timeout)
        return summarise(sim, args, limit, time.monotonic() - t0)
    finally:
        for r in reversed(runners):
            await r.cleanup()
        await asyncio.to_thread(pg.stop)
        shutil.rmtree(root, ignore_errors=True)


def cli() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--crm", choices=["amocrm", "bitrix24"], default="amocrm")
    p.add_argument("--submissions", type=int, default=300)
    p.add_argument("--people", type=int, default=240)
    p.add_argument("--rate", type=int, default=0, help="simulator limit = our CRM_RATE_LIMIT")
    p.add_argument("--trust-duplicates", action="store_true", help="AMOCRM_TRUST_DUPLICATE_CONTROL")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    result = asyncio.run(main(args))
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:>{width}}: {value}")


if __name__ == "__main__":
    cli()
