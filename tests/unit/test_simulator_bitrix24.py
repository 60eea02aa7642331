"""The Bitrix24 simulator over real HTTP: methods, batch, limits, manual block, faults, report."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from service.simulators.bitrix24.batch import parse_command
from service.simulators.bitrix24.limits import LeakyBucket
from service.simulators.bitrix24.server import (
    BitrixSimulator,
    BitrixSimulatorConfig,
    start_bitrix_simulator,
)
from service.simulators.control import SimulatorBase

PHONE = "+7 701 000-00-01"


@dataclass
class Bx:
    """A running simulator, its webhook URL and a session."""

    sim: BitrixSimulator
    base: str
    http: aiohttp.ClientSession

    @property
    def webhook(self) -> str:
        return self.sim.webhook_url(self.base)

    async def call(self, method: str, params: Any = None, **kw: Any) -> tuple[int, Any]:
        """POST `{webhook}{method}.json` with a JSON body."""
        url = kw.pop("url", f"{self.webhook}{method}.json")
        async with self.http.post(url, json=params or {}, **kw) as resp:
            if "json" not in resp.content_type:
                return resp.status, await resp.text()
            return resp.status, await resp.json(content_type=None)

    async def ok(self, method: str, params: Any = None) -> Any:
        status, body = await self.call(method, params)
        assert status == 200, body
        return body["result"]

    async def batch(self, cmd: dict[str, str], halt: int = 0) -> dict[str, Any]:
        result: dict[str, Any] = await self.ok("batch", {"halt": halt, "cmd": cmd})
        return result

    async def control(self, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.post(f"{self.base}/_sim/{path}", json=body) as resp:
            return resp.status, await resp.json(content_type=None)


StartBx = Callable[..., Awaitable[Bx]]


@pytest.fixture
async def start_bx() -> AsyncIterator[StartBx]:
    """Factory: a fresh simulator per call, stopped and disconnected after the test."""
    opened: list[tuple[web.AppRunner, aiohttp.ClientSession]] = []

    async def start(**config: Any) -> Bx:
        sim = BitrixSimulator(BitrixSimulatorConfig(**config))
        runner, url = await start_bitrix_simulator(sim)
        session = aiohttp.ClientSession()
        opened.append((runner, session))
        return Bx(sim, url, session)

    yield start
    for runner, session in opened:
        await session.close()
        await runner.cleanup()


@pytest.fixture
async def bx(start_bx: StartBx) -> Bx:
    return await start_bx(burst=10_000)


def frozen(sim: SimulatorBase[Any], at: float = 1_700_000_000.0) -> list[float]:
    """Stop the simulator's clock; tests move it by assigning `now[0]`."""
    now = [at]
    sim.clock = lambda: now[0]
    return now


def person(phone: str | None = PHONE, email: str | None = None, name: str = "Ivan") -> Any:
    fields: dict[str, Any] = {"NAME": name}
    if phone:
        fields["PHONE"] = [{"VALUE": phone, "VALUE_TYPE": "WORK"}]
    if email:
        fields["EMAIL"] = [{"VALUE": email, "VALUE_TYPE": "WORK"}]
    return {"fields": fields}


# ---- methods ------------------------------------------------------------------------------------


async def test_findbycomm_is_exact_and_answers_an_empty_list_for_nothing(bx: Bx) -> None:
    find = {"type": "PHONE", "values": ["+77010000001"], "entity_type": "CONTACT"}
    assert await bx.ok("crm.duplicate.findbycomm", find) == []
    first = await bx.ok("crm.contact.add", person(PHONE, "Anna@Mail.ru"))
    await bx.ok("crm.contact.add", person("+77010000011"))

    assert await bx.ok("crm.duplicate.findbycomm", find) == {"CONTACT": [first]}
    near = find | {"values": ["+7701000000"]}  # a prefix of both numbers: exact, so no match
    assert await bx.ok("crm.duplicate.findbycomm", near) == []
    by_email = {"type": "EMAIL", "values": ["x@y.z", "anna@mail.RU"]}
    assert await bx.ok("crm.duplicate.findbycomm", by_email) == {"CONTACT": [first]}
    leads_only = find | {"entity_type": "LEAD"}
    assert await bx.ok("crm.duplicate.findbycomm", leads_only) == []

    status, body = await bx.call("crm.duplicate.findbycomm", find | {"values": ["1"] * 21})
    assert status == 400 and body["error"] and "20" in body["error_description"]


