"""The contact index's repository: identity → amoCRM contact rows and the sync state, in SQL.

Queries live in `sql/contact_index.sql`; an unreachable or busy database is `StoreUnavailable`
here, so the index's caller can fall back to searching the CRM.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from service.db.store import UNAVAILABLE, Connection, load_queries, run_on
from service.errors import StoreUnavailable

T = TypeVar("T")

QUERIES = load_queries("contact_index.sql")
# pg_advisory_lock(space, key): this space is ours (locks.py and cluster.sql use their own)
SYNC_LOCK_SPACE = 72_811_979
# Writers that met another writer's rows in the wrong order (or a serialisation failure): the
# write is dropped and the CRM is asked instead; the next sync puts the rows back.
_BUSY = (asyncpg.exceptions.TransactionRollbackError,)


@dataclass(frozen=True)
class SyncState:
    """Where the account's sync stands (see 006_contact_index.sql)."""

    max_updated_at: int = 0
    page: int = 1
    full_scan_done: bool = False
    caught_up: bool = False

    @property
    def trusted(self) -> bool:
        """Lookups may replace the search: every contact was read and nothing is left unread."""
        return self.full_scan_done and self.caught_up


class ContactIndexStore:
    """Typed access to one account's index; takes the pools but does not own them. The sync
    lock is a session's, so `sync_session` borrows from `sessions` (connections that keep
    their session: DATABASE_DIRECT_URL), everything else from `pool`."""

    def __init__(
        self, pool: asyncpg.Pool, account: str, sessions: asyncpg.Pool | None = None
    ) -> None:
        self.pool = pool
        self.sessions = pool if sessions is None else sessions
        self.account = account

    async def _run(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        try:
            return await run_on(self.pool, fn)
        except _BUSY as exc:
            raise StoreUnavailable(f"contact index busy: {exc.__class__.__name__}") from exc

    @contextlib.asynccontextmanager
    async def sync_session(self, wait_s: float) -> AsyncIterator[SyncSession | None]:
        """The account's sync lock on a connection of its own, once the round another process
        may have under way is over; None if that took longer than `wait_s`."""
        try:
            async with self.sessions.acquire() as conn:
                if not await _lock(conn, self.account, wait_s):
                    yield None
                    return
                try:
                    yield SyncSession(conn, self.account)
                finally:
                    await conn.execute(QUERIES["sync_unlock"], self.account, SYNC_LOCK_SPACE)
        except UNAVAILABLE as exc:
            raise StoreUnavailable(f"database unavailable: {exc.__class__.__name__}") from exc
        except _BUSY as exc:
            raise StoreUnavailable(f"contact index busy: {exc.__class__.__name__}") from exc

    async def lookup(self, identities: Sequence[str]) -> dict[str, list[int]]:
        """Each identity's contacts, oldest (lowest id) first; unknown identities left out."""
        rows = await self._run(lambda c: c.fetch(QUERIES["lookup"], self.account, list(identities)))
        found: dict[str, list[int]] = {}
        for row in rows:
            found.setdefault(row["identity"], []).append(row["contact_id"])
        return found

    async def remember(self, pairs: Iterable[tuple[str, int]]) -> None:
        """Add (identity, contact id) pairs; pairs already there stay as they are."""
        identities, contacts = _columns(pairs)
        if identities:
            await self._run(
                lambda c: c.execute(QUERIES["remember"], self.account, identities, contacts)
            )

    async def forget_contact(self, contact_id: int) -> None:
        """Drop every row of a contact the CRM no longer has."""
        await self._run(lambda c: c.execute(QUERIES["forget_contact"], self.account, contact_id))

    async def forget(self, contact_id: int, identities: Sequence[str]) -> None:
        """Drop the identities a contact no longer holds."""
        await self._run(
            lambda c: c.execute(
                QUERIES["forget_identities"], self.account, contact_id, list(identities)
            )
        )


class SyncSession:
    """What the holder of the sync lock may do: read the state, store one page at a time."""

    def __init__(self, conn: Connection, account: str) -> None:
        self._conn = conn
        self._account = account

    async def state(self) -> SyncState:
        return await _state(self._conn, self._account)

    async def save_page(
        self,
        pairs: Iterable[tuple[str, int]],
        contact_ids: Sequence[int],
        after: SyncState,
        contacts_read: int,
    ) -> None:
        """The page's contacts (their identities replace what was indexed for them) and the
        state after it, in one transaction: a crash never leaves the cursor past unsaved rows."""
        identities, contacts = _columns(pairs)
        async with self._conn.transaction():
            if contact_ids:
                await self._conn.execute(
                    QUERIES["sync_page_contacts"],
                    self._account,
                    identities,
                    contacts,
                    list(contact_ids),
                )
            await self._conn.execute(
                QUERIES["sync_page_state"],
                self._account,
                after.max_updated_at,
                after.page,
                after.caught_up,
                contacts_read,
            )


async def _lock(conn: Connection, account: str, wait_s: float) -> bool:
    try:
        async with conn.transaction():  # the lock outlives it: a session lock
            await conn.execute(QUERIES["sync_lock_wait"], f"{max(1, round(wait_s * 1000))}ms")
            await conn.execute(QUERIES["sync_lock"], account, SYNC_LOCK_SPACE)
    except asyncpg.exceptions.LockNotAvailableError:
        return False
    return True


async def _state(conn: Connection, account: str) -> SyncState:
    row = await conn.fetchrow(QUERIES["sync_state"], account)
    assert row is not None, "sync_state always answers one row"
    return SyncState(row["max_updated_at"], row["page"], row["full_scan_done"], row["caught_up"])


def _columns(pairs: Iterable[tuple[str, int]]) -> tuple[list[str], list[int]]:
    ordered = sorted(set(pairs))
    return [identity for identity, _ in ordered], [contact for _, contact in ordered]
