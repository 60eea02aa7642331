"""One CRM rate limit for every process: a sliding-window log in Redis, kept by Lua scripts.

Why a log of intervals and not GCRA or a token bucket: a token bucket with a burst of `rate`
lets twice the rate into the first second, and GCRA without a burst only holds if every process
sends at the instant it was told to; across processes (event-loop lag, network jitter) neither is
exact. The log counts a call from its admission until it was *answered*, and admits one more only
while fewer than `capacity` calls are in flight or were answered less than a window ago. The call
reached the CRM inside that interval, so no sliding window at the CRM can hold more than
`capacity` calls, whatever the delays (see `delivery.limits.SendLog`, the same rule in memory).
The price is throughput: each call occupies its own latency plus one window.

All times are Redis's (`TIME`), so the processes' clocks never meet. Each process keeps the same
log of its own calls in memory: it is what a process falls back on when Redis goes away, and what
it hands back to Redis when Redis returns.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlparse

from service.cluster.processes import KEY_PREFIX, PROBE_S, Cluster, RedisLink, RedisUnavailable
from service.delivery.limits import POLL_S, LocalBucket, RateGate, SendLog, capacity_window
from service.settings import CrmSettings

log = logging.getLogger(__name__)

# Slack added to every hand-over between modes, for event-loop lag and heartbeat jitter.
HANDOVER_SLACK_S = 0.5
# A call not answered within the CRM timeout plus this is counted until then, then forgotten.
IN_FLIGHT_SLACK_S = 1.0

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
"""

# KEYS: the account's log (member → answered at, or in-flight deadline), its pause deadline, the
# log's epoch. ARGV: capacity, window µs, in-flight µs, member, the epoch we know ('' at first),
# a new epoch. Returns {admitted, wait µs (-1: unknown), paused, epoch}. An epoch we do not know
# means Redis restarted (or was flushed) and the log is empty: nothing is admitted then, the
# caller hands its recent calls back first.
ADMIT = (
    _NOW
    + """
local epoch = redis.call('GET', KEYS[3])
if not epoch then
  epoch = ARGV[6]
  redis.call('SET', KEYS[3], epoch)
end
if ARGV[5] ~= '' and ARGV[5] ~= epoch then return {0, 0, 0, epoch} end
local paused = tonumber(redis.call('GET', KEYS[2]) or '0')
if paused > now then return {0, paused - now, 1, epoch} end
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[4])
  redis.call('PEXPIRE', KEYS[1], math.ceil((window + tonumber(ARGV[3])) / 1000) + 1000)
  return {1, 0, 0, epoch}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
local at = tonumber(first[2])
if at > now then return {0, -1, 0, epoch} end
return {0, at + window - now, 0, epoch}
"""
)

# KEYS: the log. ARGV: member. The call was answered now (if it is still counted at all).
RELEASE = _NOW + "redis.call('ZADD', KEYS[1], 'XX', now, ARGV[1])"

# KEYS: the pause deadline. ARGV: µs. Only ever moves the deadline later.
PAUSE = (
    _NOW
    + """
local untl = now + tonumber(ARGV[1])
if untl > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], string.format('%d', untl), 'PX', math.ceil(ARGV[1] / 1000) + 1000)
end
"""
)

# KEYS: the log. ARGV: in-flight µs, then (member, µs since answered or -1 in flight) pairs.
SEED = (
    _NOW
    + """
for i = 2, #ARGV, 2 do
  local age = tonumber(ARGV[i + 1])
  local score = now - age
  if age < 0 then score = now + tonumber(ARGV[1]) end
  redis.call('ZADD', KEYS[1], 'NX', score, ARGV[i])
end
"""
)


def account_key(crm: CrmSettings) -> str:
    """The CRM account the limit belongs to: same account, same bucket, whichever process."""
    url = crm.amocrm.base_url or crm.bitrix24.webhook_url or ""
    return f"{crm.kind}:{urlparse(url).netloc or 'local'}"


@dataclass(frozen=True)
class Admission:
    """What the shared log said: admitted, or wait (-1: unknown), paused, or Redis restarted."""

    admitted: bool
    wait_s: float = 0.0
    paused: bool = False
    restarted: bool = False


