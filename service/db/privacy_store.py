"""Spam review and release, retention and erasure: the personal data this service keeps.

Queries live in `sql/privacy.sql`. A release writes the spam row into `submissions` (with its
delivery job) through `relay_ingest`, in the transaction that marks it released: it is delivered
once, however often it is released. Retention deletes in short batches and never touches work
still owed; erasure deletes one person's rows here (not in the CRM) and counts them per table.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
import phonenumbers

from service.db.admin_store import Row, json_ready
from service.db.store import Connection, load_queries, run_on
from service.errors import StoreConflict

T = TypeVar("T")
PURGE_BATCH = 1000  # rows per statement: short transactions, never one long one
DAY_S = 86400.0
FORGET_TRIES = 3


@dataclass(frozen=True)
class SpamQuery:
    """Which spam rows to list; `None` means "any"."""

    form: str | None = None
    reason: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    released: bool | None = None
    limit: int = 50


@dataclass(frozen=True)
class Release:
    """What a release did: `submission_id` is the lead's now (`duplicate`: its key was already
    a submission's, so nothing new is delivered); `already`: it was released before."""

    submission_id: uuid.UUID
    duplicate: bool = False
    already: bool = False


@dataclass(frozen=True)
class Person:
    """Whom to erase: identities as intake stores them ("phone:+7…", "email:…"). Erasure adds
    every other identity the same person has here, and finds raw bodies and payloads by text:
    a phone's national digits among a body's digits (however it was typed), an email in lower
    case or percent-encoded."""

    identities: list[str]


def _national_digits(e164: str) -> str:
    try:
        return str(phonenumbers.parse(e164).national_number)
    except phonenumbers.NumberParseException:
        return e164.lstrip("+")


def _texts(identities: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(phones' national digits, emails, emails percent-encoded) of `identities`."""
    phones = [_national_digits(i[6:]) for i in identities if i.startswith("phone:")]
    emails = [i[6:] for i in identities if i.startswith("email:")]
    return phones, emails, [e.replace("@", "%40") for e in emails]


class PrivacyStore:
    """Typed access for spam review, retention and erasure; takes the pool, does not own it."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self.q = load_queries("privacy.sql")

    async def _run(self, fn: Callable[[Connection], Awaitable[T]]) -> T:
        return await run_on(self.pool, fn)

    async def spam(self, query: SpamQuery) -> list[Row]:
        q = query
        args = (q.form, q.reason, q.since, q.until, q.released, q.limit)
        records = await self._run(lambda c: c.fetch(self.q["list_spam"], *args))
        rows = [json_ready(dict(r.items())) for r in records]
        for row in rows:
            row["lead"] = orjson.loads(row["lead"])
        return rows

    async def release(self, spam_id: uuid.UUID) -> Release | None:
        """Make a spam row a submission (delivered once); None when there is no such row."""

        async def run(c: Connection) -> Release | None:
            async with c.transaction():
                row = await c.fetchrow(self.q["spam_for_release"], spam_id)
                if row is None:
                    return None
                if row["released_submission_id"] is not None:
                    return Release(row["released_submission_id"], already=True)
                item = {
                    "id": str(row["id"]),
                    "idem_key": row["idem_key"],
                    "form": row["form"],
                    "lead": orjson.loads(row["lead"]),
                    "identities": list(row["identities"]),
                    "received_at": row["received_at"].isoformat(),
                }
                stored = await c.fetchrow(self.q["ingest"], orjson.dumps([item]).decode())
                assert stored is not None, "relay_ingest answers one row per item"
                await c.execute(self.q["spam_released"], spam_id, stored["submission_id"])
                return Release(stored["submission_id"], duplicate=stored["duplicate"])

        return await self._run(run)

    async def purge(self, days: float, spam_days: float, spam_max_rows: int) -> dict[str, int]:
        """Delete what is older than `days` (0: keep) and spam past its own age or count; the
        rows deleted, per table."""
        counts: dict[str, int] = {}
        if days > 0:
            age = days * DAY_S
            for name, key in (
                ("purge_submissions", "submissions"),
                ("purge_rejected", "rejected"),
                ("purge_events", "webhook_events"),
                ("purge_deliveries", "webhook_deliveries"),
            ):
                counts[key] = await self._purge(name, age)
            spam_days = min(spam_days, days)
        counts["spam"] = await self._purge("purge_spam_old", spam_days * DAY_S)
        counts["spam"] += await self._purge("purge_spam_over", spam_max_rows)
        return counts

    async def _purge(self, name: str, arg: float) -> int:
        total = 0
        while True:
            n = int(await self._run(lambda c: c.fetchval(self.q[name], arg, PURGE_BATCH)))
            total += n
            if n < PURGE_BATCH:
                return total

    async def forget(self, person: Person) -> dict[str, int]:
        """Erase one person's data here, in one transaction; the rows deleted, per table."""

        async def run(c: Connection) -> dict[str, int]:
            async with c.transaction():
                await c.fetchval(self.q["forget_lock"], person.identities)
                people = await c.fetchval(self.q["forget_people"], person.identities)
                known = await c.fetchval(self.q["forget_identities_of"], people)
                ids = sorted({*person.identities, *known})
                await c.fetchval(self.q["forget_lock"], ids)
                counts = await self._forget_submissions(c, people, ids)
                counts["spam"] = _n(await c.execute(self.q["forget_spam"], ids))
                texts = _texts(ids)
                counts["rejected"] = _n(await c.execute(self.q["forget_rejected"], *texts))
                events = await c.fetchval(self.q["forget_events"], *texts)
                gone = await c.fetchrow(self.q["forget_event_rows"], events)
                assert gone is not None, "an aggregate always answers one row"
                counts["webhook_events"] = int(gone["events"])
                counts["webhook_deliveries"] = int(gone["deliveries"])
                contacts = [i.split(":", 1)[1] for i in ids]
                counts["contact_index"] = _n(
                    await c.execute(self.q["forget_contact_index"], contacts)
                )
                return counts

        for _ in range(FORGET_TRIES - 1):
            # a deadlock with an ingest holding the person's other identity: try again
            with contextlib.suppress(StoreConflict):
                return await self._run(run)
        return await self._run(run)

    async def _forget_submissions(
        self, c: Connection, people: list[int], ids: list[str]
    ) -> dict[str, int]:
        subs = await c.fetchval(self.q["forget_submissions"], people)
        await c.execute(self.q["forget_discards"], subs)
        return {
            "jobs": _n(await c.execute(self.q["forget_jobs"], subs, people)),
            "submissions": _n(await c.execute(self.q["forget_delete_submissions"], subs)),
            "identities": _n(await c.execute(self.q["forget_identities"], people, ids)),
            "people": _n(await c.execute(self.q["forget_person_rows"], people)),
        }


def _n(status: str) -> int:
    """The row count of a command status such as "DELETE 3"."""
    return int(status.split()[-1])
