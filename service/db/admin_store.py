"""The operators' repository: lookups, dead-letter decisions, leases, history.

Queries live in `sql/admin.sql`; like `Store`, it takes the pool without owning it and turns
"the database is not there" into `StoreUnavailable`. Results are plain dicts of JSON-ready
values because they go straight out through the admin API.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

import asyncpg
import orjson
from aiohttp import web

from service.db.store import Connection, load_queries, run_on

T = TypeVar("T")
Row = dict[str, Any]

_QUERIES: dict[str, str] = {}


@dataclass(frozen=True)
class SubmissionQuery:
    """What to look submissions up by; `None` means "any"."""

    identities: list[str] | None = None
    form: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    state: str | None = None
    limit: int = 50


@dataclass(frozen=True)
class DeadFilter:
    """Which dead letters: by form, by text in the last error, by when they died."""

    form: str | None = None
    error: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def is_empty(self) -> bool:
        return not (self.form or self.error or self.since or self.until)


def _queries() -> dict[str, str]:
    if not _QUERIES:
        _QUERIES.update(load_queries("admin.sql"))
    return _QUERIES


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, Decimal):
        return float(value)
    return value


def json_ready(values: Mapping[str, Any]) -> Row:
    """A row or dataclass dict with values orjson can write (asyncpg's UUIDs, intervals…)."""
    return {k: _json_value(v) for k, v in values.items()}


JSON_COLUMNS = ("lead", "errors", "forwards")


def _row(record: asyncpg.Record) -> Row:
    out = json_ready(dict(record.items()))
    for key in JSON_COLUMNS:
        if isinstance(out.get(key), str):
            out[key] = orjson.loads(out[key])
    if isinstance(out.get("body_start"), bytes):  # a rejected body's start, as text
        out["body_start"] = out["body_start"].decode("utf-8", "replace")
    return out


class AdminStore:
    """Typed access for the admin API, the dashboard, metrics and alerts."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.q = _queries()

    async def _run(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        return await run_on(self.pool, fn)

    async def _rows(self, name: str, *args: Any) -> list[Row]:
        records = await self._run(lambda c: c.fetch(self.q[name], *args))
        return [_row(r) for r in records]

    async def find_submissions(self, query: SubmissionQuery) -> list[Row]:
        q = query
        return await self._rows(
            "find_submissions", q.identities, q.form, q.since, q.until, q.state, q.limit
        )

    async def jobs(self, state: str | None, limit: int) -> list[Row]:
        return await self._rows("list_jobs", state, limit)

    async def dead_letters(self, f: DeadFilter, limit: int) -> list[Row]:
        return await self._rows("dead_letters", f.form, f.error, f.since, f.until, limit)

    async def dead_letter_count(self) -> int:
        n: int = await self._run(lambda c: c.fetchval(self.q["dead_letter_count"]))
        return n

    async def claim_alert(self, condition: str, kind: str, interval_s: float, by: str) -> bool:
        """True when this process is the one to say `kind` of `condition` now: nobody in the
        cluster said it within `interval_s` (sql/migrations/008_alert_claims.sql)."""
        row = await self._run(
            lambda c: c.fetchval(self.q["claim_alert"], condition, kind, interval_s, by)
        )
        return row is not None

    async def replay_one(self, job_id: int) -> bool:
        """Replay one dead letter, discarded or not (replaying it is the operator's decision)."""
        return bool(await self._replay(job_id, DeadFilter(), undiscard=True))

    async def replay_matching(self, f: DeadFilter) -> list[int]:
        """Replay every undiscarded dead letter that matches; return the job ids."""
        return await self._replay(None, f, undiscard=False)

    async def _replay(self, job_id: int | None, f: DeadFilter, *, undiscard: bool) -> list[int]:
        async def run(c: Connection) -> list[int]:
            async with c.transaction():
                if undiscard:
                    await c.execute(self.q["undiscard"], job_id)
                rows = await c.fetch(self.q["replay"], job_id, f.form, f.error, f.since, f.until)
                if rows:
                    await c.execute(self.q["notify_jobs"])
                return [int(r["id"]) for r in rows]

        return await self._run(run)

    async def discard(self, job_id: int, note: str) -> bool:
        """Mark a dead letter discarded; False when there is no such dead job (or it already is)."""
        found = await self._run(lambda c: c.fetchval(self.q["discard"], job_id, note[:500]))
        return found is not None

    async def person_leases(self, limit: int = 200) -> list[Row]:
        return await self._rows("person_leases", limit)

    async def release_person(self, person_id: int) -> bool:
        found = await self._run(lambda c: c.fetchval(self.q["release_person"], person_id))
        return found is not None

    async def timeline(self, minutes: int) -> list[Row]:
        return await self._rows("timeline", minutes)

    async def rejected(self, limit: int) -> list[Row]:
        """Bad input kept, newest first, each with the first 300 bytes of its body."""
        return await self._rows("rejected", limit)

    async def webhook_events(self, limit: int) -> list[Row]:
        """Webhook events in, newest first, with the state of their process and forward jobs."""
        return await self._rows("webhook_events", limit)

    async def forwards(self, state: str | None, limit: int) -> list[Row]:
        """Forward jobs (events out), newest first."""
        return await self._rows("forwards", state, limit)

    async def form_counts(self, since: dt.datetime, limit: int) -> list[Row]:
        """Per form since `since`: received, delivered, pending, dead, and spam caught."""
        return await self._rows("form_counts", since, limit)


ADMIN_STORE = web.AppKey("admin_store", AdminStore)


@dataclass(frozen=True)
class Switch:
    """The cluster's delivery switch as stored (`delivery_control`, one row)."""

    paused: bool
    changed_at: dt.datetime | None
    changed_by: str


def _switch(row: asyncpg.Record | None) -> Switch | None:
    if row is None:
        return None
    return Switch(bool(row["paused"]), row["changed_at"], row["changed_by"])


async def read_switch(pool: asyncpg.Pool) -> Switch | None:
    """The delivery switch; StoreUnavailable when the database is not there."""
    return _switch(await run_on(pool, lambda c: c.fetchrow(_queries()["delivery_control_get"])))


async def set_switch(pool: asyncpg.Pool, paused: bool, by: str) -> Switch | None:
    """Flip the delivery switch; the statement NOTIFYs every process that follows it."""
    query = _queries()["delivery_control_set"]
    return _switch(await run_on(pool, lambda c: c.fetchrow(query, paused, by)))
