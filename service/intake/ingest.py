"""Accepting a submission durably: idempotency window → per-key locks → group commit → answer.

Concurrent submissions are written together in one transaction (group commit), which is how we
do more per request than a plain one-INSERT handler at the same speed. When the database is
unreachable or slow, the submission goes to the fsync'd spool and the sender still gets 200.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import uuid
from typing import Any, NamedTuple

import asyncpg

from service.db.store import Accepted, Pending, Store
from service.errors import BadInput, FieldError, StoreUnavailable
from service.ids import new_id
from service.intake.keys import IdempotencyWindow, submission_key
from service.intake.locks import KeyLocks
from service.intake.shared_keys import NoSharedKeys, SharedKeys
from service.intake.spool import Spool
from service.model import Lead

log = logging.getLogger(__name__)


class Receipt(NamedTuple):
    """The answer to one accepted submission (a tuple: one is made per request)."""

    id: uuid.UUID
    duplicate: bool
    spooled: bool = False


class GroupCommit:
    """Writes whatever submissions are waiting in one transaction, then the next lot."""

    def __init__(self, store: Store, max_batch: int = 500) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: list[tuple[Pending, asyncio.Future[Accepted]]] = []
        self._wake = asyncio.Event()
        self.batches = 0
        # every waiter's (deadline, future), and one timer for the earliest deadline
        self._waiting: list[tuple[float, asyncio.Future[Accepted]]] = []
        self._timer: asyncio.TimerHandle | None = None

    async def write(self, item: Pending, timeout_s: float) -> Accepted:
        """The item's result, or TimeoutError after `timeout_s` (the item is written anyway)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Accepted] = loop.create_future()
        self._queue.append((item, fut))
        self._wake.set()
        # One timer for all waiters, not wait_for(shield(fut)) per request (a timer, a waiter
        # future and callbacks each: 50-80 µs of a ~1.5 ms request). Giving up waiting never
        # pulls the item out of a transaction in flight: its future fails, the writer skips it.
        deadline = loop.time() + timeout_s
        self._waiting.append((deadline, fut))
        if self._timer is None or deadline < self._timer.when():
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(deadline, self._expire)
        return await fut

    def _expire(self) -> None:
        """Fail the waiters past their deadline with TimeoutError; re-arm for the next one."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        for deadline, fut in self._waiting:
            if deadline <= now and not fut.done():
                fut.set_exception(TimeoutError())
        self._waiting = [(d, f) for d, f in self._waiting if not f.done()]
        self._timer = None
        if self._waiting:
            self._timer = loop.call_at(min(d for d, _ in self._waiting), self._expire)

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                await self._commit(batch)

    async def _commit(
        self, batch: list[tuple[Pending, asyncio.Future[Accepted]]], retries: int = 3
    ) -> None:
        self.batches += 1
        try:
            results = await self.store.ingest([p for p, _ in batch])
        except asyncpg.PostgresError as exc:
            # A deadlock or serialization failure (SQLSTATE class 40) against another process's
            # batch rolled the whole transaction back: transient, not bad input. Write it again
            # (bounded) instead of answering a valid lead {"ok": false, "cannot be stored"}.
            if isinstance(exc, asyncpg.exceptions.TransactionRollbackError) and retries > 0:
                await self._commit(batch, retries - 1)
                return
            # not an outage but one bad item (say, a value Postgres will not store): write them
            # one by one so only that item fails
            if len(batch) > 1:
                for one in batch:
                    await self._commit([one])
                return
            _fail(
                batch, BadInput([FieldError("body", f"cannot be stored: {exc.__class__.__name__}")])
            )
            return
        except Exception as exc:
            _fail(batch, exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc)))
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)


def _fail(batch: list[tuple[Pending, asyncio.Future[Accepted]]], exc: Exception) -> None:
    for _, fut in batch:
        if not fut.done():
            fut.set_exception(exc)
            fut.exception()  # the waiter may have timed out already: mark it retrieved


class Intake:
    """The intake path shared by forms and, later, webhooks."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        *,
        window: IdempotencyWindow,
        locks: KeyLocks | None = None,
        write_timeout_s: float = 2.0,
        shared_keys: SharedKeys | None = None,
    ) -> None:
        self.store = store
        self.spool = spool
        self.window = window
        self.locks = locks or KeyLocks()
        # across processes (cluster.processes): Redis keys; the person lock is the database's own,
        # taken inside the ingest transaction (intake.locks)
        self.shared_keys = shared_keys or NoSharedKeys()
        self.writer = GroupCommit(store)
        self.write_timeout_s = write_timeout_s
        self._db_down_until = 0.0
        self.counts: dict[str, int] = {"accepted": 0, "duplicate": 0, "spooled": 0}

    async def submit(self, lead: Lead, header_key: str | None) -> Receipt:
        """Store the submission (or find its original) and say so; raises BadInput only."""
        key = submission_key(lead.form, lead, header_key)
        if (sid := self.window.get(key)) is not None:
            return self._count(Receipt(sid, duplicate=True))
        async with self.locks.hold([f"idem:{key}", *lead.identities()]):
            if (sid := self.window.get(key)) is not None:
                return self._count(Receipt(sid, duplicate=True))
            # another process may have taken it: Redis knows sooner than the database would
            if self.shared_keys.enabled and (sid := await self.shared_keys.claim(key)) is not None:
                self.window.put(key, sid)
                return self._count(Receipt(sid, duplicate=True))
            pending = Pending(new_id(), key, lead, dt.datetime.now(dt.UTC))
            receipt = await self._store(pending)
            self.window.put(key, receipt.id)
            self.shared_keys.remember(key, receipt.id)
            return self._count(receipt)

    async def _store(self, pending: Pending) -> Receipt:
        if time.monotonic() >= self._db_down_until:
            try:
                accepted = await self.writer.write(pending, self.write_timeout_s)
                return Receipt(accepted.id, accepted.duplicate)
            except (StoreUnavailable, TimeoutError) as exc:
                # skip the database for a moment instead of making every sender wait for it
                self._db_down_until = time.monotonic() + 1.0
                log.warning(
                    "database unavailable, spooling", extra={"action": "spool", "error": str(exc)}
                )
        await self.spool.append({"type": "submission", **pending.to_json()})
        return Receipt(pending.id, duplicate=False, spooled=True)

    def _count(self, receipt: Receipt) -> Receipt:
        kind = "spooled" if receipt.spooled else "duplicate" if receipt.duplicate else "accepted"
        self.counts[kind] += 1
        return receipt

    async def drain_spooled(self, entries: list[dict[str, Any]]) -> None:
        """Spool handler: re-ingest spooled submissions (repeats are dropped by their keys)."""
        items = [Pending.from_json(e) for e in entries]
        await self.store.ingest(items)
        self._db_down_until = 0.0
