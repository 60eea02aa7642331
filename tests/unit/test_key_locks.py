"""Per-person locks inside a process (`KeyLocks`): one person's concurrent requests resolve one
way, and nobody is left waiting for a lock that nobody holds.

Found by mutation testing (scripts/mutate locks): each test fails with a mutant that once
survived. Every wait here is bounded by SETTLE_S; a correct lock is handed over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.intake.locks import (
    PERSON_LOCK_SPACE,
    QUERIES,
    KeyLocks,
    person_lock_key,
    person_locks_held,
)

SETTLE_S = 0.05  # long enough for the tasks below to queue; nothing here waits on real time
HUNG_S = 5.0
HELD_S = 0.3


async def test_a_holder_cancelled_while_queued_releases_only_the_keys_it_took() -> None:
    """X holds "b"; Y takes "a", then queues for "b" and is cancelled (its request timed out).
    Y must give back "a" and leave X's "b" alone: handing out a key it never took would let a
    third request in beside X — the same person resolved twice."""
    locks = KeyLocks()
    x = locks.hold(["b"])
    await x.__aenter__()

    async def y_holds() -> None:
        async with locks.hold(["a", "b"]):
            pass

    y = asyncio.create_task(y_holds())
    await asyncio.sleep(SETTLE_S)
    assert set(locks.held()) == {"a", "b"}
    y.cancel()
    with pytest.raises(asyncio.CancelledError):
        await y
    assert set(locks.held()) == {"b"}, "the cancelled holder gave back a key it did not take"

    z_in = asyncio.Event()

    async def z_holds() -> None:
        async with locks.hold(["b"]):
            z_in.set()

    z = asyncio.create_task(z_holds())
    await asyncio.sleep(SETTLE_S)
    assert not z_in.is_set(), "a second holder of 'b' got in while X holds it"
    await x.__aexit__(None, None, None)
    await asyncio.wait_for(z, HUNG_S)
    assert locks.held() == {}


async def test_the_lock_list_shows_how_long_each_key_has_been_held_by_its_holder() -> None:
    """The admin lock list: seconds held, counted from when the current holder got the key
    (a handed-over key starts again), never negative."""
    locks = KeyLocks()
    first = locks.hold(["phone:+77011234567"])
    await first.__aenter__()
    await asyncio.sleep(HELD_S)
    [(key, held_by_first)] = locks.held().items()
    assert key == "phone:+77011234567"
    assert HELD_S * 0.9 <= held_by_first < HUNG_S

    got_it = asyncio.Event()
    release = asyncio.Event()

    async def second_holder() -> None:
        async with locks.hold(["phone:+77011234567"]):
            got_it.set()
            await release.wait()

    second = asyncio.create_task(second_holder())
    await asyncio.sleep(SETTLE_S)
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(got_it.wait(), HUNG_S)
    [seconds] = locks.held().values()
    assert 0 <= seconds < held_by_first, "the new holder's time must start at the handover"
    release.set()
    await asyncio.wait_for(second, HUNG_S)
    assert locks.held() == {}
    assert locks.waits == 1


# --- across processes: the keys PostgreSQL's advisory locks are taken on ------------------------


def test_a_person_lock_key_is_the_one_the_database_computes() -> None:
    """No duplicate lead across processes: relay_ingest locks
    `('x' || substr(md5(identity), 1, 8))::bit(32)::integer` (migration 010), so a process that
    computed another key would not wait for the other's transaction on the same person. The
    values below are that SQL's (the first 8 hex digits of the MD5, read as a signed 32-bit
    integer); tests/integration/test_cluster.py checks the same identities against PostgreSQL."""
    assert person_lock_key("phone:+77010000001") == -623963469  # 0xdacf12b3: signed
    assert person_lock_key("email:ivan.petrov@почта.рф") == 1117003579  # MD5 of the UTF-8
    assert person_lock_key("x") == -1646992287
    assert person_lock_key("") == -736260903


def test_a_person_lock_key_is_computed_on_a_host_that_forbids_md5_for_security_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No duplicate lead on a FIPS-mode host: there OpenSSL refuses MD5 unless it is declared
    not used for security (as here: a lock key, not a secret). Refused, every ingest would fail
    instead of locking the person."""
    real_md5 = hashlib.md5

    def fips_md5(data: bytes = b"", *, usedforsecurity: bool = True) -> Any:
        if usedforsecurity:
            raise ValueError("[digital envelope routines] unsupported")
        return real_md5(data, usedforsecurity=False)

    monkeypatch.setattr(hashlib, "md5", fips_md5)
    assert person_lock_key("x") == -1646992287


class _Conn:
    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows = rows
        self.calls: list[tuple[str, tuple[object, ...]]] = []

    async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
        self.calls.append((query, args))
        return self.rows


class _Pool:
    def __init__(self, conn: _Conn) -> None:
        self.conn = conn

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[_Conn]:
        yield self.conn


async def test_the_cluster_lock_list_asks_for_the_person_lock_space_and_lists_every_row() -> None:
    """The admin lock list shows the person locks held anywhere in the cluster: the query is
    asked for this module's lock space (the one relay_ingest locks in), and every row comes
    back as a plain dict. The query itself runs in tests/integration/test_admin.py."""
    rows: list[dict[str, object]] = [
        {"holder": "relay-1", "key": 3671003827, "granted": True, "connected_s": 12.5},
        {"holder": "relay-2", "key": 3671003827, "granted": False, "connected_s": 3.0},
    ]
    conn = _Conn(rows)
    listed = await person_locks_held(_Pool(conn))  # type: ignore[arg-type]
    assert listed == rows and all(type(r) is dict for r in listed)
    assert conn.calls == [(QUERIES["person_locks_held"], (PERSON_LOCK_SPACE,))]
    assert PERSON_LOCK_SPACE == 72_811_978  # the space migration 010's relay_ingest locks in
    assert "pg_locks" in conn.calls[0][0]
