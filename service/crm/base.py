"""What the worker needs from any CRM: deliver a batch of submissions, one per person."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.errors import CrmError
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


class CrmAdapter(Protocol):
    """Find-or-create for many people at once, in as few CRM requests as the API allows.

    The worker never puts two deliveries of one person into one batch. The answer has one entry
    per delivery, in order: the person's new link, or the CrmError that failed that delivery
    alone (a sub-error inside a batch). Raising a CrmError fails the whole batch.
    """

    name: str
    max_batch: int

    async def deliver_batch(self, items: Sequence[Delivery]) -> list[Link | CrmError]:
        """Put every item into the CRM, starting from what we know (`item.link`)."""
        ...