async def test_contact_add_get_update_appends_multifields(bx: Bx) -> None:
    contact_id = await bx.ok("crm.contact.add", person(PHONE))
    assert isinstance(contact_id, int)
    email = {"EMAIL": [{"VALUE": "i@x.ru", "VALUE_TYPE": "WORK"}]}
    assert await bx.ok("crm.contact.update", {"id": contact_id, "fields": email}) is True
    more = {"PHONE": [{"VALUE": "+77770000000", "VALUE_TYPE": "HOME"}]}
    await bx.ok("crm.contact.update", {"id": str(contact_id), "fields": more})

    got = await bx.ok("crm.contact.get", {"id": contact_id})
    assert got["ID"] == str(contact_id) and got["NAME"] == "Ivan" and got["HAS_EMAIL"] == "Y"
    assert [p["VALUE"] for p in got["PHONE"]] == [PHONE, "+77770000000"]
    first_phone = got["PHONE"][0]["ID"]
    replace = {"PHONE": [{"ID": first_phone, "VALUE": "+77011111111"}]}
    await bx.ok("crm.contact.update", {"id": contact_id, "fields": replace})
    got = await bx.ok("crm.contact.get", {"id": contact_id})
    assert [p["VALUE"] for p in got["PHONE"]] == ["+77011111111", "+77770000000"]

    status, body = await bx.call("crm.contact.get", {"id": 999})
    assert (status, body["error"], body["error_description"]) == (400, "", "Not found")
    status, body = await bx.call("crm.contact.add", {"fields": "not an object"})
    assert status == 400 and body["error_description"]


async def test_unknown_stage_or_category_lands_in_the_first_stage_silently(bx: Bx) -> None:
    """CCrmDeal::Add: an unknown CATEGORY_ID is category 0, a STAGE_ID that is not one of the
    category's stages (an integer "5", another category's, a prefix without CATEGORY_ID) is
    the category's first stage — and the answer is a plain success (CRM_FACTS.md)."""
    bx.sim.store.funnels.add_category(1, ["NEW", "PREPARATION", "UC_X1Y2"])
    cases = [
        ({"CATEGORY_ID": 1, "STAGE_ID": "C1:UC_X1Y2"}, ("1", "C1:UC_X1Y2")),
        ({"CATEGORY_ID": 1, "STAGE_ID": "5"}, ("1", "C1:NEW")),
        ({"CATEGORY_ID": 1, "STAGE_ID": "PREPARATION"}, ("1", "C1:NEW")),
        ({"STAGE_ID": "C1:PREPARATION"}, ("0", "NEW")),
        ({"CATEGORY_ID": 7, "STAGE_ID": "C7:NEW"}, ("0", "NEW")),
        ({"STAGE_ID": "PREPARATION"}, ("0", "PREPARATION")),
    ]
    for fields, (category, stage) in cases:
        deal_id = await bx.ok("crm.deal.add", {"fields": {"TITLE": "x", **fields}})
        got = await bx.ok("crm.deal.get", {"id": deal_id})
        assert (got["CATEGORY_ID"], got["STAGE_ID"]) == (category, stage), fields

    categories = await bx.ok("crm.category.list", {"entityTypeId": 2})
    assert [(c["id"], c["isDefault"]) for c in categories["categories"]] == [(0, "Y"), (1, "N")]
    stages = await bx.ok("crm.status.list", {"filter": {"ENTITY_ID": "DEAL_STAGE_1"}})
    assert [s["STATUS_ID"] for s in stages] == [
        "C1:NEW",
        "C1:PREPARATION",
        "C1:UC_X1Y2",
        "C1:WON",
        "C1:LOSE",
    ]
    main = await bx.ok("crm.status.list", {"filter": {"ENTITY_ID": "DEAL_STAGE"}})
    assert [s["STATUS_ID"] for s in main][:2] == ["NEW", "PREPARATION"]
    assert await bx.ok("crm.status.list", {"filter": {"ENTITY_ID": "DEAL_STAGE_9"}}) == []


