"""amoCRM find-or-create: one person = one contact and one open lead.

Order of lookups: our link table (what we created before), then — for a person we have no link
for — by `AMOCRM_DEDUP`:

- `index` (default): the local contact index (`amocrm_index`), brought up to date with the
  CRM's list endpoint once per batch; a hit is read back (`GET /contacts/{id}`) and re-checked,
  a miss goes straight into the batch's `leads/complex`. Until the index is complete and caught
  up, people are searched for as below.
- `search`: a CRM search by phone, then by email (fuzzy: every hit is re-checked).
- `trust`: no lookup; amoCRM's own duplicate control merges contacts.

Because a failed local commit leaves the link table empty, a retry after a crash between the
CRM call and our commit finds the contact it created (the sync reads every contact changed since
the last one seen; the search finds it too) and updates its open lead instead of creating another.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg

from service.crm.amocrm_api import (
    MAX_BATCH,
    AmoContact,
    AmoCrmApi,
    AmoLead,
    contact_fields,
    digits,
)
from service.crm.amocrm_index import ContactIndex, phone_identity
from service.crm.base import Delivery, Link
from service.errors import CrmError, CrmPermanent, CrmRetryable, StoreUnavailable
from service.model import Lead
from service.settings import FormRule, Settings

log = logging.getLogger(__name__)

MAX_LEADS_CHECKED = 5  # newest leads of a found contact examined for an open one
MAX_CANDIDATES = 5  # indexed contacts of one person read back before treating them as new
NOTE_LIMIT = 4000


class AmoCrmAdapter:
    """Delivers submissions to amoCRM through `AmoCrmApi` (which goes through the rate gate).

    Per batch: people we know (link table) cost one GET each for their lead; new people cost
    one list request for the whole batch (`index`), or one or two searches each (`search`), or
    nothing (`trust`), and all the new contacts + leads of the batch go out in one
    `leads/complex` call; notes and status changes go out as one array call each.
    """

    name = "amocrm"
    max_batch = MAX_BATCH

    def __init__(
        self, api: AmoCrmApi, settings: Settings, pool: asyncpg.Pool | None = None
    ) -> None:
        self.api = api
        self.settings = settings
        self.region = settings.default_phone_region
        self.index: ContactIndex | None = None
        if settings.amocrm_dedup == "index":
            if pool is None:
                log.warning(
                    "amoCRM contact index needs the database: searching instead",
                    extra={"action": "contact_index_off"},
                )
            else:
                self.index = ContactIndex(api, pool, default_region=self.region)

    async def deliver_batch(self, items: Sequence[Delivery]) -> list[Link | CrmError]:
        plan = _Plan(items)
        out: list[Link | CrmError | None] = [None] * len(items)
        lookup = await self._lookup_for(items, plan, out)
        todo = [(plan.slot[d.job_id], d) for d in items if out[plan.slot[d.job_id]] is None]
        results = await asyncio.gather(
            *(self._prepare(item, plan, lookup) for _, item in todo), return_exceptions=True
        )
        for (slot, _), result in zip(todo, results, strict=True):
            out[slot] = _as_result(result)
        await self._create_new(plan, out)
        await self._flush(plan, out)
        return [r if r is not None else CrmRetryable("not delivered") for r in out]

    async def _lookup_for(
        self, items: Sequence[Delivery], plan: _Plan, out: list[Link | CrmError | None]
    ) -> str:
        """How this batch finds the people we have no link for: "trust", "search" or "index"
        (the index only when a refresh just now found it complete and caught up; their
        candidates go into `plan.indexed`). A failed list request fails only those people;
        known people go on."""
        mode: str = self.settings.amocrm_dedup
        if mode != "index":
            return mode
        unknown = [d for d in items if not _known(d)]
        if self.index is None or not unknown:
            return "search"
        searches = sum(bool(d.lead.phone) + bool(d.lead.email) for d in unknown)
        try:
            if not await self.index.refresh(budget=searches):
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

    async def _prepare(self, item: Delivery, plan: _Plan, lookup: str) -> Link | None:
        """Work out what the item needs; return its link now, or None if it waits for the
        batch's complex create."""
        rule = self.settings.form_rule(item.lead.form)
        link, lead = item.link, item.lead
        if _known(item):
            assert link.contact_id is not None and link.lead_id is not None
            known = await self.api.get_lead(link.lead_id)
            if known is not None and known.is_open:
                plan.touch(item, known, rule)
                return link
            return Link(link.contact_id, await self._new_lead(link.contact_id, lead, rule, item))
        if lookup == "index":
            return await self._from_index(item, plan, rule)
        contact = None if lookup == "trust" else await self.find_contact(lead)
        if contact is None:
            plan.new.append(item)
            return None
        await self._remember(contact)
        return await self._existing(contact, item, plan, rule)

    async def _from_index(self, item: Delivery, plan: _Plan, rule: FormRule) -> Link | None:
        """An index hit is used like a search hit; a contact deleted in the CRM meanwhile (404
        on reading it, 400/404 on linking or updating it) leaves the index and the person is
        new."""
        contact = await self._indexed_contact(item.lead, plan.indexed[item.job_id])
        if contact is None:
            plan.new.append(item)
            return None
        try:
            return await self._existing(contact, item, plan, rule)
        except CrmPermanent as exc:
            if exc.status not in (400, 404) or await self.api.get_contact(contact.id) is not None:
                raise
        assert self.index is not None
        await self.index.forget_contact(contact.id)
        plan.new.append(item)
        return None

    async def _indexed_contact(self, lead: Lead, candidates: list[int]) -> AmoContact | None:
        """The first indexed contact that still exists and still holds the phone or email."""
        assert self.index is not None
        for contact_id in candidates[:MAX_CANDIDATES]:
            contact = await self.api.get_contact(contact_id)
            if contact is None:
                await self.index.forget_contact(contact_id)
            elif not self._matches(contact, lead):
                await self.index.forget_stale(contact, lead)
            else:
                return contact
        return None

    async def _existing(
        self, contact: AmoContact, item: Delivery, plan: _Plan, rule: FormRule
    ) -> Link:
        """The person is this contact: their open lead gets the note, else a new lead."""
        await self._complete_contact(contact, item.lead)
        open_lead = await self._open_lead(contact, rule)
        if open_lead is not None:
            plan.touch(item, open_lead, rule)
            return Link(contact.id, open_lead.id)
        return Link(contact.id, await self._new_lead(contact.id, item.lead, rule, item))

    async def _create_new(self, plan: _Plan, out: list[Link | CrmError | None]) -> None:
        """One `leads/complex` call for every new person of the batch; the new contacts go
        into the index at once."""
        if not plan.new:
            return
        bodies = [self._complex(d.lead, self.settings.form_rule(d.lead.form), d) for d in plan.new]
        slots = [plan.slot[d.job_id] for d in plan.new]
        try:
            created = await self.api.create_complex(bodies)
        except CrmError as exc:
            for slot in slots:
                out[slot] = exc
            return
        pairs: list[tuple[str, int]] = []
        for slot, res, item in zip(slots, created, plan.new, strict=True):
            out[slot] = Link(res.contact_id, res.lead_id)
            if res.contact_id is not None:
                pairs += [(i, res.contact_id) for i in (item.lead.phone, item.lead.email) if i]
        await self._remember(pairs)

    async def _flush(self, plan: _Plan, out: list[Link | CrmError | None]) -> None:
        """Status changes and notes for existing leads, one array call each. A failure fails
        only the items that still needed it (their lead exists; the retry will update it)."""
        for call, bodies in (
            (self.api.update_leads, plan.patches),
            (self.api.add_notes, plan.notes),
        ):
            if not bodies:
                continue
            try:
                await call([body for _, body in bodies])
            except CrmError as exc:
                for slot in {s for s, _ in bodies}:
                    out[slot] = exc

    async def find_contact(self, lead: Lead) -> AmoContact | None:
        """The oldest contact whose phone or email really matches (the search is fuzzy)."""
        for query in (lead.phone, lead.email):
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

    async def _open_lead(self, contact: AmoContact, rule: FormRule) -> AmoLead | None:
        for lead_id in sorted(contact.lead_ids, reverse=True)[:MAX_LEADS_CHECKED]:
            found = await self.api.get_lead(lead_id)
            if found is None or not found.is_open:
                continue
            if rule.pipeline_id is None or found.pipeline_id == rule.pipeline_id:
                return found
        return None

    async def _complete_contact(self, contact: AmoContact, lead: Lead) -> None:
        """Add the phone or email the contact lacks, so the next search finds it either way.

        PATCH replaces all values of a field, so the existing values are sent along."""
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
        await self.api.update_contacts([{"id": contact.id, "custom_fields_values": fields}])
        await self._remember([(i, contact.id) for i in (lead.phone, lead.email) if i])

    async def _new_lead(self, contact_id: int, lead: Lead, rule: FormRule, item: Delivery) -> int:
        body = lead_body(lead, rule, item.submission_id)
        body["_embedded"] = {"contacts": [{"id": contact_id}], **body.get("_embedded", {})}
        ids = await self.api.create_leads([body])
        return ids[0]

    def _complex(self, lead: Lead, rule: FormRule, item: Delivery) -> dict[str, Any]:
        body = lead_body(lead, rule, item.submission_id)
        contact = {
            "first_name": lead.name or lead.phone or lead.email or "",
            "custom_fields_values": contact_fields(lead.phone, lead.email),
        }
        body["_embedded"] = {"contacts": [contact], **body.get("_embedded", {})}
        return body


