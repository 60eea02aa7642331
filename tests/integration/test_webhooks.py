"""Webhooks in, end to end: real HTTP into the service, real PostgreSQL, real HTTP out to a
receiver on a real port that counts what it gets."""

from __future__ import annotations

import asyncio
import base64
import random
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import asyncpg
import orjson
import pytest
from aiohttp import web
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from service import cli
from service.app import STORE
from service.intake.forms import INTAKE
from service.settings import GenericSource, RetryPolicy, Settings
from service.simulators.bitrix24.server import (
    BitrixSimulator,
    BitrixSimulatorConfig,
    start_bitrix_simulator,
)
from service.webhooks.events import qstash_token, sign, standard_signature
from service.webhooks.handlers import EVENTS
from tests.conftest import Service, ServiceFactory, wait_for

SECRET = "amo-path-secret"
ADMIN_TOKEN = "admin-s3cret"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
B24_TOKEN = "b24-app-token"
QSTASH = {"qstash_current_signing_key": "sig_current", "qstash_next_signing_key": "sig_next"}


@dataclass
class Receiver:
    """A downstream that answers 500 to its first `failures` requests, then 200."""

    url: str = ""
    failures: int = 0
    calls: int = 0
    accepted: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            return web.Response(status=500, text="try later")
        self.accepted.append((dict(request.headers), body))
        return web.Response(text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}/hook"
    yield rec
    await runner.cleanup()


async def start(factory: ServiceFactory, receiver: Receiver, **overrides: Any) -> Service:
    base = {
        "webhook_secret": SECRET,
        "bitrix24_app_token": B24_TOKEN,
        "webhook_forward_url": receiver.url,
    }
    return await factory(**{**base, **overrides})


