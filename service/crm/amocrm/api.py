"""The amoCRM / Kommo API v4 over HTTP: requests, status mapping and parsing, no business logic.

Every answer is treated as untrusted input: shapes are checked, odd values are skipped, and a 2xx
whose envelope we cannot read is `CrmRetryable` rather than "nothing found" (which would make
the caller create duplicates).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from service.crm.amocrm.parse import (
    CLOSED_STATUSES,
    AmoContact,
    AmoLead,
    ComplexResult,
    ContactPage,
    contact_fields,
    dicts,
    digits,
    embedded_list,
    ids,
    in_request_order,
    parse_complex,
    parse_contact,
    parse_contact_page,
    parse_lead,
)
from service.crm.base import as_int
from service.crm.http import (
    Credentials,
    Gate,
    TokenSource,
    retry_after_seconds,
    send_json,
    send_with_token,
)
from service.errors import (
    CrmBlocked,
    CrmError,
    CrmPermanent,
    CrmRateLimited,
    CrmRetryable,
    CrmUnauthorized,
)

__all__ = [  # what callers import from here, parsed types included
    "BULK_IDS",
    "CLOSED_STATUSES",
    "LIST_LIMIT",
    "MAX_BATCH",
    "AmoContact",
    "AmoCrmApi",
    "AmoLead",
    "AmoValidation",
    "ComplexResult",
    "ContactPage",
    "Funnels",
    "StaticToken",
    "TokenPair",
    "TokenSource",
    "contact_fields",
    "digits",
    "exchange_refresh_token",
]

MAX_BATCH = 50  # amoCRM's limit for leads/complex, and its advice for every other batch
LIST_LIMIT = 250  # the most contacts one list page may hold
# ids one `filter[id]` read asks for: a page holds 250, but each id costs ~30 bytes of URL and
# servers commonly refuse request lines over 8 KiB (aiohttp's own limit is 8190 bytes)
BULK_IDS = 100
_PERMANENT = frozenset({400, 404, 405, 409, 422})
_MESSAGE_LIMIT = 500
_DEFAULT_TOKEN_LIFETIME_S = 86400.0  # what amoCRM documents for `expires_in`


@dataclass(frozen=True)
class TokenPair:
    """An OAuth2 access/refresh token pair; tokens are kept out of repr so they never get logged."""

    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    expires_at: float  # unix seconds


@dataclass
class Funnels:
    """The account's pipelines: id → its status ids, and the main pipeline's id."""

    statuses: dict[int, set[int]]
    main: int | None


class AmoValidation(CrmPermanent):
    """amoCRM's 400: the whole request refused. `items` maps the `request_id` of every item it
    named (`validation-errors[].request_id`) to what was wrong with it; empty when it named none
    (CRM_FACTS.md, "amoCRM validation")."""

    def __init__(self, message: str, items: Mapping[str, str]) -> None:
        super().__init__(message, status=400)
        self.items = dict(items)


class StaticToken:
    """A long-lived token (amoCRM private integration): nothing to refresh it with."""

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "StaticToken(<hidden>)"

    async def access_token(self) -> str:
        """The configured token."""
        return self._token

    async def refresh(self, stale_access_token: str) -> str:
        """Always fails: a refused long-lived token can only be replaced by hand."""
        raise CrmUnauthorized("the long-lived AMOCRM_ACCESS_TOKEN was refused", status=401)


async def exchange_refresh_token(
    session: aiohttp.ClientSession,
    base_url: str,
    *,
    client_id: str,
    client_secret: str,
    refresh_token: str,
    redirect_uri: str,
    timeout_s: float,
    gate: Gate,
) -> TokenPair:
    """Trade a (single-use) refresh token for a new pair; the caller must store it at once.

    400/401 mean the refresh token is revoked or already used → `CrmUnauthorized`.
    """
    status, body, headers = await send_json(
        session,
        gate,
        "POST",
        f"{base_url.rstrip('/')}/oauth2/access_token",
        json_body={
            "client_id": client_id,
            "client_secret": client_secret,
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "redirect_uri": redirect_uri,
        },
        timeout_s=timeout_s,
    )
    if status in (400, 401):
        raise CrmUnauthorized(
            _clip(f"amoCRM refused the refresh token ({status}): {_problem_summary(body)}"),
            status=status,
        )
    _raise_for(status, body, headers)
    return _parse_token_pair(body)


def _parse_token_pair(body: Any) -> TokenPair:
    access = body.get("access_token") if isinstance(body, dict) else None
    refresh = body.get("refresh_token") if isinstance(body, dict) else None
    if not (isinstance(access, str) and access and isinstance(refresh, str) and refresh):
        raise CrmRetryable("amoCRM answered the token exchange without a token pair")
    # The old refresh token is already dead, so a pair with an odd `expires_in` is still worth
    # keeping; assume the documented lifetime instead of throwing the pair away.
    lifetime = body.get("expires_in")
    if isinstance(lifetime, bool) or not isinstance(lifetime, int | float) or lifetime <= 0:
        lifetime = _DEFAULT_TOKEN_LIFETIME_S
    return TokenPair(access, refresh, time.time() + float(lifetime))


class AmoCrmApi:
    """amoCRM API v4 client: one method per endpoint the relay uses."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        tokens: TokenSource,
        gate: Gate,
        *,
        timeout_s: float = 30.0,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._credentials = Credentials(tokens)
        self._gate = gate
        self._timeout_s = timeout_s

    @property
    def base_url(self) -> str:
        """The account's API root, e.g. `https://example.amocrm.ru`."""
        return self._base

    async def search_contacts(self, query: str) -> list[AmoContact]:
        """Contacts matching a phone or e-mail (fuzzy: re-check the fields); none → []."""
        body = await self._call("GET", "/api/v4/contacts", params={"query": query, "with": "leads"})
        if body is None:
            return []
        contacts = (parse_contact(item) for item in embedded_list(body, "contacts", strict=True))
        return [contact for contact in contacts if contact is not None]

    async def list_contacts(
        self, updated_from: int, page: int = 1, limit: int = LIST_LIMIT
    ) -> ContactPage:
        """Contacts updated at or after `updated_from` (unix seconds), oldest change first.

        One page of `limit` (at most 250); none → an empty page (amoCRM answers 204).
        """
        if not 1 <= limit <= LIST_LIMIT or page < 1:
            raise ValueError(f"limit must be 1..{LIST_LIMIT} and page at least 1")
        params = {
            "filter[updated_at][from]": str(max(0, int(updated_from))),
            "order[updated_at]": "asc",
            "limit": str(limit),
            "page": str(page),
        }
        return parse_contact_page(await self._call("GET", "/api/v4/contacts", params=params))

    async def get_contact(self, contact_id: int) -> AmoContact | None:
        """One contact with its leads; None when amoCRM does not have it (404, or 204)."""
        body = await self._call(
            "GET",
            f"/api/v4/contacts/{int(contact_id)}",
            params={"with": "leads"},
            none_on_404=True,
        )
        if body is None:
            return None
        contact = parse_contact(body)
        if contact is None:
            raise CrmRetryable(f"amoCRM answered contact {contact_id} without an id")
        return contact

    async def get_contacts(self, contact_ids: Sequence[int]) -> dict[int, AmoContact]:
        """Contacts by id with their leads, BULK_IDS to a request (`GET /api/v4/contacts?
        filter[id][]=…&with=leads`); an id amoCRM does not hold is absent from the answer."""
        found: dict[int, AmoContact] = {}
        for body in await self._by_ids("/api/v4/contacts", contact_ids, "leads"):
            for item in embedded_list(body, "contacts", strict=True):
                contact = parse_contact(item)
                if contact is not None:
                    found[contact.id] = contact
        return found

    async def get_leads(self, lead_ids: Sequence[int]) -> dict[int, AmoLead]:
        """Leads by id with their contacts, BULK_IDS to a request (`GET /api/v4/leads?
        filter[id][]=…&with=contacts`); an id amoCRM does not hold is absent from the answer."""
        found: dict[int, AmoLead] = {}
        for body in await self._by_ids("/api/v4/leads", lead_ids, "contacts"):
            for item in embedded_list(body, "leads", strict=True):
                lead = parse_lead(item)
                if lead is not None:
                    found[lead.id] = lead
        return found

    async def _by_ids(self, path: str, wanted: Sequence[int], with_: str) -> list[Any]:
        """The answers of `filter[id]` reads for `wanted` (204, none of them: left out). The
        ids go as `filter[id][0]=…&filter[id][1]=…`, which PHP reads as the same array as
        `filter[id][]=…` repeated (the filter is `int|array`: amocrm.ru/developers/content/
        crm_platform/filters-api)."""
        ids = sorted({int(i) for i in wanted})
        bodies: list[Any] = []
        for start in range(0, len(ids), BULK_IDS):
            chunk = ids[start : start + BULK_IDS]
            params = {f"filter[id][{n}]": str(i) for n, i in enumerate(chunk)}
            params |= {"with": with_, "limit": str(LIST_LIMIT)}
            body = await self._call("GET", path, params=params)
            if body is not None:
                bodies.append(body)
        return bodies

    async def get_lead(self, lead_id: int) -> AmoLead | None:
        """One lead with its contacts; None when amoCRM does not know it (404)."""
        body = await self._call(
            "GET", f"/api/v4/leads/{int(lead_id)}", params={"with": "contacts"}, none_on_404=True
        )
        if body is None:
            return None
        lead = parse_lead(body)
        if lead is None:
            raise CrmRetryable(f"amoCRM answered lead {lead_id} without id/pipeline_id/status_id")
        return lead

    async def create_complex(
        self, leads: Sequence[Mapping[str, Any]]
    ) -> list[ComplexResult | CrmError]:
        """Create leads with their embedded contact in one call; one answer per lead in
        request order: its result, or `CrmRetryable` for a lead the answer left out."""
        _check_batch(leads)
        if not leads:
            return []
        body = await self._call("POST", "/api/v4/leads/complex", json_body=list(leads))
        if not isinstance(body, list):
            raise CrmRetryable(
                f"amoCRM answered leads/complex for {len(leads)} leads with an unexpected body"
            )
        return in_request_order(leads, [parse_complex(item) for item in body])

    async def create_leads(self, leads: Sequence[Mapping[str, Any]]) -> list[int]:
        """Create leads (link contacts via `_embedded.contacts[{id}]`); their ids in order."""
        _check_batch(leads)
        if not leads:
            return []
        body = await self._call("POST", "/api/v4/leads", json_body=list(leads))
        found = [as_int(item.get("id")) for item in embedded_list(body, "leads", strict=True)]
        if len(found) != len(leads) or None in found:
            raise CrmRetryable(f"amoCRM answered {len(leads)} created leads with unexpected ids")
        return [lead_id for lead_id in found if lead_id is not None]

    async def update_leads(self, patches: Sequence[Mapping[str, Any]]) -> None:
        """Patch leads; every patch carries the lead's `id`."""
        await self._patch("/api/v4/leads", patches)

    async def update_contacts(self, patches: Sequence[Mapping[str, Any]]) -> None:
        """Patch contacts; every patch carries the contact's `id`."""
        await self._patch("/api/v4/contacts", patches)

    async def add_notes(self, notes: Sequence[Mapping[str, Any]]) -> None:
        """Add notes to leads (`entity_id`, `note_type`, `params`)."""
        _check_batch(notes)
        if notes:
            await self._call("POST", "/api/v4/leads/notes", json_body=list(notes))

    async def pipelines(self) -> dict[int, set[int]]:
        """Every pipeline id with the ids of its statuses."""
        return (await self.funnels()).statuses

    async def funnels(self) -> Funnels:
        """Every pipeline id with the ids of its statuses, and which one is the main pipeline
        (where a lead without `pipeline_id` goes)."""
        body = await self._call("GET", "/api/v4/leads/pipelines")
        found = Funnels({}, None)
        for pipeline in embedded_list(body, "pipelines", strict=True):
            pipeline_id = as_int(pipeline.get("id"))
            if pipeline_id is not None:
                found.statuses[pipeline_id] = set(ids(embedded_list(pipeline, "statuses")))
                if pipeline.get("is_main") is True:
                    found.main = pipeline_id
        return found

    async def _patch(self, path: str, patches: Sequence[Mapping[str, Any]]) -> None:
        _check_batch(patches)
        if any(as_int(patch.get("id")) is None for patch in patches):
            raise ValueError("every patch needs an integer 'id'")
        if patches:
            await self._call("PATCH", path, json_body=list(patches))

    async def _call(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, str] | None = None,
        none_on_404: bool = False,
    ) -> Any:
        """Send with the token current when the slot is granted; on 401 wait for the one
        refresh and repeat once (service.crm.http.send_with_token)."""
        status, body, headers = await send_with_token(
            self._session,
            self._gate,
            self._credentials,
            method,
            self._base + path,
            authorize=lambda token: (json_body, {"Authorization": f"Bearer {token}"}),
            refused=_token_refused,
            params=params,
            timeout_s=self._timeout_s,
        )
        if status == 404 and none_on_404:
            return None
        _raise_for(status, body, headers)
        return body


