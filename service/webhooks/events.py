"""CRM and generic webhook events: what one delivery contains, its keys, its signatures.

Pure functions, no I/O: the handlers (`service/webhooks/handlers.py`) and the forwarder
(`service/webhooks/forwarder.py`) call them.

Event keys make a re-delivery a duplicate and a later change a new event:
- amoCRM: `<entity>.<action>:<id>:<updated_at or last_modified>` (`:<status_id>` added for status
  changes, because `updated_at` has one-second resolution and two moves within a second are two
  events); an item without an id is keyed by the hash of its content.
- Bitrix24: `<event>:<data[FIELDS][ID]>:<ts>`.
- generic: the configured body field, else `Idempotency-Key`, `Upstash-Message-Id`,
  `X-Request-Id`, else the SHA-256 of the raw body.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

import orjson

from service.errors import BadInput
from service.intake.bodies import parse_body
from service.model import Event, LeadChange

MAX_KEY = 200
# Headers whose values identify a message across re-deliveries, in the order they are trusted.
KEY_HEADERS = (("Idempotency-Key", "idem"), ("Upstash-Message-Id", "msg"), ("X-Request-Id", "req"))
# Headers worth keeping with a delivery (never the signatures or credentials).
KEPT_HEADERS = (*(h for h, _ in KEY_HEADERS), "Upstash-Retried", "User-Agent", "X-Forwarded-For")
QSTASH_LEEWAY_S = 30.0
# amoCRM sends these top-level sections next to the entity sections; they are context, not events.
AMO_CONTEXT = frozenset({"account"})
# amoCRM lead actions whose item is the lead itself (notes carry the note, deletes no status)
AMO_LEAD_ACTIONS = frozenset({"add", "status", "update", "restore"})
JWT_HEADER = b'{"alg":"HS256","typ":"JWT"}'
# Bitrix24's credentials, `auth[application_token]=…` (brackets as sent or percent-encoded)
# (a pattern that starts with a literal is searched for as fast as bytes.find: 0.3 ms in 1 MiB,
# where a leading `(?:^|&)` took 30 ms; the pair's start is checked on each match instead)
_B24_TOKEN = re.compile(rb"auth(?:\[|%5[bB])application_token(?:\]|%5[dD])=([^&]*)")
_AUTH_PAIR = re.compile(rb"auth(?:[=\[]|%5[bB]|$)")
_INDEX = re.compile(r"[0-9]{1,18}")  # ASCII digits: str.isdigit also takes "²", int() does not
# fields parsed before the token is checked, for a body that is not urlencoded
BITRIX24_AUTH_FIELDS = 1000


def body_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _canonical_hash(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


def _scalar(value: Any) -> str | None:
    if isinstance(value, bool) or value is None or isinstance(value, dict | list):
        return None
    text = str(value).strip()
    return text[:MAX_KEY] or None


# --- amoCRM -------------------------------------------------------------------------------------


def amocrm_events(body: Mapping[str, Any]) -> list[Event]:
    """One event per entity change (`leads[status][0]`, `leads[status][1]`, `contacts[add][0]`…).

    A body with nothing we recognise is still one event (keyed by its content), so nothing a CRM
    sent is dropped."""
    account = body.get("account") if isinstance(body.get("account"), dict) else None
    events = []
    for entity, actions in body.items():
        if entity in AMO_CONTEXT or not isinstance(actions, dict):
            continue
        for action, items in actions.items():
            for item in _items(items):
                events.append(_amo_event(str(entity), str(action), item, account))
    if not events:
        events.append(Event(f"body:{_canonical_hash(body)}", "unknown", None, {"data": dict(body)}))
    return events


def _items(items: Any) -> Iterable[dict[str, Any]]:
    if isinstance(items, list):
        return (i for i in items if isinstance(i, dict))
    if isinstance(items, dict):  # `leads[status][5][id]` without 0..4 stays a dict of dicts
        return (i for i in items.values() if isinstance(i, dict))
    return ()


def _amo_event(
    entity: str, action: str, item: dict[str, Any], account: dict[str, Any] | None
) -> Event:
    kind = f"{entity}.{action}"[:100]
    entity_id = _scalar(item.get("id")) or _scalar(item.get("uid"))
    changed = _scalar(item.get("updated_at")) or _scalar(item.get("last_modified"))
    if entity_id is None or changed is None:
        key = f"{kind}:{entity_id or '-'}:{_canonical_hash(item)}"
    else:
        key = f"{kind}:{entity_id}:{changed}"
        if action == "status":
            key += f":{_scalar(item.get('status_id')) or '-'}"
    payload: dict[str, Any] = {"data": item}
    if account is not None:
        payload["account"] = account
    return Event(key, kind, entity_id, payload)


# --- Bitrix24 -----------------------------------------------------------------------------------


def bitrix24_token(body: Mapping[str, Any]) -> str | None:
    auth = body.get("auth")
    return _scalar(auth.get("application_token")) if isinstance(auth, dict) else None


def bitrix24_raw_token(content_type: str | None, raw: bytes) -> str | None:
    """The application token of a delivery, found before the body is parsed: a stranger's
    1 MiB of 100,000 fields must not cost a full parse before it is refused. Bitrix24 sends
    urlencoded bodies: the token is searched for in the bytes (the last one wins, as the parser
    decides); any other body is parsed with a small field cap (JSON is bounded by its size)."""
    if _media(content_type) == "application/x-www-form-urlencoded":
        found = [
            m.group(1)
            for m in _B24_TOKEN.finditer(raw)
            if m.start() == 0 or raw[m.start() - 1] == ord("&")
        ]
        if not found:
            return None
        return _scalar(unquote_plus(found[-1].decode("latin-1"), encoding="utf-8"))
    try:
        return bitrix24_token(parse_body(content_type, raw, max_fields=BITRIX24_AUTH_FIELDS))
    except BadInput:
        return None


def bitrix24_without_auth(
    content_type: str | None, raw: bytes, body: Mapping[str, Any]
) -> tuple[str | None, bytes]:
    """(content type, raw body) of a delivery without its whole `auth` block (the application
    token, and the member id, domain and tokens some events carry): what is stored, spooled and
    forwarded. An urlencoded body keeps every other pair byte for byte; any other becomes the
    parsed body as JSON."""
    if _media(content_type) == "application/x-www-form-urlencoded":
        return content_type, b"&".join(p for p in raw.split(b"&") if not _AUTH_PAIR.match(p))
    return "application/json", orjson.dumps({k: v for k, v in body.items() if k != "auth"})


def _media(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def bitrix24_event(body: Mapping[str, Any]) -> Event:
    """The one event of a Bitrix24 delivery, without its `auth` block (credentials: not kept)."""
    name = (_scalar(body.get("event")) or "unknown").lower()
    data = body.get("data")
    fields = data.get("FIELDS") if isinstance(data, dict) else None
    entity_id = _scalar(fields.get("ID")) if isinstance(fields, dict) else None
    ts = _scalar(body.get("ts"))
    clean = {k: v for k, v in body.items() if k != "auth"}
    if entity_id is None or ts is None:
        key = f"{name}:{entity_id or '-'}:{_canonical_hash(clean)}"
    else:
        key = f"{name}:{entity_id}:{ts}"
    return Event(key, name, entity_id, {"data": clean})


# --- generic senders ----------------------------------------------------------------------------


def generic_event(
    headers: Mapping[str, str], body: Mapping[str, Any] | None, raw: bytes, key_field: str | None
) -> Event:
    """The event of an at-least-once sender; `body` is None when the body did not parse."""
    key = None
    if key_field and body is not None:
        found = _scalar(dig(body, key_field))
        key = f"field:{found}" if found else None
    for header, prefix in KEY_HEADERS:
        if key is None and (value := _scalar(headers.get(header))):
            key = f"{prefix}:{value}"
    if key is None:
        key = f"sha256:{body_hash(raw)}"
    kind = "message"
    if body is not None:
        kind = (_scalar(body.get("type")) or _scalar(body.get("event")) or "message")[:100]
    payload: dict[str, Any] = {"data": dict(body) if body is not None else None}
    if body is None:
        payload["raw_base64"] = base64.b64encode(raw).decode("ascii")
    return Event(key, kind, None, payload)


def dig(body: Mapping[str, Any], path: str) -> Any:
    """`order.id` → body["order"]["id"]; None when any step is missing."""
    value: Any = body
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and _INDEX.fullmatch(part) and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


def kept_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {h: headers[h][:500] for h in KEPT_HEADERS if h in headers}


# --- signatures ---------------------------------------------------------------------------------


def sign(secret: str | bytes, body: bytes) -> str:
    """`sha256=<hex HMAC-SHA256 of body>`: the X-Relay-Signature value."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def standard_signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 of "id.timestamp.body">`: the Standard Webhooks
    `webhook-signature` value (https://www.standardwebhooks.com/)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def verify_hmac(secret: str, raw: bytes, header: str | None) -> bool:
    """Constant-time check of `sha256=<hex>` (or a bare hex digest) against the raw body."""
    if not header:
        return False
    given = header.strip()
    given = given[7:] if given.lower().startswith("sha256=") else given
    expected = hmac.new(secret.encode(), raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), given.lower().encode("ascii", "replace"))


