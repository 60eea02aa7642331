"""The amoCRM simulator over real HTTP: search, writes, validation, limits, tokens, faults."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from service.simulators.amocrm.server import (
    AmoCrmSimulator,
    SimulatorConfig,
    run_fake_crm,
    start_simulator,
)
from service.simulators.common import SlidingWindowLimit, max_in_window

AUTH = {"Authorization": "Bearer sim-access-token"}
PHONE = "+7 916 123-45-67"


@dataclass
class Amo:
    """A running simulator and a session pointed at it."""

    sim: AmoCrmSimulator
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        """One request with the long-lived token; JSON body or None for an empty one."""
        headers = kw.pop("headers", AUTH)
        async with self.http.request(method, path, json=body, headers=headers, **kw) as resp:
            if "json" not in resp.content_type:
                return resp.status, await resp.text() or None
            return resp.status, await resp.json(content_type=None)


StartAmo = Callable[..., Awaitable[Amo]]


@pytest.fixture
async def start_amo() -> AsyncIterator[StartAmo]:
    """Factory: a fresh simulator per call, stopped and disconnected after the test."""
    opened: list[tuple[aiohttp.web.AppRunner, aiohttp.ClientSession]] = []

    async def start(**config: Any) -> Amo:
        sim = AmoCrmSimulator(SimulatorConfig(**config))
        runner, url = await start_simulator(sim)
        session = aiohttp.ClientSession(base_url=url)
        opened.append((runner, session))
        return Amo(sim, session)

    yield start
    for runner, session in opened:
        await session.close()
        await runner.cleanup()


@pytest.fixture
async def amo(start_amo: StartAmo) -> Amo:
    return await start_amo(rate_limit=1000)


def contact(phone: str | None = PHONE, email: str | None = None, name: str = "Ivan") -> Any:
    fields = []
    if phone:
        fields.append({"field_code": "PHONE", "values": [{"value": phone, "enum_code": "WORK"}]})
    if email:
        fields.append({"field_code": "EMAIL", "values": [{"value": email, "enum_code": "WORK"}]})
    return {"first_name": name, "custom_fields_values": fields}


def complex_lead(**kw: Any) -> dict[str, Any]:
    lead: dict[str, Any] = {"name": "Lead", "pipeline_id": 1000, "status_id": 10000}
    lead["_embedded"] = {"contacts": [kw.pop("contact", contact())], "tags": [{"name": "site"}]}
    return lead | kw


# ---- search and reads ---------------------------------------------------------------------------


async def test_search_with_no_match_is_204_with_empty_body(amo: Amo) -> None:
    async with amo.http.get(
        "/api/v4/contacts", params={"query": "+79990000000"}, headers=AUTH
    ) as resp:
        assert resp.status == 204
        assert await resp.read() == b""


async def test_complex_create_then_search_finds_contact_with_leads(amo: Amo) -> None:
    status, created = await amo.call("POST", "/api/v4/leads/complex", [complex_lead()])
    assert status == 200
    [answer] = created
    assert answer["contact_id"] and answer["merged"] is False and answer["company_id"] is None
    assert answer["request_id"] == ["0"]

    # a substring search: the national number finds "+79161234567", another prefix does not
    assert (await amo.call("GET", "/api/v4/contacts?query=89161234567"))[0] == 204
    status, found = await amo.call("GET", "/api/v4/contacts?query=9161234567&with=leads")
    [hit] = found["_embedded"]["contacts"]
    assert status == 200 and hit["id"] == answer["contact_id"]
    assert hit["custom_fields_values"][0]["values"][0]["value"] == PHONE  # stored as sent
    assert hit["_embedded"]["leads"] == [{"id": answer["id"]}]

    _, without = await amo.call("GET", "/api/v4/contacts?query=9161234567")
    assert "leads" not in without["_embedded"]["contacts"][0]["_embedded"]
    status, lead = await amo.call("GET", f"/api/v4/leads/{answer['id']}")
    assert lead["status_id"] == 10000 and lead["_embedded"]["contacts"][0]["id"] == hit["id"]
    assert lead["_embedded"]["tags"][0]["name"] == "site"
    assert (await amo.call("GET", "/api/v4/leads/1"))[0] == 404


async def test_search_is_fuzzy_so_callers_must_recheck(amo: Amo) -> None:
    people = [contact("+79161234567"), contact("+79161234568"), contact(None, "Anna@Mail.ru")]
    await amo.call("POST", "/api/v4/contacts", people)

    _, near = await amo.call("GET", "/api/v4/contacts?query=%2B7916123456")
    assert len(near["_embedded"]["contacts"]) == 2  # both phones contain the query
    _, by_email = await amo.call("GET", "/api/v4/contacts?query=anna@mail")
    assert len(by_email["_embedded"]["contacts"]) == 1
    assert (await amo.call("GET", "/api/v4/contacts?query=4567"))[0] == 204  # < 5 digits


# ---- writes and validation ----------------------------------------------------------------------


async def test_complex_takes_at_most_50_leads(amo: Amo) -> None:
    status, problem = await amo.call("POST", "/api/v4/leads/complex", [complex_lead()] * 51)
    assert status == 400 and problem["validation-errors"]
    assert amo.sim.report()["leads"] == []
    status, created = await amo.call("POST", "/api/v4/leads/complex", [complex_lead()] * 50)
    assert status == 200 and len(created) == 50


async def test_validation_errors_have_amocrm_shape_and_store_nothing(amo: Amo) -> None:
    batch = [complex_lead(pipeline_id=4242), complex_lead(status_id=999, request_id="b")]
    async with amo.http.post("/api/v4/leads/complex", json=batch, headers=AUTH) as resp:
        assert resp.status == 400
        assert resp.content_type == "application/problem+json"
        body = await resp.json(content_type=None)
    assert body["title"] == "Bad Request" and body["status"] == 400
    assert body["detail"] == "Request validation failed"
    errors = {e["request_id"]: e["errors"] for e in body["validation-errors"]}
    assert errors["0"][0]["code"] == "NotSupportedChoice"
    assert errors["0"][0]["path"] == "pipeline_id"
    assert errors["b"][0]["path"] == "status_id"
    assert amo.sim.report()["contacts"] == []

    status, body = await amo.call("POST", "/api/v4/leads/complex", {"name": "not an array"})
    assert status == 400 and body["validation-errors"][0]["errors"][0]["code"] == "InvalidType"
    status, _ = await amo.call("POST", "/api/v4/leads", [{"_embedded": {"contacts": [{"id": 1}]}}])
    assert status == 400  # link to a contact that does not exist


async def test_leads_and_contacts_endpoints_link_by_id(amo: Amo) -> None:
    status, body = await amo.call("POST", "/api/v4/contacts", [contact() | {"request_id": "c1"}])
    [made] = body["_embedded"]["contacts"]
    assert status == 200 and made["request_id"] == "c1"
    lead = {"name": "x", "_embedded": {"contacts": [{"id": made["id"]}]}}
    status, body = await amo.call("POST", "/api/v4/leads", [lead])
    [made_lead] = body["_embedded"]["leads"]
    _, got = await amo.call("GET", f"/api/v4/contacts/{made['id']}?with=leads")
    assert got["_embedded"]["leads"] == [{"id": made_lead["id"]}]


async def test_contacts_and_leads_are_read_by_many_ids_as_php_reads_filter_id(amo: Amo) -> None:
    _, made = await amo.call("POST", "/api/v4/leads/complex", [complex_lead() for _ in range(3)])
    contacts, leads = [m["contact_id"] for m in made], [m["id"] for m in made]
    # `filter[id][]=` repeated and `filter[id][n]=` are one array to PHP; one id alone works too
    repeated = "&".join(f"filter[id][]={i}" for i in contacts[:2])
    status, body = await amo.call("GET", f"/api/v4/contacts?{repeated}&with=leads")
    got = body["_embedded"]["contacts"]
    assert status == 200 and [c["id"] for c in got] == contacts[:2]
    assert got[0]["_embedded"]["leads"] == [{"id": leads[0]}]
    indexed = "&".join(f"filter[id][{n}]={i}" for n, i in enumerate([leads[2], 999_999]))
    status, body = await amo.call("GET", f"/api/v4/leads?{indexed}&limit=250")
    [lead] = body["_embedded"]["leads"]  # an id the account lacks is left out
    assert status == 200 and lead["id"] == leads[2]
    assert lead["_embedded"]["contacts"][0]["id"] == contacts[2]
    _, body = await amo.call("GET", f"/api/v4/leads?filter[id]={leads[1]}")
    assert [x["id"] for x in body["_embedded"]["leads"]] == [leads[1]]
    assert (await amo.call("GET", "/api/v4/leads?filter[id][]=999999"))[0] == 204
    assert (await amo.call("GET", "/api/v4/leads?filter[id][]=x"))[0] == 400
    assert (await amo.call("GET", "/api/v4/leads?limit=251"))[0] == 400
    # a page holds `limit` (default 50); `_links.next` while more match
    _, body = await amo.call(
        "GET", f"/api/v4/leads?{indexed.replace('999999', str(leads[0]))}&limit=1"
    )
    assert len(body["_embedded"]["leads"]) == 1 and "next" in body["_links"]
    assert amo.sim.api.contact_reads["ids"] == 1


async def test_notes_are_added_to_existing_leads(amo: Amo) -> None:
    _, [created] = await amo.call("POST", "/api/v4/leads/complex", [complex_lead()])
    note = {"entity_id": created["id"], "note_type": "common", "params": {"text": "hi"}}
    status, body = await amo.call("POST", "/api/v4/leads/notes", [note])
    assert status == 200
    assert body["_embedded"]["notes"][0]["entity_id"] == created["id"]
    assert amo.sim.report()["notes"][0]["params"] == {"text": "hi"}
    status, _ = await amo.call("POST", "/api/v4/leads/notes", [note | {"entity_id": 123}])
    assert status == 400


async def test_patch_moves_leads_and_rejects_unknown_ids(amo: Amo) -> None:
    _, [created] = await amo.call("POST", "/api/v4/leads/complex", [complex_lead()])
    lead_id = created["id"]
    status, body = await amo.call("PATCH", "/api/v4/leads", [{"id": lead_id, "status_id": 142}])
    assert status == 200 and body["_embedded"]["leads"][0]["id"] == lead_id
    status, body = await amo.call("PATCH", f"/api/v4/leads/{lead_id}", {"price": 500})
    assert status == 200 and body["id"] == lead_id and "updated_at" in body
    _, lead = await amo.call("GET", f"/api/v4/leads/{lead_id}")
    assert (lead["status_id"], lead["price"]) == (142, 500)

    assert (await amo.call("PATCH", "/api/v4/leads", [{"id": 1, "status_id": 142}]))[0] == 400
    bad_status = [{"id": lead_id, "status_id": 777}]
    assert (await amo.call("PATCH", "/api/v4/leads", bad_status))[0] == 400


async def test_patch_contact_replaces_fields_per_code(amo: Amo) -> None:
    _, [created] = await amo.call("POST", "/api/v4/leads/complex", [complex_lead()])
    email = {"field_code": "EMAIL", "values": [{"value": "i@x.ru", "enum_code": "WORK"}]}
    patch = [{"id": created["contact_id"], "custom_fields_values": [email]}]
    assert (await amo.call("PATCH", "/api/v4/contacts", patch))[0] == 200
    _, got = await amo.call("GET", f"/api/v4/contacts/{created['contact_id']}")
    codes = [f["field_code"] for f in got["custom_fields_values"]]
    assert codes == ["PHONE", "EMAIL"]


async def test_pipelines_default_and_added(amo: Amo) -> None:
    _, body = await amo.call("GET", "/api/v4/leads/pipelines")
    [main] = body["_embedded"]["pipelines"]
    assert main["id"] == 1000
    assert [s["id"] for s in main["_embedded"]["statuses"]] == [10000, 10001, 142, 143]

    status, _ = await amo.call("POST", "/_sim/pipelines", {"id": 2000, "statuses": [20000]})
    assert status == 200
    ok = complex_lead(pipeline_id=2000, status_id=20000)
    assert (await amo.call("POST", "/api/v4/leads/complex", [ok]))[0] == 200
    wrong = complex_lead(pipeline_id=2000, status_id=10000)
    assert (await amo.call("POST", "/api/v4/leads/complex", [wrong]))[0] == 400


# ---- limits -------------------------------------------------------------------------------------


def test_sliding_window_is_half_open_and_counts_every_arrival() -> None:
    limit = SlidingWindowLimit(1.0)
    assert all(limit.arrive(k / 7, 7) for k in range(7))
    assert limit.arrive(1.0, 7)  # the arrival at t=0 has just left the window
    assert not limit.arrive(1.1, 7)  # 8 in (0.1, 1.1]
    assert not limit.arrive(1.2, 7)  # refused arrivals count too
    assert max_in_window([0, 0.5, 0.99, 0.999], 1.0) == 4
    assert max_in_window([0, 0.5, 0.99, 1.0], 1.0) == 3


async def test_burst_over_the_limit_gets_exactly_the_excess_refused(start_amo: StartAmo) -> None:
    amo = await start_amo(rate_limit=7)
    answers = await asyncio.gather(*(amo.call("GET", "/api/v4/leads/pipelines") for _ in range(10)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 7 + [429] * 3
    assert {"title": "Too Many Requests", "status": 429}.items() <= dict(
        next(body for status, body in answers if status == 429)
    ).items()
    report = amo.sim.report()
    assert report["violations"] == 3 and report["max_in_any_second"] == 10
    assert report["answers_by_status"] == {"200": 7, "429": 3}


async def test_client_spaced_at_the_rate_never_sees_429(start_amo: StartAmo) -> None:
    amo = await start_amo(rate_limit=10)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for k in range(14):
        # 1/rate apart plus 15%: any 11 sends span 1.15 s, so up to 150 ms of scheduling
        # jitter between send and arrival (seen on a loaded CI box) still stays under the limit
        await asyncio.sleep(max(0.0, start + k * 0.115 - loop.time()))
        status, _ = await amo.call("GET", "/api/v4/leads/pipelines")
        assert status == 200
    report = amo.sim.report()
    assert report["violations"] == 0 and report["max_in_any_second"] <= 10


async def test_repeated_429s_block_the_account_until_unblocked(start_amo: StartAmo) -> None:
    amo = await start_amo(rate_limit=7, block_after=3)
    await asyncio.gather(*(amo.call("GET", "/api/v4/leads/pipelines") for _ in range(10)))
    status, body = await amo.call("GET", "/api/v4/leads/pipelines")
    assert status == 403 and body["detail"] == "Account is blocked"
    assert (await amo.call("POST", "/oauth2/access_token", {}))[0] == 403
    assert amo.sim.report()["blocked"] is True

    assert (await amo.call("POST", "/_sim/unblock"))[0] == 200
    assert (await amo.call("GET", "/api/v4/leads/pipelines"))[0] == 200


# ---- duplicates ---------------------------------------------------------------------------------


async def test_duplicates_report_shared_identities_and_several_open_leads(amo: Amo) -> None:
    _, body = await amo.call(
        "POST", "/api/v4/contacts", [contact(PHONE), contact("+79161234567", "A@b.ru")]
    )
    first, second = (c["id"] for c in body["_embedded"]["contacts"])
    link = {"_embedded": {"contacts": [{"id": first}]}}
    _, body = await amo.call("POST", "/api/v4/leads", [link, link])
    lead_ids = [lead["id"] for lead in body["_embedded"]["leads"]]

    dupes = amo.sim.report()["duplicates"]
    assert dupes["contacts_sharing_identity"] == [
        {"identity": "+79161234567", "contact_ids": [first, second]}
    ]
    assert dupes["contacts_with_several_open_leads"] == [
        {"contact_id": first, "lead_ids": lead_ids}
    ]
    await amo.call("PATCH", "/api/v4/leads", [{"id": lead_ids[0], "status_id": 143}])
    _, state = await amo.call("GET", "/_sim/state")
    assert state["duplicates"]["contacts_with_several_open_leads"] == []


async def test_merge_duplicates_links_the_existing_contact(start_amo: StartAmo) -> None:
    amo = await start_amo(merge_duplicates=True, rate_limit=1000)
    _, [first] = await amo.call("POST", "/api/v4/leads/complex", [complex_lead()])
    again = complex_lead(contact=contact("+79161234567", "new@x.ru"))
    _, [second] = await amo.call("POST", "/api/v4/leads/complex", [again])
    assert second["merged"] is True and second["contact_id"] == first["contact_id"]
    report = amo.sim.report()
    assert len(report["contacts"]) == 1
    values = [
        v["value"] for f in report["contacts"][0]["custom_fields_values"] for v in f["values"]
    ]
    assert values == [PHONE, "new@x.ru"]  # the email it lacked was added, the phone was not
    # duplicate control merges contacts, not leads: this is still a duplicate in work
    assert report["duplicates"]["contacts_with_several_open_leads"]

    amo.sim.config.merge_duplicates = False
    _, [third] = await amo.call("POST", "/api/v4/leads/complex", [complex_lead()])
    assert third["merged"] is False and third["contact_id"] != first["contact_id"]


async def test_merged_in_one_request_answers_fewer_items(start_amo: StartAmo) -> None:
    """Two leads of one request whose contacts duplicate control merges: one lead, one answer
    entry; the answer is shorter than the request, so only its request_ids tell whose it is."""
    amo = await start_amo(merge_duplicates=True, rate_limit=1000)
    a = complex_lead(request_id="a", contact=contact(PHONE, "a@x.ru"))
    b = complex_lead(request_id="b", contact=contact(PHONE, "b@x.ru"))
    c = complex_lead(request_id="c", contact=contact("+77011112233"))
    status, answer = await amo.call("POST", "/api/v4/leads/complex", [a, b, c])
    assert status == 200
    assert [item["request_id"] for item in answer] == [["a"], ["c"]]
    report = amo.sim.report()
    assert len(report["leads"]) == 2 and len(report["contacts"]) == 2


# ---- tokens -------------------------------------------------------------------------------------


async def test_expired_tokens_refresh_once_into_a_working_pair(amo: Amo) -> None:
    refresh = {
        "client_id": "sim-client",
        "client_secret": "sim-secret",
        "grant_type": "refresh_token",
        "redirect_uri": "https://relay.example/oauth",
    }
    assert (await amo.call("GET", "/api/v4/leads/pipelines", headers={}))[0] == 401
    assert (await amo.call("POST", "/_sim/expire-tokens"))[0] == 200
    status, body = await amo.call("GET", "/api/v4/leads/pipelines")
    assert status == 401 and body["status"] == 401

    status, pair = await amo.call(
        "POST", "/oauth2/access_token", refresh | {"refresh_token": "sim-refresh-0"}
    )
    assert status == 200 and pair["token_type"] == "Bearer" and pair["expires_in"] == 86400
    new_auth = {"Authorization": f"Bearer {pair['access_token']}"}
    assert (await amo.call("GET", "/api/v4/leads/pipelines", headers=new_auth))[0] == 200

    status, body = await amo.call(
        "POST", "/oauth2/access_token", refresh | {"refresh_token": "sim-refresh-0"}
    )
    assert status == 400 and body["hint"] == "Token has been revoked"
    status, _ = await amo.call(
        "POST", "/oauth2/access_token", refresh | {"refresh_token": pair["refresh_token"]}
    )
    assert status == 200


async def test_a_refresh_without_the_integrations_redirect_uri_is_refused(amo: Amo) -> None:
    refresh = {
        "client_id": "sim-client",
        "client_secret": "sim-secret",
        "grant_type": "refresh_token",
        "refresh_token": "sim-refresh-0",
    }
    for wrong in ({}, {"redirect_uri": "https://elsewhere.example/oauth"}):
        status, body = await amo.call("POST", "/oauth2/access_token", refresh | wrong)
        assert status == 400, body
    # the refresh token was not spent by the refused calls
    right = refresh | {"redirect_uri": "https://relay.example/oauth"}
    assert (await amo.call("POST", "/oauth2/access_token", right))[0] == 200


async def test_issued_access_tokens_expire_after_their_ttl(amo: Amo) -> None:
    now = [1000.0]
    amo.sim.clock = lambda: now[0]
    _, pair = await amo.call(
        "POST",
        "/oauth2/access_token",
        {
            "client_id": "sim-client",
            "client_secret": "sim-secret",
            "grant_type": "refresh_token",
            "refresh_token": "sim-refresh-0",
            "redirect_uri": "https://relay.example/oauth",
        },
    )
    auth = {"Authorization": f"Bearer {pair['access_token']}"}
    now[0] += 86401
    assert (await amo.call("GET", "/api/v4/leads/pipelines", headers=auth))[0] == 401


# ---- faults -------------------------------------------------------------------------------------


async def test_fail_next_scripts_answers_in_order(amo: Amo) -> None:
    script = {
        "fail_next": [
            {"method": "POST", "path": "/api/v4/leads/complex", "status": 503, "count": 2},
            {"method": "POST", "path": "/api/v4/leads/*", "status": 504, "apply": True},
            {"path": "/api/v4/leads/complex", "status": 418, "body": {"why": "teapot"}},
        ]
    }
    status, config = await amo.call("POST", "/_sim/faults", script)
    assert status == 200 and len(config["fail_next"]) == 3
    answers = [await amo.call("POST", "/api/v4/leads/complex", [complex_lead()]) for _ in range(5)]
    assert [a[0] for a in answers] == [503, 503, 504, 418, 200]
    assert answers[3][1] == {"why": "teapot"}
    assert len(amo.sim.report()["leads"]) == 2  # the 504 one landed; 503s and 418 did not


async def test_error_rate_answers_5xx_without_doing_the_work(start_amo: StartAmo) -> None:
    amo = await start_amo(error_rate=1.0, seed=7, rate_limit=1000)
    statuses = {(await amo.call("POST", "/api/v4/contacts", [contact()]))[0] for _ in range(12)}
    assert statuses <= {500, 502, 503, 504} and len(statuses) > 1
    assert amo.sim.report()["contacts"] == []


async def test_reset_rate_drops_the_connection_after_the_write(amo: Amo) -> None:
    await amo.call("POST", "/_sim/faults", {"reset_rate": 1.0})
    with pytest.raises(aiohttp.ClientError):
        await amo.call("POST", "/api/v4/contacts", [contact()])
    assert len(amo.sim.report()["contacts"]) == 1
    _, log = await amo.call("GET", "/_sim/requests")
    assert log == [
        {"t": log[0]["t"], "method": "POST", "path": "/api/v4/contacts", "status": "reset"}
    ]


async def test_timeout_rate_hangs_and_shutdown_does_not_wait(amo: Amo) -> None:
    amo.sim.config.timeout_rate, amo.sim.config.hang_s = 1.0, 30.0
    with pytest.raises(TimeoutError):
        await amo.call(
            "POST", "/api/v4/contacts", [contact()], timeout=aiohttp.ClientTimeout(total=0.2)
        )
    assert len(amo.sim.report()["contacts"]) == 1  # the fixture's cleanup must not take 30 s


async def test_faults_endpoint_rejects_unknown_settings(amo: Amo) -> None:
    assert (await amo.call("POST", "/_sim/faults", {"bogus": 1}))[0] == 400
    assert (await amo.call("POST", "/_sim/faults", {"rate_limit": 1.5}))[0] == 400
    status, config = await amo.call("POST", "/_sim/faults", {"latency_s": 0.05})
    assert status == 200 and config["latency_s"] == 0.05


async def test_reset_forgets_data_and_traffic(amo: Amo) -> None:
    await amo.call("POST", "/api/v4/leads/complex", [complex_lead()])
    assert (await amo.call("POST", "/_sim/reset"))[0] == 200
    report = amo.sim.report()
    assert report["leads"] == [] and report["contacts"] == [] and report["requests_total"] == 0


def test_run_fake_crm_refuses_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="bitrix24"):
        run_fake_crm("nosuch", "127.0.0.1", 0, SimulatorConfig())
