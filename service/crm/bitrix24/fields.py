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
    if rule.category_id is not None:
        fields["CATEGORY_ID"] = rule.category_id
    if rule.stage_id is not None:
        fields["STAGE_ID"] = rule.stage_id
    for name in UTM:
        if lead.utm.get(name):
            fields[f"UTM_{name.upper()}"] = lead.utm[name]
    return fields


def stage_for(rule: FormRule, category_id: int) -> str | None:
    """The rule's STAGE_ID for a deal in `category_id`, or None: the rule sets none, or it is a
    stage of another category (Bitrix24 would ignore it without a word; moving a deal to
    another category is not ours to do). Stage ids are strings, `C<n>:` outside category 0;
    start-up checked that the rule's stage is one of its category's."""
    if rule.stage_id is None or (rule.category_id or 0) != category_id:
        return None
    return rule.stage_id


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
