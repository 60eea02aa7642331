"""Bitrix24 find-or-create for a whole batch of people, one `batch` request per round:

1. look: `crm.contact.get` and `crm.deal.list` of its open deals for people we hold a link for
   (their deal, if still open, else the contact's newest open deal: another of our people or a
   manager may have opened one); `crm.duplicate.findbycomm` (20 values per command) for the
   phones and e-mails of everyone else;
2. recheck, only when findbycomm found someone: `crm.contact.get` (findbycomm normalises
   phones, so hits are re-checked exactly) and `crm.deal.list` of the open deals of every hit;
3. one delivery per contact goes on (`ContactClaims`: in this batch and across processes), the
   others are `Deferred` to the next round, where they find its deal;
4. write: a known person's open deal gets its stage (if the form sets one) and a timeline
   comment with the submission, and their contact the phone/e-mail it lacked; a known contact
   without an open deal gets a new deal; a new person gets `crm.contact.add`, 50 to a request;
5. deals for the contacts step 4 made, bound by their real ids, 50 to a request.

No deal depends on a `$result[…]` reference: Bitrix24 runs a command whose reference points
at a failed command anyway, with the whole result section in place of the id, and the deal is
made bound to no contact or the wrong one (CRM_FACTS.md, "Bitrix24 batch references"). So a
person whose contact the portal refuses (ERROR_CORE, "invalid e-mail") gets no deal and goes
dead with the portal's message; everyone else's deal names their own contact.

A backlog of 50 new people costs 3 requests. A failed command fails only its own person; one
whose deal.add failed after their contact.add succeeded is found by findbycomm on the retry and
gets a deal for that contact, not a second contact.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from service.crm.base import Delivery, Link
from service.crm.bitrix24.api import (
    MAX_COMM_VALUES,
    MAX_COMMANDS,
    Bitrix24Api,
    BitrixContact,
    BitrixDeal,
    BitrixNotFound,
    as_int,
    build_query,
    findbycomm_commands,
    found_ids,
    parse_contact,
    parse_deal,
)
from service.crm.bitrix24.fields import (
    contact_fields,
    deal_fields,
    missing_comms,
    stage_for,
    submission_text,
)
from service.crm.contact_guard import ContactClaims
from service.db.contact_locks import ContactGuard
from service.errors import CrmError, CrmRetryable
from service.model import Lead
from service.settings import Bitrix24Settings, FormRule, LeadSettings

_WRITE_ORDER = ("c", "p", "d", "u", "m")  # a person's first failed command is the one reported
_DEAL_SELECT = ["ID", "CATEGORY_ID", "STAGE_ID", "STAGE_SEMANTIC_ID", "CLOSED", "CONTACT_ID"]


@dataclass
class Person:
    """One delivery on its way through the rounds."""

    index: int
    delivery: Delivery
    rule: FormRule
    contact_id: int | None = None
    contact: BitrixContact | None = None  # read back, when we needed its phones/e-mails
    deal: BitrixDeal | None = None  # the open deal to update
    searching: bool = False
    born: bool = False  # its contact was made in this round: its deal goes out next
    outcome: Link | CrmError | None = None

    @property
    def pending(self) -> bool:
        return self.outcome is None


class Bitrix24Adapter:
    """Delivers batches of submissions to Bitrix24 through `Bitrix24Api` (one gate slot each).

    A form rule's `category_id` is the new deal's CATEGORY_ID and its `stage_id` the STAGE_ID
    (a string, see `stage_for`); start-up checked both against the portal (`check_stages`).
    """

    name = "bitrix24"
    max_batch = MAX_COMMANDS
    # a round of 500: one request of findbycomm for everyone (25 + 25 commands), then 50
    # contacts or deals to a request
    max_round = 500

    def __init__(self, api: Bitrix24Api, settings: Bitrix24Settings, leads: LeadSettings) -> None:
        self.api = api
        self.leads = leads
        url = settings.portal_url or settings.webhook_url or ""
        self.account = f"bitrix24:{urlparse(url).netloc or url}"

    async def deliver_batch(
        self, items: Sequence[Delivery], guard: ContactGuard | None = None
    ) -> list[Link | CrmError]:
        """Find or create every item's person; one Link or CrmError per item, in order."""
        if len(items) > self.max_round:
            raise ValueError(f"at most {self.max_round} deliveries per round, got {len(items)}")
        people = [
            Person(n, item, self.leads.form_rule(item.lead.form)) for n, item in enumerate(items)
        ]
        async with ContactClaims(guard, self.account) as claims:
            search = Search(self.api)
            await self._look(people, search)
            if any(p.pending and p.searching for p in people):
                await search.resolve([p for p in people if p.pending and p.searching])
            resolved = [(p.delivery, p.contact_id) for p in people if p.pending]
            waiting = await claims.hold(resolved)
            for person in people:
                person.outcome = waiting.get(person.delivery.job_id, person.outcome)
            await self._write([p for p in people if p.pending], claims)
        # Every path sets an outcome; the fallback only guards "one answer per item".
        lost = CrmRetryable("the Bitrix24 adapter reached no result for this delivery")
        return [lost if p.outcome is None else p.outcome for p in people]

    # ---- round 1: what we know ----------------------------------------------------------------

    async def _look(self, people: list[Person], search: Search) -> None:
        linked = [p for p in people if p.delivery.link.contact_id and p.delivery.link.lead_id]
        for person in people:
            person.searching = person not in linked
        cmds: dict[str, str] = {}
        for person in linked:
            cmds |= _look_commands(person)
        cmds |= search.commands([p for p in people if p.searching])
        if not cmds:
            return
        answer = await self.api.batch_many(cmds)
        for person in linked:
            _read_link(person, answer.result, answer.errors)
        search.read(answer.result, answer.errors)
        # People whose link went stale need their own findbycomm: one more request, rarely.
        stale = [p for p in linked if p.pending and p.searching]
        if stale:
            found = await self.api.batch_many(search.commands(stale))
            search.read(found.result, found.errors)

    # ---- round 3: writes ----------------------------------------------------------------------

    async def _write(self, people: list[Person], claims: ContactClaims) -> None:
        groups = [(p, self._writes(p)) for p in people]
        for person, group in groups:
            adds = f"p{person.index}" in group or f"d{person.index}" in group
            if person.contact_id is not None and adds:  # to an existing contact
                claims.wrote(person.contact_id)
        await self._send(groups)
        # The contacts just made get their deals, by id: never through `$result[c<i>]`.
        born = [p for p in people if p.pending and p.born]
        await self._send([(p, self._writes(p)) for p in born])

    async def _send(self, groups: list[tuple[Person, dict[str, str]]]) -> None:
        packs = list(_packs(groups))
        for n, pack in enumerate(packs):
            cmds = {name: cmd for _, group in pack for name, cmd in group.items()}
            try:
                answer = await self.api.batch(cmds)
            except CrmError as exc:
                # Stop here: the CRM refused a whole request (limit, block, outage). Earlier
                # packs are done; this one and the rest fail with the same error.
                for rest in packs[n:]:
                    for person, _ in rest:
                        person.outcome = exc
                return
            for person, group in pack:
                _settle(person, group, answer.result, answer.errors)

    def _writes(self, person: Person) -> dict[str, str]:
        i, lead, rule = person.index, person.delivery.lead, person.rule
        sid = person.delivery.submission_id
        if person.contact_id is None:
            return {f"c{i}": "crm.contact.add?" + build_query({"fields": contact_fields(lead)})}
        cmds: dict[str, str] = {}
        # Without a read-back contact we cannot tell what it lacks (see `_look_commands`).
        missing = missing_comms(person.contact, lead) if person.contact else {}
        if missing:
            params = {"id": person.contact_id, "fields": missing}
            cmds[f"p{i}"] = "crm.contact.update?" + build_query(params)
        if person.deal is None:
            fields = deal_fields(lead, rule, sid, person.contact_id)
            cmds[f"d{i}"] = "crm.deal.add?" + build_query({"fields": fields})
            return cmds
        stage = stage_for(rule, person.deal.category_id)
        if stage is not None and stage != person.deal.stage_id:
            params = {"id": person.deal.id, "fields": {"STAGE_ID": stage}}
            cmds[f"u{i}"] = "crm.deal.update?" + build_query(params)
        comment = {"ENTITY_ID": person.deal.id, "ENTITY_TYPE": "deal"}
        comment["COMMENT"] = submission_text(lead, sid)
        cmds[f"m{i}"] = "crm.timeline.comment.add?" + build_query({"fields": comment})
        return cmds


