"""Three service processes, one database, one Redis, one CRM account (issue 6).

Real processes (`python -m service serve`), a real redis-server (tests/redis_fixtures.py), the
session's embedded PostgreSQL, the amoCRM simulator on a real port with the same limit as the
processes. 1,000 submissions for 100 people, repeats included, go to random processes; the CRM
must end with one contact and one lead per person and never see more than the limit in any
sliding second: with Redis; with Redis killed and restarted mid-run while a process is SIGKILLed
holding person locks and leases; and without Redis at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import asyncpg
import orjson

from service.db.store import Pending
from service.intake.locks import PERSON_LOCK_SPACE, person_lock_key
from service.model import Lead
from service.simulators.amocrm.server import AmoCrmSimulator, SimulatorConfig
from tests.conftest import wait_for
from tests.pgbouncer_fixtures import DatabaseUrls

if TYPE_CHECKING:  # imported by pytest as a plugin (below), before this module
    from tests.redis_fixtures import RedisServer

pytest_plugins = ("tests.redis_fixtures",)

REPO = Path(__file__).resolve().parents[2]
LIMIT = 20  # CRM_RATE_LIMIT of every process, and the simulator's own limit
PROCESSES = 3
PEOPLE = 100
REQUESTS = 1000
CLIENTS = 20
READY_TIMEOUT_S = 30.0
DELIVERY_TIMEOUT_S = 60.0
# what the service reads from the environment: nothing of the outer environment may leak in
SERVICE_VARS = (
    "DATABASE_", "REDIS_", "CRM", "AMOCRM_", "BITRIX24_", "IDEMPOTENCY_", "ADMIN_TOKEN",
    "WEBHOOK_", "TELEGRAM_", "ALERT_", "LOG_", "DEFAULT_PHONE", "HOST", "PORT", "MAX_BODY",
    "RETRY_", "WORKER_", "LEASE_", "CIRCUIT_", "OPS_PORT", "FORWARD_", "OAUTH_", "PUBLIC_BASE_URL",
)  # fmt: skip


class Relay:
    """One `python -m service serve` process with its own port, data directory and log."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"

    async def wait_ready(self, http: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.alive(), f"service exited during start-up:\n{self.log()[-3000:]}"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(2)) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise AssertionError(f"not ready within {READY_TIMEOUT_S} s:\n{self.log()[-3000:]}")


def workload(seed: int) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """100 people: each sends a first form (phone); 30 send a second one that adds their email.
    1,000 requests: every submission at least once, the rest repeats (same Idempotency-Key)."""
    distinct: dict[str, dict[str, Any]] = {}
    for i in range(PEOPLE):
        phone = f"+7707{i:07d}"
        distinct[f"p{i}-a"] = {"name": f"Person {i}", "phone": phone, "comment": "first"}
        if i % 10 < 3:
            distinct[f"p{i}-b"] = {
                "name": f"Person {i}",
                "phone": phone,
                "email": f"person{i}@example.kz",
                "comment": "second",
            }
    rnd = random.Random(seed)
    keys = list(distinct) + rnd.choices(list(distinct), k=REQUESTS - len(distinct))
    rnd.shuffle(keys)
    return distinct, keys


