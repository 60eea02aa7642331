"""Where locks live, for the admin API's list and force-release.

Each place is a `LockSource`: this process's per-key asyncio locks, the database's person leases,
intake's cluster-wide person locks (PostgreSQL advisory locks) and (when Redis is configured) the
cluster-wide locks, whose source appends itself to the app's `LOCK_SOURCES` list. The API lists
every source and releases a key in the named one.
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web

from service.db.admin_store import AdminStore, json_ready
from service.db.store import Pool
from service.intake.locks import KeyLocks, person_locks_held
from service.logs import mask_text
from service.ops.admin.params import is_number


class LockRefused(Exception):
    """This lock cannot be force-released safely; the message says why."""


class LockSource(Protocol):
    """One kind of lock: what is held now, and how to take it away."""

    name: str

    async def held(self) -> list[dict[str, Any]]: ...

    async def release(self, key: str) -> bool:
        """Release `key`; False when it is not held; LockRefused when it must not be."""
        ...


class ProcessLocks:
    """The per-key asyncio locks of this process (held only while one submission is written)."""

    name = "process"

    def __init__(self, locks: KeyLocks | None) -> None:
        self.locks = locks

    async def held(self) -> list[dict[str, Any]]:
        if self.locks is None:
            return []
        # keys are identities ("phone:+7…"): the list shows how long, not whose
        return [
            {"key": mask_text(key), "held_s": round(s, 3)} for key, s in self.locks.held().items()
        ]

    async def release(self, key: str) -> bool:
        # The holder is a coroutine inside a database write bounded by the write timeout; taking
        # its lock away would let a second request for the same person race it, which is the
        # very duplicate these locks exist to prevent. They free themselves within seconds.
        raise LockRefused(
            "in-process locks release themselves when their write ends (within the database "
            "write timeout); force-releasing one would let two requests for one person race"
        )


class PersonLeases:
    """Person leases in the database: which worker delivers which person's jobs."""

    name = "people"

    def __init__(self, store: AdminStore) -> None:
        self.store = store

    async def held(self) -> list[dict[str, Any]]:
        return [{"key": str(row["person_id"]), **row} for row in await self.store.person_leases()]

    async def release(self, key: str) -> bool:
        if not is_number(key) or len(key) > 18:
            return False
        return await self.store.release_person(int(key))


class ClusterPersonLocks:
    """Intake's person locks across processes, from `pg_locks`: each is held by an ingest
    transaction while it writes (keys are hashes of identities: `intake.locks.person_lock_key`;
    `holder` is the process's name, its connections' application_name)."""

    name = "person-locks"

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    async def held(self) -> list[dict[str, Any]]:
        rows = await person_locks_held(self.pool)  # StoreUnavailable: guarded answers 503
        return [{"scope": "cluster", **json_ready(row), "key": str(row["key"])} for row in rows]

    async def release(self, key: str) -> bool:
        # a transaction's advisory lock ends with the transaction; no other session can take it
        # away (terminating the holder's connection would cut the write it guards)
        raise LockRefused(
            "a person lock is a PostgreSQL advisory lock held by an ingest transaction: only that "
            "transaction can release it, and it does when its write commits or rolls back "
            "(within milliseconds; the holder's connection is named by `holder`)"
        )


LOCK_SOURCES = web.AppKey("lock_sources", list[LockSource])
