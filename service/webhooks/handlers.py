"""CRM and generic webhooks in: verify, store first, answer after.

`POST /webhooks/amocrm/{secret}`, `POST /webhooks/bitrix24`, `POST /webhooks/generic/{source}`.
A request passes the same path as a form submission: the in-memory idempotency window → per-key
locks → group commit (service.intake.group_commit: the delivery, its events and their process
jobs in one transaction, unique (source, event key)) → 200; when the database is unreachable or
slower than `db_write_timeout_s` (at most `WEBHOOK_WRITE_TIMEOUT_S`) the delivery goes to the
fsync'd spool (entry type "event") and the sender still gets 200.

What is answered what:
- amoCRM: a wrong secret → 404; anything else within the size limit → 200 (a non-2xx makes amoCRM
  retry and, after 100 in two hours, disable the hook); a body we cannot read is kept raw in
  `rejected`.
- Bitrix24: `auth[application_token]` ≠ `BITRIX24_APP_TOKEN` (or unreadable) → 401, nothing stored
  (checked before the body is parsed); the whole `auth` block is removed before anything is
  stored, spooled or forwarded.
- generic: a failed signature check → 401, nothing stored; any body is an event (unparsed bodies
  are forwarded base64-encoded).
"""

from __future__ import annotations

import datetime as dt
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from service.db.event_store import EventStore, PendingDelivery, Stored
from service.errors import BadInput, StoreRefused, StoreUnavailable
from service.ids import new_id
from service.intake.bodies import parse_body
from service.intake.group_commit import GroupCommit
from service.intake.keys import IdempotencyWindow, event_key
from service.intake.locks import KeyLocks
from service.intake.spool import Spool
from service.model import Event
from service.settings import GenericSource, WebhookSettings
from service.web import SETTINGS, UnreadableBody, answer, read_limited, reply, too_large
from service.webhooks.events import (
    MAX_KEY,
    QSTASH_LEEWAY_S,
    amocrm_events,
    bitrix24_event,
    bitrix24_raw_token,
    bitrix24_without_auth,
    generic_event,
    kept_headers,
    same_secret,
    verify_hmac,
    verify_qstash,
)

WEBHOOK_MAX_FIELDS = 100_000  # amoCRM sends up to hundreds of leads, dozens of fields each
SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HMAC_HEADERS = ("X-Relay-Signature", "X-Hub-Signature-256")
# amoCRM waits at most 2 s for an answer and we promise p99 < 1 s: a database slower than this
# sends the delivery to the spool instead (stored once either way: the keys dedupe the copies)
WEBHOOK_WRITE_TIMEOUT_S = 0.5
# deliveries per transaction: each carries its raw body (up to webhook_max_body_bytes) and
# possibly hundreds of events, so fewer to a transaction than form submissions
MAX_BATCH = 200
# QStash tokens remembered against replay (each a few hundred bytes): a few minutes of traffic
MAX_SEEN_TOKENS = 10_000


@dataclass(frozen=True)
class Receipt:
    """What became of one delivery: one entry per event (the original's id for a repeat)."""

    stored: list[Stored]
    spooled: bool = False

    @property
    def duplicate(self) -> bool:
        return bool(self.stored) and all(s.duplicate for s in self.stored)

    def to_json(self) -> dict[str, Any]:
        ids = [str(s.event_id) for s in self.stored if s.event_id is not None]
        if not ids and any(s.event_key is None for s in self.stored):
            # the database would not take it as events (say, a NUL in a string): kept raw
            message = "kept for inspection: cannot be stored as events"
            return {"ok": False, "kept": True, "errors": [{"field": "body", "message": message}]}
        body: dict[str, Any] = {
            "ok": True,
            "id": ids[0] if ids else None,
            "duplicate": self.duplicate,
            "events": len(ids),
        }
        if self.spooled:
            body["spooled"] = True
        return body


def _spool_entry(delivery: PendingDelivery) -> dict[str, Any]:
    return {"type": "event", **delivery.to_json()}


def _keep_raw(delivery: PendingDelivery, exc: StoreRefused) -> PendingDelivery:
    """A delivery whose events the database will not store (say, a NUL in a JSON string) is kept
    raw in `rejected` instead; one it will not even keep raw is spooled, as in an outage."""
    if delivery.rejected is not None:
        raise StoreUnavailable(f"cannot keep a rejected body: {exc}") from exc
    return delivery.as_rejected(f"cannot be stored as events: {exc.kind}")


