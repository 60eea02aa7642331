"""Idempotency keys every process sees: a fast path in Redis between the in-memory window and
the database's unique key (which stays the truth).

The first process to see a key stores a placeholder (`SET NX`, short TTL); once its submission
is durable (committed or spooled) it stores the submission id for `IDEMPOTENCY_WINDOW_S`. A repeat
that reaches another process answers with that id at once; if it finds only the placeholder (the
first one is still writing), it lets the database decide rather than wait: the unique key makes
it wait for the first commit exactly as long as needed. It never answers with an id that is not
durable yet: a writer that dies before its commit must not have had its repeats acknowledged.

The keys of concurrent requests go to Redis together, one script call per round trip (as the
group commit does for the database): on a busy process, a redis-py command per request costs
more CPU than the rest of the fast path.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any, cast

from service.cluster.processes import KEY_PREFIX, RedisLink, RedisUnavailable

PENDING = "?"  # placeholder prefix: a process is writing this key now
PENDING_TTL_MS = 10_000  # a placeholder whose writer died frees the key after this

# KEYS: names. ARGV: (mode, value, px) per key; mode 'n' = SET NX (answers 1 if stored, else
# the value already there), 's' = SET (answers 1).
SET_MANY = """
local out = {}
for i, key in ipairs(KEYS) do
  local mode, value, px = ARGV[3 * i - 2], ARGV[3 * i - 1], ARGV[3 * i]
  if mode == 's' then
    redis.call('SET', key, value, 'PX', px)
    out[i] = 1
  elseif redis.call('SET', key, value, 'NX', 'PX', px) then
    out[i] = 1
  else
    out[i] = redis.call('GET', key) or 0
  end
end
return out
"""

_Op = tuple[str, str, str, int, "asyncio.Future[Any] | None"]  # name, mode, value, px, answer


class KeyBatch:
    """SETs queued while a round trip is in flight go together in the next script call."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self._script = link.client.register_script(SET_MANY) if link.client else None
        self._queue: list[_Op] = []
        self._flusher: asyncio.Task[None] | None = None
        self.round_trips = 0

    async def set_nx(self, name: str, value: str, px: int) -> int | str:
        """1 if stored; else the value already there (RedisUnavailable if Redis is down)."""
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue((name, "n", value, px, fut))
        return cast(int | str, await fut)

    def set_later(self, name: str, value: str, px: int) -> None:
        """SET without waiting for (or caring about) the answer."""
        self._enqueue((name, "s", value, px, None))

    def _enqueue(self, op: _Op) -> None:
        self._queue.append(op)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            self.round_trips += 1
            try:
                results = await self._send(batch)
            except RedisUnavailable as exc:
                for *_, fut in batch:
                    if fut is not None and not fut.done():
                        fut.set_exception(exc)
                continue
            for (*_, fut), result in zip(batch, results, strict=True):
                if fut is not None and not fut.done():
                    fut.set_result(result)

    async def _send(self, batch: list[_Op]) -> list[Any]:
        assert self._script is not None
        script = self._script
        keys = [name for name, *_ in batch]
        args = [x for _, mode, value, px, _ in batch for x in (mode, value, px)]
        return cast(list[Any], await self.link.call(lambda r: script(keys, args, client=r)))


class SharedKeys:
    """The Redis fast path; every method degrades to "not known" when Redis is away."""

    def __init__(self, link: RedisLink, ttl_s: float) -> None:
        self.link = link
        self.ttl_ms = int(ttl_s * 1000)
        self.batch = KeyBatch(link)
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.link.configured and self.ttl_ms > 0

    async def claim(self, key: str) -> uuid.UUID | None:
        """The original submission id if another process has stored this key; None if we are
        the first (a placeholder now says so), if the first is still writing, or if Redis is
        down: then the database decides (its unique key makes a second writer wait for the
        first one's commit and answer with its id)."""
        if not self.enabled:
            return None
        placeholder = f"{PENDING}{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(RedisUnavailable):
            found = await self.batch.set_nx(self._name(key), placeholder, PENDING_TTL_MS)
            if isinstance(found, str) and not found.startswith(PENDING):
                with contextlib.suppress(ValueError):
                    sid = uuid.UUID(found)
                    self.hits += 1
                    return sid
        return None

    def remember(self, key: str, sid: uuid.UUID) -> None:
        """Publish the id a key was stored (or found) under, once it is durable. Not waited
        for: until it lands, a repeat elsewhere finds the placeholder and asks the database."""
        if self.enabled:
            self.batch.set_later(self._name(key), str(sid), self.ttl_ms)

    @staticmethod
    def _name(key: str) -> str:
        return f"{KEY_PREFIX}idem:{key}"


class NoSharedKeys(SharedKeys):
    """Without Redis: nothing is shared, the database decides."""

    def __init__(self) -> None:
        super().__init__(RedisLink(None), 0.0)
