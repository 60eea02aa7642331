"""What the amoCRM adapter sends: lead, complex-create and note bodies, and a batch's plan of the
writes that go out as one array call each."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from service.crm.amocrm.api import AmoContact, AmoLead, contact_fields
from service.crm.base import Delivery, Link
from service.errors import CrmError
from service.model import Lead
from service.settings import FormRule

NOTE_LIMIT = 4000


class Plan:
    """What a batch still has to send after the per-person lookups."""

    def __init__(self, items: Sequence[Delivery]) -> None:
        self.slot = {d.job_id: i for i, d in enumerate(items)}  # position in the batch
        self.new: list[Delivery] = []
        self.indexed: dict[int, list[int]] = {}  # job id → the person's contacts in the index
        self.patches: list[tuple[int, dict[str, Any]]] = []  # (slot, body)
        self.notes: list[tuple[int, dict[str, Any]]] = []
        # phones/emails added to existing contacts: (slot, body), and what to index after
        self.contact_patches: list[tuple[int, dict[str, Any]]] = []
        self.gained: dict[int, list[tuple[str, int]]] = {}  # slot → (identity, contact id)
        self.lead_creates: list[tuple[int, int, dict[str, Any]]] = []  # (slot, contact, body)
        # what the batch's bulk reads found: id → entity, or None when the CRM has no such id
        self.contacts: dict[int, AmoContact | None] = {}
        self.leads: dict[int, AmoLead | None] = {}

    def pending(
        self, items: Sequence[Delivery], out: list[Link | CrmError | None]
    ) -> list[Delivery]:
        """The items without an answer yet."""
        return [d for d in items if out[self.slot[d.job_id]] is None]

    def touch(self, item: Delivery, existing: AmoLead, rule: FormRule) -> None:
        """Move the lead to the form's status (if set and different) and add the note."""
        slot = self.slot[item.job_id]
        if rule.status_id and existing.status_id != rule.status_id:
            patch: dict[str, Any] = {"id": existing.id, "status_id": rule.status_id}
            if rule.pipeline_id:
                patch["pipeline_id"] = rule.pipeline_id
            self.patches.append((slot, patch))
        self.notes.append((slot, note(existing.id, item.lead, item.submission_id)))


def complex_body(lead: Lead, rule: FormRule, item: Delivery) -> dict[str, Any]:
    """A new lead with its new contact embedded (`leads/complex`)."""
    body = lead_body(lead, rule, item.submission_id)
    contact = {
        "first_name": lead.name or lead.phone or lead.email or "",
        "custom_fields_values": contact_fields(lead.phone, lead.email),
    }
    body["_embedded"] = {"contacts": [contact], **body.get("_embedded", {})}
    return body


def linked_lead_body(contact_id: int, lead: Lead, rule: FormRule, item: Delivery) -> dict[str, Any]:
    """A new lead for an existing contact (`POST /leads`)."""
    body = lead_body(lead, rule, item.submission_id)
    body["_embedded"] = {"contacts": [{"id": contact_id}], **body.get("_embedded", {})}
    return body


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