def _look_commands(person: Person) -> dict[str, str]:
    """The linked contact (what it lacks; whether it is still there) and its open deals."""
    i, contact_id = person.index, int(person.delivery.link.contact_id or 0)
    return {
        f"k{i}": f"crm.contact.get?id={contact_id}",
        f"o{i}": "crm.deal.list?" + build_query(_open_deals_query(contact_id)),
    }


def _read_link(person: Person, result: dict[str, object], errors: dict[str, CrmError]) -> None:
    """The linked deal if still open, else the contact's newest open deal (another of our
    people, or a manager, may have opened one), else a new deal; the contact gone → search."""
    i, link = person.index, person.delivery.link
    failed = errors.get(f"k{i}") or errors.get(f"o{i}")
    if isinstance(failed, BitrixNotFound):
        person.searching = True  # deleted in the CRM: find the person afresh
        return
    if failed is not None:
        person.outcome = failed
        return
    contact, rows = parse_contact(result.get(f"k{i}")), result.get(f"o{i}")
    if contact is None or not isinstance(rows, list):
        person.outcome = CrmRetryable("Bitrix24 answered without the linked contact or its deals")
        return
    person.searching = False
    person.contact_id, person.contact = link.contact_id, contact
    kept = [
        d for d in map(parse_deal, rows) if d is not None and d.is_open and d.id == link.lead_id
    ]
    person.deal = kept[0] if kept else _open_deal(rows, person.rule)


