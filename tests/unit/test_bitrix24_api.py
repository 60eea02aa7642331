"""Unit tests of the Bitrix24 HTTP client.

aioresponses stands in for the portal where an exact answer is needed (error shapes the
simulator never produces); the rest runs against the simulator over real HTTP. A counting gate
checks that every request, a whole batch included, took exactly one rate-limit slot.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import aiohttp
import orjson
import pytest
from aioresponses import aioresponses

from service.crm.bitrix24.api import (
    Bitrix24Api,
    BitrixContact,
    BitrixNotFound,
    Ref,
    build_query,
    error_for,
    findbycomm_commands,
    parse_deal,
)
from service.errors import (
    CrmBlocked,
    CrmError,
    CrmPermanent,
    CrmRateLimited,
    CrmRetryable,
    CrmUnauthorized,
)
from service.simulators.bitrix24.batch import parse_command
from service.simulators.bitrix24.server import BitrixSimulator, start_bitrix_simulator

SECRET = "s3cr3t-path-token"
WEBHOOK = f"https://portal.bitrix24.kz/rest/7/{SECRET}/"


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


class _CompatResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required `stream_writer` (aioresponses#289)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


class _Aioresponses(aioresponses):
    def add(self, url: Any, method: str = "GET", **kwargs: Any) -> None:  # type: ignore[override]
        kwargs.setdefault("response_class", _CompatResponse)
        super().add(url, method, **kwargs)


def _bodies(mocked: aioresponses) -> list[tuple[str, Any]]:
    return [
        (str(url), orjson.loads(call.kwargs["data"]))
        for (_, url), calls in mocked.requests.items()
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
def mocked(gate: CountingGate) -> Iterator[aioresponses]:
    with _Aioresponses() as mock:
        yield mock
        assert gate.slots == sum(len(calls) for calls in mock.requests.values())
        assert gate.active == 0


@pytest.fixture
def api(session: aiohttp.ClientSession, gate: CountingGate) -> Bitrix24Api:
    return Bitrix24Api(session, WEBHOOK, gate, timeout_s=5)


@pytest.fixture
async def sim_api(
    session: aiohttp.ClientSession, gate: CountingGate
) -> AsyncIterator[tuple[BitrixSimulator, Bitrix24Api]]:
    sim = BitrixSimulator()
    runner, url = await start_bitrix_simulator(sim)
    yield sim, Bitrix24Api(session, sim.webhook_url(url), gate, timeout_s=5)
    await runner.cleanup()


# ---- calls and error mapping --------------------------------------------------------------------


async def test_call_posts_json_to_the_method_and_returns_result(
    api: Bitrix24Api, mocked: aioresponses
) -> None:
    mocked.post(f"{WEBHOOK}crm.deal.add.json", payload={"result": 77, "time": {}})
    assert await api.call("crm.deal.add", {"fields": {"TITLE": "x"}}) == 77
    [(url, body)] = _bodies(mocked)
    assert url == f"{WEBHOOK}crm.deal.add.json" and body == {"fields": {"TITLE": "x"}}
    assert SECRET not in repr(api)


def limit_reset() -> dict[str, float]:
    """A `time` block whose method limit resets 30 s from now (computed when the test runs)."""
    return {"operating_reset_at": time.time() + 30, "operating": 480.5}


@pytest.mark.parametrize(
    ("status", "body", "kind"),
    [
        (503, {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many"}, CrmRateLimited),
        (401, {"error": "OVERLOAD_LIMIT", "error_description": "blocked"}, CrmBlocked),
        (401, {"error": "INVALID_CREDENTIALS", "error_description": "x"}, CrmUnauthorized),
        (401, {"error": "expired_token", "error_description": "x"}, CrmUnauthorized),
        (403, {"error": "insufficient_scope", "error_description": "x"}, CrmUnauthorized),
        (400, {"error": "ERROR_CORE", "error_description": "bad TITLE"}, CrmPermanent),
        (404, {"error": "ERROR_METHOD_NOT_FOUND", "error_description": "?"}, CrmPermanent),
        (400, {"error": "", "error_description": "Not found"}, BitrixNotFound),
        (500, {"error": "INTERNAL_SERVER_ERROR", "error_description": "x"}, CrmRetryable),
        (503, {"title": "Service Unavailable"}, CrmRetryable),
        (502, "<html>502 Bad Gateway</html>", CrmRetryable),
        (200, {"error": "ERROR_CORE", "error_description": "x"}, CrmPermanent),
        (200, {"unexpected": True}, CrmRetryable),
        (418, None, CrmPermanent),
    ],
)
async def test_errors_map_in_one_place(
    api: Bitrix24Api, mocked: aioresponses, status: int, body: Any, kind: type[CrmError]
) -> None:
    text = body if isinstance(body, str) else orjson.dumps(body).decode() if body else ""
    mocked.post(f"{WEBHOOK}crm.deal.add.json", status=status, body=text)
    with pytest.raises(CrmError) as caught:
        await api.call("crm.deal.add", {})
    assert type(caught.value) is kind
    assert SECRET not in str(caught.value) and "portal.bitrix24.kz" not in str(caught.value)
    if kind is CrmRateLimited:
        assert isinstance(caught.value, CrmRateLimited) and caught.value.scope is None


async def test_operation_time_limit_pauses_only_that_method(
    api: Bitrix24Api, mocked: aioresponses
) -> None:
    body = {"error": "OPERATION_TIME_LIMIT", "error_description": "x", "time": limit_reset()}
    mocked.post(f"{WEBHOOK}crm.deal.list.json", status=429, payload=body)
    with pytest.raises(CrmRateLimited) as caught:
        await api.call("crm.deal.list", {})
    assert caught.value.scope == "crm.deal.list" and caught.value.status == 429
    assert caught.value.retry_after == pytest.approx(30, abs=5)
    without_time = error_for("crm.deal.add", "OPERATION_TIME_LIMIT", "x", status=429)
    assert isinstance(without_time, CrmRateLimited) and without_time.retry_after is None


async def test_transport_failures_are_retryable(api: Bitrix24Api, mocked: aioresponses) -> None:
    mocked.post(f"{WEBHOOK}batch.json", exception=aiohttp.ServerDisconnectedError())
    with pytest.raises(CrmRetryable) as caught:
        await api.batch({"a": "crm.deal.get?id=1"})
    assert SECRET not in str(caught.value)


# ---- batch --------------------------------------------------------------------------------------


async def test_batch_splits_results_and_per_command_errors(
    api: Bitrix24Api, mocked: aioresponses
) -> None:
    envelope = {
        "result": {
            "result": {"c0": 15, "f0": []},
            "result_error": {
                "d0": {"error": "ERROR_CORE", "error_description": "Stage?"},
                "l0": {"error": "OPERATION_TIME_LIMIT", "error_description": "blocked"},
                "q0": {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "x"},
            },
            "result_total": [],
            "result_next": [],
            "result_time": {"l0": limit_reset()},
        },
        "time": {},
    }
    mocked.post(f"{WEBHOOK}batch.json", payload=envelope)
    cmds = {
        "c0": "crm.contact.add?fields[NAME]=x",
        "d0": "crm.deal.add?fields[CONTACT_IDS][0]=$result[c0]",
        "f0": "crm.duplicate.findbycomm?type=PHONE&values[0]=1",
        "l0": "crm.deal.list?filter[CLOSED]=N",
        "q0": "crm.deal.get?id=1",
        "skipped": "crm.deal.get?id=2",
    }
    answer = await api.batch(cmds, halt=True)

    assert answer.result == {"c0": 15, "f0": []}
    assert set(answer.errors) == {"d0", "l0", "q0", "skipped"}
    assert type(answer.errors["d0"]) is CrmPermanent and "Stage?" in str(answer.errors["d0"])
    limited = answer.errors["l0"]
    assert isinstance(limited, CrmRateLimited) and limited.scope == "crm.deal.list"
    assert limited.retry_after == pytest.approx(30, abs=5)
    assert isinstance(answer.errors["q0"], CrmRateLimited) and answer.errors["q0"].scope is None
    assert type(answer.errors["skipped"]) is CrmRetryable  # halted before it ran
    [(url, body)] = _bodies(mocked)
    assert url == f"{WEBHOOK}batch.json" and body == {"halt": 1, "cmd": cmds}


async def test_batch_answer_without_sections_is_retryable(
    api: Bitrix24Api, mocked: aioresponses
) -> None:
    mocked.post(f"{WEBHOOK}batch.json", payload={"result": {"nothing": "here"}})
    with pytest.raises(CrmRetryable, match="result_error"):
        await api.batch({"a": "crm.deal.get?id=1"})
    with pytest.raises(ValueError, match="50"):
        await api.batch({f"a{n}": "crm.deal.get?id=1" for n in range(51)})


def test_build_query_round_trips_through_the_simulators_parser() -> None:
    params = {
        "id": 5,
        "fields": {
            "NAME": "Иван & Co = 100% +1 [x]",
            "PHONE": [{"VALUE": "+77010000001", "VALUE_TYPE": "WORK"}],
            "CONTACT_IDS": [Ref("c3")],
            "OPENED": True,
            "COMMENTS": None,
        },
        "select": ["ID", "TITLE"],
    }
    query = build_query(params)
    assert "fields[PHONE][0][VALUE]=%2B77010000001" in query
    assert "fields[CONTACT_IDS][0]=$result[c3]" in query
    method, parsed = parse_command("crm.deal.update?" + query)
    assert method == "crm.deal.update"
    assert parsed == {
        "id": "5",
        "fields": {
            "NAME": "Иван & Co = 100% +1 [x]",
            "PHONE": [{"VALUE": "+77010000001", "VALUE_TYPE": "WORK"}],
            "CONTACT_IDS": ["$result[c3]"],
            "OPENED": "Y",
            "COMMENTS": "",
        },
        "select": ["ID", "TITLE"],
    }
    assert str(Ref("f0", ("CONTACT", 0))) == "$result[f0][CONTACT][0]"


def test_people_cannot_smuggle_batch_references_in_their_data() -> None:
    text = "$result[c1] and $result_error[c2], $NEXT[a] $Total[b] $time.x[c] $ErRoR[d]"
    query = build_query({"fields": {"NAME": text, "X": "$5", "Y": "$resultat"}})
    _, parsed = parse_command("crm.contact.add?" + query)
    assert parsed["fields"]["NAME"] == text.replace("$", "＄")
    assert parsed["fields"]["X"] == "$5"
    assert parsed["fields"]["Y"] == "＄resultat"


def test_findbycomm_commands_take_20_values_each_and_deals_parse() -> None:
    cmds = findbycomm_commands("EMAIL", [f"p{n}@x.kz" for n in range(45)], "f")
    assert list(cmds) == ["f0", "f1", "f2"]
    assert [len(parse_command(c)[1]["values"]) for c in cmds.values()] == [20, 20, 5]
    row = {"ID": "9", "CATEGORY_ID": "2", "STAGE_ID": "C2:WON", "CLOSED": "Y", "CONTACT_ID": None}
    deal = parse_deal(row)
    assert deal is not None and (deal.id, deal.category_id, deal.is_open) == (9, 2, False)
    assert parse_deal({"TITLE": "no id"}) is None
    contact = BitrixContact(1, ("+7 (701) 000-00-01",), ("A@B.kz",))
    assert contact.has("PHONE", "+77010000001") and contact.has("EMAIL", "a@b.kz")
    assert not contact.has("PHONE", "+7701000000") and not contact.has("PHONE", "")
    assert contact.has("PHONE", "87010000001")  # a trunk prefix instead of +7: same number
    assert not contact.has("PHONE", "+77010000002") and not contact.has("EMAIL", "")


# ---- typed helpers against the simulator --------------------------------------------------------


async def test_find_contacts_by_attributes_ids_to_values(
    sim_api: tuple[BitrixSimulator, Bitrix24Api], gate: CountingGate
) -> None:
    sim, api = sim_api
    emails = [f"p{n}@x.kz" for n in range(30)]
    assert await api.find_contacts_by("EMAIL", emails) == {e: [] for e in emails}
    assert gate.slots == 1  # nothing found: one batch for 30 values

    anna = await api.call("crm.contact.add", {"fields": {"EMAIL": [{"VALUE": "P3@x.kz"}]}})
    both = await api.call(
        "crm.contact.add", {"fields": {"EMAIL": [{"VALUE": "p3@x.kz"}, {"VALUE": "p25@x.kz"}]}}
    )
    gate.slots = 0
    found = await api.find_contacts_by("EMAIL", emails)
    assert found["p3@x.kz"] == [anna, both] and found["p25@x.kz"] == [both]
    assert sum(map(len, found.values())) == 3
    assert gate.slots == 2  # findbycomm, then one crm.contact.get batch for the hits
    assert sim.report()["requests_by_endpoint"] == {"batch": 3, "crm.contact.add": 2}

    assert await api.get_deal(424242) is None
    deal_id = await api.call("crm.deal.add", {"fields": {"TITLE": "x", "CONTACT_IDS": [anna]}})
    deal = await api.get_deal(deal_id)
    assert deal is not None and deal.is_open and deal.contact_id == anna


class ExpiringTokens:
    """A TokenSource whose first token the portal has already expired."""

    def __init__(self) -> None:
        self.refreshed: list[str] = []

    async def access_token(self) -> str:
        return "old"

    async def refresh(self, stale_access_token: str) -> str:
        self.refreshed.append(stale_access_token)
        return "new"


async def test_oauth_hook_sends_auth_and_refreshes_once(
    session: aiohttp.ClientSession, gate: CountingGate, mocked: aioresponses
) -> None:
    tokens = ExpiringTokens()
    api = Bitrix24Api(session, "https://portal.bitrix24.kz/rest/", gate, tokens=tokens)
    url = "https://portal.bitrix24.kz/rest/crm.deal.get.json"
    mocked.post(url, status=401, payload={"error": "expired_token", "error_description": "x"})
    mocked.post(url, payload={"result": {"ID": "1"}})
    assert await api.call("crm.deal.get", {"id": 1}) == {"ID": "1"}
    assert tokens.refreshed == ["old"]
    assert [body["auth"] for _, body in _bodies(mocked)] == ["old", "new"]


def test_user_access_error_is_a_credentials_problem_not_a_bad_lead() -> None:
    """`user_access_error` (403) means the webhook's user lacks rights (CRM_FACTS.md, "Bitrix24
    stages"): every request fails alike, so the circuit opens and nobody goes dead."""
    for status in (403, None):  # a whole request, or one command inside a batch
        error = error_for("crm.contact.add", "user_access_error", "Access denied", status=status)
        assert isinstance(error, CrmUnauthorized), error
        assert "user_access_error" in str(error)
