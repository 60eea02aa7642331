"""The Bitrix24 simulator the delivery tests share: a roomy bucket, because those tests are about
duplicates, batches and refusals; the limit has its own tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from service.simulators.bitrix24.server import (
    BitrixSimulator,
    BitrixSimulatorConfig,
    start_bitrix_simulator,
)


@contextlib.asynccontextmanager
async def roomy_simulator() -> AsyncIterator[tuple[BitrixSimulator, str]]:
    """A started simulator and its base URL, cleaned up after."""
    sim = BitrixSimulator(BitrixSimulatorConfig(drain_per_s=400, burst=250, overload_after=1000))
    runner, url = await start_bitrix_simulator(sim)
    try:
        yield sim, url
    finally:
        await runner.cleanup()