@dataclass
class Run:
    """A cluster under test and what the clients were told."""

    relays: list[Relay]
    http: aiohttp.ClientSession
    acked: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    answered: int = 0
    retries: int = 0

    async def submit(self, key: str, body: dict[str, Any], rnd: random.Random) -> None:
        """POST to a random live process until one answers 200; remember the id."""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            relay = rnd.choice([r for r in self.relays if r.alive()])
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with self.http.post(
                    f"{relay.url}/api/v1/forms/course",
                    json=body,
                    headers={"Idempotency-Key": key},
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as r:
                    if r.status == 200:
                        answer = await r.json(content_type=None)
                        assert answer["ok"] is True, answer
                        self.acked[key].add(answer["id"])
                        self.answered += 1
                        return
            self.retries += 1
            await asyncio.sleep(0.05)
        raise AssertionError(f"{key}: no 200 within 30 s")

    async def send(self, distinct: dict[str, dict[str, Any]], keys: list[str]) -> None:
        queue = list(reversed(keys))

        async def client(n: int) -> None:
            rnd = random.Random(n)
            while queue:
                key = queue.pop()
                await self.submit(key, distinct[key], rnd)

        await asyncio.gather(*(client(n) for n in range(CLIENTS)))


def relay_env(
    urls: DatabaseUrls, sim_url: str, data_dir: Path, redis_url: str | None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_VARS)}
    env.update(urls.env())
    env.update(
        CRM="amocrm",
        AMOCRM_BASE_URL=sim_url,
        AMOCRM_ACCESS_TOKEN=SimulatorConfig().access_token,
        CRM_RATE_LIMIT=str(LIMIT),
        CRM_TIMEOUT_S="5",
        HOST="127.0.0.1",
        CRM_RELAY_DATA_DIR=str(data_dir),
        LEASE_S="3",
        RETRY_BASE_S="0.2",
        RETRY_MAX_S="2",
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    if redis_url:
        env["REDIS_URL"] = redis_url
    return env


Chaos = Callable[[Run], Awaitable[None]]


async def run_cluster(
    db_dsn: str,
    simulator: tuple[AmoCrmSimulator, str],
    tmp_path: Path,
    redis_url: str | None,
    chaos: Chaos | None = None,
    urls: DatabaseUrls | None = None,
) -> Run:
    """Start the processes, send the workload (with `chaos` alongside), wait for delivery, and
    check the outcome every scenario must have. `urls`: how the processes reach the database
    (default: `db_dsn`, directly); the checks read it directly either way."""
    from tests.redis_fixtures import free_port

    sim, sim_url = simulator
    sim.config.rate_limit = LIMIT
    sim.config.block_after = 100_000  # count violations, never block: we want them all seen
    relays = []
    for n in range(PROCESSES):
        env = relay_env(urls or DatabaseUrls(db_dsn), sim_url, tmp_path / f"var{n}", redis_url)
        env["PORT"] = str(free_port())
        relays.append(Relay(env, int(env["PORT"]), tmp_path / f"relay{n}.log"))
    distinct, keys = workload(seed=6)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS + 10)) as http:
        run = Run(relays, http)
        try:
            for relay in relays:
                relay.start()
            await asyncio.gather(*(relay.wait_ready(http) for relay in relays))
            t0 = time.monotonic()
            await asyncio.gather(run.send(distinct, keys), *([chaos(run)] if chaos else []))
            t_intake = time.monotonic() - t0
            await wait_for(lambda: delivered(db_dsn, len(distinct)), DELIVERY_TIMEOUT_S, 0.25)
            t_done = time.monotonic() - t0
        except BaseException:
            for n, relay in enumerate(relays):
                print(f"--- relay {n} log tail ---\n{relay.log()[-3000:]}", file=sys.stderr)
            raise
        finally:
            await asyncio.gather(*(asyncio.to_thread(r.kill) for r in relays))
    report = sim.report()
    print(
        f"intake {t_intake:.1f} s, delivered {t_done:.1f} s, client retries {run.retries}, "
        f"CRM requests {report['requests_total']}, max in any second "
        f"{report['max_in_any_second']}, statuses {report['answers_by_status']}"
    )
    check_outcome(run, distinct, report)
    return run


async def delivered(dsn: str, n: int) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        done = await conn.fetchval("SELECT count(*) FROM submissions WHERE state = 'delivered'")
    finally:
        await conn.close()
    return bool(done == n)


def check_outcome(run: Run, distinct: dict[str, Any], report: dict[str, Any]) -> None:
    # every repeat, whichever process it reached, was answered with the one original id
    assert set(run.acked) == set(distinct)
    several = {k: ids for k, ids in run.acked.items() if len(ids) != 1}
    assert not several, f"keys answered with several ids: {several}"
    # the CRM: one contact and one lead per person, never over the limit
    assert report["violations"] == 0, report["answers_by_status"]
    assert report["max_in_any_second"] <= LIMIT
    dups = report["duplicates"]
    assert dups["contacts_sharing_identity"] == [], dups
    assert dups["contacts_with_several_open_leads"] == [], dups
    assert len(report["contacts"]) == PEOPLE, len(report["contacts"])
    assert len(report["leads"]) == PEOPLE, len(report["leads"])
    assert all(len(c["_embedded"]["leads"]) == 1 for c in report["contacts"])


# ---------------------------------------------------------------------------------------------


