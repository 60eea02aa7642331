"""Resilience end to end: the database goes away mid-run, the process is SIGKILLed mid-run.

Real PostgreSQL (embedded), real HTTP in and out, the amoCRM simulator on a real port. What we
check is the promise of the architecture: an acknowledged submission is never lost, and one
person is one contact with one lead in the CRM, however the run was interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from service.app import WORKER
from service.simulators.amocrm.server import AmoCrmSimulator, SimulatorConfig
from tests.conftest import make_settings, wait_for
from tests.integration.conftest import StartService, StoppablePostgres
from tests.pgbouncer_fixtures import DatabaseUrls

REPO = Path(__file__).resolve().parents[2]


def person(i: int, prefix: str = "705") -> dict[str, Any]:
    """One distinct person: a valid KZ mobile number of their own, and a name."""
    return {"name": f"Person {i}", "phone": f"+7{prefix}{i:07d}", "comment": f"lead {i}"}


def no_duplicates(report: dict[str, Any]) -> None:
    dups = report["duplicates"]
    assert dups["contacts_sharing_identity"] == [], dups
    assert dups["contacts_with_several_open_leads"] == [], dups


def spool_files(spool_dir: Path) -> list[Path]:
    return sorted(spool_dir.glob("spool-*.jsonl")) if spool_dir.exists() else []


async def submission_states(dsn: str) -> dict[str, str]:
    """id → state of every stored submission (a fresh connection: the server may have restarted)."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await conn.fetch("SELECT id::text AS id, state FROM submissions")
    finally:
        await conn.close()
    return {r["id"]: r["state"] for r in rows}


def phones_of(contact: dict[str, Any]) -> set[str]:
    return {
        "".join(ch for ch in str(v.get("value", "")) if ch.isdigit())
        for f in contact.get("custom_fields_values") or []
        if f.get("field_code") == "PHONE"
        for v in f.get("values") or []
    }


# ---------------------------------------------------------------------------------------------
# 1. PostgreSQL stops in the middle of a run
# ---------------------------------------------------------------------------------------------


