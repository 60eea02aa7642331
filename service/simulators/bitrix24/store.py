"""The Bitrix24 simulator's portal data: contacts, deals, timeline comments, duplicate report.

Each public method of `BitrixStore` is one REST method. Parameters arrive either as JSON (typed)
or parsed from a batch command's query string (every scalar a string), so ids and flags are
coerced here the way Bitrix24's PHP does it. Problems raise `BitrixFault` with the error code
and description Bitrix24 would answer.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from service.simulators.bitrix24.entities import (
    MULTI_FIELDS,
    BitrixFault,
    Comment,
    Contact,
    Deal,
    Page,
    bad_arg,
    identity,
    not_found,
    stamp,
)
from service.simulators.bitrix24.funnels import Funnels
from service.simulators.common import duplicates_report

__all__ = ["MAX_COMM_VALUES", "PAGE_SIZE", "BitrixStore"]

MAX_COMM_VALUES = 20  # crm.duplicate.findbycomm takes at most this many values
PAGE_SIZE = 50  # every *.list method answers 50 rows per page
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")
# Separate id ranges per entity, so an id of the wrong kind is "Not found" rather than a hit.
_FIRST_IDS = {"contact": 1001, "deal": 2001, "comment": 3001, "multi": 9001}
# Bitrix24's `check_email` (main/tools.php), which crm.contact.add/update apply to EMAIL and
# answer ERROR_CORE for (CRM_FACTS.md, "Bitrix24 stages": "crm.contact.add can refuse a value
# with ERROR_CORE (e.g. "invalid e-mail")"): dot-atoms of letters, digits and
# =_+~'!$&*^`|#%/?{}- before the @, then domain labels and a 2-20 character top level.
_ATOM = r"(?:[^\W_]|[=_+~'!$&*^`|#%/?{}-])+"
_LABEL = r"(?:[^\W_]|-)"
_EMAIL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@(?:{_LABEL}+\.)+{_LABEL}{{2,20}}", re.IGNORECASE)
_LIST_FILTERS = frozenset(
    {"ID", "CONTACT_ID", "CLOSED", "CATEGORY_ID", "STAGE_ID", "STAGE_SEMANTIC_ID", "SOURCE_ID"}
)


class BitrixStore:
    """One portal's CRM data; each public method is one REST method."""

    def __init__(self) -> None:
        self.funnels = Funnels()  # configuration: kept by `clear`
        self.contacts: dict[int, Contact] = {}
        self.deals: dict[int, Deal] = {}
        self.comments: dict[int, Comment] = {}
        self._next = dict(_FIRST_IDS)
        # (kind, value) → identity: values never change, and findbycomm compares every
        # contact's values on every call (a phone's digits cost ~1 µs each in Python)
        self._identities: dict[tuple[str, str], str] = {}

    def clear(self) -> None:
        self.contacts.clear()
        self.deals.clear()
        self.comments.clear()
        self._next = dict(_FIRST_IDS)

    def _new_id(self, kind: str) -> int:
        self._next[kind] += 1
        return self._next[kind] - 1

    # ---- reading ------------------------------------------------------------------------------

    def find_by_comm(self, params: dict[str, Any]) -> Any:
        """`crm.duplicate.findbycomm`: exact match; nothing found is `[]`, as documented."""
        kind = str(params.get("type", "")).upper()
        values = params.get("values")
        if kind not in MULTI_FIELDS:
            raise bad_arg("type must be PHONE or EMAIL")
        if not isinstance(values, list) or not values or not all(_scalar(v) for v in values):
            raise bad_arg("values must be a non-empty array of strings")
        if len(values) > MAX_COMM_VALUES:
            raise bad_arg(f"Too many values: at most {MAX_COMM_VALUES} per request")
        if str(params.get("entity_type") or "CONTACT").upper() != "CONTACT":
            return []  # the simulated portal keeps contacts only
        wanted = {identity(kind, str(v)) for v in values if str(v).strip()}
        ids = [c.id for c in self.contacts.values() if not wanted.isdisjoint(self._ids(c, kind))]
        return {"CONTACT": ids} if ids else []

    def _ids(self, contact: Contact, kind: str) -> Iterator[str]:
        """The identities of a contact's phones or e-mails (`identity`, memoised)."""
        for item in contact.comms.get(kind, ()):
            key = (kind, item["VALUE"])
            found = self._identities.get(key)
            if found is None:
                found = self._identities[key] = identity(kind, item["VALUE"])
            yield found

    def contact_get(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._contact(params.get("id")).to_json()

    def deal_get(self, params: dict[str, Any]) -> dict[str, Any]:
        return self._deal(params.get("id")).to_json()

    def deal_list(self, params: dict[str, Any]) -> Page:
        """`crm.deal.list`: one page of filtered rows, the total, and the next page's start."""
        filters = _filters(params.get("filter"))
        deals = [d for d in self.deals.values() if _passes(d, filters)]
        order = params.get("order") or {}
        descending = isinstance(order, dict) and str(order.get("ID", "")).upper() == "DESC"
        deals.sort(key=lambda d: d.id, reverse=descending)
        start = _as_id(params.get("start") or 0, "start", allow_zero=True)
        select = params.get("select") or ["*"]
        if not isinstance(select, list):
            raise bad_arg("select must be an array")
        rows = [_selected(d.to_json(), select) for d in deals[start : start + PAGE_SIZE]]
        more = start + PAGE_SIZE < len(deals)
        return Page(rows, len(deals), start + PAGE_SIZE if more else None)

    def contact_deal_ids(self) -> dict[int, list[int]]:
        """Every contact's deals, open or closed, in creation order."""
        by_contact: dict[int, list[int]] = defaultdict(list)
        for deal in self.deals.values():
            for contact_id in deal.contact_ids:
                by_contact[contact_id].append(deal.id)
        return by_contact

    def duplicates(self) -> dict[str, list[dict[str, Any]]]:
        """What a relay must never produce: one person on two contacts, or twice in work."""
        return duplicates_report(
            ((c.id, c.identities()) for c in self.contacts.values()),
            ((d.id, d.contact_ids) for d in self.deals.values() if d.is_open),
        )

    # ---- writing ------------------------------------------------------------------------------

    def contact_add(self, params: dict[str, Any]) -> int:
        fields = _fields(params)
        scalars, comms = _split_contact(fields)
        contact = Contact(self._new_id("contact"), scalars, {})
        self._merge_comms(contact, comms)
        self.contacts[contact.id] = contact
        return contact.id

    def contact_update(self, params: dict[str, Any]) -> bool:
        """Multi-field items are appended, as Bitrix24 does, unless they name an `ID`."""
        contact = self._contact(params.get("id"))
        scalars, comms = _split_contact(_fields(params))
        contact.fields.update(scalars)
        self._merge_comms(contact, comms)
        contact.modified = stamp()
        return True

    def deal_add(self, params: dict[str, Any]) -> int:
        """As `CCrmDeal::Add` does (bitrix24-core modules/crm/classes/general/crm_deal.php): a
        missing or unknown CATEGORY_ID is category 0 — a stage's `C<n>:` prefix does not choose
        the category — and a STAGE_ID that is not a stage of the deal's category is silently
        replaced by the category's first stage (CRM_FACTS.md, "Bitrix24 stages"). No error."""
        fields = _fields(params)
        category = _as_id(fields.get("CATEGORY_ID", 0), "CATEGORY_ID", True)
        category = category if category in self.funnels.categories else 0
        stages = self.funnels.stages(category)
        stage = fields.get("STAGE_ID")
        stage = stage if stage in stages else stages[0]
        deal = Deal(
            self._new_id("deal"), category, stage, self._contact_ids(fields) or [], _rest(fields)
        )
        self.deals[deal.id] = deal
        return deal.id

    def deal_update(self, params: dict[str, Any]) -> bool:
        """STAGE_ID within the deal's category, contacts, scalars; CATEGORY_ID is ignored here,
        as in Bitrix24, where moving a deal to another funnel is a separate method. A STAGE_ID
        that is no stage of the deal's category is ignored without an error, as `CCrmDeal::
        Update` does ("Ignore if the received stage_id is not exists")."""
        deal = self._deal(params.get("id"))
        fields = _fields(params)
        stages = self.funnels.stages(deal.category_id)
        stage = fields.get("STAGE_ID")
        stage = stage if isinstance(stage, str) and stage in stages else None
        contact_ids = self._contact_ids(fields)
        deal.stage_id = stage or deal.stage_id
        deal.contact_ids = deal.contact_ids if contact_ids is None else contact_ids
        deal.fields.update(_rest(fields))
        deal.modified = stamp()
        return True

    def comment_add(self, params: dict[str, Any]) -> int:
        fields = _fields(params)
        entity_type = str(fields.get("ENTITY_TYPE", "")).lower()
        if entity_type not in ("deal", "contact"):
            raise bad_arg("ENTITY_TYPE must be deal or contact")
        entity_id = _as_id(fields.get("ENTITY_ID"), "ENTITY_ID")
        if entity_id not in (self.deals if entity_type == "deal" else self.contacts):
            raise BitrixFault("ERROR_CORE", f"{entity_type} {entity_id} not found")
        text = fields.get("COMMENT")
        if not isinstance(text, str) or not text.strip():
            raise bad_arg("COMMENT must be a non-empty string")
        comment = Comment(self._new_id("comment"), entity_type, entity_id, text)
        self.comments[comment.id] = comment
        return comment.id

    # ---- helpers ------------------------------------------------------------------------------

    def _contact(self, raw_id: Any) -> Contact:
        contact = self.contacts.get(_as_id(raw_id, "ID"))
        if contact is None:
            raise not_found()
        return contact

    def _deal(self, raw_id: Any) -> Deal:
        deal = self.deals.get(_as_id(raw_id, "ID"))
        if deal is None:
            raise not_found()
        return deal

    def _contact_ids(self, fields: dict[str, Any]) -> list[int] | None:
        """CONTACT_IDS (or a single CONTACT_ID); a plain id must name an existing contact.

        A batch reference to a command that failed leaves a whole result section (an object)
        where the id belongs (see batch.py); Bitrix24 reads it as PHP's intval does — 1 for a
        non-empty array, 0 for an empty one — and makes the deal anyway, bound to contact 1 or
        to none (CRM_FACTS.md, "Bitrix24 batch references"). That binding is not refused.
        """
        raw = fields.get("CONTACT_IDS", fields.get("CONTACT_ID"))
        if raw is None:
            return None
        items = raw if isinstance(raw, list) else [raw]
        ids: list[int] = []
        for item in items:
            if item is None or isinstance(item, dict | list):
                section_id = 1 if item else 0  # intval(array)
                ids += [section_id] if section_id in self.contacts else []
            elif item not in ("", 0, "0"):
                ids.append(_as_id(item, "CONTACT_IDS"))
        missing = [i for i in ids if i not in self.contacts]
        if missing:
            raise BitrixFault("ERROR_CORE", f"Contact {missing[0]} not found")
        return list(dict.fromkeys(ids))

    def _merge_comms(self, contact: Contact, comms: dict[str, list[dict[str, Any]]]) -> None:
        for kind, items in comms.items():
            slot = contact.comms.setdefault(kind, [])
            for item in items:
                _apply_comm(slot, item, kind, lambda: str(self._new_id("multi")))
            if not slot:
                del contact.comms[kind]


def _fields(params: dict[str, Any]) -> dict[str, Any]:
    fields = params.get("fields")
    if not isinstance(fields, dict):
        raise bad_arg("fields must be an object")
    for key, value in fields.items():
        if not _FIELD_NAME.fullmatch(str(key)):
            raise bad_arg(f"unknown field {str(key)[:40]!r}")
        if key not in (*MULTI_FIELDS, "CONTACT_IDS") and not _scalar(value):
            raise bad_arg(f"{key} must be a string or a number")
    return fields


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float)


