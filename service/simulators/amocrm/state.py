"""The amoCRM simulator's in-memory account: contacts, leads, notes, pipelines, duplicate report.

Writes are validated as a whole batch before anything is stored, as amoCRM does: one bad item
rejects the request and nothing from it exists afterwards.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from service.simulators.amocrm.checks import (
    Batch,
    LeadField,
    ValidationFailed,
    check_choices,
    check_contact,
    check_custom_fields,
    check_tags,
    check_types,
    field_slot,
    merge_fields,
)
from service.simulators.amocrm.entities import (
    CLOSED_STATUSES,
    MAIN_PIPELINE_ID,
    Contact,
    Lead,
    Note,
    Pipeline,
    digits,
    field_values,
    identities,
    now,
)
from service.simulators.amocrm.search import ContactSearch
from service.simulators.common import duplicates_report

__all__ = [
    "CLOSED_STATUSES",
    "AmoStore",
    "Contact",
    "Lead",
    "Note",
    "Pipeline",
    "ValidationFailed",
    "identities",
]

# Separate id ranges per entity, so a client that passes a lead id where a contact id belongs
# gets a 404/400 instead of silently touching the wrong record.
_FIRST_IDS = {"contact": 5_000_001, "lead": 7_000_001, "note": 9_000_001, "tag": 300_001}


def _default_pipelines() -> dict[int, Pipeline]:
    return {MAIN_PIPELINE_ID: Pipeline(MAIN_PIPELINE_ID, "Воронка", [10000, 10001, 142, 143])}


class AmoStore:
    """One amoCRM account's data. Methods take parsed JSON and raise `ValidationFailed`."""

    def __init__(self) -> None:
        self.pipelines = _default_pipelines()
        self.contacts: dict[int, Contact] = {}
        self.leads: dict[int, Lead] = {}
        self.notes: dict[int, Note] = {}
        self._tags: dict[str, int] = {}
        self._next = dict(_FIRST_IDS)
        self._search = ContactSearch()
        self.lead_fields: dict[int, LeadField] = {}  # select fields: configuration, kept by clear

    def clear(self) -> None:
        """Forget every entity; pipelines added by tests survive, as they are configuration."""
        self.contacts.clear()
        self._search.clear()
        self.leads.clear()
        self.notes.clear()
        self._tags.clear()
        self._next = dict(_FIRST_IDS)

    def add_pipeline(self, pipeline_id: int, statuses: Iterable[int], name: str = "") -> Pipeline:
        """Add or replace a pipeline; the closed statuses 142/143 are appended if missing."""
        ids = [s for s in statuses if s not in CLOSED_STATUSES] + sorted(CLOSED_STATUSES)
        pipeline = Pipeline(pipeline_id, name or f"Pipeline {pipeline_id}", ids)
        self.pipelines[pipeline_id] = pipeline
        return pipeline

    def add_lead_field(self, field_id: int, options: Iterable[str], named: bool = True) -> None:
        """A select custom field of leads that takes only `options` (see `check_choices`)."""
        self.lead_fields[field_id] = LeadField(frozenset(options), named)

    def _new_id(self, kind: str) -> int:
        self._next[kind] += 1
        return self._next[kind] - 1

    # ---- reading ----------------------------------------------------------------------------

    def lead_ids_by_contact(self) -> dict[int, list[int]]:
        """Every contact's leads, open or closed, in creation order."""
        by_contact: dict[int, list[int]] = defaultdict(list)
        for lead in self.leads.values():
            for contact_id in lead.contact_ids:
                by_contact[contact_id].append(lead.id)
        return by_contact

    def search_contacts(self, query: str) -> list[Contact]:
        """amoCRM's deliberately loose search: callers must re-check what comes back."""
        if not query.strip():
            return list(self.contacts.values())
        ids = self._search.candidates(query)
        pool = self.contacts.values() if ids is None else map(self.contacts.__getitem__, ids)
        return sorted((c for c in pool if _matches(c, query)), key=lambda c: c.id)

    def list_contacts(
        self, query: str, since: int | None, until: int | None, order: tuple[str, str]
    ) -> list[Contact]:
        """`GET /api/v4/contacts`: the search's contacts (all without a query) changed within
        [since, until], ordered by `order` = (field, direction)."""
        found = self.search_contacts(query) if query.strip() else None
        if order[0] == "updated_at" or since is not None or until is not None:
            wanted = None if found is None else {c.id for c in found}
            changed = self._search.changed(since or 0, until)
            found = [self.contacts[i] for i in changed if wanted is None or i in wanted]
            if order[0] == "id":
                found.sort(key=lambda c: c.id)
        elif found is None:
            found = list(self.contacts.values())
        return found[::-1] if order[1] == "desc" else found

    def duplicates(self) -> dict[str, list[dict[str, Any]]]:
        """What a relay must never produce: one person split over contacts, or twice in work."""
        return duplicates_report(
            ((c.id, identities(c.fields)) for c in self.contacts.values()),
            ((lead.id, lead.contact_ids) for lead in self.leads.values() if lead.is_open),
        )

    # ---- writing ----------------------------------------------------------------------------

    def create_complex(self, body: Any, merge_duplicates: bool) -> list[dict[str, Any]]:
        """`POST /api/v4/leads/complex`: a lead with at most one new or linked contact each."""
        batch = Batch(body, limit=50)
        for rid, item in batch:
            self._check_lead(batch, rid, item, None)
            contacts = batch.embedded_list(rid, item, "contacts", max_items=1)
            for contact in contacts:
                self._check_contact_ref(batch, rid, contact, "_embedded.contacts.0")
        batch.raise_if_failed()
        answers, made = [], set[int]()
        for rid, item in batch:
            answer = self._apply_complex(rid, item, merge_duplicates, made)
            if answer is not None:
                answers.append(answer)
        return answers

    def _check_lead(
        self, batch: Batch, rid: str, item: dict[str, Any], current: Lead | None
    ) -> None:
        types = {"name": str, "price": int, "pipeline_id": int, "status_id": int}
        check_types(batch, rid, item, types)
        check_custom_fields(batch, rid, item.get("custom_fields_values"), "custom_fields_values")
        check_choices(batch, rid, item, self.lead_fields)
        check_tags(batch, rid, item)
        try:
            self.resolve_status(item, current)
        except ValueError as exc:
            detail = f"The value of {exc} is not a choice this pipeline supports"
            batch.error(rid, "NotSupportedChoice", str(exc), detail)
        except TypeError:
            pass  # an unhashable id, already reported by check_types

    def _check_contact_ref(self, batch: Batch, rid: str, contact: Any, path: str) -> None:
        if isinstance(contact, dict) and "id" in contact:
            self._check_exists(batch, rid, contact["id"], self.contacts, f"{path}.id")
        else:
            check_contact(batch, rid, contact, path)

    def _check_exists(self, batch: Batch, rid: str, value: Any, table: Any, path: str) -> None:
        if not (isinstance(value, int) and value in table):
            batch.error(rid, "NotFound", path, f"No entity with id {value!r}")

    def _apply_complex(
        self, rid: str, item: dict[str, Any], merge: bool, made: set[int]
    ) -> dict[str, Any] | None:
        """One item of `leads/complex`; None when duplicate control merged it into a contact
        an earlier item of the same request made: amoCRM then answers fewer items than were
        sent, so the answer must be matched by `request_id`, never by position (CRM_FACTS.md,
        "Create": `merged`, `request_id`; the shorter answer is the issue report's, modelled
        here as the strictest case: no lead and no answer entry for the merged item)."""
        contacts = (item.get("_embedded") or {}).get("contacts") or []
        contact_id, merged = None, False
        if contacts and "id" in contacts[0]:
            contact_id = contacts[0]["id"]
        elif contacts:
            existing = self._duplicate_of(contacts[0]) if merge else None
            merged = existing is not None
            contact_id = (existing or self._add_contact(contacts[0])).id
            if existing is not None:
                self._merge_into(existing, contacts[0])
                self._search.put(existing)
                if existing.id in made:
                    return None
            made.add(contact_id)
        lead = self._add_lead(item, [] if contact_id is None else [contact_id])
        return {
            "id": lead.id,
            "contact_id": contact_id,
            "company_id": None,
            "request_id": [rid],
            "merged": merged,
        }

    def _duplicate_of(self, spec: dict[str, Any]) -> Contact | None:
        wanted = identities(spec.get("custom_fields_values") or [])
        for contact in self.contacts.values():
            if wanted & identities(contact.fields):
                return contact
        return None

    def _merge_into(self, contact: Contact, spec: dict[str, Any]) -> None:
        """Duplicate control keeps the old contact and adds only the phones/emails it lacked."""
        known = identities(contact.fields)
        for new in spec.get("custom_fields_values") or []:
            fresh = [
                v for v in new.get("values") or [] if identities([{**new, "values": [v]}]) - known
            ]
            if fresh:
                field_slot(contact.fields, new).extend(copy.deepcopy(fresh))
        contact.updated_at = now()

    def _add_contact(self, spec: dict[str, Any]) -> Contact:
        first, last = str(spec.get("first_name") or ""), str(spec.get("last_name") or "")
        name = str(spec.get("name") or " ".join(p for p in (first, last) if p))
        contact = Contact(
            self._new_id("contact"),
            name,
            first,
            last,
            copy.deepcopy(spec.get("custom_fields_values") or []),
        )
        self.contacts[contact.id] = contact
        self._search.put(contact)
        return contact

    def _add_lead(self, item: dict[str, Any], contact_ids: list[int]) -> Lead:
        pipeline_id, status_id = self.resolve_status(item, None)
        lead_id = self._new_id("lead")
        lead = Lead(
            lead_id,
            str(item.get("name") or f"Сделка #{lead_id}"),
            int(item.get("price") or 0),
            pipeline_id,
            status_id,
            copy.deepcopy(item.get("custom_fields_values") or []),
            self._tags_of(item) or [],
            contact_ids,
        )
        self.leads[lead.id] = lead
        return lead

    def _tags_of(self, item: dict[str, Any]) -> list[tuple[int, str]] | None:
        tags = (item.get("_embedded") or {}).get("tags")
        if tags is None:
            return None
        names = [str(t["name"]) for t in tags if "name" in t]
        names += [n for t in tags if "id" in t for n, i in self._tags.items() if i == t["id"]]
        return [(self._tags.setdefault(n, self._new_id("tag")), n) for n in dict.fromkeys(names)]

    def resolve_status(self, item: dict[str, Any], current: Lead | None) -> tuple[int, int]:
        """Pipeline and status a lead ends up in; ValueError names the offending field."""
        default_pipeline = current.pipeline_id if current else MAIN_PIPELINE_ID
        pipeline = self.pipelines.get(item.get("pipeline_id", default_pipeline))
        if pipeline is None:
            raise ValueError("pipeline_id")
        status_id = item.get("status_id")
        if status_id is None:
            keep = current is not None and current.pipeline_id == pipeline.id
            status_id = current.status_id if keep and current else pipeline.statuses[0]
        if status_id not in pipeline.statuses:
            raise ValueError("status_id")
        return pipeline.id, status_id

    def create_leads(self, body: Any) -> list[dict[str, Any]]:
        """`POST /api/v4/leads`: leads, each optionally linked to existing contacts by id."""
        batch = Batch(body, limit=250)
        for rid, item in batch:
            self._check_lead(batch, rid, item, None)
            for n, ref in enumerate(batch.embedded_list(rid, item, "contacts", max_items=None)):
                ref_id = ref.get("id") if isinstance(ref, dict) else None
                self._check_exists(batch, rid, ref_id, self.contacts, f"_embedded.contacts.{n}.id")
        batch.raise_if_failed()
        answers = []
        for rid, item in batch:
            contact_ids = [c["id"] for c in (item.get("_embedded") or {}).get("contacts") or []]
            answers.append({"id": self._add_lead(item, contact_ids).id, "request_id": rid})
        return answers

    def create_contacts(self, body: Any) -> list[dict[str, Any]]:
        """`POST /api/v4/contacts`: new contacts, stored exactly as sent."""
        batch = Batch(body, limit=250)
        for rid, item in batch:
            check_contact(batch, rid, item, "")
        batch.raise_if_failed()
        return [{"id": self._add_contact(item).id, "request_id": rid} for rid, item in batch]

    def seed_contacts(self, body: Any) -> list[dict[str, Any]]:
        """Contacts a manager made by hand (the control API): phones written any way, and
        `created_at`/`updated_at` (unix seconds) as given, for an account with a history."""
        batch = Batch(body if isinstance(body, list) else [body], limit=10_000)
        for rid, item in batch:
            check_contact(batch, rid, item, "")
            check_types(batch, rid, item, {"created_at": int, "updated_at": int})
        batch.raise_if_failed()
        made = []
        for _rid, item in batch:
            contact = self._add_contact(item)
            contact.created_at = item.get("created_at") or contact.created_at
            contact.updated_at = item.get("updated_at") or contact.updated_at
            self._search.put(contact)
            made.append({"id": contact.id, "updated_at": contact.updated_at})
        return made

    def delete_contact(self, contact_id: int) -> bool:
        """A manager deletes a contact: it is gone, its leads stay without it."""
        if self.contacts.pop(contact_id, None) is None:
            return False
        self._search.drop(contact_id)
        for lead in self.leads.values():
            if contact_id in lead.contact_ids:
                lead.contact_ids.remove(contact_id)
        return True

    def update_leads(self, body: Any) -> list[dict[str, Any]]:
        """`PATCH /api/v4/leads`: change name, price, pipeline/status, fields or tags."""
        batch = Batch(body, limit=250)
        for rid, item in batch:
            self._check_exists(batch, rid, item.get("id"), self.leads, "id")
            current = self.leads.get(item["id"]) if type(item.get("id")) is int else None
            self._check_lead(batch, rid, item, current)
        batch.raise_if_failed()
        return [self._apply_lead_update(item) for _rid, item in batch]

    def _apply_lead_update(self, item: dict[str, Any]) -> dict[str, Any]:
        lead = self.leads[item["id"]]
        lead.pipeline_id, lead.status_id = self.resolve_status(item, lead)
        lead.name = str(item.get("name", lead.name))
        lead.price = int(item.get("price", lead.price) or 0)
        merge_fields(lead.fields, item.get("custom_fields_values") or [])
        tags = self._tags_of(item)
        lead.tags = lead.tags if tags is None else tags
        lead.updated_at = now()
        return {"id": lead.id, "updated_at": lead.updated_at}

    def update_contacts(self, body: Any) -> list[dict[str, Any]]:
        """`PATCH /api/v4/contacts`: names, and custom fields replaced per field."""
        batch = Batch(body, limit=250)
        for rid, item in batch:
            self._check_exists(batch, rid, item.get("id"), self.contacts, "id")
            check_contact(batch, rid, item, "")
        batch.raise_if_failed()
        return [self._apply_contact_update(item) for _rid, item in batch]

    def _apply_contact_update(self, item: dict[str, Any]) -> dict[str, Any]:
        contact = self.contacts[item["id"]]
        for attr in ("name", "first_name", "last_name"):
            if item.get(attr) is not None:
                setattr(contact, attr, str(item[attr]))
        merge_fields(contact.fields, copy.deepcopy(item.get("custom_fields_values") or []))
        contact.updated_at = now()
        self._search.put(contact)
        return {"id": contact.id, "updated_at": contact.updated_at}

    def add_notes(self, body: Any) -> list[dict[str, Any]]:
        """`POST /api/v4/leads/notes`: notes on existing leads."""
        batch = Batch(body, limit=250)
        for rid, item in batch:
            self._check_exists(batch, rid, item.get("entity_id"), self.leads, "entity_id")
            if not isinstance(item.get("params", {}), dict):
                batch.error(rid, "InvalidType", "params", "params must be an object")
        batch.raise_if_failed()
        answers = []
        for rid, item in batch:
            note = Note(
                self._new_id("note"),
                item["entity_id"],
                str(item.get("note_type") or "common"),
                dict(item.get("params") or {}),
            )
            self.notes[note.id] = note
            answers.append({"id": note.id, "entity_id": note.entity_id, "request_id": rid})
        return answers


def _matches(contact: Contact, query: str) -> bool:
    """amoCRM's `query` search: a substring of what is stored — the digits of a phone (its
    formatting ignored), the name, an email. The query is not normalised: "+79161234567" does
    not find a phone a manager typed as "8 (916) 123-45-67", its national number "9161234567"
    does (CRM_FACTS.md, "amoCRM search"; Kommo's contacts list reference, `query`)."""
    wanted = digits(query)
    if len(wanted) >= 5:
        for phone in map(digits, field_values(contact.fields, "PHONE")):
            if wanted in phone:
                return True
    needle = query.strip().lower()
    haystack = [contact.name, *field_values(contact.fields, "EMAIL")]
    return any(needle in text.lower() for text in haystack)
