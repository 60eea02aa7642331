"""Delivery latency on an idle service: from our 200 to the CRM receiving the call.

    .venv/bin/python -m bench.latency --count 200

One embedded PostgreSQL, the amoCRM simulator on a real port in this process, and our service
as a subprocess (`python -m service serve`: HTTP + worker, default settings: CRM rate 6/s). One
submission at a time, each from a new person: POST, take the time the 200 arrived, wait until the
simulator holds the new lead, let the rate gate's token come back, send the next.

The simulator stamps every request with `time.monotonic()` on arrival (its request log); the
service is on the same machine, and CLOCK_MONOTONIC is one clock for every process, so the
difference is the time the lead spent between our answer and the CRM. Printed, p50/p99/max of:
- 200 → first CRM call (the worker woke up: LISTEN/NOTIFY, claimed, went through the gate);
- 200 → the call that created the lead (`POST /api/v4/leads/complex`, after the contact search:
  two calls the rate gate spaces 1/rate apart).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import (
    Server,
    clean_env,
    create_database,
    embedded_postgres,
    free_port,
    machine_facts,
    percentile,
    phone,
)
from service.simulators.amocrm.server import AmoCrmSimulator, SimulatorConfig, start_simulator

CREATE = "POST /api/v4/leads/complex"
DELIVERY_TIMEOUT_S = 30.0


async def one(
    http: aiohttp.ClientSession, url: str, sim: AmoCrmSimulator, i: int
) -> dict[str, float]:
    """Submit person `i`; the latencies (s) of its first CRM call and of its create call."""
    leads_before = len(sim.store.leads)
    first_entry = len(sim.log.entries)
    body = {"name": f"Latency {i}", "phone": phone(0, 0, i), "utm_source": "latency"}
    sent = time.monotonic()
    async with http.post(f"{url}/api/v1/forms/latency", json=body) as r:
        answered = time.monotonic()
        answer = await r.json(content_type=None)
    if r.status != 200 or answer.get("ok") is not True or answer.get("spooled"):
        raise RuntimeError(f"submission {i}: HTTP {r.status} {answer}")
    deadline = answered + DELIVERY_TIMEOUT_S
    while len(sim.store.leads) == leads_before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"submission {i}: no lead in the CRM after {DELIVERY_TIMEOUT_S} s")
        await asyncio.sleep(0.002)  # the harness waits; the service under test never polls
    entries = sim.log.entries[first_entry:]
    created = next(e.t for e in entries if e.endpoint == CREATE)
    return {
        "first_call": entries[0].t - answered,
        "created": created - answered,
        "answer": answered - sent,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    facts = machine_facts()
    print(f"machine: {facts}", flush=True)
    sim = AmoCrmSimulator(SimulatorConfig())  # amoCRM's limit: 7 requests in any second
    runner, sim_url = await start_simulator(sim)
    samples: list[dict[str, float]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="crl-") as tmpdir, embedded_postgres() as pg:
            tmp = Path(tmpdir)
            dsn = await create_database(pg.dsn, "bench_latency", migrated=True)
            port = free_port()
            env = clean_env(
                DATABASE_URL=dsn,
                CRM="amocrm",
                AMOCRM_BASE_URL=sim_url,
                AMOCRM_ACCESS_TOKEN=sim.config.access_token,
                CRM_RELAY_DATA_DIR=str(tmp / "var"),
                HOST="127.0.0.1",
                PORT=str(port),
                LOG_LEVEL=args.log_level,
            )
            argv = [sys.executable, "-m", "service", "serve"]
            server = Server("ours", argv, env, port, "/readyz", tmp / "service.log")
            await server.start()
            try:
                async with aiohttp.ClientSession() as http:
                    for i in range(args.warmup + args.count):
                        s = await one(http, server.url, sim, i)
                        if i >= args.warmup:
                            samples.append(s)
                        # idle again: the gate's token is back before the next submission
                        await asyncio.sleep(args.gap)
            finally:
                server.stop()
    finally:
        await runner.cleanup()
    report = sim.report()
    out: dict[str, Any] = {"facts": facts, "count": len(samples)}
    for key in ("answer", "first_call", "created"):
        ms = [s[key] * 1000 for s in samples]
        out[key] = {
            "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99),
            "max_ms": max(ms),
            "mean_ms": statistics.fmean(ms),
        }
    out["crm"] = {
        "requests": report["requests_total"],
        "by_endpoint": report["requests_by_endpoint"],
        "violations": report["violations"],
        "duplicates": report["duplicates"],
    }
    return out


def print_report(out: dict[str, Any]) -> None:
    names = {
        "answer": "POST → our 200",
        "first_call": "our 200 → first CRM call",
        "created": "our 200 → lead created (2nd call)",
    }
    print(f"\n{out['count']} submissions, one at a time, idle service:")
    for key, name in names.items():
        d = out[key]
        print(
            f"  {name:<36} p50 {d['p50_ms']:7.1f} ms  p99 {d['p99_ms']:7.1f} ms  "
            f"max {d['max_ms']:7.1f} ms"
        )
    met = out["first_call"]["p99_ms"] <= 100
    print(f"  target p99 (200 → CRM call) <= 100 ms: {'met' if met else 'NOT met'}")
    print(f"  CRM: {out['crm']}")
    print("RESULT-JSON " + orjson.dumps(out).decode())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--gap", type=float, default=0.3, help="idle seconds between submissions")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    print_report(asyncio.run(bench(parser().parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