class RedisRateLog:
    """The Redis half: admit, answer, pause, hand back; raises RedisUnavailable."""

    def __init__(
        self, link: RedisLink, account: str, capacity: int, window_s: float, in_flight_s: float
    ) -> None:
        self.link = link
        self.keys = [f"{KEY_PREFIX}{kind}:{{{account}}}" for kind in ("rate", "pause", "epoch")]
        self.capacity = capacity
        self.window_us = int(window_s * 1e6)
        self.in_flight_us = int(in_flight_s * 1e6)
        self.epoch = ""
        client = link.client
        assert client is not None
        # redis-py runs EVALSHA and falls back to SCRIPT LOAD when the server has forgotten them
        self._admit = client.register_script(ADMIT)
        self._release = client.register_script(RELEASE)
        self._pause = client.register_script(PAUSE)
        self._seed = client.register_script(SEED)

    async def admit(self, member: str) -> Admission:
        args: list[str | int] = [self.capacity, self.window_us, self.in_flight_us, member]
        args += [self.epoch, uuid.uuid4().hex]
        res = cast(
            list[Any], await self.link.call(lambda r: self._admit(self.keys, args, client=r))
        )
        admitted, wait_us, paused, epoch = int(res[0]), int(res[1]), int(res[2]), str(res[3])
        restarted = self.epoch not in ("", epoch)
        self.epoch = epoch
        if restarted:
            return Admission(False, restarted=True)
        wait = wait_us / 1e6 if wait_us >= 0 else -1.0
        return Admission(bool(admitted), wait, bool(paused))

    async def release(self, member: str) -> None:
        await self.link.call(lambda r: self._release(self.keys[:1], [member], client=r))

    async def pause(self, seconds: float) -> None:
        await self.link.call(lambda r: self._pause(self.keys[1:2], [int(seconds * 1e6)], client=r))

    async def seed(self, calls: Iterable[tuple[str, float | None]]) -> None:
        """Hand our recent calls (member, seconds since answered or None) to the shared log."""
        args: list[str | int] = [self.in_flight_us]
        for member, age in calls:
            args += [member, -1 if age is None else int(age * 1e6)]
        if len(args) > 1:
            await self.link.call(lambda r: self._seed(self.keys[:1], args, client=r))


