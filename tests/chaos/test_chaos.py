"""Chaos: everything that went wrong in the incident reports, at once, against the real process.

`python -m service serve` as a subprocess (SIGKILLed and restarted), its own PostgreSQL (stopped
and started), a CRM simulator on a real port (amoCRM, then Bitrix24: the test is parametrised by
kind) answering 20% of calls with a 5xx and hanging past our timeout on 5% *after* doing the
work, a rate-limit storm (amoCRM: 429; Bitrix24: 503 QUERY_LIMIT_EXCEEDED) and an expiry of every
access token (OAuth refresh). Meanwhile clients submit one new person each, re-sending the same
body and Idempotency-Key until they get a 200.

The promise checked at the end, the same for both CRMs: every acknowledged submission is stored
and delivered, its person is exactly one contact with exactly one lead (deal) in the CRM, the
CRM's limit was never exceeded (the simulator's `violations`: the scripted storm is not ours),
and nothing is dead-lettered unless the CRM rejected it permanently.

Sizes: `ChaosPlan` in conftest.py (`CHAOS_LONG=1` for the long form); what differs by CRM:
crms.py.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.chaos.conftest import ChaosPlan, chaos_plan
from tests.chaos.crms import ChaosCrm, Simulator, chaos_crm
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
STORM_EXTENSIONS, STORM_EXTENSION_S = 60, 0.5  # a storm nobody met goes on, 30 s at most


def service_env(pg: StoppablePostgres, crm: ChaosCrm, data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_VAR_PREFIXES)}
    env.update(crm.env())
    env.update(
        DATABASE_URL=pg.dsn,
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
        crm: ChaosCrm,
        http: aiohttp.ClientSession,
        acked: dict[int, str],
    ) -> None:
        self.plan, self.svc, self.pg, self.crm, self.http, self.acked = (
            plan,
            svc,
            pg,
            crm,
            http,
            acked,
        )
        self.t0 = time.monotonic()
        self.log: list[str] = []
        self.initial_refresh_token = crm.refresh_token()

    def schedule(self) -> list[tuple[float, str, Callable[[], Awaitable[None]]]]:
        events = [
            (k / (self.plan.kills + 1), "sigkill", self.kill) for k in range(1, self.plan.kills + 1)
        ]
        events += [
            (0.22, "postgres stopped", self.stop_postgres),
            (0.42, f"{self.crm.storm_name} storm", self.storm),
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
        await self._refreshed_since(self.initial_refresh_token)
        self.crm.set_timeout_rate(self.plan.timeout_rate)

    async def _refreshed_since(self, refresh_token: str) -> None:
        async def refreshed() -> bool:
            return self.crm.refresh_token() != refresh_token

        await wait_for(refreshed, timeout=60)

    async def kill(self) -> None:
        await self.svc.restart(self.http)  # SIGKILL, start, wait until ready

    async def stop_postgres(self) -> None:
        await asyncio.to_thread(self.pg.stop)
        await asyncio.sleep(self.plan.pg_down_s)
        await asyncio.to_thread(self.pg.start)

    async def storm(self) -> None:
        """Every API call refused as over the limit for storm_s (the CRM's doing, not ours).

        A storm that meets no call proves nothing (it may fall into a lull: the process just
        restarted, its leases not yet lapsed), so it goes on until it has refused one."""
        await self.crm.storm(self.plan.storm_s)
        for _ in range(STORM_EXTENSIONS):
            if self.crm.storm_refusals() > 0:
                return
            await self.crm.storm(STORM_EXTENSION_S)

    async def expire_tokens(self) -> None:
        """Every access token dies; the service must refresh (once) and go on.

        Refresh tokens are single-use (amoCRM and Bitrix24 alike): a refresh whose answer is
        lost has spent the token for good (the operator must re-authorise, in production as
        here). So while the refresh is due, answers are not lost; 5xx (nothing done) stay on."""
        self.crm.set_timeout_rate(0.0)
        before = self.crm.refresh_token()
        self.crm.expire_tokens()
        await self._refreshed_since(before)
        self.crm.set_timeout_rate(self.plan.timeout_rate)


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


async def print_progress(pg: StoppablePostgres, crm: ChaosCrm, t0: float) -> None:
    """Where a run that failed had got to (the database may be down: then say so)."""
    try:
        states = Counter((await submission_states(pg.dsn)).values())
    except (OSError, asyncpg.PostgresError) as exc:
        states = Counter({f"database unreachable: {exc.__class__.__name__}": 1})
    report = crm.report()
    print(
        f"after {time.monotonic() - t0:.0f} s: submissions {dict(states)}; CRM requests "
        f"{report['requests_total']} {report['answers_by_status']}, leads {len(report['leads'])}",
        file=sys.stderr,
    )


@dataclass
class Outcome:
    """What a run left behind, read once everything was delivered."""

    acked: dict[int, str]  # person → the submission id their 200 carried
    states: dict[str, str]  # every stored submission's id → state
    dead: list[str]  # last error of every dead job
    report: dict[str, Any]  # the simulator's
    starts: int  # how often the service process was started
    client: dict[str, int]  # what the clients saw


def assert_promises_kept(plan: ChaosPlan, crm: ChaosCrm, run: Outcome) -> None:
    """The final check, the same for every CRM: stored, delivered once, never over the limit,
    dead letters only for permanent errors, and the chaos really happened."""
    assert len(run.acked) == plan.people
    missing = {i: sid for i, sid in run.acked.items() if sid not in run.states}
    assert not missing, f"acknowledged but not stored: {missing}"
    assert len(run.states) == plan.people, len(run.states)
    assert set(run.states.values()) == {"delivered"}, Counter(run.states.values())
    assert all(e.startswith("CrmPermanent") for e in run.dead), run.dead
    statuses = run.report["answers_by_status"]
    assert run.report["violations"] == 0, statuses
    one_contact_one_lead_each(run.report, plan.people)
    # the chaos really happened
    assert run.starts == plan.kills + 1
    assert crm.storm_refusals() >= 1 and statuses.get("401", 0) >= 1, statuses
    assert sum(statuses.get(s, 0) for s in ("500", "502", "503", "504")) > 0, statuses
    assert run.client["spooled_answers"] > 0 or run.client["connection_errors"] > 0, run.client


@pytest.mark.timeout(chaos_plan().timeout_s)
async def test_chaos_every_acknowledged_lead_reaches_the_crm_exactly_once(
    own_pg: StoppablePostgres,
    simulator: tuple[Simulator, str],
    tmp_path: Path,
    plan: ChaosPlan,
) -> None:
    crm = chaos_crm(*simulator)
    crm.prepare(plan.error_rate)
    data = tmp_path / "var"  # the spool lives here and survives every restart
    env = service_env(own_pg, crm, data)
    svc = ServiceProcess(env, int(env["PORT"]), tmp_path / "service.log")
    acked: dict[int, str] = {}
    stats: dict[str, int] = defaultdict(int)
    t0 = time.monotonic()
    chaos_log: list[str] = []
    try:
        connector = aiohttp.TCPConnector(limit=CLIENTS + 5)
        async with aiohttp.ClientSession(connector=connector) as http:
            chaos = Chaos(plan, svc, own_pg, crm, http, acked)  # before the first refresh
            chaos_log = chaos.log
            svc.start()
            await svc.wait_ready(http)
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
            crm.faults_off()
            await asyncio.sleep(1.0)
            states = await submission_states(own_pg.dsn)
            dead = await dead_letters(own_pg.dsn)
    except BaseException:
        print(f"--- service log tail ({svc.log_path}) ---\n{svc.tail(80)}", file=sys.stderr)
        print(f"chaos={chaos_log} stats={dict(stats)} acked={len(acked)}", file=sys.stderr)
        await print_progress(own_pg, crm, t0)
        raise
    finally:
        await asyncio.to_thread(svc.kill)

    report = crm.report()
    print(
        f"\nchaos {crm.kind} {plan}: intake {t_intake:.1f} s, all delivered {t_delivered:.1f} s; "
        f"events {chaos_log}; starts {svc.starts}; client {dict(stats)}; "
        f"CRM requests {report['requests_total']} {report['answers_by_status']}; "
        f"{crm.limit_figures(report)}; violations {report['violations']}; "
        f"contacts {len(report['contacts'])}, leads {len(report['leads'])}; dead {len(dead)}"
    )
    assert_promises_kept(plan, crm, Outcome(acked, states, dead, report, svc.starts, stats))
