"""Per-person locks: `KeyLocks` inside this process, `PersonLocks` across processes.

Inside a process, asyncio locks keep concurrent requests from racing each other before the
database sees them. Across processes, intake holds PostgreSQL advisory locks on the person's
identities while their submission is written, so two processes never resolve one person two ways
(say, one request with a phone and another with that phone plus an email). Delivery needs no such
lock: the worker leases person rows (see the `claim` query).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Iterable

import asyncpg

from service.store import SQL_DIR, load_queries

log = logging.getLogger(__name__)


class _Entry:
    __slots__ = ("held_since", "lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0
        self.held_since = 0.0


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
        return {k: now - e.held_since for k, e in self._entries.items() if e.lock.locked()}


class _Holding:
    """`async with KeyLocks.hold(keys)`: a plain class, not an asynccontextmanager (a generator
    and its wrapper per request cost ~6 % of intake's CPU)."""

    __slots__ = ("_acquired", "_joined", "_keys", "_locks")

    def __init__(self, locks: KeyLocks, ordered: list[str]) -> None:
        self._locks = locks
        self._keys = ordered
        self._joined: list[_Entry] = []
        self._acquired: list[_Entry] = []

    async def __aenter__(self) -> None:
        entries = self._locks._entries
        try:
            for key in self._keys:
                entry = entries.get(key)
                if entry is None:
                    entry = entries[key] = _Entry()
                entry.users += 1
                self._joined.append(entry)
                if entry.lock.locked():
                    self._locks.waits += 1
                await entry.lock.acquire()
                self._acquired.append(entry)
                entry.held_since = time.monotonic()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._leave()

    def _leave(self) -> None:
        entries = self._locks._entries
        for entry in reversed(self._acquired):
            entry.held_since = 0.0
            entry.lock.release()
        for key, entry in zip(self._keys, self._joined, strict=False):
            entry.users -= 1
            if entry.users == 0:
                del entries[key]
        self._acquired.clear()
        self._joined.clear()


# --- across processes ---------------------------------------------------------------------------

# pg_advisory_lock(space, key): this space is ours; the migration lock uses the one-key form
PERSON_LOCK_SPACE = 72_811_978
PERSON_LOCK_GIVE_UP_S = 1.0  # then the database's own checks alone decide (and we log it)
RECONNECT_S = 1.0
QUERIES = load_queries(SQL_DIR / "cluster.sql")


def person_lock_key(identity: str) -> int:
    """A stable signed 32-bit key for an identity (a collision only serialises two people)."""
    digest = hashlib.blake2b(identity.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


class PersonLocks:
    """Per-person locks across processes for intake, as PostgreSQL advisory locks.

    Why PostgreSQL and not Redis: the lock guards a PostgreSQL transaction (identities → person),
    so it lives where that transaction does. A holder that dies loses its locks the moment its
    session ends (no TTL to guess: a Redis lease can expire under a holder that is merely slow,
    or keep a dead holder's person blocked until it does); it works the same whether Redis is up,
    down or absent; and `pg_locks` lists every holder in the cluster for the admin API.

    Cost: one connection per process, and one round trip per batch of lock requests (requests
    made while a round trip is in flight go together in the next). Keys are taken all-or-nothing
    with try-locks, so there is no hold-and-wait and no deadlock; a person busy for longer than
    PERSON_LOCK_GIVE_UP_S is let through on the database's unique keys alone.
    """

    def __init__(self, dsn: str, name: str, give_up_s: float = PERSON_LOCK_GIVE_UP_S) -> None:
        self.dsn = dsn
        self.name = name
        self.give_up_s = give_up_s
        self.connected = False
        self.gave_up = 0  # requests let through unlocked: a contention signal for metrics
        self._tries: list[tuple[list[int], asyncio.Future[bool | None]]] = []
        self._unlocks: list[int] = []
        self._wake = asyncio.Event()
        self._session = 0  # a new lock connection is a new session: old holds are gone
        self._held: dict[str, float] = {}

    @contextlib.asynccontextmanager
    async def hold(self, identities: Iterable[str]) -> AsyncIterator[bool]:
        """Hold the person's identities across processes; yields whether they are held."""
        names = sorted(set(identities))
        keys = sorted({person_lock_key(i) for i in names})
        held = bool(keys) and await self._acquire(keys)
        session = self._session  # a stale one only costs a no-op unlock; a newer one would leak
        if held:
            self._held.update(dict.fromkeys(names, time.monotonic()))
        try:
            yield held
        finally:
            if held:
                for name in names:
                    self._held.pop(name, None)
                if session == self._session:  # else the server released them with the session
                    self._release(keys)

    def _release(self, keys: Iterable[int]) -> None:
        self._unlocks.extend(keys)
        self._wake.set()

    def held(self) -> dict[str, float]:
        """Identities this process holds across the cluster, with seconds held (admin list)."""
        now = time.monotonic()
        return {k: now - since for k, since in self._held.items()}

    async def _acquire(self, keys: list[int]) -> bool:
        deadline = time.monotonic() + self.give_up_s
        delay = 0.005
        while self.connected:
            fut: asyncio.Future[bool | None] = asyncio.get_running_loop().create_future()
            self._tries.append((keys, fut))
            self._wake.set()
            try:
                got = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.result():
                    self._release(keys)  # granted just as we were cancelled
                raise
            if got is None:  # the lock connection went away
                break
            if got:
                return True
            if time.monotonic() + delay > deadline:
                self.gave_up += 1
                log.warning(
                    "person busy in another process: going on with the database's checks",
                    extra={"action": "person_lock_gave_up", "keys": keys},
                )
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        return False

    async def run(self) -> None:
        """Keep the lock connection and serve queued requests; reconnect after outages."""
        while True:
            try:
                conn = await asyncpg.connect(
                    self.dsn, timeout=5, server_settings={"application_name": self.name[:63]}
                )
            except (OSError, asyncpg.PostgresError, TimeoutError):
                await asyncio.sleep(RECONNECT_S)
                continue
            try:
                await self._serve(conn)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                log.warning(
                    "person locks: connection lost",
                    extra={"action": "person_locks_down", "error": repr(exc)},
                )
            finally:
                self._reset()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)
            await asyncio.sleep(RECONNECT_S)

    async def _serve(self, conn: asyncpg.Connection) -> None:
        self.connected = True
        while True:
            await self._wake.wait()
            self._wake.clear()
            unlocks, self._unlocks = self._unlocks, []
            tries, self._tries = self._tries, []
            try:
                row = await conn.fetchrow(
                    QUERIES["person_locks_step"],
                    PERSON_LOCK_SPACE,
                    unlocks,
                    [k for keys, _ in tries for k in keys],
                )
            except BaseException:
                self._tries[:0] = tries  # answered (as "unavailable") by _reset
                raise
            self._answer(tries, list(row["locked"]))

    def _answer(
        self, tries: list[tuple[list[int], asyncio.Future[bool | None]]], got: list[bool]
    ) -> None:
        at = 0
        for keys, fut in tries:
            mine = got[at : at + len(keys)]
            at += len(keys)
            if not all(mine):  # all or nothing: give back what we did get
                self._release(k for k, ok in zip(keys, mine, strict=True) if ok)
            if not fut.done():
                fut.set_result(all(mine))
            elif all(mine):  # the waiter is gone (cancelled): release for it
                self._release(keys)

    def _reset(self) -> None:
        self.connected = False
        self._session += 1
        self._unlocks.clear()
        tries, self._tries = self._tries, []
        for _, fut in tries:
            if not fut.done():
                fut.set_result(None)


async def person_locks_held(pool: asyncpg.Pool) -> list[dict[str, object]]:
    """Person locks held or awaited anywhere in the cluster: holder process, key, granted."""
    async with pool.acquire() as conn:
        rows = await conn.fetch(QUERIES["person_locks_held"], PERSON_LOCK_SPACE)
    return [dict(r) for r in rows]
