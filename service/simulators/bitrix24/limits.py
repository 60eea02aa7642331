"""Bitrix24's two limits, its `time` envelope, and scripted per-method errors.

- The leaky bucket is per portal: every request (a whole `batch` included) adds 1, the level
  drains continuously, and a request that would lift it above `burst` is refused without being
  added, so a client that backs off recovers at the drain rate.
- Operating time is per method: each call spends simulated server seconds; once a method has
  spent its allowance in the current window it is refused until the window's reset time.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "CommandFault",
    "LeakyBucket",
    "OperatingTime",
    "Usage",
    "take_command_fault",
    "time_envelope",
]


class LeakyBucket:
    """A level that rises by 1 per admitted request and drains `drain_per_s` per second."""

    def __init__(self) -> None:
        self.level = 0.0
        self.max_level = 0.0
        self._at: float | None = None

    def arrive(self, now: float, drain_per_s: float, burst: float) -> bool:
        """Admit one request at `now`; False (and the level unchanged) if it would overflow."""
        self._drain(now, drain_per_s)
        if self.level + 1 > burst:
            return False
        self.level += 1
        self.max_level = max(self.max_level, self.level)
        return True

    def _drain(self, now: float, drain_per_s: float) -> None:
        if self._at is not None and now > self._at:
            self.level = max(0.0, self.level - (now - self._at) * drain_per_s)
        self._at = now if self._at is None else max(self._at, now)

    def clear(self) -> None:
        self.level = 0.0
        self.max_level = 0.0
        self._at = None


@dataclass
class Usage:
    """One method's server time in its current window."""

    used: float
    reset_at: float  # unix seconds when `used` goes back to zero


class OperatingTime:
    """Simulated server seconds per method, in fixed windows that start at a method's first use."""

    def __init__(self) -> None:
        self._by_method: dict[str, Usage] = {}

    def usage(self, method: str, now: float, window_s: float) -> Usage:
        """The method's usage at `now`, starting a fresh window once the old one has ended."""
        usage = self._by_method.get(method)
        if usage is None or now >= usage.reset_at:
            usage = self._by_method[method] = Usage(0.0, now + window_s)
        return usage

    def exhausted(self, method: str, now: float, limit_s: float, window_s: float) -> bool:
        return self.usage(method, now, window_s).used >= limit_s

    def spend(self, method: str, now: float, seconds: float, window_s: float) -> Usage:
        usage = self.usage(method, now, window_s)
        usage.used += seconds
        return usage

    def to_json(self) -> dict[str, dict[str, float]]:
        return {m: {"used": u.used, "reset_at": u.reset_at} for m, u in self._by_method.items()}

    def clear(self) -> None:
        self._by_method.clear()


def time_envelope(start: float, finish: float, processing: float, usage: Usage) -> dict[str, Any]:
    """The `time` object Bitrix24 adds to every answer; `operating` is the method's usage."""
    return {
        "start": start,
        "finish": finish,
        "duration": finish - start,
        "processing": processing,
        "date_start": _iso(start),
        "date_finish": _iso(finish),
        "operating_reset_at": int(usage.reset_at),
        "operating": round(usage.used, 6),
    }


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


@dataclass
class CommandFault:
    """The next `count` calls of a method (a shell pattern) answer `error` instead of working.

    It applies to direct calls (with HTTP `status`) and to commands inside a batch (as that
    command's entry in `result_error`). With `apply` the work is done first and only the answer
    is an error: the write landed, the client is told it failed.
    """

    method: str
    count: int = 1
    error: str = "ERROR_CORE"
    description: str = "Scripted failure"
    status: int = 400
    apply: bool = False

    @classmethod
    def from_json(cls, data: Any) -> CommandFault:
        """Parse one `fail_command` item; ValueError says what is wrong with it."""
        if not isinstance(data, dict) or not isinstance(data.get("method"), str):
            raise ValueError("fail_command items must be objects with a method")
        try:
            fault = cls(
                method=data["method"],
                count=int(data.get("count", 1)),
                error=str(data.get("error", "ERROR_CORE")),
                description=str(data.get("description", "Scripted failure")),
                status=int(data.get("status", 400)),
                apply=bool(data.get("apply", False)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"fail_command item {data!r}: {exc}") from exc
        if fault.count < 1 or not 400 <= fault.status <= 599:
            raise ValueError(f"fail_command item {data!r}: bad count or status")
        return fault

    def matches(self, method: str) -> bool:
        return fnmatch.fnmatchcase(method, self.method)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "count": self.count,
            "error": self.error,
            "description": self.description,
            "status": self.status,
            "apply": self.apply,
        }


def take_command_fault(faults: list[CommandFault], method: str) -> CommandFault | None:
    """Consume the first scripted fault for `method`, in the order they were added."""
    for fault in faults:
        if fault.matches(method):
            fault.count -= 1
            if fault.count == 0:
                faults.remove(fault)
            return fault
    return None