def same_secret(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison; an unset expected value matches nothing."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.encode("utf-8", "replace"))


def _b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_qstash(
    token: str | None,
    raw: bytes,
    keys: Sequence[str | None],
    *,
    url: Callable[[str], bool] | str | None,
    now: float,
    leeway_s: float = QSTASH_LEEWAY_S,
) -> dict[str, Any] | None:
    """The claims of a valid `Upstash-Signature` JWT, else None: HS256 with the current or the
    next signing key, `iss` = Upstash, `nbf`/`exp` (± leeway for clock skew), `body` = base64url
    SHA-256 of the raw body, and `sub` the whole URL the request came to (`url`: that URL, or a
    check of `sub`; None: not checked). Signing keys are per Upstash account: a token made for
    another endpoint of the account must not be accepted here."""
    claims = _jwt_claims(token, [k for k in keys if k])
    if claims is None or claims.get("iss") != "Upstash":
        return None
    nbf, exp = claims.get("nbf"), claims.get("exp")
    if not isinstance(nbf, int | float) or not isinstance(exp, int | float):
        return None
    if not nbf - leeway_s <= now <= exp + leeway_s:
        return None
    digest = base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).rstrip(b"=").decode()
    if not hmac.compare_digest(str(claims.get("body", "")).rstrip("="), digest):
        return None
    sub = str(claims.get("sub", ""))
    matches = url(sub) if callable(url) else url is None or sub == url
    if not matches:
        return None
    return claims


