"""What a chaos run needs to know of each CRM: its simulator's limit and faults, the service's
settings for it, how its rate-limit storm and token expiry are staged, and what it reports.

The scenario and the final check (test_chaos.py) are the same for every kind; only this differs:

- amoCRM: at most 100 requests in any sliding second, ours 80/s; the storm answers every API call
  429 (scripted); OAuth, a 401 makes us refresh; a violation is the window exceeded by us.
- Bitrix24: a leaky bucket of 50 (Bitrix24's own size) draining 50/s, ours 50/s; the storm
  answers every REST call 503 `QUERY_LIMIT_EXCEEDED` (`BitrixSimulator.storm`) while the bucket
  keeps draining; OAuth app tokens, `expired_token` (401) makes us refresh; a violation is the
  bucket overflowed by us (the storm is the portal's doing, not a violation).

Both are far faster than the real ones (amoCRM 7/s, Bitrix24 2/s) so that a run stays short; the
relations are the real ones: amoCRM's limit is a hard window we keep well under, Bitrix24's bucket
drains at the rate we are configured with, as `CRM_RATE_LIMIT`'s default (2 for 2/s) does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from service.simulators.amocrm.server import AmoCrmSimulator, SimulatorConfig, start_simulator
from service.simulators.bitrix24.server import (
    BitrixSimulator,
    BitrixSimulatorConfig,
    start_bitrix_simulator,
)

KINDS = ("amocrm", "bitrix24")
HANG_S = 2.0  # a "timeout" answer hangs this long; our CRM_TIMEOUT_S is 1
AMO_LIMIT = 100  # the simulated account's limit (requests in any sliding second)
AMO_RATE = 80  # CRM_RATE_LIMIT: below the account's limit, as an operator would set it
BITRIX_DRAIN = 50.0  # the simulated portal's bucket drains this many requests a second...
BITRIX_BURST = 50  # ...and holds this many (Bitrix24's own size)
BITRIX_RATE = BITRIX_DRAIN  # CRM_RATE_LIMIT: the drain rate, like the default 2 for 2/s

Simulator = AmoCrmSimulator | BitrixSimulator


async def start(kind: str) -> AsyncIterator[tuple[Simulator, str]]:
    """A simulator of `kind` on a real port with a roomy limit (a test may tighten it)."""
    if kind == "amocrm":
        amo = AmoCrmSimulator(SimulatorConfig(rate_limit=200, block_after=1000))
        runner, url = await start_simulator(amo)
        sim: Simulator = amo
    else:
        bitrix = BitrixSimulator(
            BitrixSimulatorConfig(drain_per_s=400, burst=250, overload_after=1000)
        )
        runner, url = await start_bitrix_simulator(bitrix)
        sim = bitrix
    try:
        yield sim, url
    finally:
        await runner.cleanup()


def crm_settings(sim: Simulator, url: str) -> dict[str, Any]:
    """`Settings` overrides for an in-process service (tests/conftest.py's service_factory)."""
    if isinstance(sim, BitrixSimulator):
        return {"crm_kind": "bitrix24", "bitrix24_webhook_url": sim.webhook_url(url)}
    return {}


class ChaosCrm(Protocol):
    """One simulator as the chaos run drives it."""

    kind: str
    storm_name: str  # what the storm answers

    def prepare(self, error_rate: float) -> None:
        """The run's limit, 5xx rate and hang length (lost answers start later)."""

    def env(self) -> dict[str, str]:
        """The service's CRM variables: which CRM, where, OAuth credentials, our rate."""
        ...

    def refresh_token(self) -> str:
        """The refresh token the CRM holds now: it changes with every refresh."""
        ...

    def set_timeout_rate(self, rate: float) -> None: ...

    def faults_off(self) -> None: ...

    async def storm(self, seconds: float) -> None:
        """Every API call refused as over the limit for `seconds`: the CRM's doing, not ours."""

    def expire_tokens(self) -> None: ...

    def report(self) -> dict[str, Any]: ...

    def storm_refusals(self) -> int:
        """How many calls the storm has refused so far."""
        ...

    def limit_figures(self, report: dict[str, Any]) -> str:
        """The limit as the CRM saw it, for the run's summary line."""
        ...


class AmoChaos:
    kind = "amocrm"
    storm_name = "429"

    def __init__(self, sim: AmoCrmSimulator, url: str) -> None:
        self.sim, self.url = sim, url

    def prepare(self, error_rate: float) -> None:
        cfg = self.sim.config
        cfg.rate_limit, cfg.error_rate, cfg.hang_s = AMO_LIMIT, error_rate, HANG_S

    def env(self) -> dict[str, str]:
        cfg = self.sim.config
        return {
            "CRM": "amocrm",
            "AMOCRM_BASE_URL": self.url,
            "AMOCRM_CLIENT_ID": cfg.client_id,
            "AMOCRM_CLIENT_SECRET": cfg.client_secret,
            "AMOCRM_REFRESH_TOKEN": cfg.refresh_token,
            "AMOCRM_REDIRECT_URI": "https://relay.example/oauth",
            "CRM_RATE_LIMIT": str(AMO_RATE),
        }

    def refresh_token(self) -> str:
        return self.sim.tokens.refresh_token

    def set_timeout_rate(self, rate: float) -> None:
        self.sim.config.timeout_rate = rate

    def faults_off(self) -> None:
        self.sim.config.error_rate = self.sim.config.timeout_rate = 0.0

    async def storm(self, seconds: float) -> None:
        self.sim.fail_next("*", "/api/v4/*", 429, count=10**9)
        await asyncio.sleep(seconds)
        self.sim.faults.scripted[:] = [a for a in self.sim.faults.scripted if a.status != 429]

    def expire_tokens(self) -> None:
        self.sim.expire_tokens()

    def report(self) -> dict[str, Any]:
        return self.sim.report()

    def storm_refusals(self) -> int:
        return self.sim.log.by_status().get("429", 0)

    def limit_figures(self, report: dict[str, Any]) -> str:
        return f"max in any second {report['max_in_any_second']} (limit {AMO_LIMIT})"


class BitrixChaos:
    kind = "bitrix24"
    storm_name = "503 QUERY_LIMIT_EXCEEDED"

    def __init__(self, sim: BitrixSimulator, url: str) -> None:
        self.sim, self.url = sim, url

    def prepare(self, error_rate: float) -> None:
        cfg = self.sim.config
        cfg.drain_per_s, cfg.burst = BITRIX_DRAIN, BITRIX_BURST
        cfg.error_rate, cfg.hang_s = error_rate, HANG_S

    def env(self) -> dict[str, str]:
        app = self.sim.config.oauth
        return {
            "CRM": "bitrix24",
            "BITRIX24_PORTAL_URL": self.sim.portal_url(self.url),
            "BITRIX24_OAUTH_URL": self.sim.oauth_url(self.url),
            "BITRIX24_CLIENT_ID": app.client_id,
            "BITRIX24_CLIENT_SECRET": app.client_secret,
            "BITRIX24_REFRESH_TOKEN": app.refresh_token,
            "CRM_RATE_LIMIT": str(BITRIX_RATE),
        }

    def refresh_token(self) -> str:
        return self.sim.tokens.refresh_token

    def set_timeout_rate(self, rate: float) -> None:
        self.sim.config.timeout_rate = rate

    def faults_off(self) -> None:
        self.sim.config.error_rate = self.sim.config.timeout_rate = 0.0

    async def storm(self, seconds: float) -> None:
        self.sim.storm(seconds)
        await asyncio.sleep(seconds)

    def expire_tokens(self) -> None:
        self.sim.expire_tokens()

    def report(self) -> dict[str, Any]:
        return self.sim.report()

    def storm_refusals(self) -> int:
        return self.sim.faults.storm.refused

    def limit_figures(self, report: dict[str, Any]) -> str:
        return (
            f"max bucket level {report['max_bucket_level']:.1f} (burst {BITRIX_BURST}, drain "
            f"{BITRIX_DRAIN:g}/s); storm refusals {report['storm']['refused']}; "
            f"max in any second {report['max_in_any_second']}"
        )


def chaos_crm(sim: Simulator, url: str) -> ChaosCrm:
    return BitrixChaos(sim, url) if isinstance(sim, BitrixSimulator) else AmoChaos(sim, url)
