"""The running parts of one process, as the probes, metrics, alerts and admin API see them."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from service.cluster.processes import Cluster
from service.db.event_store import EventStore
from service.db.store import Store
from service.delivery.control import DeliveryControl
from service.delivery.limits import RateGate
from service.delivery.worker import Worker
from service.intake.ingest import Intake
from service.webhooks.forwarder import Forwarder
from service.webhooks.handlers import EventIntake


@dataclass
class Runtime:
    """What the probes look at; filled in by the app's cleanup contexts as parts start."""

    started: float = field(default_factory=time.time)
    store: Store | None = None
    intake: Intake | None = None
    gate: RateGate | None = None
    worker: Worker | None = None
    worker_expected: bool = True
    control: DeliveryControl | None = None  # the cluster's pause switch the worker follows
    events: EventIntake | None = None
    event_store: EventStore | None = None
    forwarder: Forwarder | None = None
    forwarder_expected: bool = True
    cluster: Cluster | None = None
    shutting_down: bool = False
    crm: str = ""
    # more named checks for /health, e.g. "redis" when REDIS_URL is set; {"ok": False, ...}
    # from one makes /health answer 503
    probes: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = field(default_factory=dict)

    def stopped_parts(self) -> dict[str, list[str]]:
        """The background parts this process is meant to run that are not running or keep
        failing, each with why: "worker", "forwarder" (`JobLoop.problems`) and "heartbeat"
        (the cluster's). /readyz lists the reasons; each part is one alert condition."""
        parts: dict[str, list[str]] = {}
        for name, expected, loop in (
            ("worker", self.worker_expected, self.worker),
            ("forwarder", self.forwarder_expected, self.forwarder),
        ):
            if expected:
                found = [f"{name} not running"] if loop is None else loop.problems()
                if name == "worker" and self.control is not None:
                    found += self.control.problems()
                if found:
                    parts[name] = found
        beat = self.cluster.beat_trouble.reason() if self.cluster is not None else None
        if beat is not None:
            parts["heartbeat"] = [beat]
        return parts


RUNTIME = web.AppKey("runtime", Runtime)
