"""The Bitrix24 simulator's OAuth app: the token server and the `auth=` check on REST calls.

Real Bitrix24 (apidocs.bitrix24.com): a local or market app trades its refresh token at
`https://oauth.bitrix.info/oauth/token/?grant_type=refresh_token&client_id=…&client_secret=…
&refresh_token=…` for a new pair; access tokens live an hour, refresh tokens 28 days and only
once. REST calls then go to `{client_endpoint}{method}.json` with `auth=<access token>`. Here the
token server is served by the simulator itself at `/oauth/token/`, and `/rest/{method}.json`
(no user id, no secret in the path) is the OAuth form of every REST method, `batch` included:
the batch's own `auth` covers its commands.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

import orjson
from aiohttp import web

from service.simulators.bitrix24.entities import BitrixFault
from service.simulators.common import json_answer

__all__ = ["BitrixOAuthConfig", "BitrixTokens", "auth_param"]


@dataclass
class BitrixOAuthConfig:
    """The simulated app's credentials and token lifetime."""

    client_id: str = "local.sim-app"
    client_secret: str = "sim-app-secret"
    refresh_token: str = "sim-b24-refresh-0"  # the first valid refresh token (single-use)
    token_ttl_s: float = 3600.0
    member_id: str = "sim-member-id"


class BitrixTokens:
    """Issued access tokens with their expiry, and the one live refresh token."""

    def __init__(self, config: BitrixOAuthConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        """Back to the configured refresh token; no access token issued, nothing counted."""
        self.refresh_token = self.config.refresh_token
        self._issued: dict[str, float] = {}  # access token -> clock time it expires
        self._serial = itertools.count(1)
        self.refreshes = 0
        self.refused = 0

    def expire_all(self) -> None:
        """Every issued access token answers `expired_token` from now on."""
        self._issued = dict.fromkeys(self._issued, float("-inf"))

    def refusal(self, token: str, now: float) -> BitrixFault | None:
        """Why a REST call with `auth=token` is refused, or None when the token is good."""
        if not token:
            return BitrixFault("NO_AUTH_FOUND", "Wrong authorization data", 401)
        expires_at = self._issued.get(token)
        if expires_at is None:
            return BitrixFault("invalid_token", "The access token provided is invalid.", 401)
        if expires_at <= now:
            return BitrixFault("expired_token", "The access token provided has expired.", 401)
        return None

    def exchange(self, params: dict[str, Any], now: float, client_endpoint: str) -> dict[str, Any]:
        """Trade the live refresh token for a new pair; the old one dies with this answer."""
        config = self.config
        if params.get("grant_type") != "refresh_token":
            raise self._refuse("unsupported_grant_type", "Only refresh_token is supported", 400)
        if (params.get("client_id"), params.get("client_secret")) != (
            config.client_id,
            config.client_secret,
        ):
            raise self._refuse("invalid_client", "Invalid client credentials", 401)
        if params.get("refresh_token") != self.refresh_token:
            # Real Bitrix24's status here is unconfirmed (400 or 401); the code is invalid_grant.
            raise self._refuse("invalid_grant", "Invalid refresh token", 400)
        serial = next(self._serial)
        access = f"sim-b24-access-{serial}"
        self.refresh_token = f"sim-b24-refresh-{serial}"
        self._issued[access] = now + config.token_ttl_s
        self.refreshes += 1
        return {
            "access_token": access,
            "expires": int(now + config.token_ttl_s),
            "expires_in": int(config.token_ttl_s),
            "scope": "crm",
            "domain": client_endpoint.split("://", 1)[-1].split("/", 1)[0],
            "server_endpoint": "https://oauth.bitrix.info/rest/",
            "status": "L",
            "client_endpoint": client_endpoint,
            "member_id": config.member_id,
            "user_id": 1,
            "refresh_token": self.refresh_token,
        }

    async def answer(self, request: web.Request, now: float) -> web.Response:
        """`GET|POST /oauth/token/`: the refresh_token grant, parameters in query or body."""
        endpoint = f"{request.scheme}://{request.host}/rest/"
        try:
            return json_answer(self.exchange(await _top_level(request), now, endpoint))
        except BitrixFault as fault:
            return json_answer(fault.to_json(), fault.status)

    def to_json(self) -> dict[str, Any]:
        """What `/_sim/state` shows under `oauth`."""
        return {
            "refreshes": self.refreshes,
            "refused": self.refused,
            "refresh_token": self.refresh_token,
        }

    def _refuse(self, code: str, description: str, status: int) -> BitrixFault:
        self.refused += 1
        return BitrixFault(code, description, status)


async def auth_param(request: web.Request) -> str:
    """The `auth` parameter of a REST call (query string, JSON or form body); "" if none."""
    try:
        auth = (await _top_level(request)).get("auth")
    except BitrixFault:  # an unreadable body carries no token either
        return ""
    return auth if isinstance(auth, str) else ""


async def _top_level(request: web.Request) -> dict[str, Any]:
    """Query string merged with the body's top-level keys (JSON or urlencoded)."""
    params: dict[str, Any] = dict(request.query)
    raw = await request.read()  # aiohttp keeps the body: the method handler reads it again
    if not raw.strip():
        return params
    try:
        if request.content_type == "application/x-www-form-urlencoded":
            body: Any = dict(parse_qsl(raw.decode(), keep_blank_values=True))
        else:
            body = orjson.loads(raw)
    except (UnicodeDecodeError, orjson.JSONDecodeError):
        raise BitrixFault("invalid_request", "The request body cannot be parsed") from None
    return params | body if isinstance(body, dict) else params
