"""What the Bitrix24 adapter writes: a new contact's and deal's fields, the phone/e-mail a contact
lacks, the stage for a form rule, and the text of a submission (deal COMMENTS or a timeline
comment)."""

from __future__ import annotations

import uuid
from typing import Any

from service.crm.bitrix24.api import BitrixContact
from service.model import Lead
from service.settings import FormRule

UTM = ("source", "medium", "campaign", "content", "term")
TEXT_LIMIT = 4000


def contact_fields(lead: Lead) -> dict[str, Any]:
    """A new contact: a name (the phone or e-mail when none was given), work phone and e-mail."""
    name = lead.name or lead.phone or lead.email or ""
    return {"NAME": name, "SOURCE_ID": "WEB", **missing_comms(None, lead)}


def missing_comms(contact: BitrixContact | None, lead: Lead) -> dict[str, Any]:
    """The phone/e-mail the contact lacks (all of them for no contact), as multi-fields."""
    missing: dict[str, Any] = {}
    for kind, value in (("PHONE", lead.phone), ("EMAIL", lead.email)):
        if value and not (contact and contact.has(kind, value)):
            missing[kind] = [{"VALUE": value, "VALUE_TYPE": "WORK"}]
    return missing


def deal_fields(lead: Lead, rule: FormRule, sid: uuid.UUID, contact: int) -> dict[str, Any]:
    """A new deal: title from the form rule, category/stage, source, UTM, the submission.

    `contact` is the contact's real id, never a batch reference (`$result[…]`): Bitrix24 runs
    a command whose reference failed anyway, binding the deal to no contact or the wrong one.
    """
    fields: dict[str, Any] = {
        "TITLE": _title(lead, rule),
        "SOURCE_ID": "WEB",
        "COMMENTS": submission_text(lead, sid),
        "CONTACT_IDS": [contact],
    }
    if rule.pipeline_id is not None:
        fields["CATEGORY_ID"] = rule.pipeline_id
    stage = stage_for(rule, rule.pipeline_id or 0)
    if stage is not None:
        fields["STAGE_ID"] = stage
    for name in UTM:
        if lead.utm.get(name):
            fields[f"UTM_{name.upper()}"] = lead.utm[name]
    return fields


def stage_for(rule: FormRule, category_id: int) -> str | None:
    """STAGE_ID for the rule's `status_id` in a category, or None when the rule sets none.

    The rule's ids are amoCRM-shaped integers; a Bitrix24 stage is a string, prefixed `C<n>:`
    outside the default category, so `status_id` 5 means stage "5" or "C<n>:5".
    """
    if rule.status_id is None:
        return None
    return f"C{category_id}:{rule.status_id}" if category_id else str(rule.status_id)


def submission_text(lead: Lead, sid: uuid.UUID) -> str:
    """Everything the person sent, one line per field: the new deal's COMMENTS, or a timeline
    comment on their open deal, so the manager sees every form the person sent."""
    return lead.summary(sid)[:TEXT_LIMIT]


def _title(lead: Lead, rule: FormRule) -> str:
    name = lead.name or lead.phone or lead.email or ""
    try:
        return rule.lead_name.format(form=lead.form, name=name)
    except (KeyError, IndexError, ValueError):  # a template naming fields we do not have
        return f"{lead.form}: {name}"
