"""The cluster rate limit against a real redis-server: the Lua log, the shared pause, and the
hand-overs when Redis goes away and comes back; and the shared idempotency keys."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import TYPE_CHECKING

from redis.asyncio.retry import Retry as AsyncRetry

from service.cluster.processes import Cluster, RedisLink, connect_redis
from service.delivery.cluster_bucket import ClusterBucket, RedisRateLog
from service.delivery.limits import POLL_S, RateGate
from service.intake.shared_keys import SharedKeys
from service.simulators.common import max_in_window

if TYPE_CHECKING:  # imported by pytest as a plugin (below), before this module
    from tests.redis_fixtures import RedisFactory, RedisServer

pytest_plugins = ("tests.redis_fixtures",)


def rate_log(
    factory: RedisFactory, capacity: int, window_s: float = 1.0, in_flight_s: float = 5.0
) -> RedisRateLog:
    return RedisRateLog(RedisLink(factory()), "acct", capacity, window_s, in_flight_s)


async def hammer(
    log: RedisRateLog, name: str, until: float, seen: list[float], rnd: random.Random
) -> None:
    """Admit, "send" (the CRM sees it at some point before the answer), answer; repeat."""
    n = 0
    while time.monotonic() < until:
        n += 1
        member = f"{name}:{n}"
        answer = await log.admit(member)
        if not answer.admitted:
            await asyncio.sleep(answer.wait_s if answer.wait_s > 0 else POLL_S)
            continue
        latency = rnd.uniform(0.0, 0.03)
        arrival = rnd.random() * latency
        await asyncio.sleep(arrival)
        seen.append(time.monotonic())
        await asyncio.sleep(latency - arrival)
        await log.release(member)


async def test_concurrent_clients_never_exceed_the_limit_in_any_sliding_second(
    redis_factory: RedisFactory,
) -> None:
    capacity, seconds = 10, 3.0
    logs = [rate_log(redis_factory, capacity) for _ in range(4)]  # 4 "processes"
    rnd = random.Random(6)
    seen: list[float] = []
    until = time.monotonic() + seconds
    await asyncio.gather(
        *(
            hammer(log, f"p{p}-c{c}", until, seen, rnd)
            for p, log in enumerate(logs)
            for c in range(5)
        )
    )
    # no sliding second, the first one included, holds more than the limit...
    assert max_in_window(seen, 1.0) <= capacity
    assert len([t for t in seen if t < min(seen) + 1.0]) <= capacity
    # ...and the limit is used: more than one window's worth in ~3 windows (a loaded machine
    # sends fewer, so the margin is wide; the pace itself is measured in bench/)
    assert len(seen) > 1.5 * capacity, len(seen)


async def test_a_pause_set_by_one_process_holds_for_all(redis_factory: RedisFactory) -> None:
    # Redis keeps the time here (its own clock): the margins, not a fake clock, keep this test
    # about behaviour — each allows a Redis round trip of up to half a second
    one, other = rate_log(redis_factory, 5), rate_log(redis_factory, 5)
    await one.pause(1.0)
    answer = await other.admit("other:1")
    assert not answer.admitted and answer.paused
    assert 0.5 < answer.wait_s <= 1.0
    await asyncio.sleep(answer.wait_s)
    assert (await other.admit("other:2")).admitted
    await one.pause(0.05)  # a shorter pause never cuts a longer one short
    await other.pause(2.0)
    await one.pause(0.05)
    assert (await one.admit("one:1")).wait_s > 1.5


async def test_an_answered_call_frees_its_turn_one_window_later(
    redis_factory: RedisFactory,
) -> None:
    log = rate_log(redis_factory, 1, window_s=1.0)
    assert (await log.admit("a")).admitted
    in_flight = await log.admit("b")
    assert not in_flight.admitted and in_flight.wait_s == -1.0  # unknown while "a" is in flight
    await log.release("a")
    waiting = await log.admit("b")
    assert not waiting.admitted and 0.5 < waiting.wait_s <= 1.0
    await asyncio.sleep(waiting.wait_s)
    assert (await log.admit("b")).admitted


async def test_a_call_never_answered_is_forgotten_after_its_deadline(
    redis_factory: RedisFactory,
) -> None:
    log = rate_log(redis_factory, 1, window_s=0.2, in_flight_s=1.0)
    assert (await log.admit("lost")).admitted  # its process died before the answer
    assert not (await log.admit("next")).admitted
    await asyncio.sleep(1.25)
    assert (await log.admit("next")).admitted


async def test_scripts_are_loaded_again_after_redis_forgot_them(
    redis_factory: RedisFactory,
) -> None:
    client = redis_factory()
    log = RedisRateLog(RedisLink(client), "acct", 3, 1.0, 5.0)
    assert (await log.admit("a")).admitted
    await client.script_flush()
    assert (await log.admit("b")).admitted  # EVALSHA → NOSCRIPT → SCRIPT LOAD → EVALSHA


async def test_an_emptied_redis_is_noticed_and_handed_back(redis_factory: RedisFactory) -> None:
    client = redis_factory()
    log = rate_log(redis_factory, 2)
    assert (await log.admit("a")).admitted
    await client.flushall()  # what a restart without persistence looks like
    answer = await log.admit("b")
    assert answer.restarted and not answer.admitted
    await log.seed([("a", 0.1)])
    assert (await log.admit("b")).admitted
    assert not (await log.admit("c")).admitted  # the handed-back call still counts


async def test_shared_keys_answer_a_repeat_elsewhere_only_once_the_id_is_durable(
    redis_factory: RedisFactory,
) -> None:
    here, there = (SharedKeys(RedisLink(redis_factory()), 60.0) for _ in range(2))
    assert await here.claim("k1") is None  # first: a placeholder now
    assert await there.claim("k1") is None  # the first is still writing: the database decides
    sid = uuid.uuid4()
    here.remember("k1", sid)  # committed; published in the background
    for _ in range(100):  # it lands within a round trip or two; a loaded machine waits longer
        if (found := await there.claim("k1")) is not None:
            break
        await asyncio.sleep(0.05)
    assert found == sid


async def test_shared_keys_batch_concurrent_requests_and_step_aside_when_redis_is_down(
    redis_server: RedisServer, redis_factory: RedisFactory
) -> None:
    keys = SharedKeys(RedisLink(redis_factory()), 60.0)
    assert await asyncio.gather(*(keys.claim(f"k{i}") for i in range(200))) == [None] * 200
    assert keys.batch.round_trips < 20  # not one per request
    await asyncio.to_thread(redis_server.kill)
    t0 = time.monotonic()
    assert await keys.claim("k0") is None  # unknown: the database decides
    keys.remember("k0", uuid.uuid4())  # dropped quietly
    # it does not wait for Redis (retries, timeouts): seconds would show; the margin is for load
    assert time.monotonic() - t0 < 3.0 and not keys.link.up


# --- hand-overs: two processes, Redis killed and started again ---------------------------------


def member_of_two(client_url: str, rank: int, factory: RedisFactory) -> Cluster:
    """A process's cluster view without a database: two live senders, joined long ago."""
    cluster = Cluster(None, factory(), sends=True)  # type: ignore[arg-type]
    cluster.members.live, cluster.members.rank = 2, rank
    cluster.members.last_ok, cluster.members.joined_at = time.monotonic(), -1e9
    return cluster