async def post(
    svc: Service, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with svc.http.post(f"{svc.url}{path}", data=body, headers=headers or {}) as r:
        raw = await r.read()
        try:
            return r.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return r.status, {"raw": raw.decode("latin-1")}


FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def amo_status(lead_id: int, status_id: int, updated_at: int, n: int = 0) -> dict[str, str]:
    p = f"leads[status][{n}]"
    fields = {
        "id": lead_id,
        "name": "Заявка с сайта",
        "status_id": status_id,
        "old_status_id": 10001,
        "price": 0,
        "responsible_user_id": 5510,
        "last_modified": updated_at,
        "modified_user_id": 5510,
        "date_create": 1700000000,
        "pipeline_id": 1000,
        "account_id": 29085955,
        "created_at": 1700000000,
        "updated_at": updated_at,
    }
    return {f"{p}[{k}]": str(v) for k, v in fields.items()}


def amo_body(*items: dict[str, str]) -> bytes:
    fields: dict[str, str] = {}
    for item in items:
        fields.update(item)
    fields.update({"account[subdomain]": "example", "account[id]": "29085955"})
    return urlencode(fields).encode()


def bitrix_body(deal_id: int, ts: int, token: str = B24_TOKEN) -> bytes:
    return urlencode(
        {
            "event": "ONCRMDEALUPDATE",
            "event_handler_id": "12",
            "data[FIELDS][ID]": str(deal_id),
            "ts": str(ts),
            "auth[domain]": "example.bitrix24.kz",
            "auth[client_endpoint]": "https://example.bitrix24.kz/rest/",
            "auth[member_id]": "a1b2c3",
            "auth[application_token]": token,
        }
    ).encode()


async def count(db: asyncpg.Connection, sql: str) -> int:
    n: int = await db.fetchval(sql)
    return n


async def settled(db: asyncpg.Connection, receiver: Receiver, forwarded: int) -> None:
    """Wait until every job is finished and the receiver has what it should, then make sure
    nothing more arrives."""

    async def done() -> bool:
        open_jobs = await count(db, "SELECT count(*) FROM forward_jobs WHERE state <> 'done'")
        return open_jobs == 0 and len(receiver.accepted) >= forwarded

    await wait_for(done, timeout=20)
    await asyncio.sleep(0.3)
    assert len(receiver.accepted) == forwarded


async def assert_once(db: asyncpg.Connection, receiver: Receiver, secret: str | None) -> None:
    """Stored once, processed once, forwarded once, signed."""
    assert await count(db, "SELECT count(*) FROM webhook_events") == 1
    assert await count(db, "SELECT count(*) FROM webhook_deliveries") == 1
    await settled(db, receiver, 1)
    jobs = await db.fetch("SELECT kind, state, attempts FROM forward_jobs ORDER BY id")
    assert [tuple(j) for j in jobs] == [("process", "done", 1), ("forward", "done", 1)]
    event_id = await db.fetchval("SELECT id::text FROM webhook_events")
    headers, body = receiver.accepted[0]
    assert headers["X-Relay-Event-Id"] == event_id
    assert orjson.loads(body)["id"] == event_id
    if secret:
        assert headers["X-Relay-Signature"] == sign(secret, body)


async def test_amocrm_status_delivered_three_times_at_once(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    svc = await start(service_factory, receiver)
    body = amo_body(amo_status(25399013, 142, 1700000100))
    answers = await asyncio.gather(
        *(post(svc, f"/webhooks/amocrm/{SECRET}", body, FORM) for _ in range(3))
    )
    assert [s for s, _ in answers] == [200, 200, 200]
    assert sorted(a["duplicate"] for _, a in answers) == [False, True, True]
    assert len({a["id"] for _, a in answers}) == 1
    await assert_once(db, receiver, SECRET)
    state = await db.fetchrow("SELECT * FROM crm_lead_state WHERE crm = 'amocrm'")
    assert (state["lead_id"], state["status_id"], state["pipeline_id"]) == (25399013, "142", "1000")
    forwarded = orjson.loads(receiver.accepted[0][1])
    assert forwarded["kind"] == "leads.status" and forwarded["account"]["subdomain"] == "example"
    assert svc.app[EVENTS].counts["duplicate"] == 2


async def test_amocrm_body_with_two_changes_is_two_events(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    svc = await start(service_factory, receiver)
    body = amo_body(amo_status(1, 142, 1700000100, 0), amo_status(2, 143, 1700000100, 1))
    status, answer = await post(svc, f"/webhooks/amocrm/{SECRET}", body, FORM)
    assert (status, answer["events"]) == (200, 2)
    await settled(db, receiver, 2)
    assert await count(db, "SELECT count(*) FROM crm_lead_state") == 2


async def test_bitrix24_deal_update_delivered_three_times_at_once(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    svc = await start(service_factory, receiver)
    body = bitrix_body(662, 1700000300)
    answers = await asyncio.gather(*(post(svc, "/webhooks/bitrix24", body, FORM) for _ in range(3)))
    assert [s for s, _ in answers] == [200, 200, 200]
    await assert_once(db, receiver, SECRET)
    forwarded = orjson.loads(receiver.accepted[0][1])
    assert forwarded["entity_id"] == "662" and forwarded["kind"] == "oncrmdealupdate"
    assert B24_TOKEN.encode() not in receiver.accepted[0][1]


async def test_qstash_message_delivered_three_times_at_once(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    svc = await start(service_factory, receiver, **QSTASH)
    body = b'{"type": "order.paid", "order": {"id": 42}}'
    url = f"{svc.url}/webhooks/generic/shop"
    headers = {
        "Content-Type": "application/json",
        "Upstash-Message-Id": "msg_2Xb9",
        "Upstash-Signature": qstash_token("sig_next", body, url, time.time()),
    }
    answers = await asyncio.gather(
        *(post(svc, "/webhooks/generic/shop", body, headers) for _ in range(3))
    )
    assert [s for s, _ in answers] == [200, 200, 200]
    await assert_once(db, receiver, SECRET)
    forwarded = orjson.loads(receiver.accepted[0][1])
    assert forwarded["data"] == {"type": "order.paid", "order": {"id": 42}}
    assert forwarded["key"] == "msg:msg_2Xb9"


async def test_downstream_failing_five_times_gets_the_event_once(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    receiver.failures = 5
    svc = await start(service_factory, receiver)
    status, _ = await post(svc, "/webhooks/bitrix24", bitrix_body(7, 1700000400), FORM)
    assert status == 200
    await settled(db, receiver, 1)
    assert receiver.calls == 6
    row = await db.fetchrow("SELECT state, attempts FROM forward_jobs WHERE kind = 'forward'")
    assert tuple(row) == ("done", 6)
    ids = {h["X-Relay-Event-Id"] for h, _ in receiver.accepted}
    assert len(ids) == 1


async def test_wrong_secrets_and_tokens_store_nothing(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    svc = await start(service_factory, receiver, **QSTASH)
    amo = amo_body(amo_status(1, 142, 1700000100))
    assert (await post(svc, "/webhooks/amocrm/wrong", amo, FORM))[0] == 404
    assert (await post(svc, f"/webhooks/amocrm/{SECRET}x", amo, FORM))[0] == 404
    assert (await post(svc, "/webhooks/bitrix24", bitrix_body(1, 1, "nope"), FORM))[0] == 401
    no_token = urlencode({"event": "ONCRMDEALUPDATE", "data[FIELDS][ID]": "1"}).encode()
    assert (await post(svc, "/webhooks/bitrix24", no_token, FORM))[0] == 401
    body = b'{"a": 1}'
    url = f"{svc.url}/webhooks/generic/shop"
    forged = {"Upstash-Signature": qstash_token("sig_other", body, url, time.time())}
    assert (await post(svc, "/webhooks/generic/shop", body, forged))[0] == 401
    other_body = {"Upstash-Signature": qstash_token("sig_current", b"{}", url, time.time())}
    assert (await post(svc, "/webhooks/generic/shop", body, other_body))[0] == 401
    bad_hmac = {"X-Relay-Signature": sign("not-the-secret", body)}
    assert (await post(svc, "/webhooks/generic/shop", body, bad_hmac))[0] == 401
    assert (await post(svc, "/webhooks/generic/shop", body))[0] == 401
    good_hmac = {"X-Relay-Signature": sign(SECRET, body)}
    assert (await post(svc, "/webhooks/generic/shop", body, good_hmac))[0] == 200
    assert await count(db, "SELECT count(*) FROM webhook_events") == 1
    assert await count(db, "SELECT count(*) FROM rejected") == 0


def random_request(rnd: random.Random) -> tuple[str, bytes, dict[str, str]]:
    path = rnd.choice([f"/webhooks/amocrm/{SECRET}", "/webhooks/bitrix24", "/webhooks/generic/r"])
    body = rnd.randbytes(rnd.choice([0, 1, 7, 64, 500, 4000]))
    content_type = rnd.choice(
        [
            None,
            "application/json",
            "application/x-www-form-urlencoded",
            "application/x-www-form-urlencoded; charset=windows-1251",
            "application/x-www-form-urlencoded; charset=utf-16",
            "multipart/form-data; boundary=xyz",
            "text/plain",
            "application/json; charset=nonsense",
        ]
    )
    return path, body, ({"Content-Type": content_type} if content_type else {})


async def test_thousand_random_bodies_all_answered_none_5xx(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    # generic source "r" is unverified, so random bodies reach the store there too
    generic = {"r": GenericSource(verify="none")}
    svc = await start(service_factory, receiver, generic_sources=generic, webhook_forward_url=None)
    rnd = random.Random(20240501)
    plan = [random_request(rnd) for _ in range(1000)]
    queue: asyncio.Queue[tuple[str, bytes, dict[str, str]]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    answers: list[tuple[str, int, dict[str, Any]]] = []

    async def sender() -> None:
        while not queue.empty():
            path, body, headers = queue.get_nowait()
            status, answer = await post(svc, path, body, headers)
            answers.append((path, status, answer))

    await asyncio.gather(*(sender() for _ in range(16)))
    assert len(answers) == 1000
    assert all(status < 500 for _, status, _ in answers)
    amo = [(s, a) for p, s, a in answers if "amocrm" in p]
    assert {s for s, _ in amo} == {200}  # amoCRM must never see anything but 2xx
    assert {s for p, s, _ in answers if "bitrix24" in p} == {401}  # random bytes carry no token
    kept = await count(db, "SELECT count(*) FROM rejected WHERE endpoint = 'webhooks/amocrm'")
    assert kept == sum(1 for _, a in amo if a["ok"] is False)
    assert {s for p, s, _ in answers if "generic" in p} == {200}
    status, health = await post(svc, "/webhooks/generic/r", b'{"still": "alive"}', {})
    assert status == 200 and health["ok"]


async def test_spooled_while_database_unreachable_then_stored_once(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    svc = await start(service_factory, receiver)
    events = svc.app[EVENTS]
    events.commit.skip_database(30)  # as after a failed write
    body = bitrix_body(9, 1700000500)
    first = await post(svc, "/webhooks/bitrix24", body, FORM)
    assert first[0] == 200 and first[1]["spooled"] is True
    events.commit.skip_database(0)
    again = await post(svc, "/webhooks/bitrix24", body, FORM)
    assert again[1]["duplicate"] is True  # the window knows the spooled event
    await wait_for(lambda: _events_stored(db, 1))
    await settled(db, receiver, 1)
    assert await count(db, "SELECT count(*) FROM webhook_events") == 1


async def test_forms_and_webhooks_share_one_window_and_one_set_of_locks(
    service_factory: ServiceFactory, receiver: Receiver
) -> None:
    """One window and one KeyLocks per process; a form submission and a webhook event under the
    same Idempotency-Key are still two things, and each repeat gets its own original."""
    svc = await start(service_factory, receiver)
    events, forms = svc.app[EVENTS], svc.app[INTAKE]
    assert events.window is forms.window and events.locks is forms.locks
    body = b'{"type": "ping"}'
    hook_headers = {
        "Content-Type": "application/json",
        "Idempotency-Key": "same-key",
        "X-Relay-Signature": sign(SECRET, body),
    }
    form_headers = {"Idempotency-Key": "same-key"}
    hook = await post(svc, "/webhooks/generic/r", body, hook_headers)
    form = await svc.submit("r", {"phone": "+77015550901"}, form_headers)
    assert hook[1]["duplicate"] is False and form[1]["duplicate"] is False
    assert hook[1]["id"] != form[1]["id"]
    hits = forms.window.hits
    hook_again = await post(svc, "/webhooks/generic/r", body, hook_headers)
    form_again = await svc.submit("r", {"phone": "+77015550901"}, form_headers)
    assert hook_again == (200, {**hook[1], "duplicate": True})
    assert form_again == (200, {**form[1], "duplicate": True})
    assert forms.window.hits >= hits + 2  # both answered from the one window
    assert events.locks.held() == {}


async def test_dead_forward_jobs_listed_and_replayed_by_admin_and_cli(
    service_factory: ServiceFactory,
    receiver: Receiver,
    db: asyncpg.Connection,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A forward that fails its one attempt is dead; the admin API lists it and replays it by id,
    `crm-relay replay --forwards` replays the rest; `crm-relay status` shows them meanwhile."""
    receiver.failures = 2
    one_try = RetryPolicy(base_s=0.05, max_s=0.5, max_attempts=1)
    svc = await start(service_factory, receiver, retry=one_try, admin_token=ADMIN_TOKEN)
    for deal in (11, 12):
        assert (await post(svc, "/webhooks/bitrix24", bitrix_body(deal, 1700000600), FORM))[
            0
        ] == 200

    async def dead(n: int) -> bool:
        return await count(db, "SELECT count(*) FROM forward_jobs WHERE state = 'dead'") == n

    await wait_for(lambda: dead(2))
    admin = f"{svc.url}/admin/api/forward-dead-letters"
    async with svc.http.get(admin, headers=ADMIN) as r:
        listed = (await r.json())["forward_dead_letters"]
    assert len(listed) == 2 and {d["source"] for d in listed} == {"bitrix24"}
    assert all(d["destination"] == receiver.url and "HTTP 500" in d["last_error"] for d in listed)
    first, second = sorted(d["id"] for d in listed)

    assert await cli.status(svc.app[STORE], 20) == 0
    out = capsys.readouterr().out
    assert "dead forward jobs (newest 2" in out
    assert f"job {first}" in out and f"job {second}" in out
    assert "forward: pending 0  running 0  done 0  dead 2" in out

    async with svc.http.post(f"{admin}/replay", json={}, headers=ADMIN) as r:
        assert r.status == 400  # neither ids nor {"all": true}
    async with svc.http.post(f"{admin}/{first}/replay", headers=ADMIN) as r:
        assert r.status == 200 and (await r.json())["replayed"] == 1
    await wait_for(lambda: dead(1))
    async with svc.http.post(f"{admin}/{first}/replay", headers=ADMIN) as r:
        assert r.status == 404  # not dead any more
    args = cli.parser().parse_args(["replay", "--forwards", str(second)])
    assert await cli.replay(svc.app[STORE], args.job_ids, forwards=args.forwards) == 0
    assert "replayed 1 dead forward job(s)" in capsys.readouterr().out
    await settled(db, receiver, 2)


async def _events_stored(db: asyncpg.Connection, n: int) -> bool:
    return await count(db, "SELECT count(*) FROM webhook_events") == n


async def test_our_own_status_change_is_not_applied_again(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    """The worker delivers a lead into status 10001; amoCRM echoes it back (ours: not forwarded);
    then a manager moves the lead (not ours: applied and forwarded)."""
    svc = await start(
        service_factory,
        receiver,
        default_pipeline_id=1000,
        default_status_id=10001,
        admin_token=ADMIN_TOKEN,
    )
    status, answer = await svc.submit("course", {"phone": "+77011234567", "name": "Айгерим"})
    assert status == 200 and answer["ok"]
    await wait_for(lambda: _delivered(db))
    lead_id = await db.fetchval("SELECT crm_lead_id FROM submissions")
    now = int(time.time())
    echo = amo_body(amo_status(lead_id, 10001, now))
    assert (await post(svc, f"/webhooks/amocrm/{SECRET}", echo, FORM))[0] == 200
    moved = amo_body(amo_status(lead_id, 142, now + 1))
    assert (await post(svc, f"/webhooks/amocrm/{SECRET}", moved, FORM))[0] == 200
    await settled(db, receiver, 1)
    outcomes = await db.fetch("SELECT outcome FROM webhook_events ORDER BY received_at")
    assert [r["outcome"] for r in outcomes] == ["echo", "applied"]
    assert orjson.loads(receiver.accepted[0][1])["data"]["status_id"] == "142"
    states = await svc.app[EVENTS].store.submitted_lead_states("amocrm")
    assert [(s.lead_id, s.status_id) for s in states] == [(lead_id, "142")]
    # the operator's view of the same (admin API; the simulator is an amoCRM)
    async with svc.http.get(f"{svc.url}/admin/api/lead-states", headers=ADMIN) as r:
        assert r.status == 200
        view = await r.json()
    assert view["crm"] == "amocrm"
    [row] = view["lead_states"]
    assert (row["lead_id"], row["status_id"], row["form"]) == (lead_id, "142", "course")
    assert row["submission_id"] == str(await db.fetchval("SELECT id FROM submissions"))


async def _delivered(db: asyncpg.Connection) -> bool:
    return await count(db, "SELECT count(*) FROM submissions WHERE state = 'delivered'") == 1


async def test_bitrix24_deal_is_fetched_and_our_echo_skipped(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    """With Bitrix24 configured, a deal event is forwarded with the deal (crm.deal.get through
    the CRM gate); the event our own delivery caused is recognised and not forwarded."""
    sim = BitrixSimulator(BitrixSimulatorConfig(drain_per_s=100, burst=100))
    runner, base = await start_bitrix_simulator(sim)
    try:
        hook = sim.webhook_url(base)
        svc = await start(service_factory, receiver, crm_kind="bitrix24", bitrix24_webhook_url=hook)
        status, answer = await svc.submit("course", {"phone": "+77051234567", "name": "Даурен"})
        assert status == 200 and answer["ok"]
        await wait_for(lambda: _delivered(db))
        deal_id = await db.fetchval("SELECT crm_lead_id FROM submissions")
        now = int(time.time())
        for ts in (now, now + 600):  # ours, then a manager's change ten minutes later
            body = bitrix_body(deal_id, ts)
            assert (await post(svc, "/webhooks/bitrix24", body, FORM))[0] == 200
        await settled(db, receiver, 1)
    finally:
        await runner.cleanup()
    outcomes = await db.fetch("SELECT outcome FROM webhook_events ORDER BY received_at")
    assert [r["outcome"] for r in outcomes] == ["echo", "applied"]
    forwarded = orjson.loads(receiver.accepted[0][1])
    assert forwarded["entity"]["ID"] == str(deal_id) and forwarded["entity"]["STAGE_ID"]
    state = await db.fetchrow("SELECT status_id FROM crm_lead_state WHERE crm = 'bitrix24'")
    assert state["status_id"] == forwarded["entity"]["STAGE_ID"]


async def test_bitrix24_stage_change_right_after_our_delivery_is_not_taken_for_our_echo(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    """The form puts deals in PREPARATION. An event whose fetched deal stands there, close to
    our delivery, is our echo; a manager moving the deal on within the echo window is not."""
    sim = BitrixSimulator(BitrixSimulatorConfig(drain_per_s=100, burst=100))
    runner, base = await start_bitrix_simulator(sim)
    try:
        hook = sim.webhook_url(base)
        svc = await start(
            service_factory,
            receiver,
            crm_kind="bitrix24",
            bitrix24_webhook_url=hook,
            default_stage_id="PREPARATION",
        )
        status, answer = await svc.submit("course", {"phone": "+77051234568", "name": "Даурен"})
        assert status == 200 and answer["ok"]
        await wait_for(lambda: _delivered(db))
        deal_id = await db.fetchval("SELECT crm_lead_id FROM submissions")
        now = int(time.time())
        assert (await post(svc, "/webhooks/bitrix24", bitrix_body(deal_id, now), FORM))[0] == 200
        await wait_for(lambda: _outcomes(db, 1))
        sim.store.deals[deal_id].stage_id = "EXECUTING"  # a manager, seconds later
        body = bitrix_body(deal_id, now + 5)
        assert (await post(svc, "/webhooks/bitrix24", body, FORM))[0] == 200
        await settled(db, receiver, 1)
    finally:
        await runner.cleanup()
    outcomes = await db.fetch("SELECT outcome FROM webhook_events ORDER BY received_at")
    assert [r["outcome"] for r in outcomes] == ["echo", "applied"]
    assert orjson.loads(receiver.accepted[0][1])["entity"]["STAGE_ID"] == "EXECUTING"


async def _outcomes(db: asyncpg.Connection, n: int) -> bool:
    return await count(db, "SELECT count(*) FROM webhook_events WHERE outcome IS NOT NULL") == n


async def test_forward_verifies_with_the_standard_webhooks_library(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    """A receiver holding FORWARD_SIGNING_SECRET (`whsec_…`) verifies the forward with the
    `standardwebhooks` package as it comes, and the GitHub-form signature with the same key; a
    changed body or a stale timestamp does not verify."""
    key = secrets.token_bytes(32)
    whsec = "whsec_" + base64.b64encode(key).decode()
    settings = Settings.from_env({"FORWARD_SIGNING_SECRET": whsec})
    assert settings.webhook.forward_key == key
    svc = await start(service_factory, receiver, forward_signing_secret=key)
    body = amo_body(amo_status(25399013, 142, 1700000100))
    status, _ = await post(svc, f"/webhooks/amocrm/{SECRET}", body, FORM)
    assert status == 200
    await settled(db, receiver, 1)
    headers, forwarded = receiver.accepted[0]
    event_id = await db.fetchval("SELECT id::text FROM webhook_events")
    assert headers["webhook-id"] == headers["X-Relay-Event-Id"] == event_id
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    payload = Webhook(whsec).verify(forwarded, headers)
    assert payload["id"] == event_id and payload["kind"] == "leads.status"
    assert headers["X-Relay-Signature"] == sign(key, forwarded)
    with pytest.raises(WebhookVerificationError):
        Webhook(whsec).verify(forwarded + b" ", headers)
    hour_ago = int(time.time()) - 3600
    stale = {
        **headers,
        "webhook-timestamp": str(hour_ago),
        "webhook-signature": standard_signature(key, event_id, hour_ago, forwarded),
    }
    with pytest.raises(WebhookVerificationError):
        Webhook(whsec).verify(forwarded, stale)


async def test_forward_key_falls_back_to_webhook_secret(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    """FORWARD_SIGNING_SECRET unset: WEBHOOK_SECRET's bytes sign both headers (a Standard
    Webhooks receiver holds `whsec_` + base64 of them)."""
    svc = await start(service_factory, receiver)
    status, _ = await post(svc, f"/webhooks/amocrm/{SECRET}", amo_body(amo_status(1, 142, 1)), FORM)
    assert status == 200
    await settled(db, receiver, 1)
    headers, forwarded = receiver.accepted[0]
    assert headers["X-Relay-Signature"] == sign(SECRET, forwarded)
    Webhook("whsec_" + base64.b64encode(SECRET.encode()).decode()).verify(forwarded, headers)
