"""The guards behind our promises, each named for the promise it keeps.

Every test here was checked against a deliberate bug in the code it guards (the mutant named in
its docstring): with the bug in place the test fails. Time is a fake clock wherever the code
takes one; where real waiting is the behaviour (a pause, a lock), the margins are wide.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from pathlib import Path

import pytest

from service.delivery.limits import RateGate
from service.delivery.outcomes import CrmOutcomes, Kind
from service.errors import CircuitOpen, CrmBlocked, CrmUnauthorized
from service.intake import spool as spool_module
from service.intake.keys import IdempotencyWindow
from service.intake.locks import KeyLocks
from service.intake.spool import Spool
from service.settings import DeliverySettings

DEADLOCK_S = 5.0  # a hold that takes this long has deadlocked: every key is free within 0.2 s


class Clock:
    """Monotonic time that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# --- the idempotency window ----------------------------------------------------------------


def test_a_repeat_is_answered_from_memory_only_within_the_window() -> None:
    """Mutant killed: the window's TTL check disabled (keys.py) — keys would never expire and
    the window would answer from memory for ever, past IDEMPOTENCY_WINDOW_S."""
    clock = Clock()
    window = IdempotencyWindow(ttl_s=300, size=10, clock=clock)
    sid = uuid.uuid4()
    window.put("k", sid)
    clock.now += 299
    assert window.get("k") == sid
    clock.now += 2
    assert window.get("k") is None
    assert len(window) == 0  # an expired key is dropped, not kept


# --- the circuit ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "refusal",
    [
        CrmBlocked("403 account blocked", status=403),
        CrmUnauthorized("401 token refused", status=401),
    ],
)
async def test_a_blocked_account_opens_the_circuit_and_no_crm_call_is_made_during_the_cool_down(
    refusal: Exception,
) -> None:
    """Mutants killed: the circuit never opening on a 403/401 (the error map), and the circuit
    ignoring its cool-down (limits.py)."""
    clock = Clock()
    gate = RateGate(100, clock=clock)
    outcomes = CrmOutcomes(gate, DeliverySettings(circuit_cooldown_s=60.0))
    calls: list[float] = []

    async def crm_call() -> None:
        async with gate.slot():
            calls.append(clock.now)

    await crm_call()
    decision = outcomes.decide(refusal, attempts=0)  # type: ignore[arg-type]
    assert decision.kind is Kind.CIRCUIT and decision.delay_s == 60.0
    assert gate.circuit.is_open
    for _ in range(3):  # the cool-down: every call is refused before it reaches the CRM
        clock.now += 19
        with pytest.raises(CircuitOpen):
            await crm_call()
    assert len(calls) == 1
    clock.now += 4  # 61 s after the 403: one probe goes through
    await crm_call()
    assert len(calls) == 2


# --- per-key locks --------------------------------------------------------------------------


async def test_two_holders_of_the_same_keys_in_opposite_orders_never_deadlock() -> None:
    """Mutant killed: keys taken in the order given instead of sorted (locks.py). A third holder
    keeps "a" so that both others must queue: A waits for "a" holding nothing, B takes "b" (free)
    and waits for "a" too; when "a" is handed to A, A needs "b" — held by B, which waits for A."""
    locks = KeyLocks()
    third = locks.hold(["a"])
    await third.__aenter__()
    order: list[str] = []

    async def hold(name: str, keys: list[str]) -> None:
        async with locks.hold(keys):
            order.append(name)

    first = asyncio.create_task(hold("A", ["a", "b"]))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(hold("B", ["b", "a"]))
    await asyncio.sleep(0.05)
    await third.__aexit__(None, None, None)
    await asyncio.wait_for(asyncio.gather(first, second), DEADLOCK_S)
    assert order == ["A", "B"]
    assert locks.held() == {}


# --- the spool ------------------------------------------------------------------------------


async def test_an_append_returns_only_after_the_fsync_that_covers_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutant killed: the spool answering before `fsync` (spool.py): a SIGKILL right after the
    answer would lose an acknowledged lead."""
    synced: list[tuple[float, int]] = []  # (when the fsync ended, bytes of the file it covered)
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.05)  # a slow disk: an answer that does not wait for it shows
        real_fsync(fd)
        synced.append((time.monotonic(), os.fstat(fd).st_size))

    monkeypatch.setattr(spool_module.os, "fsync", slow_fsync)
    spool = Spool(tmp_path)
    line = b'{"type":"submission","n":1}\n'
    await spool.append({"type": "submission", "n": 1})
    answered = time.monotonic()
    assert synced, "append returned without an fsync"
    ended, covered = synced[-1]
    assert ended <= answered
    assert covered >= len(line)
    spool.close()


async def test_a_spool_entry_of_an_unknown_type_is_kept_not_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Mutant killed: entries of an unknown type dropped and their file deleted (spool.py):
    silent loss of acknowledged data (say, spooled by a newer version, drained by an older)."""
    spool = Spool(tmp_path)
    await spool.append({"type": "from-a-newer-version", "n": 1})
    handled: list[object] = []

    async def handler(entries: list[dict[str, object]]) -> None:
        handled.extend(entries)

    with caplog.at_level(logging.ERROR, logger="service.intake.spool"):
        assert await spool.drain({"submission": handler}) == 0
    assert handled == []
    [kept] = spool.pending_files()
    assert b"from-a-newer-version" in kept.read_bytes()
    assert any(r.levelno == logging.ERROR for r in caplog.records)


# --- the shared pause -----------------------------------------------------------------------


async def test_a_pause_that_begins_while_callers_are_queued_holds_them_too() -> None:
    """Mutant killed: the re-check after the turn in `RateGate._admit` removed (limits.py): a
    caller already queued in the bucket when a 429 arrives would send during the pause."""
    gate = RateGate(20)
    sent: list[float] = []

    async def caller() -> None:
        async with gate.slot():
            sent.append(time.monotonic())

    burst = [asyncio.create_task(caller()) for _ in range(30)]  # 20 go at once, 10 queue
    await asyncio.sleep(0.1)
    assert 0 < len(sent) < 30, "some callers must still be queued when the 429 arrives"
    paused_at = time.monotonic()
    gate.pause(1.5)
    await asyncio.wait_for(asyncio.gather(*burst), 10)
    during = [t for t in sent if paused_at <= t < paused_at + 1.4]
    assert during == [], f"{len(during)} calls were sent during the pause"
