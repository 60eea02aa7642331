"""The Bitrix24 REST API (incoming webhook or OAuth app): requests, error mapping, no logic.

Every request goes through `send_json` (with OAuth, `send_with_token`: the shared token path
of service/crm/http.py) and so takes one rate-gate slot; a `batch` of up to 50
commands is one request and one slot, which is what makes Bitrix24's bucket (2 requests/s) go
far. Errors — of a whole request or of one command inside a batch — become `CrmError`s in one
place, `error_for`. Answers are untrusted input: a 2xx we cannot read is `CrmRetryable`, never
"nothing found" (that would make the caller create duplicates); contacts and deals are read in
bitrix24_parse.py.

The webhook URL carries its secret in the path, so it never appears in a message or a log;
`send_json` itself names only the host and the method.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from service.crm.base import as_int
from service.crm.bitrix24.parse import (
    BitrixContact,
    BitrixDeal,
    comm_key,
    found_ids,
    parse_contact,
    parse_deal,
)
from service.crm.http import Credentials, Gate, TokenSource, send_json, send_with_token
from service.errors import (
    CrmBlocked,
    CrmError,
    CrmPermanent,
    CrmRateLimited,
    CrmRetryable,
    CrmUnauthorized,
)

__all__ = [  # what callers import from here, parsed types included
    "MAX_COMMANDS",
    "MAX_COMM_VALUES",
    "BatchResult",
    "Bitrix24Api",
    "BitrixContact",
    "BitrixDeal",
    "BitrixNotFound",
    "Ref",
    "TokenSource",
    "as_int",
    "build_query",
    "comm_key",
    "error_for",
    "findbycomm_commands",
    "found_ids",
    "parse_batch",
    "parse_contact",
    "parse_deal",
    "unwrap",
]

MAX_COMMANDS = 50  # per batch
MAX_COMM_VALUES = 20  # per crm.duplicate.findbycomm
_MESSAGE_LIMIT = 500
_AUTH_CODES = frozenset(
    {"INVALID_CREDENTIALS", "expired_token", "invalid_token", "NO_AUTH_FOUND", "WRONG_AUTH_TYPE"}
)
# A webhook without the crm scope or a user without rights: nothing a retry fixes, and every
# request will fail alike, so it is a credentials problem for the operator rather than one bad lead
# (`user_access_error`, 403: CRM_FACTS.md, "Bitrix24 stages").
_PERMISSION_CODES = frozenset({"insufficient_scope", "ACCESS_DENIED", "user_access_error"})
_TRANSIENT_CODES = frozenset({"INTERNAL_SERVER_ERROR", "ERROR_UNEXPECTED_ANSWER"})
# What Bitrix24 expands in any parameter value of a batch command (see `build_query`):
# `CRestUtil::processBatchElement` matches "/\$(result|next|total|time|error)([^\s]*)/i" — any
# case, and the [key] path may come after other characters (CRM_FACTS.md, "Bitrix24 batch
# references"). Every `$` before one of those words is defused, whatever follows it.
_REFERENCE = re.compile(r"\$(?=result|next|total|time|error)", re.IGNORECASE)


class BitrixNotFound(CrmPermanent):
    """Bitrix24 does not know this id (a deleted deal or contact)."""


@dataclass(frozen=True)
class Ref:
    """`$result[command][path…]`: an earlier batch command's result, substituted by Bitrix24."""

    command: str
    path: tuple[str | int, ...] = ()

    def __str__(self) -> str:
        return f"$result[{self.command}]" + "".join(f"[{p}]" for p in self.path)


@dataclass(frozen=True)
class BatchResult:
    """Every command of a batch is in exactly one of `result` (its value) or `errors`."""

    result: dict[str, Any]
    errors: dict[str, CrmError]