async def test_deals_open_and_closed_list_and_pages(bx: Bx) -> None:
    contact_id = await bx.ok("crm.contact.add", person())
    deal = {"TITLE": "Course", "CONTACT_IDS": [contact_id], "UTM_SOURCE": "google"}
    open_id = await bx.ok("crm.deal.add", {"fields": deal})
    won_id = await bx.ok("crm.deal.add", {"fields": deal | {"STAGE_ID": "WON"}})
    bx.sim.store.funnels.add_category(2, ["NEW", "PREPARATION"])
    c2_id = await bx.ok("crm.deal.add", {"fields": deal | {"CATEGORY_ID": 2}})

    got = await bx.ok("crm.deal.get", {"id": open_id})
    assert (got["STAGE_ID"], got["CLOSED"], got["STAGE_SEMANTIC_ID"]) == ("NEW", "N", "P")
    assert got["CONTACT_ID"] == str(contact_id) and got["UTM_SOURCE"] == "google"
    assert (await bx.ok("crm.deal.get", {"id": won_id}))["CLOSED"] == "Y"
    assert (await bx.ok("crm.deal.get", {"id": c2_id}))["STAGE_ID"] == "C2:NEW"
    await bx.ok("crm.deal.update", {"id": c2_id, "fields": {"STAGE_ID": "C2:LOSE"}})
    c2 = await bx.ok("crm.deal.get", {"id": c2_id})
    assert (c2["CLOSED"], c2["STAGE_SEMANTIC_ID"]) == ("Y", "F")
    bad_stage = {"id": open_id, "fields": {"STAGE_ID": "C2:WON"}}  # another category's
    assert (await bx.call("crm.deal.update", bad_stage))[0] == 200  # ignored, as Bitrix24 does
    assert (await bx.ok("crm.deal.get", {"id": open_id}))["STAGE_ID"] == "NEW"

    status, listed = await bx.call(
        "crm.deal.list",
        {"filter": {"CONTACT_ID": contact_id, "CLOSED": "N"}, "select": ["ID", "STAGE_ID"]},
    )
    assert status == 200 and listed["result"] == [{"ID": str(open_id), "STAGE_ID": "NEW"}]
    assert listed["total"] == 1 and "next" not in listed
    assert (await bx.call("crm.deal.list", {"filter": {"PHONE": "1"}}))[0] == 400
    no_contact = {"fields": {"TITLE": "x", "CONTACT_IDS": [424242]}}
    assert (await bx.call("crm.deal.add", no_contact))[0] == 400

    for _ in range(60):
        await bx.ok("crm.deal.add", {"fields": {"TITLE": "bulk"}})
    _, page = await bx.call("crm.deal.list", {"order": {"ID": "DESC"}})
    assert len(page["result"]) == 50 and page["next"] == 50 and page["total"] == 63
    _, last = await bx.call("crm.deal.list", {"start": 50})
    assert len(last["result"]) == 13 and "next" not in last


async def test_timeline_comment_and_answer_envelope(bx: Bx) -> None:
    deal_id = await bx.ok("crm.deal.add", {"fields": {"TITLE": "x"}})
    comment = {"fields": {"ENTITY_ID": deal_id, "ENTITY_TYPE": "deal", "COMMENT": "hello"}}
    status, body = await bx.call("crm.timeline.comment.add", comment)
    assert status == 200 and isinstance(body["result"], int)
    assert {"start", "finish", "duration", "processing", "date_start", "date_finish"} <= set(
        body["time"]
    )
    assert body["time"]["operating"] == pytest.approx(0.01)
    assert body["time"]["operating_reset_at"] > body["time"]["start"]
    assert bx.sim.report()["comments"][0]["COMMENT"] == "hello"
    missing = {"fields": {"ENTITY_ID": 1, "ENTITY_TYPE": "deal", "COMMENT": "x"}}
    assert (await bx.call("crm.timeline.comment.add", missing))[0] == 400


async def test_urls_secret_and_unknown_methods(bx: Bx) -> None:
    no_suffix = f"{bx.webhook}crm.deal.add"
    status, body = await bx.call("", {"fields": {"TITLE": "x"}}, url=no_suffix)
    assert status == 200 and isinstance(body["result"], int)

    status, body = await bx.call("crm.no.such", {})
    assert (status, body["error"]) == (404, "ERROR_METHOD_NOT_FOUND")
    wrong = f"{bx.base}/rest/1/guess/crm.deal.add.json"
    status, body = await bx.call("", {}, url=wrong)
    assert (status, body["error"]) == (401, "INVALID_CREDENTIALS")
    assert "error_description" in body
    async with bx.http.get(f"{bx.webhook}crm.deal.get.json", params={"id": "2001"}) as resp:
        assert resp.status == 200 and (await resp.json())["result"]["TITLE"] == "x"


