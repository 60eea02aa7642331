"""The `processes` table: one heartbeat row per crm-relay process (queries in `sql/cluster.sql`).

Every failure, an unreachable server or a refused statement, is `StoreUnavailable`: a heartbeat
that cannot be written is a missed beat, whatever the reason.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import asyncpg

from service.db.store import Connection, load_queries, read_on

QUERIES = load_queries("cluster.sql")


@dataclass(frozen=True)
class ProcessRow:
    """One process as the cluster saw it beat (orjson writes it as an object)."""

    name: str
    sends: bool
    mode: str
    started_at: dt.datetime
    beat_at: dt.datetime
    live: bool


class ProcessRows:
    """Heartbeats, departures and the listing of the cluster's processes."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def beat(
        self, name: str, sends: bool, mode: str, stale_s: float
    ) -> tuple[int, list[int]]:
        """Upsert our row, then read the live senders' row ids in joining order (two statements,
        two snapshots: of two processes joining at once, the later one always sees the
        earlier). Returns (our row id, the live senders' ids)."""

        async def both(conn: Connection) -> tuple[int, list[int]]:
            row_id: int = await conn.fetchval(QUERIES["beat"], name, sends, mode)
            ids = [r["id"] for r in await conn.fetch(QUERIES["live_senders"], stale_s)]
            return row_id, ids

        return await read_on(self.pool, both)

    async def leave(self, name: str, stale_in_s: float) -> None:
        """Let our row go stale in `stale_in_s`."""
        await read_on(self.pool, lambda c: c.execute(QUERIES["leave"], name, stale_in_s))

    async def forget(self, after_s: float) -> None:
        """Delete the rows of processes gone for longer than `after_s`."""
        await read_on(self.pool, lambda c: c.execute(QUERIES["forget"], after_s))

    async def listing(self, stale_s: float) -> list[ProcessRow]:
        """Every process that beat in the last day, with `live` by `stale_s`."""
        rows = await read_on(self.pool, lambda c: c.fetch(QUERIES["list"], stale_s))
        return [ProcessRow(**dict(r.items())) for r in rows]
