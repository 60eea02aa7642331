"""The settings of each concern, one frozen dataclass apiece; `Settings` is made of them.

Each part of the service is handed the slice it uses (the worker `DeliverySettings`, the amoCRM
adapter `AmoCrmSettings`, …), so a reader sees at its constructor what it depends on. A slice is
named after the prefix of its variables where there is one (`WEBHOOK_SECRET` →
`settings.webhook.secret`, `ALERT_LAG_S` → `settings.alert.lag_s`); the defaults are the ones
`Settings.from_env` applies when a variable is unset.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

BITRIX24_OAUTH_URL = "https://oauth.bitrix.info/oauth/token/"
TELEGRAM_API_URL = "https://api.telegram.org"


@dataclass(frozen=True)
class FormRule:
    """How submissions of one form become a lead: pipeline, status, tags, custom fields."""

    pipeline_id: int | None = None
    status_id: int | None = None
    tags: tuple[str, ...] = ()
    # our field name (e.g. "utm_source", "fields.course") -> CRM custom field id
    field_map: Mapping[str, int] = field(default_factory=dict)
    lead_name: str = "{form}: {name}"


@dataclass(frozen=True)
class ForwardRule:
    """One more destination for the events of one source (`[forward.<source>]` in the TOML)."""

    url: str
    rate: float | None = None  # requests/second; None: WEBHOOK_FORWARD_RATE


@dataclass(frozen=True)
class GenericSource:
    """How `POST /webhooks/generic/<name>` is keyed and verified (`[generic.<name>]`)."""

    key_field: str | None = None  # e.g. "order.id": the event key, before any header
    # any: a valid QStash JWT or HMAC when a key is configured; hmac/qstash: that one; none: off
    verify: str = "any"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for passing CRM failures."""

    base_s: float = 2.0
    factor: float = 2.0
    max_s: float = 900.0
    max_attempts: int = 12
    jitter: float = 0.2  # +/- this fraction

    def delay(self, attempt: int, rnd: float) -> float:
        """Delay before attempt number `attempt + 1`; `rnd` is uniform in [0, 1)."""
        raw = min(self.max_s, self.base_s * self.factor ** max(attempt - 1, 0))
        return max(0.0, raw * (1 + self.jitter * (2 * rnd - 1)))


@dataclass(frozen=True)
class HttpSettings:
    """Where the HTTP server listens (`HOST`, `PORT`)."""

    host: str = "0.0.0.0"
    port: int = 8080


@dataclass(frozen=True)
class LogSettings:
    """`LOG_LEVEL` and `LOG_FORMAT` (json or text)."""

    level: str = "INFO"
    format: str = "text"


@dataclass(frozen=True)
class DatabaseSettings:
    """`DATABASE_URL`; without one an embedded server runs under the data directory."""

    url: str | None = None


@dataclass(frozen=True)
class ClusterSettings:
    """`REDIS_URL`: the shared rate bucket and idempotency keys; without it, PostgreSQL alone."""

    redis_url: str | None = None


@dataclass(frozen=True)
class IntakeSettings:
    """What form intake accepts and how it stores: body limit, phone region, idempotency."""

    max_body_bytes: int = 64 * 1024
    default_phone_region: str | None = None
    idempotency_window_s: float = 300.0
    idempotency_window_size: int = 100_000
    # a group commit slower than this spools its submissions and answers from the spool
    db_write_timeout_s: float = 2.0


@dataclass(frozen=True)
class LeadSettings:
    """Per-form lead rules (the TOML `[forms.<name>]`) and the default pipeline and status."""

    forms: Mapping[str, FormRule] = field(default_factory=dict)
    default_pipeline_id: int | None = None
    default_status_id: int | None = None

    def form_rule(self, form: str) -> FormRule:
        """The rule for `form`, falling back to the `*` rule and then to the defaults."""
        rule = self.forms.get(form) or self.forms.get("*") or FormRule()
        return replace(
            rule,
            pipeline_id=rule.pipeline_id or self.default_pipeline_id,
            status_id=rule.status_id or self.default_status_id,
        )


