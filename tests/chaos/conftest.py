"""Chaos runs: the short form runs in CI; `CHAOS_LONG=1` runs the same scenario with the issue's
numbers (5 SIGKILLs during 5,000 submissions, PostgreSQL down 10 s, a 30 s rate-limit storm).

Every test here runs once per CRM kind (amoCRM, Bitrix24): `simulator` is parametrised, and
`crm_settings` points an in-process service at whichever it is (tests/chaos/crms.py). The
resilience fixtures are reused, not copied: a PostgreSQL server the test may stop and start
(`own_pg`), the in-process service (`service_factory`, from tests/conftest.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.chaos import crms
from tests.integration.conftest import own_pg  # noqa: F401  (a fixture, used by name)


@dataclass(frozen=True)
class ChaosPlan:
    """How hard one chaos run pushes."""

    people: int
    kills: int
    pg_down_s: float
    storm_s: float
    submit_rate: float  # submissions per second the clients aim at, so chaos overlaps intake
    deadline_s: float  # for everything to be delivered once the last submission was answered
    error_rate: float = 0.20  # 5xx instead of the work
    timeout_rate: float = 0.05  # the work done, the answer lost (hang past our timeout)

    @property
    def timeout_s(self) -> float:
        """The pytest timeout for one run."""
        return self.people / self.submit_rate + self.deadline_s + 15 * self.kills + 60


SHORT = ChaosPlan(people=600, kills=2, pg_down_s=3, storm_s=3, submit_rate=40, deadline_s=60)
LONG = ChaosPlan(people=5000, kills=5, pg_down_s=10, storm_s=30, submit_rate=35, deadline_s=600)


def chaos_plan() -> ChaosPlan:
    return LONG if os.environ.get("CHAOS_LONG") == "1" else SHORT


@pytest.fixture
def plan() -> ChaosPlan:
    return chaos_plan()


@pytest.fixture(params=crms.KINDS)
async def simulator(request: pytest.FixtureRequest) -> AsyncIterator[tuple[crms.Simulator, str]]:
    """The CRM simulator of this run's kind on a real port (overrides tests/conftest.py's)."""
    async for started in crms.start(request.param):
        yield started


@pytest.fixture
def crm_settings(simulator: tuple[crms.Simulator, str]) -> dict[str, Any]:
    return crms.crm_settings(*simulator)
