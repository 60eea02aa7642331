"""The cluster's delivery pause reaches every process: one whose LISTEN connection is down (say,
DATABASE_DIRECT_URL unreachable while the pool still answers) reads the switch on a timer
instead, and says why in /readyz. The database and the LISTEN are fakes here; the NOTIFY path
itself is tests/integration/test_admin.py's."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import pytest

from service.db.admin_store import Switch
from service.delivery import control as control_module
from service.delivery.control import DeliveryControl
from service.delivery.worker import Worker
from service.logs import Trouble
from service.ops.runtime import Runtime
from tests.conftest import wait_for


class FakeDatabase:
    """The switch row, read through the pool; counts the reads."""

    def __init__(self) -> None:
        self.switch = Switch(paused=False, changed_at=None, changed_by="")
        self.reads = 0

    async def read_switch(self, pool: object) -> Switch:
        self.reads += 1
        return self.switch


class FakeWorker:
    def problems(self) -> list[str]:
        return []


@pytest.fixture
def database(monkeypatch: pytest.MonkeyPatch) -> FakeDatabase:
    db = FakeDatabase()
    monkeypatch.setattr(control_module, "read_switch", db.read_switch)
    monkeypatch.setattr(control_module, "POLL_S", 0.01)
    return db


def listen(up: bool) -> Callable[..., Any]:
    async def listen_forever(
        dsn: str, channel: str, wake: Callable[..., None], trouble: Trouble
    ) -> None:
        if up:
            trouble.ok()
            wake()  # connected: it reads the switch once, as on every (re)connect
        else:
            trouble.failed("cannot connect: ConnectionRefusedError(111)")
        await asyncio.Event().wait()

    return listen_forever


@contextlib.asynccontextmanager
async def following(control: DeliveryControl) -> AsyncIterator[None]:
    """`control` following the switch (as the worker's process does) until the block ends."""
    task = asyncio.create_task(control.run())
    try:
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_a_pause_reaches_a_process_whose_listen_connection_is_down(
    database: FakeDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_module, "listen_forever", listen(up=False))
    control = DeliveryControl(pool=None, dsn="postgresql://direct")
    applied: list[bool] = []
    control.follow(applied.append)
    async with following(control):
        # an operator pauses through another process: this one cannot hear the NOTIFY
        database.switch = Switch(paused=True, changed_at=None, changed_by="ops")

        async def paused() -> bool:
            return applied == [False, True]

        await wait_for(paused, timeout=10, every=0.01)
        # and /readyz says why a pause may come late here (the worker's part, its alert)
        [reason] = runtime(control).stopped_parts()["worker"]
        assert reason.startswith("delivery pause: LISTEN crm_relay_delivery failing for ")
        assert reason.endswith("cannot connect: ConnectionRefusedError(111)")


async def test_with_its_listen_connection_up_the_switch_is_not_polled(
    database: FakeDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(control_module, "listen_forever", listen(up=True))
    control = DeliveryControl(pool=None, dsn="postgresql://direct")
    async with following(control):

        async def connected() -> bool:
            return database.reads == 1

        await wait_for(connected, timeout=10, every=0.01)
        for _ in range(5):  # five poll intervals: the NOTIFY, not the timer, carries changes
            await asyncio.sleep(0.01)
        assert database.reads == 1
        assert control.problems() == [] and runtime(control).stopped_parts() == {}


def runtime(control: DeliveryControl) -> Runtime:
    """A process running a worker (that works) and no forwarder, following `control`."""
    return Runtime(worker=cast(Worker, FakeWorker()), forwarder_expected=False, control=control)
