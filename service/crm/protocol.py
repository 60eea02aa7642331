"""What the worker needs from any CRM: deliver a batch of submissions, one per person."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from service.crm.base import Delivery, Link
from service.db.contact_locks import ContactGuard
from service.errors import CrmError


class CrmAdapter(Protocol):
    """Find-or-create for many people at once, in as few CRM requests as the API allows.

    The worker never puts two deliveries of one person into one batch; two *people* may still
    turn out to be one CRM contact (a phone-only and an email-only submission of someone a
    manager entered with both): the adapter lets one delivery per contact write, in this batch
    (`one_per_contact`) and across processes (`guard`), and answers `Deferred` for the others.

    The answer has one entry per delivery, in order: the person's new link, or the CrmError that
    failed that delivery alone (a sub-error inside a batch). Raising a CrmError fails the whole
    batch.
    """

    name: str
    max_batch: int  # items one CRM request takes
    max_round: int  # deliveries one `deliver_batch` call takes (several requests' worth)

    async def deliver_batch(
        self, items: Sequence[Delivery], guard: ContactGuard | None = None
    ) -> list[Link | CrmError]:
        """Put every item into the CRM, starting from what we know (`item.link`); with `guard`,
        writes to an existing contact are exclusive across processes too."""
        ...
