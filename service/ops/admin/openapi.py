"""The admin API's OpenAPI 3.1 description, served at `/admin/openapi.json`.

Written by hand next to the routes it describes; a test fails when a route under `/admin` is
missing here.
"""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]


def _ref(name: str) -> Json:
    return {"$ref": f"#/components/schemas/{name}"}


def _query(name: str, description: str, schema: Json | None = None) -> Json:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema or {"type": "string"},
    }


def _path(name: str, description: str, schema: Json | None = None) -> Json:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": schema or {"type": "integer"},
    }


def _ok(description: str, schema: Json | None = None) -> Json:
    responses: Json = {
        "200": {
            "description": description,
            "content": {"application/json": {"schema": schema or _ref("Ok")}},
        },
        "401": {"description": "missing or wrong bearer token", "content": _error()},
        "503": {"description": "the database is unreachable", "content": _error()},
    }
    return responses


def _error() -> Json:
    return {"application/json": {"schema": _ref("Error")}}


def _op(summary: str, description: str, schema: Json | None = None, **extra: Any) -> Json:
    op: Json = {"summary": summary, "responses": _ok(description, schema)}
    if extra.get("params"):
        op["parameters"] = extra["params"]
    if extra.get("body"):
        op["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": extra["body"]}},
        }
    if extra.get("errors"):
        op["responses"].update(extra["errors"])
    if extra.get("public"):
        op["security"] = []
        del op["responses"]["401"]
    return op


INT = {"type": "integer"}
LIMIT = _query("limit", "at most this many (1–500, default 50)", INT)
TIME = {"type": "string", "format": "date-time"}
DEAD_FILTER = [
    _query("form", "form name"),
    _query("error", "text contained in the last error (case-insensitive)"),
    _query("since", "died at or after (ISO 8601; no zone = UTC)", TIME),
    _query("until", "died before (ISO 8601)", TIME),
]
JOB_STATE = _query("state", "pending | running | done | dead")
BAD = {"400": {"description": "a parameter cannot be used", "content": _error()}}
NOT_FOUND = {"404": {"description": "no such dead letter", "content": _error()}}


