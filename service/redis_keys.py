"""Idempotency keys every process sees: a fast path in Redis between the in-memory window and
the database's unique key (which stays the truth).

The first process to see a key stores a placeholder (`SET NX`, short TTL); once its submission
is durable (committed or spooled) it stores the submission id for `IDEMPOTENCY_WINDOW_S`. A repeat
that reaches another process answers with that id at once; if it finds only the placeholder (the
first one is still writing), it waits a little for the id, then lets the database decide. It never
answers with an id that is not durable yet: a writer that dies before its commit must not have
had its repeats acknowledged.

The SETs of concurrent requests go to Redis together, one pipeline per round trip (as the group
commit does for the database): on a busy process a round trip per request costs more CPU than
the rest of the fast path.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from typing import Any

from redis.asyncio import Redis

from service.cluster import KEY_PREFIX, RedisLink, RedisUnavailable

PENDING = "?"  # placeholder prefix: a process is writing this key now
PENDING_TTL_MS = 10_000  # a placeholder whose writer died frees the key after this
WAIT_STEPS = (0.01, 0.02, 0.04, 0.08, 0.15)  # ~0.3 s for the first writer's id

_Set = tuple[str, str, bool, int, "asyncio.Future[Any] | None"]  # name, value, nx, px, answer


class SetBatch:
    """SETs queued while a round trip is in flight go together in the next pipeline."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self._queue: list[_Set] = []
        self._flusher: asyncio.Task[None] | None = None
        self.round_trips = 0

    async def set(self, name: str, value: str, *, nx: bool, px: int) -> bool:
        """True if Redis stored it (with nx: if the key was free); RedisUnavailable if down."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue((name, value, nx, px, fut))
        return bool(await fut)

    def set_later(self, name: str, value: str, *, px: int) -> None:
        """SET without waiting for (or caring about) the answer."""
        self._enqueue((name, value, False, px, None))

    def _enqueue(self, item: _Set) -> None:
        self._queue.append(item)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            self.round_trips += 1
            try:
                results = await self.link.call(functools.partial(self._send, batch=batch))
            except RedisUnavailable as exc:
                for *_, fut in batch:
                    if fut is not None and not fut.done():
                        fut.set_exception(exc)
                continue
            for (*_, fut), result in zip(batch, results, strict=True):
                if fut is not None and not fut.done():
                    fut.set_result(result)

    @staticmethod
    async def _send(r: Redis, batch: list[_Set]) -> list[Any]:
        pipe = r.pipeline(transaction=False)
        for name, value, nx, px, _ in batch:
            pipe.set(name, value, nx=nx, px=px)
        results: list[Any] = await pipe.execute()
        return results


class SharedKeys:
    """The Redis fast path; every method degrades to "not known" when Redis is away."""

    def __init__(self, link: RedisLink, ttl_s: float) -> None:
        self.link = link
        self.ttl_ms = int(ttl_s * 1000)
        self.batch = SetBatch(link)
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.link.configured and self.ttl_ms > 0

    async def claim(self, key: str) -> uuid.UUID | None:
        """The original submission id if another process has stored this key; None if we are
        the first (a placeholder now says so), if the first is still writing, or if Redis is
        down: then the database decides."""
        if not self.enabled:
            return None
        name = f"{KEY_PREFIX}idem:{key}"
        placeholder = f"{PENDING}{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(RedisUnavailable):
            for pause in (0.0, *WAIT_STEPS):
                await asyncio.sleep(pause)
                if await self.batch.set(name, placeholder, nx=True, px=PENDING_TTL_MS):
                    return None
                value = await self.link.call(lambda r: r.get(name))
                if isinstance(value, str) and not value.startswith(PENDING):
                    with contextlib.suppress(ValueError):
                        sid = uuid.UUID(value)
                        self.hits += 1
                        return sid
        return None

    def remember(self, key: str, sid: uuid.UUID) -> None:
        """Publish the id a key was stored (or found) under, once it is durable. Not waited
        for: until it lands, a repeat elsewhere waits on the placeholder or asks the database."""
        if self.enabled:
            self.batch.set_later(f"{KEY_PREFIX}idem:{key}", str(sid), px=self.ttl_ms)


class NoSharedKeys(SharedKeys):
    """Without Redis: nothing is shared, the database decides."""

    def __init__(self) -> None:
        super().__init__(RedisLink(None), 0.0)