class ClusterBucket:
    """The bucket of a process that may share the CRM with others; its rule follows the mode.

    - redis: the shared log in Redis (and the shared pause);
    - local-share: our own log, at most our share (limit ÷ live processes);
    - single: the local aiolimiter bucket, and our own log at the full limit.

    Hand-overs, so that the processes never add up to more than the limit while they disagree:
    leaving Redis (it failed, or restarted empty), send nothing for one window: calls the others
    made through Redis are unknown to us. Coming back to Redis, hand it our recent calls and keep
    to our share for one probe interval and one window more: the others may not have noticed
    Redis yet and still send their shares unrecorded.
    """

    def __init__(self, cluster: Cluster, rate: float, account: str, in_flight_s: float) -> None:
        self.cluster = cluster
        self.capacity, self.window_s = capacity_window(rate)
        cluster.members.window_s = self.window_s
        self.local = LocalBucket(rate)
        self.log = SendLog(self.window_s)
        self.redis = (
            RedisRateLog(cluster.redis, account, self.capacity, self.window_s, in_flight_s)
            if cluster.redis.configured
            else None
        )
        self.paused_until = 0.0
        self._turn = asyncio.Lock()  # one admission at a time per process, in arrival order
        self._tickets = itertools.count(1)
        self._in_redis: set[int] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        # with Redis configured, start as if just leaving it: a cool-down if it is down now
        self._mode_seen = "redis" if self.redis is not None else cluster.mode
        self._local_from = 0.0
        self._dual_until = 0.0

    @property
    def mode(self) -> str:
        return self.cluster.mode

    async def acquire(self) -> int:
        async with self._turn:
            while True:
                ticket, wait = await self._try()
                if ticket is not None:
                    return ticket
                await asyncio.sleep(wait if wait > 0 else POLL_S)

    def release(self, ticket: int) -> None:
        self.log.release(ticket)
        if self.redis is not None and ticket in self._in_redis:
            self._in_redis.discard(ticket)
            self._background(self.redis.release(self._member(ticket)))

    def ready_in(self) -> float:
        """Not known ahead across processes: the claim goes ahead, the call waits its turn."""
        return 0.0

    def share_pause(self, seconds: float) -> None:
        if self.redis is not None:
            self._background(self.redis.pause(seconds))

    async def _try(self) -> tuple[int | None, float]:
        """A ticket, or how long to wait before trying again."""
        now = time.monotonic()
        mode = await self._follow_mode(now)
        if mode == "single":
            return await self._try_single()
        if mode == "redis" and now >= self._dual_until:
            return await self._try_redis(now)
        wait = self._share_wait(now)
        if wait > 0:
            return None, wait
        if self.redis is not None and (mode == "redis" or self.cluster.redis.probe_due()):
            return await self._try_redis(now)  # within our share and in the shared log
        return self._admit(), 0.0

    async def _try_single(self) -> tuple[int | None, float]:
        if not self.cluster.members.fresh():
            return None, PROBE_S
        wait = self.log.wait(self.capacity)
        if wait > 0:
            return None, wait
        await self.local.acquire()
        return self._admit(), 0.0

    async def _try_redis(self, now: float) -> tuple[int | None, float]:
        assert self.redis is not None
        ticket = next(self._tickets)
        try:
            answer = await self.redis.admit(self._member(ticket))
        except RedisUnavailable:
            return None, 0.0  # the mode has changed: look again at once
        if answer.restarted:
            log.warning("redis restarted: rate log handed over", extra={"action": "redis_restart"})
            if self._mode_seen == "redis":  # else we left Redis (and waited) when it failed
                self._hand_over(now, left_redis=True)
            await self._hand_back()
            return None, 0.0
        if answer.paused:
            self.paused_until = now + answer.wait_s
        if not answer.admitted:
            return None, answer.wait_s
        self._in_redis.add(ticket)
        return self._admit(ticket), 0.0

    def _share_wait(self, now: float) -> float:
        if now < self._local_from:
            return self._local_from - now
        share = self.cluster.members.share(self.capacity)
        if share <= 0:
            return PROBE_S / 4
        return self.log.wait(share)

    def _admit(self, ticket: int | None = None) -> int:
        ticket = ticket if ticket is not None else next(self._tickets)
        self.log.admit(ticket)
        return ticket

    async def _follow_mode(self, now: float) -> str:
        mode = self.cluster.mode
        if mode == self._mode_seen:
            return mode
        log.info(
            "rate limit mode changed",
            extra={"action": "limit_mode", "from": self._mode_seen, "to": mode},
        )
        left_redis, self._mode_seen = self._mode_seen == "redis", mode
        self._hand_over(now, left_redis=left_redis)
        if mode == "redis":
            await self._hand_back()
        return mode

    def _hand_over(self, now: float, *, left_redis: bool) -> None:
        if left_redis:
            self._local_from = now + self.window_s + HANDOVER_SLACK_S
        start = max(now, self._local_from)
        self._dual_until = start + PROBE_S + self.window_s + HANDOVER_SLACK_S

    async def _hand_back(self) -> None:
        """Our calls of the last window, into the shared log (Redis may have restarted empty)."""
        assert self.redis is not None
        recent = list(self.log.recent())
        try:
            await self.redis.seed((self._member(t), age) for t, age in recent)
        except RedisUnavailable:
            return
        self._in_redis.update(t for t, age in recent if age is None)

    def _member(self, ticket: int) -> str:
        return f"{self.cluster.name}:{ticket}"

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        async def quietly() -> None:
            try:
                await coro
            except RedisUnavailable:
                pass  # an unanswered entry ages out; a lost pause costs one more 429

        task = asyncio.create_task(quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Let the last answers and pauses reach Redis (bounded)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=1.0)


def cluster_gate(cluster: Cluster, crm: CrmSettings) -> tuple[RateGate, ClusterBucket]:
    """The process's rate gate, sharing the limit with every process of the cluster."""
    bucket = ClusterBucket(
        cluster, crm.rate_limit, account_key(crm), in_flight_s=crm.timeout_s + IN_FLIGHT_SLACK_S
    )
    return RateGate(crm.rate_limit, bucket), bucket
