"""Per-person locks inside a process (`KeyLocks`): one person's concurrent requests resolve one
way, and nobody is left waiting for a lock that nobody holds.

Found by mutation testing (scripts/mutate locks): each test fails with a mutant that once
survived. Every wait here is bounded by SETTLE_S; a correct lock is handed over at once.
"""

from __future__ import annotations

import asyncio

import pytest

from service.intake.locks import KeyLocks

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