async def test_postgres_stopped_mid_run_spools_and_delivers_once(
    own_pg: StoppablePostgres,
    simulator: tuple[AmoCrmSimulator, str],
    start_service: StartService,
    tmp_path: Path,
) -> None:
    sim, sim_url = simulator
    settings = make_settings(own_pg.dsn, sim_url, tmp_path / "var")
    svc = await start_service(settings)
    answered: dict[int, str] = {}  # person → the submission id the client was given

    async def send(i: int) -> dict[str, Any]:
        status, answer = await svc.submit("course", person(i), {"Idempotency-Key": f"lead-{i}"})
        assert status == 200, (i, status, answer)
        assert answer["ok"] is True, (i, answer)
        return answer

    # 20 people while the database is up: stored directly, delivery starts at once
    first = await asyncio.gather(*(send(i) for i in range(20)))
    assert not any(a.get("spooled") for a in first), first
    assert not any(a["duplicate"] for a in first), first
    answered.update({i: a["id"] for i, a in enumerate(first)})

    # PostgreSQL goes away (fast shutdown: every session is terminated) while the worker has
    # deliveries in flight: their CRM calls land, their commits cannot
    worker = svc.app[WORKER]

    async def delivering() -> bool:
        return bool(worker.in_flight)

    await wait_for(delivering, timeout=10, every=0.005)
    in_flight = len(worker.in_flight)
    await asyncio.to_thread(own_pg.stop)

    # 30 more people while it is down, in three waves ~0.6 s apart, so that the intake's
    # one-second "database is down, skip it" window lapses and the database is tried again
    spooled: list[dict[str, Any]] = []
    for wave in range(3):
        batch = range(20 + wave * 10, 30 + wave * 10)
        answers = await asyncio.gather(*(send(i) for i in batch))
        spooled.extend(answers)
        answered.update(dict(zip(batch, (a["id"] for a in answers), strict=True)))
        await asyncio.sleep(0.6)
    assert all(a.get("spooled") is True for a in spooled), spooled
    assert not any(a["duplicate"] for a in spooled), spooled
    assert len(set(answered.values())) == 50
    assert spool_files(settings.spool_dir), "spooled submissions must be on disk"

    async with svc.http.get(f"{svc.url}/healthz") as r:
        assert r.status == 200, await r.text()
    async with svc.http.get(f"{svc.url}/readyz") as r:
        assert r.status == 503, await r.text()  # not ready: the database is unreachable

    # repeats of spooled (and of stored) submissions while the database is down
    for i in (20, 25, 33, 41, 49, 3):
        again = await send(i)
        assert again["id"] == answered[i] and again["duplicate"] is True, (i, again)

    # PostgreSQL comes back on the same socket: the DSN the service holds is valid again
    await asyncio.to_thread(own_pg.start)

    # repeats right after it is back (the spool may not be drained yet)
    for i in (21, 33, 48, 7):
        again = await send(i)
        assert again["id"] == answered[i] and again["duplicate"] is True, (i, again)

    async def all_delivered_and_spool_empty() -> bool:
        states = await submission_states(own_pg.dsn)
        delivered = sum(s == "delivered" for s in states.values())
        return delivered == 50 and not spool_files(settings.spool_dir)

    # bounded: deliveries cut off by the stop wait for their lease (5 s) to lapse
    await wait_for(all_delivered_and_spool_empty, timeout=40, every=0.25)

    states = await submission_states(own_pg.dsn)
    assert len(states) == 50, len(states)
    missing = {i: sid for i, sid in answered.items() if sid not in states}
    assert not missing, f"acknowledged submissions not in the database: {missing}"
    assert set(states.values()) == {"delivered"}

    # a restarted service has an empty idempotency window: repeats are answered by the database
    await svc.close()
    svc = await start_service(settings)
    for i in (22, 34, 45, 5):
        again = await send(i)
        assert again["id"] == answered[i] and again["duplicate"] is True, (i, again)
        assert "spooled" not in again, again
    await asyncio.sleep(1.0)  # give a wrongly created job the chance to reach the CRM

    report = sim.report()
    assert len(report["leads"]) == 50, len(report["leads"])
    assert len(report["contacts"]) == 50, len(report["contacts"])
    no_duplicates(report)
    assert report["violations"] == 0
    phones = defaultdict(list)
    for c in report["contacts"]:
        for p in phones_of(c):
            phones[p].append(c["id"])
    assert sorted(phones) == sorted(person(i)["phone"][1:] for i in range(50))
    assert all(len(ids) == 1 for ids in phones.values()), phones
    assert all(len(c["_embedded"]["leads"]) == 1 for c in report["contacts"]), report["contacts"]
    assert len(await submission_states(own_pg.dsn)) == 50
    print(
        f"people in flight at the stop: {in_flight}, CRM requests {report['requests_total']}, "
        f"notes (re-deliveries that found their lead) {len(report['notes'])}"
    )


# ---------------------------------------------------------------------------------------------
# 2. The process is SIGKILLed (three times) while a thousand people submit
# ---------------------------------------------------------------------------------------------

PEOPLE = 1000
POOLED_PEOPLE = 300  # the same run through PgBouncer: the same three kills, in less time
CLIENTS = 20
KILL_AFTER_ACKED = (250, 600)
READY_TIMEOUT_S = 30.0
SUBMIT_DEADLINE_S = 40.0
SUBMIT_MAX_ATTEMPTS = 400


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# what the service reads from the environment: nothing of the outer environment may leak in
SERVICE_VAR_PREFIXES = (
    "DATABASE_", "REDIS_", "CRM", "AMOCRM_", "BITRIX24_", "IDEMPOTENCY_", "ADMIN_TOKEN",
    "WEBHOOK_", "TELEGRAM_", "ALERT_", "LOG_", "DEFAULT_PHONE", "HOST", "PORT", "MAX_BODY",
    "RETRY_", "WORKER_", "LEASE_", "CIRCUIT_", "OPS_PORT", "FORWARD_", "OAUTH_", "PUBLIC_BASE_URL",
)  # fmt: skip


