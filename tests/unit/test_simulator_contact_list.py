"""The amoCRM simulator's contacts list (what the contact index syncs from), its control API for
contacts made and deleted by a manager, and its indexed search against the rule it indexes."""

# The fixtures come from the module this one extends; as arguments they "redefine" the import.
# ruff: noqa: F811

from __future__ import annotations

import random
import time
from typing import Any

from service.simulators.amocrm.entities import Contact
from service.simulators.amocrm.state import AmoStore, _matches
from tests.unit.test_simulator_amocrm import (  # noqa: F401  (fixtures, used by name)
    Amo,
    StartAmo,
    amo,
    contact,
    start_amo,
)

LIST = "/api/v4/contacts"


def seeded(n: int, updated_at: int, **extra: Any) -> dict[str, Any]:
    return (
        contact(f"+7701{n:07d}", f"p{n}@example.kz", f"Person {n}")
        | {"updated_at": updated_at}
        | extra
    )


async def listed(amo: Amo, **params: Any) -> tuple[int, Any]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    return await amo.call("GET", f"{LIST}?{query}")


def ids_of(body: Any) -> list[int]:
    return [c["id"] for c in body["_embedded"]["contacts"]]


async def test_every_contact_carries_updated_at_set_on_create_and_update(amo: Amo) -> None:
    [old] = amo.sim.seed_contacts([seeded(1, updated_at=1_600_000_000)])
    before = int(time.time())
    _, made = await amo.call("POST", LIST, [contact("+77010000002")])
    [new] = ids_of(made)
    _, body = await amo.call("GET", f"{LIST}/{new}")
    assert body["updated_at"] >= before and body["created_at"] >= before

    _, recent = await listed(amo, **{"filter[updated_at][from]": before})
    assert ids_of(recent) == [new]
    await amo.call("PATCH", LIST, [{"id": old, "first_name": "Renamed"}])
    _, body = await amo.call("GET", f"{LIST}/{old}")
    assert body["updated_at"] >= before
    _, recent = await listed(amo, **{"filter[updated_at][from]": before})
    assert sorted(ids_of(recent)) == [old, new]  # the update brought it into the recent changes


async def test_filter_from_and_to_are_inclusive_and_order_is_by_change_then_id(amo: Amo) -> None:
    ids = amo.sim.seed_contacts(
        [seeded(n, updated_at=t) for n, t in enumerate([300, 100, 200, 200, 400], 1)]
    )
    status, body = await listed(
        amo, **{"filter[updated_at][from]": 200, "order[updated_at]": "asc", "limit": 250}
    )
    assert status == 200
    assert ids_of(body) == [ids[2], ids[3], ids[0], ids[4]]
    _, body = await listed(
        amo,
        **{
            "filter[updated_at][from]": 150,
            "filter[updated_at][to]": 300,
            "order[updated_at]": "desc",
        },
    )
    assert ids_of(body) == [ids[0], ids[3], ids[2]]
    _, body = await listed(amo, **{"order[id]": "desc"})
    assert ids_of(body) == ids[::-1]
    _, body = await listed(amo)  # no order: by id
    assert ids_of(body) == ids


async def test_pages_have_next_links_until_the_last_and_then_204(amo: Amo) -> None:
    ids = amo.sim.seed_contacts([seeded(n, updated_at=1000 + n) for n in range(5)])
    params = {"filter[updated_at][from]": 0, "order[updated_at]": "asc", "limit": 2}
    seen: list[int] = []
    for page in (1, 2, 3):
        status, body = await listed(amo, **params, page=page)
        assert status == 200 and body["_page"] == page
        assert ("next" in body["_links"]) == (page < 3)
        seen += ids_of(body)
    assert seen == ids
    assert (await listed(amo, **params, page=4))[0] == 204
    assert (await listed(amo, **{"filter[updated_at][from]": 2000}))[0] == 204


async def test_limit_over_250_and_bad_parameters_are_400(amo: Amo) -> None:
    for params in (
        {"limit": 251},
        {"limit": 0},
        {"page": 0},
        {"filter[updated_at][from]": "yesterday"},
        {"order[name]": "asc"},
        {"order[updated_at]": "sideways"},
    ):
        status, problem = await listed(amo, **params)
        assert status == 400, params
        assert problem["validation-errors"], params
    assert (await listed(amo, limit=250))[0] == 204  # 250 is allowed (and nothing is there)