# ---- batch --------------------------------------------------------------------------------------


def test_batch_commands_parse_php_query_strings() -> None:
    method, params = parse_command(
        "crm.contact.add.json?fields[NAME]=Ivan%20I&fields[PHONE][0][VALUE]=%2B7701"
        "&fields[PHONE][0][VALUE_TYPE]=WORK&values[]=a&values[]=b"
    )
    assert method == "crm.contact.add"
    assert params == {
        "fields": {"NAME": "Ivan I", "PHONE": [{"VALUE": "+7701", "VALUE_TYPE": "WORK"}]},
        "values": ["a", "b"],
    }


async def test_batch_chains_results_and_isolates_sub_errors(bx: Bx) -> None:
    cmd = {
        "c1": "crm.contact.add?fields[NAME]=Ivan&fields[PHONE][0][VALUE]=%2B77010000001",
        "d1": "crm.deal.add?fields[TITLE]=Deal&fields[CONTACT_IDS][0]=$result[c1]",
        "bad": "crm.contact.add?fields=oops",
        "d2": "crm.deal.add?fields[TITLE]=Orphan&fields[CONTACT_IDS][0]=$result[bad]",
        "g1": "crm.deal.get?id=$result[d1]",
        "f1": "crm.duplicate.findbycomm?type=PHONE&values[]=%2B77010000001",
        "first": "crm.contact.get?id=$result[f1][CONTACT][0]",
    }
    result = await bx.batch(cmd)

    # As the real server does (CRestUtil::processBatchElement): a reference to a failed
    # command does not fail the command using it; the deal is made, bound to no contact.
    assert set(result["result"]) == {"c1", "d1", "d2", "g1", "f1", "first"}
    assert set(result["result_error"]) == {"bad"}
    assert result["result"]["g1"]["CONTACT_ID"] == str(result["result"]["c1"])
    assert result["result"]["first"]["NAME"] == "Ivan"
    assert set(result["result_time"]) >= set(result["result"])
    report = bx.sim.report()
    deals = {d["TITLE"]: d for d in report["deals"]}
    assert set(deals) == {"Deal", "Orphan"}
    assert deals["Orphan"]["CONTACT_ID"] in (None, "", "0", 0), deals["Orphan"]
    assert report["requests_by_endpoint"] == {"batch": 1}
    assert report["commands_by_method"]["crm.contact.add"] == 2


async def test_batch_references_are_substituted_like_the_real_server(bx: Bx) -> None:
    """Every section (`$result`, `$next`, `$total`, `$time`, `$error`), any case, anywhere in
    a value; the walk stops at a missing key and hands over what it reached."""
    contact = await bx.ok("crm.contact.add", {"fields": {"NAME": "Seed"}})
    cmd = {
        "a": f"crm.contact.get?id={contact}",
        "bad": "crm.contact.get?id=999",
        "n1": "crm.contact.update?id=" + str(contact) + "&fields[NAME]=x $result[a][NAME] y",
        "n2": "crm.contact.add?fields[NAME]=$ReSuLt[a][NAME]%20tail",
        "n3": "crm.contact.add?fields[NAME]=t=$time[a][start]"
        "&fields[LAST_NAME]=e:$error[bad][error_description]",
        "n4": "crm.contact.add?fields[NAME]=$total[nothing][x] and $next[a]",
        "g": "crm.contact.get?id=$result[n2]",
    }
    result = await bx.batch(cmd)
    assert set(result["result_error"]) == {"bad"}, result["result_error"]
    names = {c["ID"]: c for c in bx.sim.report()["contacts"]}
    assert names[str(contact)]["NAME"] == "x Seed y"
    # "$ReSuLt" matches (case-insensitive) but names no section: the text stays
    assert result["result"]["g"]["NAME"] == "$ReSuLt[a][NAME] tail"
    n3 = names[str(result["result"]["n3"])]
    assert n3["NAME"].startswith("t=") and n3["NAME"] != "t=$time[a][start]"
    assert n3["LAST_NAME"] == "e:Not found"
    n4 = names[str(result["result"]["n4"])]
    assert n4["NAME"] == "$total[nothing][x] and $next[a]"  # arrays are not spliced into text


