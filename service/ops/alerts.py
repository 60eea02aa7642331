"""Alerts to Telegram and/or a Slack-compatible webhook, from the state the service already has.

Every `ALERT_CHECK_S` a background task looks at the running parts and the database and turns
what it sees into conditions (dead letters waiting, circuit open, CRM blocked, spool in use,
spool full or holding quarantined entries, data volume low on space, database unreachable,
delivery lag over `ALERT_LAG_S`, the worker, forwarder or heartbeat not running or failing, with
why). A `Throttle` decides what to say: a condition that starts firing is announced at once, news
about it (more dead letters) at most once per `ALERT_INTERVAL_S`, and "resolved" when it clears.
Messages go through a bounded queue to a
sender task, so neither a slow Telegram nor a dead webhook ever holds intake or delivery.

"Restart after a crash" is read from marker files: each process writes one under
`<data dir>/run/` at start and removes it on a clean shutdown, so a marker whose process is gone
means that process died without shutting down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from service.db.admin_store import ADMIN_STORE, AdminStore
from service.errors import StoreUnavailable
from service.ops.runtime import RUNTIME, Runtime
from service.settings import AlertSettings
from service.web import PROCESS_NAME, SETTINGS

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
SEND_TIMEOUT_S = 10.0
SEND_TRIES = 3
QUEUE_SIZE = 100
# facts about the CRM or the shared database, seen alike by every process: said once per
# cluster (the spool and crash markers are this process's own and are said by it)
CLUSTER_WIDE = frozenset({"dead_letters", "delivery_lag", "crm_blocked", "circuit_open"})
# tells this process's markers from those of an earlier process that had the same pid
PROCESS_TOKEN = uuid.uuid4().hex


@dataclass(frozen=True)
class Observation:
    """One condition as seen now: is it firing, what to say, did it get worse since last time."""

    key: str
    active: bool
    text: str = ""
    worse: bool = False


@dataclass
class _State:
    active: bool = False
    announced: bool = False  # a firing message went out for the current episode
    pending: bool = False  # something worth saying waits for the interval to pass
    sent_at: float = -math.inf


@dataclass
class Throttle:
    """One message per condition per interval; "resolved" when an announced condition clears."""

    interval_s: float
    states: dict[str, _State] = field(default_factory=dict)

    def step(self, obs: Observation, now: float) -> str | None:
        st = self.states.setdefault(obs.key, _State())
        if not obs.active:
            was_announced = st.active and st.announced
            st.active = st.announced = st.pending = False
            return f"✅ resolved: {obs.text}" if was_announced and obs.text else None
        if not st.active or obs.worse:
            st.pending = True
        st.active = True
        if st.pending and now - st.sent_at >= self.interval_s:
            st.pending, st.announced, st.sent_at = False, True, now
            return f"🔴 {obs.text}"
        return None


# --- what is observed -----------------------------------------------------------------------


def _circuit(rt: Runtime) -> list[Observation]:
    gate = rt.gate
    is_open = gate is not None and gate.circuit.is_open
    reason = gate.circuit.reason if gate is not None else ""
    blocked = is_open and reason.startswith("CrmBlocked")
    return [
        Observation(
            "crm_blocked",
            blocked,
            f"CRM blocked the account ({reason}): sending stopped"
            if blocked
            else "CRM no longer blocked: circuit closed, sending resumed",
        ),
        Observation(
            "circuit_open",
            is_open and not blocked,
            f"CRM circuit opened ({reason}): sending stopped"
            if is_open
            else "CRM circuit closed: sending resumed",
        ),
    ]


def _spool(rt: Runtime) -> Observation:
    waiting = rt.intake.spool.pending_bytes() if rt.intake else 0
    return Observation(
        "spool_in_use",
        waiting > 0,
        f"database writes are going to the local spool ({waiting} bytes waiting)"
        if waiting
        else "spool drained: submissions are stored in the database again",
    )


PARTS = ("worker", "forwarder", "heartbeat")


def _parts(rt: Runtime) -> list[Observation]:
    """Each background part that is not running or keeps failing, with why (`stopped_parts`)."""
    stopped = rt.stopped_parts()
    return [
        Observation(
            f"{part}_stopped",
            part in stopped,
            "; ".join(stopped[part]) if part in stopped else f"{part} running again",
        )
        for part in PARTS
    ]


def _storage(rt: Runtime) -> list[Observation]:
    """The data volume low on space (bad input no longer kept) and the spool at its cap (work
    that can only go there answered 503): this host's own, said by this process."""
    if rt.intake is None:
        return []
    disk, spool = rt.intake.rejected.disk, rt.intake.spool
    low = disk.low
    free = disk.free_bytes
    full = spool.size() >= spool.max_bytes
    quarantined = spool.quarantine_bytes()
    return [
        Observation(
            "disk_low",
            low,
            f"data volume low on space: {free} bytes free (under {disk.min_free_bytes}); "
            "bad input is no longer kept, valid leads are still taken"
            if low
            else "data volume has room again: bad input is kept again",
        ),
        Observation(
            "spool_full",
            full,
            f"spool full ({spool.max_bytes} bytes) while the database is away: "
            "new work is answered 503 with Retry-After"
            if full
            else "spool has room again",
        ),
        Observation(
            "spool_quarantine",
            quarantined > 0,
            f"spool entries the database refused are quarantined ({quarantined} bytes): "
            "see GET /admin/api/spool"
            if quarantined
            else "spool quarantine empty",
        ),
    ]