class Bitrix24Api:
    """Bitrix24 REST client: `call` one method, `batch` up to 50, and typed helpers.

    With `tokens` (OAuth app tokens, service/crm/oauth.py: access tokens live an hour, refresh
    tokens 28 days and once) every body carries `auth=<token>` and `webhook_url` is the portal's
    `https://<portal>/rest/`; without, the secret in the webhook path is the credential.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        webhook_url: str,
        gate: Gate,
        *,
        timeout_s: float = 30.0,
        tokens: TokenSource | None = None,
    ) -> None:
        self._session = session
        self._base = webhook_url.rstrip("/") + "/"
        self._gate = gate
        self._timeout_s = timeout_s
        self._credentials = Credentials(tokens) if tokens is not None else None

    def __repr__(self) -> str:
        return "Bitrix24Api(<webhook hidden>)"

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """One method; its `result`, or the mapped CrmError raised."""
        body = await self._request(method, dict(params or {}))
        return body["result"]

    async def batch(self, cmds: Mapping[str, str], halt: bool = False) -> BatchResult:
        """Up to 50 commands (`name → "method?query"`) in one request.

        A failed command is a CrmError under its name; with `halt` the commands after the first
        failure do not run and are `CrmRetryable` ("did not run"). A failure of the request
        itself is raised.
        """
        if not 0 < len(cmds) <= MAX_COMMANDS:
            raise ValueError(f"a batch takes 1 to {MAX_COMMANDS} commands, got {len(cmds)}")
        body = await self._request("batch", {"halt": int(halt), "cmd": dict(cmds)})
        return parse_batch(cmds, body["result"])

    async def batch_many(self, cmds: Mapping[str, str]) -> BatchResult:
        """Any number of independent commands (no `$result` across them), 50 per request."""
        names = list(cmds)
        result: dict[str, Any] = {}
        errors: dict[str, CrmError] = {}
        for start in range(0, len(names), MAX_COMMANDS):
            chunk = {name: cmds[name] for name in names[start : start + MAX_COMMANDS]}
            answer = await self.batch(chunk)
            result |= answer.result
            errors |= answer.errors
        return BatchResult(result, errors)

    async def find_contacts_by(self, kind: str, values: Sequence[str]) -> dict[str, list[int]]:
        """Each value → the ids of the contacts holding that phone/e-mail (oldest first).

        findbycomm with several values answers one merged id list. Rather than one command per
        value, ids are attributed by re-reading the hits with crm.contact.get: on a backlog of
        new people nothing is found, so up to 1,000 values cost one request, and only hits cost
        a second one (which the re-check needs anyway: findbycomm normalises phones).
        """
        wanted = list(dict.fromkeys(v for v in values if v))
        if not wanted:
            return {}
        found = await self.batch_many(findbycomm_commands(kind, wanted, "f"))
        _raise_first(found.errors)
        ids = sorted({i for value in found.result.values() for i in found_ids(value)})
        contacts = await self.get_contacts(ids)
        return {v: [c.id for c in contacts if c.has(kind, v)] for v in wanted}

    async def get_contacts(self, ids: Sequence[int]) -> list[BitrixContact]:
        """The contacts that still exist, by id (batched; missing ones are left out)."""
        if not ids:
            return []
        answer = await self.batch_many({f"g{i}": f"crm.contact.get?id={int(i)}" for i in ids})
        _raise_first({k: e for k, e in answer.errors.items() if not isinstance(e, BitrixNotFound)})
        contacts = (parse_contact(value) for value in answer.result.values())
        return [c for c in contacts if c is not None]

    async def get_deal(self, deal_id: int) -> BitrixDeal | None:
        """One deal; None when Bitrix24 does not know it."""
        try:
            value = await self.call("crm.deal.get", {"id": int(deal_id)})
        except BitrixNotFound:
            return None
        deal = parse_deal(value)
        if deal is None:
            raise CrmRetryable(f"Bitrix24 answered crm.deal.get {deal_id} without a readable deal")
        return deal

    async def _request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """POST `{base}{method}.json`; with OAuth, `auth=<token>` in the body, the token read
        when the slot is granted, and an expired one refreshed once per process."""
        url = f"{self._base}{method}.json"
        if self._credentials is None:
            status, answer, _ = await send_json(
                self._session, self._gate, "POST", url, json_body=params, timeout_s=self._timeout_s
            )
        else:
            status, answer, _ = await send_with_token(
                self._session,
                self._gate,
                self._credentials,
                "POST",
                url,
                authorize=lambda token: ({**params, "auth": token}, {}),
                refused=_token_refused,
                timeout_s=self._timeout_s,
            )
        return unwrap(method, status, answer)


def unwrap(method: str, status: int, body: Any) -> dict[str, Any]:
    """The answer's envelope if it is a success; otherwise the mapped CrmError is raised."""
    code = _code(body)
    if code is not None or not 200 <= status < 300:
        # A gateway's HTML error page says nothing useful and would bloat the message.
        description = body.get("error_description") if isinstance(body, dict) else None
        raise error_for(method, code, _text(description), status=status, time_info=_time(body))
    if not isinstance(body, dict) or "result" not in body:
        raise CrmRetryable(f"Bitrix24 answered {method} without a result", status=status)
    return body


def error_for(
    method: str,
    code: str | None,
    description: str,
    *,
    status: int | None = None,
    time_info: Mapping[str, Any] | None = None,
) -> CrmError:
    """The one place Bitrix24 errors become CrmErrors: whole requests (with their HTTP status)
    and commands inside a batch (without one) map alike."""
    message = _clip(f"Bitrix24 {method}: {code or status or 'error'}: {description or '-'}")
    if code == "QUERY_LIMIT_EXCEEDED" or (code is None and status == 429):
        return CrmRateLimited(message, status=status)
    if code == "OPERATION_TIME_LIMIT":
        return CrmRateLimited(message, status=status, retry_after=_until(time_info), scope=method)
    if code == "OVERLOAD_LIMIT":
        return CrmBlocked(message, status=status)
    if code in _AUTH_CODES or code in _PERMISSION_CODES or status == 401:
        return CrmUnauthorized(message, status=status)
    if code in ("NOT_FOUND", "ERROR_NOT_FOUND") or (not code and description == "Not found"):
        return BitrixNotFound(message, status=status)
    if code in _TRANSIENT_CODES or (status is not None and status >= 500):
        return CrmRetryable(message, status=status)
    return CrmPermanent(message, status=status)


