"""The in-process building blocks: rate gate, idempotency window, key locks, spool."""

from __future__ import annotations

import asyncio
import errno
import time
import uuid
from pathlib import Path

import pytest

from service.delivery.limits import RateGate
from service.errors import CrmBlocked, SpoolFull
from service.intake.keys import IdempotencyWindow, event_key, submission_key
from service.intake.locks import KeyLocks
from service.intake.spool import Spool
from service.model import Lead
from service.simulators.common import max_in_window


async def test_gate_never_puts_more_than_the_rate_into_any_second() -> None:
    gate = RateGate(10)
    stamps: list[float] = []

    async def caller() -> None:
        for _ in range(5):
            async with gate.slot():
                stamps.append(time.monotonic())

    await asyncio.gather(*(caller() for _ in range(6)))  # 30 calls, a burst from the start
    assert max_in_window(stamps, 1.0) <= 10
    # and it is not timid: 30 calls at 10/s take 2.96 s at best. The margin is for a loaded
    # machine (late wake-ups only ever slow the gate down); a gate that spaced its calls twice
    # as wide would take 5.9 s. The pace itself is measured in bench/, not here.
    assert stamps[-1] - stamps[0] < 5.0


async def test_pause_holds_every_caller() -> None:
    gate = RateGate(100)
    gate.pause(0.3)
    t0 = time.monotonic()
    async with gate.slot():
        pass
    assert time.monotonic() - t0 >= 0.29


async def test_gate_tells_when_a_turn_is_free_that_nobody_waits_for() -> None:
    gate = RateGate(2)  # a turn every 0.51 s
    assert gate.ready_in() == 0.0  # idle: at once, so a lone lead never waits to be claimed
    async with gate.slot():
        pass
    assert 0.4 < gate.ready_in() <= 0.51  # the next turn, not taken by asking
    queued = asyncio.create_task(_one_slot(gate))
    await asyncio.sleep(0.05)
    assert gate.waiting == 1 and gate.ready_in() > 0.3  # that turn is the queued caller's
    await queued
    assert gate.admitted == 2 and gate.ready_in() > 0.4
    gate.pause(5)
    assert gate.ready_in() > 4.5


async def _one_slot(gate: RateGate) -> None:
    async with gate.slot():
        pass


def test_open_circuit_refuses_until_cooldown() -> None:
    gate = RateGate(5)
    gate.open_circuit("403 account blocked", cooldown_s=60)
    with pytest.raises(CrmBlocked):
        gate.check_circuit()
    gate.close_circuit()
    gate.check_circuit()


def test_window_expires_and_stays_bounded() -> None:
    window = IdempotencyWindow(ttl_s=60, size=3)
    ids = [uuid.uuid4() for _ in range(4)]
    for n, sid in enumerate(ids):
        window.put(f"k{n}", sid)
    assert window.get("k0") is None  # oldest evicted
    assert window.get("k3") == ids[3]
    assert len(window) == 3
    off = IdempotencyWindow(ttl_s=0, size=3)
    off.put("k", ids[0])
    assert off.get("k") is None


def test_content_key_ignores_nothing_the_person_typed() -> None:
    a = Lead("f", "+77011234567", None, "Ivan", fields={"comment": "hi"})
    b = Lead("f", "+77011234567", None, "Ivan", fields={"comment": "hi!"})
    assert submission_key("f", a, None) == submission_key("f", a, None)
    assert submission_key("f", a, None) != submission_key("f", b, None)
    assert submission_key("f", a, "k1") == submission_key("f", b, "k1")
    assert submission_key("g", a, "k1") != submission_key("f", a, "k1")


def test_form_and_webhook_keys_never_meet_in_the_shared_window_and_locks() -> None:
    """Forms and webhooks share one window and one KeyLocks: a webhook event's key can be any
    text its sender chose, yet it can never equal a key forms use, nor theirs one of its."""
    lead = Lead("f", "+77011234567", "a@b.kz", "Ivan")
    form_keys = [submission_key("f", lead, "k1"), submission_key("f", lead, None)]
    form_keys += [f"idem:{k}" for k in form_keys] + lead.identities()
    # event keys made to look like form keys, from every kind of source
    mimics = [*form_keys, "k1", "idem:k1"]
    sources = ["amocrm", "bitrix24", "generic/f", "generic/h:f"]
    event_keys = [event_key(source, k) for source in sources for k in mimics]
    assert not set(form_keys) & set(event_keys)
    assert all(k.startswith("e:") for k in event_keys)
    assert not any(k.startswith("e:") for k in form_keys)
    assert len(set(event_keys)) == len(event_keys)  # scoped to their source


