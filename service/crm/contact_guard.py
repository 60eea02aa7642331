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

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TypeVar

import asyncpg

from service.crm.base import Deferred, Delivery, one_per_contact
from service.db.store import UNAVAILABLE, load_queries
from service.errors import StoreUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")
QUERIES = load_queries()
# pg_advisory_lock(space, key): ours alone (locks.py, amocrm_index_store.py use their own)
CONTACT_LOCK_SPACE = 72_811_980
BUSY_RETRY_S = 1.0  # another batch is writing to the contact: look again after this
UNAVAILABLE_RETRY_S = 2.0
CONNECT_TIMEOUT_S = 2.0
STATEMENT_TIMEOUT_S = 5.0
PRUNE_EVERY_S = 600.0


class ContactGuard:
    """The contact locks of one process: one lock connection, opened on first use."""

    def __init__(self, dsn: str, name: str) -> None:
        self.dsn = dsn
        self.name = name
        self._conn: asyncpg.Connection | None = None
        self._io = asyncio.Lock()  # one statement at a time on the connection
        self._session = 0  # a new connection is a new session: the old one's locks are gone
        self._held: set[tuple[str, int]] = set()  # session locks are re-entrant: ours, here
        self._pruned_at: float | None = None
        self._closed = False
        self._connect_after = 0.0  # after a failed connect, fail fast for a moment

    async def close(self) -> None:
        """Close the lock connection (its locks go with it); later calls fail as unavailable."""
        self._closed = True
        async with self._io:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                self._session += 1
                try:
                    await asyncio.wait_for(conn.close(), 2)
                except (*UNAVAILABLE, asyncpg.PostgresError):
                    conn.terminate()

    async def write_no(self) -> int:
        """How far the stamps have got (step 1)."""
        found: int = await self._call(lambda c: c.fetchval(QUERIES["contact_write_no"]))
        return found

    async def take(
        self, account: str, contact_ids: Sequence[int], since: int
    ) -> tuple[set[int], set[int], int]:
        """Try each contact's lock: (taken, taken but stamped since `since`, session)."""
        fresh = [i for i in dict.fromkeys(contact_ids) if (account, i) not in self._held]
        self._held.update((account, i) for i in fresh)
        taken: set[int] = set()
        written: set[int] = set()
        try:
            if fresh:
                rows = await self._call(
                    lambda c: c.fetch(
                        QUERIES["contact_locks_take"], CONTACT_LOCK_SPACE, account, fresh
                    )
                )
                taken = {r["contact_id"] for r in rows if r["locked"]}
            if taken:
                rows = await self._call(
                    lambda c: c.fetch(QUERIES["contact_writes_since"], account, list(taken), since)
                )
                written = {r["contact_id"] for r in rows}
        except BaseException:
            taken = set()  # a failed statement dropped the connection, and the locks with it
            raise
        finally:
            self._held.difference_update((account, i) for i in fresh if i not in taken)
        return taken, written, self._session

    async def give_back(self, account: str, taken: set[int], wrote: set[int], session: int) -> None:
        """Stamp what was written, then unlock (step 4). Never raises StoreUnavailable: a lost
        connection has released the locks with its session."""
        try:
            if wrote:
                stamp = sorted(wrote)
                await self._call(
                    lambda c: c.execute(QUERIES["contact_writes_stamp"], account, stamp)
                )
                await self._prune()
            if taken and session == self._session:
                ids = sorted(taken)
                await self._call(
                    lambda c: c.fetchval(
                        QUERIES["contact_locks_release"], CONTACT_LOCK_SPACE, account, ids
                    )
                )
        except StoreUnavailable as exc:
            log.warning(
                "contact writes not stamped or contacts not unlocked: the connection went with "
                "its locks",
                extra={"action": "contact_guard_down", "error": str(exc), "wrote": len(wrote)},
            )
        finally:
            self._held.difference_update((account, i) for i in taken)

    async def _prune(self) -> None:
        now = asyncio.get_running_loop().time()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        await self._call(lambda c: c.execute(QUERIES["contact_writes_prune"]))

    async def _call(self, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        async with self._io:
            if self._closed:
                raise StoreUnavailable("contact locks closed: the worker is stopping")
            try:
                return await fn(await self._connection())
            except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                self._drop()
                raise StoreUnavailable(f"contact locks unavailable: {exc!r}") from exc
            except BaseException:
                self._drop()  # cancelled mid-statement: the connection's state is unknown
                raise

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        now = asyncio.get_running_loop().time()
        if now < self._connect_after:
            raise StoreUnavailable("contact locks unavailable: reconnecting shortly")
        self._connect_after = now + CONNECT_TIMEOUT_S
        self._conn = await asyncpg.connect(
            self.dsn,
            timeout=CONNECT_TIMEOUT_S,
            command_timeout=STATEMENT_TIMEOUT_S,
            server_settings={"application_name": f"{self.name} contacts"[:63]},
        )
        self._session += 1
        self._connect_after = 0.0
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None
            self._session += 1


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
