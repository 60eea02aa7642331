"""Several crm-relay processes on one database, and maybe one Redis: who is alive, and how the
parts that span processes run right now (`Cluster.mode`):

- "redis": Redis answers. One rate limit for the whole cluster, a 429 pause that holds for all,
  idempotency keys every process sees (`delivery.cluster_bucket`, `intake.shared_keys`).
- "local-share": Redis is configured but unreachable, or there is no Redis and several processes
  send to the CRM. Each process sends at most its share of the limit (limit ÷ live processes,
  counted by heartbeats in PostgreSQL); deduplication is the database's unique keys alone.
- "single": no Redis and this is the only live sender: the plain local bucket.

Person locks for intake are PostgreSQL advisory locks in every mode (`service.intake.locks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.db.cluster_store import ProcessRow, ProcessRows
from service.db.store import Pool
from service.errors import RelayError, StoreUnavailable
from service.logs import Trouble

log = logging.getLogger(__name__)
T = TypeVar("T")

BEAT_S = 2.0  # every process upserts its heartbeat row this often
STALE_S = 7.0  # a row not beaten for ~3 beats is a dead process
PROBE_S = 1.0  # after Redis failed, try it again at most this often
REDIS_TIMEOUT_S = 0.5  # a Redis that does not answer within this is treated as down
FORGET_AFTER_S = 86_400.0  # rows of processes dead this long are deleted
KEY_PREFIX = "crm-relay:"  # every Redis key we write starts with this



class RedisUnavailable(RelayError):
    """Redis is not configured or does not answer; the caller falls back to the database."""


def process_name() -> str:
    """host:pid:random, unique per process start (also its PostgreSQL application_name)."""
    return f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def connect_redis(url: str) -> Redis:
    """A client that fails fast: no retries, short timeouts (we fall back instead of waiting)."""
    client: Redis = Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=REDIS_TIMEOUT_S,
        socket_connect_timeout=REDIS_TIMEOUT_S,
        retry=Retry(NoBackoff(), 0),
    )
    return client


class RedisLink:
    """The Redis client and whether it answers; logs each change of state once."""

    def __init__(self, client: Redis | None) -> None:
        self.client = client
        self.up = False
        self.down_since: float | None = time.time() if client is not None else None
        self.last_error = "" if client is not None else "not configured"
        self._retry_at = 0.0
        self._was_up = False

    @property
    def configured(self) -> bool:
        return self.client is not None

    def probe_due(self) -> bool:
        """Down, and time to try again."""
        return self.client is not None and not self.up and time.monotonic() >= self._retry_at

    async def call(self, fn: Callable[[Redis], Awaitable[T]]) -> T:
        """Run `fn(client)`; RedisUnavailable if Redis is down (without trying, between probes)."""
        if self.client is None or not (self.up or self.probe_due()):
            raise RedisUnavailable(self.last_error or "redis down")
        try:
            result = await fn(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            # drop every pooled connection: after a restart each stale one would fail once more
            with contextlib.suppress(RedisError, OSError):
                await self.client.connection_pool.disconnect()
            raise RedisUnavailable(self.last_error) from exc
        self._ok()
        return result

    def _failed(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + PROBE_S
        self.last_error = f"{exc.__class__.__name__}: {exc}"
        if self.up:
            self.up = False
            self.down_since = time.time()
            log.error(
                "redis unavailable: local share of the rate limit, database-only deduplication",
                extra={"action": "redis_down", "error": self.last_error},
            )

    def _ok(self) -> None:
        if not self.up:
            was_down, self.down_since = self.down_since, None
            self.up, self.last_error = True, ""
            # the first contact at start is routine; a return after an outage is news
            level = logging.WARNING if self._was_up else logging.INFO
            self._was_up = True
            log.log(
                level,
                "redis available: cluster rate limit and shared keys",
                extra={"action": "redis_up", "down_s": _since(was_down)},
            )

    async def ping(self) -> None:
        with contextlib.suppress(RedisUnavailable):
            await self.call(lambda r: r.ping())


def _since(t: float | None) -> float | None:
    return None if t is None else round(time.time() - t, 1)


@dataclass
class Membership:
    """This process's heartbeat row in `processes`, and the live senders it last saw.

    Each process takes `capacity // n` of the limit, plus one if its rank (order of joining)
    is below `capacity % n`: the shares add up to the limit exactly. Shares are only safe while
    everyone agrees on `n`, hence the rules below (see `share`)."""

    rows: ProcessRows
    name: str
    sends: bool
    beat_s: float = BEAT_S
    stale_s: float = STALE_S
    window_s: float = 1.0
    row_id: int | None = None
    live: int = 0
    rank: int | None = None
    last_ok: float | None = None
    joined_at: float = 0.0

    async def beat(self, mode: str) -> None:
        """Upsert our row, then count the live senders (two statements, two snapshots: of two
        processes joining at once, the later one always sees the earlier)."""
        self.row_id, ids = await self.rows.beat(self.name, self.sends, mode, self.stale_s)
        if not self.fresh():  # others may not count us (yet, or any more): we (re)join
            self.joined_at = time.monotonic()
        self.last_ok = time.monotonic()
        self.live = len(ids)
        self.rank = ids.index(self.row_id) if self.row_id in ids else None

    def fresh(self) -> bool:
        """Our heartbeat is recent enough that everyone still counts us. Past this we send
        nothing on a local share: the others may be about to take ours."""
        margin = self.beat_s + 0.5
        return self.last_ok is not None and time.monotonic() - self.last_ok <= self.stale_s - margin

    def grace_s(self) -> float:
        """After joining a crowd: until every other process has counted us (one beat) and its
        last window under the larger share has passed."""
        return self.beat_s + self.window_s + 1.0

    def share(self, capacity: int) -> int:
        """Our part of `capacity` (0 while joining a crowd or when our heartbeat is failing)."""
        if not self.fresh() or self.rank is None or self.live <= 0:
            return 0
        if self.live > 1 and time.monotonic() < self.joined_at + self.grace_s():
            return 0
        return capacity // self.live + (1 if self.rank < capacity % self.live else 0)

    async def leave(self, after_s: float) -> None:
        """Go stale in `after_s` (not now: our last calls still count in the others' window)."""
        await self.rows.leave(self.name, max(0.0, self.stale_s - after_s))


class Cluster:
    """This process's view of the cluster: the Redis link, the heartbeats, the mode."""

    def __init__(
        self, pool: Pool, redis: Redis | None, *, sends: bool, name: str | None = None
    ) -> None:
        self.name = name or process_name()
        self.redis = RedisLink(redis)
        self.members = Membership(ProcessRows(pool), self.name, sends)
        # a heartbeat that keeps failing: ERROR once with the cause, /readyz and alerts name it
        # (while it fails this process's share of the limit is 0 once the others stop counting it)
        self.beat_trouble = Trouble(log, "heartbeat", "heartbeat_failed")

    @property
    def mode(self) -> str:
        """ "redis" | "local-share" | "single" (see the module docstring)."""
        if self.redis.up:
            return "redis"
        if self.redis.configured or self.members.live > 1:
            return "local-share"
        return "single"

    async def start(self) -> None:
        """First heartbeat and first Redis ping, before any CRM call or intake."""
        await self.redis.ping()
        await self.members.beat(self.mode)
        if self.redis.configured and not self.redis.up:
            log.error(
                "redis unavailable at start: local share of the rate limit, database-only "
                "deduplication until it answers",
                extra={"action": "redis_down", **self.state()},
            )
        else:
            log.info("cluster mode", extra={"action": "cluster_mode", **self.state()})

    async def run(self) -> None:
        """Beat every BEAT_S; probe Redis while it is down; forget long-dead processes."""
        last_mode = self.mode
        beats = 0
        while True:
            await asyncio.sleep(self.members.beat_s)
            if self.redis.probe_due():
                await self.redis.ping()
            try:
                async with asyncio.timeout(2 * self.members.beat_s):  # a stuck beat is a missed one
                    await self.members.beat(self.mode)
                if beats % 100 == 0:
                    await self._forget_dead()
                beats += 1
            except (StoreUnavailable, TimeoutError) as exc:
                self.beat_trouble.failed(str(exc) or exc.__class__.__name__)
            except Exception as exc:  # a dead heartbeat loop would silently stop our CRM calls
                if not self.beat_trouble.failing:
                    log.exception("heartbeat error", extra={"action": "heartbeat_failed"})
                self.beat_trouble.failed(f"{exc.__class__.__name__}: {exc}")
            else:
                self.beat_trouble.ok()
            if self.mode != last_mode:
                log.warning(
                    "cluster mode changed", extra={"action": "cluster_mode", **self.state()}
                )
                last_mode = self.mode

    async def _forget_dead(self) -> None:
        await self.members.rows.forget(FORGET_AFTER_S)

    async def close(self, leave_after_s: float) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.members.leave(leave_after_s)
        if self.redis.client is not None:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.client.aclose()

    def state(self) -> dict[str, Any]:
        """For /health and the admin API: the mode and what it rests on."""
        m = self.members
        return {
            "mode": self.mode,
            "process_name": self.name,
            "redis": {
                "configured": self.redis.configured,
                "up": self.redis.up,
                "down_since": self.redis.down_since,
                "last_error": self.redis.last_error or None,
            },
            "live_senders": m.live,
            "rank": m.rank,
            "heartbeat_age_s": None
            if m.last_ok is None
            else round(time.monotonic() - m.last_ok, 1),
        }


async def list_processes(pool: Pool, stale_s: float = STALE_S) -> list[ProcessRow]:
    """Every process that beat in the last day, live or not (for the admin API); any database
    failure is StoreUnavailable."""
    return await ProcessRows(pool).listing(stale_s)
