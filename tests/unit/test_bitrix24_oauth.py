"""Bitrix24 OAuth app tokens: the simulator's token server and `auth=` check, the exchange, and
the database-backed token source (one refresh across callers, the new pair stored before use)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import asyncpg
import pytest

from service.crm.bitrix24.api import Bitrix24Api
from service.crm.bitrix24.oauth import exchange_refresh_token
from service.crm.oauth import Bitrix24OAuthTokens
from service.db.store import Store
from service.errors import CrmUnauthorized
from service.settings import Bitrix24Settings, CrmSettings
from service.simulators.bitrix24.oauth import BitrixOAuthConfig
from service.simulators.bitrix24.server import BitrixSimulator, start_bitrix_simulator

APP = BitrixOAuthConfig()


class OpenGate:
    """A Gate that admits everything."""

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        yield


@dataclass
class Portal:
    sim: BitrixSimulator
    base: str
    http: aiohttp.ClientSession

    async def refresh(self, refresh_token: str, **extra: str) -> tuple[int, Any]:
        params = {
            "grant_type": "refresh_token",
            "client_id": APP.client_id,
            "client_secret": APP.client_secret,
            "refresh_token": refresh_token,
        } | extra
        async with self.http.get(self.sim.oauth_url(self.base), params=params) as resp:
            return resp.status, await resp.json(content_type=None)

    async def rest(self, method: str, body: Any, **kw: Any) -> tuple[int, Any]:
        url = f"{self.sim.portal_url(self.base)}{method}.json"
        async with self.http.post(url, json=body, **kw) as resp:
            return resp.status, await resp.json(content_type=None)

    def settings(self, **overrides: Any) -> CrmSettings:
        """The CRM slice for this portal's app; `overrides` are `Bitrix24Settings` fields."""
        b24 = Bitrix24Settings(
            client_id=APP.client_id,
            client_secret=APP.client_secret,
            refresh_token=APP.refresh_token,
            portal_url=self.sim.portal_url(self.base),
            oauth_url=self.sim.oauth_url(self.base),
        )
        return CrmSettings(kind="bitrix24", timeout_s=5.0, bitrix24=replace(b24, **overrides))


@pytest.fixture
async def portal() -> AsyncIterator[Portal]:
    sim = BitrixSimulator()
    runner, url = await start_bitrix_simulator(sim)
    async with aiohttp.ClientSession() as http:
        yield Portal(sim, url, http)
    await runner.cleanup()


@pytest.fixture
async def store(db_dsn: str) -> AsyncIterator[Store]:
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=8)
    yield Store(pool)
    await pool.close()


# ---- the simulator ------------------------------------------------------------------------------


async def test_refresh_tokens_are_single_use(portal: Portal) -> None:
    status, pair = await portal.refresh(APP.refresh_token)
    assert status == 200 and pair["expires_in"] == 3600
    assert pair["client_endpoint"] == portal.sim.portal_url(portal.base)
    status, again = await portal.refresh(APP.refresh_token)
    assert (status, again["error"]) == (400, "invalid_grant")
    status, _ = await portal.refresh(pair["refresh_token"])
    assert status == 200
    status, wrong = await portal.refresh(pair["refresh_token"], client_secret="guess")
    assert (status, wrong["error"]) == (401, "invalid_client")
    assert portal.sim.report()["oauth"]["refreshes"] == 2


async def test_rest_calls_take_auth_in_body_query_or_batch(portal: Portal) -> None:
    _, pair = await portal.refresh(APP.refresh_token)
    token = pair["access_token"]
    status, body = await portal.rest("crm.contact.add", {"auth": token, "fields": {"NAME": "A"}})
    assert status == 200 and isinstance(body["result"], int)
    status, body = await portal.rest(
        "crm.contact.get", {"id": body["result"]}, params={"auth": token}
    )
    assert status == 200 and body["result"]["NAME"] == "A"
    cmd = {
        "c": "crm.contact.add?fields[NAME]=B",
        "d": "crm.deal.add?fields[CONTACT_IDS][0]=$result[c]",
    }
    status, body = await portal.rest("batch", {"auth": token, "halt": 0, "cmd": cmd})
    assert status == 200 and set(body["result"]["result"]) == {"c", "d"}
    assert len(portal.sim.report()["deals"]) == 1


async def test_expired_invalid_and_missing_tokens_are_refused(portal: Portal) -> None:
    _, pair = await portal.refresh(APP.refresh_token)
    body = {"auth": pair["access_token"], "id": 1}
    assert (await portal.rest("crm.deal.get", body))[0] != 401  # good token, unknown deal
    portal.sim.expire_tokens()
    status, answer = await portal.rest("crm.deal.get", body)
    assert (status, answer["error"]) == (401, "expired_token")
    status, answer = await portal.rest("batch", body | {"cmd": {"a": "crm.deal.get?id=1"}})
    assert (status, answer["error"]) == (401, "expired_token")
    status, answer = await portal.rest("crm.deal.get", {"auth": "forged", "id": 1})
    assert (status, answer["error"]) == (401, "invalid_token")
    status, answer = await portal.rest("crm.deal.get", {"id": 1})
    assert (status, answer["error"]) == (401, "NO_AUTH_FOUND")
    # an hour later a fresh token has expired by itself
    _, pair = await portal.refresh(pair["refresh_token"])
    clock = portal.sim.clock
    portal.sim.clock = lambda: clock() + APP.token_ttl_s + 1
    status, answer = await portal.rest("crm.deal.get", {"auth": pair["access_token"], "id": 1})
    assert (status, answer["error"]) == (401, "expired_token")


