"""The Bitrix24 simulator's timed rate-limit storm, and the fault plumbing it shares with the
amoCRM simulator (simulator_common)."""

from __future__ import annotations

import pytest

from service.simulators.common import Faults, Storm
from service.simulators.control import check_fault_value
from tests.unit import test_simulator_bitrix24 as portal
from tests.unit.test_simulator_bitrix24 import StartBx, frozen

start_bx = portal.start_bx  # the fixture: a fresh simulator per call, stopped after the test

LIMITED = {"error": "QUERY_LIMIT_EXCEEDED", "error_description": "Too many requests"}


async def test_a_storm_refuses_everything_for_its_duration_without_violations(
    start_bx: StartBx,
) -> None:
    bx = await start_bx(burst=3, drain_per_s=2.0)
    now = frozen(bx.sim)
    for _ in range(3):  # the bucket is full: 3 of 3
        assert (await bx.call("crm.deal.list", {}))[0] == 200
    status, config = await bx.control("storm", {"seconds": 10})
    assert status == 200 and config == {"active": True, "refused": 0}

    for _ in range(5):
        assert await bx.call("crm.deal.list", {}) == (503, LIMITED)
        now[0] += 1.0  # four seconds of storm: the bucket drains 2/s all the while
    now[0] += 5.0  # ten seconds after it began: over
    # refusals added nothing and the bucket drained through the storm: room for 3 again
    assert [(await bx.call("crm.deal.list", {}))[0] for _ in range(4)] == [200, 200, 200, 503]

    report = bx.sim.report()
    assert report["storm"] == {"active": False, "refused": 5}
    assert report["violations"] == 1  # only the client's own overflow, after the storm
    assert report["answers_by_status"] == {"200": 6, "503": 6}


async def test_a_storm_spares_the_token_server_and_ends_on_request(start_bx: StartBx) -> None:
    bx = await start_bx()
    frozen(bx.sim)
    bx.sim.storm(60)
    app = bx.sim.config.oauth
    query = {
        "grant_type": "refresh_token",
        "client_id": app.client_id,
        "client_secret": app.client_secret,
        "refresh_token": app.refresh_token,
    }
    async with bx.http.get(bx.sim.oauth_url(bx.base), params=query) as resp:
        assert resp.status == 200  # oauth.bitrix.info is another server than the portal
        token = (await resp.json())["access_token"]
    url = f"{bx.sim.portal_url(bx.base)}crm.deal.list.json"
    assert await bx.call("", {"auth": token}, url=url) == (503, LIMITED)

    assert (await bx.control("storm", {"seconds": 0}))[1] == {"active": False, "refused": 1}
    assert (await bx.call("", {"auth": token}, url=url))[0] == 200


async def test_storm_endpoint_validates_and_reset_ends_a_storm(start_bx: StartBx) -> None:
    bx = await start_bx()
    for bad in ({}, {"seconds": -1}, {"seconds": True}, {"seconds": "5"}, [5]):
        status, body = await bx.control("storm", bad)
        assert (status, body["error"]) == (400, "INVALID_REQUEST"), bad
    bx.sim.storm(60)
    assert (await bx.call("crm.deal.list", {}))[0] == 503
    assert (await bx.control("reset"))[0] == 200
    assert (await bx.call("crm.deal.list", {}))[0] == 200
    assert bx.sim.report()["storm"] == {"active": False, "refused": 0}


def test_storm_extends_and_counts_only_what_falls_inside() -> None:
    storm = Storm()
    assert not storm.refuse(0.0)
    storm.start(10.0, 5.0)
    storm.start(11.0, 1.0)  # a shorter storm does not cut the running one short
    assert [storm.refuse(t) for t in (10.0, 14.9, 15.0)] == [True, True, False]
    assert storm.refused == 2
    faults = Faults(seed=1)
    faults.storm.start(0.0, 100.0)
    faults.reset(seed=1)
    assert not faults.storm.active(1.0)


def test_check_fault_value_names_what_is_wrong() -> None:
    fields = {"rate": float, "count": int, "flag": bool}
    check_fault_value(fields, "rate", 1)  # JSON's 1 is a fine float
    check_fault_value(fields, "flag", False)
    for key, value, message in [
        ("nope", 1, "not a setting"),
        ("count", 1.5, "expected int"),
        ("rate", True, "expected float"),
        ("rate", -0.1, "must not be negative"),
        ("flag", 1, "expected true or false"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_fault_value(fields, key, value)
