"""The amoCRM API v4 endpoints of the simulator, and its OAuth2 token bookkeeping.

Handlers are thin: parse, call `AmoStore`, render. Limits, faults and the request log are not
here; `service.simulators.amocrm.server` wraps every route in them.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from service.simulators.amocrm.checks import RequestRefused
from service.simulators.amocrm.state import AmoStore, ValidationFailed
from service.simulators.common import json_answer, problem

if TYPE_CHECKING:
    from service.simulators.amocrm.config import SimulatorConfig

__all__ = ["AmoApi", "Tokens", "validation_problem"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LIST_LIMIT = 250  # amoCRM's most entities per page
_ORDER_FIELDS = ("updated_at", "id")


def validation_problem(exc: ValidationFailed) -> web.Response:
    """amoCRM's 400: problem+json with `validation-errors[].errors[]{code, path, detail}`."""
    return problem(400, "Request validation failed", **{"validation-errors": exc.errors})


async def read_json(request: web.Request) -> Any:
    """The request body as JSON; unparseable bodies are a validation error, as in amoCRM."""
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValidationFailed.single("InvalidJson", "", "The body is not valid JSON") from None


class OAuthRefused(Exception):
    """The token endpoint said no; carries the answer to give."""

    def __init__(self, status: int, hint: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.hint = hint
        self.detail = detail


class Tokens:
    """Access tokens (the configured long-lived one plus issued ones) and the live refresh token."""

    def __init__(self, refresh_token: str) -> None:
        self.reset(refresh_token)

    def reset(self, refresh_token: str) -> None:
        """Back to the configured pair: the long-lived token works, no others were issued."""
        self.refresh_token = refresh_token
        self.long_lived_expired = False
        self._issued: dict[str, float] = {}  # access token -> monotonic expiry
        self._serial = itertools.count(1)

    def valid(self, token: str, config: SimulatorConfig, now: float) -> bool:
        if token == config.access_token and not self.long_lived_expired:
            return True
        return self._issued.get(token, 0.0) > now

    def expire_all(self) -> None:
        """Every access token answers 401 from now on; only a refresh gets a working one."""
        self.long_lived_expired = True
        self._issued.clear()

    def exchange(self, body: Any, config: SimulatorConfig, now: float) -> dict[str, Any]:
        """Trade the current refresh token for a new pair; the old refresh token dies."""
        if not isinstance(body, dict):
            raise OAuthRefused(400, "Invalid request", "The body must be a JSON object")
        if (body.get("client_id"), body.get("client_secret")) != (
            config.client_id,
            config.client_secret,
        ):
            raise OAuthRefused(401, "Client authentication failed", "Unknown client")
        if body.get("grant_type") != "refresh_token":
            raise OAuthRefused(400, "Unsupported grant type", "Only refresh_token is supported")
        if body.get("redirect_uri") != config.redirect_uri:
            raise OAuthRefused(400, "Invalid request", "redirect_uri is not the integration's")
        if body.get("refresh_token") != self.refresh_token:
            raise OAuthRefused(400, "Token has been revoked", "The refresh token is invalid.")
        serial = next(self._serial)
        access = f"sim-access-{serial}"
        self.refresh_token = f"sim-refresh-{serial}"
        self._issued[access] = now + config.token_ttl_s
        return {
            "token_type": "Bearer",
            "expires_in": int(config.token_ttl_s),
            "access_token": access,
            "refresh_token": self.refresh_token,
        }


class AmoApi:
    """Route handlers for the amoCRM endpoints the relay uses, over one `AmoStore`."""

    def __init__(
        self,
        store: AmoStore,
        tokens: Tokens,
        config: Callable[[], SimulatorConfig],
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.tokens = tokens
        self._config = config
        self._clock = clock
        # served contact reads by kind: "search" (?query=), "list" (no query), "get" (by id),
        # "ids" (a list read with filter[id])
        self.contact_reads: Counter[str] = Counter()

    def routes(self) -> list[web.RouteDef]:
        """Every endpoint, each turning `ValidationFailed` into amoCRM's 400."""
        table: list[tuple[str, str, Handler]] = [
            ("GET", "/api/v4/contacts", self.list_contacts),
            ("POST", "/api/v4/contacts", self.create_contacts),
            ("PATCH", "/api/v4/contacts", self.update_contacts),
            ("GET", r"/api/v4/contacts/{id:\d+}", self.get_contact),
            ("PATCH", r"/api/v4/contacts/{id:\d+}", self.update_contact),
            ("GET", "/api/v4/leads/pipelines", self.pipelines),
            ("GET", "/api/v4/leads", self.list_leads),
            ("POST", "/api/v4/leads/complex", self.create_complex),
            ("POST", "/api/v4/leads", self.create_leads),
            ("PATCH", "/api/v4/leads", self.update_leads),
            ("GET", r"/api/v4/leads/{id:\d+}", self.get_lead),
            ("PATCH", r"/api/v4/leads/{id:\d+}", self.update_lead),
            ("POST", "/api/v4/leads/notes", self.add_notes),
            ("POST", "/oauth2/access_token", self.access_token),
        ]
        return [web.route(method, path, _guarded(handler)) for method, path, handler in table]

    def authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        return self.tokens.valid(token.strip(), self._config(), self._clock())

    async def list_contacts(self, request: web.Request) -> web.Response:
        """The contacts list: a fuzzy `query` search and/or `filter[updated_at][from|to]`,
        `order[updated_at|id]=asc|desc`, `limit` (1..250), `page`; an empty page is 204 with an
        empty body, as amoCRM answers it."""
        query = request.query.get("query", "")
        limit = _int_param(request, "limit", 50)
        page = _int_param(request, "page", 1)
        if not 1 <= limit <= LIST_LIMIT or page < 1:
            detail = f"limit must be 1..{LIST_LIMIT} and page at least 1"
            raise ValidationFailed.single("InvalidValue", "limit", detail)
        since = _optional_int(request, "filter[updated_at][from]")
        until = _optional_int(request, "filter[updated_at][to]")
        found = self.store.list_contacts(query, since, until, _order(request))
        ids = _id_filter(request)
        if ids is not None:
            found = [c for c in found if c.id in ids]
        kind = "ids" if ids is not None else "search" if query.strip() else "list"
        self.contact_reads[kind] += 1
        shown = found[(page - 1) * limit : page * limit]
        if not shown:
            return web.Response(status=204)
        with_leads = "leads" in request.query.get("with", "").split(",")
        leads = self.store.lead_ids_by_contact() if with_leads else None
        contacts = [c.to_json(leads.get(c.id, []) if leads is not None else None) for c in shown]
        links = {"self": {"href": str(request.url)}}
        if len(found) > page * limit:
            links["next"] = {"href": str(request.url.update_query(page=page + 1))}
        return json_answer({"_page": page, "_links": links, "_embedded": {"contacts": contacts}})

    async def get_contact(self, request: web.Request) -> web.Response:
        contact = self.store.contacts.get(int(request.match_info["id"]))
        self.contact_reads["get"] += 1
        if contact is None:
            return problem(404, "Contact not found")
        with_leads = "leads" in request.query.get("with", "").split(",")
        lead_ids = self.store.lead_ids_by_contact().get(contact.id, []) if with_leads else None
        return json_answer(contact.to_json(lead_ids))

    async def list_leads(self, request: web.Request) -> web.Response:
        """The leads list, by `filter[id]` (one id or an array), `limit` (1..250, default 50),
        `page`; contacts are embedded (`with=contacts`). Nothing matching is 204 with an empty
        body, as for contacts. (amocrm.ru/developers/content/crm_platform/leads-api, "Список
        сделок"; the filter: …/crm_platform/filters-api, `filter[id]` int|array.)"""
        limit = _int_param(request, "limit", 50)
        page = _int_param(request, "page", 1)
        if not 1 <= limit <= LIST_LIMIT or page < 1:
            detail = f"limit must be 1..{LIST_LIMIT} and page at least 1"
            raise ValidationFailed.single("InvalidValue", "limit", detail)
        ids = _id_filter(request)
        found = [lead for lead in self.store.leads.values() if ids is None or lead.id in ids]
        shown = found[(page - 1) * limit : page * limit]
        if not shown:
            return web.Response(status=204)
        links = {"self": {"href": str(request.url)}}
        if len(found) > page * limit:
            links["next"] = {"href": str(request.url.update_query(page=page + 1))}
        leads = [lead.to_json() for lead in shown]
        return json_answer({"_page": page, "_links": links, "_embedded": {"leads": leads}})

    async def get_lead(self, request: web.Request) -> web.Response:
        lead = self.store.leads.get(int(request.match_info["id"]))
        if lead is None:
            return problem(404, "Lead not found")
        return json_answer(lead.to_json())

    async def pipelines(self, request: web.Request) -> web.Response:
        pipelines = [p.to_json() for p in self.store.pipelines.values()]
        return json_answer({"_embedded": {"pipelines": pipelines}})

    async def create_complex(self, request: web.Request) -> web.Response:
        merge = self._config().merge_duplicates
        return json_answer(self.store.create_complex(await read_json(request), merge))

    async def create_leads(self, request: web.Request) -> web.Response:
        created = self.store.create_leads(await read_json(request))
        return json_answer({"_embedded": {"leads": created}})

    async def create_contacts(self, request: web.Request) -> web.Response:
        created = self.store.create_contacts(await read_json(request))
        return json_answer({"_embedded": {"contacts": created}})

    async def update_leads(self, request: web.Request) -> web.Response:
        updated = self.store.update_leads(await read_json(request))
        return json_answer({"_embedded": {"leads": updated}})

    async def update_lead(self, request: web.Request) -> web.Response:
        item = _single(await read_json(request), request)
        return json_answer(self.store.update_leads([item])[0])

    async def update_contacts(self, request: web.Request) -> web.Response:
        updated = self.store.update_contacts(await read_json(request))
        return json_answer({"_embedded": {"contacts": updated}})

    async def update_contact(self, request: web.Request) -> web.Response:
        item = _single(await read_json(request), request)
        return json_answer(self.store.update_contacts([item])[0])

    async def add_notes(self, request: web.Request) -> web.Response:
        notes = self.store.add_notes(await read_json(request))
        return json_answer({"_embedded": {"notes": notes}})

    async def access_token(self, request: web.Request) -> web.Response:
        try:
            pair = self.tokens.exchange(await read_json(request), self._config(), self._clock())
        except OAuthRefused as exc:
            return problem(exc.status, exc.detail, hint=exc.hint)
        return json_answer(pair)


def _guarded(handler: Handler) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ValidationFailed as exc:
            return validation_problem(exc)
        except RequestRefused as exc:
            return problem(400, exc.detail)

    return guarded


def _single(body: Any, request: web.Request) -> dict[str, Any]:
    """The body of `PATCH .../{id}`: one object, its id taken from the path."""
    if not isinstance(body, dict):
        raise ValidationFailed.single("InvalidType", "", "Expected a JSON object")
    return {**body, "id": int(request.match_info["id"])}


def _int_param(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        raise ValidationFailed.single("InvalidType", name, "Expected an integer") from None


def _optional_int(request: web.Request, name: str) -> int | None:
    return _int_param(request, name, 0) if name in request.query else None


def _id_filter(request: web.Request) -> set[int] | None:
    """`filter[id]`: one id (`filter[id]=5`) or an array, written as PHP reads one
    (`filter[id][]=5&filter[id][]=6` or `filter[id][0]=5&filter[id][1]=6`); None when absent."""
    values = [
        v for k, v in request.query.items() if k == "filter[id]" or k.startswith("filter[id][")
    ]
    if not values:
        return None
    try:
        return {int(v) for v in values}
    except ValueError:
        raise ValidationFailed.single("InvalidType", "filter[id]", "Expected integers") from None


def _order(request: web.Request) -> tuple[str, str]:
    """`order[<field>]=asc|desc` (one field: updated_at or id); by id, oldest first, if none."""
    given = [(k[6:-1], v.lower()) for k, v in request.query.items() if k.startswith("order[")]
    if not given:
        return ("id", "asc")
    (field, direction), *rest = given
    if rest or field not in _ORDER_FIELDS or direction not in ("asc", "desc"):
        detail = f"one order[updated_at|id]=asc|desc, got {given}"
        raise ValidationFailed.single("InvalidValue", "order", detail)
    return field, direction
