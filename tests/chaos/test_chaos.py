"""Chaos: everything that went wrong in the incident reports, at once, against the real process.

`python -m service serve` as a subprocess (SIGKILLed and restarted), its own PostgreSQL (stopped
and started), the amoCRM simulator on a real port answering 20% of calls with a 5xx and hanging
past our timeout on 5% *after* doing the work, a scripted 429 storm and an expiry of every
access token (OAuth refresh). Meanwhile clients submit one new person each, re-sending the same
body and Idempotency-Key until they get a 200.

The promise checked at the end: every acknowledged submission is stored and delivered, its person
is exactly one contact with exactly one lead in the CRM, the CRM's limit was never exceeded (the
simulator's `violations`: scripted 429s are not violations), and nothing is dead-lettered unless
the CRM rejected it permanently.

Sizes: `ChaosPlan` in conftest.py (`CHAOS_LONG=1` for the long form).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from service.crm.simulator import AmoCrmSimulator, SimulatorConfig
from tests.chaos.conftest import ChaosPlan, FastContactSearch, chaos_plan
from tests.conftest import wait_for
from tests.integration.conftest import StoppablePostgres
from tests.integration.test_resilience import (
    SERVICE_VAR_PREFIXES,
    ServiceProcess,
    free_port,
    no_duplicates,
    person,
    phones_of,
    spool_files,
    submission_states,
    submit_until_acknowledged,
)

CLIENTS = 20
CRM_LIMIT = 100  # the simulated account's limit (requests in any sliding second)
OUR_RATE = 80  # CRM_RATE_LIMIT: below the account's limit, as an operator would set it
HANG_S = 2.0  # a "timeout" answer hangs this long; our CRM_TIMEOUT_S is 1


def service_env(
    pg: StoppablePostgres, sim: AmoCrmSimulator, sim_url: str, data: Path
) -> dict[str, str]:
    cfg = sim.config
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_VAR_PREFIXES)}
    env.update(
        DATABASE_URL=pg.dsn,
        CRM="amocrm",
        AMOCRM_BASE_URL=sim_url,
        AMOCRM_CLIENT_ID=cfg.client_id,
        AMOCRM_CLIENT_SECRET=cfg.client_secret,
        AMOCRM_REFRESH_TOKEN=cfg.refresh_token,
        AMOCRM_REDIRECT_URI="https://relay.example/oauth",
        CRM_RATE_LIMIT=str(OUR_RATE),
        CRM_TIMEOUT_S="1",
        RETRY_BASE_S="0.05",
        RETRY_MAX_S="0.5",
        # 5xx and timeouts are passing failures: with 25% of calls failing, 50 attempts in a
        # row fail with probability 0.25^50, so a dead letter here would be a real bug
        RETRY_MAX_ATTEMPTS="50",
        CRM_PAUSE_BASE_S="0.2",
        CRM_PAUSE_MAX_S="1",
        CIRCUIT_COOLDOWN_S="1",
        LEASE_S="3",
        HOST="127.0.0.1",
        PORT=str(free_port()),
        CRM_RELAY_DATA_DIR=str(data),
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )  # fmt: skip
    return env


class Chaos:
    """The scripted events, fired one after another as the acknowledged count passes each
    threshold; `log` says what happened when."""

    def __init__(
        self,
        plan: ChaosPlan,
        svc: ServiceProcess,
        pg: StoppablePostgres,
        sim: AmoCrmSimulator,
        http: aiohttp.ClientSession,
        acked: dict[int, str],
    ) -> None:
        self.plan, self.svc, self.pg, self.sim, self.http, self.acked = (
            plan,
            svc,
            pg,
            sim,
            http,
            acked,
        )
        self.t0 = time.monotonic()
        self.log: list[str] = []

    def schedule(self) -> list[tuple[float, str, Callable[[], Awaitable[None]]]]:
        events = [
            (k / (self.plan.kills + 1), "sigkill", self.kill) for k in range(1, self.plan.kills + 1)
        ]
        events += [
            (0.22, "postgres stopped", self.stop_postgres),
            (0.42, "429 storm", self.storm),
            (0.58, "tokens expired", self.expire_tokens),
        ]
        return sorted(events, key=lambda e: e[0])

    async def run(self) -> None:
        await self.first_token()
        for fraction, name, action in self.schedule():
            threshold = int(fraction * self.plan.people)

            async def reached(n: int = threshold) -> bool:
                return len(self.acked) >= n

            await wait_for(reached, timeout=self.plan.timeout_s, every=0.01)
            started = time.monotonic()
            await action()
            self.log.append(
                f"{name} at {len(self.acked)} acked, t={started - self.t0:.1f} s "
                f"({time.monotonic() - started:.1f} s)"
            )

    async def first_token(self) -> None:
        """Lost answers start once the first OAuth refresh is done (see `expire_tokens`)."""
        initial = SimulatorConfig().refresh_token

        async def refreshed() -> bool:
            return self.sim.tokens.refresh_token != initial

        await wait_for(refreshed, timeout=60)
        self.sim.config.timeout_rate = self.plan.timeout_rate

    async def kill(self) -> None:
        await self.svc.restart(self.http)  # SIGKILL, start, wait until ready

    async def stop_postgres(self) -> None:
        await asyncio.to_thread(self.pg.stop)
        await asyncio.sleep(self.plan.pg_down_s)
        await asyncio.to_thread(self.pg.start)

    async def storm(self) -> None:
        """Every API call answered 429 for storm_s (scripted: not a violation of ours)."""
        self.sim.fail_next("*", "/api/v4/*", 429, count=10**9)
        await asyncio.sleep(self.plan.storm_s)
        self.sim.faults.scripted[:] = [a for a in self.sim.faults.scripted if a.status != 429]

    async def expire_tokens(self) -> None:
        """Every access token dies; the service must refresh (once) and go on.

        amoCRM's refresh tokens are single-use: a refresh whose answer is lost has spent the
        token for good (the operator must re-authorise, in production as here). So while the
        refresh is due, answers are not lost; 5xx (nothing done) stay on."""
        self.sim.config.timeout_rate = 0.0
        before = self.sim.tokens.refresh_token
        self.sim.expire_tokens()

        async def refreshed() -> bool:
            return self.sim.tokens.refresh_token != before

        await wait_for(refreshed, timeout=60)
        self.sim.config.timeout_rate = self.plan.timeout_rate


async def submit_all(
    plan: ChaosPlan,
    svc: ServiceProcess,
    http: aiohttp.ClientSession,
    acked: dict[int, str],
    stats: dict[str, int],
) -> None:
    """CLIENTS clients, paced at plan.submit_rate so that the chaos overlaps the intake."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(plan.people):
        queue.put_nowait(i)
    t0 = time.monotonic()

    async def client() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            await asyncio.sleep(max(0.0, t0 + i / plan.submit_rate - time.monotonic()))
            acked[i] = await submit_until_acknowledged(http, svc.url, i, stats)

    await asyncio.gather(*(client() for _ in range(CLIENTS)))


