"""Unit tests of the amoCRM HTTP client and the shared CRM HTTP helpers.

aioresponses stands in for amoCRM here (and only here: this is one HTTP client's unit test).
A counting gate checks that every request, including the one repeated after a token refresh,
went through exactly one rate-limit slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aioresponses import aioresponses

from service.crm.amocrm.api import (
    MAX_BATCH,
    AmoContact,
    AmoCrmApi,
    AmoLead,
    ComplexResult,
    StaticToken,
    TokenPair,
    contact_fields,
    digits,
    exchange_refresh_token,
)
from service.crm.http import retry_after_seconds, send_json
from service.errors import (
    CrmBlocked,
    CrmPermanent,
    CrmRateLimited,
    CrmRetryable,
    CrmUnauthorized,
)

BASE = "https://example.amocrm.ru"
CONTACTS = f"{BASE}/api/v4/contacts"
SEARCH = f"{CONTACTS}?query=%2B77011234567&with=leads"
LEADS = f"{BASE}/api/v4/leads"
COMPLEX = f"{LEADS}/complex"
LEAD_7 = f"{LEADS}/7?with=contacts"
TOKEN_URL = f"{BASE}/oauth2/access_token"


class CountingGate:
    """A Gate that admits everything and counts the slots taken."""

    def __init__(self) -> None:
        self.slots = 0
        self.active = 0

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.slots += 1
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


class FakeTokens:
    """A TokenSource that records which stale tokens it was asked to refresh."""

    def __init__(self) -> None:
        self.token = "old-token"
        self.refreshed: list[str] = []

    async def access_token(self) -> str:
        return self.token

    async def refresh(self, stale_access_token: str) -> str:
        self.refreshed.append(stale_access_token)
        self.token = "new-token"
        return self.token


class _CompatResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required `stream_writer` (aioresponses#289).

    Its fake responses are built with `writer=None` ("request already sent"), for which aiohttp
    only reads `stream_writer.output_size`; a stub with that attribute is all it needs.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


class _Aioresponses(aioresponses):
    def add(self, url: Any, method: str = "GET", **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("response_class", _CompatResponse)
        super().add(url, method, **kwargs)


def _requests(mocked: aioresponses) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, str(url), call.kwargs)
        for (method, url), calls in mocked.requests.items()
        for call in calls
    ]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def gate() -> CountingGate:
    return CountingGate()


@pytest.fixture
def tokens() -> FakeTokens:
    return FakeTokens()


@pytest.fixture
def mocked(gate: CountingGate) -> Iterator[aioresponses]:
    with _Aioresponses() as mock:
        yield mock
        # Every test: one slot per request sent, and every slot given back.
        assert gate.slots == len(_requests(mock))
        assert gate.active == 0


@pytest.fixture
def api(session: aiohttp.ClientSession, tokens: FakeTokens, gate: CountingGate) -> AmoCrmApi:
    return AmoCrmApi(session, BASE + "/", tokens, gate, timeout_s=5)


# --- search -----------------------------------------------------------------------------------


async def test_search_nothing_found_is_204_and_empty(api: AmoCrmApi, mocked: aioresponses) -> None:
    mocked.get(SEARCH, status=204, body="")
    assert await api.search_contacts("+77011234567") == []
    [(method, _, kwargs)] = _requests(mocked)
    assert method == "GET"
    assert kwargs["headers"]["Authorization"] == "Bearer old-token"


async def test_search_parses_contacts_fields_and_leads(
    api: AmoCrmApi, mocked: aioresponses
) -> None:
    contacts = [
        {
            "id": 11,
            "name": "Aigerim",
            "custom_fields_values": [
                {"field_code": "PHONE", "values": [{"value": "+7 701 123-45-67"}, {"value": ""}]},
                {
                    "field_code": "EMAIL",
                    "values": [{"value": "a@example.com", "enum_code": "WORK"}],
                },
                {"field_code": "PHONE", "values": None},
                {"field_code": "EMAIL", "values": "not a list"},
                {"values": [{"value": "no code"}]},
                {"field_code": "PHONE", "values": [{"enum_code": "WORK"}, "junk", {"value": None}]},
                "not a field",
            ],
            "_embedded": {"leads": [{"id": 101}, {"id": 102}, {"no": "id"}]},
        },
        {"id": 12, "name": None, "custom_fields_values": None},
        {"name": "no id, skipped"},
        "junk",
    ]
    mocked.get(SEARCH, payload={"_embedded": {"contacts": contacts}})
    found = await api.search_contacts("+77011234567")
    assert found == [
        AmoContact(11, "Aigerim", ("+7 701 123-45-67",), ("a@example.com",), (101, 102)),
        AmoContact(12, None, (), (), ()),
    ]


async def test_search_without_envelope_is_retryable(api: AmoCrmApi, mocked: aioresponses) -> None:
    # "Nothing found" must come as 204; a 200 we cannot read must not pass as "no contact".
    mocked.get(SEARCH, payload={"unexpected": True})
    with pytest.raises(CrmRetryable, match=r"_embedded\.contacts"):
        await api.search_contacts("+77011234567")


# --- leads ------------------------------------------------------------------------------------


async def test_get_lead_parses_and_404_is_none(api: AmoCrmApi, mocked: aioresponses) -> None:
    lead = {"id": 7, "pipeline_id": 3, "status_id": 142, "_embedded": {"contacts": [{"id": 11}]}}
    mocked.get(LEAD_7, payload=lead)
    mocked.get(LEAD_7, status=404, body="")
    got = await api.get_lead(7)
    assert got == AmoLead(7, 3, 142, (11,))
    assert got is not None and not got.is_open
    assert AmoLead(7, 3, 20, ()).is_open
    assert await api.get_lead(7) is None


async def test_create_complex_keeps_request_order(api: AmoCrmApi, mocked: aioresponses) -> None:
    answer = [
        {"id": 1, "contact_id": 10, "company_id": None, "request_id": ["a"], "merged": False},
        {"id": 2, "contact_id": 20, "company_id": None, "request_id": ["b"], "merged": True},
        {"id": 3, "contact_id": None, "request_id": ["c"]},
    ]
    mocked.post(COMPLEX, payload=answer)
    mocked.post(COMPLEX, payload=list(reversed(answer)))
    leads = [{"name": f"lead {tag}", "request_id": tag} for tag in "abc"]
    for _ in range(2):  # as answered, then answered backwards: matched on request_id both times
        results = await api.create_complex(leads)
        assert [(r.lead_id, r.contact_id, r.merged, r.request_id) for r in results] == [
            (1, 10, False, "a"),
            (2, 20, True, "b"),
            (3, None, False, "c"),
        ]
    [(_, _, first), _] = _requests(mocked)
    assert orjson.loads(first["data"]) == leads


async def test_create_complex_without_request_ids_trusts_position(
    api: AmoCrmApi, mocked: aioresponses
) -> None:
    mocked.post(COMPLEX, payload=[{"id": 5, "contact_id": 6}, {"id": 4, "contact_id": "7"}])
    results = await api.create_complex([{"name": "x"}, {"name": "y"}])
    assert [(r.lead_id, r.contact_id, r.request_id) for r in results] == [
        (5, 6, None),
        (4, 7, None),
    ]


async def test_create_complex_shorter_answer_is_matched_by_request_id(
    api: AmoCrmApi, mocked: aioresponses
) -> None:
    """Duplicate control merged "b" into another lead of the request: the answer has two items
    for three leads. Position would give "b" the lead of "c"; request_id gives "c" its own and
    "b" a retryable error (its retry finds the contact and its open lead)."""
    answer = [
        {"id": 1, "contact_id": 10, "request_id": ["a"], "merged": False},
        {"id": 3, "contact_id": 30, "request_id": ["c", "b"], "merged": True},
    ]
    mocked.post(COMPLEX, payload=answer)
    leads = [{"name": f"lead {tag}", "request_id": tag} for tag in "abc"]
    first, second, third = await api.create_complex(leads)
    assert isinstance(first, ComplexResult) and first.lead_id == 1
    assert isinstance(second, CrmRetryable)
    assert isinstance(third, ComplexResult) and (third.lead_id, third.contact_id) == (3, 30)


async def test_create_complex_count_mismatch_is_retryable(
    api: AmoCrmApi, mocked: aioresponses
) -> None:
    mocked.post(COMPLEX, payload=[{"id": 5}])
    with pytest.raises(CrmRetryable, match="unexpected body"):
        await api.create_complex([{"name": "x"}, {"name": "y"}])


async def test_batches_over_fifty_are_refused_before_sending(
    api: AmoCrmApi, mocked: aioresponses, gate: CountingGate
) -> None:
    too_many = [{"id": n, "name": "x"} for n in range(1, MAX_BATCH + 2)]
    for call in (api.create_complex, api.create_leads, api.update_leads, api.add_notes):
        with pytest.raises(ValueError, match="at most 50"):
            await call(too_many)
    assert await api.create_complex([]) == []
    assert gate.slots == 0


async def test_create_update_notes_and_pipelines(api: AmoCrmApi, mocked: aioresponses) -> None:
    mocked.post(
        LEADS, payload={"_embedded": {"leads": [{"id": 31, "request_id": "0"}, {"id": 32}]}}
    )
    mocked.patch(LEADS, payload={"_embedded": {"leads": [{"id": 31}]}})
    mocked.patch(CONTACTS, payload={"_embedded": {"contacts": [{"id": 11}]}})
    mocked.post(f"{LEADS}/notes", payload={"_embedded": {"notes": [{"id": 900}]}})
    statuses = {"statuses": [{"id": 1}, {"id": 142}, {"id": "junk"}]}
    pipelines = [{"id": 3, "_embedded": statuses}, {"id": 4}, {"name": "no id"}]
    mocked.get(f"{LEADS}/pipelines", payload={"_embedded": {"pipelines": pipelines}})

    assert await api.create_leads([{"name": "a"}, {"name": "b"}]) == [31, 32]
    await api.update_leads([{"id": 31, "status_id": 142}])
    await api.update_contacts([{"id": 11, "name": "Aigerim"}])
    await api.add_notes([{"entity_id": 31, "note_type": "common", "params": {"text": "hi"}}])
    assert await api.pipelines() == {3: {1, 142}, 4: set()}

    sent = [(method, url.removeprefix(BASE)) for method, url, _ in _requests(mocked)]
    assert sent == [
        ("POST", "/api/v4/leads"),
        ("PATCH", "/api/v4/leads"),
        ("PATCH", "/api/v4/contacts"),
        ("POST", "/api/v4/leads/notes"),
        ("GET", "/api/v4/leads/pipelines"),
    ]
    patch_call = _requests(mocked)[1][2]
    assert orjson.loads(patch_call["data"]) == [{"id": 31, "status_id": 142}]
    assert patch_call["headers"]["Content-Type"] == "application/json"


async def test_patch_without_id_is_refused(api: AmoCrmApi, mocked: aioresponses) -> None:
    with pytest.raises(ValueError, match="'id'"):
        await api.update_leads([{"status_id": 142}])


# --- 401 and token refresh --------------------------------------------------------------------


async def test_401_refreshes_once_and_repeats(
    api: AmoCrmApi, mocked: aioresponses, tokens: FakeTokens, gate: CountingGate
) -> None:
    mocked.get(SEARCH, status=401, payload={"title": "Unauthorized"})
    mocked.get(SEARCH, status=204)
    assert await api.search_contacts("+77011234567") == []
    assert tokens.refreshed == ["old-token"]
    auth = [kwargs["headers"]["Authorization"] for _, _, kwargs in _requests(mocked)]
    assert auth == ["Bearer old-token", "Bearer new-token"]
    assert gate.slots == 2


async def test_401_twice_is_unauthorized(
    api: AmoCrmApi, mocked: aioresponses, tokens: FakeTokens, gate: CountingGate
) -> None:
    mocked.post(COMPLEX, status=401, repeat=True)
    with pytest.raises(CrmUnauthorized) as caught:
        await api.create_complex([{"name": "x"}])
    assert caught.value.status == 401
    assert tokens.refreshed == ["old-token"]
    assert gate.slots == 2


async def test_static_token_refused_is_unauthorized(
    session: aiohttp.ClientSession, mocked: aioresponses, gate: CountingGate
) -> None:
    api = AmoCrmApi(session, BASE, StaticToken("long-lived"), gate)
    mocked.get(SEARCH, status=401)
    with pytest.raises(CrmUnauthorized, match="AMOCRM_ACCESS_TOKEN was refused"):
        await api.search_contacts("+77011234567")
    assert "long-lived" not in repr(StaticToken("long-lived"))


# --- status mapping ---------------------------------------------------------------------------


async def test_429_with_retry_after(api: AmoCrmApi, mocked: aioresponses) -> None:
    mocked.get(SEARCH, status=429, headers={"Retry-After": "3"})
    with pytest.raises(CrmRateLimited) as caught:
        await api.search_contacts("+77011234567")
    assert (caught.value.retry_after, caught.value.status, caught.value.scope) == (3.0, 429, None)


async def test_429_without_retry_after(api: AmoCrmApi, mocked: aioresponses) -> None:
    mocked.get(SEARCH, status=429, body="")
    with pytest.raises(CrmRateLimited) as caught:
        await api.search_contacts("+77011234567")
    assert caught.value.retry_after is None


async def test_403_is_blocked(api: AmoCrmApi, mocked: aioresponses) -> None:
    mocked.post(COMPLEX, status=403, body="<html>Forbidden</html>", content_type="text/html")
    with pytest.raises(CrmBlocked) as caught:
        await api.create_complex([{"name": "x"}])
    assert caught.value.status == 403


async def test_400_problem_json_is_permanent_with_details(
    api: AmoCrmApi, mocked: aioresponses
) -> None:
    problem = {
        "validation-errors": [
            {
                "request_id": "0",
                "errors": [
                    {
                        "code": "NotSupportedChoice",
                        "path": "custom_fields_values.0.field_id",
                        "detail": "The value you selected is not a valid choice.",
                    },
                    {"code": "InvalidType", "path": "pipeline_id", "detail": "Must be int"},
                ],
            }
        ],
        "title": "Bad Request",
        "type": "https://httpstatus.es/400",
        "status": 400,
        "detail": "Request validation failed",
    }
    mocked.post(COMPLEX, status=400, payload=problem, content_type="application/problem+json")
    with pytest.raises(CrmPermanent) as caught:
        await api.create_complex([{"name": "x"}])
    message = str(caught.value)
    assert "custom_fields_values.0.field_id: The value you selected is not" in message
    assert "pipeline_id: Must be int" in message
    assert caught.value.status == 400


@pytest.mark.parametrize("status", [404, 405, 409, 422])
async def test_other_client_errors_are_permanent(
    api: AmoCrmApi, mocked: aioresponses, status: int
) -> None:
    mocked.post(COMPLEX, status=status, payload={"title": "Nope", "detail": "x" * 2000})
    with pytest.raises(CrmPermanent) as caught:
        await api.create_complex([{"name": "x"}])
    assert "Nope" in str(caught.value)
    assert len(str(caught.value)) <= 500


@pytest.mark.parametrize(
    ("status", "words"), [(500, "server error"), (502, "server error"), (504, "too big")]
)
async def test_5xx_is_retryable(
    api: AmoCrmApi, mocked: aioresponses, status: int, words: str
) -> None:
    mocked.post(COMPLEX, status=status, body="<html>Bad Gateway</html>", content_type="text/html")
    with pytest.raises(CrmRetryable, match=words) as caught:
        await api.create_complex([{"name": "x"}])
    assert caught.value.status == status


async def test_unexpected_status_is_retryable(api: AmoCrmApi, mocked: aioresponses) -> None:
    mocked.get(SEARCH, status=302, headers={"Location": "https://elsewhere.example/"})
    with pytest.raises(CrmRetryable, match="unexpected status 302"):
        await api.search_contacts("+77011234567")


# --- transport failures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        TimeoutError(),
        aiohttp.ServerTimeoutError("read timeout"),
        aiohttp.ClientConnectionError("refused"),
        aiohttp.ServerDisconnectedError(),
        ConnectionResetError("reset by peer"),
        aiohttp.ClientPayloadError("truncated"),
        aiohttp.InvalidURL(SEARCH),
    ],
)
async def test_transport_failures_are_retryable(
    api: AmoCrmApi, mocked: aioresponses, failure: BaseException
) -> None:
    mocked.get(SEARCH, exception=failure)
    with pytest.raises(CrmRetryable, match=r"GET example\.amocrm\.ru …/contacts") as caught:
        await api.search_contacts("+77011234567")
    assert "7701" not in str(caught.value)  # the query (a phone) stays out of messages


async def test_malformed_json_on_200_is_retryable(api: AmoCrmApi, mocked: aioresponses) -> None:
    mocked.get(SEARCH, status=200, body='{"_embedded": {"contacts": [', content_type="text/html")
    with pytest.raises(CrmRetryable, match="not JSON"):
        await api.search_contacts("+77011234567")


async def test_real_timeout_is_retryable(gate: CountingGate) -> None:
    # aioresponses ignores timeouts, so check the real ClientTimeout against a slow server.
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response()

    app = web.Application()
    app.router.add_get("/slow", slow)
    async with TestServer(app) as server, aiohttp.ClientSession() as client_session:
        with pytest.raises(CrmRetryable, match=r"no answer within 0\.1 s"):
            await send_json(
                client_session, gate, "GET", str(server.make_url("/slow")), timeout_s=0.1
            )
    assert (gate.slots, gate.active) == (1, 0)


# --- OAuth2 token exchange --------------------------------------------------------------------


async def _exchange(session: aiohttp.ClientSession, gate: CountingGate) -> TokenPair:
    return await exchange_refresh_token(
        session,
        BASE,
        client_id="cid",
        client_secret="secret",
        refresh_token="refresh-1",
        redirect_uri="https://relay.example/oauth",
        timeout_s=5,
        gate=gate,
    )


async def test_exchange_refresh_token_success(
    session: aiohttp.ClientSession, mocked: aioresponses, gate: CountingGate
) -> None:
    answer = {
        "token_type": "Bearer",
        "expires_in": 86400,
        "access_token": "access-2",
        "refresh_token": "refresh-2",
    }
    mocked.post(TOKEN_URL, payload=answer)
    pair = await _exchange(session, gate)
    assert (pair.access_token, pair.refresh_token) == ("access-2", "refresh-2")
    assert pair.expires_at == pytest.approx(time.time() + 86400, abs=5)
    assert "access-2" not in repr(pair) and "refresh-2" not in repr(pair)
    [(_, _, kwargs)] = _requests(mocked)
    assert orjson.loads(kwargs["data"]) == {
        "client_id": "cid",
        "client_secret": "secret",
        "grant_type": "refresh_token",
        "refresh_token": "refresh-1",
        "redirect_uri": "https://relay.example/oauth",
    }


async def test_exchange_keeps_a_pair_with_odd_expires_in(
    session: aiohttp.ClientSession, mocked: aioresponses, gate: CountingGate
) -> None:
    mocked.post(TOKEN_URL, payload={"access_token": "a", "refresh_token": "r", "expires_in": None})
    pair = await _exchange(session, gate)
    assert pair.expires_at == pytest.approx(time.time() + 86400, abs=5)


@pytest.mark.parametrize("status", [400, 401])
async def test_exchange_revoked_is_unauthorized(
    session: aiohttp.ClientSession, mocked: aioresponses, gate: CountingGate, status: int
) -> None:
    problem = {"title": "Bad Request", "hint": "Token has been revoked", "status": status}
    mocked.post(TOKEN_URL, status=status, payload=problem)
    with pytest.raises(CrmUnauthorized, match="Token has been revoked") as caught:
        await _exchange(session, gate)
    assert "secret" not in str(caught.value)


async def test_exchange_failures_are_retryable(
    session: aiohttp.ClientSession, mocked: aioresponses, gate: CountingGate
) -> None:
    mocked.post(TOKEN_URL, status=503)
    mocked.post(TOKEN_URL, exception=TimeoutError())
    mocked.post(TOKEN_URL, payload={"token_type": "Bearer"})
    for _ in range(3):
        with pytest.raises(CrmRetryable):
            await _exchange(session, gate)


# --- pure helpers -----------------------------------------------------------------------------


def _http_date(delta: timedelta) -> str:
    return format_datetime(datetime.now(UTC) + delta, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "120"}, 120.0),
        ({"retry-after": " 7 "}, 7.0),
        ({"Retry-After": "1.5"}, 1.5),
        ({"Retry-After": "0"}, 0.0),
        ({}, None),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": "-5"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "Wed, 99 Oct 2015 07:28:00 GMT"}, None),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 -0000"}, 0.0),
    ],
)
def test_retry_after_seconds(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_seconds(headers) == expected


def test_retry_after_seconds_future_http_date() -> None:
    seconds = retry_after_seconds({"Retry-After": _http_date(timedelta(seconds=90))})
    assert seconds == pytest.approx(90, abs=2)


def test_contact_fields_and_digits() -> None:
    assert contact_fields("+77011234567", "a@example.com") == [
        {"field_code": "PHONE", "values": [{"value": "+77011234567", "enum_code": "WORK"}]},
        {"field_code": "EMAIL", "values": [{"value": "a@example.com", "enum_code": "WORK"}]},
    ]
    assert contact_fields(None, "") == []
    assert digits("+7 (701) 123-45-67") == "77011234567"
    assert digits("٣٤ ext. ²") == ""  # only ASCII digits count
