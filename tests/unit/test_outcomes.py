"""The one map from CRM errors to behaviour (`delivery.outcomes`), for every CrmError subclass,
and what `CrmOutcomes` does to the gate every CRM call shares."""

from __future__ import annotations

import time

import pytest

from service.crm.base import Deferred
from service.delivery.limits import RateGate
from service.delivery.outcomes import DEAD, CrmOutcomes, Decision, Kind, backoff, classify
from service.errors import (
    CircuitOpen,
    CrmBlocked,
    CrmError,
    CrmPermanent,
    CrmRateLimited,
    CrmRetryable,
    CrmUnauthorized,
)
from service.settings import DeliverySettings, RetryPolicy

SETTINGS = DeliverySettings(
    retry=RetryPolicy(base_s=2.0, max_s=30.0, max_attempts=5, jitter=0.2),
    pause_base_s=1.0,
    pause_max_s=10.0,
    circuit_cooldown_s=60.0,
)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (Deferred("another delivery writes to it", delay_s=1.5), Decision(Kind.DEFER, 1.5)),
        (CrmRateLimited("429", status=429, retry_after=7.0), Decision(Kind.PAUSE, 7.0)),
        (CrmRateLimited("429", status=429), Decision(Kind.PAUSE, 1.0)),
        (CircuitOpen("circuit open: blocked"), Decision(Kind.WAIT, 60.0)),
        (CrmBlocked("403", status=403), Decision(Kind.CIRCUIT, 60.0)),
        (CrmUnauthorized("401", status=401), Decision(Kind.CIRCUIT, 60.0)),
        (CrmPermanent("400 validation", status=400), DEAD),
        (CrmRetryable("502", status=502), Decision(Kind.RETRY, 2.0)),
        (CrmError("something else"), Decision(Kind.RETRY, 2.0)),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None,
)
def test_every_crm_error_has_one_decision(error: CrmError, expected: Decision) -> None:
    # rnd 0.5: no jitter
    assert classify(error, 0, SETTINGS, rnd=0.5) == expected


def test_only_a_passing_failure_spends_an_attempt_and_only_a_deferral_is_no_failure() -> None:
    counted = {k for k in Kind if Decision(k).counted}
    assert counted == {Kind.RETRY}
    assert {k for k in Kind if not Decision(k).failure} == {Kind.DEFER}


def test_retries_back_off_with_jitter_up_to_the_cap_and_die_on_the_last_attempt() -> None:
    error = CrmRetryable("timeout")
    delays = [classify(error, n, SETTINGS, rnd=0.5).delay_s for n in range(4)]
    assert delays == [2.0, 4.0, 8.0, 16.0]
    assert classify(error, 4, SETTINGS).kind is Kind.DEAD  # the 5th attempt was the last
    low, high = (classify(error, 3, SETTINGS, rnd=r).delay_s for r in (0.0, 0.999999))
    assert low == pytest.approx(16.0 * 0.8) and high == pytest.approx(16.0 * 1.2, rel=1e-5)
    capped = RetryPolicy(base_s=2.0, max_s=5.0, max_attempts=50, jitter=0.0)
    assert backoff(10, capped).delay_s == 5.0


def test_rate_limits_and_the_circuit_never_kill_a_job_however_many_attempts_it_spent() -> None:
    for error in (CrmRateLimited("429"), CrmBlocked("403"), CircuitOpen("open")):
        assert classify(error, 99, SETTINGS).kind is not Kind.DEAD


def test_pauses_double_with_each_refusal_in_a_row_up_to_the_longest() -> None:
    error = CrmRateLimited("429")
    pauses = [classify(error, 0, SETTINGS, refusals_in_a_row=n).delay_s for n in range(1, 7)]
    assert pauses == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert classify(error, 0, SETTINGS, refusals_in_a_row=10_000).delay_s == 10.0


class Gate(RateGate):
    """A real gate that remembers every pause it was asked for."""

    def __init__(self) -> None:
        super().__init__(10.0)
        self.pauses: list[float] = []

    def pause(self, seconds: float) -> None:
        self.pauses.append(seconds)
        super().pause(seconds)


def test_one_refused_batch_is_one_refusal_paused_for_once() -> None:
    gate = Gate()
    outcomes = CrmOutcomes(gate, SETTINGS)
    refusal = CrmRateLimited("batch refused")
    decisions = [outcomes.decide(refusal, 0) for _ in range(50)]  # 50 jobs of one batch

    assert set(decisions) == {Decision(Kind.PAUSE, 1.0)}
    assert gate.pauses == [1.0]
    assert gate.paused_until > time.monotonic()
    assert outcomes.decide(CrmRateLimited("again"), 0) == Decision(Kind.PAUSE, 2.0)
    assert gate.pauses == [1.0, 2.0]


def test_a_success_ends_the_run_of_refusals_and_closes_the_circuit() -> None:
    gate = Gate()
    outcomes = CrmOutcomes(gate, SETTINGS)
    outcomes.decide(CrmRateLimited("one"), 0)
    outcomes.decide(CrmRateLimited("two"), 0)
    outcomes.decide(CrmBlocked("403 account blocked", status=403), 0)
    assert gate.circuit.is_open and "account blocked" in gate.circuit.reason

    outcomes.succeeded()
    assert not gate.circuit.is_open
    assert outcomes.decide(CrmRateLimited("three"), 0).delay_s == 1.0


def test_our_own_circuit_refusal_does_not_push_the_probe_further_away() -> None:
    gate = Gate()
    outcomes = CrmOutcomes(gate, SETTINGS)
    outcomes.decide(CrmUnauthorized("401", status=401), 0)
    probe_at = gate.circuit.open_until
    with pytest.raises(CircuitOpen) as refused:
        gate.check_circuit()

    assert outcomes.decide(refused.value, 0) == Decision(Kind.WAIT, 60.0)
    assert gate.circuit.open_until == probe_at
