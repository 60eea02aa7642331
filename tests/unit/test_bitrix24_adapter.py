"""The Bitrix24 adapter against the simulator over real HTTP: requests per lead, no duplicates."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from service.crm.base import Delivery, Link
from service.crm.bitrix24.adapter import Bitrix24Adapter
from service.crm.bitrix24.api import Bitrix24Api
from service.errors import CrmError, CrmPermanent, CrmRateLimited, CrmRetryable
from service.model import Lead
from service.settings import Bitrix24Settings, FormRule, LeadSettings
from service.simulators.bitrix24.server import (
    BitrixSimulator,
    BitrixSimulatorConfig,
    start_bitrix_simulator,
)
from service.simulators.common import ScriptedAnswer


@dataclass
class CountingGate:
    """Admits everything, counts slots, and can run a hook just before slot number n."""

    slots: int = 0
    before: dict[int, Callable[[], None]] = field(default_factory=dict)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        self.slots += 1
        if self.slots in self.before:
            self.before.pop(self.slots)()
        yield


@dataclass
class Portal:
    sim: BitrixSimulator
    gate: CountingGate
    adapter: Bitrix24Adapter

    async def deliver(self, items: list[Delivery]) -> list[Link | CrmError]:
        self.gate.slots = 0
        return await self.adapter.deliver_batch(items)

    def report(self) -> dict[str, Any]:
        return self.sim.report()


StartPortal = Callable[..., Awaitable[Portal]]


@pytest.fixture
async def start_portal() -> AsyncIterator[StartPortal]:
    opened: list[Any] = []

    async def start(leads: LeadSettings | None = None, **config: Any) -> Portal:
        sim = BitrixSimulator(BitrixSimulatorConfig(**config))
        runner, url = await start_bitrix_simulator(sim)
        session = aiohttp.ClientSession()
        opened.append((runner, session))
        gate = CountingGate()
        api = Bitrix24Api(session, sim.webhook_url(url), gate, timeout_s=5)
        adapter = Bitrix24Adapter(api, Bitrix24Settings(), leads or LeadSettings())
        return Portal(sim, gate, adapter)

    yield start
    for runner, session in opened:
        await session.close()
        await runner.cleanup()


@pytest.fixture
async def portal(start_portal: StartPortal) -> Portal:
    return await start_portal()


def lead(n: int, *, phone: bool = True, email: bool = True, form: str = "course") -> Lead:
    return Lead(
        form=form,
        phone=f"+7701{n:07d}" if phone else None,
        email=f"person{n}@example.kz" if email else None,
        name=f"Person {n}",
        utm={"source": "google", "campaign": "spring"},
        fields={"comment": f"hello from {n}"},
    )


def delivery(n: int, item: Lead | None = None, link: Link | None = None) -> Delivery:
    return Delivery(n, n, uuid.uuid4(), item or lead(n), link or Link())


def linked(answer: Link | CrmError) -> Link:
    assert isinstance(answer, Link), answer
    return answer


def no_duplicates(report: dict[str, Any]) -> None:
    assert report["duplicates"] == {
        "contacts_sharing_identity": [],
        "contacts_with_several_open_leads": [],
    }


async def test_fifty_new_people_cost_three_requests(portal: Portal) -> None:
    items = [delivery(n) for n in range(50)]
    links = await portal.deliver(items)

    assert portal.gate.slots <= 3, portal.gate.slots
    report = portal.report()
    assert report["requests_total"] == portal.gate.slots == 3  # 0.06 requests per new lead
    assert len(report["contacts"]) == 50 and len(report["deals"]) == 50
    no_duplicates(report)
    assert all(isinstance(link, Link) for link in links)
    pairs = {(d["contact_ids"][0], d["id"]) for d in report["deals"]}
    assert {(link.contact_id, link.lead_id) for link in links if isinstance(link, Link)} == pairs
    seventh = linked(links[7])
    deal = next(d for d in report["deals"] if d["id"] == seventh.lead_id)
    assert deal["TITLE"] == "course: Person 7" and deal["SOURCE_ID"] == "WEB"
    assert (deal["UTM_SOURCE"], deal["UTM_CAMPAIGN"]) == ("google", "spring")
    assert str(items[7].submission_id) in deal["COMMENTS"] and "hello from 7" in deal["COMMENTS"]
    contact = next(c for c in report["contacts"] if c["id"] == seventh.contact_id)
    assert contact["NAME"] == "Person 7"
    assert [p["VALUE"] for p in contact["PHONE"]] == ["+77010000007"]


async def test_returning_person_inside_a_batch_gets_stage_and_comment(
    start_portal: StartPortal,
) -> None:
    leads = LeadSettings(forms={"course": FormRule(category_id=2, stage_id="C2:UC_PAID")})
    portal = await start_portal(leads)
    portal.sim.store.funnels.add_category(2, ["NEW", "UC_PAID"])
    [first] = await portal.deliver([delivery(0)])
    assert isinstance(first, Link)
    deal = portal.report()["deals"][0]
    assert (deal["CATEGORY_ID"], deal["STAGE_ID"]) == ("2", "C2:UC_PAID")
    portal.sim.store.deals[first.lead_id or 0].stage_id = "C2:NEW"  # a manager moved it back

    again = [delivery(0), *(delivery(n) for n in range(1, 30))]
    links = await portal.deliver(again)

    assert links[0] == first
    assert portal.gate.slots == 4  # look, recheck of the one hit, two write batches
    report = portal.report()
    assert len(report["contacts"]) == 30 and len(report["deals"]) == 30
    assert portal.sim.store.deals[first.lead_id or 0].stage_id == "C2:UC_PAID"
    [comment] = report["comments"]
    assert comment["ENTITY_ID"] == str(first.lead_id)
    assert str(again[0].submission_id) in comment["COMMENT"]
    no_duplicates(report)


async def test_linked_person_uses_the_link_and_closed_deals_get_a_new_one(portal: Portal) -> None:
    kept, closed = map(linked, await portal.deliver([delivery(0), delivery(1)]))
    portal.sim.store.deals[closed.lead_id or 0].stage_id = "WON"

    again = await portal.deliver([delivery(0, link=kept), delivery(1, link=closed)])

    assert portal.gate.slots == 2  # deal.get (+ contact.get) for both, then one write batch
    assert again[0] == kept
    assert isinstance(again[1], Link) and again[1].contact_id == closed.contact_id
    assert again[1].lead_id != closed.lead_id
    report = portal.report()
    assert len(report["contacts"]) == 2 and len(report["deals"]) == 3
    assert report["commands_by_method"]["crm.duplicate.findbycomm"] == 2  # phones, e-mails: 1st run
    no_duplicates(report)


async def test_a_failed_deal_add_fails_one_item_and_its_retry_finds_the_contact(
    portal: Portal,
) -> None:
    portal.sim.fail_command("crm.deal.add", error="ERROR_CORE", description="Deal rejected")
    items = [delivery(n) for n in range(50)]
    links = await portal.deliver(items)

    failed = [n for n, link in enumerate(links) if isinstance(link, CrmError)]
    assert len(failed) == 1
    error = links[failed[0]]
    assert isinstance(error, CrmPermanent) and "Deal rejected" in str(error)
    report = portal.report()
    assert len(report["contacts"]) == 50 and len(report["deals"]) == 49

    [retried] = await portal.deliver([delivery(failed[0], items[failed[0]].lead)])
    assert isinstance(retried, Link)
    report = portal.report()
    assert len(report["contacts"]) == 50 and len(report["deals"]) == 50
    assert retried.contact_id in {c["id"] for c in report["contacts"]}
    no_duplicates(report)


async def test_a_failed_contact_add_leaves_no_deal_behind(portal: Portal) -> None:
    portal.sim.fail_command("crm.contact.add", error="ERROR_CORE", description="Bad NAME")
    links = await portal.deliver([delivery(0), delivery(1)])
    assert isinstance(links[0], CrmPermanent) and "Bad NAME" in str(links[0])
    assert isinstance(links[1], Link)
    report = portal.report()
    assert len(report["contacts"]) == 1 and len(report["deals"]) == 1


async def test_phone_first_then_phone_and_email_is_one_contact(portal: Portal) -> None:
    [first] = await portal.deliver([delivery(0, lead(0, email=False))])
    assert isinstance(first, Link)
    [second] = await portal.deliver([delivery(0, lead(0))])  # no link: found by phone
    assert second == first
    [third] = await portal.deliver([delivery(0, lead(0, phone=False))])  # now found by email
    assert third == first

    report = portal.report()
    [contact] = report["contacts"]
    assert [e["VALUE"] for e in contact["EMAIL"]] == ["person0@example.kz"]  # added once
    assert len(report["deals"]) == 1 and len(report["comments"]) == 2
    no_duplicates(report)


async def test_linked_person_with_a_new_email_completes_the_contact(portal: Portal) -> None:
    [first] = await portal.deliver([delivery(0, lead(0, email=False))])
    assert isinstance(first, Link)
    [again] = await portal.deliver([delivery(0, lead(0), link=first)])
    assert again == first
    [contact] = portal.report()["contacts"]
    assert contact["HAS_EMAIL"] == "Y"


async def test_a_stale_link_falls_back_to_search(portal: Portal) -> None:
    [first] = await portal.deliver([delivery(0)])
    assert isinstance(first, Link)
    stale = Link(first.contact_id, 999_999)  # a deal that no longer exists
    [again] = await portal.deliver([delivery(0, link=stale)])
    assert again == first
    assert len(portal.report()["contacts"]) == 1


async def test_two_deliveries_of_one_crm_contact_do_not_open_two_deals(portal: Portal) -> None:
    # The worker sees two people (different phone, different email); the CRM has one contact
    # holding both identities, and its deal is closed.
    [first] = await portal.deliver([delivery(0)])
    assert isinstance(first, Link)
    portal.sim.store.deals[first.lead_id or 0].stage_id = "LOSE"
    by_phone = delivery(1, Lead("course", "+77010000000", None, "A"))
    by_email = delivery(2, Lead("course", None, "person0@example.kz", "A"))
    links = await portal.deliver([by_phone, by_email])
    assert isinstance(links[0], Link) and isinstance(links[1], CrmRetryable)
    no_duplicates(portal.report())


async def test_a_refused_write_request_fails_only_the_unsent_people(portal: Portal) -> None:
    # slot 1: look, slot 2: the 30 contacts, slot 3: their 30 deals → refused by the portal
    def refuse() -> None:
        portal.sim.faults.scripted.append(ScriptedAnswer("*", "*", 503))

    portal.gate.before[3] = refuse
    people = [delivery(n) for n in range(30)]
    links = await portal.adapter.deliver_batch(people)
    assert all(isinstance(link, CrmRetryable) for link in links)
    assert len(portal.report()["contacts"]) == 30 and portal.report()["deals"] == []
    # the retry finds every contact the first attempt made: a deal each, no second contact
    links = await portal.adapter.deliver_batch(people)
    assert all(isinstance(link, Link) for link in links)
    report = portal.report()
    assert len(report["contacts"]) == 30 and len(report["deals"]) == 30
    no_duplicates(report)


async def test_no_deal_is_made_for_a_contact_the_portal_refused(portal: Portal) -> None:
    """A deal never refers to its contact by `$result[…]`: the portal would make it anyway,
    bound to no contact (CRM_FACTS.md, "Bitrix24 batch references")."""
    refused = delivery(1, Lead("course", "+77010000001", "bad..dots@example.kz", "B"))
    links = await portal.adapter.deliver_batch([delivery(0), refused, delivery(2)])
    assert isinstance(links[0], Link) and isinstance(links[2], Link)
    assert isinstance(links[1], CrmPermanent) and "Invalid e-mail" in str(links[1])
    report = portal.report()
    assert len(report["deals"]) == 2
    contacts = {int(c["ID"]) for c in report["contacts"]}
    for deal in report["deals"]:
        assert len(deal["contact_ids"]) == 1 and deal["contact_ids"][0] in contacts, deal


async def test_operation_time_limit_on_one_method_comes_back_scoped(
    start_portal: StartPortal,
) -> None:
    # deal.add may run three times (0, 200, 400 of 480 s used before each); other methods
    # keep their own allowance
    portal = await start_portal(method_costs={"crm.deal.add": 200.0})
    links = await portal.deliver([delivery(n) for n in range(4)])
    assert [isinstance(link, Link) for link in links] == [True, True, True, False]
    limited = links[3]
    assert isinstance(limited, CrmRateLimited) and limited.scope == "crm.deal.add"
    assert limited.retry_after is not None and 590 < limited.retry_after <= 600
    assert len(portal.report()["contacts"]) == 4  # the retry will find the fourth contact


async def test_people_cannot_smuggle_batch_references_in_any_case(portal: Portal) -> None:
    """Bitrix24 substitutes `$result`, `$next`, `$total`, `$time`, `$error` in any case,
    anywhere in a command's text (CRM_FACTS.md, "Bitrix24 batch references"): a person's name
    reaches the portal as they typed it, with only those `$` signs made harmless."""
    names = ["$time[c0][start] и $RESULT[c0]", "$Next[c0]", "$error[c0]", "Price: $5, $total"]
    people = [delivery(0)] + [
        delivery(n, Lead("course", f"+7701000000{n}", None, name))
        for n, name in enumerate(names, start=1)
    ]
    links = await portal.adapter.deliver_batch(people)
    assert all(isinstance(link, Link) for link in links), links
    stored = {c["NAME"] for c in portal.report()["contacts"]}
    for name in names:
        assert name.replace("$", "＄").replace("＄5", "$5") in stored, (name, stored)
