"""One gate for every outbound CRM call: the rate limit, the shared pause, the circuit.

`aiolimiter.AsyncLimiter(rate, 1)` starts with a full bucket of `rate` tokens and refills at
`rate`/s, so its first second lets up to twice the rate through. A CRM counts requests in any
sliding second, so we use a bucket of one token refilled every `1/rate` seconds (stretched by a
small margin for network jitter): no one-second window can ever hold more than `rate` calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from service.errors import CrmBlocked

log = logging.getLogger(__name__)

# Calls are spaced 2% wider than 1/rate: loopback and LAN jitter are well under that.
SPACING_MARGIN = 1.02


@dataclass
class CircuitState:
    """Open after the CRM blocked the account; a probe after the cool-down may close it."""

    open_until: float = 0.0
    reason: str = ""
    opened_at: float = 0.0

    @property
    def is_open(self) -> bool:
        return self.reason != ""


class RateGate:
    """The one aiolimiter bucket all CRM calls share, plus a pause that holds everyone."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._limiter = AsyncLimiter(1, SPACING_MARGIN / rate)
        self._paused_until = 0.0
        self.circuit = CircuitState()
        self._sent: deque[float] = deque(maxlen=10_000)

    @property
    def paused_until(self) -> float:
        return self._paused_until

    def pause(self, seconds: float) -> None:
        """Stop every caller for `seconds` (a 429 slows everyone down, not just its caller)."""
        until = time.monotonic() + seconds
        if until > self._paused_until:
            self._paused_until = until
            log.warning(
                "crm rate limit: pausing all calls",
                extra={"action": "crm_pause", "seconds": seconds},
            )

    def open_circuit(self, reason: str, cooldown_s: float) -> None:
        now = time.monotonic()
        if not self.circuit.is_open:
            log.error("crm circuit opened", extra={"action": "circuit_open", "reason": reason})
            self.circuit = CircuitState(now + cooldown_s, reason, now)
        else:
            self.circuit.open_until = now + cooldown_s

    def close_circuit(self) -> None:
        if self.circuit.is_open:
            log.warning("crm circuit closed", extra={"action": "circuit_closed"})
        self.circuit = CircuitState()

    def check_circuit(self) -> None:
        """Raise CrmBlocked while the circuit is open and the cool-down has not passed."""
        if self.circuit.is_open and time.monotonic() < self.circuit.open_until:
            raise CrmBlocked(f"circuit open: {self.circuit.reason}")

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for the pause to end and for a token; then the caller sends one request.

        Raises CrmBlocked while the circuit is open."""
        while True:
            self.check_circuit()
            # a deadline that may move later, not an event: sleeping to it is the point
            while (wait := self._paused_until - time.monotonic()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(wait)
            await self._limiter.acquire()
            # a pause that began while we queued for the token holds us too
            if time.monotonic() >= self._paused_until:
                break
        self._sent.append(time.monotonic())
        yield

    def observed_rate(self, window_s: float = 60.0) -> float:
        """Calls per second over the last `window_s` seconds."""
        cutoff = time.monotonic() - window_s
        return sum(1 for t in self._sent if t >= cutoff) / window_s
