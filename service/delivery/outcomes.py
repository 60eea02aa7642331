"""What a failed CRM call does: the one map from `CrmError` to behaviour.

Every loop that calls the CRM uses it: the delivery worker, and the webhook forwarder for its
Bitrix24 deal lookups. Kept apart in each, the two had drifted (a 429 seen by the forwarder paused
nobody, a 403 it saw left the circuit closed and the worker sending to a blocked account).

- `Deferred` (crm.base) → DEFER: again after its `delay_s`, no attempt spent; not a failure.
- `CrmRateLimited` → PAUSE every sender, for the CRM's Retry-After, else CRM_PAUSE_BASE_S ×
  2^(n-1) for the n-th refusal in a row, at most CRM_PAUSE_MAX_S; the job waits as long, no
  attempt spent.
- `CircuitOpen` (our own gate refused the call) → WAIT the cool-down, no attempt spent.
- `CrmBlocked`, `CrmUnauthorized` → CIRCUIT: open it for CIRCUIT_COOLDOWN_S (sending stops, the
  alert fires); the job waits as long, no attempt spent.
- `CrmPermanent` → DEAD (replayable).
- `CrmRetryable` and any other CrmError → RETRY after RETRY_BASE_S × 2^(n-1) ± jitter, at most
  RETRY_MAX_S, one attempt spent; DEAD once RETRY_MAX_ATTEMPTS are spent.

`classify` is that list, without side effects; `CrmOutcomes` applies it to the shared gate.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass

from service.crm.base import Deferred
from service.delivery.limits import RateGate
from service.errors import (
    CircuitOpen,
    CrmBlocked,
    CrmError,
    CrmPermanent,
    CrmRateLimited,
    CrmUnauthorized,
)
from service.settings import DeliverySettings, RetryPolicy

MAX_DOUBLINGS = 16  # 2^16 × any base is past every sensible CRM_PAUSE_MAX_S


class Kind(enum.Enum):
    """What becomes of the job (and, for PAUSE and CIRCUIT, of every sender)."""

    DEFER = "defer"
    RETRY = "retry"
    PAUSE = "pause"
    WAIT = "wait"
    CIRCUIT = "circuit"
    DEAD = "dead"


@dataclass(frozen=True)
class Decision:
    """One job's fate: dead, or put back for `delay_s` (spending an attempt if `counted`)."""

    kind: Kind
    delay_s: float = 0.0

    @property
    def counted(self) -> bool:
        """Only a passing failure of this job spends one of its attempts: a pause, the circuit
        or another delivery's turn says nothing about the job itself."""
        return self.kind is Kind.RETRY

    @property
    def failure(self) -> bool:
        """False for DEFER: waiting for another delivery's turn is not a failure."""
        return self.kind is not Kind.DEFER


DEAD = Decision(Kind.DEAD)


def backoff(attempts: int, policy: RetryPolicy, rnd: float | None = None) -> Decision:
    """A passing failure of a job that has spent `attempts`: retry with backoff and jitter, or
    dead once this failure spends the last attempt (also for non-CRM failures: forwarding)."""
    if attempts + 1 >= policy.max_attempts:
        return DEAD
    return Decision(Kind.RETRY, policy.delay(attempts + 1, random.random() if rnd is None else rnd))


def pause_s(exc: CrmRateLimited, refusals_in_a_row: int, settings: DeliverySettings) -> float:
    """How long everyone pauses: what the CRM asked for, else doubling with each refusal."""
    doublings = min(max(refusals_in_a_row, 1) - 1, MAX_DOUBLINGS)
    return exc.retry_after or min(settings.pause_max_s, settings.pause_base_s * 2.0**doublings)


def classify(
    exc: CrmError,
    attempts: int,
    settings: DeliverySettings,
    *,
    refusals_in_a_row: int = 1,
    rnd: float | None = None,
) -> Decision:
    """The decision for `exc` on a job that has spent `attempts` (the table above)."""
    if isinstance(exc, Deferred):  # a CrmRetryable: checked before the retryable rule
        return Decision(Kind.DEFER, exc.delay_s)
    if isinstance(exc, CrmRateLimited):
        return Decision(Kind.PAUSE, pause_s(exc, refusals_in_a_row, settings))
    if isinstance(exc, CircuitOpen):  # a CrmBlocked: checked before the circuit rule
        return Decision(Kind.WAIT, settings.circuit_cooldown_s)
    if isinstance(exc, CrmBlocked | CrmUnauthorized):
        return Decision(Kind.CIRCUIT, settings.circuit_cooldown_s)
    if isinstance(exc, CrmPermanent):
        return DEAD
    return backoff(attempts, settings.retry, rnd)


class CrmOutcomes:
    """`classify` applied to the gate every CRM call shares: a PAUSE pauses every sender, a
    CIRCUIT opens the circuit; a success ends the run of refusals and closes the circuit.

    One per loop. A refused batch request fails each of its deliveries with the same error
    object: that is one refusal, paused for once, not fifty (counting it per job would take one
    refusal of a 50-lead batch straight to the longest pause)."""

    def __init__(self, gate: RateGate, settings: DeliverySettings) -> None:
        self.gate = gate
        self.settings = settings
        self.refusals_in_a_row = 0
        self._last_refusal: CrmRateLimited | None = None
        self._last_pause = Decision(Kind.PAUSE)

    def decide(self, exc: CrmError, attempts: int) -> Decision:
        """The decision for `exc`, with its effect on every sender already applied."""
        if isinstance(exc, CrmRateLimited):
            return self._refused(exc)
        decision = classify(exc, attempts, self.settings)
        if decision.kind is Kind.CIRCUIT:
            self.gate.open_circuit(f"{exc.__class__.__name__}: {exc}", decision.delay_s)
        return decision

    def succeeded(self) -> None:
        """The CRM took a call: the refusals are over, and a blocked account is open again."""
        self.refusals_in_a_row = 0
        if self.gate.circuit.is_open:
            self.gate.close_circuit()

    def _refused(self, exc: CrmRateLimited) -> Decision:
        if exc is not self._last_refusal:
            self._last_refusal = exc
            self.refusals_in_a_row += 1
            self._last_pause = classify(
                exc, 0, self.settings, refusals_in_a_row=self.refusals_in_a_row
            )
            self.gate.pause(self._last_pause.delay_s)
        return self._last_pause
