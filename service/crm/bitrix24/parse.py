"""Bitrix24 answers read as our types: contacts, deals, findbycomm hits, ids.

Answers are untrusted input: odd values are skipped, and a shape we cannot read is
`CrmRetryable`, never "nothing found" (that would make the caller create duplicates).
Bitrix24 writes numbers as strings and multi-fields as `[{"VALUE": …, "VALUE_TYPE": …}]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.crm.base import as_int
from service.errors import CrmRetryable


@dataclass(frozen=True)
class BitrixContact:
    """A contact with the phones and e-mails Bitrix24 stores for it."""

    id: int
    phones: tuple[str, ...]
    emails: tuple[str, ...]

    def has(self, kind: str, value: str) -> bool:
        """True if the contact holds this phone or e-mail (any case).

        Phones are the same digits, or the same last ten of at least ten: Bitrix24's findbycomm
        matches a hand-typed "8 701 …" to our "+7701…", and rejecting that hit would create the
        duplicate contact the search exists to prevent.
        """
        wanted = comm_key(kind, value)
        stored = (comm_key(kind, v) for v in (self.phones if kind == "PHONE" else self.emails))
        if kind != "PHONE":
            return bool(wanted) and wanted in stored
        return any(
            v == wanted or (min(len(v), len(wanted)) >= 10 and v[-10:] == wanted[-10:])
            for v in stored
            if v
        )


@dataclass(frozen=True)
class BitrixDeal:
    """A deal's position in its funnel (category) and whether it is closed."""

    id: int
    category_id: int
    stage_id: str
    contact_id: int | None
    closed: bool

    @property
    def is_open(self) -> bool:
        return not self.closed


def found_ids(value: Any) -> list[int]:
    """Contact ids from a findbycomm result: `{"CONTACT": [ids]}`, or `[]` for none."""
    if isinstance(value, list) and not value:
        return []
    if not isinstance(value, dict):
        raise CrmRetryable("Bitrix24 answered findbycomm with an unexpected result")
    ids = value.get("CONTACT") or []
    if not isinstance(ids, list):
        raise CrmRetryable("Bitrix24 answered findbycomm with CONTACT that is not a list")
    return [i for i in map(as_int, ids) if i is not None]


def parse_contact(value: Any) -> BitrixContact | None:
    """A crm.contact.get result; None if it has no id. Malformed multi-field items are skipped."""
    contact_id = as_int(value.get("ID")) if isinstance(value, dict) else None
    if contact_id is None:
        return None
    return BitrixContact(contact_id, _comms(value.get("PHONE")), _comms(value.get("EMAIL")))


def parse_deal(value: Any) -> BitrixDeal | None:
    """A crm.deal.get / crm.deal.list row; None without an id."""
    deal_id = as_int(value.get("ID")) if isinstance(value, dict) else None
    if deal_id is None:
        return None
    assert isinstance(value, dict)
    stage = value.get("STAGE_ID")
    semantic = value.get("STAGE_SEMANTIC_ID")
    closed = value.get("CLOSED") == "Y" or semantic in ("S", "F")
    return BitrixDeal(
        id=deal_id,
        category_id=as_int(value.get("CATEGORY_ID")) or 0,
        stage_id=stage if isinstance(stage, str) else "",
        contact_id=as_int(value.get("CONTACT_ID")),
        closed=closed,
    )


def comm_key(kind: str, value: str) -> str:
    """How phones (digits only) and e-mails (trimmed, lower-case) are compared."""
    if kind == "PHONE":
        return "".join(ch for ch in value if "0" <= ch <= "9")
    return value.strip().lower()



def _comms(items: Any) -> tuple[str, ...]:
    if not isinstance(items, list):
        return ()
    values = (item.get("VALUE") for item in items if isinstance(item, dict))
    return tuple(v.strip() for v in values if isinstance(v, str) and v.strip())
