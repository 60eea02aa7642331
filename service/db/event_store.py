"""The repository for webhook events, their outbox and the CRM lead records.

SQL lives in `sql/events.sql` (named queries) and `relay_events()` in
`sql/migrations/002_webhooks.sql`; driver errors become `StoreUnavailable` here, so handlers and
the forwarder never see asyncpg.
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import orjson

from service.db.store import Connection, load_queries, run_on
from service.model import Event, LeadChange, storable

T = TypeVar("T")


@dataclass(frozen=True)
class PendingDelivery:
    """One accepted webhook request, ready to be stored: its ids are ours, so a spooled copy
    keeps them. `rejected` is set for a body we could not read (kept raw in `rejected`)."""

    id: uuid.UUID
    source: str
    content_type: str | None
    raw: bytes
    received_at: dt.datetime
    events: tuple[tuple[uuid.UUID, Event], ...] = ()
    headers: dict[str, str] = field(default_factory=dict)
    rejected: list[dict[str, str]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "source": self.source,
            "content_type": self.content_type,
            "headers": self.headers,
            "raw": base64.b64encode(self.raw).decode("ascii"),
            "received_at": self.received_at.isoformat(),
            "rejected": None
            if self.rejected is None
            else {"endpoint": f"webhooks/{self.source}", "errors": self.rejected},
            # what a sender put in an event, without what text and jsonb refuse (NUL): stored
            # as events, cleaned, rather than refused; the raw body keeps every byte
            "events": [
                {
                    "id": str(eid),
                    "key": storable(e.key),
                    "kind": storable(e.kind),
                    "entity_id": storable(e.entity_id),
                    "payload": storable(e.payload),
                }
                for eid, e in self.events
            ],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PendingDelivery:
        rejected = data.get("rejected")
        return cls(
            id=uuid.UUID(data["id"]),
            source=str(data["source"]),
            content_type=data.get("content_type"),
            raw=base64.b64decode(data["raw"]),
            received_at=dt.datetime.fromisoformat(data["received_at"]),
            events=tuple(
                (uuid.UUID(e["id"]), Event(e["key"], e["kind"], e["entity_id"], e["payload"]))
                for e in data.get("events", [])
            ),
            headers=dict(data.get("headers") or {}),
            rejected=rejected["errors"] if isinstance(rejected, dict) else None,
        )

    def as_rejected(self, why: str) -> PendingDelivery:
        """The same request kept raw, for a body the database would not store as events."""
        errors = [{"field": "body", "message": why}]
        return PendingDelivery(
            self.id, self.source, self.content_type, self.raw, self.received_at, (), {}, errors
        )


@dataclass(frozen=True)
class Stored:
    """What the database made of one event: its id (the original's for a repeat)."""

    event_key: str | None
    event_id: uuid.UUID | None
    duplicate: bool


@dataclass(frozen=True)
class ForwardJob:
    """A claimed outbox job with the event it is about."""

    id: int
    kind: str  # process | forward
    destination: str
    attempts: int
    event_id: uuid.UUID
    source: str
    event_key: str
    event_kind: str
    entity_id: str | None
    payload: dict[str, Any]
    received_at: dt.datetime


@dataclass(frozen=True)
class SubmittedLeadState:
    """A submission of ours and where its CRM lead stands now (for the operator)."""

    submission_id: uuid.UUID
    form: str
    lead_id: int
    pipeline_id: str | None
    status_id: str | None
    updated_at: dt.datetime


@dataclass(frozen=True)
class Processed:
    """The outcome of a process job, written in one transaction with the job's completion."""

    outcome: str  # applied | echo | forwarded-only
    payload: dict[str, Any] | None = None  # the event's payload, when enrichment changed it
    state: LeadChange | None = None
    destinations: tuple[str, ...] = ()


class EventStore:
    """Typed access to the webhook tables; takes the pool but does not own its lifecycle."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.q = load_queries("events.sql")

    async def _run(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        return await run_on(self.pool, fn)

    async def _in_transaction(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        async def tx(conn: Connection) -> T:
            async with conn.transaction():
                return await fn(conn)

        return await self._run(tx)

    # --- intake -------------------------------------------------------------------------

    async def ingest(self, items: Sequence[PendingDelivery]) -> list[list[Stored]]:
        """Store deliveries, their events and process jobs in one transaction; one list of
        results per delivery, in order."""
        payload = orjson.dumps([p.to_json() for p in items]).decode()
        rows = await self._run(lambda c: c.fetch(self.q["events_ingest"], payload))
        by_delivery: dict[uuid.UUID, list[Stored]] = {p.id: [] for p in items}
        for r in rows:
            by_delivery[r["delivery_id"]].append(
                Stored(r["event_key"], r["event_id"], r["duplicate"])
            )
        return [by_delivery[p.id] for p in items]

    # --- the outbox ---------------------------------------------------------------------

    async def reap_expired(self) -> None:
        await self._run(lambda c: c.execute(self.q["forward_reap"]))

    async def claim(self, owner: str, limit: int, lease_s: float) -> list[ForwardJob]:
        rows = await self._run(lambda c: c.fetch(self.q["forward_claim"], owner, limit, lease_s))
        jobs = [
            ForwardJob(
                id=r["id"],
                kind=r["kind"],
                destination=r["destination"],
                attempts=r["attempts"],
                event_id=r["event_id"],
                source=r["source"],
                event_key=r["event_key"],
                event_kind=r["event_kind"],
                entity_id=r["entity_id"],
                payload=orjson.loads(r["payload"]),
                received_at=r["received_at"],
            )
            for r in rows
        ]
        return sorted(jobs, key=lambda j: j.id)

    async def heartbeat(self, owner: str, job_ids: list[int], lease_s: float) -> None:
        await self._run(lambda c: c.execute(self.q["forward_heartbeat"], owner, job_ids, lease_s))

    async def forwarded(self, job: ForwardJob, owner: str) -> bool:
        """Mark a forward job done; False when our lease was lost meanwhile."""
        done = await self._run(lambda c: c.fetchval(self.q["forward_done"], job.id, owner))
        return done is not None

    async def processed(self, job: ForwardJob, owner: str, result: Processed) -> bool:
        """Finish a process job: its outcome, the lead record and the forward jobs, atomically."""

        async def finish(c: Connection) -> bool:
            if await c.fetchval(self.q["forward_done"], job.id, owner) is None:
                return False  # our lease was lost; whoever holds it now finishes the job
            payload = None if result.payload is None else orjson.dumps(result.payload).decode()
            await c.execute(self.q["event_processed"], job.event_id, result.outcome, payload)
            if (s := result.state) is not None:
                await c.execute(
                    self.q["lead_state_upsert"],
                    s.crm,
                    s.lead_id,
                    s.pipeline_id,
                    s.status_id,
                    s.changed_at,
                    job.event_id,
                )
            if result.destinations:
                await c.execute(self.q["forward_fanout"], job.event_id, list(result.destinations))
                await c.execute(self.q["notify_events"], "fanout")
            return True

        return await self._in_transaction(finish)

    async def retry(
        self, job: ForwardJob, owner: str, *, counted: bool, delay_s: float, error: str
    ) -> None:
        await self._run(
            lambda c: c.execute(
                self.q["forward_retry"], job.id, owner, counted, delay_s, error[:2000]
            )
        )

    async def dead(self, job: ForwardJob, owner: str, error: str) -> None:
        await self._run(lambda c: c.execute(self.q["forward_dead"], job.id, owner, error[:2000]))

    async def replay(self, job_ids: list[int] | None = None) -> int:
        """Make dead forward jobs (all, or the given ids) due again with a fresh budget."""

        async def revive(c: Connection) -> int:
            n: int = await c.fetchval(self.q["forward_replay"], job_ids)
            if n:
                await c.execute(self.q["notify_events"], "replay")
            return n

        return await self._in_transaction(revive)

    async def next_due_in(self) -> float | None:
        wait: dt.timedelta | None = await self._run(
            lambda c: c.fetchval(self.q["forward_next_due"])
        )
        return None if wait is None else max(0.0, wait.total_seconds())

    async def counts(self) -> dict[str, dict[str, int]]:
        """{kind: {state: n}} over the outbox."""
        rows = await self._run(lambda c: c.fetch(self.q["forward_counts"]))
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["kind"], {})[r["state"]] = r["n"]
        return out

    async def dead_jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = await self._run(lambda c: c.fetch(self.q["forward_dead_list"], limit))
        return [dict(r) for r in rows]

    # --- echoes and lead records ---------------------------------------------------------

    async def our_writes(
        self, lead_id: int, around: dt.datetime, window_s: float
    ) -> list[tuple[str, dt.datetime]]:
        """(form, delivered_at) of our deliveries to `lead_id` within `window_s` of `around`."""
        rows = await self._run(
            lambda c: c.fetch(self.q["our_writes"], lead_id, around, float(window_s))
        )
        return [(r["form"], r["delivered_at"]) for r in rows]

    async def deliveries_in_flight(self) -> bool:
        found: bool = await self._run(lambda c: c.fetchval(self.q["deliveries_in_flight"]))
        return found

    async def submitted_lead_states(self, crm: str, limit: int = 100) -> list[SubmittedLeadState]:
        """Where each lead we delivered stands in the CRM, newest change first."""
        rows = await self._run(lambda c: c.fetch(self.q["submitted_lead_states"], crm, limit))
        return [SubmittedLeadState(**dict(r)) for r in rows]
