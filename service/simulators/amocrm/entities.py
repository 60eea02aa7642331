"""The amoCRM simulator's entities and how they render as API JSON.

Also the identity rules the duplicate report and duplicate control share: a phone is its digits,
an email is lower-case.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CLOSED_STATUSES",
    "MAIN_PIPELINE_ID",
    "Contact",
    "Lead",
    "Note",
    "Pipeline",
    "digits",
    "field_values",
    "identities",
    "now",
]

CLOSED_STATUSES = frozenset({142, 143})
MAIN_PIPELINE_ID = 1000


def now() -> int:
    """Unix seconds, the timestamp amoCRM puts in created_at/updated_at."""
    return int(time.time())


def digits(value: str) -> str:
    """Only the digits of a phone number."""
    return re.sub(r"\D", "", value)


def field_values(fields: list[dict[str, Any]], code: str) -> list[str]:
    """The values of every custom field with this `field_code`, as strings."""
    return [
        str(v.get("value", ""))
        for f in fields
        if f.get("field_code") == code
        for v in f.get("values") or []
        if isinstance(v, dict)
    ]


def identities(fields: list[dict[str, Any]]) -> set[str]:
    """Who a contact is, for duplicate checks: "+<phone digits>" and lower-case emails."""
    phones = {"+" + d for d in map(digits, field_values(fields, "PHONE")) if d}
    emails = {e.strip().lower() for e in field_values(fields, "EMAIL") if e.strip()}
    return phones | emails


@dataclass
class Pipeline:
    """A lead pipeline; every pipeline also has the closed statuses 142 (won) and 143 (lost)."""

    id: int
    name: str
    statuses: list[int]

    def to_json(self) -> dict[str, Any]:
        statuses = [{"id": s, "pipeline_id": self.id, "name": f"Status {s}"} for s in self.statuses]
        return {
            "id": self.id,
            "name": self.name,
            "is_main": self.id == MAIN_PIPELINE_ID,
            "_embedded": {"statuses": statuses},
        }


@dataclass
class Contact:
    """A contact; `fields` are its `custom_fields_values` exactly as sent."""

    id: int
    name: str
    first_name: str
    last_name: str
    fields: list[dict[str, Any]]
    created_at: int = field(default_factory=now)
    updated_at: int = field(default_factory=now)

    def to_json(self, lead_ids: list[int] | None = None) -> dict[str, Any]:
        """The API shape; like amoCRM, no custom fields is `null`, not `[]`."""
        embedded: dict[str, Any] = {"tags": [], "companies": []}
        if lead_ids is not None:
            embedded["leads"] = [{"id": i} for i in lead_ids]
        return {
            "id": self.id,
            "name": self.name,
            "first_name": self.first_name,
            "last_name": self.last_name,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "custom_fields_values": copy.deepcopy(self.fields) or None,
            "_embedded": embedded,
        }


@dataclass
class Lead:
    """A lead (deal): where it sits in which pipeline, and the contacts it is linked to."""

    id: int
    name: str
    price: int
    pipeline_id: int
    status_id: int
    fields: list[dict[str, Any]]
    tags: list[tuple[int, str]]
    contact_ids: list[int]
    created_at: int = field(default_factory=now)
    updated_at: int = field(default_factory=now)

    @property
    def is_open(self) -> bool:
        return self.status_id not in CLOSED_STATUSES

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "price": self.price,
            "pipeline_id": self.pipeline_id,
            "status_id": self.status_id,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "closed_at": None if self.is_open else self.updated_at,
            "custom_fields_values": copy.deepcopy(self.fields) or None,
            "_embedded": {
                "tags": [{"id": i, "name": n} for i, n in self.tags],
                "contacts": [{"id": c, "is_main": n == 0} for n, c in enumerate(self.contact_ids)],
                "companies": [],
            },
        }


@dataclass
class Note:
    """A note on a lead."""

    id: int
    entity_id: int
    note_type: str
    params: dict[str, Any]
    created_at: int = field(default_factory=now)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "entity_id": self.entity_id,
            "entity_type": "leads",
            "note_type": self.note_type,
            "params": copy.deepcopy(self.params),
            "created_at": self.created_at,
        }
