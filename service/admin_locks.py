"""Where locks live, for the admin API's list and force-release.

Each place is a `LockSource`: this process's per-key asyncio locks, the database's person leases,
intake's cluster-wide person locks (PostgreSQL advisory locks) and (when Redis is configured) the
cluster-wide locks, whose source appends itself to the app's `LOCK_SOURCES` list. The API lists
every source and releases a key in the named one.
"""

from __future__ import annotations

from typing import Any, Protocol

import asyncpg
from aiohttp import web

from service.admin_store import AdminStore, json_ready
from service.errors import StoreUnavailable
from service.locks import KeyLocks, PersonLocks, person_lock_key, person_locks_held
from service.logs import mask_text
from service.normalize import mask_email, mask_phone
from service.store import UNAVAILABLE


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
        if not key.isdigit():
            return False
        return await self.store.release_person(int(key))


class ClusterPersonLocks:
    """Intake's person locks across processes: every holder's from `pg_locks` (keys are hashes of
    identities), and this process's own with the identity masked."""

    name = "person-locks"

    def __init__(self, pool: asyncpg.Pool, local: PersonLocks | None) -> None:
        self.pool = pool
        self.local = local

    async def held(self) -> list[dict[str, Any]]:
        try:
            rows = await person_locks_held(self.pool)
        except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
            raise StoreUnavailable(f"database unavailable: {exc.__class__.__name__}") from exc
        cluster = [{"scope": "cluster", **json_ready(row), "key": str(row["key"])} for row in rows]
        return cluster + self._mine()

    def _mine(self) -> list[dict[str, Any]]:
        if self.local is None:
            return []
        # lock_key is the identity's hash as pg_locks shows it (an unsigned objid): it links a
        # cluster row to the person this process locked, without showing whose it is
        return [
            {
                "scope": "this process",
                "key": _masked(identity),
                "lock_key": str(person_lock_key(identity) & 0xFFFFFFFF),
                "holder": self.local.name,
                "held_s": round(seconds, 3),
            }
            for identity, seconds in self.local.held().items()
        ]

    async def release(self, key: str) -> bool:
        # pg_advisory_unlock works only in the session that took the lock; another session
        # cannot take it away (and terminating the holder's connection would cut every write
        # it has in flight). The locks last one write: they free themselves within seconds.
        raise LockRefused(
            "a person lock is a PostgreSQL advisory lock: only the holding session can release "
            "it. It is released when the holder's write ends, or when the holding process (see "
            "`holder`) stops and its lock connection closes"
        )


def _masked(identity: str) -> str:
    """`phone:+77011234567` → `phone:+7******4567`, `email:ivan@x.kz` → `email:i***@x.kz`."""
    kind, _, value = identity.partition(":")
    if kind == "phone":
        return f"phone:{mask_phone(value)}"
    if kind == "email":
        return f"email:{mask_email(value)}"
    return mask_text(identity)


LOCK_SOURCES = web.AppKey("lock_sources", list[LockSource])
