"""Bitrix24 OAuth app tokens over HTTP: trading a refresh token for a new pair, nothing stored.

As documented at apidocs.bitrix24.com: `GET https://oauth.bitrix.info/oauth/token/?grant_type=
refresh_token&client_id=…&client_secret=…&refresh_token=…` answers `access_token`,
`refresh_token`, `expires_in` (3600), `client_endpoint` (`https://<portal>/rest/`), `domain`,
`member_id`. Access tokens live an hour; refresh tokens 28 days and are single-use, so the caller
must store the new pair before using it (service/crm/oauth.py does).
"""

from __future__ import annotations

import time
from typing import Any

import aiohttp

from service.crm.amocrm.api import TokenPair
from service.crm.http import UNGATED, Gate, send_json
from service.errors import CrmRetryable, CrmUnauthorized

_DEFAULT_TOKEN_LIFETIME_S = 3600.0  # what Bitrix24 documents for `expires_in`
_MESSAGE_LIMIT = 300


async def exchange_refresh_token(
    session: aiohttp.ClientSession,
    oauth_url: str,
    *,
    client_id: str,
    client_secret: str,
    refresh_token: str,
    timeout_s: float,
    gate: Gate = UNGATED,
) -> tuple[TokenPair, str | None]:
    """Trade a (single-use) refresh token for a new pair and the portal's `client_endpoint`.

    The token server is another host than the portal and outside its bucket, so by default the
    exchange takes no slot of the CRM gate (and never queues behind the calls waiting for it).

    A refused refresh token (`invalid_grant`, 400 or 401 — which one is unconfirmed) or client
    (`invalid_client`) → `CrmUnauthorized`: only a new authorisation of the app fixes it.
    The secret and the token travel in the query string as documented; `send_json` names only
    host and path, so they never reach a log.
    """
    status, body, _ = await send_json(
        session,
        gate,
        "GET",
        oauth_url,
        params={
            "grant_type": "refresh_token",
            "client_id": client_id,
            "client_secret": client_secret,
            "refresh_token": refresh_token,
        },
        timeout_s=timeout_s,
    )
    code = body.get("error") if isinstance(body, dict) else None
    if status in (400, 401) or code in ("invalid_grant", "invalid_client"):
        raise CrmUnauthorized(_refused(status, body), status=status)
    if not 200 <= status < 300 or code is not None:
        raise CrmRetryable(
            f"Bitrix24 OAuth server answered {status} ({code or '-'})", status=status
        )
    return _parse_pair(body), _endpoint(body)


def _parse_pair(body: Any) -> TokenPair:
    access = body.get("access_token") if isinstance(body, dict) else None
    refresh = body.get("refresh_token") if isinstance(body, dict) else None
    if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
        raise CrmRetryable("Bitrix24 OAuth server answered without a token pair")
    # The old refresh token is already spent: keep a pair with an odd `expires_in` rather than
    # lose it, and assume the documented hour.
    lifetime = body.get("expires_in")
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = _DEFAULT_TOKEN_LIFETIME_S
    return TokenPair(access, refresh, time.time() + float(lifetime))


def _endpoint(body: Any) -> str | None:
    value = body.get("client_endpoint")
    return value if isinstance(value, str) and value else None


def _refused(status: int, body: Any) -> str:
    code = description = ""
    if isinstance(body, dict):
        code, description = str(body.get("error", "")), str(body.get("error_description", ""))
    message = f"Bitrix24 refused the refresh token ({status}): {code or '-'}: {description or '-'}"
    return message[:_MESSAGE_LIMIT]