def _packs(
    groups: list[tuple[Person, dict[str, str]]],
) -> Iterator[list[tuple[Person, dict[str, str]]]]:
    """Greedy packing into batches of at most 50 commands, never splitting one person's group
    (their commands are reported together)."""
    pack: list[tuple[Person, dict[str, str]]] = []
    size = 0
    for person, group in groups:
        if pack and size + len(group) > MAX_COMMANDS:
            yield pack
            pack, size = [], 0
        pack.append((person, group))
        size += len(group)
    if pack:
        yield pack


def _settle(
    person: Person, group: dict[str, str], result: dict[str, Any], errors: dict[str, CrmError]
) -> None:
    """A person's outcome from their commands' answers; a contact just made waits for its
    deal (`born`), which goes out in the next request."""
    i = person.index
    for prefix in _WRITE_ORDER:
        error = errors.get(f"{prefix}{i}")
        if error is not None:
            person.outcome = error
            return
    if f"c{i}" in group:
        person.contact_id = as_int(result.get(f"c{i}"))
        person.born = person.contact_id is not None
        if not person.born:
            person.outcome = CrmRetryable("Bitrix24 answered crm.contact.add without an id")
        return
    deal_id = person.deal.id if person.deal is not None else as_int(result.get(f"d{i}"))
    if person.contact_id is None or deal_id is None:
        person.outcome = CrmRetryable("Bitrix24 answered the batch without the new deal id")
        return
    person.outcome = Link(person.contact_id, deal_id)


