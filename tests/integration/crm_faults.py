"""Faults injected around a CRM adapter, so production code carries no test hooks."""

from __future__ import annotations

from collections.abc import Sequence

from service.crm.base import Delivery, Link
from service.crm.protocol import CrmAdapter
from service.db.contact_locks import ContactGuard
from service.delivery.worker import Worker
from service.errors import CrmError


class CrashAfterCrm:
    """The worker's adapter, except that its first batch fails after the CRM has taken it: as
    if the process died between the CRM's answer and our commit, nothing of that answer is
    recorded, and the retry must find what the first attempt made instead of making it again."""

    def __init__(self, inner: CrmAdapter) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_batch = inner.max_batch
        self.max_round = inner.max_round
        self.crashed: list[int] = []  # the job ids of the batch that crashed

    async def deliver_batch(
        self, items: Sequence[Delivery], guard: ContactGuard | None = None
    ) -> list[Link | CrmError]:
        results = await self.inner.deliver_batch(items, guard)
        if not self.crashed:
            self.crashed.extend(item.job_id for item in items)
            raise RuntimeError("simulated crash after the CRM call, before our commit")
        return results


def crash_after_crm(worker: Worker) -> list[int]:
    """Make `worker` crash once after the CRM call; returns the ids of the jobs that crashed."""
    adapter = CrashAfterCrm(worker.adapter)
    worker.adapter = adapter
    return adapter.crashed
