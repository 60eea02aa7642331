"""Keeping bad input: the raw request in `rejected`, by the same rules as an accepted lead.

A refused request is kept so its sender's page can be fixed, but it must never cost more than a
lead does, nor more space than it is given:
- Time: it goes through a group commit of its own (service.intake.group_commit) with the
  intake's write timeout (2 s), so a stalled database sends it to the spool as it does a lead,
  and its sender is answered in time. Its id is ours, so a spooled copy of a row the timed-out
  write stored anyway is a repeat (`ON CONFLICT (id) DO NOTHING`).
- Space: the table is trimmed to `rejected_max_rows` rows and `rejected_max_bytes` body bytes,
  oldest first (`trim`; the app runs it every `TRIM_EVERY_S`, and at once after a tenth of
  either cap was kept); when the data volume has less than `min_free_bytes` free (`DiskGuard`), or
  the spool is full, bad input is answered but not kept. Valid leads are never refused for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from service.db.store import RejectedBody, Store
from service.errors import FieldError, SpoolFull, StoreRefused
from service.intake.group_commit import GroupCommit
from service.intake.spool import Spool
from service.settings import StorageSettings

log = logging.getLogger(__name__)

MAX_BATCH = 100  # rejected bodies per statement: up to 64 KiB each
FREE_SPACE_EVERY_S = 1.0  # the volume's free space is read at most this often
TRIM_EVERY_S = 30.0


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer can still use on the volume holding `path` (or the nearest
    existing folder above it: the data directory may not exist yet)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


class DiskGuard:
    """Is the data volume low on space? Read at most once a second; `free` can be replaced."""

    def __init__(
        self,
        path: Path,
        min_free_bytes: int,
        *,
        free: Callable[[Path], int] = free_bytes,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        self._free = free
        self._clock = clock
        self._read_at = -FREE_SPACE_EVERY_S
        self.free_bytes: int | None = None

    @property
    def low(self) -> bool:
        now = self._clock()
        if now - self._read_at >= FREE_SPACE_EVERY_S:
            self._read_at = now
            try:
                self.free_bytes = self._free(self.path)
            except OSError as exc:  # cannot tell: keep what was last seen
                log.warning(
                    "free space unreadable", extra={"action": "disk_unreadable", "error": str(exc)}
                )
        return self.free_bytes is not None and self.free_bytes < self.min_free_bytes


class _NotKept(Exception):
    """The database refused even the raw copy (it never should: bytea, text without NUL)."""


def _not_kept(item: RejectedBody, exc: StoreRefused) -> RejectedBody:
    raise _NotKept(str(exc))


class RejectedKeeper:
    """Keeps bad input raw (database, else spool) within its time and space; never raises."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        limits: StorageSettings,
        disk: DiskGuard,
        *,
        write_timeout_s: float,
    ) -> None:
        self.store = store
        self.limits = limits
        self.disk = disk
        self.commit: GroupCommit[RejectedBody, uuid.UUID] = GroupCommit(
            store.save_rejected_batch,
            spool=spool,
            spool_entry=lambda r: {"type": "rejected", **r.to_json()},
            unstorable=_not_kept,
            timeout_s=write_timeout_s,
            max_batch=MAX_BATCH,
            kind="rejected",
        )
        self.counts = {"kept": 0, "spooled": 0, "not_kept": 0}
        self.kept_bytes = self.kept_rows = 0  # kept since the last trim
        self.trim_wanted = asyncio.Event()

    async def keep(
        self,
        endpoint: str,
        content_type: str | None,
        raw: bytes,
        errors: list[FieldError],
    ) -> bool:
        """Keep what was sent; False when it was not kept (volume low, spool full)."""
        if self.disk.low:
            self.counts["not_kept"] += 1
            return False
        errs = [{"field": e.field, "message": e.message} for e in errors]
        item = RejectedBody(uuid.uuid4(), endpoint, content_type, raw, errs)
        try:
            stored = await self.commit.write(item)
        except (SpoolFull, _NotKept) as exc:
            self.counts["not_kept"] += 1
            log.warning(
                "bad input not kept", extra={"action": "rejected_not_kept", "error": str(exc)}
            )
            return False
        self.counts["kept" if stored is not None else "spooled"] += 1
        self.kept_bytes += len(raw)
        self.kept_rows += 1
        limits = self.limits
        if (
            self.kept_bytes >= limits.rejected_max_bytes // 10
            or self.kept_rows >= limits.rejected_max_rows // 10
        ):
            self.trim_wanted.set()
        return True

    async def drain_spooled(self, entries: list[dict[str, object]]) -> None:
        """Spool handler: store spooled rejected bodies (a repeat of a kept id is skipped)."""
        await self.commit.store_all([RejectedBody.from_json(dict(e)) for e in entries])

    async def trim(self) -> int:
        """Delete the oldest rows past the caps; returns how many went."""
        self.kept_bytes = self.kept_rows = 0
        deleted = await self.store.trim_rejected(
            self.limits.rejected_max_rows, self.limits.rejected_max_bytes
        )
        if deleted:
            log.info(
                "oldest rejected bodies deleted",
                extra={"action": "rejected_trimmed", "rows": deleted},
            )
        return deleted