def _token_refused(status: int, body: Any) -> bool:
    return status == 401


def _raise_for(status: int, body: Any, headers: Mapping[str, str]) -> None:
    """The one place amoCRM statuses become errors; 2xx passes."""
    if 200 <= status < 300:
        return
    if status == 401:
        raise CrmUnauthorized("amoCRM refused the access token even after a refresh", status=401)
    if status == 429:
        raise CrmRateLimited(
            "amoCRM: too many requests (429)", status=429, retry_after=retry_after_seconds(headers)
        )
    if status == 403:
        raise CrmBlocked(
            "amoCRM answered 403: the account or IP is blocked (stop sending, may need support)",
            status=403,
        )
    if status == 400:
        message = _clip(f"amoCRM rejected the request (400): {_problem_summary(body)}")
        raise AmoValidation(message, _named_items(body))
    if status in _PERMANENT:
        message = _clip(f"amoCRM rejected the request ({status}): {_problem_summary(body)}")
        raise CrmPermanent(message, status=status)
    if status == 504:
        raise CrmRetryable("amoCRM gateway timeout (504): the batch may be too big", status=504)
    if status >= 500:
        raise CrmRetryable(f"amoCRM server error ({status})", status=status)
    raise CrmRetryable(f"amoCRM answered an unexpected status {status}", status=status)