async def test_list_counts_against_the_limit_and_seeding_does_not(start_amo: StartAmo) -> None:
    amo = await start_amo(rate_limit=2, block_after=100)
    amo.sim.seed_contacts([seeded(n, updated_at=1000) for n in range(300)])  # a manager's import
    statuses = [(await listed(amo, limit=250))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    report = amo.sim.report()
    assert report["requests_by_endpoint"] == {"GET /api/v4/contacts": 3}
    assert report["contact_reads"] == {"list": 2}


async def test_control_api_seeds_messy_phones_and_deletes_contacts(amo: Amo) -> None:
    messy = contact("8 (916) 123-45-67", None, "Manager's contact") | {"updated_at": 1234}
    status, body = await amo.call("POST", "/_sim/contacts", messy)
    [made] = body["_embedded"]["contacts"]
    assert status == 200 and made["updated_at"] == 1234
    _, lead = await amo.call(
        "POST", "/api/v4/leads", [{"_embedded": {"contacts": [{"id": made["id"]}]}}]
    )
    _, found = await amo.call("GET", f"{LIST}?query=9161234567")
    assert ids_of(found) == [made["id"]]  # by the national number; an exact compare would not
    # a substring search over what the manager typed: the E.164 form is not in "8 (916) …"
    for query in ("79161234567", "%2B79161234567"):
        assert (await amo.call("GET", f"{LIST}?query={query}"))[0] == 204, query

    assert (await amo.call("DELETE", f"/_sim/contacts/{made['id']}"))[0] == 204
    assert (await amo.call("DELETE", f"/_sim/contacts/{made['id']}"))[0] == 404
    assert (await amo.call("GET", f"{LIST}/{made['id']}"))[0] == 404
    assert (await amo.call("GET", f"{LIST}?query=9161234567"))[0] == 204
    lead_id = lead["_embedded"]["leads"][0]["id"]
    _, kept = await amo.call("GET", f"/api/v4/leads/{lead_id}")
    assert kept["_embedded"]["contacts"] == []  # the lead stays, without the contact
    status, problem = await amo.call(
        "POST", "/api/v4/leads", [{"_embedded": {"contacts": [{"id": made["id"]}]}}]
    )
    assert status == 400 and problem["validation-errors"]
    assert (await amo.call("POST", "/_sim/contacts", [{"first_name": 5}]))[0] == 400


# ---- the indexed search is the rule --------------------------------------------------------------


def _random_fields(rnd: random.Random) -> list[dict[str, Any]]:
    phones = [
        rnd.choice(["+7", "8", "7", "", "+44 "])
        + "".join(rnd.choice("0123456789 -()") for _ in range(rnd.randint(0, 14)))
        for _ in range(rnd.randint(0, 2))
    ]
    emails = [
        "".join(rnd.choice("abAB.1") for _ in range(rnd.randint(1, 6))) + "@Ex.kz"
        for _ in range(rnd.randint(0, 2))
    ]
    fields = []
    if phones:
        fields.append({"field_code": "PHONE", "values": [{"value": p} for p in phones]})
    if emails:
        fields.append({"field_code": "EMAIL", "values": [{"value": e} for e in emails]})
    return fields


def _random_query(rnd: random.Random, contacts: list[Contact]) -> str:
    if contacts and rnd.random() < 0.7:  # a piece of something a contact holds
        some = rnd.choice(contacts)
        texts = [some.name] + [str(v["value"]) for f in some.fields for v in f["values"]]
        text = rnd.choice(texts) or "x"
        start = rnd.randint(0, max(0, len(text) - 1))
        return text[start : start + rnd.randint(1, 16)]
    return "".join(rnd.choice("0123456789+ ab@.") for _ in range(rnd.randint(0, 14)))


def test_indexed_search_answers_exactly_what_the_rule_answers() -> None:
    rnd = random.Random(20261122)
    store = AmoStore()
    for round_no in range(30):
        specs = [
            {"first_name": rnd.choice(["Ivan", "ANNA", "", "Айгерим", "bo"]),
             "custom_fields_values": _random_fields(rnd)}
            for _ in range(20)
        ]  # fmt: skip
        store.create_contacts(specs)
        for existing in rnd.sample(list(store.contacts), k=min(5, len(store.contacts))):
            change = {"id": existing, "custom_fields_values": _random_fields(rnd)}
            store.update_contacts([change | {"name": f"n{round_no}"}])
        if round_no % 3 == 0:
            store.delete_contact(rnd.choice(list(store.contacts)))
        contacts = list(store.contacts.values())
        for _ in range(40):
            query = _random_query(rnd, contacts)
            expected = (
                [c.id for c in contacts if _matches(c, query)]
                if query.strip()
                else [c.id for c in contacts]
            )
            assert [c.id for c in store.search_contacts(query)] == expected, query
