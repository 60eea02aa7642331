"""The Bitrix24 simulator's entities, how they render as REST JSON, and its error answer.

Also the identity rule findbycomm and the duplicate report share: a phone is its digits, an
e-mail is lower-case.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "MULTI_FIELDS",
    "BitrixFault",
    "Comment",
    "Contact",
    "Deal",
    "Page",
    "bad_arg",
    "digits",
    "identity",
    "not_found",
    "stamp",
]

MULTI_FIELDS = ("PHONE", "EMAIL")


class BitrixFault(Exception):
    """An error answer: `{"error": code, "error_description": description}` with `status`."""

    def __init__(self, code: str, description: str, status: int = 400) -> None:
        super().__init__(f"{code}: {description}")
        self.code = code
        self.description = description
        self.status = status
        self.time: dict[str, Any] | None = None  # the envelope, when the answer carries one

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.code, "error_description": self.description}
        if self.time is not None:
            body["time"] = self.time
        return body


def not_found() -> BitrixFault:
    # Bitrix24 really answers a missing id with an empty error code; clients must cope.
    return BitrixFault("", "Not found")


def bad_arg(description: str) -> BitrixFault:
    """A parameter Bitrix24 would refuse."""
    return BitrixFault("INVALID_ARG_VALUE", description)


def stamp() -> str:
    """Bitrix24's ISO-8601 timestamp with offset."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def digits(value: str) -> str:
    """Only the ASCII digits of a phone number."""
    return "".join(ch for ch in value if "0" <= ch <= "9")


def identity(kind: str, value: str) -> str:
    """How findbycomm and the duplicate report compare: phone digits, lower-case e-mail."""
    return "+" + digits(value) if kind == "PHONE" else value.strip().lower()


@dataclass(frozen=True)
class Page:
    """One page of a list method: its rows, how many match in all, where the next page starts."""

    rows: list[dict[str, Any]]
    total: int
    next: int | None


@dataclass
class Contact:
    """A contact: scalar fields as sent, PHONE/EMAIL as Bitrix24 multi-field items."""

    id: int
    fields: dict[str, str]
    comms: dict[str, list[dict[str, str]]]
    created: str = field(default_factory=stamp)
    modified: str = field(default_factory=stamp)

    def identities(self) -> set[str]:
        return {identity(k, v["VALUE"]) for k, items in self.comms.items() for v in items}

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ID": str(self.id), **self.fields}
        body |= {"DATE_CREATE": self.created, "DATE_MODIFY": self.modified}
        for kind in MULTI_FIELDS:
            body[f"HAS_{kind}"] = "Y" if self.comms.get(kind) else "N"
            if self.comms.get(kind):  # Bitrix24 leaves an empty multi-field out entirely
                body[kind] = copy.deepcopy(self.comms[kind])
        return body

    def report_json(self, deal_ids: list[int]) -> dict[str, Any]:
        """The REST shape plus an amoCRM-shaped view (`id`, `custom_fields_values`,
        `_embedded.leads`) so CRM-agnostic tests read either simulator's report alike."""
        fields = [
            {"field_code": kind, "values": [{"value": v["VALUE"]} for v in items]}
            for kind, items in self.comms.items()
        ]
        return self.to_json() | {
            "id": self.id,
            "custom_fields_values": fields,
            "_embedded": {"leads": [{"id": d} for d in deal_ids]},
        }


@dataclass
class Deal:
    """A deal: funnel position, linked contacts, other scalar fields as sent."""

    id: int
    category_id: int
    stage_id: str
    contact_ids: list[int]
    fields: dict[str, str]
    created: str = field(default_factory=stamp)
    modified: str = field(default_factory=stamp)

    @property
    def semantic(self) -> str:
        """P (in progress), S (won) or F (lost), from the stage's name without `C<n>:`."""
        name = self.stage_id.rpartition(":")[2]
        return {"WON": "S", "LOSE": "F"}.get(name, "P")

    @property
    def is_open(self) -> bool:
        return self.semantic == "P"

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": str(self.id),
            **self.fields,
            "CATEGORY_ID": str(self.category_id),
            "STAGE_ID": self.stage_id,
            "STAGE_SEMANTIC_ID": self.semantic,
            "CLOSED": "N" if self.is_open else "Y",
            "CONTACT_ID": str(self.contact_ids[0]) if self.contact_ids else None,
            "DATE_CREATE": self.created,
            "DATE_MODIFY": self.modified,
        }

    def report_json(self) -> dict[str, Any]:
        """The REST shape plus `id`, every linked contact and whether the deal is open."""
        return self.to_json() | {
            "id": self.id,
            "contact_ids": list(self.contact_ids),
            "is_open": self.is_open,
        }


@dataclass
class Comment:
    """A timeline comment on a deal or contact."""

    id: int
    entity_type: str
    entity_id: int
    comment: str
    created: str = field(default_factory=stamp)

    def to_json(self) -> dict[str, Any]:
        return {
            "ID": str(self.id),
            "ENTITY_TYPE": self.entity_type,
            "ENTITY_ID": str(self.entity_id),
            "COMMENT": self.comment,
            "CREATED": self.created,
        }
