"""One gate for every outbound CRM call: the rate limit, the shared pause, the circuit.

`aiolimiter.AsyncLimiter(rate, 1)` starts with a full bucket of `rate` tokens and refills at
`rate`/s, so its first second lets up to twice the rate through. A CRM counts requests in any
sliding second, so we use a bucket of one token refilled every `1/rate` seconds (stretched by a
small margin for network jitter): no one-second window can ever hold more than `rate` calls.

Which bucket admits a call is pluggable (`Bucket`): `LocalBucket` is that aiolimiter bucket, for
one process alone; `cluster_bucket.ClusterBucket` makes several processes share one limit
(in Redis, or as a share counted by PostgreSQL heartbeats when Redis is away).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from aiolimiter import AsyncLimiter

from service.errors import CircuitOpen

log = logging.getLogger(__name__)

# Calls are spaced 2% wider than 1/rate: loopback and LAN jitter are well under that.
SPACING_MARGIN = 1.02
# How long a caller sleeps before looking again when it cannot know when a turn frees up
# (every counted call is still in flight).
POLL_S = 0.02


def capacity_window(rate: float) -> tuple[int, float]:
    """The limit as "at most `capacity` calls in any `window` seconds".

    A CRM counts whole requests per second: 6.5/s allows 6 in a second; 0.5/s allows 1 in 2 s.
    """
    if rate >= 1:
        return int(rate), 1.0
    return 1, 1.0 / rate


class Bucket(Protocol):
    """Admission for one outbound call: `acquire` a ticket, `release` it when the call ends."""

    @property
    def mode(self) -> str:
        """ "single" | "local-share" | "redis" (see `service.cluster.processes`)."""
        ...

    @property
    def paused_until(self) -> float:
        """A pause learnt from other processes (monotonic deadline), or 0."""
        ...

    async def acquire(self) -> int: ...

    def release(self, ticket: int) -> None: ...

    def ready_in(self) -> float:
        """Seconds until `acquire` would admit a call at once (0: now), as far as known."""
        ...

    def share_pause(self, seconds: float) -> None:
        """Tell the other processes about a pause this one was told to make."""
        ...


class LocalBucket:
    """This process's aiolimiter bucket: one token, refilled every 1/rate s (see above)."""

    mode = "single"
    paused_until = 0.0

    def __init__(self, rate: float) -> None:
        self._spacing = SPACING_MARGIN / rate
        self._limiter = AsyncLimiter(1, self._spacing)
        self._admitted = -self._spacing  # loop time of the last admission

    async def acquire(self) -> int:
        await self._limiter.acquire()
        self._admitted = asyncio.get_running_loop().time()
        return 0

    def release(self, ticket: int) -> None:
        pass

    def ready_in(self) -> float:
        # one token, refilled `spacing` after it was taken
        return max(0.0, self._admitted + self._spacing - asyncio.get_running_loop().time())

    def share_pause(self, seconds: float) -> None:
        pass


