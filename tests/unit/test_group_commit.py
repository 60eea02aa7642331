"""The one group commit (service.intake.group_commit), with a write-batch coroutine of our own and
a real spool: batching, the error path to the caller, and the database-unavailable path."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from service.db.store import translated
from service.errors import BadInput, FieldError, StoreRefused, StoreUnavailable
from service.intake.group_commit import PRUNE_AT, ROLLBACK_RETRIES, GroupCommit
from service.intake.spool import Spool

BAD = "bad"  # an item the fake database refuses (as Postgres refuses, say, a NUL in jsonb)


class FakeDb:
    """Stores strings; records each batch it was given. `fail` decides per batch what to raise."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.stored: list[str] = []
        self.fail: Callable[[list[str]], BaseException | None] = lambda batch: None
        self.gate: asyncio.Event | None = None  # when set: each write waits for it

    async def write(self, items: list[str]) -> Sequence[str]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        # a repository raises driver errors as db.store translates them
        error = self.fail(items)
        if error is not None:
            raise translated(error)
        if BAD in items:
            raise translated(asyncpg.exceptions.UntranslatableCharacterError("unsupported escape"))
        self.stored += items
        return [f"ok:{i}" for i in items]


def refuse(item: str, exc: StoreRefused) -> str:
    raise BadInput([FieldError("body", f"cannot be stored: {exc.kind}")])


@contextlib.asynccontextmanager
async def running(db: FakeDb, spool: Spool, **kwargs: Any) -> AsyncIterator[GroupCommit[str, str]]:
    options: dict[str, Any] = {
        "spool_entry": lambda item: {"type": "t", "item": item},
        "unstorable": refuse,
        "timeout_s": 2.0,
        "max_batch": 500,
        "kind": "test",
        **kwargs,
    }
    commit: GroupCommit[str, str] = GroupCommit(db.write, spool=spool, **options)
    task = asyncio.create_task(commit.run())
    try:
        yield commit
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        spool.close()


def spooled(spool: Spool) -> list[str]:
    lines = b"".join(p.read_bytes() for p in spool.pending_files()).splitlines()
    return [orjson.loads(line)["item"] for line in lines]


async def test_concurrent_writes_share_transactions_of_at_most_max_batch(tmp_path: Path) -> None:
    db = FakeDb()
    async with running(db, Spool(tmp_path), max_batch=4) as commit:
        items = [f"i{n}" for n in range(10)]
        results = await asyncio.gather(*(commit.write(i) for i in items))
    assert results == [f"ok:{i}" for i in items]  # each caller gets its own item's result
    assert [len(b) for b in db.batches] == [4, 4, 2]
    assert sorted(db.stored) == sorted(items)


async def test_a_refused_item_fails_only_its_own_caller(tmp_path: Path) -> None:
    db = FakeDb()
    spool = Spool(tmp_path)
    async with running(db, spool) as commit:
        results = await asyncio.gather(
            commit.write("a"), commit.write(BAD), commit.write("b"), return_exceptions=True
        )
    assert results[0] == "ok:a" and results[2] == "ok:b"
    assert isinstance(results[1], BadInput)
    assert "UntranslatableCharacterError" in results[1].errors[0].message
    # the batch, then its items one by one so the others are stored
    assert db.batches == [["a", BAD, "b"], ["a"], [BAD], ["b"]]
    assert spooled(spool) == []  # bad input is not an outage


async def test_a_refused_item_may_be_replaced_once(tmp_path: Path) -> None:
    db = FakeDb()
    async with running(db, Spool(tmp_path), unstorable=lambda item, exc: "kept-raw") as commit:
        assert await commit.write(BAD) == "ok:kept-raw"
    replacing_the_replacement = running(db, Spool(tmp_path), unstorable=lambda item, exc: BAD)
    async with replacing_the_replacement as commit:
        # a replacement the database refuses too is not replaced again: spooled, as an outage
        assert await commit.write(BAD) is None