async def test_key_locks_serialise_overlapping_holders_only() -> None:
    locks = KeyLocks()
    order: list[str] = []

    async def hold(name: str, keys: list[str], pause: float) -> None:
        async with locks.hold(keys):
            order.append(f"{name}+")
            await asyncio.sleep(pause)
            order.append(f"{name}-")

    await asyncio.gather(
        hold("a", ["phone:1", "email:x"], 0.05),
        hold("b", ["email:x", "phone:1"], 0.0),  # same keys, other order: no deadlock
        hold("c", ["phone:2"], 0.0),
    )
    assert order.index("a-") < order.index("b+")
    assert order.index("c-") < order.index("a-")  # c did not wait for a
    assert locks.held() == {}


async def test_key_locks_release_on_cancel() -> None:
    locks = KeyLocks()
    async with locks.hold(["k"]):
        waiter = asyncio.create_task(_take(locks))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    async with locks.hold(["k"]):
        assert list(locks.held()) == ["k"]
    assert locks.held() == {}


async def test_a_key_handed_to_a_waiter_cancelled_meanwhile_goes_to_the_next() -> None:
    locks = KeyLocks()
    holding = locks.hold(["k"])
    await holding.__aenter__()
    first, second = asyncio.create_task(_take(locks)), asyncio.create_task(_take(locks))
    await asyncio.sleep(0.01)  # both queued behind the holder
    await holding.__aexit__(None, None, None)  # k is handed to `first` …
    first.cancel()  # … which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)  # `first` passed k on
    assert locks.held() == {} and locks.waits == 2


async def _take(locks: KeyLocks) -> None:
    async with locks.hold(["k"]):
        pass


async def test_spool_drains_every_entry_and_skips_a_torn_last_line(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for n in range(3):
        await spool.append({"type": "t", "n": n})
    # a write that was never fsynced (never acknowledged) may be torn by a crash
    path = spool.pending_files()[0]
    with open(path, "ab") as f:
        f.write(b'{"type": "t", "n": 9')
    got: list[int] = []

    async def handler(entries: list[dict[str, object]]) -> None:
        got.extend(int(str(e["n"])) for e in entries)

    assert await spool.drain({"t": handler}) == 3
    assert got == [0, 1, 2]
    assert spool.pending_files() == []


async def test_spool_keeps_the_file_when_the_handler_fails(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    await spool.append({"type": "t"})

    async def broken(entries: list[dict[str, object]]) -> None:
        raise RuntimeError("database went away again")

    with pytest.raises(RuntimeError):
        await spool.drain({"t": broken})
    assert len(spool.pending_files()) == 1


async def test_spool_file_of_a_live_writer_is_not_drained(tmp_path: Path) -> None:
    writer = Spool(tmp_path)
    await writer.append({"type": "t"})
    other = Spool(tmp_path)
    calls: list[int] = []

    async def handler(entries: list[dict[str, object]]) -> None:
        calls.append(len(entries))

    # the writer's file is flock'ed by its (live) owner: another drainer leaves it alone
    [path] = writer.pending_files()
    assert await other._drain_file(path, {"t": handler}) == 0
    assert calls == []
    writer.close()
    assert path.exists() and b'"type":"t"' in path.read_bytes()  # not deleted, not emptied


async def test_spool_refuses_appends_past_its_byte_cap(tmp_path: Path) -> None:
    spool = Spool(tmp_path, max_bytes=1000)
    await spool.append({"type": "t", "x": "a" * 400})
    with pytest.raises(SpoolFull):
        await spool.append({"type": "t", "x": "b" * 700})
    assert spool.refused == 1
    spool.close()
    [path] = spool.pending_files()
    assert b"b" * 700 not in path.read_bytes()  # nothing of it written


async def test_spool_says_full_when_its_volume_refuses_the_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)

    def no_space(lines: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "_write", no_space)
    with pytest.raises(SpoolFull, match="No space left"):
        await spool.append({"type": "t"})
