"""Intake throughput: our service against a plain one-INSERT-per-request baseline.

    .venv/bin/python -m bench.intake --connections 64 --seconds 15

One embedded PostgreSQL serves both sides (so both get the same durability settings: printed),
each in a database of its own. Both servers are subprocesses of this script on the same Python:

- ours: `python -m service serve --no-worker` (intake only: parse, normalise, idempotency
  window, per-key locks, group commit of submission + person + identities + outbox job);
- baseline: an aiohttp handler that parses the JSON body and runs one
  `INSERT … ON CONFLICT DO NOTHING` per request, autocommit, on an asyncpg pool of the same size.

The same load (wrk with a Lua script sending unique phones, else an aiohttp client) drives them in
alternating runs: ours, baseline, ours, baseline … Printed per run: requests/s, p50/p99 latency,
errors, rows stored, CPU seconds per 1,000 requests of the server process and of PostgreSQL; then
the medians and ours ÷ baseline, and our RSS after `--rss-submissions` submissions.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from bench.common import (
    MAX_THREADS,
    LoadResult,
    Server,
    clean_env,
    count_rows,
    cpu_seconds,
    create_database,
    durability,
    embedded_postgres,
    free_port,
    have_wrk,
    machine_facts,
    memory_kb,
    postgres_cpu_seconds,
    run_load,
)

FORM_PATH = "/api/v1/forms/bench"
POOL_SIZE = 10  # service.db.database.create_pool's max_size: the baseline gets the same
BASELINE_TABLE = "baseline_leads"


# ---- the baseline server ---------------------------------------------------------------------


def baseline_app(dsn: str, pool_size: int) -> web.Application:
    """The plain handler: parse the JSON, one INSERT … ON CONFLICT DO NOTHING, autocommit."""
    pool_key = web.AppKey("pool", asyncpg.Pool)

    async def pool_ctx(app: web.Application) -> Any:
        app[pool_key] = await asyncpg.create_pool(dsn, min_size=2, max_size=pool_size)
        yield
        await app[pool_key].close()

    async def submit(request: web.Request) -> web.Response:
        raw = await request.read()
        data = orjson.loads(raw)
        key = request.headers.get("Idempotency-Key") or str(data.get("phone"))
        await request.app[pool_key].execute(
            f"INSERT INTO {BASELINE_TABLE} (idem_key, lead) VALUES ($1, $2::jsonb)"
            " ON CONFLICT DO NOTHING",
            key,
            raw.decode(),
        )
        return web.Response(body=b'{"ok":true}', content_type="application/json")

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.cleanup_ctx.append(pool_ctx)
    app.add_routes([web.post("/api/v1/forms/{form}", submit), web.get("/healthz", healthz)])
    return app


async def create_baseline_table(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            f"CREATE TABLE {BASELINE_TABLE} (idem_key text PRIMARY KEY, lead jsonb NOT NULL,"
            " received_at timestamptz NOT NULL DEFAULT now())"
        )
    finally:
        await conn.close()


# ---- the benchmark ---------------------------------------------------------------------------


@dataclass
class Run:
    side: str
    load: LoadResult
    stored: int
    server_cpu_s: float
    pg_cpu_s: float

    def line(self) -> str:
        per_k = 1000 / max(self.load.requests, 1)
        return (
            f"{self.side:<8} {self.load.rps:9.0f} req/s  p50 {self.load.p50_ms:7.2f} ms  "
            f"p99 {self.load.p99_ms:7.2f} ms  errors {self.load.errors:>5}  "
            f"stored {self.stored:>7}  cpu/1k req: server {self.server_cpu_s * per_k:5.2f} s, "
            f"postgres {self.pg_cpu_s * per_k:5.2f} s"
        )


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        servers: dict[str, Server],
        dsns: dict[str, str],
        postmaster: int,
    ) -> None:
        self.args = args
        self.postmaster = postmaster
        self.servers = servers
        self.dsns = dsns
        self.tables = {"ours": "submissions", "baseline": BASELINE_TABLE}
        self.runs_per_side = {"ours": 0, "baseline": 0}

    async def run(self, side: str, seconds: float) -> Run:
        server = self.servers[side]
        before_rows = await count_rows(self.dsns[side], self.tables[side])
        cpu0, pg0 = cpu_seconds(server.pid), postgres_cpu_seconds(self.postmaster)
        run_no = self.runs_per_side[side]
        self.runs_per_side[side] += 1
        load = await run_load(
            server.url,
            FORM_PATH,
            connections=self.args.connections,
            seconds=seconds,
            threads=self.args.threads,
            run=run_no,
            tool=self.args.tool,
        )
        cpu1, pg1 = cpu_seconds(server.pid), postgres_cpu_seconds(self.postmaster)
        stored = await count_rows(self.dsns[side], self.tables[side]) - before_rows
        return Run(side, load, stored, cpu1 - cpu0, pg1 - pg0)

    async def rss_after(self, submissions: int) -> tuple[int, dict[str, int]]:
        """Top our database up to `submissions` stored submissions; then our memory."""
        rate = 1000.0
        while (n := await count_rows(self.dsns["ours"], "submissions")) < submissions:
            # a run long enough for what is missing at the rate seen last, 5 to 120 s
            seconds = max(5.0, min(120.0, (submissions - n) / rate + 1))
            r = await self.run("ours", seconds)
            rate = max(r.load.rps, 50.0)
            print(f"  rss top-up: {r.line()}", flush=True)
        return n, memory_kb(self.servers["ours"].pid)


def summary(runs: list[Run]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for side in ("ours", "baseline"):
        mine = [r for r in runs if r.side == side]
        out[side] = {
            "rps": statistics.median(r.load.rps for r in mine),
            "p50_ms": statistics.median(r.load.p50_ms for r in mine),
            "p99_ms": statistics.median(r.load.p99_ms for r in mine),
            "errors": sum(r.load.errors for r in mine),
            "server_cpu_ms_per_req": statistics.median(
                r.server_cpu_s * 1000 / max(r.load.requests, 1) for r in mine
            ),
            "pg_cpu_ms_per_req": statistics.median(
                r.pg_cpu_s * 1000 / max(r.load.requests, 1) for r in mine
            ),
        }
    out["ratio"] = out["ours"]["rps"] / out["baseline"]["rps"]
    out["pair_ratios"] = [
        a.load.rps / b.load.rps
        for a, b in zip(runs[0::2], runs[1::2], strict=True)
        if a.side == "ours" and b.side == "baseline"
    ]
    return out


async def start_servers(
    args: argparse.Namespace, tmp: Path, pg_dsn: str
) -> tuple[dict[str, Server], dict[str, str]]:
    ours_dsn = await create_database(pg_dsn, "bench_ours", migrated=True)
    base_dsn = await create_database(pg_dsn, "bench_baseline", migrated=False)
    await create_baseline_table(base_dsn)
    ours_port, base_port = free_port(), free_port()
    ours_env = clean_env(
        DATABASE_URL=ours_dsn,
        CRM="amocrm",
        # --no-worker sends nothing; with --worker the CRM is not there and jobs just retry
        AMOCRM_BASE_URL="http://127.0.0.1:9",
        AMOCRM_ACCESS_TOKEN="bench",
        CRM_RELAY_DATA_DIR=str(tmp / "var"),
        HOST="127.0.0.1",
        PORT=str(ours_port),
        LOG_LEVEL=args.log_level,
        LOG_FORMAT=args.log_format,
    )
    roles = [] if args.worker else ["--no-worker"]
    servers = {
        "ours": Server(
            "ours",
            [sys.executable, "-m", "service", "serve", *roles],
            ours_env,
            ours_port,
            "/readyz",
            tmp / "ours.log",
        ),
        "baseline": Server(
            "baseline",
            [sys.executable, "-m", "bench.intake", "serve-baseline", "--dsn", base_dsn,
             "--port", str(base_port), "--pool", str(POOL_SIZE)],
            clean_env(),
            base_port,
            "/healthz",
            tmp / "baseline.log",
        ),
    }  # fmt: skip
    return servers, {"ours": ours_dsn, "baseline": base_dsn}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    facts = machine_facts()
    print(f"machine: {facts}", flush=True)
    print(
        f"load: {args.tool}, {args.connections} connections, {args.threads} threads, "
        f"{args.seconds:g} s per run, {args.rounds} rounds (ours, baseline alternating); "
        f"ours: serve {'with worker' if args.worker else '--no-worker'}, pool {POOL_SIZE}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="crb-") as tmpdir, embedded_postgres() as pg:
        tmp = Path(tmpdir)
        print(f"postgres: {await durability(pg.dsn)}", flush=True)
        servers, dsns = await start_servers(args, tmp, pg.dsn)
        try:
            for s in servers.values():
                await s.start()
            b = Bench(args, servers, dsns, pg.postmaster_pid)
            for side in ("ours", "baseline"):
                warm = await b.run(side, args.warmup)
                print(f"warm-up  {warm.line()}", flush=True)
            runs: list[Run] = []
            for i in range(args.rounds):
                for side in ("ours", "baseline"):
                    r = await b.run(side, args.seconds)
                    runs.append(r)
                    print(f"round {i + 1}  {r.line()}", flush=True)
            result = summary(runs)
            if args.rss_submissions:
                n, mem = await b.rss_after(args.rss_submissions)
                result["rss"] = {"submissions": n, **mem}
            for s in servers.values():
                if s.proc is not None and s.proc.poll() is not None:
                    raise RuntimeError(f"{s.name} died during the run:\n{s.tail()}")
        finally:
            for s in servers.values():
                s.stop()
    result["facts"] = facts
    return result


def report(result: dict[str, Any]) -> None:
    o, b = result["ours"], result["baseline"]
    print("\nmedians:")
    for name, d in (("ours", o), ("baseline", b)):
        print(
            f"  {name:<8} {d['rps']:9.0f} req/s  p50 {d['p50_ms']:6.2f} ms  p99 {d['p99_ms']:6.2f}"
            f" ms  errors {d['errors']}  cpu/req: server {d['server_cpu_ms_per_req']:.3f} ms,"
            f" postgres {d['pg_cpu_ms_per_req']:.3f} ms"
        )
    pairs = ", ".join(f"{x:.2f}" for x in result["pair_ratios"])
    print(f"  ours / baseline throughput: {result['ratio']:.2f}  (per round: {pairs})")
    ok_ratio = result["ratio"] >= 1.0 and o["p99_ms"] <= 50
    print(f"  target ratio >= 1.0 with our p99 <= 50 ms: {'met' if ok_ratio else 'NOT met'}")
    if "rss" in result:
        rss = result["rss"]
        mb = rss["VmRSS"] / 1024
        print(
            f"  our RSS after {rss['submissions']} submissions: {mb:.1f} MiB "
            f"(peak {rss['VmHWM'] / 1024:.1f} MiB); target <= 200 MB: "
            f"{'met' if mb * 1.048576 <= 200 else 'NOT met'}"
        )
    print("RESULT-JSON " + orjson.dumps(result).decode())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.intake", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=2, choices=range(1, MAX_THREADS + 1))
    p.add_argument("--rss-submissions", type=int, default=100_000, help="0: skip")
    p.add_argument("--tool", choices=["wrk", "aiohttp"], default="wrk" if have_wrk() else "aiohttp")
    p.add_argument("--worker", action="store_true", help="run our worker too (default: off)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    sub = p.add_subparsers(dest="command")
    base = sub.add_parser("serve-baseline", help="(internal) run the baseline server")
    base.add_argument("--dsn", required=True)
    base.add_argument("--port", type=int, required=True)
    base.add_argument("--pool", type=int, default=POOL_SIZE)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "serve-baseline":
        app = baseline_app(args.dsn, args.pool)
        web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)
        return 0
    report(asyncio.run(bench(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