async def test_a_deadlock_is_written_again_and_repeated_ones_are_spooled(tmp_path: Path) -> None:
    db = FakeDb()
    spool = Spool(tmp_path)
    deadlocks = iter(range(2))
    db.fail = lambda batch: (
        asyncpg.exceptions.DeadlockDetectedError("deadlock")
        if next(deadlocks, None) is not None
        else None
    )
    async with running(db, spool) as commit:
        assert await commit.write("a") == "ok:a"  # two rollbacks, then the third try
        assert len(db.batches) == 3
        db.fail = lambda batch: asyncpg.exceptions.SerializationError("could not serialize")
        # never bad input: the data was fine; after the retries it is an outage → spool
        assert await commit.write("b") is None
    assert len(db.batches) == 3 + 1 + ROLLBACK_RETRIES
    assert spooled(spool) == ["b"]


@pytest.mark.parametrize(
    "error", [StoreUnavailable("database unavailable: OSError"), ConnectionResetError("gone")]
)
async def test_database_unavailable_spools_then_skips_it_until_it_answers(
    tmp_path: Path, error: Exception
) -> None:
    db = FakeDb()
    spool = Spool(tmp_path)
    db.fail = lambda batch: error
    async with running(db, spool) as commit:
        assert await asyncio.gather(commit.write("a"), commit.write("b")) == [None, None]
        assert len(db.batches) == 1
        db.fail = lambda batch: None
        # for a moment the database is not even tried: straight to the spool
        assert await commit.write("c") is None
        assert len(db.batches) == 1
        assert spooled(spool) == ["a", "b", "c"]
        # the drain stores what was spooled, and the database is tried again
        assert await commit.store_all(["a", "b", "c"]) == ["ok:a", "ok:b", "ok:c"]
        assert await commit.write("d") == "ok:d"


async def test_store_all_raises_instead_of_spooling(tmp_path: Path) -> None:
    db = FakeDb()
    spool = Spool(tmp_path)
    async with running(db, spool, max_batch=2) as commit:
        with pytest.raises(BadInput):
            await commit.store_all(["a", "b", BAD])
        db.fail = lambda batch: StoreUnavailable("down")
        with pytest.raises(StoreUnavailable):
            await commit.store_all(["c"])
    assert db.batches[:2] == [["a", "b"], [BAD]]
    assert spooled(spool) == []


async def test_a_slow_database_times_out_to_the_spool_and_is_not_given_it_again(
    tmp_path: Path,
) -> None:
    db = FakeDb()
    spool = Spool(tmp_path)
    db.gate = asyncio.Event()  # the database hangs
    async with running(db, spool, timeout_s=0.1) as commit:
        first = asyncio.create_task(commit.write("in-flight"))
        await asyncio.sleep(0.02)  # its transaction has begun (and hangs)
        second = asyncio.create_task(commit.write("queued"))
        assert await first is None and await second is None
        assert spooled(spool) == ["in-flight", "queued"]
        db.gate.set()
        await asyncio.sleep(0.05)
        commit.skip_database(0)
        assert await commit.write("later") == "ok:later"
    # the item in the hung transaction is written anyway (its key makes the spooled copy a
    # repeat); the one still queued when its caller gave up is not written at all
    assert db.batches == [["in-flight"], ["later"]]


async def test_one_timer_times_out_each_waiter_at_its_own_deadline(tmp_path: Path) -> None:
    """Bounds from below only (a loaded machine makes timers late, never early): each waiter
    gives up no sooner than its own deadline, so the second is not timed out with the first."""
    db = FakeDb()
    db.gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    gave_up: dict[str, float] = {}  # when each waiter's item went to the spool
    timeout_s = 0.3

    def entry(item: str) -> dict[str, Any]:
        gave_up[item] = loop.time()
        return {"type": "t", "item": item}

    async with running(db, Spool(tmp_path), timeout_s=timeout_s, spool_entry=entry) as commit:
        t_a = loop.time()
        first = asyncio.create_task(commit.write("a"))
        await asyncio.sleep(0.2)
        t_b = loop.time()
        second = asyncio.create_task(commit.write("b"))
        # the timer re-arms for the second deadline: both are answered (from the spool)
        assert await asyncio.wait_for(asyncio.gather(first, second), 10) == [None, None]
    assert gave_up["a"] >= t_a + timeout_s - 0.001
    assert gave_up["b"] >= t_b + timeout_s - 0.001  # not timed out with the first one
    assert gave_up["b"] > gave_up["a"]