class SeenTokens:
    """QStash token ids (`jti`) that came with a valid signature, each with the event key it
    first came with, kept until the token expires (plus the clock leeway). Bounded: at most
    `max_entries`, the oldest dropped first (only validly signed tokens get in)."""

    def __init__(self, max_entries: int = MAX_SEEN_TOKENS) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[str, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def first_key(self, jti: str, exp: float, key: str, now: float) -> str:
        """The key `jti` first came with (remembering `key` if it is new)."""
        while self._seen:
            oldest = next(iter(self._seen.values()))
            if oldest[0] + QSTASH_LEEWAY_S >= now:
                break
            self._seen.popitem(last=False)
        jti = jti[:MAX_KEY]
        found = self._seen.get(jti)
        if found is not None:
            return found[1]
        self._seen[jti] = (exp, key)
        if len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return key


class EventIntake:
    """Window → locks → group commit → spool fallback, for webhook deliveries.

    `window` and `locks` are the process's own, shared with form intake (service.app); events
    are keyed by `event_key`, which no form's key can equal (service.intake.keys)."""

    def __init__(
        self,
        store: EventStore,
        spool: Spool,
        *,
        write_timeout_s: float,
        window: IdempotencyWindow,
        locks: KeyLocks,
    ) -> None:
        self.store = store
        self.spool = spool
        self.window = window
        self.locks = locks
        self.commit: GroupCommit[PendingDelivery, list[Stored]] = GroupCommit(
            store.ingest,
            spool=spool,
            spool_entry=_spool_entry,
            unstorable=_keep_raw,
            timeout_s=min(write_timeout_s, WEBHOOK_WRITE_TIMEOUT_S),
            max_batch=MAX_BATCH,
            kind="event",
        )
        self.seen_tokens = SeenTokens()
        self.counts: dict[str, int] = {
            "events": 0,
            "duplicate": 0,
            "spooled": 0,
            "rejected": 0,
            "unauthorized": 0,
        }

    async def accept(self, delivery: PendingDelivery) -> Receipt:
        """Store the delivery's new events (repeats get their original ids) and say so."""
        keys = [event_key(delivery.source, e.key) for _, e in delivery.events]
        if keys and all(self.window.get(k) is not None for k in keys):
            return self._count(Receipt(self._from_window(delivery, keys)))
        async with self.locks.hold(keys):
            known = {
                k: Stored(e.key, sid, True)
                for (_, e), k in zip(delivery.events, keys, strict=True)
                if (sid := self.window.get(k)) is not None
            }
            fresh = tuple(ev for ev, k in zip(delivery.events, keys, strict=True) if k not in known)
            if keys and not fresh:
                return self._count(Receipt(self._from_window(delivery, keys)))
            receipt = await self._store(replace(delivery, events=fresh))
            for s in receipt.stored:
                if s.event_key is not None and s.event_id is not None:
                    self.window.put(event_key(delivery.source, s.event_key), s.event_id)
            return self._count(replace(receipt, stored=[*known.values(), *receipt.stored]))

    def _from_window(self, delivery: PendingDelivery, keys: list[str]) -> list[Stored]:
        pairs = zip(delivery.events, keys, strict=True)
        return [Stored(e.key, self.window.get(k), True) for (_, e), k in pairs]

    async def _store(self, delivery: PendingDelivery) -> Receipt:
        stored = await self.commit.write(delivery)
        if stored is not None:
            return Receipt(stored)
        spooled = [Stored(e.key, eid, False) for eid, e in delivery.events]
        return Receipt(spooled or [Stored(None, None, False)], spooled=True)

    def _count(self, receipt: Receipt) -> Receipt:
        for s in receipt.stored:
            kind = "rejected" if s.event_key is None else "duplicate" if s.duplicate else "events"
            self.counts[kind] += 1
        self.counts["spooled"] += receipt.spooled
        return receipt

    async def drain_spooled(self, entries: list[dict[str, Any]]) -> None:
        """Spool handler: store spooled deliveries (repeats are dropped by their keys); an entry
        is one delivery, or a list of them (`deliveries`, as earlier versions wrote)."""
        items = [PendingDelivery.from_json(d) for e in entries for d in e.get("deliveries", [e])]
        await self.commit.store_all(items)


EVENTS = web.AppKey("events", EventIntake)


def _delivery(
    request: web.Request,
    source: str,
    raw: bytes,
    events: list[Event],
    rejected: list[dict[str, str]] | None = None,
) -> PendingDelivery:
    return PendingDelivery(
        id=new_id(),
        source=source,
        content_type=request.headers.get("Content-Type"),
        raw=raw,
        received_at=dt.datetime.now(dt.UTC),
        events=tuple((new_id(), e) for e in events),
        headers=kept_headers(request.headers),
        rejected=rejected,
    )


def _refused(status: int, message: str) -> web.Response:
    return answer({"ok": False, "errors": [{"field": "auth", "message": message}]}, status)


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """Like `read_limited`, but an undecodable body reads as empty: a CRM must still get its
    200 (amoCRM) or a clear 401 (no token to check), never a 500."""
    try:
        return await read_limited(request, limit)
    except UnreadableBody:
        return b""


async def amocrm_hook(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS].webhook
    intake = request.app[EVENTS]
    if not same_secret(settings.hook_path, request.match_info["secret"]):
        raise web.HTTPNotFound()
    raw = await read_body(request, settings.max_body_bytes)
    if raw is None:
        return too_large(settings.max_body_bytes)
    try:
        body = parse_body(request.headers.get("Content-Type"), raw, max_fields=WEBHOOK_MAX_FIELDS)
    except BadInput as exc:
        errors = [e.__dict__ for e in exc.errors]
        await intake.accept(_delivery(request, "amocrm", raw, [], errors))
        # still 200: amoCRM disables a hook that keeps answering otherwise; the body is kept
        return reply(request, {"ok": False, "errors": errors, "kept": True})
    receipt = await intake.accept(_delivery(request, "amocrm", raw, amocrm_events(body)))
    return reply(request, receipt.to_json())


async def bitrix24_hook(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS].webhook
    intake = request.app[EVENTS]
    raw = await read_body(request, settings.max_body_bytes)
    if raw is None:
        return too_large(settings.max_body_bytes)
    content_type = request.headers.get("Content-Type")
    # the token before the parse: a stranger's 100,000 fields are refused unparsed
    if not same_secret(settings.bitrix24_app_token, bitrix24_raw_token(content_type, raw)):
        intake.counts["unauthorized"] += 1
        return _refused(401, "auth[application_token] does not match BITRIX24_APP_TOKEN")
    try:
        body = parse_body(content_type, raw, max_fields=WEBHOOK_MAX_FIELDS)
    except BadInput:
        body = {}
    content_type, raw = bitrix24_without_auth(content_type, raw, body)
    delivery = _delivery(request, "bitrix24", raw, [bitrix24_event(body)])
    receipt = await intake.accept(replace(delivery, content_type=content_type))
    return reply(request, receipt.to_json())


async def generic_hook(request: web.Request) -> web.Response:
    settings = request.app[SETTINGS].webhook
    intake = request.app[EVENTS]
    name = request.match_info["source"]
    if not SOURCE_NAME.fullmatch(name):
        raise web.HTTPNotFound()
    raw = await read_body(request, settings.max_body_bytes)
    if raw is None:
        return too_large(settings.max_body_bytes)
    rule = settings.generic_sources.get(name, GenericSource())
    verdict = verified(settings, rule, request, raw)
    if not verdict.ok:
        intake.counts["unauthorized"] += 1
        return _refused(401, "signature missing or invalid")
    try:
        body: dict[str, Any] | None = parse_body(request.headers.get("Content-Type"), raw)
    except BadInput:
        body = None  # an opaque payload is still a message: it is forwarded as it came
    event = generic_event(request.headers, body, raw, rule.key_field)
    event = _replay_keyed(intake, event, verdict)
    receipt = await intake.accept(_delivery(request, f"generic/{name}", raw, [event]))
    return reply(request, receipt.to_json())


@dataclass(frozen=True)
class Verdict:
    """Whether a generic sender passed its check, and the QStash token's claims if one did."""

    ok: bool
    qstash: dict[str, Any] | None = None


def verified(
    settings: WebhookSettings, rule: GenericSource, request: web.Request, raw: bytes
) -> Verdict:
    """Check the sender as `rule.verify` says: "any" (the default, also for a source name the
    config does not list) takes a valid QStash JWT or HMAC and fails closed while neither key is
    configured; only a source configured with `verify = "none"` is let in unsigned."""
    if rule.verify == "none":
        return Verdict(True)
    if rule.verify in ("any", "qstash"):
        keys = (settings.qstash_current_signing_key, settings.qstash_next_signing_key)
        token = request.headers.get("Upstash-Signature")
        url = _our_url(request, settings.public_base_url)
        claims = verify_qstash(token, raw, keys, url=url, now=time.time())
        if claims is not None:
            return Verdict(True, claims)
    if rule.verify in ("any", "hmac"):
        header = next((v for h in HMAC_HEADERS if (v := request.headers.get(h))), None)
        key = settings.inbound_hmac
        return Verdict(key is not None and verify_hmac(key, raw, header))
    return Verdict(False)


def _our_url(request: web.Request, public_base: str | None) -> Callable[[str], bool]:
    """Whether a QStash token's `sub` is the whole URL this request came to: PUBLIC_BASE_URL and
    the path (and query) as sent; without PUBLIC_BASE_URL the request's Host instead of it, the
    scheme left out (TLS usually ends at a proxy in front)."""

    def matches(sub: str) -> bool:
        if public_base:
            return sub == public_base.rstrip("/") + request.raw_path
        parts = urlsplit(sub)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return parts.netloc.lower() == request.host.lower() and path == request.raw_path

    return matches


def _replay_keyed(intake: EventIntake, event: Event, verdict: Verdict) -> Event:
    """A QStash token seen before is a replay (its unsigned headers perhaps changed to look like
    another message): keyed as the message it first came with, it stores nothing new."""
    claims = verdict.qstash
    jti = claims.get("jti") if claims else None
    if claims is None or not isinstance(jti, str) or not jti:
        return event
    key = intake.seen_tokens.first_key(jti, float(claims["exp"]), event.key, time.time())
    return event if key == event.key else replace(event, key=key)


def routes() -> list[web.RouteDef]:
    return [
        web.post("/webhooks/amocrm/{secret}", amocrm_hook),
        web.post("/webhooks/bitrix24", bitrix24_hook),
        web.post("/webhooks/generic/{source}", generic_hook),
    ]
