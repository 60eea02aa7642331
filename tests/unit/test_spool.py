"""The local spool (service.intake.spool): what it acknowledged is on disk and comes back once,
whatever the database and the process went through.

Found by mutation testing (scripts/mutate spool): each test fails with a mutant that once
survived. Tests read the spool's files and what a drain hands over, not its internals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from service.errors import SpoolFull
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
