"""Idempotency keys every process sees: a fast path in Redis between the in-memory window and
the database's unique key (which stays the truth).

The first process to see a key stores a placeholder (`SET NX`, short TTL); once its submission
is committed it stores the submission id for `IDEMPOTENCY_WINDOW_S`. A repeat that reaches
another process answers with that id at once; if it finds only the placeholder (the first one
is still writing), it waits a little for the id, then lets the database decide.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from service.cluster import KEY_PREFIX, RedisLink, RedisUnavailable

PENDING = "?"  # placeholder prefix: a process is writing this key now
PENDING_TTL_MS = 10_000  # a placeholder whose writer died frees the key after this
WAIT_STEPS = (0.01, 0.02, 0.04, 0.08, 0.15)  # ~0.3 s for the first writer's id


class SharedKeys:
    """The Redis fast path; every method degrades to "not known" when Redis is away."""

    def __init__(self, link: RedisLink, ttl_s: float) -> None:
        self.link = link
        self.ttl_ms = int(ttl_s * 1000)
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
                if await self.link.call(
                    lambda r: r.set(name, placeholder, nx=True, px=PENDING_TTL_MS)
                ):
                    return None
                value = await self.link.call(lambda r: r.get(name))
                if isinstance(value, str) and not value.startswith(PENDING):
                    with contextlib.suppress(ValueError):
                        sid = uuid.UUID(value)
                        self.hits += 1
                        return sid
        return None

    async def remember(self, key: str, sid: uuid.UUID) -> None:
        """Publish the id a key was stored (or found) under."""
        if not self.enabled:
            return
        name = f"{KEY_PREFIX}idem:{key}"
        with contextlib.suppress(RedisUnavailable):
            await self.link.call(lambda r: r.set(name, str(sid), px=self.ttl_ms))


class NoSharedKeys(SharedKeys):
    """Without Redis: nothing is shared, the database decides."""

    def __init__(self) -> None:
        super().__init__(RedisLink(None), 0.0)
