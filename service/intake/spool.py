"""The local spool: where accepted work goes when the database is unreachable.

Each process appends JSON lines to its own file and fsyncs before the client is answered, so a
SIGKILL loses nothing that was acknowledged. A process holds an exclusive `flock` on the file it
writes; a drainer takes every file it can lock (its own after rotating, and those of processes
that died), re-ingests the entries, deduplicated by their idempotency keys, and deletes the file.
A torn last line can only come from a write that was never fsynced, hence never acknowledged.

Appends that arrive while a write is in progress go out together, in one write and one fsync:
during an outage every accepted submission and webhook delivery comes here, and one fsync per
entry could not keep up with the load the database was taking.

The spool is bounded: past `max_bytes` (or when the volume refuses the write) `append` raises
`SpoolFull`, which the HTTP layer answers 503 with `Retry-After` — nothing is acknowledged that
is not durable. A drain reads a file a block of lines at a time, hands entries over in chunks,
falls back to one entry at a time when a chunk fails while the database answers, and moves an
entry that still fails on its own to `quarantine/` (kept `quarantine_days`, listed by the admin
API): one poison entry never holds the others back.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from service.errors import SpoolFull, StoreUnavailable

log = logging.getLogger(__name__)

Handler = Callable[[list[dict[str, Any]]], Awaitable[None]]
Ping = Callable[[], Awaitable[None]]
CHUNK = 200
MAX_LINES_PER_WRITE = 200  # one fsync covers at most this many appends
READ_BLOCK = 1024 * 1024  # a drain reads about this much of a file at a time
SIZE_REFRESH_S = 1.0  # the directory's size is looked at again at most this often
PING_TIMEOUT_S = 2.0
QUARANTINE = "quarantine"
SHOWN_ENTRY_CHARS = 2000  # how much of a quarantined entry the admin API shows
RETRY_AFTER_S = 30


class Spool:
    """Append-only, fsync'd JSON-lines files under one directory."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = 1024 * 1024 * 1024,
        quarantine_days: float = 30.0,
    ) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.quarantine_days = quarantine_days
        self._file: BinaryIO | None = None
        # what the directory held when last looked at, plus what was appended since
        self._size = 0
        self._size_at = -SIZE_REFRESH_S
        self._lock = asyncio.Lock()
        # lines waiting for the next write, each with the future its appender awaits
        self._waiting: list[tuple[bytes, asyncio.Future[None]]] = []
        self.appended = 0
        self.refused = 0  # appends refused: over max_bytes, or the volume would not take them
        self.quarantined = 0

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
        """Durably append one entry: returns after the fsync that covers it. Raises `SpoolFull`
        when the spool is at its size cap or the volume refuses the write."""
        line = orjson.dumps(entry) + b"\n"
        if self.size() + len(line) > self.max_bytes:
            self.refused += 1
            raise SpoolFull(f"the spool is full ({self.max_bytes} bytes)")
        self._size += len(line)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((line, done))
        while not done.done():
            async with self._lock:  # whoever holds it writes everything waiting by then
                if not done.done():
                    await self._write_waiting(done)
        try:
            await done
        except OSError as exc:  # ENOSPC, EIO, a read-only volume: nothing durable to answer
            self.refused += 1
            raise SpoolFull(f"the spool cannot be written: {exc.strerror or exc}") from exc

    def size(self) -> int:
        """Bytes in the spool (pending files and quarantine), looked at again at most once a
        second; appends since then are added as they come."""
        now = time.monotonic()
        if now - self._size_at >= SIZE_REFRESH_S:
            self._size_at = now
            self._size = self.pending_bytes() + self.quarantine_bytes()
        return self._size

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
        # a directory not made yet globs to nothing
        return sorted(self.directory.glob("spool-*.jsonl"))

    def pending_bytes(self) -> int:
        return _bytes_in(self.pending_files())

    async def _rotate(self) -> None:
        async with self._lock:
            if self._file is not None:
                self._file.close()  # closing drops our flock: the file becomes drainable
                self._file = None

    async def drain(self, handlers: dict[str, Handler], ping: Ping | None = None) -> int:
        """Re-ingest every drainable file; return entries handed over. Raises StoreUnavailable
        when the database is away (what is not handed over stays for the next try); an entry
        that fails on its own while the database answers (`ping`) is quarantined instead."""
        await self._rotate()
        done = 0
        for path in self.pending_files():
            done += await self._drain_file(path, handlers, ping)
        await asyncio.to_thread(self._expire_quarantine)
        return done

    async def _drain_file(
        self, path: Path, handlers: dict[str, Handler], ping: Ping | None = None
    ) -> int:
        opened = await asyncio.to_thread(_open_locked, path)
        if opened is None:
            return 0  # gone, or a live process is still writing it
        f = opened
        done = 0
        # written only once the whole file is handed over, just before it goes: a pass that
        # stops half-way (the database went away) leaves the file as it was, nothing twice
        left = _Leftovers()
        with f:
            line_no = 0
            while lines := await asyncio.to_thread(f.readlines, READ_BLOCK):
                by_type: dict[str, list[dict[str, Any]]] = {}
                for line in lines:
                    line_no += 1
                    entry = _parse(line, path, line_no)
                    if entry is not None:
                        by_type.setdefault(str(entry.get("type")), []).append(entry)
                for kind, items in by_type.items():
                    for i in range(0, len(items), CHUNK):
                        chunk = items[i : i + CHUNK]
                        done += await self._hand_over(handlers.get(kind), chunk, ping, left)
            if left.unknown:
                # say, spooled by a newer version: left pending (in a file of their own) for a
                # process that knows the type, while the rest of the file is drained
                await asyncio.to_thread(self._set_aside, left.unknown)
                log.error(
                    "spool entry of unknown type kept",
                    extra={
                        "action": "spool_unknown",
                        "entries": len(left.unknown),
                        "types": sorted({str(e.get("type")) for e in left.unknown}),
                    },
                )
            if left.poison:
                await self._quarantine(path, left.poison)
            await asyncio.to_thread(path.unlink)
        log.info(
            "spool drained",
            extra={
                "action": "spool_drained",
                "entries": done,
                "quarantined": len(left.poison),
                "file": path.name,
            },
        )
        return done

    async def _hand_over(
        self,
        handler: Handler | None,
        items: list[dict[str, Any]],
        ping: Ping | None,
        left: _Leftovers,
    ) -> int:
        """Hand `items` to `handler`, one at a time if together they fail; an entry that fails
        alone while the database answers goes to `left.poison`. Returns how many were handed
        over; raises StoreUnavailable when the database is away."""
        if handler is None:
            left.unknown.extend(items)
            return 0
        try:
            await handler(items)
            return len(items)
        except Exception as exc:
            await _database_answers(exc, ping)
            if len(items) == 1:
                left.poison.append((items[0], _describe(exc)))
                return 0
        done = 0
        for item in items:
            try:
                await handler([item])
                done += 1
            except Exception as exc:
                await _database_answers(exc, ping)
                left.poison.append((item, _describe(exc)))
        return done

    def _set_aside(self, items: list[dict[str, Any]]) -> None:
        name = f"spool-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        _write_new(self.directory / name, b"".join(orjson.dumps(e) + b"\n" for e in items))

    async def _quarantine(self, path: Path, poison: list[tuple[dict[str, Any], str]]) -> None:
        """Move entries that cannot be stored aside, fsync'd, so the file they came from can go."""
        now = dt.datetime.now(dt.UTC)
        at = now.isoformat()
        lines = b"".join(
            orjson.dumps({"quarantined_at": at, "file": path.name, "error": why, "entry": e})
            + b"\n"
            for e, why in poison
        )
        # named by when, so that name order is time order (the admin API lists newest first)
        name = f"quarantine-{now:%Y%m%dT%H%M%S%f}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        await asyncio.to_thread(_write_new, self.directory / QUARANTINE / name, lines)
        self.quarantined += len(poison)
        log.error(
            "spool entry quarantined",
            extra={
                "action": "spool_quarantined",
                "entries": len(poison),
                "file": path.name,
                "error": poison[0][1],
            },
        )

    def quarantine_files(self) -> list[Path]:
        return sorted((self.directory / QUARANTINE).glob("quarantine-*.jsonl"))

    def quarantine_bytes(self) -> int:
        return _bytes_in(self.quarantine_files())

    def quarantined_entries(self, limit: int) -> list[dict[str, Any]]:
        """The newest `limit` quarantined entries: when, from which file, why, what (its start)."""
        shown: list[dict[str, Any]] = []
        for p in reversed(self.quarantine_files()):
            with contextlib.suppress(OSError):
                for line in reversed(p.read_bytes().splitlines()):
                    if len(shown) >= limit:
                        return shown
                    with contextlib.suppress(orjson.JSONDecodeError):
                        q = orjson.loads(line)
                        if not isinstance(q, dict):
                            continue  # not a line `_quarantine` wrote
                        entry = q.get("entry")
                        text = orjson.dumps(entry).decode()
                        shown.append(
                            {
                                "quarantined_at": q.get("quarantined_at"),
                                "quarantine_file": p.name,
                                "spool_file": q.get("file"),
                                "error": q.get("error"),
                                "type": entry.get("type") if isinstance(entry, dict) else None,
                                "bytes": len(text),
                                "entry": text[:SHOWN_ENTRY_CHARS],
                            }
                        )
        return shown

    def _expire_quarantine(self) -> None:
        oldest = time.time() - self.quarantine_days * 86400
        for p in self.quarantine_files():
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < oldest:
                    p.unlink()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _Leftovers:
    """What a drain pass over one file could not hand over: entries of unknown types, and
    entries the database refused on their own (each with why)."""

    __slots__ = ("poison", "unknown")

    def __init__(self) -> None:
        self.unknown: list[dict[str, Any]] = []
        self.poison: list[tuple[dict[str, Any], str]] = []


async def _database_answers(exc: Exception, ping: Ping | None) -> None:
    """Return when the failure was the entries' own (the database answers `ping`); raise
    StoreUnavailable when it does not, so the file waits for the next pass."""
    if ping is None:
        raise exc  # nothing to tell an outage from the entry's own fault: keep the file
    try:
        async with asyncio.timeout(PING_TIMEOUT_S):
            await ping()
    except (StoreUnavailable, TimeoutError) as down:
        raise StoreUnavailable(f"database away while draining the spool: {down}") from exc


def _bytes_in(paths: list[Path]) -> int:
    """The files' sizes together; one drained or expired away meanwhile counts nothing."""
    total = 0
    for p in paths:
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


def _write_new(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _open_locked(path: Path) -> BinaryIO | None:
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
    return f


def _parse(line: bytes, path: Path, n: int) -> dict[str, Any] | None:
    if not line.strip():
        return None
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        # only an un-fsynced (never acknowledged) write can be torn
        log.warning(
            "torn spool line skipped",
            extra={"action": "spool_torn", "file": path.name, "line": n},
        )
        return None
    return entry if isinstance(entry, dict) else None
