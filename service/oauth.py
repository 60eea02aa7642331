"""amoCRM OAuth tokens kept in the database, refreshed once across every process."""

from __future__ import annotations

import time

import aiohttp

from service.crm.amocrm_api import exchange_refresh_token
from service.crm.http import Gate
from service.settings import Settings
from service.store import Store, StoredTokens

CRM = "amocrm"


class OAuthTokens:
    """TokenSource backed by the `oauth_tokens` row; the env pair only seeds an empty row."""

    def __init__(
        self, store: Store, session: aiohttp.ClientSession, settings: Settings, gate: Gate
    ) -> None:
        self.store = store
        self.session = session
        self.settings = settings
        self.gate = gate
        self._current: str | None = None

    async def seed(self) -> None:
        """Store the configured refresh token unless a newer pair is stored already
        (the configured one was spent by an earlier refresh)."""
        assert self.settings.amocrm_refresh_token is not None
        await self.store.seed_tokens(
            CRM,
            StoredTokens(
                access_token="", refresh_token=self.settings.amocrm_refresh_token, expires_at=0
            ),
        )

    async def access_token(self) -> str:
        if self._current is None:
            stored = await self.store.tokens(CRM)
            if stored is None or not stored.access_token or stored.expires_at < time.time() + 60:
                return await self.refresh(stored.access_token if stored else "")
            self._current = stored.access_token
        return self._current

    async def refresh(self, stale_access_token: str) -> str:
        fresh = await self.store.refresh_tokens(CRM, stale_access_token, self._exchange)
        self._current = fresh.access_token
        return fresh.access_token

    async def _exchange(self, refresh_token: str) -> StoredTokens:
        s = self.settings
        assert s.amocrm_base_url and s.amocrm_client_id and s.amocrm_client_secret
        pair = await exchange_refresh_token(
            self.session,
            s.amocrm_base_url,
            client_id=s.amocrm_client_id,
            client_secret=s.amocrm_client_secret,
            refresh_token=refresh_token,
            redirect_uri=s.amocrm_redirect_uri or "",
            timeout_s=s.crm_timeout_s,
            gate=self.gate,
        )
        return StoredTokens(pair.access_token, pair.refresh_token, pair.expires_at)
