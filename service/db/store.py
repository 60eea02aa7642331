"""The repository: every SQL statement the service runs, behind typed methods.

Queries live in `sql/queries.sql` as named queries (the repository's `sql/` ships inside the
package as `service.sql`, read with importlib.resources); driver errors are translated here
into `StoreUnavailable`, so callers never see asyncpg.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any, NamedTuple, TypeAlias, TypeVar

import asyncpg
import orjson
from asyncpg.pool import PoolConnectionProxy

from service.db.token_cipher import TokenCipher, is_sealed, seal, unseal
from service.errors import StoreConflict, StoreRefused, StoreUnavailable
from service.model import Lead

SQL: Traversable = files("service.sql")
Pool: TypeAlias = asyncpg.Pool  # for modules above the repositories, which never import asyncpg
# a connection of our own or one lent by the pool: every repository method takes either
Connection: TypeAlias = "asyncpg.Connection | PoolConnectionProxy"
T = TypeVar("T")

# Errors that mean "the database is not there right now", as opposed to a bug in our SQL.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.ConnectionFailureError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)
# ... and those, or a statement the server refused: for paths whose only answer is "not now"
FAILURES: tuple[type[BaseException], ...] = (*UNAVAILABLE, asyncpg.PostgresError)


POOLER_HINT = (
    "a prepared statement is gone between transactions: DATABASE_URL seems to lead to a "
    "connection pooler in transaction mode; set DATABASE_DIRECT_URL (docs/operations.md, "
    "Managed PostgreSQL behind a pooler)"
)


def no_nul(text: str) -> str:
    """PostgreSQL text cannot hold NUL: show it as the two characters `\\0`."""
    return text.replace("\x00", "\\0")


def translated(exc: BaseException) -> BaseException:
    """The one place a driver error becomes ours: unreachable → StoreUnavailable, a lost
    deadlock or serialization conflict → StoreConflict, any other refusal → StoreRefused.
    Anything else (ours, cancellation) is returned as it is."""
    name = exc.__class__.__name__
    if isinstance(exc, UNAVAILABLE):
        return StoreUnavailable(f"database unavailable: {name}")
    if isinstance(exc, asyncpg.exceptions.TransactionRollbackError):
        return StoreConflict(f"transaction rolled back: {name}")
    if isinstance(exc, asyncpg.exceptions.InvalidSQLStatementNameError):
        # a statement prepared in one transaction, gone in the next: what a transaction pooler
        # does to the statement cache when start-up could not tell it was one
        return StoreRefused(name, f"{name}: {POOLER_HINT}: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return StoreRefused(name, f"{name}: {exc}")
    return exc


async def run_on(pool: asyncpg.Pool, fn: Callable[[Connection], Awaitable[T]]) -> T:
    """Run `fn` on a pooled connection, driver errors `translated`. Every repository (store,
    admin, events, cluster) goes through this one boundary."""
    try:
        async with pool.acquire() as conn:
            return await fn(conn)
    except FAILURES as exc:
        raise translated(exc) from exc


async def read_on(pool: asyncpg.Pool, fn: Callable[[Connection], Awaitable[T]]) -> T:
    """`run_on` for reads whose only answer to any failure is "not now" (probes, metrics, the
    admin API): a refused statement or a conflict is StoreUnavailable too."""
    try:
        return await run_on(pool, fn)
    except (StoreConflict, StoreRefused) as exc:
        raise StoreUnavailable(f"database error: {exc}") from exc


@cache
def load_queries(filename: str = "queries.sql") -> dict[str, str]:
    """Split `sql/<filename>`, a file of `-- name: x` sections, into {name: sql}; read once."""
    queries: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    text = SQL.joinpath(filename).read_text(encoding="utf-8")
    for line in [*text.splitlines(), "-- name: <end>"]:
        if line.startswith("-- name:"):
            if name:
                queries[name] = "\n".join(lines).strip()
            name, lines = line.split(":", 1)[1].strip(), []
        elif name and not line.startswith("--"):
            lines.append(line)
    return queries


def _text_only(value: Any) -> Any:
    """`value` with NUL and lone surrogates taken out of every string (text and jsonb refuse
    both; orjson refuses surrogates)."""
    if isinstance(value, str):
        return value.replace("\x00", "\\0").encode("utf-8", "replace").decode()
    if isinstance(value, dict):
        return {_text_only(k): _text_only(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_text_only(v) for v in value]
    return value


class RejectedBody(NamedTuple):
    """Bad input to keep as it came: the id is ours, so a spooled copy keeps it."""

    id: uuid.UUID
    endpoint: str
    content_type: str | None
    body: bytes
    errors: list[dict[str, str]]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "endpoint": self.endpoint,
            "content_type": self.content_type,
            "body": self.body.decode("latin-1"),  # any bytes, one character each
            "errors": self.errors,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RejectedBody:
        """From `to_json`, or a spool entry of an earlier version (no id: a new one)."""
        rid = data.get("id")
        errors = data.get("errors")
        return cls(
            id=uuid.UUID(rid) if isinstance(rid, str) else uuid.uuid4(),
            endpoint=str(data.get("endpoint")),
            content_type=data.get("content_type"),
            body=str(data.get("body", "")).encode("latin-1"),
            errors=errors if isinstance(errors, list) else [],
        )


class Pending(NamedTuple):
    """A submission ready to be stored: the id is ours, so a spooled copy keeps it."""

    id: uuid.UUID
    idem_key: str
    lead: Lead
    received_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "idem_key": self.idem_key,
            "form": self.lead.form,
            "lead": self.lead.to_json(),
            "identities": self.lead.identities(),
            "received_at": self.received_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Pending:
        return cls(
            id=uuid.UUID(data["id"]),
            idem_key=data["idem_key"],
            lead=Lead.from_json(data["lead"]),
            received_at=dt.datetime.fromisoformat(data["received_at"]),
        )


class SpamEntry(NamedTuple):
    """A submission a form's spam controls caught, ready to be stored (or spooled)."""

    id: uuid.UUID
    content_key: str  # repeats of the same content are kept once
    idem_key: str  # the key a release stores it under
    reason: str
    client: str | None
    lead: Lead
    received_at: dt.datetime

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "content_key": self.content_key,
            "idem_key": self.idem_key,
            "reason": self.reason,
            "client": self.client,
            "lead": self.lead.to_json(),
            "received_at": self.received_at.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SpamEntry:
        return cls(
            id=uuid.UUID(data["id"]),
            content_key=data["content_key"],
            idem_key=data["idem_key"],
            reason=data["reason"],
            client=data.get("client"),
            lead=Lead.from_json(data["lead"]),
            received_at=dt.datetime.fromisoformat(data["received_at"]),
        )


