"""The Bitrix24 simulator's settings, and parsing what `POST /_sim/faults` may change."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from service.simulators.bitrix24.limits import CommandFault
from service.simulators.bitrix24.oauth import BitrixOAuthConfig
from service.simulators.common import ScriptedAnswer
from service.simulators.control import RANDOM_FAULT_FIELDS, fault_changes, json_items

__all__ = ["FAULT_FIELDS", "BitrixSimulatorConfig", "parse_faults"]

# What `POST /_sim/faults` may change, with the JSON type each value must have.
FAULT_FIELDS = RANDOM_FAULT_FIELDS | {
    "drain_per_s": float,
    "burst": int,
    "operating_limit_s": float,
    "operating_window_s": float,
    "method_cost_s": float,
    "overload_after": int,
    "overload_window_s": float,
}


@dataclass
class BitrixSimulatorConfig:
    """How the simulated portal behaves; mutable while the simulator runs."""

    webhook_secret: str = "sim-secret"
    drain_per_s: float = 2.0  # leaky bucket drain (Enterprise: 5)
    burst: int = 50  # leaky bucket size (Enterprise: 250)
    operating_limit_s: float = 480.0  # server seconds per method per window
    operating_window_s: float = 600.0
    method_cost_s: float = 0.01  # simulated server seconds per call of any method...
    method_costs: dict[str, float] = field(default_factory=dict)  # ...unless named here
    overload_after: int = 20  # this many violations within overload_window_s: manual block
    overload_window_s: float = 60.0
    latency_s: float = 0.0
    error_rate: float = 0.0  # fraction answered 5xx without doing the work
    timeout_rate: float = 0.0  # fraction that hang for hang_s after doing the work
    hang_s: float = 60.0
    reset_rate: float = 0.0  # fraction whose connection is dropped after doing the work
    seed: int | None = None
    # the OAuth app whose tokens `/rest/{method}.json` accepts in `auth` (webhooks work alongside)
    oauth: BitrixOAuthConfig = field(default_factory=BitrixOAuthConfig)


def parse_faults(
    changes: dict[str, Any],
) -> tuple[dict[str, Any], list[ScriptedAnswer], list[CommandFault]]:
    """Check a `/_sim/faults` body: (config changes, `fail_next` answers, `fail_command` faults).

    Nothing is applied here, so a body with one bad value changes nothing; ValueError says what
    is wrong.
    """
    changes = dict(changes)
    listed = json_items(changes.pop("fail_command", []), "fail_command")
    commands = [CommandFault.from_json(item) for item in listed]
    costs = changes.pop("method_costs", None)
    if costs is not None and not _costs_ok(costs):
        raise ValueError("method_costs: expected an object of non-negative numbers")
    settings, answers = fault_changes(FAULT_FIELDS, changes)
    if costs is not None:
        settings["method_costs"] = dict(costs)
    return settings, answers, commands


def _costs_ok(costs: Any) -> bool:
    return isinstance(costs, dict) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in costs.values()
    )
