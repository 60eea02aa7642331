"""Spam controls for form intake: honeypot, minimum fill time, CAPTCHA, per-client rate.

Each form says which it wants (`SpamRule`, `[forms.<name>]` in the TOML). A submission caught by
one is stored as spam with the reason (the `spam` table), answered with the same 200 a real one
gets — a bot learns nothing from the answer — and never delivered unless an operator releases
it (admin API). The control fields (honeypot, render and submit times, CAPTCHA token) are taken
out of the body before it is normalised: they are not the person's data and never reach the CRM.

The checks run cheapest first; the CAPTCHA vendor is asked only when the others pass. A vendor
that cannot be asked (down, slow, answering nonsense) is the vendor's failure, not the sender's:
the form's `captcha_outage` says whether such a submission is accepted (the default: every lead
is paid for, and the other controls still apply) or kept as spam for review.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, NamedTuple

import aiohttp

from service.settings import SpamRule, SpamSettings

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 4096  # Turnstile's are at most 2,048; anything longer is not a token
MAX_FORWARDED_HOPS = 32
# the widgets' own field names, and what each vendor calls the token and the address
VENDOR_FIELDS = {
    "turnstile": ("cf-turnstile-response", "response", "remoteip"),
    "recaptcha": ("g-recaptcha-response", "response", "remoteip"),
    "smartcaptcha": ("smart-token", "token", "ip"),
}
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Controls(NamedTuple):
    """What a body carried for the spam checks, taken out of it."""

    honeypot: Any = None
    rendered_at: Any = None
    submitted_at: Any = None
    captcha_token: Any = None


def take_controls(rule: SpamRule, data: dict[str, Any]) -> tuple[dict[str, Any], Controls]:
    """The body without its control fields, and the control fields' values."""
    if not rule.active:
        return data, Controls()
    names = {
        "honeypot": rule.honeypot,
        "rendered_at": rule.rendered_at_field if rule.min_fill_s > 0 else None,
        "submitted_at": rule.submitted_at_field if rule.min_fill_s > 0 else None,
        "captcha_token": captcha_field(rule),
    }
    taken = {k: data.get(v) for k, v in names.items() if v is not None}
    used = {v for v in names.values() if v is not None}
    return {k: v for k, v in data.items() if k not in used}, Controls(**taken)


# every reason a submission is kept as spam for (the `spam` table's `reason`, the metric's label)
REASONS = (
    "honeypot",
    "no_render_time",
    "too_fast",
    "rate_limited",
    "captcha_missing",
    "captcha_failed",
    "captcha_unavailable",
)


def captcha_field(rule: SpamRule) -> str | None:
    if rule.captcha is None:
        return None
    return rule.captcha_field or VENDOR_FIELDS[rule.captcha][0]


def fill_reason(rule: SpamRule, controls: Controls, now_ms: float) -> str | None:
    """`too_fast` / `no_render_time` when the form asks for a minimum fill time, else None.

    The page sends its render time (`Date.now()`, Unix ms; seconds are accepted too) and,
    better, its submit time on the same clock: then the page's clock being off does not matter.
    Without a submit time our clock is used, so a render time in the future by a page whose
    clock runs fast counts as no time taken — the lead is kept as spam, reviewable."""
    if rule.min_fill_s <= 0:
        return None
    rendered = _epoch_ms(controls.rendered_at)
    if rendered is None:
        return "no_render_time"
    submitted = _epoch_ms(controls.submitted_at)
    elapsed_ms = (submitted if submitted is not None else now_ms) - rendered
    return "too_fast" if elapsed_ms < rule.min_fill_s * 1000 else None


