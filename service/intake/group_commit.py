"""One group commit for everything intake stores: form submissions and webhook deliveries.

An item is answered only once it is durable: committed to the database in a transaction shared
with whatever else was waiting, or, when the database is unreachable or slower than the
timeout, fsync'd to the local spool (drained into the database later; the items' own keys drop
the repeats). `GroupCommit` is generic in the item (`T`) and in what the database makes of it
(`R`); each intake gives it a write-batch coroutine and says what to do with an item the database
refuses alone. The rules, chosen for that promise (the two copies this replaced differed):

- Timeout: one per group commit (each intake knows how long its senders wait), enforced by one
  timer for all waiters rather than a `wait_for` per item (hot path). An item whose waiter gave
  up before its transaction began is not written: the spool holds its only copy, and a slow
  database is not handed the same work twice. One already in a transaction is written anyway
  (the keys make the spooled copy a repeat).
- Database unavailable (`StoreUnavailable`, timeout, anything that is not the database
  refusing the data): every waiter of the batch spools its item, and the database is skipped
  for `DB_DOWN_S` so later senders do not each wait for it.
- Deadlock or serialization failure (SQLSTATE class 40) against another process's batch:
  transient, so the batch is written again, at most `ROLLBACK_RETRIES` times; after that it is
  an outage (spooled, answered as stored), never bad input: the data itself was fine.
- Any other database error: not an outage but one item the database will not take (say, a
  value it cannot store). The batch is written again one item at a time, so the others are
  stored; for the one refused alone the intake's `unstorable` either gives a replacement to
  write once in its place (webhooks: the body kept raw) or raises what its sender is answered
  (forms: `BadInput`).
- Batch size: per intake (`max_batch`), since it bounds one transaction's payload, and a
  webhook delivery carries its raw body, a form submission only its fields.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from service.errors import StoreConflict, StoreRefused, StoreUnavailable
from service.intake.spool import Spool

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

ROLLBACK_RETRIES = 3
# while a stalled transaction holds the writer, waiters keep timing out (and spooling) but stay
# in the queue, each with its item: past this many queued, the ones given up on are dropped
PRUNE_AT = 1024
DB_DOWN_S = 1.0  # after a failed write, go straight to the spool for this long

Waiter = tuple[T, asyncio.Future[R]]


class GroupCommit(Generic[T, R]):
    """Writes whatever items are waiting in one transaction, then the next lot; spools on outage.

    `write(item)` returns the item's result (`R`) once it is committed, or None once it is
    fsync'd to the spool instead; it raises only what `unstorable` raises for a refused item.
    `run()` is the background task that does the writing.
    """

    def __init__(
        self,
        write_batch: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        spool: Spool,
        spool_entry: Callable[[T], dict[str, Any]],
        unstorable: Callable[[T, StoreRefused], T],
        timeout_s: float,
        max_batch: int,
        kind: str,
    ) -> None:
        self._write_batch = write_batch
        self.spool = spool
        self._spool_entry = spool_entry
        self._unstorable = unstorable
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self.kind = kind  # what is written, for the logs ("submission", "event")
        self._queue: list[Waiter[T, R]] = []
        self._wake = asyncio.Event()
        # (deadline, future) in deadline order (one timeout for all); one timer for the first
        self._waiting: collections.deque[tuple[float, asyncio.Future[R]]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._db_down_until = 0.0
        self._prune_at = PRUNE_AT

    async def write(self, item: T) -> R | None:
        """`item`'s result once committed, or None once spooled (the database is away)."""
        if time.monotonic() >= self._db_down_until:
            try:
                return await self._committed(item)
            except (StoreUnavailable, TimeoutError) as exc:
                # skip the database for a moment instead of making every sender wait for it
                self.skip_database(DB_DOWN_S)
                log.warning(
                    "database unavailable, spooling",
                    extra={"action": "spool", "kind": self.kind, "error": str(exc)},
                )
        await self.spool.append(self._spool_entry(item))
        return None

    def skip_database(self, seconds: float) -> None:
        """Send writes straight to the spool for `seconds` (0: try the database again)."""
        self._db_down_until = time.monotonic() + seconds if seconds > 0 else 0.0

    async def _committed(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        if len(self._queue) >= self._prune_at:
            self._queue = [w for w in self._queue if not w[1].done()]
            self._prune_at = max(PRUNE_AT, 2 * len(self._queue))
        self._queue.append((item, fut))
        self._wake.set()
        # One timer for all waiters, not wait_for(shield(fut)) per item (a timer, a waiter
        # future and callbacks each: 50-80 µs of a ~1.5 ms request). One timeout for all, so
        # deadlines arrive in order and the timer only ever waits for the oldest.
        deadline = loop.time() + self.timeout_s
        self._waiting.append((deadline, fut))
        if self._timer is None:
            self._timer = loop.call_at(deadline, self._expire)
        return await fut

    def _expire(self) -> None:
        """Fail the waiters past their deadline with TimeoutError; re-arm for the next one."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        waiting = self._waiting
        while waiting and (waiting[0][1].done() or waiting[0][0] <= now):
            _, fut = waiting.popleft()
            if not fut.done():
                fut.set_exception(TimeoutError())
        self._timer = loop.call_at(waiting[0][0], self._expire) if waiting else None

    async def run(self) -> None:
        """Write what is waiting, `max_batch` at a time, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                taken = self._queue[: self.max_batch]
                self._queue = self._queue[self.max_batch :]
                # a waiter that gave up (timeout, cancel) has spooled its item or was never
                # answered: the item is not begun, so it is not written
                batch = [(item, fut) for item, fut in taken if not fut.done()]
                if batch:
                    await self._commit(batch)

    async def _commit(self, batch: list[Waiter[T, R]]) -> None:
        try:
            outcomes = await self._outcomes([item for item, _ in batch])
        except Exception as exc:
            error = exc if isinstance(exc, StoreUnavailable) else StoreUnavailable(str(exc))
            outcomes = [error] * len(batch)
        for (_, fut), outcome in zip(batch, outcomes, strict=True):
            if fut.done():
                continue
            if isinstance(outcome, Exception):
                fut.set_exception(outcome)
                fut.exception()  # its waiter may be cancelled meanwhile: mark it retrieved
            else:
                fut.set_result(outcome)

    async def store_all(self, items: Sequence[T]) -> list[R]:
        """Write `items` now, `max_batch` to a transaction, by the same rules (the spool drain):
        raises StoreUnavailable, or the first refusal, instead of spooling."""
        results: list[R] = []
        for i in range(0, len(items), self.max_batch):
            for outcome in await self._outcomes(list(items[i : i + self.max_batch])):
                if isinstance(outcome, Exception):
                    raise outcome
                results.append(outcome)
        self.skip_database(0)  # it answers again
        return results

    async def _outcomes(
        self, items: list[T], retries: int = ROLLBACK_RETRIES, replaced: bool = False
    ) -> list[R | Exception]:
        """Each item's result, or the error that refused it alone. Raises StoreUnavailable (or
        whatever else is not the database refusing the data) when none can be written."""
        try:
            return list(await self._write_batch(items))
        except StoreConflict:
            if retries > 0:
                return await self._outcomes(items, retries - 1, replaced)
            raise StoreUnavailable("repeated transaction rollbacks") from None
        except StoreRefused as exc:
            if len(items) > 1:
                outcomes: list[R | Exception] = []
                for one in items:
                    outcomes += await self._outcomes([one], replaced=replaced)
                return outcomes
            if replaced:
                return [StoreUnavailable(f"cannot store the replacement: {exc}")]
            return [await self._refused(items[0], exc)]

    async def _refused(self, item: T, exc: StoreRefused) -> R | Exception:
        """What becomes of an item the database refused alone: its replacement's result, or
        the error `unstorable` raised for its sender."""
        try:
            replacement = self._unstorable(item, exc)
        except Exception as refusal:
            return refusal
        return (await self._outcomes([replacement], replaced=True))[0]