def _paths() -> Json:
    api = "/admin/api"
    return {
        "/admin": {"get": _op("Redirect to the dashboard", "see /admin/", public=True)},
        "/admin/": {
            "get": {
                "summary": "Dashboard (HTML; asks for the token in the page)",
                "security": [],
                "responses": {"200": {"description": "HTML", "content": {"text/html": {}}}},
            }
        },
        "/admin/openapi.json": {
            "get": _op("This description", "OpenAPI 3.1", {"type": "object"}, public=True)
        },
        f"{api}/overview": {
            "get": _op(
                "Queue, dead letters, worker, circuit; crm: this process's CRM calls per second "
                "(last 10 s) against the limit, the 429 pause, the circuit, the CRM's lead page "
                "URL template ({id})",
                "overview",
            )
        },
        f"{api}/timeline": {
            "get": _op(
                "Queue depth and deliveries per minute",
                "one point per minute",
                params=[_query("minutes", "how far back (1–1440, default 60)", INT)],
                errors=BAD,
            )
        },
        f"{api}/submissions": {
            "get": _op(
                "Find submissions with delivery state, job state, attempts, error, CRM ids and "
                "crm_lead_url (the amoCRM lead / Bitrix24 deal page; null without a base URL); "
                "no filter: the latest",
                "newest first",
                params=[
                    _query("phone", "any way of writing it; normalised like intake does"),
                    _query("email", "normalised like intake does"),
                    _query("form", "form name"),
                    _query("since", "received at or after (ISO 8601)", TIME),
                    _query("until", "received before (ISO 8601)", TIME),
                    _query("state", "pending | delivered | dead"),
                    LIMIT,
                ],
                errors=BAD,
            )
        },
        f"{api}/jobs": {
            "get": _op(
                "Jobs by state",
                "most recently changed first",
                params=[JOB_STATE, LIMIT],
                errors=BAD,
            )
        },
        f"{api}/dead-letters": {
            "get": _op("Dead letters not discarded", "newest first", params=[*DEAD_FILTER, LIMIT])
        },
        f"{api}/dead-letters/replay": {
            "post": _op(
                "Replay every undiscarded dead letter matching a filter",
                "the replayed job ids",
                body=_ref("DeadFilter"),
                errors=BAD,
            )
        },
        f"{api}/dead-letters/{{job_id}}/replay": {
            "post": _op(
                "Replay one dead letter (also a discarded one)",
                "replayed",
                params=[_path("job_id", "the dead job")],
                errors=NOT_FOUND,
            )
        },
        f"{api}/dead-letters/{{job_id}}/discard": {
            "post": _op(
                "Mark a dead letter discarded: no replay-by-filter will resend it",
                "discarded",
                params=[_path("job_id", "the dead job")],
                body={"type": "object", "properties": {"note": {"type": "string"}}},
                errors=NOT_FOUND,
            )
        },
        f"{api}/locks": {
            "get": _op(
                "Locks held, by source: process, people (leases), person-locks (advisory locks "
                "ingest transactions hold across the cluster, keyed by hash), redis",
                "by source",
            )
        },
        f"{api}/locks/{{source}}/{{key}}": {
            "delete": _op(
                "Force-release one lock (person leases; redis when configured)",
                "released",
                params=[
                    _path("source", "process | people | person-locks | redis", {"type": "string"}),
                    _path("key", "the lock's key (a person id for people)", {"type": "string"}),
                ],
                errors={
                    "404": {"description": "not held", "content": _error()},
                    "409": {
                        "description": "cannot be force-released (process; person-locks: only "
                        "the holding transaction can release them)",
                        "content": _error(),
                    },
                },
            )
        },
        f"{api}/delivery": {
            "get": _op("Whether delivery is paused (in every process), by whom, since", "state")
        },
        f"{api}/delivery/pause": {"post": _op("Pause delivery in every process", "state")},
        f"{api}/delivery/resume": {"post": _op("Resume delivery in every process", "state")},
        f"{api}/processes": {
            "get": _op(
                "Processes that beat in the last day (live or not) and this process's cluster "
                "mode (redis | local-share | single)",
                "cluster state and processes",
            )
        },
        f"{api}/spool": {
            "get": _op(
                "This host's spool: bytes waiting, the cap, entries that could not be stored "
                "(quarantined, newest first: when, why, the entry's first 2,000 characters), "
                "bad input kept / spooled / not kept, the data volume's free space",
                "spool state",
                params=[LIMIT],
            )
        },
        **_webhook_paths(api),
        **_privacy_paths(api),
        **_panel_paths(api),
    }


def _panel_paths(api: str) -> Json:
    """service/ops/admin/panels.py: the dashboard's read-only lists."""
    return {
        f"{api}/rejected": {
            "get": _op(
                "Bad input kept for inspection (forms and webhooks), newest first: endpoint, "
                "errors, body size and its first 300 bytes",
                "list",
                params=[LIMIT],
                errors=BAD,
            )
        },
        f"{api}/webhook-events": {
            "get": _op(
                "Webhook events in, newest first, with their outcome, process job state and "
                "forwards (destination without query string, state, attempts, last error); "
                "crm_lead_url for the configured CRM's own events",
                "list",
                params=[LIMIT],
                errors=BAD,
            )
        },
        f"{api}/forwards": {
            "get": _op(
                "Forwards out (events POSTed downstream), newest first",
                "list",
                params=[JOB_STATE, LIMIT],
                errors=BAD,
            )
        },
        f"{api}/forms/today": {
            "get": _op(
                "Per form since 00:00 UTC today (or since): received, delivered, pending, dead, "
                "spam caught; the busiest forms first",
                "since, forms",
                params=[
                    _query("since", "count from (ISO 8601; default today 00:00 UTC)", TIME),
                    LIMIT,
                ],
                errors=BAD,
            )
        },
    }


