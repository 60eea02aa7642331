"""Per-person locks: `KeyLocks` inside this process; across processes, the database's.

Inside a process, asyncio locks keep concurrent requests from racing each other before the
database sees them. Across processes, the ingest transaction holds PostgreSQL advisory locks on
the person's identities while their submission is written (relay_ingest, migration 010), so two
processes never resolve one person two ways (say, one request with a phone and another with that
phone plus an email). Delivery needs no such lock: the worker leases person rows (see the `claim`
query).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import time
from collections.abc import Iterable

from service.db.store import Pool, load_queries, read_on


class _Entry:
    """A held key: whoever made the entry holds it; later comers queue a future each and are
    handed the key in turn. No asyncio.Lock per key: almost every key (an idempotency key, a
    new person's phone) is taken once and never waited for."""

    __slots__ = ("held_since", "waiters")

    def __init__(self) -> None:
        self.held_since = time.monotonic()
        self.waiters: collections.deque[asyncio.Future[None]] | None = None


class KeyLocks:
    """Locks created on first use and dropped when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.waits = 0  # acquisitions that had to wait: a contention signal for metrics

    def hold(self, keys: Iterable[str]) -> _Holding:
        """Hold every key; taken in sorted order so two holders can never deadlock."""
        return _Holding(self, sorted(set(keys)))

    def held(self) -> dict[str, float]:
        """Keys held now, with seconds held (for the admin lock list)."""
        now = time.monotonic()
        return {k: now - e.held_since for k, e in self._entries.items()}

    async def _take(self, key: str) -> None:
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _Entry()
            return
        self.waits += 1
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if entry.waiters is None:
            entry.waiters = collections.deque()
        entry.waiters.append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._give(key)  # handed to us just as we were cancelled: pass it on
            raise  # (a cancelled turn stays queued; _give skips it)

    def _give(self, key: str) -> None:
        """Release `key`: to the first waiter still waiting, else drop the entry."""
        entry = self._entries[key]
        while entry.waiters:
            turn = entry.waiters.popleft()
            if not turn.done():
                turn.set_result(None)
                entry.held_since = time.monotonic()
                return
        del self._entries[key]


class _Holding:
    """`async with KeyLocks.hold(keys)`: a plain class, not an asynccontextmanager (a generator
    and its wrapper per request cost ~6 % of intake's CPU)."""

    __slots__ = ("_held", "_keys", "_locks")

    def __init__(self, locks: KeyLocks, ordered: list[str]) -> None:
        self._locks = locks
        self._keys = ordered
        self._held = 0  # how many of _keys, in order, are taken

    async def __aenter__(self) -> None:
        try:
            for key in self._keys:
                await self._locks._take(key)
                self._held += 1
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._leave()

    def _leave(self) -> None:
        for key in reversed(self._keys[: self._held]):
            self._locks._give(key)
        self._held = 0


# --- across processes ---------------------------------------------------------------------------

# The person lock across processes is taken by the database itself: relay_ingest() holds
# pg_advisory_xact_lock(PERSON_LOCK_SPACE, person_lock_key(identity)) for each identity of the
# batch for the length of its transaction (migration 010). Nothing to hold or release here.
PERSON_LOCK_SPACE = 72_811_978
QUERIES = load_queries("cluster.sql")


def person_lock_key(identity: str) -> int:
    """The identity's lock key as relay_person_lock_key() computes it: the first 32 bits of its
    MD5, signed (a collision only serialises two people)."""
    digest = hashlib.md5(identity.encode(), usedforsecurity=False).digest()
    return int.from_bytes(digest[:4], "big", signed=True)


async def person_locks_held(pool: Pool) -> list[dict[str, object]]:
    """Person locks held or awaited anywhere in the cluster: holder process, key, granted; any
    database failure is StoreUnavailable."""
    query = QUERIES["person_locks_held"]
    rows = await read_on(pool, lambda conn: conn.fetch(query, PERSON_LOCK_SPACE))
    return [dict(r) for r in rows]