async def keep_beating(clusters: list[Cluster], until: float) -> None:
    while time.monotonic() < until:
        for c in clusters:
            c.members.last_ok = time.monotonic()
        await asyncio.sleep(0.2)


async def send_through(
    gate: RateGate, until: float, seen: list[float], modes: set[str], rnd: random.Random
) -> None:
    while time.monotonic() < until:
        async with gate.slot():
            latency = rnd.uniform(0.001, 0.02)
            arrival = rnd.random() * latency
            await asyncio.sleep(arrival)
            seen.append(time.monotonic())
            modes.add(gate.mode)
            await asyncio.sleep(latency - arrival)


async def test_two_processes_stay_within_the_limit_while_redis_dies_and_returns(
    redis_server: RedisServer, redis_factory: RedisFactory
) -> None:
    rate = 10.0
    clusters = [member_of_two(redis_server.url, rank, redis_factory) for rank in (0, 1)]
    for c in clusters:
        await c.redis.ping()
        assert c.mode == "redis"
    buckets = [ClusterBucket(c, rate, "acct", in_flight_s=2.0) for c in clusters]
    gates = [RateGate(rate, b) for b in buckets]
    rnd = random.Random(11)
    seen: list[float] = []
    modes: set[str] = set()
    t0 = time.monotonic()
    until = t0 + 8.0

    async def chaos() -> None:
        await asyncio.sleep(1.5)
        await asyncio.to_thread(redis_server.kill)
        await asyncio.sleep(3.0)
        await asyncio.to_thread(redis_server.start)

    await asyncio.gather(
        chaos(),
        keep_beating(clusters, until),
        *(send_through(g, until, seen, modes, rnd) for g in gates for _ in range(4)),
    )
    for b in buckets:
        await b.close()
    timeline = [round(t - t0, 2) for t in sorted(seen)]
    assert max_in_window(seen, 1.0) <= 10, timeline
    assert modes == {"redis", "local-share"}, (modes, timeline)
    assert all(c.mode == "redis" for c in clusters)
    # the limit was used in every phase: Redis up, down (5 + 5 local shares), up again; each
    # hand-over costs one window and a half (see ClusterBucket)
    for start, end in ((0.0, 1.5), (1.5, 4.5), (4.5, 8.0)):
        assert sum(start <= t < end for t in timeline) >= 5, (start, end, timeline)


async def test_the_client_fails_fast_with_the_asyncio_retry(redis_server: RedisServer) -> None:
    """No retries and the asyncio Retry class: a synchronous one is converted with a warning by
    redis-py 8 (an error under this suite), and a retry would make a dead Redis cost a wait."""
    client = connect_redis(redis_server.url)
    try:
        retry = client.connection_pool.connection_kwargs["retry"]
        assert isinstance(retry, AsyncRetry)
        assert retry._retries == 0
        assert await client.ping()
    finally:
        await client.aclose()