def _problem_summary(body: Any) -> str:
    """`path: detail` pairs from application/problem+json, else its title/detail/hint."""
    pairs: list[str] = []
    if isinstance(body, dict):
        for item in dicts(body.get("validation-errors")):
            for error in dicts(item.get("errors")):
                pairs.append(f"{error.get('path', '?')}: {error.get('detail', error.get('code'))}")
        if not pairs:
            pairs = [str(body[key]) for key in ("title", "detail", "hint") if body.get(key)]
    elif isinstance(body, str) and body.strip():
        pairs = [" ".join(body.split())]
    return "; ".join(pairs) or "no details"


def _named_items(body: Any) -> dict[str, str]:
    """`request_id` → "path: detail; …" for every item a 400 names."""
    named: dict[str, list[str]] = {}
    for item in dicts(body.get("validation-errors") if isinstance(body, dict) else None):
        request_id = item.get("request_id")
        if isinstance(request_id, str | int) and not isinstance(request_id, bool):
            errors = dicts(item.get("errors"))
            named.setdefault(str(request_id), []).extend(
                f"{e.get('path', '?')}: {e.get('detail', e.get('code'))}" for e in errors
            )
    return {rid: _clip("; ".join(texts) or "refused") for rid, texts in named.items()}


def _clip(message: str) -> str:
    # Error messages end up in logs, alerts and the dead-letter table: keep them short.
    return message if len(message) <= _MESSAGE_LIMIT else message[: _MESSAGE_LIMIT - 1] + "…"


def _check_batch(items: Sequence[Mapping[str, Any]]) -> None:
    if len(items) > MAX_BATCH:
        raise ValueError(f"at most {MAX_BATCH} items per amoCRM request, got {len(items)}")
