"""What both simulators share (simulator_control): the `/_sim/*` control API, each answering in
its own CRM's shape, and the amoCRM storm that comes with it."""

from __future__ import annotations

from typing import Any

import pytest

from service.simulators.common import ScriptedAnswer, duplicates_report
from service.simulators.control import RANDOM_FAULT_FIELDS, fault_changes, json_items
from tests.unit import test_simulator_amocrm as account
from tests.unit import test_simulator_bitrix24 as portal
from tests.unit.test_simulator_amocrm import Amo, StartAmo
from tests.unit.test_simulator_bitrix24 import StartBx, frozen

start_amo = account.start_amo  # the fixtures: a fresh simulator per call, stopped after the test
start_bx = portal.start_bx
PIPELINES = "/api/v4/leads/pipelines"


async def control(amo: Amo, path: str, body: Any = None) -> tuple[int, Any]:
    return await amo.call("POST", f"/_sim/{path}", body)


async def test_an_amocrm_storm_answers_429_without_violations_or_window_use(
    start_amo: StartAmo,
) -> None:
    amo = await start_amo(rate_limit=3, block_after=2)
    now = frozen(amo.sim)
    status, storm = await control(amo, "storm", {"seconds": 10})
    assert status == 200 and storm == {"active": True, "refused": 0}

    for _ in range(5):  # past the limit and the block, were these the client's doing
        status, body = await amo.call("GET", PIPELINES)
        assert (status, body["title"]) == (429, "Too Many Requests")
    assert (await amo.call("POST", "/oauth2/access_token", {}))[0] == 429
    now[0] += 10.0  # over: the window holds none of the storm's refusals
    assert [(await amo.call("GET", PIPELINES))[0] for _ in range(4)] == [200, 200, 200, 429]

    report = amo.sim.report()
    assert report["storm"] == {"active": False, "refused": 6}
    assert (report["violations"], report["blocked"]) == (1, False)
    assert report["answers_by_status"] == {"200": 3, "429": 7}


async def test_an_amocrm_storm_ends_on_request_or_reset_and_checks_its_body(
    start_amo: StartAmo,
) -> None:
    amo = await start_amo()
    frozen(amo.sim)
    for bad in ({}, {"seconds": -1}, {"seconds": True}, {"seconds": "5"}, [5]):
        status, body = await control(amo, "storm", bad)
        assert (status, body["status"]) == (400, 400), bad
    amo.sim.storm(60)
    assert (await amo.call("GET", PIPELINES))[0] == 429
    assert (await control(amo, "storm", {"seconds": 0}))[1] == {"active": False, "refused": 1}
    assert (await amo.call("GET", PIPELINES))[0] == 200
    amo.sim.storm(60)
    assert (await control(amo, "reset"))[0] == 200
    assert amo.sim.report()["storm"] == {"active": False, "refused": 0}


async def test_a_blocked_account_answers_403_even_in_a_storm(start_amo: StartAmo) -> None:
    amo = await start_amo()
    amo.sim.blocker.blocked = True
    amo.sim.storm(60)
    assert (await amo.call("GET", PIPELINES))[0] == 403


async def test_faults_take_one_object_for_fail_next_and_refuse_in_each_crms_shape(
    start_amo: StartAmo, start_bx: StartBx
) -> None:
    amo, bx = await start_amo(), await start_bx()
    one = {"fail_next": {"path": PIPELINES, "status": 503}}
    status, config = await control(amo, "faults", one)
    assert status == 200 and [a["status"] for a in config["fail_next"]] == [503]
    assert (await amo.call("GET", PIPELINES))[0] == 503

    for bad in ({"fail_next": 5}, {"latency_s": -1}, {"bogus": 1}, [1]):
        status, body = await control(amo, "faults", bad)
        assert (status, body["title"]) == (400, "Bad Request"), bad
        status, body = await bx.control("faults", bad)
        assert (status, body["error"]) == (400, "INVALID_REQUEST"), bad
    async with amo.http.post("/_sim/faults", data=b"{not json") as resp:
        assert (resp.status, resp.content_type) == (400, "application/problem+json")
    assert amo.sim.faults.scripted == [] and amo.sim.config.latency_s == 0.0


async def test_shared_control_routes_answer_alike_on_both_simulators(
    start_amo: StartAmo, start_bx: StartBx
) -> None:
    amo, bx = await start_amo(), await start_bx()
    assert (await amo.call("GET", PIPELINES))[0] == 200
    for path, answer in [
        ("expire-tokens", {"expired": True}),
        ("unblock", {"blocked": False}),
        ("reset", {"reset": True}),
    ]:
        assert await control(amo, path) == (200, answer)
        assert await bx.control(path) == (200, answer)
    assert (await amo.call("GET", "/_sim/requests"))[1] == []
    shared = {"requests_total", "answers_by_status", "violations", "max_in_any_second", "blocked"}
    for report in (amo.sim.report(), bx.sim.report()):
        assert shared | {"storm", "duplicates", "contacts", "leads"} <= report.keys()


def test_fault_changes_check_everything_before_anything_is_applied() -> None:
    fields = RANDOM_FAULT_FIELDS | {"limit": int}
    settings, answers = fault_changes(
        fields, {"limit": 3, "error_rate": 1, "fail_next": [{"path": "/x", "status": 500}]}
    )
    assert settings == {"limit": 3, "error_rate": 1}
    assert answers == [ScriptedAnswer("*", "/x", 500)]
    with pytest.raises(ValueError, match="fail_next item"):
        fault_changes(fields, {"fail_next": [{"status": 500}]})
    assert json_items({"a": 1}, "x") == [{"a": 1}]
    with pytest.raises(ValueError, match="x must be an array"):
        json_items("nope", "x")


def test_duplicates_report_lists_shared_identities_and_several_open_leads() -> None:
    report = duplicates_report(
        [(1, {"phone:79161234567", "email:a@b.ru"}), (2, {"phone:79161234567"}), (3, set())],
        [(10, [1]), (11, [1, 3]), (12, [3])],
    )
    assert report == {
        "contacts_sharing_identity": [{"identity": "phone:79161234567", "contact_ids": [1, 2]}],
        "contacts_with_several_open_leads": [
            {"contact_id": 1, "lead_ids": [10, 11]},
            {"contact_id": 3, "lead_ids": [11, 12]},
        ],
    }