class _Plan:
    """What a batch still has to send after the per-person lookups."""

    def __init__(self, items: Sequence[Delivery]) -> None:
        self.slot = {d.job_id: i for i, d in enumerate(items)}  # position in the batch
        self.new: list[Delivery] = []
        self.indexed: dict[int, list[int]] = {}  # job id → the person's contacts in the index
        self.patches: list[tuple[int, dict[str, Any]]] = []  # (slot, body)
        self.notes: list[tuple[int, dict[str, Any]]] = []

    def touch(self, item: Delivery, existing: AmoLead, rule: FormRule) -> None:
        """Move the lead to the form's status (if set and different) and add the note."""
        slot = self.slot[item.job_id]
        if rule.status_id and existing.status_id != rule.status_id:
            patch: dict[str, Any] = {"id": existing.id, "status_id": rule.status_id}
            if rule.pipeline_id:
                patch["pipeline_id"] = rule.pipeline_id
            self.patches.append((slot, patch))
        self.notes.append((slot, note(existing.id, item.lead, item.submission_id)))


def _as_result(result: Link | BaseException | None) -> Link | CrmError | None:
    if isinstance(result, CrmError):
        return result
    if isinstance(result, BaseException):
        if not isinstance(result, Exception):
            raise result
        return CrmRetryable(f"unexpected {result.__class__.__name__}: {result}")
    return result


