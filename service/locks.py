"""Per-key asyncio locks: one holder per person identity inside this process.

Across processes the database does the same job (unique identities, leased person rows); these
locks keep concurrent requests of one process from racing each other before the database does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field


@dataclass
class _Entry:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    held_since: float = 0.0


class KeyLocks:
    """Locks created on first use and dropped when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self.waits = 0  # acquisitions that had to wait: a contention signal for metrics

    @contextlib.asynccontextmanager
    async def hold(self, keys: Iterable[str]) -> AsyncIterator[None]:
        """Hold every key; taken in sorted order so two holders can never deadlock."""
        ordered = sorted(set(keys))
        joined: list[str] = []
        acquired: list[str] = []
        try:
            for key in ordered:
                entry = self._entries.setdefault(key, _Entry())
                entry.users += 1
                joined.append(key)
                if entry.lock.locked():
                    self.waits += 1
                await entry.lock.acquire()
                acquired.append(key)
                entry.held_since = time.monotonic()
            yield
        finally:
            for key in reversed(acquired):
                self._entries[key].held_since = 0.0
                self._entries[key].lock.release()
            for key in joined:
                entry = self._entries[key]
                entry.users -= 1
                if entry.users == 0:
                    del self._entries[key]

    def held(self) -> dict[str, float]:
        """Keys held now, with seconds held (for the admin lock list)."""
        now = time.monotonic()
        return {k: now - e.held_since for k, e in self._entries.items() if e.lock.locked()}