async def test_a_cancelled_writer_leaves_the_others_be(tmp_path: Path) -> None:
    db = FakeDb()
    db.gate = asyncio.Event()
    async with running(db, Spool(tmp_path)) as commit:
        blocked = asyncio.create_task(commit.write("first"))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(commit.write("gone"))
        kept = asyncio.create_task(commit.write("kept"))
        await asyncio.sleep(0.01)
        gone.cancel()
        db.gate.set()
        assert await blocked == "ok:first" and await kept == "ok:kept"
        with pytest.raises(asyncio.CancelledError):
            await gone
    assert db.batches == [["first"], ["kept"]]


def test_a_prepared_statement_lost_to_a_pooler_names_the_setting_that_cures_it() -> None:
    gone = asyncpg.exceptions.InvalidSQLStatementNameError(
        'prepared statement "__asyncpg_stmt_5__" does not exist'
    )
    found = translated(gone)
    assert isinstance(found, StoreRefused)
    assert str(found).startswith("InvalidSQLStatementNameError: a prepared statement is gone")
    assert "set DATABASE_DIRECT_URL" in str(found) and "__asyncpg_stmt_5__" in str(found)


# --- found by mutation testing (scripts/mutate group_commit) ----------------------------------


async def test_a_refused_item_in_a_batch_of_two_leaves_the_other_stored(tmp_path: Path) -> None:
    db = FakeDb()
    async with running(db, Spool(tmp_path)) as commit:
        results = await asyncio.gather(commit.write("a"), commit.write(BAD), return_exceptions=True)
    assert results[0] == "ok:a" and isinstance(results[1], BadInput)
    assert db.batches == [["a", BAD], ["a"], [BAD]]


async def test_the_replacement_is_made_from_the_refused_item_itself(tmp_path: Path) -> None:
    """A webhook the database refuses is kept as its own raw body: `unstorable` is given the
    item that was refused, in a batch or alone."""
    db = FakeDb()
    keep_raw = running(db, Spool(tmp_path), unstorable=lambda item, exc: f"raw:{item}")
    async with keep_raw as commit:
        assert await asyncio.gather(commit.write("a"), commit.write(BAD)) == ["ok:a", "ok:raw:bad"]


async def test_a_refused_replacement_is_spooled_alone_even_after_a_rollback(
    tmp_path: Path,
) -> None:
    """The replacement is not replaced again — not even when its first try was rolled back
    (a deadlock) before the database refused it. Only its own item goes to the spool: the
    rest of the batch is stored."""
    db = FakeDb()
    spool = Spool(tmp_path)
    tries = {"n": 0}

    def deadlock_on_the_replacements_first_try(batch: list[str]) -> BaseException | None:
        if batch == [BAD]:
            tries["n"] += 1
            if tries["n"] == 2:  # the first [BAD] is the item alone, the second its replacement
                return asyncpg.exceptions.DeadlockDetectedError("deadlock")
        return None

    db.fail = deadlock_on_the_replacements_first_try
    async with running(db, spool, unstorable=lambda item, exc: BAD) as commit:
        assert await asyncio.gather(commit.write("a"), commit.write(BAD)) == ["ok:a", None]
    assert db.stored == ["a"]
    assert db.batches == [["a", BAD], ["a"], [BAD], [BAD], [BAD]]
    assert spooled(spool) == [BAD]


async def test_anything_else_the_write_raises_is_an_outage_for_the_spool(tmp_path: Path) -> None:
    """Not the database refusing the data, not a translated driver error: still an outage
    (spooled, answered as stored), never an exception for the sender."""
    db = FakeDb()
    spool = Spool(tmp_path)
    db.fail = lambda batch: RuntimeError("the pool is closing")
    async with running(db, spool) as commit:
        assert await commit.write("a") is None
    assert spooled(spool) == ["a"]