@dataclass(frozen=True)
class AmoCrmSettings:
    """The amoCRM account (`AMOCRM_*`): a long-lived token, or the OAuth set."""

    base_url: str | None = None
    access_token: str | None = None
    client_id: str | None = None
    client_secret: str | None = None
    refresh_token: str | None = None
    redirect_uri: str | None = None
    # how the adapter finds out whether a new person is already a contact: "index" (a local
    # index of the CRM's contacts, synced incrementally), "search" (one CRM search per
    # phone/email) or "trust" (no lookup: the account's own duplicate control merges contacts;
    # a crash between create and commit can then leave a second lead for the person)
    dedup: str = "index"


@dataclass(frozen=True)
class Bitrix24Settings:
    """The Bitrix24 portal (`BITRIX24_*`): an incoming webhook, or OAuth app tokens."""

    webhook_url: str | None = None
    # OAuth app tokens instead of a webhook: all four, or none
    client_id: str | None = None
    client_secret: str | None = None
    refresh_token: str | None = None
    portal_url: str | None = None  # the portal's https://<portal>/rest/
    oauth_url: str = BITRIX24_OAUTH_URL


@dataclass(frozen=True)
class CrmSettings:
    """Which CRM (`CRM`), how fast and how patiently we call it, and its account."""

    kind: str = "simulator"  # amocrm | bitrix24 | simulator
    rate_limit: float = 6.0  # requests/second, shared by every process
    timeout_s: float = 30.0
    amocrm: AmoCrmSettings = field(default_factory=AmoCrmSettings)
    bitrix24: Bitrix24Settings = field(default_factory=Bitrix24Settings)


@dataclass(frozen=True)
class DeliverySettings:
    """The delivery loops (worker and forwarder): batches, leases, and what a failure costs."""

    worker_batch: int = 50  # webhook events claimed at once
    worker_concurrency: int = 100  # webhook events in flight
    # people one delivery round packs at most (rounds go one at a time, each claimed when the
    # rate gate has a turn free: see delivery.worker)
    worker_round: int = 500
    lease_s: float = 30.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    circuit_cooldown_s: float = 60.0
    # a 429 without Retry-After pauses every sender: base, doubling per 429 in a row, up to max
    pause_base_s: float = 1.0
    pause_max_s: float = 60.0


@dataclass(frozen=True)
class WebhookSettings:
    """Incoming CRM and generic webhooks (who may send them, how big) and forwarding them."""

    secret: str | None = None  # WEBHOOK_SECRET: in the amoCRM hook's path, HMAC key, signature
    bitrix24_app_token: str | None = None  # what Bitrix24's outbound events must carry
    qstash_current_signing_key: str | None = None
    qstash_next_signing_key: str | None = None
    # CRMs batch many events into one body: a limit of its own, so a big batch is not refused
    max_body_bytes: int = 1024 * 1024
    generic_sources: Mapping[str, GenericSource] = field(default_factory=dict)
    forward_url: str | None = None  # WEBHOOK_FORWARD_URL: every source's events go there
    forward_rate: float = 10.0
    forward_timeout_s: float = 10.0
    # source ("amocrm", "bitrix24", "generic/<name>") -> its extra destinations
    forward_rules: Mapping[str, tuple[ForwardRule, ...]] = field(default_factory=dict)
    echo_window_s: float = 60.0


@dataclass(frozen=True)
class AlertSettings:
    """Where alerts go (Telegram, a webhook) and when a condition is one."""

    telegram_bot_token: str | None = None
    telegram_chat_id: str | None = None
    telegram_api_url: str = TELEGRAM_API_URL
    webhook_url: str | None = None  # ALERT_WEBHOOK_URL
    check_s: float = 15.0  # how often alert conditions are evaluated
    interval_s: float = 900.0  # at most one message per condition per this many seconds
    lag_s: float = 600.0  # the oldest due job waiting longer than this is an alert


@dataclass(frozen=True)
class AdminSettings:
    """`ADMIN_TOKEN`: the admin API and dashboard exist only with one."""

    token: str | None = None