async def test_three_processes_with_redis_share_one_limit_and_never_duplicate(
    db_dsn: str,
    simulator: tuple[AmoCrmSimulator, str],
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    run = await run_cluster(db_dsn, simulator, tmp_path, redis_server.url)
    for relay in run.relays:
        assert "redis unavailable" not in relay.log(), relay.log()[-2000:]


async def test_redis_killed_and_a_process_sigkilled_mid_run_change_nothing(
    db_dsn: str,
    simulator: tuple[AmoCrmSimulator, str],
    tmp_path: Path,
    redis_server: RedisServer,
) -> None:
    """Redis is SIGKILLed after 300 answers and started again (empty) 2.5 s later; process 0 is
    SIGKILLed the first time it holds person locks (intake) and person leases (delivery) at once.
    Its leases lapse and the others deliver its people; nothing else changes."""
    victim: dict[str, Any] = {}

    async def kill_redis(run: Run) -> None:
        await wait_for(lambda: answered_at_least(run, 300), timeout=60, every=0.01)
        await asyncio.to_thread(redis_server.kill)
        await asyncio.sleep(2.5)
        await asyncio.to_thread(redis_server.start)

    async def kill_a_busy_process(run: Run) -> None:
        relay = run.relays[0]
        conn = await asyncpg.connect(db_dsn)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                held = await conn.fetchrow(HELD_BY, f"%:{relay.pid}:%", PERSON_LOCK_SPACE)
                if held["leases"] and held["locks"]:
                    await asyncio.to_thread(relay.kill)
                    victim.update(held)
                    return
                await asyncio.sleep(0.002)
            raise AssertionError("the process never held person locks and leases at once")
        finally:
            await conn.close()

    async def chaos(run: Run) -> None:
        await asyncio.gather(kill_redis(run), kill_a_busy_process(run))

    run = await run_cluster(db_dsn, simulator, tmp_path, redis_server.url, chaos)
    for relay in run.relays[1:]:  # the survivors noticed, fell back, and came back
        text = relay.log()
        assert "redis unavailable" in text and "redis available" in text, text[-2000:]
    assert victim["locks"] >= 1 and victim["leases"] >= 1, victim
    conn = await asyncpg.connect(db_dsn)
    try:
        states = await conn.fetch(
            "SELECT DISTINCT state FROM jobs WHERE person_id = ANY($1::bigint[])",
            victim["leased_people"],
        )
    finally:
        await conn.close()
    assert [r["state"] for r in states] == ["done"]  # its people were delivered by the others


async def answered_at_least(run: Run, n: int) -> bool:
    return run.answered >= n


HELD_BY = """
SELECT (SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
         WHERE l.locktype = 'advisory' AND l.classid = $2::int::oid AND l.objsubid = 2
           AND l.granted AND a.application_name LIKE $1) AS locks,
       (SELECT count(*) FROM people WHERE lease_owner LIKE $1 AND lease_until > now()) AS leases,
       (SELECT array_agg(id) FROM people
         WHERE lease_owner LIKE $1 AND lease_until > now()) AS leased_people
"""


async def test_without_redis_processes_share_the_limit_through_postgres(
    db_dsn: str,
    database_urls: DatabaseUrls,
    simulator: tuple[AmoCrmSimulator, str],
    tmp_path: Path,
) -> None:
    """Directly, then through PgBouncer in transaction mode (`database_urls`): the heartbeats,
    the person locks and the leases all run through the pooler then."""
    seen: list[tuple[int, str]] = []

    async def watch_heartbeats(run: Run) -> None:
        """The three count each other (and so each sends a third of the limit)."""
        conn = await asyncpg.connect(db_dsn)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and seen[-1:] != [(PROCESSES, "local-share")]:
                row = await conn.fetchrow(
                    "SELECT count(*) AS n, min(mode) AS low, max(mode) AS high FROM processes"
                    " WHERE sends AND beat_at > now() - interval '7 seconds'"
                )
                seen.append((row["n"], row["low"] if row["low"] == row["high"] else "mixed"))
                await asyncio.sleep(0.5)
        finally:
            await conn.close()

    await run_cluster(db_dsn, simulator, tmp_path, None, watch_heartbeats, database_urls)
    assert seen[-1] == (PROCESSES, "local-share"), seen


def _item(key: str, phone: str | None, email: str | None) -> dict[str, Any]:
    lead = Lead(form="f", phone=phone, email=email, name=None)
    return Pending(uuid.uuid4(), key, lead, dt.datetime.now(dt.UTC)).to_json()


async def _ingest(conn: asyncpg.Connection, *items: dict[str, Any]) -> None:
    await conn.fetch("SELECT * FROM relay_ingest($1::jsonb)", orjson.dumps(items).decode())


async def test_person_lock_keys_agree_between_python_and_sql(db: asyncpg.Connection) -> None:
    for identity in ("phone:+77010000001", "email:ivan.petrov@почта.рф", "x", ""):
        sql = await db.fetchval("SELECT relay_person_lock_key($1)", identity)
        assert sql == person_lock_key(identity), identity


async def test_two_processes_writing_one_person_resolve_it_once(db_dsn: str) -> None:
    """Process one writes {phone P, email E}; process two, meanwhile, {E, phone P2}. Interleaved
    without a lock, P2 would get a person of its own while E (and the submission) stay with P's,
    and the next lead from P2 would make a second contact. The ingest transaction's person lock
    makes the second write wait for the first, then see E's person."""
    one, two = await asyncpg.connect(db_dsn), await asyncpg.connect(db_dsn)
    p, p2, e = "+77010000101", "+77010000102", "both@example.kz"
    try:
        first = one.transaction()
        await first.start()
        await _ingest(one, _item("k1", p, e))
        second = asyncio.create_task(_ingest(two, _item("k2", p2, e)))
        waiting = """SELECT count(*) FROM pg_locks
                      WHERE locktype = 'advisory' AND classid = $1::int::oid AND NOT granted"""
        await wait_for(lambda: _fetch_positive(one, waiting, PERSON_LOCK_SPACE), timeout=10)
        assert not second.done()
        await first.commit()
        await asyncio.wait_for(second, 10)
        rows = await one.fetch(
            "SELECT identity, person_id FROM identities WHERE identity = ANY($1::text[])",
            [f"phone:{p}", f"phone:{p2}", f"email:{e}"],
        )
        assert len(rows) == 3 and len({r["person_id"] for r in rows}) == 1, rows
        assert await one.fetchval("SELECT count(DISTINCT person_id) FROM submissions") == 1
    finally:
        await one.close()
        await two.close()


async def _fetch_positive(conn: asyncpg.Connection, query: str, *args: Any) -> bool:
    return bool(await conn.fetchval(query, *args))
