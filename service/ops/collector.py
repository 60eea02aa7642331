"""What `GET /metrics` shows beyond HTTP and CRM calls, read at scrape time.

`RuntimeCollector` reads the running parts' own counters and gauges (intake, worker, webhooks,
forwarder, rate gate, cluster) when Prometheus scrapes, so no hot path calls a metrics library;
`read_db` reads the database's figures (queue, dead letters, outbox, processes) just before.

The database's figures are the cluster's, the same from every process: they carry
`scope="cluster"`, and a query takes one copy (`max without (instance, pod) (…)`), never their
sum over processes (docs/operations.md). Everything else is this process's own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from service import __version__
from service.cluster.processes import list_processes
from service.db.admin_store import AdminStore
from service.db.store import QueueCounts
from service.errors import StoreUnavailable
from service.intake.spam import REASONS
from service.ops.runtime import Runtime

ATTEMPT_BUCKETS = (1, 2, 3, 5, 8, 12, 20)
CLUSTER = ("scope", "cluster")  # the label of the figures read from the database
CLUSTER_MODES = ("redis", "local-share", "single")
Family = TypeVar("Family", GaugeMetricFamily, CounterMetricFamily)


@dataclass
class DbSnapshot:
    """What the scrape read from the database just before rendering."""

    up: bool = False
    queue: QueueCounts | None = None
    dead_letters: int | None = None
    forward_jobs: dict[str, dict[str, int]] | None = None  # {kind: {state: n}}
    live_processes: int | None = None


async def read_db(runtime: Runtime, admin: AdminStore | None, timeout_s: float) -> DbSnapshot:
    """The database figures for one scrape; `up` is False when any of them could not be read."""
    snap = DbSnapshot()
    store = runtime.store
    if store is None:
        return snap
    try:
        async with asyncio.timeout(timeout_s):
            snap.queue = await store.queue_counts()
            if admin is not None:
                snap.dead_letters = await admin.dead_letter_count()
            if runtime.event_store is not None:
                snap.forward_jobs = await runtime.event_store.counts()
            processes = await list_processes(store.pool)
            snap.live_processes = sum(1 for p in processes if p.live)
        snap.up = True
    except (StoreUnavailable, TimeoutError):
        snap.up = False
    return snap


def _gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    if value is not None:
        yield GaugeMetricFamily(name, doc, value=value)


def _cluster_gauge(name: str, doc: str, value: float | None) -> Iterator[Metric]:
    """A figure read from the database: `scope="cluster"` (the module's docstring)."""
    if value is not None:
        family = GaugeMetricFamily(name, f"{doc} (cluster-wide)", labels=[CLUSTER[0]])
        family.add_metric([CLUSTER[1]], value)
        yield family


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(name, doc, value=value)


def _by_label(family: Family, values: dict[str, int]) -> Family:
    """`family` (one label) with a sample per item of `values`."""
    for label, value in values.items():
        family.add_metric([label], value)
    return family


class Scraped(Protocol):
    """What the collector reads from the app's metrics (`ops.metrics.Metrics`) at scrape time."""

    runtime: Runtime
    rejected: int
    db: DbSnapshot


class RuntimeCollector:
    """Reads the running parts' own counters and gauges at scrape time."""

    def __init__(self, metrics: Scraped) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        rt = self.m.runtime
        info = GaugeMetricFamily("crm_relay_build_info", "Version", labels=["version", "crm"])
        info.add_metric([__version__, rt.crm], 1)
        yield info
        yield from _gauge(
            "crm_relay_uptime_seconds", "Seconds since start", time.time() - rt.started
        )
        yield from self._intake()
        yield from self._worker()
        yield from self._webhooks()
        yield from self._limiter()
        yield from self._cluster()
        yield from self._database()

    def _intake(self) -> Iterator[Metric]:
        intake = self.m.runtime.intake
        subs = CounterMetricFamily(
            "crm_relay_submissions", "Submissions by outcome", labels=["outcome"]
        )
        counts = dict(intake.counts) if intake else {}
        for outcome in ("accepted", "duplicate", "spooled", "spam", "key_reused"):
            subs.add_metric([outcome], counts.get(outcome, 0))
        subs.add_metric(["rejected"], self.m.rejected)
        yield subs
        if intake is None:
            return
        spam = CounterMetricFamily(
            "crm_relay_spam", "Submissions kept as spam, by reason", labels=["reason"]
        )
        caught = intake.guard.counts
        for reason in sorted(set(REASONS) | set(caught)):  # reasons are ours, never a client's
            spam.add_metric([reason], caught.get(reason, 0))
        yield spam
        yield _counter(
            "crm_relay_lock_waits", "Key-lock acquisitions that waited", intake.locks.waits
        )
        yield _counter(
            "crm_relay_idempotency_window_hits", "Repeats answered from memory", intake.window.hits
        )
        yield from _gauge(
            "crm_relay_idempotency_window_entries", "Keys in the window", len(intake.window)
        )
        yield from _gauge(
            "crm_relay_spool_bytes",
            "Bytes waiting in the local spool",
            intake.spool.pending_bytes(),
        )
        yield _counter(
            "crm_relay_spool_appended", "Entries written to the spool", intake.spool.appended
        )

    def _worker(self) -> Iterator[Metric]:
        w = self.m.runtime.worker
        if w is None:
            return
        yield _counter("crm_relay_delivered", "Jobs delivered by this process", w.delivered)
        yield _attempts_histogram(w.finished)
        yield from _gauge("crm_relay_worker_running", "Delivery loop running", float(w.running))
        yield from _gauge(
            "crm_relay_worker_paused", "Delivery paused by an operator", float(w.paused)
        )
        yield from _gauge(
            "crm_relay_worker_in_flight_people", "People being delivered", len(w.in_flight)
        )
        if w.last_success is not None:
            yield from _gauge(
                "crm_relay_last_success_timestamp_seconds", "Last delivery", w.last_success
            )
        if w.last_failure is not None:
            yield from _gauge(
                "crm_relay_last_failure_timestamp_seconds", "Last failed attempt", w.last_failure[0]
            )

    def _webhooks(self) -> Iterator[Metric]:
        rt = self.m.runtime
        if rt.events is not None:
            yield _by_label(
                CounterMetricFamily(
                    "crm_relay_webhook_events", "Webhook intake by outcome", labels=["outcome"]
                ),
                rt.events.counts,
            )
        if (fwd := rt.forwarder) is not None:
            yield _by_label(
                CounterMetricFamily(
                    "crm_relay_forwarder_jobs",
                    "Outbox jobs handled by this process's forwarder, by outcome",
                    labels=["outcome"],
                ),
                fwd.counts,
            )
            yield from _gauge("crm_relay_forwarder_running", "Forwarder running", fwd.running)

    def _cluster(self) -> Iterator[Metric]:
        cluster = self.m.runtime.cluster
        if cluster is None:
            return
        mode = cluster.mode
        yield _by_label(
            GaugeMetricFamily("crm_relay_cluster_mode", "1 for the current mode", labels=["mode"]),
            {m: int(m == mode) for m in CLUSTER_MODES},
        )
        yield from _gauge(
            "crm_relay_cluster_live_senders",
            "Live processes sending to the CRM",
            cluster.members.live,
        )
        if cluster.redis.configured:
            yield from _gauge("crm_relay_redis_up", "Redis answers", float(cluster.redis.up))

    def _limiter(self) -> Iterator[Metric]:
        gate = self.m.runtime.gate
        if gate is None:
            return
        yield from _gauge("crm_relay_limiter_rate", "Configured CRM requests per second", gate.rate)
        yield from _gauge(
            "crm_relay_limiter_observed_rate",
            "CRM requests per second, last minute",
            gate.observed_rate(),
        )
        yield from _gauge(
            "crm_relay_limiter_paused_seconds",
            "Seconds left in a rate-limit pause",
            max(0.0, gate.paused_until - time.monotonic()),
        )
        circuit = GaugeMetricFamily("crm_relay_circuit_open", "CRM circuit open", labels=["crm"])
        circuit.add_metric([self.m.runtime.crm], float(gate.circuit.is_open))
        yield circuit

    def _database(self) -> Iterator[Metric]:
        db = self.m.db
        yield from _gauge("crm_relay_database_up", "Database answered the scrape", float(db.up))
        if db.queue is not None:
            jobs = GaugeMetricFamily(
                "crm_relay_jobs", "Jobs by state (cluster-wide)", labels=["state", CLUSTER[0]]
            )
            for state in ("pending", "running", "done", "dead", "discarded"):
                jobs.add_metric([state, CLUSTER[1]], getattr(db.queue, state))
            yield jobs
            yield from _cluster_gauge("crm_relay_jobs_due", "Jobs due now", db.queue.due)
            yield from _cluster_gauge(
                "crm_relay_oldest_due_job_age_seconds",
                "Age of the oldest due job (delivery lag)",
                db.queue.oldest_due_age_s or 0.0,
            )
        yield from _cluster_gauge(
            "crm_relay_dead_letters", "Dead letters not discarded", db.dead_letters
        )
        if db.forward_jobs is not None:
            yield from _forward_jobs(db.forward_jobs)
        yield from _cluster_gauge(
            "crm_relay_cluster_processes", "Processes beating now (any role)", db.live_processes
        )


def _forward_jobs(by_kind: dict[str, dict[str, int]]) -> Iterator[Metric]:
    family = GaugeMetricFamily(
        "crm_relay_forward_jobs",
        "Webhook outbox jobs by kind and state (cluster-wide)",
        labels=["kind", "state", CLUSTER[0]],
    )
    for kind in ("process", "forward"):
        for state in ("pending", "running", "done", "dead"):
            family.add_metric([kind, state, CLUSTER[1]], by_kind.get(kind, {}).get(state, 0))
    yield family
    dead = sum(states.get("dead", 0) for states in by_kind.values())
    yield from _cluster_gauge(
        "crm_relay_forward_dead_jobs", "Dead webhook outbox jobs (replayable)", dead
    )


def _attempts_histogram(finished: Mapping[str, Mapping[int, int]]) -> Metric:
    """Attempts each job took, counted by this process's worker as it finished the job (done or
    dead): a counter that only grows, whatever a replay later does to the job's row."""
    family = HistogramMetricFamily(
        "crm_relay_job_attempts",
        "Attempts a job took, observed when this process finished it, by final state",
        labels=["state"],
    )
    for state in ("done", "dead"):
        mine = list(finished.get(state, {}).items())
        buckets = [
            (str(float(b)), float(sum(n for a, n in mine if a <= b))) for b in ATTEMPT_BUCKETS
        ]
        buckets.append(("+Inf", float(sum(n for _, n in mine))))
        family.add_metric([state], buckets, sum_value=float(sum(a * n for a, n in mine)))
    return family
