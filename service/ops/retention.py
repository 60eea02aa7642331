"""Retention: personal data older than `RETENTION_DAYS` is deleted, never work still owed.

Every `RETENTION_CHECK_S` each process runs one purge (`PrivacyStore.purge`): delivered
submissions (and discarded dead letters) with their jobs, rejected bodies, webhook events whose
forward jobs are all done and the raw deliveries left without events, and spam past its own
age (`SPAM_RETENTION_DAYS`) or count (`SPAM_MAX_ROWS`). Pending, running and undiscarded dead
jobs, and events not yet forwarded, are kept whatever their age. Deletes go in batches of
short transactions and skip rows another process holds, so processes purging at once only
share the work.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from service.db.privacy_store import PrivacyStore
from service.errors import StoreUnavailable
from service.ops.runtime import RUNTIME
from service.settings import RetentionSettings
from service.web import SETTINGS

log = logging.getLogger(__name__)

FIRST_RUN_S = 30.0  # after start-up, once the rest is running


class Retention:
    """The purge loop of one process."""

    def __init__(self, store: PrivacyStore, settings: RetentionSettings) -> None:
        self.store = store
        self.settings = settings
        self.removed: dict[str, int] = {}  # totals since start, per table

    async def run_once(self) -> dict[str, int]:
        s = self.settings
        counts = await self.store.purge(s.days, s.spam_days, s.spam_max_rows)
        for table, n in counts.items():
            self.removed[table] = self.removed.get(table, 0) + n
        if any(counts.values()):
            log.info("retention purge", extra={"action": "retention_purge", **counts})
        return counts

    async def run(self, first_wait_s: float = FIRST_RUN_S) -> None:
        await asyncio.sleep(min(first_wait_s, self.settings.check_s))
        while True:
            try:
                await self.run_once()
            except StoreUnavailable as exc:
                log.warning(
                    "retention: database unavailable",
                    extra={"action": "retention_db_down", "error": str(exc)},
                )
            except Exception:
                # a purge that fails must not end the loop: the next one tries again
                log.exception("retention purge failed", extra={"action": "retention_error"})
            await asyncio.sleep(self.settings.check_s)


RETENTION = web.AppKey("retention", Retention)


async def retention_ctx(app: web.Application) -> AsyncIterator[None]:
    rt = app[RUNTIME]
    assert rt.store is not None, "retention_ctx runs after database_ctx"
    retention = app[RETENTION] = Retention(PrivacyStore(rt.store.pool), app[SETTINGS].retention)
    task = asyncio.create_task(retention.run(), name="retention")
    yield
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