async def test_batch_halt_stops_at_the_first_error_and_takes_at_most_50(bx: Bx) -> None:
    cmd = {
        "a": "crm.deal.add?fields[TITLE]=a",
        "b": "crm.deal.get?id=1",
        "c": "crm.deal.add?fields[TITLE]=c",
    }
    result = await bx.batch(cmd, halt=1)
    assert set(result["result"]) == {"a"} and set(result["result_error"]) == {"b"}
    assert len(bx.sim.report()["deals"]) == 1
    status, body = await bx.call(
        "batch", {"cmd": {f"x{n}": "crm.deal.get?id=1" for n in range(51)}}
    )
    assert status == 400 and body["error"] == "ERROR_BATCH_LENGTH_EXCEEDED"


# ---- limits -------------------------------------------------------------------------------------


def test_leaky_bucket_drains_and_refusals_do_not_fill_it() -> None:
    bucket = LeakyBucket()
    assert all(bucket.arrive(0.0, 2.0, 3) for _ in range(3))
    assert not bucket.arrive(0.0, 2.0, 3)
    assert not bucket.arrive(0.4, 2.0, 3)  # drained 0.8: 2.2 + 1 > 3
    assert bucket.arrive(0.5, 2.0, 3)  # drained 1.0 since 0.0: refusals added nothing
    assert bucket.max_level == 3


