"""crm-relay: durable, duplicate-free relay from forms and webhooks to amoCRM and Bitrix24."""

from __future__ import annotations

__version__ = "0.1.0"