async def test_why_an_item_went_to_the_spool_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = FakeDb()
    spool = Spool(tmp_path)
    with caplog.at_level(logging.WARNING, logger="service.intake.group_commit"):
        db.fail = lambda batch: RuntimeError("the pool is closing")
        async with running(db, spool, kind="submission") as commit:
            assert await commit.write("a") is None
        db.fail = lambda batch: asyncpg.exceptions.DeadlockDetectedError("deadlock")
        async with running(db, spool, kind="event") as commit:
            assert await commit.write("b") is None
        db.fail = lambda batch: None
        async with running(db, spool, unstorable=lambda item, exc: BAD) as commit:
            assert await commit.write(BAD) is None
    logged = [
        (r.levelname, r.getMessage(), getattr(r, "action", None), getattr(r, "kind", None))
        for r in caplog.records
    ]
    assert logged == [
        ("WARNING", "database unavailable, spooling", "spool", "submission"),
        ("WARNING", "database unavailable, spooling", "spool", "event"),
        ("WARNING", "database unavailable, spooling", "spool", "test"),
    ]
    errors = [str(getattr(r, "error", "")) for r in caplog.records]
    assert "the pool is closing" in errors[0]
    assert errors[1] == "repeated transaction rollbacks"
    assert "cannot store the replacement" in errors[2] and "UntranslatableCharacter" in errors[2]


async def test_a_caller_gone_during_the_transaction_leaves_the_others_answered(
    tmp_path: Path,
) -> None:
    db = FakeDb()
    db.gate = asyncio.Event()
    async with running(db, Spool(tmp_path)) as commit:
        writers = {i: asyncio.create_task(commit.write(i)) for i in ("x", "y", "z")}
        await asyncio.sleep(0.05)  # all three in one transaction, which hangs
        assert db.batches == [["x", "y", "z"]]
        writers["y"].cancel()  # y's sender gave up
        db.gate.set()
        assert await writers["x"] == "ok:x"
        assert await asyncio.wait_for(writers["z"], 1.0) == "ok:z"  # answered, not timed out


async def test_the_timeout_still_works_after_every_waiter_was_answered(tmp_path: Path) -> None:
    """The one timer re-arms for later writers after it found nobody left to time out."""
    db = FakeDb()
    spool = Spool(tmp_path)
    async with running(db, spool, timeout_s=0.1) as commit:
        assert await commit.write("a") == "ok:a"
        await asyncio.sleep(0.3)  # a's deadline passes with nobody waiting
        db.gate = asyncio.Event()  # now the database hangs
        assert await asyncio.wait_for(commit.write("b"), 5.0) is None
    assert spooled(spool) == ["b"]


# --- the one timer and the queue, on the loop's clock moved by hand ----------------------------


