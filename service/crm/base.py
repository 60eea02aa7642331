"""What every CRM adapter and the worker share: a delivery, its link, and who waits for whom."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from service.errors import CrmRetryable
from service.model import Lead


@dataclass(frozen=True)
class Link:
    """Where a person lives in the CRM: their contact and their open lead (deal)."""

    contact_id: int | None = None
    lead_id: int | None = None


@dataclass(frozen=True)
class Delivery:
    """One submission to deliver, with what we already know of its person."""

    job_id: int
    person_id: int
    submission_id: uuid.UUID
    lead: Lead
    link: Link
    # counted attempts before this one: an earlier attempt's write may have landed unanswered
    attempts: int = 0


class Deferred(CrmRetryable):
    """Not now, and not a failure: another delivery is writing to the same CRM contact.

    The worker puts the job back for the next round after `delay_s` without counting an attempt;
    the next round reads the contact again and finds the lead the other delivery made. (A
    CrmRetryable, so that anything unaware of it still retries rather than gives up.)
    """

    def __init__(self, message: str | None = None, *, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        super().__init__(message)


def one_per_contact(
    resolved: Iterable[tuple[Delivery, int | None]],
) -> tuple[dict[int, Delivery], dict[int, Deferred]]:
    """Group a batch's deliveries by the CRM contact each resolved to; the first of each contact
    goes ahead, the others wait for the next round.

    First means the lowest job id: jobs are numbered as their submissions are stored. A delivery
    without a contact (a new person) is in neither answer. Returns (contact id → the delivery
    that goes ahead, job id → why it waits).
    """
    ahead: dict[int, Delivery] = {}
    waiting: dict[int, Deferred] = {}
    for delivery, contact_id in sorted(resolved, key=lambda pair: pair[0].job_id):
        if contact_id is None:
            continue
        first = ahead.setdefault(contact_id, delivery)
        if first is not delivery:
            waiting[delivery.job_id] = Deferred(
                f"CRM contact {contact_id} is written by job {first.job_id} of this batch; "
                "this one follows in the next round"
            )
    return ahead, waiting


def as_int(value: Any) -> int | None:
    """An id from a CRM's JSON: an integer, or the digits of one (Bitrix24 writes numbers as
    strings); None for anything else, bool included."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return None