class Watcher:
    """Turns the runtime and the database into observations."""

    def __init__(self, rt: Runtime, admin: AdminStore | None, lag_s: float) -> None:
        self.rt = rt
        self.admin = admin
        self.lag_s = lag_s
        self.dead_seen = 0

    async def observe(self) -> list[Observation]:
        found = [*_circuit(self.rt), _spool(self.rt), *_parts(self.rt), *_storage(self.rt)]
        try:
            async with asyncio.timeout(CHECK_TIMEOUT_S):
                found.extend(await self._database())
        except (StoreUnavailable, TimeoutError, OSError) as exc:
            found.append(Observation("db_unreachable", True, f"database unreachable: {exc}"))
        else:
            found.append(Observation("db_unreachable", False, "database reachable again"))
        return found

    async def _database(self) -> list[Observation]:
        if self.rt.store is None:
            return []
        await self.rt.store.ping()
        counts = await self.rt.store.queue_counts()
        dead = await self.admin.dead_letter_count() if self.admin else counts.dead
        worse, self.dead_seen = dead > self.dead_seen, dead
        lag = counts.oldest_due_age_s or 0.0
        return [
            Observation(
                "dead_letters",
                dead > 0,
                f"{dead} dead letter(s) waiting: replay or discard them in /admin/"
                if dead
                else "no dead letters left",
                worse=worse,
            ),
            Observation(
                "delivery_lag",
                lag > self.lag_s,
                f"delivery lag {lag:.0f} s (over {self.lag_s:.0f} s): {counts.due} job(s) due"
                if lag > self.lag_s
                else "delivery lag back under the threshold",
            ),
        ]


# --- sending --------------------------------------------------------------------------------