def _jwt_claims(token: str | None, keys: list[str]) -> dict[str, Any] | None:
    """The claims of an HS256 JWT signed with any of `keys`, else None (never raises)."""
    if not token or not keys or not token.isascii() or token.count(".") != 2:
        return None
    head, body, sig = token.split(".")
    try:
        given = _b64url(sig)
        header = json.loads(_b64url(head))
        claims = json.loads(_b64url(body))
    except (ValueError, TypeError):
        return None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        return None
    signed = f"{head}.{body}".encode("ascii")
    ok = [
        hmac.compare_digest(hmac.new(k.encode(), signed, hashlib.sha256).digest(), given)
        for k in keys
    ]
    return claims if any(ok) and isinstance(claims, dict) else None


def qstash_token(key: str, raw: bytes, url: str, now: float, ttl_s: float = 300.0) -> str:
    """A token as QStash makes it (tests and the benchmark sign with this)."""

    def enc(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = {
        "iss": "Upstash",
        "sub": url,
        "exp": int(now + ttl_s),
        "nbf": int(now),
        "iat": int(now),
        "jti": f"jwt_{body_hash(raw)[:16]}",
        "body": base64.urlsafe_b64encode(hashlib.sha256(raw).digest()).decode(),
    }
    signing = f"{enc(JWT_HEADER)}.{enc(orjson.dumps(claims))}"
    sig = hmac.new(key.encode(), signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{enc(sig)}"


# --- our own echoes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OurWrite:
    """One delivery of ours to that lead: when, and which status we set (None: left as is)."""

    delivered_at: dt.datetime
    status_id: str | None


def lead_change(
    source: str, kind: str, payload: Mapping[str, Any], received_at: dt.datetime
) -> LeadChange | None:
    """The lead change an event describes, or None for events about anything else."""
    data = payload.get("data")
    if not isinstance(data, dict):
        return None
    entity, _, action = kind.partition(".")
    if source == "amocrm" and entity == "leads" and action in AMO_LEAD_ACTIONS:
        lead_id = _int(data.get("id"))
        changed = _int(data.get("updated_at")) or _int(data.get("last_modified"))
        pipeline, status = _scalar(data.get("pipeline_id")), _scalar(data.get("status_id"))
    elif source == "bitrix24" and kind.startswith("oncrmdeal"):
        lead_id = _int(dig(data, "data.FIELDS.ID"))
        changed = _int(data.get("ts"))
        fetched = payload.get("entity")
        entity_data: Mapping[str, Any] = fetched if isinstance(fetched, dict) else {}
        pipeline = _scalar(entity_data.get("CATEGORY_ID"))
        status = _scalar(entity_data.get("STAGE_ID"))
        action = kind
    else:
        return None
    if lead_id is None:
        return None
    when = dt.datetime.fromtimestamp(changed, dt.UTC) if changed else received_at
    return LeadChange(source, lead_id, action, pipeline, status, when)


def _int(value: Any) -> int | None:
    text = _scalar(value)
    if text is None or not _INDEX.fullmatch(text):
        return None
    return int(text)


def is_echo(change: LeadChange, writes: Iterable[OurWrite], window_s: float) -> bool:
    """Is this change the CRM telling us about our own write?

    Only writes within `window_s` of the change count. An `add` of a lead we delivered is ours
    (a lead is added once). amoCRM: a `status` change is ours when it lands on the status we
    set; an `update` is ours when it shows the status we set (or we set none). Bitrix24 deal
    events carry no stage unless the deal was fetched: any deal event near our write is ours,
    unless the fetched stage differs from the one we set."""
    for w in writes:
        if abs((w.delivered_at - change.changed_at).total_seconds()) > window_s:
            continue
        if change.action == "add":
            return True  # a lead is added once: with our lead id on it, the add was ours
        if change.crm == "bitrix24":
            if change.status_id is None or w.status_id is None or w.status_id == change.status_id:
                return True
        elif change.action == "status":
            if w.status_id is not None and w.status_id == change.status_id:
                return True
        elif w.status_id is None or w.status_id == change.status_id:
            return True
    return False
