"""The admin API's privacy side: spam review and release, and erasing one person's data.

Routes are mounted by `admin.api.routes` under the same bearer guard (`admin.params`). A
release makes a spam row a normal submission that is delivered once; `forget` erases one
person's data here (never in the CRM) and answers how many rows it removed from each table.
"""

from __future__ import annotations

import logging
import uuid

from aiohttp import web

from service.db.privacy_store import Person, PrivacyStore, SpamQuery
from service.errors import BadInput, StoreConflict, StoreUnavailable
from service.intake.normalize import normalize_email, normalize_phone
from service.ops.admin import params
from service.ops.runtime import RUNTIME
from service.web import SETTINGS, answer

log = logging.getLogger(__name__)

SPAM_REASONS = (
    "honeypot",
    "too_fast",
    "no_render_time",
    "rate_limited",
    "captcha_missing",
    "captcha_failed",
    "captcha_unavailable",
)


def person(phone: str | None, email: str | None, region: str | None) -> Person:
    """Whom `forget` erases, normalised exactly as intake stores people; BadInput when neither
    is given or one is not a phone / an email."""
    identities = []
    if phone:
        identities.append(f"phone:{normalize_phone(phone, region)}")
    if email:
        identities.append(f"email:{normalize_email(email)}")
    if not identities:
        raise BadInput([])
    return Person(sorted(identities))


def _store(request: web.Request) -> PrivacyStore:
    rt = request.app[RUNTIME]
    if rt.store is None:
        raise StoreUnavailable("database not running")
    return PrivacyStore(rt.store.pool)


async def list_spam(request: web.Request) -> web.Response:
    q = request.query
    released = params.choice_param(q, "released", ("true", "false"))
    query = SpamQuery(
        form=params.text_param(q, "form"),
        reason=params.choice_param(q, "reason", SPAM_REASONS),
        since=params.time_param(q, "since"),
        until=params.time_param(q, "until"),
        released=None if released is None else released == "true",
        limit=params.limit_param(request),
    )
    return answer({"ok": True, "spam": await _store(request).spam(query)})


async def release(request: web.Request) -> web.Response:
    raw = request.match_info["spam_id"]
    try:
        spam_id = uuid.UUID(raw)
    except ValueError:
        raise params.BadQuery("spam_id", "a spam id (UUID)") from None
    done = await _store(request).release(spam_id)
    if done is None:
        return answer({"ok": False, "error": f"no spam {raw}"}, status=404)
    log.info(
        "spam released",
        extra={"action": "admin_release_spam", "spam_id": raw, "already": done.already},
    )
    return answer(
        {
            "ok": True,
            "submission_id": str(done.submission_id),
            "duplicate": done.duplicate,
            "already_released": done.already,
        }
    )


async def forget(request: web.Request) -> web.Response:
    body = await params.json_body(request)
    region = request.app[SETTINGS].intake.default_phone_region
    try:
        who = person(params.text_param(body, "phone"), params.text_param(body, "email"), region)
    except BadInput as exc:
        if not exc.errors:
            raise params.BadQuery("body", 'give {"phone": …} or {"email": …} or both') from None
        raise params.BadQuery(exc.errors[0].field, exc.errors[0].message) from None
    try:
        removed = await _store(request).forget(who)
    except StoreConflict as exc:  # deadlocked with that person's ingest three times: not now
        raise StoreUnavailable(str(exc)) from exc
    # what was asked is itself personal data: the log says only how much was removed
    log.warning(
        "personal data erased", extra={"action": "admin_forget", "rows": sum(removed.values())}
    )
    return answer({"ok": True, "removed": removed})


def routes(api: str) -> list[web.RouteDef]:
    return [
        web.get(f"{api}/spam", params.guarded(list_spam)),
        web.post(f"{api}/spam/{{spam_id}}/release", params.guarded(release)),
        web.post(f"{api}/forget", params.guarded(forget)),
    ]