def _epoch_ms(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    if not number == number or number <= 0 or number > 1e14:  # NaN, negative, absurd
        return None
    return number * 1000 if number < 1e11 else number  # seconds until the year 5138


class ClientLimit:
    """Submissions per client address per minute, by form: a token bucket per (form, address).

    Memory is bounded: at most `max_clients` buckets (least recently used go first), each a key
    of two short strings (a form name is at most 64 characters, checked by normalisation before
    this) and two floats — under 512 bytes apiece. A flood from more addresses than that evicts
    old buckets, which then start full again: the limit is a brake on one sender, not a wall."""

    def __init__(self, max_clients: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def allow(self, form: str, client: str, per_minute: int) -> bool:
        """Take one submission from the bucket; False when it is empty."""
        if per_minute <= 0:
            return True
        key = (form[:64], client[:64])
        now = self._clock()
        tokens, at = self._buckets.pop(key, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - at) * per_minute / 60.0)
        allowed = tokens >= 1.0
        self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return allowed

    def __len__(self) -> int:
        return len(self._buckets)


def client_address(
    peer: str | None, forwarded_for: str | None, trusted: tuple[Network, ...]
) -> str:
    """The sender's address: the peer's, unless the peer is one of our proxies (`trusted`);
    then `X-Forwarded-For` is read from the right, past our own proxies, to the first address
    that is not one: everything left of it was written by the client and proves nothing."""
    address = _address(peer)
    if address is None:
        return (peer or "unknown")[:64]
    if not forwarded_for or not _trusted(address, trusted):
        return str(address)
    hops = forwarded_for.split(",")[-MAX_FORWARDED_HOPS:]
    for hop in reversed(hops):
        found = _address(hop.strip())
        if found is None:
            break  # garbage from the hop we last believed: the last one believed is the client
        address = found
        if not _trusted(found, trusted):
            break
    return str(address)


def _address(text: str | None) -> Address | None:
    if not text:
        return None
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _trusted(address: Address, trusted: tuple[Network, ...]) -> bool:
    return any(address in net for net in trusted)


def networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


class Captcha:
    """Server-side CAPTCHA token checks against the vendor's documented endpoint.

    `verify` answers "ok", "failed" or "unavailable" (no usable answer: connection error,
    timeout, non-200, not the JSON the vendor documents). The secret goes in the POST body
    only; it is never logged."""

    def __init__(self, session: aiohttp.ClientSession, settings: SpamSettings) -> None:
        self.session = session
        self.settings = settings
        self.urls = {
            "turnstile": settings.turnstile_verify_url,
            "recaptcha": settings.recaptcha_verify_url,
            "smartcaptcha": settings.smartcaptcha_verify_url,
        }

    async def verify(self, rule: SpamRule, token: str, client: str) -> str:
        assert rule.captcha is not None and rule.captcha_secret is not None
        _, token_name, ip_name = VENDOR_FIELDS[rule.captcha]
        form = {"secret": rule.captcha_secret, token_name: token, ip_name: client}
        timeout = aiohttp.ClientTimeout(total=self.settings.captcha_timeout_s)
        try:
            async with self.session.post(
                self.urls[rule.captcha], data=form, timeout=timeout, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    return self._unavailable(rule, f"HTTP {resp.status}")
                answer = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return self._unavailable(rule, type(exc).__name__)
        if not isinstance(answer, dict):
            return self._unavailable(rule, "not a JSON object")
        return "ok" if _passed(rule, answer) else "failed"

    @staticmethod
    def _unavailable(rule: SpamRule, why: str) -> str:
        log.warning(
            "CAPTCHA vendor unavailable",
            extra={"action": "captcha_unavailable", "vendor": rule.captcha, "error": why},
        )
        return "unavailable"


def _passed(rule: SpamRule, answer: dict[str, Any]) -> bool:
    if rule.captcha == "smartcaptcha":
        return answer.get("status") == "ok"
    if answer.get("success") is not True:
        return False
    score = answer.get("score")  # reCAPTCHA v3 only
    return not isinstance(score, int | float) or score >= rule.captcha_min_score


class SpamGuard:
    """The checks of one process: its client limit and its CAPTCHA client."""

    def __init__(
        self, settings: SpamSettings | None = None, captcha: Captcha | None = None
    ) -> None:
        settings = settings or SpamSettings()
        self.limit = ClientLimit(settings.client_rate_max_clients)
        self.trusted = networks(settings.trusted_proxies)
        self.captcha = captcha
        self.counts: dict[str, int] = {}

    def stats(self) -> dict[str, Any]:
        """For /health: spam by reason, CAPTCHA outages, client addresses remembered."""
        return {"caught": dict(self.counts), "clients": len(self.limit)}

    def client(self, peer: str | None, forwarded_for: str | None) -> str:
        return client_address(peer, forwarded_for, self.trusted)

    async def reason(
        self, form: str, rule: SpamRule, controls: Controls, client: str
    ) -> str | None:
        """Why this submission is spam, or None when it is not (cheapest check first)."""
        reason = self._cheap(form, rule, controls, client)
        if reason is None and rule.captcha is not None:
            reason = await self._captcha(rule, controls.captcha_token, client)
        if reason is not None:
            self.counts[reason] = self.counts.get(reason, 0) + 1
        return reason

    def _cheap(self, form: str, rule: SpamRule, controls: Controls, client: str) -> str | None:
        if rule.honeypot and controls.honeypot not in (None, "", [], {}):
            return "honeypot"
        if (reason := fill_reason(rule, controls, time.time() * 1000)) is not None:
            return reason
        if not self.limit.allow(form, client, rule.client_rate):
            return "rate_limited"
        return None

    async def _captcha(self, rule: SpamRule, token: Any, client: str) -> str | None:
        if not isinstance(token, str) or not token.strip():
            return "captcha_missing"
        if len(token) > MAX_TOKEN_CHARS or self.captcha is None:
            return "captcha_failed"
        verdict = await self.captcha.verify(rule, token.strip(), client)
        if verdict == "ok":
            return None
        if verdict == "failed":
            return "captcha_failed"
        self.counts["captcha_outages"] = self.counts.get("captcha_outages", 0) + 1
        return "captcha_unavailable" if rule.captcha_outage == "spam" else None