class Search:
    """findbycomm for many people at once, and the exact re-check of what it found.

    Values go 20 to a command, so a command's hits belong to any of up to 20 people: a person's
    candidates are the hits of the commands holding their values, and the re-check
    (crm.contact.get) says whose they really are.
    """

    def __init__(self, api: Bitrix24Api) -> None:
        self.api = api
        self._chunk_of: dict[tuple[str, str], str] = {}  # (PHONE|EMAIL, value) → command name
        self._hits: dict[str, list[int] | CrmError] = {}  # command name → ids, or its error

    def commands(self, people: Sequence[Person]) -> dict[str, str]:
        """findbycomm commands for every phone and e-mail of `people` not searched yet."""
        cmds: dict[str, str] = {}
        for kind, attr in (("PHONE", "phone"), ("EMAIL", "email")):
            values = {getattr(p.delivery.lead, attr) for p in people} - {None, ""}
            fresh = sorted(v for v in values if (kind, v) not in self._chunk_of)
            prefix = f"f{kind[0]}{len(self._chunk_of)}_"  # unique: the map grows every call
            chunk_cmds = findbycomm_commands(kind, fresh, prefix)
            for n, name in enumerate(chunk_cmds):  # the n-th command holds the n-th 20 values
                chunk = fresh[n * MAX_COMM_VALUES : (n + 1) * MAX_COMM_VALUES]
                self._chunk_of |= {(kind, v): name for v in chunk}
            cmds |= chunk_cmds
        return cmds

    def read(self, result: Mapping[str, Any], errors: Mapping[str, CrmError]) -> None:
        """Take in the findbycomm answers of a batch."""
        for name in set(self._chunk_of.values()) - set(self._hits):
            if name in errors:
                self._hits[name] = errors[name]
            elif name in result:
                try:
                    self._hits[name] = found_ids(result[name])
                except CrmError as exc:
                    self._hits[name] = exc

    async def resolve(self, people: list[Person]) -> None:
        """Give every searching person their contact (or none: new) and its open deal."""
        candidates = {p.index: self._candidates(p) for p in people}
        ids = sorted({i for c in candidates.values() if isinstance(c, set) for i in c})
        answer = await self.api.batch_many(_recheck_commands(ids)) if ids else None
        for person in people:
            found = candidates[person.index]
            if isinstance(found, CrmError):
                person.outcome = found
            elif answer is not None and found:
                _choose(person, found, answer.result, answer.errors)
            person.searching = False

    def _candidates(self, person: Person) -> set[int] | CrmError:
        lead = person.delivery.lead
        ids: set[int] = set()
        for kind, value in (("PHONE", lead.phone), ("EMAIL", lead.email)):
            hits = self._hits.get(self._chunk_of.get((kind, value), ""), []) if value else []
            if isinstance(hits, CrmError):
                return hits
            ids.update(hits)
        return ids


def _recheck_commands(ids: list[int]) -> dict[str, str]:
    cmds: dict[str, str] = {}
    for contact_id in ids:
        cmds[f"cg{contact_id}"] = f"crm.contact.get?id={contact_id}"
        cmds[f"dl{contact_id}"] = "crm.deal.list?" + build_query(_open_deals_query(contact_id))
    return cmds


def _open_deals_query(contact_id: int) -> dict[str, Any]:
    return {
        "filter": {"CONTACT_ID": contact_id, "CLOSED": "N"},
        "order": {"ID": "DESC"},
        "select": _DEAL_SELECT,
    }


def _choose(
    person: Person, ids: set[int], result: Mapping[str, Any], errors: Mapping[str, CrmError]
) -> None:
    """The oldest candidate that really holds the person's phone or e-mail, and its open deal."""
    lead = person.delivery.lead
    matches: list[BitrixContact] = []
    for contact_id in sorted(ids):
        error = errors.get(f"cg{contact_id}")
        if isinstance(error, BitrixNotFound):
            continue  # deleted since findbycomm answered
        if error is not None:
            person.outcome = error  # cannot tell whether this one is theirs
            return
        contact = parse_contact(result.get(f"cg{contact_id}"))
        if contact is not None and _holds(contact, lead):
            matches.append(contact)
    if not matches:
        return
    contact = matches[0]
    rows = result.get(f"dl{contact.id}")
    if f"dl{contact.id}" in errors or not isinstance(rows, list):
        person.outcome = errors.get(f"dl{contact.id}") or CrmRetryable(
            "Bitrix24 answered crm.deal.list without a list"
        )
        return
    person.contact_id, person.contact = contact.id, contact
    person.deal = _open_deal(rows, person.rule)


def _holds(contact: BitrixContact, lead: Lead) -> bool:
    return bool(
        (lead.phone and contact.has("PHONE", lead.phone))
        or (lead.email and contact.has("EMAIL", lead.email))
    )


def _open_deal(rows: list[Any], rule: FormRule) -> BitrixDeal | None:
    """The newest open deal, in the form's category when it names one."""
    deals = [d for d in map(parse_deal, rows) if d is not None and d.is_open]
    if rule.category_id is not None:
        deals = [d for d in deals if d.category_id == rule.category_id]
    return max(deals, key=lambda d: d.id, default=None)
