"""amoCRM find-or-create: one person = one contact and one open lead.

Order of lookups: our link table (what we created before), then — for a person we have no link
for — by `AMOCRM_DEDUP`:

- `index` (default): the local contact index (`amocrm_index`), brought up to date with the
  CRM's list endpoint at most every `AMOCRM_INDEX_REFRESH_S`, at its own share of the limit;
  the hits are read back in bulk (`filter[id]`) and re-checked, a miss goes straight into the
  batch's `leads/complex`. Until the index is complete and caught up, people are searched for
  as below.
- `search`: a CRM search by phone, then by email (fuzzy: every hit is re-checked).
- `trust`: no lookup; amoCRM's own duplicate control merges contacts.

Two of our people can be one contact (a phone-only and an email-only submission of someone a
manager entered with both): every delivery is resolved to its contact before anything is
written, and only one delivery per contact writes, in the batch and across processes
(`ContactClaims`); the others are `Deferred` to the next round, where they find its lead.

Because a failed local commit leaves the link table empty, a retry after a crash between the
CRM call and our commit finds the contact it created (the sync reads every contact changed since
the last one seen; the search finds it too) and updates its open lead instead of creating another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from service.crm.amocrm.api import (
    MAX_BATCH,
    AmoContact,
    AmoCrmApi,
    AmoLead,
    digits,
)
from service.crm.amocrm.bodies import Plan, complex_body, linked_lead_body
from service.crm.amocrm.index import (
    SCAN_DEFER_S,
    ContactIndex,
    account_of,
    national_number,
    phone_identity,
)
from service.crm.amocrm.sparing import Send, no_answer, send_sparing
from service.crm.base import Deferred, Delivery, Link
from service.crm.contact_guard import ContactClaims
from service.db.contact_locks import ContactGuard
from service.db.store import Pool
from service.errors import CrmError, CrmPermanent, CrmRetryable, StoreUnavailable
from service.model import Lead
from service.settings import AmoCrmSettings, FormRule, LeadSettings

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_LEADS_CHECKED = 5  # newest leads of a found contact examined for an open one
MAX_CANDIDATES = 5  # indexed contacts of one person read back before treating them as new


class AmoCrmAdapter:
    """Delivers submissions to amoCRM through `AmoCrmApi` (which goes through the rate gate).

    Per batch: the leads of people we know (link table) and the contacts the index names
    are read in bulk (`filter[id]`, BULK_IDS to a request), then the leads of every contact
    found; new people cost one list request for the whole batch (`index`), or one or two
    searches each (`search`), or nothing (`trust`), and all the new contacts + leads of the
    batch go out in `leads/complex` calls of 50; phones/emails added to contacts, new leads of
    existing contacts, status changes and notes go out as array calls of 50 each.
    """

    name = "amocrm"
    max_batch = MAX_BATCH
    max_round = 500  # one contact-list read for up to ten `leads/complex` of 50

    def __init__(
        self,
        api: AmoCrmApi,
        settings: AmoCrmSettings,
        leads: LeadSettings,
        pool: Pool | None = None,
        *,
        sessions: Pool | None = None,
        region: str | None = None,
        index_rate: float | None = None,
        index_reuse_s: float = 0.0,
    ) -> None:
        self.api = api
        self.dedup = settings.dedup
        self.leads = leads
        self.region = region  # DEFAULT_PHONE_REGION: how the CRM's local numbers are read
        self.index: ContactIndex | None = None
        if self.dedup == "index":
            if pool is None:
                log.warning(
                    "amoCRM contact index needs the database: searching instead",
                    extra={"action": "contact_index_off"},
                )
            else:
                self.index = ContactIndex(
                    api,
                    pool,
                    sessions=sessions,
                    default_region=self.region,
                    rate=index_rate,
                    reuse_s=index_reuse_s,
                )

    async def deliver_batch(
        self, items: Sequence[Delivery], guard: ContactGuard | None = None
    ) -> list[Link | CrmError]:
        """Find every item's contact first, then let one delivery per contact write (the
        others are `Deferred`: `ContactClaims`), then write."""
        plan = Plan(items)
        out: list[Link | CrmError | None] = [None] * len(items)
        async with ContactClaims(guard, account_of(self.api.base_url)) as claims:
            lookup = await self._lookup_for(items, plan, out)
            todo = plan.pending(items, out)
            await self._read_ahead(todo, plan, out, lookup)
            todo = plan.pending(todo, out)
            found = await _each(todo, plan, out, lambda d: self._resolve(d, plan, lookup))
            await self._read_leads_of(todo, found, plan, out)
            resolved = [(d, found[d.job_id].contact_id) for d in todo if d.job_id in found]
            for job_id, why in (await claims.hold(resolved)).items():
                out[plan.slot[job_id]] = why
            ready = plan.pending(todo, out)
            links = await _each(
                ready, plan, out, lambda d: self._act(d, found[d.job_id], plan, claims)
            )
            for job_id, link in links.items():
                out[plan.slot[job_id]] = link  # None: made by `_create_new` or `_flush`
            await self._create_new(plan, out)
            await self._flush(plan, out, items)
        return [r if r is not None else CrmRetryable("not delivered") for r in out]

    async def _lookup_for(
        self, items: Sequence[Delivery], plan: Plan, out: list[Link | CrmError | None]
    ) -> str:
        """How this batch finds the people we have no link for: "trust", "search" or "index"
        (the index only when a refresh just now found it complete and caught up; their
        candidates go into `plan.indexed`). A failed list request fails only those people;
        known people go on."""
        mode: str = self.dedup
        if mode != "index":
            return mode
        unknown = [d for d in items if not _known(d)]
        if self.index is None or not unknown:
            return "search"
        try:
            # a retry after a counted attempt: that attempt's write may have landed unanswered
            retrying = any(d.attempts for d in unknown)
            if not await self.index.refresh(fresh=retrying):
                if self.index.worth_waiting:  # a new account being read: its people wait
                    for d in unknown:
                        why = "the contact index is still reading the account"
                        out[plan.slot[d.job_id]] = Deferred(why, delay_s=SCAN_DEFER_S)
                return "search"
            found = await self.index.candidates([d.lead for d in unknown])
            plan.indexed = {d.job_id: ids for d, ids in zip(unknown, found, strict=True)}
            return "index"
        except StoreUnavailable as exc:
            log.warning(
                "contact index unavailable: searching instead",
                extra={"action": "contact_index_down", "error": str(exc)},
            )
            return "search"
        except CrmError as exc:
            for d in items:
                if not _known(d):
                    out[plan.slot[d.job_id]] = exc
            return "search"

    async def _read_ahead(
        self, items: Sequence[Delivery], plan: Plan, out: list[Link | CrmError | None], lookup: str
    ) -> None:
        """In bulk, before anyone is resolved: the leads of people we know, and the contacts
        the index names. A failed read fails the people that needed it."""
        linked = [d for d in items if _known(d)]
        indexed = [d for d in items if lookup == "index" and not _known(d)]
        wanted = {d.job_id: plan.indexed.get(d.job_id, [])[:MAX_CANDIDATES] for d in indexed}
        try:
            await self._read(plan, leads=[int(d.link.lead_id or 0) for d in linked])
        except CrmError as exc:
            for d in linked:
                out[plan.slot[d.job_id]] = exc
        try:
            await self._read(plan, contacts=[i for ids in wanted.values() for i in ids])
        except CrmError as exc:
            for d in indexed:
                out[plan.slot[d.job_id]] = exc

    async def _read_leads_of(
        self,
        items: Sequence[Delivery],
        found: dict[int, _Found],
        plan: Plan,
        out: list[Link | CrmError | None],
    ) -> None:
        """In bulk: the leads of every contact the batch found (the newest MAX_LEADS_CHECKED
        of each), where the open one is looked for."""
        contacts = {d.job_id: found[d.job_id].contact for d in items if d.job_id in found}
        needing = [d for d in items if contacts.get(d.job_id) is not None]
        ids = [i for c in contacts.values() if c is not None for i in _newest_leads(c)]
        try:
            await self._read(plan, leads=ids)
        except CrmError as exc:
            for d in needing:
                out[plan.slot[d.job_id]] = exc

    async def _read(
        self, plan: Plan, *, contacts: Sequence[int] = (), leads: Sequence[int] = ()
    ) -> None:
        """Read what the plan does not hold yet; an id the CRM does not have is None."""
        contact_ids = sorted({i for i in contacts if i and i not in plan.contacts})
        if contact_ids:
            got = await self.api.get_contacts(contact_ids)
            plan.contacts.update({i: got.get(i) for i in contact_ids})
        lead_ids = sorted({i for i in leads if i and i not in plan.leads})
        if lead_ids:
            got_leads = await self.api.get_leads(lead_ids)
            plan.leads.update({i: got_leads.get(i) for i in lead_ids})

    async def _contact(self, contact_id: int, plan: Plan) -> AmoContact | None:
        """A contact as the batch's bulk read found it, else read on its own."""
        if contact_id in plan.contacts:
            return plan.contacts[contact_id]
        return await self.api.get_contact(contact_id)

    async def _lead(self, lead_id: int, plan: Plan) -> AmoLead | None:
        """A lead as the batch's bulk read found it, else read on its own."""
        if lead_id in plan.leads:
            return plan.leads[lead_id]
        return await self.api.get_lead(lead_id)

    async def _resolve(self, item: Delivery, plan: Plan, lookup: str) -> _Found:
        """Whom the delivery goes to, before anything is written."""
        if _known(item):
            return _Found(item.link.contact_id)
        if lookup == "index":
            contact = await self._indexed_contact(item.lead, plan.indexed[item.job_id], plan)
            return _Found() if contact is None else _Found(contact.id, contact)
        contact = None if lookup == "trust" else await self.find_contact(item.lead)
        if contact is None:
            return _Found()
        await self._remember(contact)
        return _Found(contact.id, contact)

    async def _act(
        self, item: Delivery, found: _Found, plan: Plan, claims: ContactClaims
    ) -> Link | None:
        """Write what the item needs; its link now, or None if it waits for the batch's
        complex create (a new person)."""
        rule = self.leads.form_rule(item.lead.form)
        if found.contact_id is None:
            plan.new.append(item)
            return None
        if found.contact is None:
            return await self._linked(item, plan, rule, claims)
        return await self._existing(found.contact, item, plan, rule, claims)

    async def _linked(
        self, item: Delivery, plan: Plan, rule: FormRule, claims: ContactClaims
    ) -> Link | None:
        """A person we delivered before: their open lead gets the note. Their lead closed (or
        deleted), the contact's open lead gets it (another of our people may have opened one),
        else a new lead; their contact deleted in the CRM, they are new."""
        link = item.link
        assert link.contact_id is not None and link.lead_id is not None
        known = await self._lead(link.lead_id, plan)
        if known is not None and known.is_open:
            plan.touch(item, known, rule)
            return link
        contact = await self._contact(link.contact_id, plan)
        if contact is None:
            plan.new.append(item)
            return None
        return await self._existing(contact, item, plan, rule, claims)

    async def _indexed_contact(
        self, lead: Lead, candidates: list[int], plan: Plan
    ) -> AmoContact | None:
        """The first indexed contact that still exists and still holds the phone or email."""
        assert self.index is not None
        for contact_id in candidates[:MAX_CANDIDATES]:
            contact = await self._contact(contact_id, plan)
            if contact is None:
                await self.index.forget_contact(contact_id)
            elif not self._matches(contact, lead):
                await self.index.forget_stale(contact, lead)
            else:
                return contact
        return None

    async def _existing(
        self,
        contact: AmoContact,
        item: Delivery,
        plan: Plan,
        rule: FormRule,
        claims: ContactClaims,
    ) -> Link | None:
        """The person is this contact (found by link, search or index): their open lead gets
        the note, else a new lead (made with the batch's others by `_flush`: None until then).
        A contact deleted in the CRM since we read it is not a dead letter: `_contacts_gone`
        resolves its person again."""
        self._complete_contact(contact, item, plan, claims)
        open_lead = await self._open_lead(contact, rule, plan)
        if open_lead is not None:
            plan.touch(item, open_lead, rule)
            return Link(contact.id, open_lead.id)
        claims.wrote(contact.id)
        body = linked_lead_body(contact.id, item.lead, rule, item)
        plan.lead_creates.append((plan.slot[item.job_id], contact.id, body))
        return None

    async def _create_new(self, plan: Plan, out: list[Link | CrmError | None]) -> None:
        """One `leads/complex` call for every new person of the batch (a person amoCRM
        refuses fails alone: `send_sparing`); the new contacts go into the index at once."""
        if not plan.new:
            return
        bodies = [complex_body(d.lead, self.leads.form_rule(d.lead.form), d) for d in plan.new]
        created = await _in_batches(self.api.create_complex, bodies)
        pairs: list[tuple[str, int]] = []
        for res, item in zip(created, plan.new, strict=True):
            if isinstance(res, CrmError):
                out[plan.slot[item.job_id]] = res
                continue
            out[plan.slot[item.job_id]] = Link(res.contact_id, res.lead_id)
            if res.contact_id is not None:
                pairs += [(i, res.contact_id) for i in (item.lead.phone, item.lead.email) if i]
        await self._remember(pairs)

    async def _flush(
        self, plan: Plan, out: list[Link | CrmError | None], items: Sequence[Delivery]
    ) -> None:
        """Phones/emails added to contacts, status changes and notes for existing leads, and
        new leads for existing contacts: array calls of 50. A failure fails only the items that
        still needed it (the retry will find what was made), and an item amoCRM refuses fails
        alone (`send_sparing`); one refused for a contact deleted since the batch read it is
        new after all (`_contacts_gone`)."""
        refused: dict[int, int] = {}  # slot → contact whose write amoCRM refused (400/404)
        for call, bodies in (
            (self.api.update_contacts, plan.contact_patches),
            (self.api.update_leads, plan.patches),
            (self.api.add_notes, plan.notes),
        ):
            if not bodies:
                continue
            answers = await _in_batches(no_answer(call), [body for _, body in bodies])
            for (slot, body), answer in zip(bodies, answers, strict=True):
                if isinstance(answer, CrmError):
                    out[slot] = answer
                    if bodies is plan.contact_patches and _refused(answer):
                        refused[slot] = int(body["id"])
            if bodies is plan.contact_patches:
                gained = [plan.gained.get(slot, []) for slot, _ in bodies]
                ok = [not isinstance(a, CrmError) for a in answers]
                await self._remember(
                    [p for pairs, y in zip(gained, ok, strict=True) if y for p in pairs]
                )
        if plan.lead_creates:
            made = await _in_batches(self.api.create_leads, [b for _, _, b in plan.lead_creates])
            for (slot, contact_id, _), lead_id in zip(plan.lead_creates, made, strict=True):
                if isinstance(lead_id, CrmError):
                    out[slot] = lead_id
                    if _refused(lead_id):
                        refused[slot] = contact_id
                elif out[slot] is None:
                    out[slot] = Link(contact_id, lead_id)
        await self._contacts_gone(refused, plan, out, items)

    async def _contacts_gone(
        self,
        refused: dict[int, int],
        plan: Plan,
        out: list[Link | CrmError | None],
        items: Sequence[Delivery],
    ) -> None:
        """Writes refused for contacts deleted in the CRM since the batch read them (amoCRM:
        "Contact is not found", a 400/404, and reading it back finds nothing): not dead letters.
        Those contacts leave the index and their people are resolved again: a search finding
        nobody makes them new, in one more `leads/complex` (no claim needed: nobody else can
        have read a contact that does not exist); finding another contact (a manager merged the
        two) defers them to the next round, which reads that contact under the contact claims.
        Contacts still there keep their refusal."""
        if not refused:
            return
        try:
            alive = await self.api.get_contacts(sorted(set(refused.values())))
        except CrmError:
            return  # the refusals stand; the retry reads the contact again
        gone = {slot: cid for slot, cid in refused.items() if cid not in alive}
        if self.index is not None:
            for contact_id in set(gone.values()):
                with contextlib.suppress(StoreUnavailable):
                    await self.index.forget_contact(contact_id)
        plan.new = []
        for slot, contact_id in sorted(gone.items()):
            item = items[slot]
            log.info(
                "amoCRM contact gone before our write: resolving the person again",
                extra={"action": "contact_gone", "contact_id": contact_id, "job_id": item.job_id},
            )
            try:
                again = None if self.dedup == "trust" else await self.find_contact(item.lead)
            except CrmError as exc:
                out[slot] = exc
                continue
            if again is not None and again.id != contact_id:
                why = f"CRM contact {contact_id} is gone; {again.id} holds the person now"
                out[slot] = Deferred(why)
                continue
            out[slot] = None
            plan.new.append(item)
        await self._create_new(plan, out)

    async def find_contact(self, lead: Lead) -> AmoContact | None:
        """The oldest contact whose phone or email really matches.

        amoCRM's search is a substring search over what a manager typed: "+79161234567" is not
        in "8 (916) 123-45-67". A phone is searched by its national number, which is in every
        way of writing it, and what comes back is re-checked exactly (CRM_FACTS.md, "amoCRM
        search")."""
        phone = national_number(lead.phone) if lead.phone else None
        for query in (phone, lead.email):
            if not query:
                continue
            found = [c for c in await self.api.search_contacts(query) if self._matches(c, lead)]
            if found:
                return min(found, key=lambda c: c.id)
        return None

    def _matches(self, contact: AmoContact, lead: Lead) -> bool:
        """The contact holds the lead's phone (written any way intake would read it) or email."""
        if lead.phone and self._has_phone(contact.phones, lead.phone):
            return True
        return bool(lead.email) and lead.email in {e.lower() for e in contact.emails}

    def _has_phone(self, phones: Sequence[str], phone: str) -> bool:
        wanted = digits(phone)
        return any(digits(p) == wanted or phone_identity(p, self.region) == phone for p in phones)

    async def _remember(self, found: AmoContact | list[tuple[str, int]]) -> None:
        """Put what the CRM just showed or made into the index (when there is one). Losing
        this write costs nothing but requests: the next sync reads those contacts anyway."""
        if self.index is None:
            return
        try:
            if isinstance(found, AmoContact):
                await self.index.remember_contact(found)
            else:
                await self.index.remember(found)
        except StoreUnavailable as exc:
            log.warning(
                "contact index write lost",
                extra={"action": "contact_index_down", "error": str(exc)},
            )

    async def _open_lead(self, contact: AmoContact, rule: FormRule, plan: Plan) -> AmoLead | None:
        for lead_id in _newest_leads(contact):
            found = await self._lead(lead_id, plan)
            if found is None or not found.is_open:
                continue
            if rule.pipeline_id is None or found.pipeline_id == rule.pipeline_id:
                return found
        return None

    def _complete_contact(
        self, contact: AmoContact, item: Delivery, plan: Plan, claims: ContactClaims
    ) -> None:
        """Add the phone or email the contact lacks, so the next search finds it either way
        (sent with the batch's others by `_flush`).

        PATCH replaces all values of a field, so the existing values are sent along."""
        lead = item.lead
        phones = list(contact.phones)
        emails = list(contact.emails)
        if lead.phone and not self._has_phone(phones, lead.phone):
            phones.append(lead.phone)
        if lead.email and lead.email not in {e.lower() for e in emails}:
            emails.append(lead.email)
        if (len(phones), len(emails)) == (len(contact.phones), len(contact.emails)):
            return
        fields = [
            {"field_code": code, "values": [{"value": v, "enum_code": "WORK"} for v in values]}
            for code, values in (("PHONE", phones), ("EMAIL", emails))
            if values
        ]
        claims.wrote(contact.id)
        slot = plan.slot[item.job_id]
        plan.contact_patches.append((slot, {"id": contact.id, "custom_fields_values": fields}))
        plan.gained[slot] = [(i, contact.id) for i in (lead.phone, lead.email) if i]


