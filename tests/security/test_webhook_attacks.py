"""The webhook endpoints as an attacker reads them: real HTTP into the service, real PostgreSQL,
a real receiver for forwarded events. Each test is named for the attack it stops."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import asyncpg
import orjson
import pytest
from aiohttp import web

from service.settings import GenericSource, RetryPolicy
from service.webhooks import events, handlers
from service.webhooks.events import qstash_token, sign, verify_hmac
from tests.conftest import Service, ServiceFactory, wait_for

PATH_SECRET = "amo-path-0123456789abcdef0123456789"
HMAC_KEY = "hmac-key-0123456789abcdef0123456789"
SIGNING_KEY = "signing-0123456789abcdef0123456789"
B24_TOKEN = "b24-app-token-0123456789abcdef"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
ONE_TRY = RetryPolicy(base_s=0.05, max_s=0.1, max_attempts=1)
QSTASH = {"qstash_current_signing_key": "sig_current", "qstash_next_signing_key": "sig_next"}


@dataclass
class Receiver:
    """Where events are forwarded; `/moved` answers 307 (resend the same POST) to `/elsewhere`."""

    url: str = ""
    got: dict[str, list[tuple[dict[str, str], bytes]]] = field(default_factory=dict)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.got.setdefault(request.path, []).append((dict(request.headers), await request.read()))
        if request.path == "/moved":
            raise web.HTTPTemporaryRedirect(f"{self.url}/elsewhere")
        return web.Response(text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    rec.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield rec
    await runner.cleanup()


async def post(
    svc: Service, path: str, body: bytes, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with svc.http.post(f"{svc.url}{path}", data=body, headers=headers or {}) as r:
        raw = await r.read()
        return r.status, orjson.loads(raw) if raw.startswith(b"{") else {}


def amo_batch(leads: int) -> bytes:
    fields = {"account[subdomain]": "example", "account[id]": "29085955"}
    for n in range(leads):
        item = {"id": 1000 + n, "status_id": 142, "pipeline_id": 1, "updated_at": 1700000000}
        for k, v in item.items():
            fields[f"leads[status][{n}][{k}]"] = str(v)
        fields[f"leads[status][{n}][name]"] = "Заявка с сайта " + "x" * 40
    return urlencode(fields).encode()


async def count(db: asyncpg.Connection, sql: str) -> int:
    n: int = await db.fetchval(sql)
    return n


# --- the amoCRM hook's secret -------------------------------------------------------------------


async def test_amocrm_path_secret_never_reaches_the_request_log(
    service_factory: ServiceFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The secret is the URL path, and the access log wrote the path verbatim: anyone who reads
    the logs could post events. The log writes the route template, for a near miss too."""
    svc = await service_factory(webhook_secret=PATH_SECRET)  # the older single secret
    caplog.set_level(logging.DEBUG)
    assert (await post(svc, f"/webhooks/amocrm/{PATH_SECRET}", amo_batch(1), FORM))[0] == 200
    assert (await post(svc, f"/webhooks/amocrm/{PATH_SECRET}/x", b"", FORM))[0] == 404
    lines = [r for r in caplog.records if r.name == "service.access"]
    assert len(lines) == 2
    # aiohttp.access is the test runner's own log (`crm-relay serve` runs with access_log=None)
    for record in (r for r in caplog.records if r.name != "aiohttp.access"):
        assert PATH_SECRET[:20] not in f"{record.getMessage()} {vars(record)}"
    assert lines[0].path == "/webhooks/amocrm/{secret}"  # type: ignore[attr-defined]


