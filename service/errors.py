"""One exception hierarchy for the whole service.

CRM errors say what a loop that calls the CRM should do with them; `delivery.outcomes` is the one
place that maps them to behaviour (retry, pause everyone, dead-letter, open the circuit), for the
delivery worker and the webhook forwarder alike.
"""

from __future__ import annotations

from dataclasses import dataclass


class RelayError(Exception):
    """Something went wrong in crm-relay."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class SettingsError(RelayError):
    """A setting has a value we cannot use."""

    def __init__(self, variable: str, expected: str) -> None:
        self.variable = variable
        self.expected = expected
        super().__init__(f"{variable}: expected {expected}")


@dataclass(frozen=True)
class FieldError:
    """One problem with one field of a submission, as shown to the sender."""

    field: str
    message: str


class BadInput(RelayError):
    """The submission cannot be accepted as it is."""

    def __init__(self, errors: list[FieldError]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in errors))


class StoreUnavailable(RelayError):
    """The database cannot be reached right now."""


class StoreConflict(RelayError):
    """A transaction lost a deadlock or a serialization conflict: writing it again may succeed."""


class StoreRefused(RelayError):
    """The database refused a statement for what it carries (not an outage): say, a NUL in a
    JSON string. `kind` names the server's error."""

    def __init__(self, kind: str, message: str | None = None) -> None:
        self.kind = kind
        super().__init__(message or kind)


class CrmError(RelayError):
    """The CRM did not do what we asked."""

    def __init__(self, message: str | None = None, *, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class CrmRetryable(CrmError):
    """A passing CRM failure (5xx, timeout, connection error): retry later with backoff."""


class CrmRateLimited(CrmError):
    """The CRM asked us to slow down (429 / QUERY_LIMIT_EXCEEDED): pause every sender."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        scope: str | None = None,
    ) -> None:
        self.retry_after = retry_after
        # None: the whole account; otherwise one method (Bitrix24 OPERATION_TIME_LIMIT)
        self.scope = scope
        super().__init__(message, status=status)


class CrmPermanent(CrmError):
    """The CRM rejected the request for a reason a retry will not change (4xx validation)."""


class CrmBlocked(CrmError):
    """The CRM blocked the account (amoCRM 403, Bitrix24 OVERLOAD_LIMIT): stop sending, alert."""


class CircuitOpen(CrmBlocked):
    """Not sent: our circuit is open since the CRM blocked the account; wait for its probe.

    Our own refusal, not the CRM's answer: it must not push the circuit's probe further away
    (a stream of such refusals would keep the circuit open for ever)."""


class CrmUnauthorized(CrmError):
    """The CRM refused our credentials (401): refresh once, then treat as blocked."""


class SpoolFull(RelayError):
    """The local spool cannot take more (its size cap, or the volume cannot be written): work
    that can only go there is answered 503 with `Retry-After`."""