@dataclass(frozen=True)
class _Found:
    """Whom a delivery goes to: an existing contact (read from the CRM, or only its id, from
    our link), or nobody yet (a new person)."""

    contact_id: int | None = None
    contact: AmoContact | None = None


async def _each(
    items: Sequence[Delivery],
    plan: Plan,
    out: list[Link | CrmError | None],
    step: Callable[[Delivery], Awaitable[T]],
) -> dict[int, T]:
    """`step` for every item at once: job id → its answer; an item whose step failed gets
    its error in `out` instead."""
    results = await asyncio.gather(*(step(d) for d in items), return_exceptions=True)
    done: dict[int, T] = {}
    for item, result in zip(items, results, strict=True):
        if isinstance(result, BaseException):
            out[plan.slot[item.job_id]] = _as_error(result)
        else:
            done[item.job_id] = result
    return done


async def _in_batches(send: Send[T], bodies: Sequence[Mapping[str, Any]]) -> list[T | CrmError]:
    """`send_sparing` for any number of bodies, MAX_BATCH to a request."""
    answers: list[T | CrmError] = []
    for start in range(0, len(bodies), MAX_BATCH):
        answers += await send_sparing(send, bodies[start : start + MAX_BATCH])
    return answers


def _as_error(exc: BaseException) -> CrmError:
    if isinstance(exc, CrmError):
        return exc
    if not isinstance(exc, Exception):
        raise exc
    return CrmRetryable(f"unexpected {exc.__class__.__name__}: {exc}")


def _refused(exc: CrmError) -> bool:
    """amoCRM's answer to a write naming a contact it no longer has."""
    return isinstance(exc, CrmPermanent) and exc.status in (400, 404)


def _newest_leads(contact: AmoContact) -> list[int]:
    """The leads of a contact examined for an open one: its newest MAX_LEADS_CHECKED."""
    return sorted(contact.lead_ids, reverse=True)[:MAX_LEADS_CHECKED]


def _known(item: Delivery) -> bool:
    """We hold the person's contact and lead from an earlier delivery."""
    return bool(item.link.contact_id and item.link.lead_id)