class Sender:
    """Posts messages to every configured channel; never raises into its caller."""

    def __init__(self, settings: AlertSettings, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.session = session
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        self.sent = 0

    @property
    def channels(self) -> list[tuple[str, dict[str, Any]]]:
        s, out = self.settings, []
        if s.telegram_bot_token and s.telegram_chat_id:
            url = f"{s.telegram_api_url.rstrip('/')}/bot{s.telegram_bot_token}/sendMessage"
            out.append((url, {"chat_id": s.telegram_chat_id, "disable_web_page_preview": True}))
        if s.webhook_url:
            out.append((s.webhook_url, {}))
        return out

    def offer(self, text: str) -> None:
        """Queue a message without waiting; when the queue is full the message is dropped."""
        try:
            self.queue.put_nowait(text)
        except asyncio.QueueFull:
            log.warning("alert dropped: queue full", extra={"action": "alert_dropped"})

    async def run(self) -> None:
        while True:
            text = await self.queue.get()
            for url, extra in self.channels:
                await self._post(url, {**extra, "text": text})
            self.sent += 1

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        for attempt in range(SEND_TRIES):
            try:
                timeout = aiohttp.ClientTimeout(total=SEND_TIMEOUT_S)
                async with self.session.post(
                    url,
                    data=orjson.dumps(body),
                    timeout=timeout,
                    headers={"Content-Type": "application/json"},
                ) as r:
                    if r.status < 300:
                        return
                    problem = f"HTTP {r.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = exc.__class__.__name__
            await asyncio.sleep(2**attempt)
        # the URL holds the bot token: name the channel, not the address
        channel = "telegram" if "/sendMessage" in url else "webhook"
        log.warning(
            "alert not delivered",
            extra={"action": "alert_failed", "channel": channel, "error": problem},
        )


# --- crash markers --------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _still_running(info: dict[str, Any], host: str) -> bool:
    pid = int(info.get("pid", 0))
    if info.get("host") != host or pid <= 0:
        return False  # another machine's marker on a shared volume: it cannot be checked
    if pid == os.getpid():
        # this process (another app in it), or one before it that had our pid (containers)
        return bool(info.get("token") == PROCESS_TOKEN)
    return _alive(pid)


def crash_markers(run_dir: Path) -> tuple[Path, list[dict[str, Any]]]:
    """Write this process's marker; return it and the markers of processes that crashed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    crashed = []
    for path in sorted(run_dir.glob("*.json")):
        try:
            info = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            info = {}
        if _still_running(info, host):
            continue
        crashed.append(info)
        path.unlink(missing_ok=True)
    mine = run_dir / f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}.json"
    mine.write_bytes(
        orjson.dumps(
            {"pid": os.getpid(), "host": host, "token": PROCESS_TOKEN, "started": time.time()}
        )
    )
    return mine, crashed


def _crash_text(info: dict[str, Any]) -> str:
    started = info.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)) if started else "?"
    return (
        f"🔴 restarted after a crash: the previous process (pid {info.get('pid', '?')}, "
        f"started {since} UTC) stopped without a clean shutdown"
    )


# --- the task -------------------------------------------------------------------------------


async def watch(
    watcher: Watcher, throttle: Throttle, sender: Sender, every_s: float, name: str
) -> None:
    """Check every `every_s`; `name` is this process's (who said a cluster-wide alert)."""
    host = socket.gethostname()
    while True:
        try:
            await _check(watcher, throttle, sender, host, name)
        except Exception:  # a bug here must not end alerting for the life of the process
            log.exception("alert check failed", extra={"action": "alert_check_error"})
        await asyncio.sleep(every_s)


async def _check(
    watcher: Watcher, throttle: Throttle, sender: Sender, host: str, name: str
) -> None:
    now = time.monotonic()
    for obs in await watcher.observe():
        if (text := throttle.step(obs, now)) is None:
            continue
        if not await _ours_to_say(watcher, throttle, obs, name):
            log.info(
                "alert already said by another process",
                extra={"action": "alert_said_elsewhere", "condition": obs.key},
            )
            continue
        log.warning(text, extra={"action": "alert", "condition": obs.key})
        sender.offer(f"crm-relay@{host}: {text}")


async def _ours_to_say(watcher: Watcher, throttle: Throttle, obs: Observation, by: str) -> bool:
    """Whether this process says it: always for its own conditions; for a cluster-wide one
    only if no other process said it within the interval. Unsure (database away) → say it:
    a repeated message is better than a lost one."""
    if obs.key not in CLUSTER_WIDE or watcher.admin is None:
        return True
    kind = "firing" if obs.active else "resolved"
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            return await watcher.admin.claim_alert(obs.key, kind, throttle.interval_s, by)
    except (StoreUnavailable, TimeoutError, OSError):
        return True


async def alerts_ctx(app: web.Application) -> AsyncIterator[None]:
    """Crash markers always; the watcher and sender when a channel is configured."""
    settings = app[SETTINGS]
    marker, crashed = await asyncio.to_thread(crash_markers, settings.data_dir / "run")
    async with contextlib.AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        sender = app[SENDER] = Sender(settings.alert, session)
        for info in crashed:
            log.error(_crash_text(info), extra={"action": "alert", "condition": "crashed"})
            sender.offer(f"crm-relay@{socket.gethostname()}: {_crash_text(info)}")
        if sender.channels:
            watcher = Watcher(app[RUNTIME], app.get(ADMIN_STORE), settings.alert.lag_s)
            throttle = Throttle(settings.alert.interval_s)
            await stack.enter_async_context(_task(sender.run(), "alert-sender"))
            await stack.enter_async_context(
                _task(
                    watch(watcher, throttle, sender, settings.alert.check_s, app[PROCESS_NAME]),
                    "alert-watch",
                )
            )
        yield
    # reached on a clean shutdown only: a crash leaves the marker behind for the next start
    marker.unlink(missing_ok=True)


@contextlib.asynccontextmanager
async def _task(coro: Any, name: str) -> AsyncIterator[None]:
    task = asyncio.create_task(coro, name=name)
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


SENDER = web.AppKey("alert_sender", Sender)