class ServiceProcess:
    """`python -m service serve` as a real process, restartable on the same port and env."""

    def __init__(self, env: dict[str, str], port: int, log_path: Path) -> None:
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log_path, "ab") as log:
            log.write(f"--- start #{self.starts + 1} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL: no shutdown hook runs, in-flight work is cut wherever it is."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    async def wait_ready(self, http: aiohttp.ClientSession) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"service exited during start-up:\n{self.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(
                    f"{self.url}/readyz", timeout=aiohttp.ClientTimeout(total=2)
                ) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
        raise AssertionError(f"service not ready within {READY_TIMEOUT_S} s:\n{self.tail()}")

    async def restart(self, http: aiohttp.ClientSession) -> None:
        await asyncio.to_thread(self.kill)
        self.start()
        await self.wait_ready(http)


async def submit_until_acknowledged(
    http: aiohttp.ClientSession, url: str, i: int, stats: dict[str, int]
) -> str:
    """POST the same body with the same key until a 200 comes back; the submission id."""
    body = person(i, prefix="701")
    headers = {"Idempotency-Key": f"person-{i}"}
    deadline = time.monotonic() + SUBMIT_DEADLINE_S
    for attempt in range(SUBMIT_MAX_ATTEMPTS):
        try:
            async with http.post(
                f"{url}/api/v1/forms/course",
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=10),
            ) as r:
                if r.status == 200:
                    answer = await r.json(content_type=None)
                    assert answer.get("ok") is True, (i, answer)
                    stats["duplicate_answers"] += bool(answer.get("duplicate"))
                    stats["spooled_answers"] += bool(answer.get("spooled"))
                    return str(answer["id"])
                stats["non_200"] += 1
        except (aiohttp.ClientError, TimeoutError, ValueError):
            stats["connection_errors"] += 1
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(min(0.05 * (attempt + 1), 0.25))
    raise AssertionError(f"person {i}: no 200 within {SUBMIT_DEADLINE_S} s / {attempt + 1} tries")