async def test_webhook_mode_is_unchanged_and_reset_restores_the_first_refresh_token(
    portal: Portal,
) -> None:
    url = f"{portal.sim.webhook_url(portal.base)}crm.contact.add.json"
    async with portal.http.post(url, json={"fields": {"NAME": "W"}}) as resp:
        assert resp.status == 200
    _, pair = await portal.refresh(APP.refresh_token)
    async with portal.http.post(f"{portal.base}/_sim/expire-tokens") as resp:
        assert resp.status == 200
    status, _ = await portal.rest("crm.deal.list", {"auth": pair["access_token"]})
    assert status == 401
    portal.sim.reset()
    assert (await portal.refresh(APP.refresh_token))[0] == 200


# ---- the exchange -------------------------------------------------------------------------------


async def test_exchange_returns_the_pair_and_refuses_a_spent_token(portal: Portal) -> None:
    kw: dict[str, Any] = {
        "client_id": APP.client_id,
        "client_secret": APP.client_secret,
        "timeout_s": 5.0,
        "gate": OpenGate(),
    }
    oauth_url = portal.sim.oauth_url(portal.base)
    pair, endpoint = await exchange_refresh_token(
        portal.http, oauth_url, refresh_token=APP.refresh_token, **kw
    )
    assert pair.access_token and pair.refresh_token != APP.refresh_token
    assert endpoint == portal.sim.portal_url(portal.base)
    assert APP.refresh_token not in repr(pair)  # tokens are kept out of logs
    with pytest.raises(CrmUnauthorized, match="invalid_grant") as exc:
        await exchange_refresh_token(portal.http, oauth_url, refresh_token=APP.refresh_token, **kw)
    assert APP.client_secret not in str(exc.value)


# ---- the client with database-backed tokens -----------------------------------------------------


async def _client(portal: Portal, store: Store, **settings: Any) -> Bitrix24Api:
    s = portal.settings(**settings)
    tokens = Bitrix24OAuthTokens(store, portal.http, s, OpenGate())
    await tokens.seed()
    assert s.bitrix24.portal_url
    return Bitrix24Api(portal.http, s.bitrix24.portal_url, OpenGate(), timeout_s=5, tokens=tokens)


async def _stored_refresh_token(db: asyncpg.Connection) -> str:
    token: str = await db.fetchval("SELECT refresh_token FROM oauth_tokens WHERE crm = 'bitrix24'")
    return token


async def test_expired_token_is_refreshed_once_and_the_call_repeated(
    portal: Portal, store: Store, db: asyncpg.Connection
) -> None:
    api = await _client(portal, store)
    contact = await api.call("crm.contact.add", {"fields": {"NAME": "A"}})  # first: a refresh
    assert portal.sim.report()["oauth"]["refreshes"] == 1
    portal.sim.expire_tokens()
    assert (await api.call("crm.contact.get", {"id": contact}))["NAME"] == "A"
    report = portal.sim.report()
    assert report["oauth"]["refreshes"] == 2
    assert report["answers_by_status"] == {"200": 2, "401": 1}
    # the pair in use is the one stored: a restart would not need the spent env token
    assert await _stored_refresh_token(db) == report["oauth"]["refresh_token"]


async def test_concurrent_callers_in_two_processes_refresh_once(
    portal: Portal, store: Store, db_dsn: str
) -> None:
    first = await _client(portal, store)
    await first.call("crm.deal.list", {})
    # a second "process": its own pool and token source, the same database row
    pool = await asyncpg.create_pool(db_dsn, min_size=1, max_size=8)
    try:
        second = await _client(portal, Store(pool))
        await second.call("crm.deal.list", {})
        assert portal.sim.report()["oauth"]["refreshes"] == 1  # it read the stored token
        portal.sim.expire_tokens()
        calls = [api.call("crm.deal.list", {}) for api in (first, second) for _ in range(5)]
        await asyncio.gather(*calls)
    finally:
        await pool.close()
    oauth = portal.sim.report()["oauth"]
    assert (oauth["refreshes"], oauth["refused"]) == (2, 0)


async def test_a_restart_keeps_the_stored_pair_over_the_spent_env_token(
    portal: Portal, store: Store, db: asyncpg.Connection
) -> None:
    await (await _client(portal, store)).call("crm.deal.list", {})
    portal.sim.expire_tokens()
    # restarted with the same environment: its BITRIX24_REFRESH_TOKEN was spent long ago
    restarted = await _client(portal, store)
    await restarted.call("crm.deal.list", {})
    oauth = portal.sim.report()["oauth"]
    assert (oauth["refreshes"], oauth["refused"]) == (2, 0)
    assert await _stored_refresh_token(db) == oauth["refresh_token"]


async def test_a_refused_refresh_token_is_unauthorized_and_keeps_the_row(
    portal: Portal, store: Store, db: asyncpg.Connection
) -> None:
    api = await _client(portal, store, refresh_token="revoked")
    with pytest.raises(CrmUnauthorized, match="invalid_grant"):
        await api.call("crm.deal.list", {})
    assert await _stored_refresh_token(db) == "revoked"  # nothing half-written
