"""What amoCRM answers, as typed values: contacts, leads, `leads/complex` results, list pages.

Every answer is untrusted input: shapes are checked, odd values are skipped, and an envelope we
cannot read is `CrmRetryable` rather than "nothing there" (which would make callers create
duplicates). No HTTP here; `amocrm_api` sends, this module reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.crm.base import as_int
from service.errors import CrmError, CrmRetryable

CLOSED_STATUSES = frozenset({142, 143})  # won, lost: the same ids in every amoCRM pipeline


@dataclass(frozen=True)
class AmoContact:
    """A contact as found by search, with the phones, e-mails and leads amoCRM returned."""

    id: int
    name: str | None
    phones: tuple[str, ...]
    emails: tuple[str, ...]
    lead_ids: tuple[int, ...]
    updated_at: int | None = None  # unix seconds, when amoCRM sent it


@dataclass(frozen=True)
class AmoLead:
    """A lead's position in the funnel and its linked contacts."""

    id: int
    pipeline_id: int
    status_id: int
    contact_ids: tuple[int, ...]

    @property
    def is_open(self) -> bool:
        """True unless the lead is won (142) or lost (143)."""
        return self.status_id not in CLOSED_STATUSES


@dataclass(frozen=True)
class ComplexResult:
    """What `leads/complex` made of one requested lead."""

    lead_id: int
    contact_id: int | None
    merged: bool  # amoCRM's duplicate control merged the contact into an existing one
    request_id: str | None


@dataclass(frozen=True)
class ContactPage:
    """One page of `GET /api/v4/contacts` as a list: its contacts and whether more follow."""

    contacts: tuple[AmoContact, ...]
    size: int  # items amoCRM sent, readable or not: a short page ends a scan
    has_next: bool  # `_links.next` was present


def parse_contact_page(body: Any) -> ContactPage:
    """A list answer (None for amoCRM's empty 204) as a page; a 200 without the envelope is
    `CrmRetryable`, never an empty page."""
    if body is None:
        return ContactPage((), 0, False)
    items = embedded_list(body, "contacts", strict=True)
    raw = body["_embedded"]["contacts"]  # embedded_list checked it is a list
    contacts = tuple(c for c in (parse_contact(item) for item in items) if c is not None)
    links = body.get("_links")
    has_next = isinstance(links, dict) and isinstance(links.get("next"), dict)
    return ContactPage(contacts, len(raw), has_next)


def in_request_order(
    leads: Sequence[Mapping[str, Any]], results: list[ComplexResult]
) -> list[ComplexResult | CrmError]:
    """`leads/complex` results matched to the request's leads, one per lead.

    When every lead carries a distinct `request_id`, results are matched on it and never by
    position: amoCRM's duplicate control may merge leads of one request and answer fewer items
    than were sent. A lead no result names (only a result's first `request_id` owns it: a
    merged lead's note would be lost otherwise) is `CrmRetryable`: its retry finds the contact
    and its open lead. Without request ids, positions are all there is: a count mismatch is
    then `CrmRetryable` for the whole call.
    """
    wanted = [lead.get("request_id") for lead in leads]
    by_id: dict[str, ComplexResult] = {}
    for result in results:
        if result.request_id is not None:
            by_id.setdefault(result.request_id, result)
    tagged = len(set(wanted)) == len(wanted) and all(isinstance(w, str) for w in wanted)
    if tagged and by_id:
        missing = CrmRetryable("amoCRM answered leads/complex without this lead (merged?)")
        return [by_id.get(str(w), missing) for w in wanted]
    if len(results) != len(leads):
        raise CrmRetryable(
            f"amoCRM answered leads/complex for {len(leads)} leads with an unexpected body"
        )
    return list(results)


def parse_complex(item: Any) -> ComplexResult:
    """One `leads/complex` result; without a lead id it is `CrmRetryable`."""
    lead_id = as_int(item.get("id")) if isinstance(item, dict) else None
    if lead_id is None:
        raise CrmRetryable("amoCRM answered leads/complex with a result that has no lead id")
    request_id = item.get("request_id")
    if isinstance(request_id, list):  # documented as a list with one element
        request_id = request_id[0] if request_id else None
    return ComplexResult(
        lead_id=lead_id,
        contact_id=as_int(item.get("contact_id")),
        merged=item.get("merged") is True,
        request_id=None if request_id is None else str(request_id),
    )


def parse_contact(item: Any) -> AmoContact | None:
    """A contact, or None when it has no usable id."""
    contact_id = as_int(item.get("id")) if isinstance(item, dict) else None
    if contact_id is None:
        return None
    name = item.get("name")
    fields = item.get("custom_fields_values")
    return AmoContact(
        id=contact_id,
        name=name if isinstance(name, str) and name else None,
        phones=field_values(fields, "PHONE"),
        emails=field_values(fields, "EMAIL"),
        lead_ids=tuple(ids(embedded_list(item, "leads"))),
        updated_at=as_int(item.get("updated_at")),
    )


def parse_lead(body: Any) -> AmoLead | None:
    """A lead, or None when id, pipeline_id or status_id is missing."""
    if not isinstance(body, dict):
        return None
    lead_id, pipeline_id, status_id = (
        as_int(body.get(key)) for key in ("id", "pipeline_id", "status_id")
    )
    if lead_id is None or pipeline_id is None or status_id is None:
        return None
    contact_ids = tuple(ids(embedded_list(body, "contacts")))
    return AmoLead(lead_id, pipeline_id, status_id, contact_ids)


def field_values(custom_fields: Any, code: str) -> tuple[str, ...]:
    """Non-empty values of the field with `field_code == code`; anything malformed is skipped."""
    found: list[str] = []
    for custom_field in dicts(custom_fields):
        if custom_field.get("field_code") != code:
            continue
        for entry in dicts(custom_field.get("values")):
            value = entry.get("value")
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)  # a phone stored as a number is still a phone
            if isinstance(value, str) and value.strip():
                found.append(value.strip())
    return tuple(found)


def embedded_list(body: Any, key: str, *, strict: bool = False) -> list[dict[str, Any]]:
    """`body["_embedded"][key]` as a list of dicts; `strict` makes a missing envelope an error."""
    embedded = body.get("_embedded") if isinstance(body, dict) else None
    items = embedded.get(key) if isinstance(embedded, dict) else None
    if not isinstance(items, list):
        if strict:
            raise CrmRetryable(f"amoCRM answered without _embedded.{key}")
        return []
    return dicts(items)


def dicts(value: Any) -> list[dict[str, Any]]:
    """The dict items of a list; anything else is no items."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def ids(items: list[dict[str, Any]]) -> list[int]:
    """The integer `id`s of `items`, skipping the unreadable."""
    return [i for i in (as_int(item.get("id")) for item in items) if i is not None]



def contact_fields(phone: str | None, email: str | None) -> list[dict[str, Any]]:
    """`custom_fields_values` for a contact's work phone and e-mail (empty ones left out)."""
    fields: list[dict[str, Any]] = []
    for code, value in (("PHONE", phone), ("EMAIL", email)):
        if value:
            fields.append({"field_code": code, "values": [{"value": value, "enum_code": "WORK"}]})
    return fields


def digits(phone: str) -> str:
    """Only the ASCII digits of a phone, for comparing numbers written differently."""
    return "".join(ch for ch in phone if "0" <= ch <= "9")