def _split_contact(fields: dict[str, Any]) -> tuple[dict[str, str], dict[str, list[Any]]]:
    """Scalars and multi-fields of a contact; an e-mail Bitrix24 would refuse is refused."""
    comms: dict[str, list[Any]] = {}
    for kind in MULTI_FIELDS:
        items = fields.get(kind)
        if items is None:
            continue
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise bad_arg(f"{kind} must be an array of objects")
        if any("ID" not in i and not _scalar(i.get("VALUE")) for i in items):
            raise bad_arg(f"{kind}[].VALUE must be a string")
        comms[kind] = items
    for item in comms.get("EMAIL", []):
        value = str(item.get("VALUE") or "").strip()
        if value and not _EMAIL.fullmatch(value):
            raise BitrixFault("ERROR_CORE", f"Invalid e-mail: {value[:80]}")
    return _rest(fields), comms


def _apply_comm(slot: list[dict[str, str]], item: dict[str, Any], kind: str, new_id: Any) -> None:
    """Append a value, or replace/delete the existing one named by `ID`."""
    value = str(item.get("VALUE") or "").strip()
    if "ID" in item:
        index = next((n for n, v in enumerate(slot) if v["ID"] == str(item["ID"])), None)
        if index is None:
            return  # Bitrix24 ignores an ID that is not on this contact
        if not value or str(item.get("DELETE", "")).upper() == "Y":
            del slot[index]
        else:
            slot[index] |= {"VALUE": value, "VALUE_TYPE": str(item.get("VALUE_TYPE") or "WORK")}
        return
    if value:
        value_type = str(item.get("VALUE_TYPE") or "WORK")
        slot.append({"ID": new_id(), "VALUE_TYPE": value_type, "VALUE": value, "TYPE_ID": kind})