def one_contact_one_lead_each(report: dict[str, Any], people: int) -> None:
    no_duplicates(report)
    by_phone: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in report["contacts"]:
        for p in phones_of(c):
            by_phone[p].append(c)
    expected = {person(i, prefix="701")["phone"][1:] for i in range(people)}
    assert set(by_phone) == expected, (len(by_phone), len(expected))
    several = {p: [c["id"] for c in cs] for p, cs in by_phone.items() if len(cs) != 1}
    assert not several, f"phones on several contacts: {several}"
    leads = {p: cs[0]["_embedded"]["leads"] for p, cs in by_phone.items()}
    not_one = {p: ls for p, ls in leads.items() if len(ls) != 1}
    assert not not_one, f"contacts without exactly one lead: {not_one}"
    assert len(report["leads"]) == people, len(report["leads"])


async def dead_letters(dsn: str) -> list[str]:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT coalesce(last_error, '') AS e FROM jobs WHERE state = 'dead'"
        )
    finally:
        await conn.close()
    return [r["e"] for r in rows]


async def print_progress(pg: StoppablePostgres, sim: AmoCrmSimulator, t0: float) -> None:
    """Where a run that failed had got to (the database may be down: then say so)."""
    try:
        states = Counter((await submission_states(pg.dsn)).values())
    except (OSError, asyncpg.PostgresError) as exc:
        states = Counter({f"database unreachable: {exc.__class__.__name__}": 1})
    report = sim.report()
    print(
        f"after {time.monotonic() - t0:.0f} s: submissions {dict(states)}; CRM requests "
        f"{report['requests_total']} {report['answers_by_status']}, leads {len(report['leads'])}",
        file=sys.stderr,
    )