class SendLog:
    """This process's calls as intervals [admitted, released], to admit by "at most `n` calls
    in any `window_s`" without trusting any clock but our own.

    A call reaches the CRM somewhere inside its interval. Admit a call only while fewer than `n`
    calls are in flight or were released less than `window_s` ago: then no window of `window_s`
    at the CRM can see more than `n` of them, whatever the network and event-loop delays were.
    """

    def __init__(self, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock  # tests move time on without waiting for it
        self._open: dict[int, float] = {}  # ticket → admitted at (in flight)
        self._closed: deque[tuple[float, int]] = deque()  # (released at, ticket), in order

    def admit(self, ticket: int) -> None:
        self._open[ticket] = self._clock()

    def release(self, ticket: int) -> None:
        if self._open.pop(ticket, None) is not None:
            self._closed.append((self._clock(), ticket))

    def _prune(self, now: float) -> None:
        while self._closed and self._closed[0][0] <= now - self.window_s:
            self._closed.popleft()

    def count(self) -> int:
        self._prune(self._clock())
        return len(self._open) + len(self._closed)

    def wait(self, capacity: int) -> float:
        """0 when one more call fits, else how long until it may (POLL_S if unknown)."""
        now = self._clock()
        self._prune(now)
        excess = len(self._open) + len(self._closed) - capacity
        if excess < 0:
            return 0.0
        if excess < len(self._closed):
            return self._closed[excess][0] + self.window_s - now
        return POLL_S  # it depends on calls still in flight

    def recent(self) -> Iterator[tuple[int, float | None]]:
        """(ticket, seconds since release, or None while in flight) of every counted call."""
        now = self._clock()
        self._prune(now)
        yield from ((t, None) for t in self._open)
        yield from ((t, now - released) for released, t in self._closed)


@dataclass
class CircuitState:
    """Open after the CRM blocked the account; a probe after the cool-down may close it."""

    open_until: float = 0.0
    reason: str = ""

    @property
    def is_open(self) -> bool:
        return self.reason != ""


class RateGate:
    """The one bucket all CRM calls share, plus a pause that holds everyone."""

    def __init__(
        self,
        rate: float,
        bucket: Bucket | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self._clock = clock  # the circuit's time (tests move it on); pauses sleep in real time
        self._bucket: Bucket = bucket or LocalBucket(rate)
        self._paused_until = 0.0
        self.circuit = CircuitState()
        self._sent: deque[float] = deque(maxlen=10_000)
        self._firsts: deque[asyncio.Future[int]] = deque()  # callers to get the next turn
        self.waiting = 0  # callers queued for a turn now
        self.admitted = 0  # turns granted so far
        self._last_admitted = -float("inf")  # monotonic

    @property
    def mode(self) -> str:
        """How the limit is kept: "single" | "local-share" | "redis" (see `cluster.processes`)."""
        return self._bucket.mode

    @property
    def paused_until(self) -> float:
        return max(self._paused_until, self._bucket.paused_until)

    def pause(self, seconds: float) -> None:
        """Stop every caller for `seconds` (a 429 slows everyone down, not just its caller)."""
        until = time.monotonic() + seconds
        if until > self._paused_until:
            self._paused_until = until
            log.warning(
                "crm rate limit: pausing all calls",
                extra={"action": "crm_pause", "seconds": seconds},
            )
        self._bucket.share_pause(seconds)

    def open_circuit(self, reason: str, cooldown_s: float) -> None:
        now = self._clock()
        if not self.circuit.is_open:
            log.error("crm circuit opened", extra={"action": "circuit_open", "reason": reason})
            self.circuit = CircuitState(now + cooldown_s, reason)
        else:
            self.circuit.open_until = now + cooldown_s

    def close_circuit(self) -> None:
        if self.circuit.is_open:
            log.warning("crm circuit closed", extra={"action": "circuit_closed"})
        self.circuit = CircuitState()

    def check_circuit(self) -> None:
        """Raise CircuitOpen (a CrmBlocked) while the circuit is open and the cool-down has not
        passed."""
        if self.circuit.is_open and self._clock() < self.circuit.open_until:
            raise CircuitOpen(f"circuit open: {self.circuit.reason}")

    @contextlib.asynccontextmanager
    async def slot(self, *, first: bool = False) -> AsyncIterator[None]:
        """Wait for the pause to end and for a turn; then the caller sends one request and the
        turn is held until it is answered. `first`: the next turn, ahead of every caller
        already queued (see `front`).

        Raises CircuitOpen (a CrmBlocked) while the circuit is open."""
        self.waiting += 1
        try:
            ticket = await self._admit(first)
        finally:
            self.waiting -= 1
        self.admitted += 1
        self._last_admitted = time.monotonic()
        self._sent.append(self._last_admitted)
        try:
            yield
        finally:
            self._bucket.release(ticket)

    def ready_in(self) -> float:
        """Seconds until a turn is free that nobody is queued for (no pause either); 0 on an
        idle gate. The worker claims its next round then (bind late), so that the round's
        first request carries everything that came due while no turn was free for it. While
        callers are queued the next turn is theirs: look again after it (at least POLL_S)."""
        wait = max(0.0, self.paused_until - time.monotonic(), self._bucket.ready_in())
        return max(wait, POLL_S) if self.waiting else wait

    def idle_for(self) -> float:
        """Seconds since the last turn was granted with nobody queued since; 0 while queued."""
        return 0.0 if self.waiting else time.monotonic() - self._last_admitted

    def front(self) -> FrontOfLine:
        """This gate with every slot taken ahead of the queue: for a token refresh, which the
        calls queued behind it are waiting for. Still one slot of the limit per request."""
        return FrontOfLine(self)

    async def _admit(self, first: bool) -> int:
        while True:
            self.check_circuit()
            # a deadline that may move later, not an event: sleeping to it is the point
            while (wait := self._paused_until - time.monotonic()) > 0:  # noqa: ASYNC110
                await asyncio.sleep(wait)
            ticket = await (self._first_turn() if first else self._bucket.acquire())
            # a pause that began while we queued for the turn holds us too
            if time.monotonic() < self._paused_until:
                self._bucket.release(ticket)
            elif first or not self._hand_over(ticket):
                return ticket

    def _hand_over(self, ticket: int) -> bool:
        """Give our turn to a caller waiting to go first, if there is one; we queue again."""
        while self._firsts:
            waiter = self._firsts.popleft()
            if not waiter.done():
                waiter.set_result(ticket)
                return True
        return False

    async def _first_turn(self) -> int:
        """The next turn: the one the next caller admitted hands over, or our own from the
        bucket if it comes first (nobody else is queued)."""
        turn: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._firsts.append(turn)
        own = asyncio.create_task(self._acquire_into(turn))
        try:
            return await asyncio.shield(turn)
        except asyncio.CancelledError:
            if not turn.cancel() and turn.exception() is None:
                self._bucket.release(turn.result())  # handed over as we were cancelled
            raise
        finally:
            # Cancelled while queued, a bucket takes nothing; a ClusterBucket cancelled inside
            # its Redis call may leave one entry there, which ages out (never more calls).
            own.cancel()
            with contextlib.suppress(ValueError):
                self._firsts.remove(turn)

    async def _acquire_into(self, turn: asyncio.Future[int]) -> None:
        try:
            ticket = await self._bucket.acquire()
        except Exception as exc:
            if not turn.done():
                turn.set_exception(exc)
            return
        if turn.done():  # a handed-over turn came first
            self._bucket.release(ticket)
        else:
            turn.set_result(ticket)

    def observed_rate(self, window_s: float = 60.0) -> float:
        """Calls per second over the last `window_s` seconds."""
        cutoff = time.monotonic() - window_s
        return sum(1 for t in self._sent if t >= cutoff) / window_s


class FrontOfLine:
    """`RateGate.front()`: a Gate whose every slot is the gate's next turn."""

    def __init__(self, gate: RateGate) -> None:
        self._gate = gate

    def slot(self) -> contextlib.AbstractAsyncContextManager[None]:
        """The gate's next turn, ahead of the callers queued for one."""
        return self._gate.slot(first=True)
