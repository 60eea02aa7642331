"""What the worker needs from any CRM: deliver one submission for one person."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol

from service.model import Lead


@dataclass(frozen=True)
class Link:
    """Where a person lives in the CRM: their contact and their open lead."""

    contact_id: int | None = None
    lead_id: int | None = None


class CrmAdapter(Protocol):
    """Find-or-create for one person; raises the CrmError subclasses from service.errors."""

    name: str

    async def deliver(self, lead: Lead, link: Link, submission_id: uuid.UUID) -> Link:
        """Put `lead` into the CRM, starting from what we know (`link`); return the new link."""
        ...