class LoopClock:
    """The running loop's clock, moved only by the test: a timer fires once the clock is moved
    to its deadline, never by real time passing (nothing here sleeps)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time()

    def __call__(self) -> float:
        return self.now

    def __enter__(self) -> LoopClock:
        self.loop.time = self  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.loop.time  # the class's method again


class ListSpool:
    """A spool that keeps its entries in a list (durable at once, no file, no thread)."""

    def __init__(self) -> None:
        self.items: list[str] = []

    async def append(self, entry: dict[str, Any]) -> None:
        self.items.append(entry["item"])

    def close(self) -> None:
        pass


async def until(done: Callable[[], bool]) -> None:
    """Let the loop run until `done()`; fail if it never is (nothing here waits for time)."""
    for _ in range(10_000):
        if done():
            return
        await asyncio.sleep(0)
    pytest.fail("never happened")


async def test_each_waiter_gives_up_at_its_own_deadline_and_the_timer_moves_to_the_next() -> None:
    """No lost lead while the database hangs: every waiter is answered (from the spool) at its
    own deadline — exactly then, not before, not with an earlier waiter's — by the one timer,
    which re-arms for the next deadline each time."""
    db = FakeDb()
    db.gate = asyncio.Event()  # the database hangs
    spool = ListSpool()
    with LoopClock() as clock:
        async with running(db, spool, timeout_s=2.0) as commit:  # type: ignore[arg-type]
            deadlines: dict[str, float] = {}
            writers: dict[str, asyncio.Task[str | None]] = {}
            for n, name in enumerate(("a", "b", "c")):
                deadlines[name] = clock.now + 2.0  # as write() computes it
                writers[name] = asyncio.create_task(commit.write(name))
                await until(lambda: len(commit._waiting) == n + 1)  # noqa: B023
                clock.now += 0.5
            assert db.batches == [["a"]]  # "a" hangs in its transaction; "b", "c" are queued
            for name, later in (("a", "bc"), ("b", "c"), ("c", "")):
                clock.now = deadlines[name]
                await until(lambda: writers[name].done())  # noqa: B023
                assert writers[name].result() is None
                assert not any(writers[n].done() for n in later), "timed out with an earlier one"
                commit.skip_database(0)  # what a second of real time would do
            assert spool.items == ["a", "b", "c"]
            assert commit._timer is None  # nobody left to time out
            # the timer is armed again for the next writer
            deadline_d = clock.now + 2.0
            d = asyncio.create_task(commit.write("d"))
            await until(lambda: commit._timer is not None)
            clock.now = deadline_d
            await until(d.done)
            assert d.result() is None and spool.items == ["a", "b", "c", "d"]
    assert db.batches == [["a"]]  # the queued ones, given up on, are never written


async def test_given_up_waiters_are_dropped_from_a_long_queue_and_the_live_ones_kept() -> None:
    """No lost lead, and no memory growing without bound, while a stalled transaction holds
    the writer: once PRUNE_AT waiters are queued, the ones that gave up (and spooled) are dropped
    from the queue; the ones still waiting stay and are written when the database answers. The
    queue is pruned again only once it has doubled (linear work for a long stall)."""
    db = FakeDb()
    db.gate = asyncio.Event()
    spool = ListSpool()
    timeout_s = 2.0
    with LoopClock() as clock:
        async with running(db, spool, timeout_s=timeout_s) as commit:  # type: ignore[arg-type]
            stalled = asyncio.create_task(commit.write("stalled"))
            await until(lambda: len(db.batches) == 1)
            doomed = [asyncio.create_task(commit.write(f"d{n}")) for n in range(PRUNE_AT - 600)]
            await until(lambda: len(commit._queue) == len(doomed))
            clock.now += timeout_s / 2
            live = [asyncio.create_task(commit.write(f"l{n}")) for n in range(600)]
            await until(lambda: len(commit._queue) == PRUNE_AT)
            clock.now += timeout_s / 2  # the first lot and "stalled" give up; the rest wait on
            await until(lambda: stalled.done() and all(t.done() for t in doomed))
            assert len(spool.items) == 1 + len(doomed)
            assert not any(t.done() for t in live)
            commit.skip_database(0)
            last = asyncio.create_task(commit.write("last"))
            await until(lambda: len(commit._queue) == 601)  # pruned: the live ones and "last"
            assert [item for item, _ in commit._queue][-1] == "last"
            assert commit._prune_at == 2 * 600
            db.gate.set()
            await until(lambda: last.done() and all(t.done() for t in live))
            assert [t.result() for t in live] == [f"ok:l{n}" for n in range(600)]
            assert last.result() == "ok:last"
    assert sorted(db.stored) == sorted(["stalled", "last", *(f"l{n}" for n in range(600))])


async def test_a_full_queue_of_given_up_waiters_is_emptied_before_the_next_one_joins() -> None:
    """Exactly PRUNE_AT waiters queued, every one given up on: the next writer finds the queue
    pruned to nothing and is written alone when the database answers."""
    db = FakeDb()
    db.gate = asyncio.Event()
    spool = ListSpool()
    with LoopClock() as clock:
        async with running(db, spool, timeout_s=2.0) as commit:  # type: ignore[arg-type]
            stalled = asyncio.create_task(commit.write("stalled"))
            await until(lambda: len(db.batches) == 1)
            doomed = [asyncio.create_task(commit.write(f"d{n}")) for n in range(PRUNE_AT)]
            await until(lambda: len(commit._queue) == PRUNE_AT)
            clock.now += 2.0
            await until(lambda: stalled.done() and all(t.done() for t in doomed))
            commit.skip_database(0)
            last = asyncio.create_task(commit.write("last"))
            await until(lambda: len(commit._queue) == 1)
            assert commit._prune_at == PRUNE_AT  # never below it
            db.gate.set()
            await until(last.done)
            assert last.result() == "ok:last"
    assert db.batches[1:] == [["last"]]
