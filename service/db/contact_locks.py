"""The contact locks' database side: session advisory locks and write stamps on one connection.

Why a session of its own and how the locks are used: `crm/contact_guard.py`. Every failure of
the connection or a statement is `StoreUnavailable`, and drops the connection (its locks go with
its session).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import asyncpg

from service.db.store import FAILURES, load_queries
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
                except FAILURES:
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
            except FAILURES as exc:
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
