"""The one way CRM clients talk HTTP: through a rate-limit gate, JSON in, JSON out.

Transport failures (timeouts, resets, disconnects, a 2xx we cannot parse) become `CrmRetryable`
here; HTTP statuses are left to each client, because every CRM means something else by them.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import orjson
from yarl import URL

from service.errors import CrmRetryable


class Gate(Protocol):
    """Admission to the CRM: every outbound request waits for one slot and holds it while sent."""

    def slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Wait until the rate limit lets one more request through."""
        ...


async def send_json(
    session: aiohttp.ClientSession,
    gate: Gate,
    method: str,
    url: str,
    *,
    json_body: Any = None,
    params: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
    timeout_s: float,
) -> tuple[int, Any, Mapping[str, str]]:
    """Send one request through `gate` and return (status, parsed JSON, response headers).

    The parsed body is None for 204 or an empty body. A non-2xx body that is not JSON comes back
    as text so the caller can quote it. Transport failures raise `CrmRetryable`; statuses are not
    mapped here.
    """
    where = _describe(method, url)
    data = None if json_body is None else orjson.dumps(json_body)
    request_headers = {"Accept": "application/json"}
    if data is not None:
        request_headers["Content-Type"] = "application/json"
    request_headers.update(headers or {})
    try:
        async with (
            gate.slot(),
            session.request(
                method,
                url,
                data=data,
                params=params,
                headers=request_headers,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                # A CRM API that redirects means a wrong base URL; following it would turn a
                # POST into a GET and may carry the token to another host.
                allow_redirects=False,
            ) as response,
        ):
            raw = await response.read()
            status, response_headers = response.status, response.headers
    except TimeoutError as exc:
        raise CrmRetryable(f"{where}: no answer within {timeout_s:g} s") from exc
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise CrmRetryable(f"{where}: request failed ({_reason(exc)})") from exc
    return status, _parse_body(where, status, raw), response_headers


def _parse_body(where: str, status: int, raw: bytes) -> Any:
    if status == 204 or not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if 200 <= status < 300:
            raise CrmRetryable(
                f"{where}: answered {status} with a body that is not JSON", status=status
            ) from exc
        return raw.decode("utf-8", errors="replace")


def _reason(exc: BaseException) -> str:
    # Connection errors name host and port at most; others (InvalidURL, ClientResponseError)
    # may quote the whole URL, so only their type is kept.
    if isinstance(exc, aiohttp.ClientConnectionError | ConnectionError) and str(exc):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


def _describe(method: str, url: str) -> str:
    # Only host and last path segment: a Bitrix24 webhook URL carries its secret in the path and
    # query strings carry phones and e-mails, neither of which belongs in logs.
    parsed = URL(url)
    return f"{method.upper()} {parsed.host or '?'} …/{parsed.name}"


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Read `Retry-After` as seconds from now (delay-seconds or an HTTP date); garbage → None.

    A date in the past gives 0.0. The lookup is case-insensitive even for a plain dict.
    """
    value = _header(headers, "Retry-After")
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        return _seconds_until(value)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _seconds_until(http_date: str) -> float | None:
    try:
        when = parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" parses zone-less; HTTP dates are always GMT anyway
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    for key, candidate in headers.items():
        if key.lower() == wanted:
            return candidate
    return None