def _known(item: Delivery) -> bool:
    """We hold the person's contact and lead from an earlier delivery."""
    return bool(item.link.contact_id and item.link.lead_id)


def lead_body(lead: Lead, rule: FormRule, sid: uuid.UUID) -> dict[str, Any]:
    """The lead as amoCRM wants it: name, pipeline/status, tags, mapped custom fields."""
    body: dict[str, Any] = {
        "name": rule.lead_name.format(form=lead.form, name=lead.name or lead.phone or lead.email),
        "request_id": str(sid),
    }
    if rule.pipeline_id:
        body["pipeline_id"] = rule.pipeline_id
    if rule.status_id:
        body["status_id"] = rule.status_id
    custom = [
        {"field_id": field_id, "values": [{"value": value}]}
        for name, field_id in rule.field_map.items()
        if (value := field_value(lead, name)) is not None
    ]
    if custom:
        body["custom_fields_values"] = custom
    if rule.tags:
        body["_embedded"] = {"tags": [{"name": t} for t in rule.tags]}
    return body


def field_value(lead: Lead, name: str) -> str | None:
    """`utm_source` → lead.utm["source"]; `a.b` → lead.fields["a"]["b"]; else lead.fields[name]."""
    if name.startswith("utm_"):
        return lead.utm.get(name[4:])
    value: Any = lead.fields
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    if value is None or isinstance(value, dict | list):
        return None
    return str(value)


def note(lead_id: int, lead: Lead, sid: uuid.UUID) -> dict[str, Any]:
    """A note with the submission, so the manager sees every form the person sent."""
    return {
        "entity_id": lead_id,
        "note_type": "common",
        "params": {"text": lead.summary(sid)[:NOTE_LIMIT]},
    }