async def test_52_at_once_get_exactly_two_refused(start_bx: StartBx) -> None:
    bx = await start_bx()
    now = frozen(bx.sim)
    answers = await asyncio.gather(*(bx.call("crm.deal.list", {}) for _ in range(52)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] * 50 + [503] * 2
    refused = next(body for status, body in answers if status == 503)
    assert refused == {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}

    now[0] += 0.5  # 2/s drains exactly one request's worth
    assert (await bx.call("crm.deal.list", {}))[0] == 200
    assert (await bx.call("crm.deal.list", {}))[0] == 503
    report = bx.sim.report()
    assert report["violations"] == 3 and report["max_bucket_level"] == 50
    assert report["answers_by_status"] == {"200": 51, "503": 3}


async def test_a_client_at_the_drain_rate_is_never_refused(start_bx: StartBx) -> None:
    bx = await start_bx(burst=1, drain_per_s=5.0)
    now = frozen(bx.sim)
    for _ in range(30):
        assert (await bx.call("crm.deal.list", {}))[0] == 200
        now[0] += 0.2
    assert bx.sim.report()["violations"] == 0


async def test_operating_time_blocks_one_method_until_reset(start_bx: StartBx) -> None:
    bx = await start_bx(burst=1000, method_costs={"crm.deal.add": 200.0})
    now = frozen(bx.sim)
    for _ in range(3):  # 0, 200, 400 s used before each: all under 480
        assert (await bx.call("crm.deal.add", {"fields": {"TITLE": "x"}}))[0] == 200
    status, body = await bx.call("crm.deal.add", {"fields": {"TITLE": "x"}})
    assert (status, body["error"]) == (429, "OPERATION_TIME_LIMIT")
    assert body["error_description"] == "Method is blocked due to operation time limit."
    assert body["time"]["operating"] == 600 and body["time"]["operating_reset_at"] == now[0] + 600
    assert (await bx.call("crm.deal.list", {}))[0] == 200  # other methods are not affected

    result = await bx.batch({"a": "crm.deal.add?fields[TITLE]=x", "b": "crm.deal.list"})
    assert result["result_error"]["a"]["error"] == "OPERATION_TIME_LIMIT"
    assert "b" in result["result"]

    now[0] += 600
    assert (await bx.call("crm.deal.add", {"fields": {"TITLE": "x"}}))[0] == 200


async def test_violations_set_a_manual_block_until_unblocked(start_bx: StartBx) -> None:
    bx = await start_bx(burst=2, overload_after=3)
    frozen(bx.sim)
    await asyncio.gather(*(bx.call("crm.deal.list", {}) for _ in range(5)))
    status, body = await bx.call("crm.deal.list", {})
    assert (status, body["error"]) == (401, "OVERLOAD_LIMIT")
    assert body["error_description"] == "REST API is blocked due to overload."
    assert bx.sim.report()["blocked"] is True

    assert (await bx.control("unblock"))[0] == 200
    assert (await bx.call("crm.deal.list", {}))[0] == 200


# ---- report and faults --------------------------------------------------------------------------


async def test_duplicates_report(bx: Bx) -> None:
    first = await bx.ok("crm.contact.add", person(PHONE))
    second = await bx.ok("crm.contact.add", person("+77010000001", "a@b.ru"))
    deals = [await bx.ok("crm.deal.add", {"fields": {"CONTACT_IDS": [first]}}) for _ in range(2)]
    dupes = bx.sim.report()["duplicates"]
    assert dupes["contacts_sharing_identity"] == [
        {"identity": "+77010000001", "contact_ids": [first, second]}
    ]
    assert dupes["contacts_with_several_open_leads"] == [{"contact_id": first, "lead_ids": deals}]
    await bx.ok("crm.deal.update", {"id": deals[0], "fields": {"STAGE_ID": "LOSE"}})
    async with bx.http.get(f"{bx.base}/_sim/state") as resp:
        state = await resp.json()
    assert state["duplicates"]["contacts_with_several_open_leads"] == []
    assert state["leads"] == state["deals"] and len(state["deals"]) == 2
    assert state["contacts"][0]["_embedded"]["leads"] == [{"id": d} for d in deals]


async def test_fail_command_scripts_one_sub_error_inside_a_batch(bx: Bx) -> None:
    script = {
        "fail_command": {
            "method": "crm.deal.add",
            "count": 1,
            "error": "ERROR_CORE",
            "description": "Deal is locked",
        }
    }
    status, config = await bx.control("faults", script)
    assert status == 200 and config["fail_command"][0]["method"] == "crm.deal.add"
    result = await bx.batch({f"d{n}": "crm.deal.add?fields[TITLE]=x" for n in range(3)})
    assert result["result_error"] == {
        "d0": {"error": "ERROR_CORE", "error_description": "Deal is locked"}
    }
    assert set(result["result"]) == {"d1", "d2"}
    bx.sim.fail_command("crm.deal.add", error="ERROR_CORE", description="again")
    status, body = await bx.call("crm.deal.add", {"fields": {"TITLE": "x"}})
    assert (status, body["error_description"]) == (400, "again")


async def test_fail_next_error_rate_and_resets(start_bx: StartBx) -> None:
    bx = await start_bx(burst=1000, seed=3)
    await bx.control("faults", {"fail_next": [{"path": "*/crm.deal.add*", "status": 503}]})
    assert (await bx.call("crm.deal.add", {"fields": {}}))[0] == 503
    assert (await bx.call("crm.deal.add", {"fields": {}}))[0] == 200

    bx.sim.config.error_rate = 1.0
    statuses = {(await bx.call("crm.deal.add", {"fields": {}}))[0] for _ in range(12)}
    assert statuses <= {500, 502, 503, 504} and len(statuses) > 1
    assert len(bx.sim.report()["deals"]) == 1  # 5xx instead of the work

    bx.sim.config.error_rate, bx.sim.config.reset_rate = 0.0, 1.0
    with pytest.raises(aiohttp.ClientError):
        await bx.call("crm.deal.add", {"fields": {}})
    assert len(bx.sim.report()["deals"]) == 2  # the write landed, the answer did not


async def test_timeout_rate_hangs_and_shutdown_does_not_wait(bx: Bx) -> None:
    bx.sim.config.timeout_rate, bx.sim.config.hang_s = 1.0, 30.0
    with pytest.raises(TimeoutError):
        await bx.call("crm.deal.add", {"fields": {}}, timeout=aiohttp.ClientTimeout(total=0.2))
    assert len(bx.sim.report()["deals"]) == 1


async def test_faults_endpoint_validates_and_reset_forgets(bx: Bx) -> None:
    assert (await bx.control("faults", {"bogus": 1}))[0] == 400
    assert (await bx.control("faults", {"burst": 1.5}))[0] == 400
    assert (await bx.control("faults", {"fail_command": [{"count": 1}]}))[0] == 400
    status, config = await bx.control("faults", {"drain_per_s": 5, "burst": 250})
    assert status == 200 and (config["drain_per_s"], config["burst"]) == (5, 250)

    await bx.ok("crm.contact.add", person())
    assert (await bx.control("reset"))[0] == 200
    report = bx.sim.report()
    assert report["contacts"] == [] and report["requests_total"] == 0
    assert report["commands_by_method"] == {}
