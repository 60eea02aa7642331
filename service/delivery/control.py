"""Pausing delivery for the whole cluster: one row, a NOTIFY, every worker follows.

An operator who pauses delivery (admin API, dashboard) means every process. Kept in one process's
memory, a pause left the other processes sending and was forgotten by a restart. The state lives
in `delivery_control` (sql/migrations/009_delivery_control.sql); a change is announced on a NOTIFY
channel, and each process that runs a worker applies it at once, re-reading the row at start and
after every reconnect of its LISTEN connection (so a missed notification cannot leave it wrong).
While that connection is down (say, DATABASE_DIRECT_URL unreachable while the pool still works),
the row is read every `POLL_S` instead, and /readyz names the failing LISTEN: a pause still
reaches a process that cannot hear the NOTIFY.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any

from aiohttp import web

from service.db.admin_store import Switch, read_switch, set_switch
from service.db.database import listen_forever
from service.db.store import Pool
from service.errors import StoreUnavailable
from service.logs import Trouble

log = logging.getLogger(__name__)

CHANNEL = "crm_relay_delivery"
POLL_S = 5.0  # how often the switch is read while the LISTEN connection is down


class DeliveryControl:
    """The cluster's pause switch; `follow` registers what applies it in this process."""

    def __init__(self, pool: Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn
        self.paused = False
        self.changed_at: dt.datetime | None = None
        self.changed_by = ""
        self._followers: list[Callable[[bool], None]] = []
        self._reads: set[asyncio.Task[Any]] = set()
        self.listen_trouble = Trouble(
            log, f"delivery pause: LISTEN {CHANNEL}", "delivery_control_listen_down"
        )

    def state(self) -> dict[str, Any]:
        return {
            "paused": self.paused,
            "changed_at": self.changed_at.isoformat() if self.changed_at else None,
            "changed_by": self.changed_by,
            "scope": "cluster",
        }

    async def read(self) -> bool:
        """The switch as stored; applied to this process's followers."""
        self._apply(await read_switch(self.pool))
        return self.paused

    async def set(self, paused: bool, by: str) -> None:
        """Flip the switch for every process (this one at once, the others on the NOTIFY)."""
        self._apply(await set_switch(self.pool, paused, by))

    def follow(self, apply: Callable[[bool], None]) -> None:
        self._followers.append(apply)
        apply(self.paused)

    async def run(self) -> None:
        """Follow changes made by any process, until cancelled: on each NOTIFY, and by reading
        the switch every `POLL_S` while the LISTEN connection is down."""
        async with asyncio.TaskGroup() as group:
            group.create_task(listen_forever(self.dsn, CHANNEL, self._changed, self.listen_trouble))
            group.create_task(self._poll_while_deaf())

    def problems(self) -> list[str]:
        """Why a pause may reach this process late (/readyz, the alerts): its LISTEN failing."""
        reason = self.listen_trouble.reason()
        return [] if reason is None else [reason]

    async def _poll_while_deaf(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            if self.listen_trouble.failing:
                await self._reread()

    def _changed(self, *_notification: object) -> None:
        task = asyncio.ensure_future(self._reread())
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    async def _reread(self) -> None:
        try:
            await self.read()
        except StoreUnavailable as exc:  # the LISTEN reconnect reads it again
            log.warning(
                "delivery switch unreadable",
                extra={"action": "delivery_control_error", "error": str(exc)},
            )

    def _apply(self, switch: Switch | None) -> None:
        if switch is None:
            return
        was, self.paused = self.paused, switch.paused
        self.changed_at, self.changed_by = switch.changed_at, switch.changed_by
        if was != self.paused:
            for apply in self._followers:
                apply(self.paused)


DELIVERY_CONTROL = web.AppKey("delivery_control", DeliveryControl)
