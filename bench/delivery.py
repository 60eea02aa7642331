"""Delivery benchmark: drain a backlog against a CRM simulator at its real limit.

    .venv/bin/python -m bench.delivery --crm amocrm --submissions 300 --people 240
    .venv/bin/python -m bench.delivery --crm amocrm --dedup search --identities both
    .venv/bin/python -m bench.delivery --crm amocrm --dedup trust
    .venv/bin/python -m bench.delivery --crm bitrix24
    .venv/bin/python -m bench.delivery --crm amocrm --arrival burst --submissions 500 --people 500
    .venv/bin/python -m bench.delivery --crm bitrix24 --arrival burst --returning 120

Queues N submissions for M people (so N - M are returning people) with the worker off, then
starts a worker-only service and drains the backlog (`--arrival backlog`, the default); with
`--arrival burst` the worker runs first and 32 concurrent clients post while it works.
`--returning R`: the CRM holds R contacts a manager made (amoCRM: phone typed "8 (701) …",
Bitrix24: "+7 (701) …"; every other one with an open lead), and R of them plus R new people
submit (2R submissions, phone + email or the `--identities` mix); the amoCRM index is synced
before the run, as a running relay has it. People give a phone and an email (`--identities
both`) or half of them a phone only (`mix`). amoCRM: `--dedup` is AMOCRM_DEDUP (index,
search, trust); `--crm-contacts K` gives the account K contacts of other people first
(made by hand, so not counted), which the index has to read before it can answer (a cold
start), unless `--warm` has it read them before the clock starts. Prints CRM
requests per new lead (with N = M every lead is new) and per delivered submission, how amoCRM's
contacts were read (search / list / get), sustained request rate ÷ limit, 429 count, duplicates
and wall time; and the fewest requests the vendor's limits allow for the same work
(`minimum_requests`, counted as `minimum_counted` says), and CRM requests ÷ that minimum.
Loopback only; bounded by --timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiohttp import web

from bench.common import machine_facts
from service.app import Roles, create_app
from service.crm.amocrm.api import AmoCrmApi, StaticToken
from service.crm.amocrm.index import ContactIndex
from service.db.database import EmbeddedPostgres, create_pool, migrate, prepare_environment
from service.delivery.limits import RateGate
from service.settings import (
    AmoCrmSettings,
    Bitrix24Settings,
    CrmSettings,
    DatabaseSettings,
    DeliverySettings,
    RetryPolicy,
    Settings,
)


async def start_simulator(kind: str, rate: int) -> tuple[Any, web.AppRunner, str, CrmSettings]:
    """The simulator for `kind` at its real limit, and the settings that point at it."""
    if kind == "amocrm":
        from service.simulators.amocrm.server import (
            AmoCrmSimulator,
            SimulatorConfig,
            start_simulator,
        )

        sim: Any = AmoCrmSimulator(SimulatorConfig(rate_limit=rate))
        runner, url = await start_simulator(sim)
        amo = AmoCrmSettings(base_url=url, access_token=sim.config.access_token)
        return sim, runner, url, CrmSettings(kind="amocrm", amocrm=amo)
    from service.simulators.bitrix24.server import (  # type: ignore[import-not-found,unused-ignore]
        BitrixSimulator,
        BitrixSimulatorConfig,
        start_bitrix_simulator,
    )

    sim = BitrixSimulator(BitrixSimulatorConfig())
    runner, url = await start_bitrix_simulator(sim)
    hook = Bitrix24Settings(webhook_url=f"{url}/rest/1/{sim.config.webhook_secret}/")
    return sim, runner, url, CrmSettings(kind="bitrix24", bitrix24=hook)


def seed_contacts(sim: Any, n: int) -> None:
    """Contacts of other people, changed one second apart over the last days, as an account
    that has been in use has them."""
    start = int(time.time()) - n
    for first in range(0, n, 10_000):  # the control API takes 10,000 at a time
        sim.seed_contacts(
            [
                {
                    "first_name": f"Client {k}",
                    "updated_at": start + k,
                    "custom_fields_values": [
                        {"field_code": "PHONE", "values": [{"value": f"8 (702) {k:07d}"}]},
                        {"field_code": "EMAIL", "values": [{"value": f"client{k}@example.com"}]},
                    ],
                }
                for k in range(first, min(n, first + 10_000))
            ]
        )


async def warm_index(sim: Any, url: str, dsn: str, rate: float) -> None:
    """Sync the contact index to the end before the measured run, as a running relay has it;
    the simulator's counters start again afterwards."""
    pool = await create_pool(dsn, min_size=1, max_size=2)
    try:
        async with aiohttp.ClientSession() as http:
            api = AmoCrmApi(http, url, StaticToken(sim.config.access_token), RateGate(rate))
            index = ContactIndex(api, pool, pages_per_round=100)
            for _ in range(10_000):  # bounded: 250 contacts a page
                if await index.refresh():
                    break
    finally:
        await pool.close()
    sim.log.clear()
    sim.api.contact_reads.clear()


