"""The local spool: where accepted work goes when the database is unreachable.

Each process appends JSON lines to its own file and fsyncs before the client is answered, so a
SIGKILL loses nothing that was acknowledged. A process holds an exclusive `flock` on the file it
writes; a drainer takes every file it can lock (its own after rotating, and those of processes
that died), re-ingests the entries, deduplicated by their idempotency keys, and deletes the file.
A torn last line can only come from a write that was never fsynced, hence never acknowledged.

Appends that arrive while a write is in progress go out together, in one write and one fsync:
during an outage every accepted submission and webhook delivery comes here, and one fsync per
entry could not keep up with the load the database was taking.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import orjson

log = logging.getLogger(__name__)

Handler = Callable[[list[dict[str, Any]]], Awaitable[None]]
CHUNK = 200
MAX_LINES_PER_WRITE = 200  # one fsync covers at most this many appends


class Spool:
    """Append-only, fsync'd JSON-lines files under one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: BinaryIO | None = None
        self._lock = asyncio.Lock()
        # lines waiting for the next write, each with the future its appender awaits
        self._waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self.appended = 0

    def _open(self) -> BinaryIO:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        f = open(path, "ab")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return f

    def _write(self, lines: bytes) -> None:
        if self._file is None:
            self._file = self._open()
        self._file.write(lines)
        self._file.flush()
        os.fsync(self._file.fileno())

    async def append(self, entry: dict[str, Any]) -> None:
        """Durably append one entry: returns after the fsync that covers it; raises what the
        write raised."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((orjson.dumps(entry) + b"\n", done))
        while not done.done():
            async with self._lock:  # whoever holds it writes everything waiting by then
                if not done.done():
                    await self._write_waiting(done)
        await done

    async def _write_waiting(self, mine: asyncio.Future[None]) -> None:
        batch = self._waiting[:MAX_LINES_PER_WRITE]
        self._waiting = self._waiting[MAX_LINES_PER_WRITE:]
        try:
            await asyncio.to_thread(self._write, b"".join(line for line, _ in batch))
        except asyncio.CancelledError:
            # the others' lines go to whoever writes next (a copy that reached the file anyway
            # is deduplicated by its keys when the spool is drained)
            self._waiting[:0] = [(line, f) for line, f in batch if f is not mine]
            raise
        except Exception as exc:
            for _, f in batch:
                if not f.done():
                    f.set_exception(exc)
                    f.exception()  # its appender may have been cancelled: mark it retrieved
        else:
            self.appended += len(batch)
            for _, f in batch:
                if not f.done():
                    f.set_result(None)

    def pending_files(self) -> list[Path]:
        if not self.directory.exists():
            return []
        return sorted(self.directory.glob("spool-*.jsonl"))

    def pending_bytes(self) -> int:
        total = 0
        for p in self.pending_files():
            with contextlib.suppress(OSError):
                total += p.stat().st_size
        return total

    async def _rotate(self) -> None:
        async with self._lock:
            if self._file is not None:
                self._file.close()  # closing drops our flock: the file becomes drainable
                self._file = None

    async def drain(self, handlers: dict[str, Handler]) -> int:
        """Re-ingest every drainable file; return entries handed over. Stops at the first
        handler failure, leaving that file in place for the next try."""
        await self._rotate()
        done = 0
        for path in self.pending_files():
            done += await self._drain_file(path, handlers)
        return done

    async def _drain_file(self, path: Path, handlers: dict[str, Handler]) -> int:
        opened = await asyncio.to_thread(_open_locked, path)
        if opened is None:
            return 0  # gone, or a live process is still writing it
        f, data = opened
        with f:
            entries = _parse(data, path)
            by_type: dict[str, list[dict[str, Any]]] = {}
            for e in entries:
                by_type.setdefault(str(e.get("type")), []).append(e)
            for kind, items in by_type.items():
                handler = handlers.get(kind)
                if handler is None:
                    log.error(
                        "spool entry of unknown type kept",
                        extra={"action": "spool_unknown", "type": kind},
                    )
                    return 0
                for i in range(0, len(items), CHUNK):
                    await handler(items[i : i + CHUNK])
            await asyncio.to_thread(path.unlink)
            log.info("spool drained", extra={"action": "spool_drained", "entries": len(entries)})
            return len(entries)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _open_locked(path: Path) -> tuple[BinaryIO, bytes] | None:
    """Open and exclusively lock a spool file, or None if it is gone or still being written."""
    try:
        f = open(path, "rb")  # the lock must outlive this function
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f, f.read()


def _parse(data: bytes, path: Path) -> list[dict[str, Any]]:
    entries = []
    for n, line in enumerate(data.splitlines(), 1):
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            # only an un-fsynced (never acknowledged) write can be torn
            log.warning(
                "torn spool line skipped",
                extra={"action": "spool_torn", "file": path.name, "line": n},
            )
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries
