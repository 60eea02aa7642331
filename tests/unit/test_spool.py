"""The local spool (service.intake.spool): what it acknowledged is on disk and comes back once,
whatever the database and the process went through.

Found by mutation testing (scripts/mutate spool): each test fails with a mutant that once
survived. Tests read the spool's files and what a drain hands over, not its internals.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.errors import SpoolFull, StoreUnavailable
from service.intake import spool as spool_module
from service.intake.spool import Spool

HUNG_S = 5.0


class Handler:
    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []

    async def __call__(self, entries: list[dict[str, Any]]) -> None:
        self.calls.append(entries)


async def test_every_acknowledged_entry_is_in_the_file_once_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await asyncio.gather(*(spool.append({"type": "submission", "n": n}) for n in range(450)))
    [path] = spool.pending_files()
    lines = [orjson.loads(line) for line in path.read_bytes().splitlines()]
    assert [e["n"] for e in lines] == list(range(450))
    assert spool.appended == 450
    assert spool.pending_bytes() == path.stat().st_size
    spool.close()


async def test_a_drain_hands_each_type_over_in_chunks_and_then_deletes_the_file(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path)
    for n in range(450):
        await spool.append({"type": "submission" if n % 3 else "event", "n": n})
    submissions, events = Handler(), Handler()
    assert await spool.drain({"submission": submissions, "event": events}) == 450
    assert spool.pending_files() == [] and spool.pending_bytes() == 0
    # at most 200 to a call (one database transaction each), in the order they were spooled
    assert [len(c) for c in submissions.calls] == [200, 100]
    assert [e["n"] for c in submissions.calls for e in c] == [n for n in range(450) if n % 3]
    assert [e["n"] for c in events.calls for e in c] == list(range(0, 450, 3))
    # the spool goes on in a new file after a drain
    await spool.append({"type": "submission", "n": 450})
    assert len(spool.pending_files()) == 1
    spool.close()


async def test_a_failed_drain_leaves_everything_for_the_next_one(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for n in range(3):
        await spool.append({"type": "submission", "n": n})

    async def database_away(entries: list[dict[str, Any]]) -> None:
        raise ConnectionError("still down")

    try:
        await spool.drain({"submission": database_away})
    except ConnectionError:
        pass
    handler = Handler()
    assert await spool.drain({"submission": handler}) == 3
    assert [e["n"] for c in handler.calls for e in c] == [0, 1, 2]
    assert spool.pending_files() == []


async def test_only_whole_json_objects_are_handed_over(tmp_path: Path) -> None:
    """A torn line (a write never fsynced, so never acknowledged) and a line that is not an
    object are skipped; the lines after them are not."""
    (tmp_path / "spool-1-dead.jsonl").write_bytes(
        b'{"type":"submission","n":1}\n[1,2]\n{"type":"submission","n":2}\n{"type":"subm'
    )
    handler = Handler()
    assert await Spool(tmp_path).drain({"submission": handler}) == 2
    assert [e["n"] for c in handler.calls for e in c] == [1, 2]


async def test_a_torn_line_in_the_middle_does_not_hide_the_lines_after_it(tmp_path: Path) -> None:
    """A write that failed half-way (its appenders got the error) leaves a torn line, and the
    next write appends acknowledged lines after it."""
    (tmp_path / "spool-1-dead.jsonl").write_bytes(
        b'{"type":"submission","n":1}\n{"type":"subm\n{"type":"submission","n":2}\n'
    )
    handler = Handler()
    assert await Spool(tmp_path).drain({"submission": handler}) == 2
    assert [e["n"] for c in handler.calls for e in c] == [1, 2]


async def test_a_line_torn_inside_a_cyrillic_letter_is_skipped_not_fatal(tmp_path: Path) -> None:
    """Names are mostly Cyrillic: a torn last line can end inside a two-byte letter. The file
    is read as bytes, so the drain still hands over every whole line."""
    whole = orjson.dumps({"type": "submission", "name": "Асель"}) + b"\n"
    torn = orjson.dumps({"type": "submission", "name": "Жанна"})[:-3]  # half of the last "а"
    assert torn.decode("utf-8", errors="replace").endswith("\ufffd")
    (tmp_path / "spool-1-dead.jsonl").write_bytes(whole + torn)
    handler = Handler()
    assert await Spool(tmp_path).drain({"submission": handler}) == 1
    assert handler.calls == [[{"type": "submission", "name": "Асель"}]]


async def test_what_the_drain_skips_or_keeps_is_logged_for_the_operator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "spool-1-a.jsonl").write_bytes(b'{"type":"submission"}\n{"torn\n')
    (tmp_path / "spool-2-b.jsonl").write_bytes(b'{"type":"from-a-newer-version"}\n')
    with caplog.at_level(logging.INFO, logger="service.intake.spool"):
        assert await Spool(tmp_path).drain({"submission": Handler()}) == 1
    logged = [
        (r.levelname, r.getMessage(), {k: getattr(r, k, None) for k in ("action", "file", "line")})
        for r in caplog.records
    ]
    assert logged[0] == (
        "WARNING",
        "torn spool line skipped",
        {"action": "spool_torn", "file": "spool-1-a.jsonl", "line": 2},
    )
    assert logged[1][:2] == ("INFO", "spool drained")
    assert (logged[1][2]["action"], caplog.records[1].entries) == ("spool_drained", 1)  # type: ignore[attr-defined]
    assert logged[2][:2] == ("ERROR", "spool entry of unknown type kept")
    assert (logged[2][2]["action"], caplog.records[2].types) == (  # type: ignore[attr-defined]
        "spool_unknown",
        ["from-a-newer-version"],
    )


async def test_files_left_by_dead_processes_are_drained_oldest_name_first(tmp_path: Path) -> None:
    for name in ("spool-20-b.jsonl", "spool-10-a.jsonl"):
        (tmp_path / name).write_bytes(orjson.dumps({"type": "submission", "f": name}) + b"\n")
    (tmp_path / "notes.txt").write_bytes(b"not a spool file")
    handler = Handler()
    spool = Spool(tmp_path)
    assert [p.name for p in spool.pending_files()] == ["spool-10-a.jsonl", "spool-20-b.jsonl"]
    assert spool.pending_bytes() == sum(p.stat().st_size for p in spool.pending_files())
    assert await spool.drain({"submission": handler}) == 2
    assert [c[0]["f"] for c in handler.calls] == ["spool-10-a.jsonl", "spool-20-b.jsonl"]
    assert (tmp_path / "notes.txt").exists()


async def test_a_spool_that_never_wrote_has_nothing_pending(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "not-yet")
    assert spool.pending_files() == [] and spool.pending_bytes() == 0
    assert await spool.drain({}) == 0


async def test_a_failed_write_fails_every_appender_it_covered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No appender is told its entry is safe when the write that carried it failed (a full
    disk): each gets the error, and its sender an error answer instead of a lost lead."""
    spool = Spool(tmp_path)
    await spool.append({"type": "submission", "n": 0})  # the file exists and works

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(spool_module.os, "fsync", disk_full)
    results = await asyncio.wait_for(
        asyncio.gather(
            *(spool.append({"type": "submission", "n": n}) for n in range(1, 6)),
            return_exceptions=True,
        ),
        HUNG_S,
    )
    assert all(isinstance(r, SpoolFull) and "No space left" in str(r) for r in results), results
    monkeypatch.undo()
    await asyncio.wait_for(spool.append({"type": "submission", "n": 6}), HUNG_S)  # goes on
    assert spool.appended == 2
    spool.close()


async def test_the_spool_makes_its_directory_and_starts_a_new_file_after_closing(
    tmp_path: Path,
) -> None:
    spool = Spool(tmp_path / "data" / "spool")  # nothing of it exists yet
    await spool.append({"type": "submission", "n": 1})
    spool.close()  # shutdown
    spool.close()
    await spool.append({"type": "submission", "n": 2})
    spool.close()
    files = spool.pending_files()
    assert len(files) == 2
    assert sorted(orjson.loads(f.read_bytes())["n"] for f in files) == [1, 2]


async def test_a_cancelled_appender_leaves_the_others_answered_and_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The appender doing a write for others too is cancelled (its request timed out) while
    the disk is slow: the others in its write, and those who came after, are still written
    and answered."""
    real_fsync = spool_module.os.fsync
    at_disk: list[int] = []

    def slow_fsync(fd: int) -> None:
        at_disk.append(fd)
        time.sleep(0.2)
        real_fsync(fd)

    monkeypatch.setattr(spool_module.os, "fsync", slow_fsync)
    spool = Spool(tmp_path)

    def append(n: int) -> asyncio.Task[None]:
        return asyncio.create_task(spool.append({"type": "submission", "n": n}))

    first = append(0)  # writes alone, slowly; the next three queue behind it
    await asyncio.sleep(0)
    writer, others = append(1), [append(2), append(3)]
    await asyncio.wait_for(first, HUNG_S)
    for _ in range(int(HUNG_S / 0.01)):  # the writer's write, of all three, is at the disk
        if len(at_disk) == 2:
            break
        await asyncio.sleep(0.01)
    later = append(4)
    await asyncio.sleep(0)
    writer.cancel()
    await asyncio.wait_for(asyncio.gather(*others, later), HUNG_S)
    spool.close()
    lines = [line for f in spool.pending_files() for line in f.read_bytes().splitlines()]
    assert {2, 3, 4} <= {orjson.loads(line)["n"] for line in lines}  # (a repeat's key drops it)


# --- bounded disk: the size cap -------------------------------------------------------------


class Clock:
    """Stands in for the spool module's `time`: a monotonic clock and a wall clock the test
    moves by hand."""

    def __init__(self, now: float = 0.0, wall: float = 2_000_000_000.0) -> None:
        self.now = now
        self.wall = wall

    def monotonic(self) -> float:
        return self.now

    def time(self) -> float:
        return self.wall


def line_of(entry: dict[str, Any]) -> int:
    return len(orjson.dumps(entry)) + 1


@pytest.mark.parametrize("clock_reads", [0.0, 12345.6])
async def test_bounded_disk_the_cap_counts_other_processes_files_and_the_quarantine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, clock_reads: float
) -> None:
    """The cap is on the volume's spool as a whole: what dead processes left and what is
    quarantined count, from the very first append whatever the monotonic clock reads, and the
    appends since the last look count too. An entry that lands exactly on the cap fits."""
    monkeypatch.setattr(spool_module, "time", Clock(clock_reads))
    (tmp_path / "spool-1-dead.jsonl").write_bytes(b"x" * 600)
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "quarantine-1-a.jsonl").write_bytes(b"q" * 200)
    entry = {"type": "submission", "pad": "p" * 69}
    assert line_of(entry) == 100
    spool = Spool(tmp_path, max_bytes=1000)
    await spool.append(entry)  # 600 + 200 + 100: 900
    await spool.append(entry)  # exactly 1000, not looked at again: counted as appended
    assert spool.size() == 1000
    with pytest.raises(SpoolFull, match=r"^the spool is full \(1000 bytes\)$"):
        await spool.append(entry)
    assert spool.refused == 1 and spool.appended == 2
    spool.close()


async def test_bounded_disk_the_directory_is_looked_at_again_once_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's file is seen within a second (not on every append: one `stat` of
    every file per lead would cost more than the write)."""
    clock = Clock(500.0)
    monkeypatch.setattr(spool_module, "time", clock)
    entry = {"type": "submission", "pad": "p" * 69}
    spool = Spool(tmp_path, max_bytes=1000)
    await spool.append(entry)
    (tmp_path / "spool-2-other.jsonl").write_bytes(b"x" * 850)
    clock.now += 0.5
    assert spool.size() == 100  # as last looked at, plus what this spool appended
    clock.now += 0.5
    assert spool.size() == 950  # a second on: looked at again
    with pytest.raises(SpoolFull):
        await spool.append(entry)
    spool.close()


async def test_nothing_acknowledged_that_is_not_durable_each_refusal_is_counted_and_said(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every refused append raises SpoolFull (the sender gets 503, not an acknowledgement)
    and is counted for /health; the error says why, as the volume said it."""
    spool = Spool(tmp_path, max_bytes=50)
    for _ in range(2):
        with pytest.raises(SpoolFull, match="full"):
            await spool.append({"type": "submission", "pad": "p" * 50})
    assert spool.refused == 2

    errors = iter(
        [
            OSError(errno.ENOSPC, "No space left on device"),
            OSError(errno.EROFS, "Read-only file system"),
            OSError("volume gone"),  # no errno, no strerror
        ]
    )

    def refusing_volume(lines: bytes) -> None:
        raise next(errors)

    spool = Spool(tmp_path)
    monkeypatch.setattr(spool, "_write", refusing_volume)
    said = []
    for _ in range(3):
        with pytest.raises(SpoolFull) as refused:
            await spool.append({"type": "submission"})
        said.append(str(refused.value))
    assert said == [
        "the spool cannot be written: No space left on device",
        "the spool cannot be written: Read-only file system",
        "the spool cannot be written: volume gone",
    ]
    assert spool.refused == 3 and spool.appended == 0


async def test_no_lost_lead_a_file_drained_away_meanwhile_does_not_fail_an_append(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's drainer may delete a spool or quarantine file between the listing
    and its `stat`: the size is what is still there, and the append goes through."""
    (tmp_path / "spool-1-a.jsonl").write_bytes(b"x" * 10)
    (tmp_path / "quarantine").mkdir()
    (tmp_path / "quarantine" / "quarantine-1-a.jsonl").write_bytes(b"q" * 20)
    spool = Spool(tmp_path)
    listed, quarantined = spool.pending_files(), spool.quarantine_files()
    monkeypatch.setattr(spool, "pending_files", lambda: [*listed, tmp_path / "spool-2-gone.jsonl"])
    monkeypatch.setattr(
        spool, "quarantine_files", lambda: [*quarantined, tmp_path / "quarantine-2-gone.jsonl"]
    )
    assert spool.pending_bytes() == 10 and spool.quarantine_bytes() == 20
    assert spool.size() == 30
    await spool.append({"type": "submission"})
    assert spool.appended == 1
    spool.close()


# --- one poison entry never holds the others back -------------------------------------------


class Picky:
    """A handler that fails whatever chunk holds a poison entry (say, a NUL `jsonb` refuses),
    and records what it stored."""

    def __init__(self, poison: set[int], error: Exception | None = None) -> None:
        self.poison = poison
        self.error = error or ValueError("NUL in a text field")
        self.tried: list[list[int]] = []
        self.stored: list[int] = []

    async def __call__(self, entries: list[dict[str, Any]]) -> None:
        ns = [e["n"] for e in entries]
        self.tried.append(ns)
        if self.poison & set(ns):
            raise self.error
        self.stored.extend(ns)


class Ping:
    """The database's ping: answers, or (from call `down_from` on) does not."""

    def __init__(self, down_from: int | None = None) -> None:
        self.calls = 0
        self.down_from = down_from

    async def __call__(self) -> None:
        self.calls += 1
        if self.down_from is not None and self.calls >= self.down_from:
            raise StoreUnavailable("connection refused")


async def spooled(tmp_path: Path, entries: list[dict[str, Any]]) -> tuple[Spool, str]:
    spool = Spool(tmp_path)
    for e in entries:
        await spool.append(e)
    [path] = spool.pending_files()
    return spool, path.name


async def test_one_poison_entry_never_holds_the_others_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk that fails while the database answers is handed over one entry at a time: the
    good entries are stored, the poison one goes to quarantine with why, the file goes."""
    entries = [{"type": "submission", "n": n} for n in range(5)]
    entries += [{"type": "event", "n": 10}, {"type": "event", "n": 11}]  # poison first of two
    spool, name = await spooled(tmp_path, entries)
    submissions, events, ping = Picky({2}), Picky({10}), Ping()
    with caplog.at_level(logging.INFO, logger="service.intake.spool"):
        handed = await spool.drain({"submission": submissions, "event": events}, ping)
    assert handed == 5
    assert submissions.tried == [[0, 1, 2, 3, 4], [0], [1], [2], [3], [4]]
    assert submissions.stored == [0, 1, 3, 4] and events.stored == [11]
    assert ping.calls == 4  # each failure: is it the database or the entry?
    assert spool.pending_files() == []
    [qfile] = spool.quarantine_files()
    assert qfile.parent == tmp_path / "quarantine" and qfile.suffix == ".jsonl"
    content = qfile.read_bytes()
    assert content.endswith(b"}\n") and content.count(b"\n") == 2
    kept = [orjson.loads(line) for line in content.splitlines()]
    assert [q["entry"] for q in kept] == [
        {"type": "submission", "n": 2},
        {"type": "event", "n": 10},
    ]
    assert [q["error"] for q in kept] == ["ValueError: NUL in a text field"] * 2
    assert [q["file"] for q in kept] == [name, name]
    at = dt.datetime.fromisoformat(kept[0]["quarantined_at"])
    assert at.utcoffset() == dt.timedelta(0)
    assert abs(dt.datetime.now(dt.UTC) - at) < dt.timedelta(minutes=5)
    assert spool.quarantined == 2
    assert spool.quarantine_bytes() == len(content)
    records = {r.action: r for r in caplog.records}  # type: ignore[attr-defined]
    q = records["spool_quarantined"]
    assert (q.levelname, q.getMessage()) == ("ERROR", "spool entry quarantined")
    assert (q.entries, q.file, q.error) == (2, name, "ValueError: NUL in a text field")  # type: ignore[attr-defined]
    d = records["spool_drained"]
    assert (d.entries, d.quarantined, d.file) == (5, 2, name)  # type: ignore[attr-defined]


async def test_one_poison_entry_alone_is_quarantined_after_one_try(tmp_path: Path) -> None:
    """An entry that fails alone while the database answers is quarantined at once, with the
    error it got (cut to 500 characters), and counts as nothing handed over."""
    spool, _ = await spooled(tmp_path, [{"type": "submission", "n": 7}])
    handler, ping = Picky({7}, RuntimeError("x" * 1000)), Ping()
    assert await spool.drain({"submission": handler}, ping) == 0
    assert handler.tried == [[7]] and ping.calls == 1
    assert spool.pending_files() == [] and spool.quarantined == 1
    [q] = [
        orjson.loads(line) for f in spool.quarantine_files() for line in f.read_bytes().splitlines()
    ]
    assert q["entry"] == {"type": "submission", "n": 7}
    assert q["error"] == ("RuntimeError: " + "x" * 1000)[:500]
    # a later pass quarantines into a file of its own; the count and the bytes add up
    await spool.append({"type": "submission", "n": 7, "again": True})
    assert await spool.drain({"submission": handler}, ping) == 0
    files = spool.quarantine_files()
    assert len(files) == 2 and spool.quarantined == 2
    assert spool.quarantine_bytes() == sum(f.stat().st_size for f in files)


async def test_no_lost_lead_when_the_database_goes_away_during_the_one_by_one_pass(
    tmp_path: Path,
) -> None:
    """The entry failed because the database went away, not for itself: nothing is
    quarantined, the file stays whole for the next pass, and the error says so and why."""
    spool, name = await spooled(tmp_path, [{"type": "submission", "n": n} for n in range(5)])
    handler = Picky({2})
    with pytest.raises(StoreUnavailable) as away:
        await spool.drain({"submission": handler}, Ping(down_from=2))
    assert str(away.value) == "database away while draining the spool: connection refused"
    assert away.value.__cause__ is handler.error
    assert handler.stored == [0, 1]
    assert spool.quarantine_files() == [] and spool.quarantined == 0
    [path] = spool.pending_files()
    assert path.name == name and path.read_bytes().count(b"\n") == 5
    later = Handler()
    assert await spool.drain({"submission": later}, Ping()) == 5  # 0 and 1 again: keys drop them


async def test_no_lost_lead_a_ping_that_hangs_counts_as_the_database_away(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled database does not answer the ping: after PING_TIMEOUT_S the drain gives up
    (keeping the file) instead of hanging, or quarantining good entries."""
    monkeypatch.setattr(spool_module, "PING_TIMEOUT_S", 0.01)
    spool, name = await spooled(tmp_path, [{"type": "submission", "n": 1}])

    async def stalled() -> None:
        await asyncio.Event().wait()

    with pytest.raises(StoreUnavailable, match="database away"):
        await asyncio.wait_for(spool.drain({"submission": Picky({1})}, stalled), HUNG_S)
    assert [p.name for p in spool.pending_files()] == [name]
    assert spool.quarantine_files() == []


async def test_no_lost_lead_unknown_types_are_set_aside_whole_and_the_rest_drained(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Entries of a type this version does not know go, byte for byte, to a new spool file
    (for a process that knows them); the file they came from is drained and goes."""
    unknown = [{"type": "from-a-newer-version", "n": 1}, {"type": "also-newer", "n": 3}]
    (tmp_path / "spool-1-dead.jsonl").write_bytes(
        b"".join(
            orjson.dumps(e) + b"\n"
            for e in [
                {"type": "submission", "n": 0},
                unknown[0],
                {"type": "submission", "n": 2},
                unknown[1],
            ]
        )
    )
    spool = Spool(tmp_path)
    handler = Handler()
    with caplog.at_level(logging.ERROR, logger="service.intake.spool"):
        assert await spool.drain({"submission": handler}) == 2
    assert [e["n"] for c in handler.calls for e in c] == [0, 2]
    [aside] = spool.pending_files()
    assert aside.name != "spool-1-dead.jsonl"
    assert aside.read_bytes() == b"".join(orjson.dumps(e) + b"\n" for e in unknown)
    [r] = [r for r in caplog.records if getattr(r, "action", None) == "spool_unknown"]
    assert (r.entries, r.types) == (2, ["also-newer", "from-a-newer-version"])  # type: ignore[attr-defined]


async def test_bounded_memory_a_drain_reads_a_file_a_block_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A drain holds one block of lines, not the whole file: with a block of one line each
    entry is handed over as it is read, in file order, and a torn line is still numbered by
    its place in the file."""
    monkeypatch.setattr(spool_module, "READ_BLOCK", 1)
    (tmp_path / "spool-1-dead.jsonl").write_bytes(
        b'{"type":"submission","n":0}\n{"type":"event","n":1}\n{"torn\n'
        b'{"type":"submission","n":3}\n{"type":"event","n":4}\n'
    )
    order: list[tuple[str, list[int]]] = []

    def handler(kind: str) -> spool_module.Handler:
        async def handle(entries: list[dict[str, Any]]) -> None:
            order.append((kind, [e["n"] for e in entries]))

        return handle

    with caplog.at_level(logging.WARNING, logger="service.intake.spool"):
        assert await Spool(tmp_path).drain({"submission": handler("s"), "event": handler("e")}) == 4
    assert order == [("s", [0]), ("e", [1]), ("s", [3]), ("e", [4])]
    [torn] = [r for r in caplog.records if getattr(r, "action", None) == "spool_torn"]
    assert torn.line == 3  # type: ignore[attr-defined]


# --- the quarantine: listed for the operator, kept quarantine_days --------------------------


async def test_the_operator_sees_quarantined_entries_newest_first_with_why(
    tmp_path: Path,
) -> None:
    """The admin API lists the newest `limit` entries across quarantine files: when, from
    which spool file, why, the type, the size, and the entry's first SHOWN_ENTRY_CHARS."""
    big = {"type": "submission", "n": 2, "comment": "c" * 3000}
    spool, first = await spooled(tmp_path, [{"type": "submission", "n": 1}, big])
    await spool.drain({"submission": Picky({1, 2})}, Ping())
    spool, second = await spooled(tmp_path, [{"type": "event", "n": 3}])
    await spool.drain({"event": Picky({3}, KeyError("n"))}, Ping())
    older, newer = spool.quarantine_files()
    shown = spool.quarantined_entries(10)
    assert [(s["quarantine_file"], s["spool_file"], s["type"]) for s in shown] == [
        (newer.name, second, "event"),
        (older.name, first, "submission"),
        (older.name, first, "submission"),
    ]
    assert [s["error"] for s in shown] == ["KeyError: 'n'"] + [
        "ValueError: NUL in a text field"
    ] * 2
    text = orjson.dumps(big).decode()
    assert shown[1]["bytes"] == len(text) and shown[1]["entry"] == text[:2000]
    assert shown[2]["entry"] == '{"type":"submission","n":1}' and shown[2]["bytes"] == 27
    stamped = [dt.datetime.fromisoformat(s["quarantined_at"]) for s in shown]
    assert stamped[0] >= stamped[1] == stamped[2]
    assert spool.quarantined_entries(2) == shown[:2]
    assert spool.quarantined_entries(0) == []


async def test_the_quarantine_listing_survives_lines_it_did_not_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A torn, foreign or hand-edited line in a quarantine file, or a file expired by another
    process meanwhile, is passed over: the listing still answers."""
    folder = tmp_path / "quarantine"
    folder.mkdir()
    (folder / "quarantine-1-a.jsonl").write_bytes(
        b'{"quarantined_at":"t","file":"spool-1.jsonl","error":"e","entry":{"type":"event"}}\n'
        b'{"quarantined_at":"t2","entry":"not an object"}\n'
        b"[1,2]\n"
        b'{"torn\n'
    )
    (folder / "notes.txt").write_bytes(b"not a quarantine file")
    spool = Spool(tmp_path)
    listed = spool.quarantine_files()
    assert [p.name for p in listed] == ["quarantine-1-a.jsonl"]
    monkeypatch.setattr(
        spool, "quarantine_files", lambda: [*listed, folder / "quarantine-2-gone.jsonl"]
    )
    assert spool.quarantined_entries(10) == [
        {
            "quarantined_at": "t2",
            "quarantine_file": "quarantine-1-a.jsonl",
            "spool_file": None,
            "error": None,
            "type": None,
            "bytes": 15,
            "entry": '"not an object"',
        },
        {
            "quarantined_at": "t",
            "quarantine_file": "quarantine-1-a.jsonl",
            "spool_file": "spool-1.jsonl",
            "error": "e",
            "type": "event",
            "bytes": 16,
            "entry": '{"type":"event"}',
        },
    ]


async def test_bounded_disk_quarantine_is_kept_quarantine_days_then_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each drain deletes quarantine files older than `quarantine_days` (30 by default) and
    keeps the younger ones, down to one exactly that old; a file another process deleted
    meanwhile does not fail the drain."""
    clock = Clock(wall=2_000_000_000.0)
    monkeypatch.setattr(spool_module, "time", clock)
    folder = tmp_path / "quarantine"
    folder.mkdir()
    ages = {"quarantine-1-old.jsonl": 30 * 86400 + 1, "quarantine-2-edge.jsonl": 30 * 86400}
    ages["quarantine-3-young.jsonl"] = 86400
    for name, age in ages.items():
        (folder / name).write_bytes(b"{}\n")
        at = int(clock.wall - age) * 1_000_000_000
        os.utime(folder / name, ns=(at, at))
    spool = Spool(tmp_path)
    listed = spool.quarantine_files()
    monkeypatch.setattr(
        spool, "quarantine_files", lambda: [*listed, folder / "quarantine-0-gone.jsonl"]
    )
    assert await spool.drain({}) == 0
    assert sorted(p.name for p in folder.iterdir()) == [
        "quarantine-2-edge.jsonl",
        "quarantine-3-young.jsonl",
    ]
    clock.wall += 86400 * 0.5  # a shorter setting: a day, and the young file goes too
    monkeypatch.undo()
    monkeypatch.setattr(spool_module, "time", clock)
    assert await Spool(tmp_path, quarantine_days=1.0).drain({}) == 0
    assert spool.quarantine_files() == []


async def test_nothing_acknowledged_is_lost_what_a_drain_moves_is_on_disk_before_the_file_goes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quarantine copy and the set-aside file of unknown types are written whole and
    fsync'd before the spool file they came from is deleted: a crash in between leaves an
    entry twice (its key drops the repeat), never nowhere."""
    (tmp_path / "spool-1-dead.jsonl").write_bytes(
        b'{"type":"submission","n":1}\n{"type":"newer","n":2}\n{"type":"submission","n":3}\n'
    )
    events: list[tuple[str, str, int]] = []
    real_fsync, real_unlink = os.fsync, Path.unlink

    def fsync(fd: int) -> None:
        real_fsync(fd)
        events.append(
            ("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name, os.fstat(fd).st_size)
        )

    def unlink(self: Path, missing_ok: bool = False) -> None:
        events.append(("unlink", self.name, 0))
        real_unlink(self, missing_ok)

    monkeypatch.setattr(spool_module.os, "fsync", fsync)
    monkeypatch.setattr(Path, "unlink", unlink)
    spool = Spool(tmp_path)
    assert await spool.drain({"submission": Picky({3})}, Ping()) == 1
    monkeypatch.undo()
    [aside] = spool.pending_files()
    [quarantined] = spool.quarantine_files()
    assert events == [
        ("fsync", aside.name, aside.stat().st_size),
        ("fsync", quarantined.name, quarantined.stat().st_size),
        ("unlink", "spool-1-dead.jsonl", 0),
    ]
