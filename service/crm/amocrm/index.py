"""A local index of amoCRM's contacts by phone and email, kept in sync incrementally.

Why: amoCRM's search (`GET /api/v4/contacts?query=`) takes one string, so finding out whether a
new person with a phone and an email is already a contact costs two requests. The index answers
for every person of a batch in one local lookup; keeping it current costs one list request per
batch (more only when many contacts changed), shared by up to 50 people.

How: `GET /api/v4/contacts?filter[updated_at][from]=…&order[updated_at]=asc` from the newest
change seen minus one second, page after page until a short page. Every page is stored with the
new position in one transaction, so a read that stopped (a restart, a failed request) resumes
where it stopped. One process per account syncs at a time (an advisory lock); another waits for
that round and then reads only what changed after it. Until a round has reached the end after a
complete first scan, `refresh()` answers False and the adapter searches as before, so no answer
ever comes from an incomplete index.

Politeness (CRM_FACTS.md, "amoCRM politeness": Kommo restricts by IP, then answers 403 to
everything, clients that iterate over all data without need or read the same data again and
again):

- the index has its own small share of the rate limit (`AMOCRM_INDEX_SHARE`, a third by
  default): its list requests are spaced to that share of `CRM_RATE_LIMIT`, so deliveries keep
  the rest whatever the index reads;
- a batch's round reads at most `pages_per_round` pages; the first full read of a big account
  goes on in the background (`scan`) at that share, resuming from the stored position after a
  restart or a failure, rather than inside batches;
- a batch re-reads changes only when the last round that reached the end started more than
  `reuse_s` ago (`AMOCRM_INDEX_REFRESH_S`, capped by `reuse_window`), not before every batch.

Contacts we create or complete go into the index at once, from the CRM's answer; only a write
whose answer was lost is unknown to it. So a batch of first attempts is answered by a round that
started at most `reuse_s` before it asked (`reuse_s` is at most half a lease: a delivery whose
worker died after writing is claimed again only when its lease ran out, after such a round), and
a batch holding a retry (`refresh(fresh=True)`: an earlier attempt's write may have landed
unanswered) only by a round that started after it asked. That is what lets the retry of a
`leads/complex` whose answer was lost find the contact it made, as the search did. Callers that
arrive during a round wait for it or the next one, which they share. In a burst of new people
the contacts our own rounds make are thus read once, by the first round after the window, not
by every round.

Identities are normalised as intake does (`service.intake.normalize`): a phone a manager typed as
"8 (916) 123-45-67" is +79161234567; values that are no valid phone/email are not indexed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from urllib.parse import urlparse

import phonenumbers
from aiolimiter import AsyncLimiter

from service.crm.amocrm.api import LIST_LIMIT, AmoContact, AmoCrmApi, ContactPage, digits
from service.db.contact_index_store import ContactIndexStore, SyncState
from service.db.store import Pool
from service.errors import BadInput, CrmError, StoreUnavailable
from service.intake.normalize import normalize_email, normalize_phone
from service.model import Lead

log = logging.getLogger(__name__)

SPACING_MARGIN = 1.02  # as the rate gate spaces its calls (delivery.limits)
PAGES_PER_ROUND = 4  # 1,000 contacts per round
SYNC_WAIT_S = 60.0  # for another process's round; then this batch searches instead
# While the background read of a new account is under way, new people wait for it (without an
# attempt counted) rather than being searched for one by one, for at most this long after it
# began: a bigger account (~60,000 contacts at 2 pages/s) leaves the rest of its read to run
# while they are searched for.
SCAN_PATIENCE_S = 120.0
SCAN_DEFER_S = 3.0  # how long such a delivery waits before it looks again
SCAN_RETRY_S = 5.0  # the background read after a failure: then doubling, up to SCAN_RETRY_MAX_S
SCAN_RETRY_MAX_S = 60.0


def reuse_window(refresh_s: float, lease_s: float) -> float:
    """How long a round that reached the end answers later batches of first attempts:
    `refresh_s`, but at most half a lease. A delivery whose worker died after writing (no
    attempt counted) is claimed again only when its lease ran out, at least two thirds of a
    lease after its last heartbeat: it then reads from a round that started after the write.
    (A retry after a counted attempt — a lost answer — asks for a round of its own:
    `ContactIndex.refresh(fresh=True)`.)"""
    return max(0.0, min(refresh_s, lease_s / 2))


class ContactIndex:
    """Identity → contact id for one amoCRM account, refreshed before a batch is resolved."""

    def __init__(
        self,
        api: AmoCrmApi,
        pool: Pool,
        *,
        sessions: Pool | None = None,
        default_region: str | None = None,
        pages_per_round: int = PAGES_PER_ROUND,
        page_limit: int = LIST_LIMIT,
        sync_wait_s: float = SYNC_WAIT_S,
        rate: float | None = None,
        reuse_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.store = ContactIndexStore(pool, account_of(api.base_url), sessions=sessions)
        self.default_region = default_region
        self.pages_per_round = pages_per_round
        self.page_limit = page_limit
        self.sync_wait_s = sync_wait_s
        self.reuse_s = reuse_s
        self.clock = clock
        # the index's own share of the limit: list requests spaced 1/rate apart (the shared
        # gate still admits each of them too)
        self._pace = AsyncLimiter(1, SPACING_MARGIN / rate) if rate else None
        self._local = asyncio.Lock()  # one round at a time in this process
        self._started = 0  # rounds this process started
        self._fresh_from = 0  # the number of the last round that ended without an error
        self._fresh_at = float("-inf")  # when that round started (clock)
        self._trusted = False
        self._scan_began: float | None = None  # while `scan` runs: when it began (clock)

    @property
    def worth_waiting(self) -> bool:
        """The background read is under way and young enough that new people should wait for
        it (`SCAN_PATIENCE_S`) rather than be searched for one by one."""
        began = self._scan_began
        return began is not None and self.clock() - began < SCAN_PATIENCE_S

    async def refresh(self, *, fresh: bool = False) -> bool:
        """Bring the index up to date; True when its lookups can replace the CRM search.

        Raises the `CrmError` of a failed list request and `StoreUnavailable` when the database
        is not there. A round that started after this call, or (unless `fresh`: the caller may
        have written what the index has not seen) at most `reuse_s` before it, and got to the
        end answers the caller; else (none, more to read, or it failed) the caller runs its own.
        """
        arrived, arrived_at = self._started, self.clock()
        async with self._local:
            recent = self._fresh_from > arrived or (
                not fresh and self._fresh_at >= arrived_at - self.reuse_s
            )
            if self._trusted and recent:
                return True
            self._started += 1
            number, started_at = self._started, self.clock()
            self._trusted = await self._round(self.pages_per_round)
            self._fresh_from, self._fresh_at = number, started_at
            return self._trusted

    async def scan(self) -> None:
        """Read the account until the index can answer, in rounds at the index's own pace, and
        return: the first full read of a big account, done in the background instead of inside
        batches. It resumes from the stored position (a restart, another process's rounds);
        a failed round is tried again after SCAN_RETRY_S, doubling up to SCAN_RETRY_MAX_S."""
        delay = SCAN_RETRY_S
        self._scan_began = self.clock()
        try:
            while True:
                try:
                    if await self.refresh():
                        return
                    delay = SCAN_RETRY_S
                except (CrmError, StoreUnavailable) as exc:
                    log.warning(
                        "contact index: the background read failed; it resumes where it stopped",
                        extra={"action": "contact_index_scan_error", "error": str(exc)},
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, SCAN_RETRY_MAX_S)
        finally:
            self._scan_began = None

    async def _round(self, pages: int) -> bool:
        async with self.store.sync_session(self.sync_wait_s) as session:
            if session is None:
                log.warning(
                    "contact index: another process's round takes too long, searching instead",
                    extra={"action": "contact_index_wait"},
                )
                return False
            state = await session.state()
            for _ in range(pages):
                if self._pace is not None:
                    await self._pace.acquire()
                page = await self.api.list_contacts(
                    max(0, state.max_updated_at - 1), state.page, self.page_limit
                )
                after = advance(state, page, self.page_limit)
                pairs = [(i, c.id) for c in page.contacts for i in self.identities_of(c)]
                await session.save_page(pairs, [c.id for c in page.contacts], after, page.size)
                state = after
                if state.caught_up:
                    break
            if not state.caught_up:
                log.info(
                    "contact index: more to read next round",
                    extra={"action": "contact_index_behind", "updated_at": state.max_updated_at},
                )
            return state.trusted

    async def candidates(self, leads: Sequence[Lead]) -> list[list[int]]:
        """For each lead, the contacts that held its phone (oldest first), then its email: the
        order in which the search found them. One query for all."""
        found = await self.store.lookup([i for lead in leads for i in _identities(lead)])
        return [
            list(dict.fromkeys(c for i in _identities(lead) for c in found.get(i, ())))
            for lead in leads
        ]

    async def remember(self, pairs: Iterable[tuple[str, int]]) -> None:
        """Index (identity, contact id) pairs we just made true: a create, a phone/email added."""
        await self.store.remember(pairs)

    async def remember_contact(self, contact: AmoContact) -> None:
        """Index a contact as the CRM just showed it (a search hit)."""
        await self.store.remember((i, contact.id) for i in self.identities_of(contact))

    async def forget_contact(self, contact_id: int) -> None:
        """The CRM no longer has this contact."""
        await self.store.forget_contact(contact_id)

    async def forget_stale(self, contact: AmoContact, lead: Lead) -> None:
        """The contact was indexed under the lead's phone/email but no longer holds them."""
        held = self.identities_of(contact)
        gone = [i for i in (lead.phone, lead.email) if i and i not in held]
        if gone:
            await self.store.forget(contact.id, gone)

    def identities_of(self, contact: AmoContact) -> set[str]:
        """The contact's phones (E.164) and emails (lower-case) that intake would accept."""
        found = {_phone(p, self.default_region) for p in contact.phones}
        found.update(_email(e) for e in contact.emails)
        found.discard(None)
        return {i for i in found if i}


def advance(state: SyncState, page: ContactPage, limit: int) -> SyncState:
    """The sync state after reading `page` (requested from `state`).

    A short page is the end: the next round starts again one second before the newest change.
    A full page whose newest change is newer than where it started moves the window up (page 1
    again: asking by time, not by offset, never skips a contact that moved meanwhile); a full
    page stuck in one second (an import: hundreds of contacts changed at once) turns the page.
    """
    newest = max((c.updated_at for c in page.contacts if c.updated_at is not None), default=None)
    top = max(state.max_updated_at, newest or 0)
    if page.size < limit:
        return replace(state, max_updated_at=top, page=1, full_scan_done=True, caught_up=True)
    if top > state.max_updated_at:
        return replace(state, max_updated_at=top, page=1, caught_up=False)
    return replace(state, page=state.page + 1, caught_up=False)


def _identities(lead: Lead) -> list[str]:
    return [i for i in (lead.phone, lead.email) if i]


def account_of(base_url: str) -> str:
    """The index's account key for an amoCRM base URL: `amocrm:<host>`."""
    return f"amocrm:{urlparse(base_url).netloc or base_url}"


def _phone(raw: str, region: str | None) -> str | None:
    try:
        return normalize_phone(raw, region)
    except BadInput:
        return None


def _email(raw: str) -> str | None:
    try:
        return normalize_email(raw)
    except BadInput:
        return None


def phone_identity(raw: str, region: str | None) -> str | None:
    """A phone as written anywhere, as intake would store it (E.164); None if it is no valid
    phone."""
    return _phone(raw, region)


def national_number(phone: str) -> str:
    """The digits after the country code of an E.164 phone (all its digits if it is not one)."""
    try:
        return str(phonenumbers.parse(phone, None).national_number)
    except phonenumbers.NumberParseException:
        return digits(phone)