async def test_leaked_path_secret_neither_signs_generic_events_nor_forged_forwards(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    """One WEBHOOK_SECRET was the path, the inbound HMAC key and the outbound signing key: the
    path (in amoCRM's settings, in proxies' logs) let anyone sign generic events and forge what
    receivers trust. A key per purpose (forwards: WEBHOOK_SECRET, the older single one)."""
    svc = await service_factory(
        amocrm_path_secret=PATH_SECRET,
        hmac_secret=HMAC_KEY,
        webhook_secret=SIGNING_KEY,
        webhook_forward_url=f"{receiver.url}/hook",
    )
    body = b'{"type": "order.paid", "id": 1}'
    by_path = {"X-Relay-Signature": sign(PATH_SECRET, body), "Content-Type": "application/json"}
    assert (await post(svc, "/webhooks/generic/shop", body, by_path))[0] == 401
    by_key = {"X-Relay-Signature": sign(HMAC_KEY, body), "Content-Type": "application/json"}
    assert (await post(svc, "/webhooks/generic/shop", body, by_key))[0] == 200
    await wait_for(lambda: _got(receiver, "/hook", 1))
    headers, sent = receiver.got["/hook"][0]
    assert verify_hmac(SIGNING_KEY, sent, headers["X-Relay-Signature"])
    assert not verify_hmac(PATH_SECRET, sent, headers["X-Relay-Signature"])


async def _got(receiver: Receiver, path: str, n: int) -> bool:
    return len(receiver.got.get(path, [])) >= n


# --- generic webhooks ---------------------------------------------------------------------------


async def test_unsigned_generic_webhook_refused_when_no_key_is_configured(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    """With no key configured, `verify = "any"` let anyone post any source name, and what they
    posted was forwarded. Now only a source configured `verify = "none"` takes unsigned posts."""
    svc = await service_factory(generic_sources={"open": GenericSource(verify="none")})
    body = b'{"type": "spam"}'
    json = {"Content-Type": "application/json"}
    assert (await post(svc, "/webhooks/generic/anything", body, json))[0] == 401
    assert (await post(svc, "/webhooks/generic/open", body, json))[0] == 200
    assert await count(db, "SELECT count(*) FROM webhook_events") == 1
    signed = await service_factory(webhook_secret=HMAC_KEY)
    by_key = {**json, "X-Relay-Signature": sign(HMAC_KEY, body)}
    assert (await post(signed, "/webhooks/generic/any-name", body, by_key))[0] == 200


# --- body limits --------------------------------------------------------------------------------


async def test_large_amocrm_batch_is_not_refused_into_a_disabled_hook(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    """amoCRM batches changes: a 300 KB body got 413 from the app-wide 64 KiB limit, amoCRM
    retried, and after 100 errors in two hours it disables the hook. The hook takes up to
    WEBHOOK_MAX_BODY_BYTES (1 MiB); forms keep MAX_BODY_BYTES."""
    svc = await service_factory(webhook_secret=PATH_SECRET)
    batch = amo_batch(1100)
    assert 300_000 <= len(batch) < 1024 * 1024
    status, answer = await post(svc, f"/webhooks/amocrm/{PATH_SECRET}", batch, FORM)
    assert status == 200 and answer["events"] == 1100, answer
    form = urlencode({"phone": "+77011234567", "comment": "x" * 300_000}).encode()
    assert (await post(svc, "/api/v1/forms/contact", form, FORM))[0] == 413


# --- Bitrix24 -----------------------------------------------------------------------------------


async def test_bitrix24_field_flood_without_token_is_refused_before_parsing(
    service_factory: ServiceFactory, db: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token was checked after parsing up to 1 MiB / 100,000 fields: one unauthenticated
    request held the event loop for about 0.4 s. Now the token is found in the bytes first."""
    svc = await service_factory(bitrix24_app_token=B24_TOKEN)
    parsed: list[int] = []
    real = handlers.parse_body

    def spy(content_type: str | None, raw: bytes, **kw: Any) -> dict[str, Any]:
        parsed.append(kw.get("max_fields", 1000))
        return real(content_type, raw, **kw)

    monkeypatch.setattr(handlers, "parse_body", spy)
    monkeypatch.setattr(events, "parse_body", spy)
    flood = "&".join(f"f{i}=1" for i in range(100_000)).encode()
    forged = flood + b"&auth[application_token]=guess"
    for body in (flood, forged):
        status, _ = await post(svc, "/webhooks/bitrix24", body, FORM)
        assert status == 401
    assert parsed == []  # neither body was parsed
    assert await count(db, "SELECT count(*) FROM webhook_deliveries") == 0


async def test_bitrix24_auth_block_never_stored_nor_forwarded(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    """The raw body, `auth` block included (application token, member id, and for app events
    access and refresh tokens), was stored, spooled and forwarded: anyone with the database or
    a receiver's logs could act as the portal's app."""
    svc = await service_factory(
        bitrix24_app_token=B24_TOKEN, webhook_forward_url=f"{receiver.url}/hook"
    )
    auth = {
        "auth[domain]": "example.bitrix24.kz",
        "auth[member_id]": "member-a1b2c3d4",
        "auth[access_token]": "access-9z8y7x",
        "auth[refresh_token]": "refresh-6w5v4u",
        "auth[application_token]": B24_TOKEN,
    }
    fields = {"event": "ONCRMDEALUPDATE", "data[FIELDS][ID]": "662", "ts": "1700000300", **auth}
    assert (await post(svc, "/webhooks/bitrix24", urlencode(fields).encode(), FORM))[0] == 200
    await wait_for(lambda: _got(receiver, "/hook", 1))
    raw = await db.fetchval("SELECT raw FROM webhook_deliveries")
    payload = await db.fetchval("SELECT payload::text FROM webhook_events")
    forwarded = receiver.got["/hook"][0][1]
    for kept in (bytes(raw), payload.encode(), forwarded):
        for secret in ("member-a1b2c3d4", "access-9z8y7x", "refresh-6w5v4u", B24_TOKEN):
            assert secret.encode() not in kept
        assert b"auth" not in kept
    assert b"data%5BFIELDS%5D%5BID%5D=662" in bytes(raw)  # the rest kept as sent


# --- QStash -------------------------------------------------------------------------------------


async def test_qstash_token_made_for_another_url_of_the_account_is_refused(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    """QStash signing keys are per account: `sub` was compared by path only, so a token for
    https://other.example/webhooks/generic/shop (another app of the account) was accepted here."""
    svc = await service_factory(**QSTASH, public_base_url="https://leads.example.com")
    body = b'{"type": "order.paid"}'
    path = "/webhooks/generic/shop"
    for url, expected in (
        (f"https://other.example{path}", 401),
        (f"https://leads.example.com{path}", 200),
    ):
        token = {"Upstash-Signature": qstash_token("sig_current", body, url, time.time())}
        assert (await post(svc, path, body, token))[0] == expected
    unset = await service_factory(**QSTASH)  # no PUBLIC_BASE_URL: the Host header stands in
    other = {"Upstash-Signature": qstash_token("sig_next", body, f"https://x.example{path}", 0.0)}
    assert (await post(unset, path, body, other))[0] == 401


async def test_replayed_qstash_token_with_a_new_message_id_stores_nothing_new(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    """A captured token could be replayed until it expired with another `Upstash-Message-Id`
    (unsigned): a new event each time, forwarded each time. The token id (`jti`) is remembered:
    a replay is keyed as the message it first came with."""
    svc = await service_factory(**QSTASH)
    body = b'{"type": "order.paid", "order": {"id": 42}}'
    path = "/webhooks/generic/shop"
    token = qstash_token("sig_current", body, f"{svc.url}{path}", time.time())
    ids = set()
    for n in range(5):
        headers = {"Upstash-Signature": token, "Upstash-Message-Id": f"msg_{n}"}
        status, answer = await post(svc, path, body, headers)
        assert status == 200
        ids.add(answer["id"])
    assert len(ids) == 1
    assert await count(db, "SELECT count(*) FROM webhook_events") == 1


def test_qstash_replay_memory_is_bounded_in_entries_and_time() -> None:
    seen = handlers.SeenTokens(max_entries=100)
    for n in range(1000):
        assert seen.first_key(f"jwt_{n}", 1000.0, f"k{n}", now=900.0) == f"k{n}"
    assert len(seen) == 100
    assert seen.first_key("jwt_999", 1000.0, "other", now=900.0) == "k999"  # a replay
    assert seen.first_key("jwt_x", 2000.0, "kx", now=1100.0) == "kx"  # the expired ones go
    assert len(seen) == 1
    assert seen.first_key("j" * 10_000, 2000.0, "long", now=1100.0) == "long"
    assert max(len(k) for k in seen._seen) <= events.MAX_KEY


# --- forwarding ---------------------------------------------------------------------------------


async def test_forward_destination_redirect_is_not_followed(
    service_factory: ServiceFactory, receiver: Receiver, db: asyncpg.Connection
) -> None:
    """The forwarder followed redirects (the CRM client does not): a destination that answers
    307 sent the signed event wherever it pointed. A redirect is now an answer: dead."""
    svc = await service_factory(
        webhook_secret=HMAC_KEY, webhook_forward_url=f"{receiver.url}/moved", retry=ONE_TRY
    )
    body = b'{"type": "order.paid", "id": 7}'
    by_key = {"X-Relay-Signature": sign(HMAC_KEY, body), "Content-Type": "application/json"}
    assert (await post(svc, "/webhooks/generic/shop", body, by_key))[0] == 200

    async def dead() -> bool:
        state = await db.fetchval("SELECT state FROM forward_jobs WHERE kind = 'forward'")
        return state == "dead"

    await wait_for(dead)
    assert len(receiver.got["/moved"]) == 1 and "/elsewhere" not in receiver.got
