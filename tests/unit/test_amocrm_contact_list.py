"""Unit tests of the contacts list client (`AmoCrmApi.list_contacts`, `get_contact`) and of the
sync position it drives (`amocrm_index.advance`).

aioresponses stands in for amoCRM (one HTTP client's unit test); the shim, the counting gate and
the fixtures are test_amocrm_api.py's.
"""

# The fixtures come from the module this one extends; as arguments they "redefine" the import.
# ruff: noqa: F811

from __future__ import annotations

from typing import Any

import pytest
from aioresponses import aioresponses

from service.crm.amocrm.api import AmoContact, AmoCrmApi, ContactPage
from service.crm.amocrm.index import account_of, advance
from service.db.contact_index_store import SyncState
from service.errors import CrmRateLimited, CrmRetryable
from tests.unit.test_amocrm_api import (  # noqa: F401  (fixtures, used by name)
    BASE,
    CONTACTS,
    _requests,
    api,
    gate,
    mocked,
    session,
    tokens,
)


def list_url(updated_from: int, page: int = 1, limit: int = 250) -> str:
    return (
        f"{CONTACTS}?filter%5Bupdated_at%5D%5Bfrom%5D={updated_from}"
        f"&order%5Bupdated_at%5D=asc&limit={limit}&page={page}"
    )


def contact(contact_id: int, updated_at: int, phone: str | None = None) -> dict[str, Any]:
    fields = [{"field_code": "PHONE", "values": [{"value": phone}]}] if phone else None
    return {"id": contact_id, "updated_at": updated_at, "custom_fields_values": fields}


async def test_list_asks_oldest_change_first_and_reads_the_page(
    api: AmoCrmApi, mocked: aioresponses
) -> None:
    body = {
        "_page": 1,
        "_links": {"self": {"href": "x"}, "next": {"href": "y"}},
        "_embedded": {
            "contacts": [contact(5, 1700000000, "8 (916) 123-45-67"), {"no": "id"}, "junk"]
        },
    }
    mocked.get(list_url(1699999999, limit=3), payload=body)
    page = await api.list_contacts(1699999999, 1, 3)
    assert page == ContactPage(
        (AmoContact(5, None, ("8 (916) 123-45-67",), (), (), 1700000000),), size=3, has_next=True
    )
    [(method, _, kwargs)] = _requests(mocked)
    assert method == "GET"
    assert kwargs["params"] == {
        "filter[updated_at][from]": "1699999999",
        "order[updated_at]": "asc",
        "limit": "3",
        "page": "1",
    }


async def test_list_nothing_changed_is_204_and_an_empty_last_page(
    api: AmoCrmApi, mocked: aioresponses
) -> None:
    mocked.get(list_url(0, page=2), status=204, body="")
    assert await api.list_contacts(-5, 2) == ContactPage((), 0, False)  # from clamped to 0


async def test_list_without_envelope_is_retryable_not_empty(
    api: AmoCrmApi, mocked: aioresponses
) -> None:
    # an empty page would end the scan and mark the index complete: it must not pass as one
    mocked.get(list_url(10), payload={"_page": 1})
    with pytest.raises(CrmRetryable, match=r"_embedded\.contacts"):
        await api.list_contacts(10)


async def test_list_errors_are_mapped_like_every_call(api: AmoCrmApi, mocked: aioresponses) -> None:
    mocked.get(list_url(10), status=429)
    with pytest.raises(CrmRateLimited):
        await api.list_contacts(10)


async def test_list_refuses_a_limit_amocrm_would_refuse(
    api: AmoCrmApi, mocked: aioresponses
) -> None:
    for limit, page in ((251, 1), (0, 1), (50, 0)):
        with pytest.raises(ValueError, match="limit"):
            await api.list_contacts(0, page, limit)
    assert _requests(mocked) == []


@pytest.mark.parametrize("status", [404, 204])
async def test_get_contact_gone_is_none(api: AmoCrmApi, mocked: aioresponses, status: int) -> None:
    mocked.get(f"{CONTACTS}/77?with=leads", status=status, body="")
    assert await api.get_contact(77) is None


async def test_get_contact_reads_fields_and_leads(api: AmoCrmApi, mocked: aioresponses) -> None:
    body = contact(77, 1700000001, "+77011234567") | {"_embedded": {"leads": [{"id": 9}]}}
    mocked.get(f"{CONTACTS}/77?with=leads", payload=body)
    found = await api.get_contact(77)
    assert found == AmoContact(77, None, ("+77011234567",), (), (9,), 1700000001)


def test_account_key_is_the_host() -> None:
    assert account_of(BASE) == "amocrm:example.amocrm.ru"
    assert account_of("http://127.0.0.1:8090") == "amocrm:127.0.0.1:8090"


# --- the sync position -------------------------------------------------------------------------


def page_of(*stamps: int | None, size: int | None = None) -> ContactPage:
    contacts = tuple(AmoContact(n, None, (), (), (), s) for n, s in enumerate(stamps, 1))
    return ContactPage(contacts, len(stamps) if size is None else size, False)


def test_a_short_page_ends_the_scan_at_the_newest_change() -> None:
    after = advance(SyncState(), page_of(100, 105, 103), limit=4)
    assert after == SyncState(105, 1, full_scan_done=True, caught_up=True)
    assert after.trusted


def test_an_empty_page_keeps_the_position() -> None:
    start = SyncState(500, 1, full_scan_done=True, caught_up=False)
    assert advance(start, page_of(), limit=4) == SyncState(500, 1, True, True)


def test_a_full_page_moves_the_window_by_time_not_by_offset() -> None:
    after = advance(SyncState(100, 1), page_of(99, 100, 101, 104), limit=4)
    assert after == SyncState(104, 1, full_scan_done=False, caught_up=False)
    assert not after.trusted


def test_a_full_page_stuck_in_one_second_turns_the_page() -> None:
    # an import: more than a page of contacts changed within [max - 1, max]
    start = SyncState(100, 1, full_scan_done=True, caught_up=True)
    after = advance(start, page_of(99, 100, 100, 100), limit=4)
    assert after == SyncState(100, 2, full_scan_done=True, caught_up=False)
    assert advance(after, page_of(100, 100, None, 100), limit=4).page == 3
    # the stretch ends inside the next page: back to asking by time
    assert advance(after, page_of(100, 100, 100, 102), limit=4) == SyncState(102, 1, True, False)


def test_unreadable_items_still_count_for_the_page_size() -> None:
    # 4 items sent, 1 readable: the page was full, so more may follow
    after = advance(SyncState(10, 1), page_of(12, size=4), limit=4)
    assert after == SyncState(12, 1, full_scan_done=False, caught_up=False)