def _privacy_paths(api: str) -> Json:
    """service/ops/admin/privacy.py: spam review and release, erasure."""
    counts = {"type": "object", "additionalProperties": INT}
    return {
        f"{api}/spam": {
            "get": _op(
                "Submissions the spam controls caught (never delivered unless released), "
                "newest first",
                "list",
                params=[
                    _query("form", "form name"),
                    _query(
                        "reason",
                        "honeypot | too_fast | no_render_time | rate_limited | captcha_missing "
                        "| captcha_failed | captcha_unavailable",
                    ),
                    _query("since", "received at or after (ISO 8601)", TIME),
                    _query("until", "received before (ISO 8601)", TIME),
                    _query("released", "true | false"),
                    LIMIT,
                ],
                errors=BAD,
            )
        },
        f"{api}/spam/{{spam_id}}/release": {
            "post": _op(
                "Release a caught submission: it becomes a normal lead, delivered once (a second "
                "release changes nothing)",
                "submission_id (the spam id, or the original's when its key was already a "
                "submission: duplicate true), already_released",
                params=[_path("spam_id", "the spam row's id", {"type": "string"})],
                errors={
                    **BAD,
                    "404": {"description": "no such spam row", "content": _error()},
                },
            )
        },
        f"{api}/forget": {
            "post": _op(
                "Erase one person's data here (not in the CRM): submissions and their jobs, "
                "identities, spam, rejected bodies and webhook events that mention them, "
                "contact index rows",
                "removed: rows deleted per table",
                {
                    "type": "object",
                    "required": ["ok", "removed"],
                    "properties": {"ok": {"const": True}, "removed": counts},
                },
                body={
                    "type": "object",
                    "properties": {
                        "phone": {"type": "string", "description": "any way of writing it"},
                        "email": {"type": "string"},
                    },
                    "description": "phone, email or both",
                },
                errors=BAD,
            )
        },
    }


def _webhook_paths(api: str) -> Json:
    """service/ops/admin/webhooks.py: dead forward jobs and lead states."""
    dead = f"{api}/forward-dead-letters"
    return {
        dead: {
            "get": _op("Dead forward jobs (webhook outbox), newest first", "list", params=[LIMIT])
        },
        f"{dead}/replay": {
            "post": _op(
                "Replay dead forward jobs: the given ids, or all",
                "how many were replayed",
                body={
                    "type": "object",
                    "properties": {
                        "ids": {"type": "array", "items": INT},
                        "all": {"type": "boolean", "description": "required without ids"},
                    },
                },
                errors=BAD,
            )
        },
        f"{dead}/{{job_id}}/replay": {
            "post": _op(
                "Replay one dead forward job",
                "replayed",
                params=[_path("job_id", "the dead forward job")],
                errors={"404": {"description": "no such dead forward job", "content": _error()}},
            )
        },
        f"{api}/lead-states": {
            "get": _op(
                "Our delivered submissions and where their CRM leads stand now (from webhooks)",
                "newest change first",
                params=[_query("crm", "amocrm | bitrix24 (default: the configured CRM)"), LIMIT],
                errors=BAD,
            )
        },
    }


def spec(version: str) -> Json:
    """The whole OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "crm-relay admin API",
            "version": version,
            "description": "Operators' API: lookups, dead letters, locks, pause/resume.",
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "ADMIN_TOKEN"}
            },
            "schemas": {
                "Ok": {
                    "type": "object",
                    "required": ["ok"],
                    "properties": {"ok": {"const": True}},
                    "additionalProperties": True,
                },
                "Error": {
                    "type": "object",
                    "required": ["ok"],
                    "properties": {
                        "ok": {"const": False},
                        "error": {"type": "string"},
                        "errors": {"type": "array", "items": {"type": "object"}},
                    },
                },
                "DeadFilter": {
                    "type": "object",
                    "properties": {
                        "form": {"type": "string"},
                        "error": {"type": "string"},
                        "since": TIME,
                        "until": TIME,
                        "all": {"type": "boolean", "description": "required when no filter"},
                    },
                },
            },
        },
    }