async def serve(settings: Settings, roles: Roles) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(create_app(settings, roles), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def person_body(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Submission `n`: person n % people. With `--returning`, even people are the returning
    ones (their phone is a manager's contact, see `seed_returning`), odd people are new."""
    i = n % args.people
    body = {"name": f"Person {i}", "phone": f"+7701{i:07d}", "comment": f"visit {n}"}
    if args.identities == "both" or i % 2:
        body["email"] = f"p{i}@example.kz"
    return body


def returning(args: argparse.Namespace) -> list[int]:
    """The people whose contact a manager made (empty without `--returning`)."""
    return list(range(0, args.people, 2)) if args.returning else []


def seed_returning(sim: Any, args: argparse.Namespace) -> None:
    """Contacts a manager typed in (phone as "8 (701) …", no e-mail), every other one with an
    open lead: made in the simulator's store, not through its API, so neither counted nor
    limited."""
    for i in returning(args):
        local = f"8 (701) {i:07d}"
        if args.crm == "amocrm":
            phones = [{"field_code": "PHONE", "values": [{"value": local}]}]
            (cid,) = sim.seed_contacts(
                [{"first_name": f"Person {i}", "custom_fields_values": phones}]
            )
            if i % 4 == 0:
                sim.store.create_leads(
                    [{"name": f"Manager's lead {i}", "_embedded": {"contacts": [{"id": cid}]}}]
                )
        else:
            # Bitrix24 compares phones by their digits: a manager types the +7
            phone = [{"VALUE": f"+7 (701) {i:07d}", "VALUE_TYPE": "WORK"}]
            cid = sim.store.contact_add({"fields": {"NAME": f"Person {i}", "PHONE": phone}})
            if i % 4 == 0:
                sim.store.deal_add(
                    {"fields": {"TITLE": f"Manager's deal {i}", "CONTACT_IDS": [cid]}}
                )


async def submit(url: str, args: argparse.Namespace) -> None:
    """Every submission, 32 clients at a time."""
    sem = asyncio.Semaphore(32)
    async with aiohttp.ClientSession() as http:

        async def one(n: int) -> None:
            async with sem, http.post(f"{url}/api/v1/forms/bench", json=person_body(n, args)) as r:
                answer = await r.json()
                assert answer["ok"], answer

        await asyncio.gather(*(one(n) for n in range(args.submissions)))


def minimum(args: argparse.Namespace) -> tuple[int | None, str]:
    """The fewest requests the vendor's limits allow for this run's work, and how counted."""
    bodies = [person_body(i, args) for i in range(args.people)]
    back = set(returning(args))
    new = [b for i, b in enumerate(bodies) if i not in back]
    old = [b for i, b in enumerate(bodies) if i in back]
    with_lead = sum(1 for i in back if i % 4 == 0)
    gains = sum(1 for b in old if "email" in b)  # the manager's contact lacks the e-mail
    repeats = args.submissions - args.people  # a person's later submissions: their lead + note
    if args.crm == "bitrix24":
        phones = len({b["phone"] for b in bodies})
        emails = len({b["email"] for b in bodies if "email" in b})
        find = -(-phones // 20) + -(-emails // 20)
        cmds = find + 2 * len(new) + 2 * len(old) + len(old) + gains + 3 * repeats
        how = (
            f"ceil({cmds} commands / 50 per batch): findbycomm {find} (20 values each, phones "
            f"and e-mails), contact.add + deal.add per new person ({2 * len(new)}), per "
            f"returning person contact.get + deal.list + comment or deal.add ({3 * len(old)}) "
            f"+ contact.update for the e-mail it lacks ({gains}), per later submission "
            f"contact.get + deal.list + comment ({3 * repeats})"
        )
        return -(-cmds // 50), how
    if args.dedup == "search":
        return None, "not counted for search"
    parts = {"leads/complex": -(-len(new) // 50)}
    if args.dedup == "index":
        changed = len(new) + gains + (0 if args.warm else args.crm_contacts)
        parts["contact list pages"] = max(1, -(-changed // 250))
    if old:
        parts["GET contacts filter[id]"] = -(-len(old) // 250)
        parts["GET leads filter[id]"] = -(-with_lead // 250)
        parts["POST leads/notes"] = -(-with_lead // 50)
        parts["POST leads"] = -(-(len(old) - with_lead) // 50)
        parts["PATCH contacts"] = -(-gains // 50)
    if repeats:
        parts["GET leads filter[id] (later submissions)"] = -(-repeats // 250)
        parts["POST leads/notes (later submissions)"] = -(-repeats // 50)
    how = " + ".join(f"{k} {v}" for k, v in parts.items() if v)
    how += (
        " (creates and notes 50 to a request; reads 250 to a page; the index reads every "
        "contact changed since its last look, ours included)"
    )
    return sum(parts.values()), how


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
    new_people = args.people - len(returning(args))
    least, how = minimum(args)
    statuses = report["answers_by_status"]
    out = {
        "crm": args.crm,
        "arrival": args.arrival,
        "dedup": args.dedup if args.crm == "amocrm" else None,
        "crm_contacts_before": args.crm_contacts,
        "index_warm": args.warm,
        "identities": args.identities,
        "submissions": args.submissions,
        "people": args.people,
        "returning_people": len(returning(args)),
        "returning_submissions": args.submissions - new_people,
        "crm_requests": len(times),
        "minimum_requests": least,
        "minimum_counted": how,
        "requests_over_minimum": round(len(times) / least, 3) if least else None,
        "requests_per_delivered_submission": round(len(times) / args.submissions, 3),
        "requests_per_new_lead": round(len(times) / new_people, 3) if new_people else None,
        "requests_by_endpoint": report.get("requests_by_endpoint"),
        "commands_by_method": report.get("commands_by_method"),
        "contact_reads": report.get("contact_reads"),
        "rate_limit": limit,
        # n requests span n - 1 intervals; work is due from the first request to the last
        "sustained_rate": round((len(times) - 1) / span, 3) if span else None,
        "rate_over_limit": round((len(times) - 1) / span / limit, 3) if span else None,
        "answers_429": statuses.get("429", 0),
        "answers_503": statuses.get("503", 0),
        "violations": report["violations"],
        "duplicates": report["duplicates"],
        "wall_time_s": round(wall, 1),
    }
    if os.environ.get("BENCH_TRACE"):  # every request: seconds since the first, endpoint
        t0 = times[0] if times else 0.0
        out["trace"] = [(round(e.t - t0, 3), e.endpoint) for e in sim.log.entries]
    if args.crm == "bitrix24":
        out["max_bucket_level"] = report.get("max_bucket_level")
    return out


async def main(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="crb-", dir="/tmp"))
    prepare_environment(os.environ)  # as the service's main() does before the server starts
    pg = EmbeddedPostgres(root)
    dsn = await asyncio.to_thread(pg.start)
    runners: list[web.AppRunner] = []
    try:
        conn = await asyncpg.connect(dsn)
        await migrate(conn)
        await conn.close()
        limit = args.rate or (7 if args.crm == "amocrm" else 2)
        sim, sim_runner, sim_url, crm = await start_simulator(args.crm, limit)
        runners.append(sim_runner)
        if args.crm_contacts:
            seed_contacts(sim, args.crm_contacts)
        seed_returning(sim, args)
        if args.warm and args.crm == "amocrm":
            await warm_index(sim, sim_url, dsn, float(limit))
        amo = dataclasses.replace(crm.amocrm, dedup=args.dedup)
        settings = Settings(
            data_dir=root / "var",
            database=DatabaseSettings(url=dsn),
            crm=dataclasses.replace(crm, rate_limit=float(limit), amocrm=amo),
            delivery=DeliverySettings(retry=RetryPolicy(base_s=0.5, max_s=5)),
        )
        intake, url = await serve(settings, Roles(worker=False))
        runners.append(intake)
        if args.arrival == "backlog":
            await submit(url, args)
        t0 = time.monotonic()
        worker, _ = await serve(settings, Roles(http=False))
        runners.append(worker)
        if args.arrival == "burst":
            await submit(url, args)
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
    p.add_argument("--dedup", choices=["index", "search", "trust"], default="index")
    p.add_argument("--trust-duplicates", action="store_true", help="the same as --dedup trust")
    p.add_argument("--identities", choices=["both", "mix"], default="mix")
    p.add_argument("--crm-contacts", type=int, default=0, help="amoCRM: contacts already there")
    p.add_argument("--warm", action="store_true", help="amoCRM: index synced before the run")
    p.add_argument("--arrival", choices=["backlog", "burst"], default="backlog")
    p.add_argument("--returning", type=int, default=0, help="R returning + R new people")
    p.add_argument("--timeout", type=float, default=600)
    args = p.parse_args()
    if args.returning:
        args.people = args.submissions = 2 * args.returning
        args.warm = True
    if args.trust_duplicates:
        args.dedup = "trust"
    result = asyncio.run(main(args))
    width = max(map(len, result))
    for key, value in {**machine_facts(), **result}.items():
        print(f"{key:>{width}}: {value}")


if __name__ == "__main__":
    cli()