async def submit_everyone_while_killing(
    svc: ServiceProcess,
    http: aiohttp.ClientSession,
    acked: dict[int, str],
    stats: dict[str, int],
    kills: list[tuple[str, int]],
    people: int = PEOPLE,
) -> None:
    """`people` submissions from CLIENTS concurrent clients; SIGKILL + restart at each threshold
    (KILL_AFTER_ACKED, scaled to `people`)."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(people):
        queue.put_nowait(i)

    async def client() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            acked[i] = await submit_until_acknowledged(http, svc.url, i, stats)

    async def chaos() -> None:
        for threshold in (n * people // PEOPLE for n in KILL_AFTER_ACKED):

            async def reached(n: int = threshold) -> bool:
                return len(acked) >= n

            await wait_for(reached, timeout=60, every=0.01)
            kills.append(("intake", len(acked)))
            await svc.restart(http)

    tasks = [asyncio.create_task(client()) for _ in range(CLIENTS)]
    tasks.append(asyncio.create_task(chaos()))
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), 90)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def delivered_count(dsn: str) -> int:
    return sum(s == "delivered" for s in (await submission_states(dsn)).values())


def assert_one_contact_and_one_lead_per_person(
    report: dict[str, Any], people: int = PEOPLE
) -> None:
    assert report["violations"] == 0, report["answers_by_status"]
    no_duplicates(report)
    assert len(report["leads"]) == people, len(report["leads"])
    contacts_by_phone: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in report["contacts"]:
        for p in phones_of(c):
            contacts_by_phone[p].append(c)
    expected = {person(i, prefix="701")["phone"][1:] for i in range(people)}
    assert set(contacts_by_phone) == expected
    several = {p: [c["id"] for c in cs] for p, cs in contacts_by_phone.items() if len(cs) != 1}
    assert not several, f"phones on several contacts: {several}"
    not_one = {
        p: cs[0]["_embedded"]["leads"]
        for p, cs in contacts_by_phone.items()
        if len(cs[0]["_embedded"]["leads"]) != 1
    }
    assert not not_one, f"contacts without exactly one lead: {not_one}"


async def test_sigkill_during_a_thousand_submissions_loses_nothing_acknowledged(
    db_dsn: str,
    database_urls: DatabaseUrls,
    simulator: tuple[AmoCrmSimulator, str],
    tmp_path: Path,
) -> None:
    """Run on a direct connection, then through PgBouncer in transaction mode (`database_urls`:
    the service's pools through the pooler, its sessions on DATABASE_DIRECT_URL, and fewer
    people); the checks read the database directly (`db_dsn`) either way."""
    people = PEOPLE if database_urls.direct_url is None else POOLED_PEOPLE
    sim, sim_url = simulator
    data_dir = tmp_path / "var"  # the spool lives here and survives every restart
    env = {k: v for k, v in os.environ.items() if not k.startswith(SERVICE_VAR_PREFIXES)}
    env.update(database_urls.env())
    env.update(
        CRM="amocrm",
        AMOCRM_BASE_URL=sim_url,
        AMOCRM_ACCESS_TOKEN=SimulatorConfig().access_token,
        CRM_RATE_LIMIT="150",
        PORT=str(free_port()),
        HOST="127.0.0.1",
        CRM_RELAY_DATA_DIR=str(data_dir),
        LEASE_S="3",
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    svc = ServiceProcess(env, int(env["PORT"]), tmp_path / "service.log")
    acked: dict[int, str] = {}  # person → the submission id a 200 answer gave
    stats: dict[str, int] = defaultdict(int)
    kills: list[tuple[str, int]] = []  # (phase, acknowledged or delivered so far)
    t0 = time.monotonic()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CLIENTS + 5)) as http:
            svc.start()
            await svc.wait_ready(http)
            await submit_everyone_while_killing(svc, http, acked, stats, kills, people)
            t_intake = time.monotonic() - t0
            assert len(acked) == people
            assert all(n < people for _, n in kills), f"kills came too late to matter: {kills}"

            # one more kill while only the worker is busy: its CRM calls in flight are cut off
            async def a_third_delivered() -> bool:
                return await delivered_count(db_dsn) >= people // 3

            await wait_for(a_third_delivered, timeout=30, every=0.1)
            kills.append(("delivery", await delivered_count(db_dsn)))
            await svc.restart(http)

            async def all_acknowledged_delivered() -> bool:
                if not svc.alive():
                    raise AssertionError(f"service died:\n{svc.tail()}")
                states = await submission_states(db_dsn)
                done = all(states.get(sid) == "delivered" for sid in acked.values())
                return done and not spool_files(data_dir / "spool")

            await wait_for(all_acknowledged_delivered, timeout=45, every=0.25)
            t_delivered = time.monotonic() - t0
    except BaseException:
        print(f"--- service log tail ({svc.log_path}) ---\n{svc.tail(80)}", file=sys.stderr)
        print(f"kills={kills} stats={dict(stats)} acked={len(acked)}", file=sys.stderr)
        raise
    finally:
        await asyncio.to_thread(svc.kill)

    states = await submission_states(db_dsn)
    report = sim.report()
    print(
        f"intake {t_intake:.1f} s, all delivered {t_delivered:.1f} s, kills {kills}, "
        f"starts {svc.starts}, {dict(stats)}, CRM requests {report['requests_total']}, "
        f"max in any second {report['max_in_any_second']}, "
        f"notes (re-deliveries that found their lead) {len(report['notes'])}"
    )
    # every acknowledged submission is stored and delivered; nothing else was stored
    missing = {i: sid for i, sid in acked.items() if sid not in states}
    assert not missing, f"acknowledged but not stored: {missing}"
    assert len(states) == people, len(states)
    assert set(states.values()) == {"delivered"}, Counter(states.values())
    # the CRM has exactly one contact and one lead per person, and was never over its limit
    assert_one_contact_and_one_lead_per_person(report, people)