class Accepted(NamedTuple):
    """What the database made of one submission (a tuple: one is made per request)."""

    idem_key: str
    id: uuid.UUID
    duplicate: bool


@dataclass(frozen=True)
class Job:
    """A claimed delivery job, with what the worker needs to deliver it."""

    id: int
    person_id: int
    submission_id: uuid.UUID
    attempts: int
    contact_id: int | None
    lead_id: int | None
    lead: Lead


@dataclass(frozen=True)
class DeadJob:
    id: int
    submission_id: uuid.UUID
    form: str
    attempts: int
    last_error: str | None
    updated_at: dt.datetime
    discarded: bool = False  # an operator decided not to deliver it (admin "discard")


@dataclass(frozen=True)
class QueueCounts:
    """Jobs by state; `dead` leaves out the dead letters an operator discarded."""

    pending: int = 0
    running: int = 0
    done: int = 0
    dead: int = 0
    discarded: int = 0
    due: int = 0
    oldest_due_age_s: float | None = None


@dataclass(frozen=True)
class StoredTokens:
    access_token: str
    refresh_token: str
    expires_at: float


class Store:
    """Typed access to the database; takes the pool but does not own its lifecycle."""

    def __init__(self, pool: asyncpg.Pool, *, token_cipher: TokenCipher | None = None) -> None:
        self.pool = pool
        self.q = load_queries()
        self.token_cipher = token_cipher  # OAuth tokens encrypted at rest when one is given

    async def _run(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        return await run_on(self.pool, fn)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Connection]:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                yield conn
        except FAILURES as exc:
            raise translated(exc) from exc

    async def ping(self) -> None:
        await self._run(lambda c: c.fetchval("SELECT 1"))

    # --- intake -------------------------------------------------------------------------

    async def ingest(self, items: Sequence[Pending]) -> list[Accepted]:
        """Store submissions and their jobs in one transaction; repeats get the original id."""
        payload = orjson.dumps([p.to_json() for p in items]).decode()
        rows = await self._run(lambda c: c.fetch(self.q["ingest"], payload))
        return [Accepted(*r) for r in rows]  # (idem_key, submission_id, duplicate)

    async def save_rejected(
        self, endpoint: str, content_type: str | None, body: bytes, errors: list[dict[str, str]]
    ) -> uuid.UUID:
        """Keep a refused request as it came; the body is bytea, so it is kept byte for byte."""
        rid = uuid.uuid4()
        # text and jsonb cannot hold NUL; the raw body (bytea) keeps whatever was really sent
        errs = orjson.dumps(errors).decode().replace("\\u0000", "\\\\0")
        await self._run(
            lambda c: c.execute(
                self.q["save_rejected"],
                rid,
                no_nul(endpoint),
                no_nul(content_type) if content_type is not None else None,
                body,
                errs,
            )
        )
        return rid

    async def save_spam(self, entry: SpamEntry) -> uuid.UUID:
        """Keep a caught submission (never delivered); a repeat of its content keeps the first."""
        lead = orjson.dumps(entry.lead.to_json()).decode()
        found: uuid.UUID = await self._run(
            lambda c: c.fetchval(
                self.q["save_spam"],
                entry.id,
                entry.content_key,
                entry.idem_key,
                entry.lead.form,
                entry.reason,
                entry.client,
                lead,
                entry.lead.identities(),
                entry.received_at,
            )
        )
        return found

    async def submission_lead(self, sid: uuid.UUID) -> Lead | None:
        """The lead stored under submission `sid` (None when there is none)."""
        raw = await self._run(lambda c: c.fetchval(self.q["submission_lead"], sid))
        return None if raw is None else Lead.from_json(orjson.loads(raw))

    async def save_rejected_batch(self, items: Sequence[RejectedBody]) -> list[uuid.UUID]:
        """Keep refused requests as they came (bytea: byte for byte), in one statement; a repeat
        of an id already kept is skipped. Returns the ids, in order."""
        # text and jsonb cannot hold NUL; the raw body (bytea) keeps whatever was really sent
        args = (
            [r.id for r in items],
            [no_nul(r.endpoint) for r in items],
            [no_nul(r.content_type) if r.content_type is not None else None for r in items],
            [r.body for r in items],
            [orjson.dumps(_text_only(r.errors)).decode() for r in items],
        )
        await self._run(lambda c: c.execute(self.q["save_rejected_batch"], *args))
        return [r.id for r in items]

    async def trim_rejected(self, max_rows: int, max_bytes: int) -> int:
        """Delete the oldest rejected rows past `max_rows` rows or `max_bytes` body bytes."""
        status: str = await self._run(
            lambda c: c.execute(self.q["trim_rejected"], max_rows, max_bytes)
        )
        return int(status.split()[-1])

    # --- delivery -----------------------------------------------------------------------

    async def reap_expired(self) -> int:
        status: str = await self._run(lambda c: c.execute(self.q["reap_expired"]))
        return int(status.split()[-1])

    async def claim(self, owner: str, people: int, lease_s: float) -> list[Job]:
        rows = await self._run(lambda c: c.fetch(self.q["claim"], owner, people, lease_s))
        jobs = [
            Job(
                id=r["id"],
                person_id=r["person_id"],
                submission_id=r["submission_id"],
                attempts=r["attempts"],
                contact_id=r["crm_contact_id"],
                lead_id=r["crm_lead_id"],
                lead=Lead.from_json(orjson.loads(r["lead"])),
            )
            for r in rows
        ]
        return sorted(jobs, key=lambda j: j.id)

    async def heartbeat(
        self, owner: str, people: list[int], jobs: list[int], lease_s: float
    ) -> None:
        async def beat(c: Connection) -> None:
            await c.execute(self.q["heartbeat_people"], owner, people, lease_s)
            await c.execute(self.q["heartbeat_jobs"], owner, jobs, lease_s)

        await self._run(beat)

    async def release_people(self, owner: str, people: list[int]) -> None:
        await self._run(lambda c: c.execute(self.q["release_people"], owner, people))

    async def job_done(
        self, job: Job, owner: str, contact_id: int | None, lead_id: int | None
    ) -> bool:
        """Mark the job delivered and remember the CRM link, in one transaction."""
        async with self.transaction() as c:
            sid = await c.fetchval(self.q["job_done"], job.id, owner)
            if sid is None:
                return False  # our lease was lost; whoever holds it now finishes the job
            await c.execute(self.q["submission_delivered"], sid, contact_id, lead_id)
            await c.execute(self.q["person_link"], job.person_id, contact_id, lead_id)
            return True

    async def job_retry(
        self, job: Job, owner: str, *, counted: bool, delay_s: float, error: str
    ) -> None:
        await self._run(
            lambda c: c.execute(self.q["job_retry"], job.id, owner, counted, delay_s, error[:2000])
        )

    async def job_dead(self, job: Job, owner: str, error: str) -> bool:
        """Mark the job dead (False: our lease was lost, whoever holds it now decides)."""
        async with self.transaction() as c:
            sid = await c.fetchval(self.q["job_dead"], job.id, owner, error[:2000])
            if sid is None:
                return False
            await c.execute(self.q["submission_dead"], sid)
            return True

    async def replay(self, job_ids: list[int] | None = None) -> int:
        async with self.transaction() as c:
            n: int = await c.fetchval(self.q["replay"], job_ids)
            if n:
                await c.execute(self.q["notify_jobs"])
            return n

    async def next_due_in(self) -> float | None:
        wait: dt.timedelta | None = await self._run(lambda c: c.fetchval(self.q["next_due"]))
        return None if wait is None else max(0.0, wait.total_seconds())

    async def queue_counts(self) -> QueueCounts:
        async def read(c: Connection) -> QueueCounts:
            by_state = {r["state"]: r["n"] for r in await c.fetch(self.q["queue_counts"])}
            due = await c.fetchrow(self.q["queue_due"])
            assert due is not None, "an aggregate always answers one row"
            oldest = due["oldest"]
            age = (dt.datetime.now(dt.UTC) - oldest).total_seconds() if oldest else None
            return QueueCounts(**by_state, due=due["n"], oldest_due_age_s=age)

        return await self._run(read)

    async def dead_jobs(self, limit: int = 100) -> list[DeadJob]:
        rows = await self._run(lambda c: c.fetch(self.q["dead_jobs"], limit))
        return [DeadJob(**dict(r)) for r in rows]

    # --- OAuth tokens -------------------------------------------------------------------

    async def seed_tokens(self, crm: str, tokens: StoredTokens) -> None:
        """Store the pair unless one is stored; with a cipher, a pair stored in plain text before
        it is written again sealed."""
        async with self.transaction() as c:
            await c.execute(self.q["token_seed"], crm, *self._sealed(tokens))
            row = await c.fetchrow(self.q["token_for_update"], crm)
            assert row is not None, "seeded just above"
            stored = self._opened(row)  # raises TokenKeyError when the key cannot open it
            if self.token_cipher is not None and not is_sealed(row["refresh_token"]):
                await c.execute(self.q["token_save"], crm, *self._sealed(stored))

    def _sealed(self, t: StoredTokens) -> tuple[str, str, float]:
        cipher = self.token_cipher
        return seal(cipher, t.access_token), seal(cipher, t.refresh_token), t.expires_at

    def _opened(self, row: Any) -> StoredTokens:
        cipher = self.token_cipher
        return StoredTokens(
            unseal(cipher, row["access_token"]),
            unseal(cipher, row["refresh_token"]),
            row["expires_at"],
        )

    async def tokens(self, crm: str) -> StoredTokens | None:
        row = await self._run(lambda c: c.fetchrow(self.q["token_get"], crm))
        return None if row is None else self._opened(row)

    async def refresh_tokens(
        self,
        crm: str,
        stale_access_token: str,
        exchange: Callable[[str], Awaitable[StoredTokens]],
    ) -> StoredTokens:
        """Refresh once across every process: the row lock serialises refreshers, and whoever
        finds the token already changed uses the new one instead of spending the refresh token.
        The new pair is committed before anyone uses it (the old refresh token is dead)."""
        async with self.transaction() as c:
            row = await c.fetchrow(self.q["token_for_update"], crm)
            if row is None:
                raise StoreUnavailable(f"no OAuth tokens stored for {crm}")
            stored = self._opened(row)
            if stored.access_token != stale_access_token:
                return stored
            fresh = await exchange(stored.refresh_token)
            await c.execute(self.q["token_save"], crm, *self._sealed(fresh))
            return fresh
