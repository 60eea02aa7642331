"""The one way CRM clients talk HTTP: through a rate-limit gate, JSON in, JSON out.

Transport failures (timeouts, resets, disconnects, a 2xx we cannot parse) become `CrmRetryable`
here; HTTP statuses are left to each client, because every CRM means something else by them.

Calls that carry an OAuth token go through `send_with_token`, whichever CRM: the token is read
only once the call's rate slot is granted, and a refused token is refreshed once per process
however many calls were queued with it (`Credentials`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import orjson
from yarl import URL

from service.errors import CrmRetryable

Answer = tuple[int, Any, Mapping[str, str]]  # status, parsed JSON body, response headers
# How often one call may find its token refused while it waited (each time a refresh ran, and
# the CRM refused the fresh token too): more means the CRM refuses every token.
_MAX_FLIGHTS = 3


class Gate(Protocol):
    """Admission to the CRM: every outbound request waits for one slot and holds it while sent."""

    def slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """Wait until the rate limit lets one more request through."""
        ...


class Ungated:
    """A Gate for a host outside the CRM's limit (Bitrix24's token server): admits at once."""

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        yield


UNGATED = Ungated()


class TokenSource(Protocol):
    """Where a CRM client gets its token, and a fresh one after the CRM refused it
    (service/crm/oauth.py; amoCRM's long-lived `StaticToken`)."""

    async def access_token(self) -> str:
        """The token to use now (may read the database, or refresh a missing one)."""
        ...

    async def refresh(self, stale_access_token: str) -> str:
        """A fresh token to replace `stale_access_token`, which the CRM just refused."""
        ...


class Credentials:
    """A TokenSource's token as one client's callers use it (the app makes one client per
    process).

    The token is read when a call's rate slot is granted (`current`), not when it starts
    queueing: a call that queued behind a refusal never sends the token that was refused while
    it waited. Loading and refreshing are single-flight: the first refusal starts the refresh,
    every caller reporting the same token joins it, and none of them holds a slot meanwhile
    (`ready` is awaited outside the gate). Across processes, `TokenSource.refresh` (the store's
    row lock) keeps the single-use refresh token from being spent twice.
    """

    def __init__(self, source: TokenSource) -> None:
        self._source = source
        self._token: str | None = None
        self._refused = False  # the CRM refused `_token`: nobody sends it again
        self._flight: asyncio.Task[None] | None = None

    def current(self) -> str | None:
        """The token to send now; None while it must first be loaded or refreshed."""
        return None if self._refused else self._token

    def refused(self, token: str) -> None:
        """The CRM refused `token`. A token replaced since then is not refreshed again."""
        if token == self._token:
            self._refused = True

    async def ready(self) -> None:
        """Wait until `current()` has a token: load or refresh it, or join the load or refresh
        under way. A failed one raises to every caller that waited for it; the next `ready`
        loads the token again."""
        for _ in range(_MAX_FLIGHTS):
            if self.current() is not None:
                return
            if self._flight is None or self._flight.done():
                self._flight = asyncio.create_task(self._fly())
                self._flight.add_done_callback(_retrieved)
            # Shielded: a caller that gives up (a cancelled job) must not cancel everybody's
            # refresh, least of all between the token server's answer and the stored pair.
            await asyncio.shield(self._flight)
        raise CrmRetryable("the CRM refused each fresh token at once")

    async def _fly(self) -> None:
        stale = self._token if self._refused else None
        try:
            if stale is None:
                token = await self._source.access_token()
            else:
                token = await self._source.refresh(stale)
        except BaseException:
            # The next call starts over from the source: another process may have refreshed
            # the token meanwhile, and a refused long-lived token may be accepted again.
            self._token, self._refused = None, False
            raise
        else:
            self._token, self._refused = token, False
        finally:
            self._flight = None  # before anyone who waited resumes


def _retrieved(task: asyncio.Task[None]) -> None:
    # Every waiter may have been cancelled: the failure is theirs to see, not the loop's to log.
    if not task.cancelled():
        task.exception()


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
) -> Answer:
    """Send one request through `gate` and return (status, parsed JSON, response headers).

    The parsed body is None for 204 or an empty body. A non-2xx body that is not JSON comes back
    as text so the caller can quote it. Transport failures raise `CrmRetryable`; statuses are not
    mapped here.
    """
    async with gate.slot():
        return await _request(session, method, url, json_body, params, headers, timeout_s)


async def send_with_token(
    session: aiohttp.ClientSession,
    gate: Gate,
    credentials: Credentials,
    method: str,
    url: str,
    *,
    authorize: Callable[[str], tuple[Any, Mapping[str, str]]],
    refused: Callable[[int, Any], bool],
    params: Mapping[str, str] | None = None,
    timeout_s: float,
) -> Answer:
    """`send_json` with the token `authorize(token)` puts into (JSON body, headers), read once
    the slot is granted. If the answer is `refused(status, body)`, wait for the one refresh
    (holding no slot) and repeat once; a second refusal is returned to the caller to map."""
    for _ in range(2):
        token, answer = await _send_authorized(
            session, gate, credentials, method, url, authorize, params, timeout_s
        )
        if not refused(answer[0], answer[1]):
            break
        credentials.refused(token)
    return answer


async def _send_authorized(
    session: aiohttp.ClientSession,
    gate: Gate,
    credentials: Credentials,
    method: str,
    url: str,
    authorize: Callable[[str], tuple[Any, Mapping[str, str]]],
    params: Mapping[str, str] | None,
    timeout_s: float,
) -> tuple[str, Answer]:
    for _ in range(_MAX_FLIGHTS):
        await credentials.ready()
        async with gate.slot():
            token = credentials.current()
            # None: another call's refusal came while we queued. Give the slot back unused
            # (nothing could be sent with it before the refresh anyway) and wait for it.
            if token is not None:
                json_body, headers = authorize(token)
                answer = await _request(session, method, url, json_body, params, headers, timeout_s)
                return token, answer
    raise CrmRetryable(f"{_describe(method, url)}: the token kept being refreshed")


async def _request(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    json_body: Any,
    params: Mapping[str, str] | None,
    headers: Mapping[str, str] | None,
    timeout_s: float,
) -> Answer:
    """One request, sent now (the caller holds its slot)."""
    where = _describe(method, url)
    data = None if json_body is None else orjson.dumps(json_body)
    request_headers = {"Accept": "application/json"}
    if data is not None:
        request_headers["Content-Type"] = "application/json"
    request_headers.update(headers or {})
    try:
        async with session.request(
            method,
            url,
            data=data,
            params=params,
            headers=request_headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            # A CRM API that redirects means a wrong base URL; following it would turn a
            # POST into a GET and may carry the token to another host.
            allow_redirects=False,
        ) as response:
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
