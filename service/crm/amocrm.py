"""amoCRM find-or-create: one person = one contact and one open lead.

Order of lookups: our link table (what we created before), then a CRM search by phone and by
email (fuzzy: every hit is re-checked). Because a failed local commit leaves the link table
empty, a retry after a crash between the CRM call and our commit searches, finds the contact it
created and updates its open lead instead of creating another.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson

from service.crm.amocrm_api import AmoContact, AmoCrmApi, AmoLead, contact_fields, digits
from service.crm.base import Link
from service.model import Lead
from service.settings import FormRule, Settings

MAX_LEADS_CHECKED = 5  # newest leads of a found contact examined for an open one
NOTE_LIMIT = 4000


class AmoCrmAdapter:
    """Delivers submissions to amoCRM through `AmoCrmApi` (which goes through the rate gate)."""

    name = "amocrm"

    def __init__(self, api: AmoCrmApi, settings: Settings) -> None:
        self.api = api
        self.settings = settings

    async def deliver(self, lead: Lead, link: Link, submission_id: uuid.UUID) -> Link:
        rule = self.settings.form_rule(lead.form)
        if link.contact_id and link.lead_id:
            known = await self.api.get_lead(link.lead_id)
            if known is not None and known.is_open:
                await self._touch(known, lead, rule, submission_id)
                return link
            return Link(
                link.contact_id, await self._new_lead(link.contact_id, lead, rule, submission_id)
            )
        contact = await self.find_contact(lead)
        if contact is None:
            created = await self.api.create_complex([self._complex(lead, rule, submission_id)])
            return Link(created[0].contact_id, created[0].lead_id)
        await self._complete_contact(contact, lead)
        open_lead = await self._open_lead(contact, rule)
        if open_lead is not None:
            await self._touch(open_lead, lead, rule, submission_id)
            return Link(contact.id, open_lead.id)
        return Link(contact.id, await self._new_lead(contact.id, lead, rule, submission_id))

    async def find_contact(self, lead: Lead) -> AmoContact | None:
        """The oldest contact whose phone or email really matches (the search is fuzzy)."""
        for query in (lead.phone, lead.email):
            if not query:
                continue
            found = [c for c in await self.api.search_contacts(query) if _matches(c, lead)]
            if found:
                return min(found, key=lambda c: c.id)
        return None

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
        if lead.phone and digits(lead.phone) not in {digits(p) for p in phones}:
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

    async def _touch(self, existing: AmoLead, lead: Lead, rule: FormRule, sid: uuid.UUID) -> None:
        if rule.status_id and existing.status_id != rule.status_id:
            patch: dict[str, Any] = {"id": existing.id, "status_id": rule.status_id}
            if rule.pipeline_id:
                patch["pipeline_id"] = rule.pipeline_id
            await self.api.update_leads([patch])
        await self.api.add_notes([note(existing.id, lead, sid)])

    async def _new_lead(self, contact_id: int, lead: Lead, rule: FormRule, sid: uuid.UUID) -> int:
        body = lead_body(lead, rule, sid)
        body["_embedded"] = {"contacts": [{"id": contact_id}], **body.get("_embedded", {})}
        ids = await self.api.create_leads([body])
        return ids[0]

    def _complex(self, lead: Lead, rule: FormRule, sid: uuid.UUID) -> dict[str, Any]:
        body = lead_body(lead, rule, sid)
        contact = {
            "first_name": lead.name or lead.phone or lead.email or "",
            "custom_fields_values": contact_fields(lead.phone, lead.email),
        }
        body["_embedded"] = {"contacts": [contact], **body.get("_embedded", {})}
        return body


def _matches(contact: AmoContact, lead: Lead) -> bool:
    if lead.phone and digits(lead.phone) in {digits(p) for p in contact.phones}:
        return True
    return bool(lead.email) and lead.email in {e.lower() for e in contact.emails}


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
    lines = [f"Form: {lead.form}", f"Submission: {sid}"]
    lines += [
        f"{k}: {v}"
        for k, v in (("Name", lead.name), ("Phone", lead.phone), ("Email", lead.email))
        if v
    ]
    lines += [f"utm_{k}: {v}" for k, v in sorted(lead.utm.items())]
    if lead.fields:
        lines.append(orjson.dumps(lead.fields, option=orjson.OPT_SORT_KEYS).decode())
    return {
        "entity_id": lead_id,
        "note_type": "common",
        "params": {"text": "\n".join(lines)[:NOTE_LIMIT]},
    }