@pytest.mark.timeout(chaos_plan().timeout_s)
async def test_chaos_every_acknowledged_lead_reaches_the_crm_exactly_once(
    own_pg: StoppablePostgres,
    simulator: tuple[AmoCrmSimulator, str],
    tmp_path: Path,
    plan: ChaosPlan,
) -> None:
    sim, sim_url = simulator
    FastContactSearch(sim.store)  # the simulator's own search cannot keep up at 5,000 contacts
    sim.config.rate_limit = CRM_LIMIT
    sim.config.error_rate = plan.error_rate
    sim.config.hang_s = HANG_S
    data = tmp_path / "var"  # the spool lives here and survives every restart
    env = service_env(own_pg, sim, sim_url, data)
    svc = ServiceProcess(env, int(env["PORT"]), tmp_path / "service.log")
    acked: dict[int, str] = {}
    stats: dict[str, int] = defaultdict(int)
    t0 = time.monotonic()
    chaos_log: list[str] = []
    try:
        connector = aiohttp.TCPConnector(limit=CLIENTS + 5)
        async with aiohttp.ClientSession(connector=connector) as http:
            svc.start()
            await svc.wait_ready(http)
            chaos = Chaos(plan, svc, own_pg, sim, http, acked)
            chaos_log = chaos.log
            await asyncio.gather(submit_all(plan, svc, http, acked, stats), chaos.run())
            t_intake = time.monotonic() - t0

            async def all_delivered() -> bool:
                if not svc.alive():
                    raise AssertionError(f"service died:\n{svc.tail()}")
                states = await submission_states(own_pg.dsn)
                done = all(states.get(sid) == "delivered" for sid in acked.values())
                return done and not spool_files(data / "spool")

            await wait_for(all_delivered, timeout=plan.deadline_s, every=0.25)
            t_delivered = time.monotonic() - t0
            # faults off; a wrongly repeated delivery would show up now
            sim.config.error_rate = sim.config.timeout_rate = 0.0
            await asyncio.sleep(1.0)
            states = await submission_states(own_pg.dsn)
            dead = await dead_letters(own_pg.dsn)
    except BaseException:
        print(f"--- service log tail ({svc.log_path}) ---\n{svc.tail(80)}", file=sys.stderr)
        print(f"chaos={chaos_log} stats={dict(stats)} acked={len(acked)}", file=sys.stderr)
        await print_progress(own_pg, sim, t0)
        raise
    finally:
        await asyncio.to_thread(svc.kill)

    report = sim.report()
    statuses = report["answers_by_status"]
    print(
        f"\nchaos {plan}: intake {t_intake:.1f} s, all delivered {t_delivered:.1f} s; "
        f"events {chaos_log}; starts {svc.starts}; client {dict(stats)}; "
        f"CRM requests {report['requests_total']} {statuses}; "
        f"max in any second {report['max_in_any_second']}; violations {report['violations']}; "
        f"dead {len(dead)}"
    )
    assert len(acked) == plan.people
    missing = {i: sid for i, sid in acked.items() if sid not in states}
    assert not missing, f"acknowledged but not stored: {missing}"
    assert len(states) == plan.people, len(states)
    assert set(states.values()) == {"delivered"}, Counter(states.values())
    assert all(e.startswith("CrmPermanent") for e in dead), dead
    assert report["violations"] == 0, statuses
    one_contact_one_lead_each(report, plan.people)
    # the chaos really happened
    assert svc.starts == plan.kills + 1
    assert statuses.get("429", 0) >= 1 and statuses.get("401", 0) >= 1, statuses
    assert sum(statuses.get(s, 0) for s in ("500", "502", "503", "504")) > 0, statuses
    assert stats["spooled_answers"] > 0 or stats["connection_errors"] > 0, dict(stats)