def parse_batch(cmds: Mapping[str, str], envelope: Any) -> BatchResult:
    """Split a batch answer into results and per-command CrmErrors, one entry per command."""
    results = _section(envelope, "result")
    failures = _section(envelope, "result_error")
    times = _section(envelope, "result_time")
    if results is None or failures is None:
        raise CrmRetryable("Bitrix24 answered batch without result/result_error")
    result: dict[str, Any] = {}
    errors: dict[str, CrmError] = {}
    for name, command in cmds.items():
        method = command.partition("?")[0].removesuffix(".json")
        if name in failures:
            failure = failures[name] if isinstance(failures[name], dict) else {}
            code = failure.get("error")
            errors[name] = error_for(
                method,
                code if isinstance(code, str) else None,
                _text(failure.get("error_description")),
                time_info=times.get(name) if times else None,
            )
        elif name in results:
            result[name] = results[name]
        else:
            errors[name] = CrmRetryable(f"Bitrix24 batch: {method} did not run")
    return BatchResult(result, errors)


def build_query(params: Mapping[str, Any]) -> str:
    """PHP-style nested query string for a batch command: `fields[PHONE][0][VALUE]=%2B7…`.

    Values are percent-encoded; lists are indexed, dicts keyed, None is empty, booleans are
    Bitrix24's "Y"/"N". A `Ref` is written as the `$result[…]` reference Bitrix24 substitutes.
    Plain strings are defused: Bitrix24 would expand `$result[…]`, `$next[…]`, `$total[…]`,
    `$time[…]` or `$error[…]` (any case) found in a person's name or comment too, pulling another
    command's result into their lead or failing the command, so that `$` becomes "＄".
    """
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        _flatten(str(key), value, pairs)
    return "&".join(f"{quote(k, safe='[]')}={quote(v, safe='$[]')}" for k, v in pairs)


def _flatten(key: str, value: Any, out: list[tuple[str, str]]) -> None:
    if isinstance(value, Mapping):
        for sub, item in value.items():
            _flatten(f"{key}[{sub}]", item, out)
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _flatten(f"{key}[{index}]", item, out)
    elif isinstance(value, Ref):
        out.append((key, str(value)))
    elif isinstance(value, bool):
        out.append((key, "Y" if value else "N"))
    elif value is None:
        out.append((key, ""))
    else:
        out.append((key, _REFERENCE.sub("＄", str(value))))


def findbycomm_commands(kind: str, values: Sequence[str], prefix: str) -> dict[str, str]:
    """crm.duplicate.findbycomm commands for `values`, at most 20 values each, named prefix+n."""
    chunks = [values[i : i + MAX_COMM_VALUES] for i in range(0, len(values), MAX_COMM_VALUES)]
    return {
        f"{prefix}{n}": "crm.duplicate.findbycomm?"
        + build_query({"entity_type": "CONTACT", "type": kind, "values": list(chunk)})
        for n, chunk in enumerate(chunks)
    }


def _section(envelope: Any, key: str) -> dict[str, Any] | None:
    value = envelope.get(key) if isinstance(envelope, dict) else None
    if isinstance(value, list):  # PHP writes an empty (or numbered) array as a JSON list
        return {str(n): item for n, item in enumerate(value)}
    return value if isinstance(value, dict) else None


def _raise_first(errors: Mapping[str, CrmError]) -> None:
    for error in errors.values():
        raise error


def _token_refused(status: int, body: Any) -> bool:
    return _code(body) in ("expired_token", "invalid_token")


def _code(body: Any) -> str | None:
    code = body.get("error") if isinstance(body, dict) else None
    return code if isinstance(code, str) else None


def _time(body: Any) -> Mapping[str, Any] | None:
    value = body.get("time") if isinstance(body, dict) else None
    return value if isinstance(value, dict) else None


def _until(time_info: Mapping[str, Any] | None) -> float | None:
    reset_at = time_info.get("operating_reset_at") if time_info else None
    if isinstance(reset_at, bool) or not isinstance(reset_at, int | float):
        return None
    return max(0.0, float(reset_at) - time.time())


def _text(value: Any) -> str:
    return " ".join(value.split()) if isinstance(value, str) else ""


def _clip(message: str) -> str:
    # Error messages end up in logs, alerts and the dead-letter table: keep them short.
    return message if len(message) <= _MESSAGE_LIMIT else message[: _MESSAGE_LIMIT - 1] + "…"
