"""OAuth tokens kept in the database (amoCRM, Bitrix24), refreshed once across every process."""

from __future__ import annotations

import logging
import time

import aiohttp

from service.crm.amocrm.api import exchange_refresh_token
from service.crm.bitrix24 import oauth as bitrix24_oauth
from service.crm.http import Gate
from service.db.store import Store, StoredTokens
from service.settings import CrmSettings

log = logging.getLogger(__name__)

CRM = "amocrm"
BITRIX24 = "bitrix24"


class OAuthTokens:
    """TokenSource backed by the `oauth_tokens` row; the env pair only seeds an empty row.

    amoCRM's by default; a subclass names its CRM's row, refresh token and exchange. The clients
    keep the token in memory and refresh it once per process (`service.crm.http.Credentials`);
    this is the part shared by every process: the row, and its lock around each exchange.
    """

    crm = CRM

    def __init__(
        self, store: Store, session: aiohttp.ClientSession, settings: CrmSettings, gate: Gate
    ) -> None:
        self.store = store
        self.session = session
        self.settings = settings
        # amoCRM's token endpoint is on the API host, inside its limit: the exchange takes a
        # slot, but the gate's next one, not one behind the calls that wait for its token (the
        # app hands over `RateGate.front()`)
        self.token_gate = gate

    def configured_refresh_token(self) -> str | None:
        return self.settings.amocrm.refresh_token

    async def seed(self) -> None:
        """Store the configured refresh token unless a newer pair is stored already
        (the configured one was spent by an earlier refresh)."""
        refresh_token = self.configured_refresh_token()
        assert refresh_token is not None
        await self.store.seed_tokens(
            self.crm, StoredTokens(access_token="", refresh_token=refresh_token, expires_at=0)
        )

    async def access_token(self) -> str:
        """The stored token; refreshed first when there is none yet or it is about to expire."""
        stored = await self.store.tokens(self.crm)
        if stored is None or not stored.access_token or stored.expires_at < time.time() + 60:
            return await self.refresh(stored.access_token if stored else "")
        return stored.access_token

    async def refresh(self, stale_access_token: str) -> str:
        """A fresh token for the refused one, refreshed once across every process: under the
        row's lock, whoever finds it already replaced takes the stored pair instead of spending
        the single-use refresh token again (Store.refresh_tokens)."""
        fresh = await self.store.refresh_tokens(self.crm, stale_access_token, self._exchange)
        return fresh.access_token

    async def _exchange(self, refresh_token: str) -> StoredTokens:
        s = self.settings.amocrm
        assert s.base_url and s.client_id and s.client_secret
        pair = await exchange_refresh_token(
            self.session,
            s.base_url,
            client_id=s.client_id,
            client_secret=s.client_secret,
            refresh_token=refresh_token,
            redirect_uri=s.redirect_uri or "",
            timeout_s=self.settings.timeout_s,
            gate=self.token_gate,
        )
        return StoredTokens(pair.access_token, pair.refresh_token, pair.expires_at)


class Bitrix24OAuthTokens(OAuthTokens):
    """Bitrix24 app tokens in the `bitrix24` row: access tokens live an hour, refresh tokens 28
    days and once, so the same store-before-use refresh applies."""

    crm = BITRIX24

    def configured_refresh_token(self) -> str | None:
        return self.settings.bitrix24.refresh_token

    async def _exchange(self, refresh_token: str) -> StoredTokens:
        s = self.settings.bitrix24
        assert s.client_id and s.client_secret
        pair, endpoint = await bitrix24_oauth.exchange_refresh_token(
            self.session,
            s.oauth_url,
            client_id=s.client_id,
            client_secret=s.client_secret,
            refresh_token=refresh_token,
            timeout_s=self.settings.timeout_s,
        )  # no CRM gate: oauth.bitrix.info is outside the portal's limit
        if endpoint and s.portal_url and not _same_endpoint(endpoint, s.portal_url):
            # We keep calling the configured portal; a moved portal (a renamed domain) shows here.
            log.warning(
                "Bitrix24 tokens are for another portal than BITRIX24_PORTAL_URL",
                extra={"action": "bitrix24_endpoint_mismatch", "client_endpoint": endpoint},
            )
        return StoredTokens(pair.access_token, pair.refresh_token, pair.expires_at)


def _same_endpoint(a: str, b: str) -> bool:
    return a.rstrip("/").lower() == b.rstrip("/").lower()