def _rest(fields: dict[str, Any]) -> dict[str, str]:
    skip = {*MULTI_FIELDS, "CONTACT_IDS", "CONTACT_ID", "CATEGORY_ID", "STAGE_ID", "ID"}
    return {k: "" if v is None else str(v) for k, v in fields.items() if k not in skip}


def _as_id(value: Any, name: str, allow_zero: bool = False) -> int:
    """A non-negative integer from JSON or a query string; anything else is the caller's fault."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or value < 0 or (value == 0 and not allow_zero):
        raise BitrixFault("", f"{name} is not defined or invalid.")
    return value


def _filters(raw: Any) -> list[tuple[str, str, set[str]]]:
    """(operator, field, accepted values): `=`/none/`@` keep matches, `!`/`!@` drop them."""
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise bad_arg("filter must be an object")
    parsed = []
    for key, value in raw.items():
        match = re.fullmatch(r"(=|!=|!@|@|!)?([A-Z_]+)", str(key))
        # Stricter than Bitrix24, which ignores unknown filter fields and returns every row:
        # a client bug should fail here rather than pick some other person's deal.
        if match is None or match.group(2) not in _LIST_FILTERS:
            raise bad_arg(f"filter field {str(key)[:40]!r} is not supported by the simulator")
        values = value if isinstance(value, list) else [value]
        negate = (match.group(1) or "").startswith("!")
        parsed.append(("!" if negate else "=", match.group(2), {str(v) for v in values}))
    return parsed


def _passes(deal: Deal, filters: list[tuple[str, str, set[str]]]) -> bool:
    for op, name, wanted in filters:
        if name == "CONTACT_ID":
            have = {str(c) for c in deal.contact_ids}
        else:
            have = {_filter_value(deal, name)}
        if bool(have & wanted) == (op == "!"):
            return False
    return True


def _filter_value(deal: Deal, name: str) -> str:
    """`str(deal.to_json()[name])`, without rendering the whole deal for the usual fields
    (crm.deal.list filters every deal on every call)."""
    if name == "CLOSED":
        return "N" if deal.is_open else "Y"
    if name == "ID":
        return str(deal.id)
    if name == "CATEGORY_ID":
        return str(deal.category_id)
    if name == "STAGE_ID":
        return deal.stage_id
    return str(deal.to_json()[name])


def _selected(row: dict[str, Any], select: list[Any]) -> dict[str, Any]:
    if "*" in select:
        return row
    return {k: v for k, v in row.items() if k == "ID" or k in select}
