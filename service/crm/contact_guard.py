"""One delivery at a time writes to an existing CRM contact, in a batch and across processes.

Why: people are leased one at a time (the `claim` query), but two of our people can be one CRM
contact (a phone-only and an email-only submission of someone a manager entered with both). Two
deliveries that both read that contact before either wrote would both create a lead.

How, per adapter batch (`async with ContactClaims(guard, account) as claims`):

1. on entry, before the adapter reads the CRM: the number the contact stamps have reached
   (`contact_write_no`, 007_contact_writes.sql);
2. `claims.hold(resolved)`, once the adapter knows which contact each delivery goes to: the
   first delivery of each contact in the batch goes on (`one_per_contact`); its contact's
   advisory lock is tried, never waited for; a contact this process or another holds, or one
   stamped since step 1 (someone wrote to it after we may have read it), is `Deferred`: that job
   waits for the next round without an attempt counted, and then reads the contact afresh;
3. the adapter writes, calling `claims.wrote(contact_id)` for each lead it creates for (or update
   it makes to) an existing contact;
4. on exit: those contacts are stamped (after the CRM answered, so a stamp is newer than the
   write it stands for) and only then unlocked.

The locks are session locks on one connection per process, so holding one costs nothing and a
batch waiting for the rate limit while it holds one stalls nobody: the others are deferred and
come back a second later. A database that cannot be reached defers every delivery to an
existing contact (new people go on: nobody else can have read a contact that does not exist).

What this does not cover: a holder whose database session ends (its process killed, the
connection lost) between the CRM's answer to its write and the stamp's commit, while another
process has read the same contact before that write and takes the lock after the session ended.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from types import TracebackType

from service.crm.base import Deferred, Delivery, one_per_contact
from service.db.contact_locks import BUSY_RETRY_S, UNAVAILABLE_RETRY_S, ContactGuard
from service.errors import StoreUnavailable

log = logging.getLogger(__name__)

class ContactClaims:
    """What one adapter batch holds; without a guard, only the batch's own grouping applies."""

    def __init__(self, guard: ContactGuard | None, account: str) -> None:
        self.guard = guard
        self.account = account
        self._since: int | None = None
        self._taken: set[int] = set()
        self._wrote: set[int] = set()
        self._session = 0

    async def __aenter__(self) -> ContactClaims:
        if self.guard is not None:
            try:
                self._since = await self.guard.write_no()
            except StoreUnavailable as exc:
                log.warning(
                    "contact locks unavailable: deliveries to existing contacts wait",
                    extra={"action": "contact_guard_down", "error": str(exc)},
                )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.guard is not None and (self._taken or self._wrote):
            taken, self._taken = self._taken, set()
            wrote, self._wrote = self._wrote, set()
            await self.guard.give_back(self.account, taken, wrote, self._session)

    async def hold(self, resolved: Sequence[tuple[Delivery, int | None]]) -> dict[int, Deferred]:
        """Step 2: job id → why it waits, for the deliveries that must not write now. Every
        other delivery with a contact holds that contact until the batch ends."""
        ahead, waiting = one_per_contact(resolved)
        if self.guard is not None and ahead:
            waiting |= await self._lock(ahead)
        return waiting

    def wrote(self, contact_id: int) -> None:
        """The adapter is about to create a lead for (or update) this existing contact."""
        self._wrote.add(contact_id)

    async def _lock(self, ahead: dict[int, Delivery]) -> dict[int, Deferred]:
        assert self.guard is not None
        if self._since is None:
            return _all_wait(ahead, "the contact locks are unavailable", UNAVAILABLE_RETRY_S)
        try:
            taken, written, self._session = await self.guard.take(
                self.account, list(ahead), self._since
            )
        except StoreUnavailable as exc:
            return _all_wait(
                ahead, f"the contact locks are unavailable ({exc})", UNAVAILABLE_RETRY_S
            )
        self._taken |= taken
        waiting: dict[int, Deferred] = {}
        for contact_id, delivery in ahead.items():
            if contact_id not in taken:
                why = f"CRM contact {contact_id} is being written by another delivery"
                waiting[delivery.job_id] = Deferred(why, delay_s=BUSY_RETRY_S)
            elif contact_id in written:
                why = f"CRM contact {contact_id} was written since this batch read it"
                waiting[delivery.job_id] = Deferred(why)
        return waiting


def _all_wait(ahead: dict[int, Delivery], why: str, delay_s: float) -> dict[int, Deferred]:
    return {d.job_id: Deferred(why, delay_s=delay_s) for d in ahead.values()}
