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
# the CAPTCHA vendors' documented server-side verification endpoints
TURNSTILE_VERIFY_URL = "https://challenges.cloudflare.com/turnstile/v0/siteverify"
RECAPTCHA_VERIFY_URL = "https://www.google.com/recaptcha/api/siteverify"
SMARTCAPTCHA_VERIFY_URL = "https://smartcaptcha.yandexcloud.net/validate"
CAPTCHA_VENDORS = ("turnstile", "recaptcha", "smartcaptcha")


@dataclass(frozen=True)
class SpamRule:
    """A form's spam controls (keys of `[forms.<name>]` in the TOML); every one off by default.

    A submission caught by one is stored as spam (the `spam` table), answered like a real one,
    and never delivered unless an operator releases it."""

    honeypot: str | None = None  # a field people never see: filled means a bot filled it
    min_fill_s: float = 0.0  # faster than this from the page's render to its submit: a bot
    rendered_at_field: str = "_rendered_at"  # the page's render time (Unix ms), sent with the form
    submitted_at_field: str = "_submitted_at"  # optional: its submit time, on the same clock
    captcha: str | None = None  # turnstile | recaptcha | smartcaptcha
    captcha_field: str | None = None  # None: the vendor widget's own field name
    captcha_secret: str | None = None  # None: the vendor's *_SECRET variable
    captcha_min_score: float = 0.0  # reCAPTCHA v3: a lower score is spam
    captcha_outage: str = "accept"  # the vendor cannot be asked: "accept" | "spam"
    client_rate: int = 0  # submissions per client address per minute for this form; 0: no limit

    @property
    def active(self) -> bool:
        return bool(self.honeypot or self.min_fill_s > 0 or self.captcha or self.client_rate)


NO_SPAM_RULE = SpamRule()


@dataclass(frozen=True)
class FormRule:
    """How submissions of one form become a lead: where it goes, tags, custom fields.

    Where: amoCRM's `pipeline_id`/`status_id` (integers), or Bitrix24's deal `category_id`
    (CATEGORY_ID, an integer; 0 is the default category) and `stage_id` (STAGE_ID, a string
    such as "NEW", "C1:PREPARATION" or "C1:UC_…"). Start-up checks them against the CRM.
    """

    pipeline_id: int | None = None
    status_id: int | None = None
    category_id: int | None = None
    stage_id: str | None = None
    tags: tuple[str, ...] = ()
    # our field name (e.g. "utm_source", "fields.course") -> CRM custom field id
    field_map: Mapping[str, int] = field(default_factory=dict)
    lead_name: str = "{form}: {name}"
    spam: SpamRule = field(default_factory=SpamRule)


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
    """Where the HTTP server listens (`HOST`, `PORT`), and the internal port (`OPS_PORT`) that
    then alone serves /health, /metrics and /admin."""

    host: str = "0.0.0.0"
    port: int = 8080
    ops_port: int | None = None


@dataclass(frozen=True)
class LogSettings:
    """`LOG_LEVEL` and `LOG_FORMAT` (json or text)."""

    level: str = "INFO"
    format: str = "text"


@dataclass(frozen=True)
class DatabaseSettings:
    """`DATABASE_URL`; without one an embedded server runs under the data directory.
    `DATABASE_DIRECT_URL`: a connection that keeps its session, for what needs one (LISTEN,
    session advisory locks, migrations) when `DATABASE_URL` leads to a transaction-mode pooler;
    unset, `DATABASE_URL` serves both (`service.db.database.Endpoints`)."""

    url: str | None = None
    direct_url: str | None = None


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
    # the window's whole cost, keys included (a long key is kept hashed): ~100,000 usual keys
    idempotency_window_bytes: int = 32 * 1024 * 1024
    # a group commit slower than this spools its submissions and answers from the spool
    db_write_timeout_s: float = 2.0


@dataclass(frozen=True)
class StorageSettings:
    """How much of what senders send is kept on this host, and when to stop keeping bad input:
    the `rejected` table's cap, the spool's cap, the free space the data volume must keep, and how
    long a spool entry that cannot be stored stays in quarantine."""

    # past either cap the oldest rejected bodies are deleted (the newest are what gets looked at)
    rejected_max_rows: int = 100_000
    rejected_max_bytes: int = 256 * 1024 * 1024
    # past it, work that can only go to the spool is answered 503 with Retry-After
    spool_max_bytes: int = 1024 * 1024 * 1024
    # under this much free space on the data volume bad input is answered but no longer kept
    min_free_bytes: int = 512 * 1024 * 1024
    quarantine_days: float = 30.0


@dataclass(frozen=True)
class LeadSettings:
    """Per-form lead rules (the TOML `[forms.<name>]`) and the default pipeline and status."""

    forms: Mapping[str, FormRule] = field(default_factory=dict)
    default_pipeline_id: int | None = None
    default_status_id: int | None = None
    default_category_id: int | None = None  # Bitrix24
    default_stage_id: str | None = None  # Bitrix24

    def spam_rule(self, form: str) -> SpamRule:
        """The spam controls of `form` (its own rule's, else the `*` rule's): per request, so
        no copy is made."""
        rule = self.forms.get(form) or self.forms.get("*")
        return rule.spam if rule is not None else NO_SPAM_RULE

    def form_rule(self, form: str) -> FormRule:
        """The rule for `form`, falling back to the `*` rule and then to the defaults."""
        return self._filled(self.forms.get(form) or self.forms.get("*") or FormRule())

    def configured(self) -> list[tuple[str, FormRule]]:
        """Every rule in force, with where it comes from: `forms.<name>` of the TOML file, or
        `default` (the environment, or the file's `[amocrm]`/`[bitrix24]`)."""
        rules = [("default", self._filled(FormRule()))]
        return rules + [(f"forms.{name}", self._filled(rule)) for name, rule in self.forms.items()]

    def _filled(self, rule: FormRule) -> FormRule:
        category = rule.category_id if rule.category_id is not None else self.default_category_id
        return replace(
            rule,
            pipeline_id=rule.pipeline_id or self.default_pipeline_id,
            status_id=rule.status_id or self.default_status_id,
            category_id=category,
            stage_id=rule.stage_id or self.default_stage_id,
        )


def setting_name(where: str, name: str) -> str:
    """The variable (or TOML key) a rule's value came from (`LeadSettings.configured`), for
    an error message: `AMOCRM_STATUS_ID`, or `CRM_RELAY_CONFIG forms.course.stage_id`."""
    if where != "default":
        return f"CRM_RELAY_CONFIG {where}.{name}"
    crm = "BITRIX24" if name in ("category_id", "stage_id") else "AMOCRM"
    return f"{crm}_{name.upper()}"


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
    # the contact index's own share of CRM_RATE_LIMIT for its list reads, and how long a sync
    # that reached the end answers later batches (see service.crm.amocrm.index)
    index_share: float = 0.33
    index_refresh_s: float = 2.0


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
    # OAUTH_TOKEN_KEY: Fernet key(s), comma-separated (the first encrypts): OAuth tokens stored
    # encrypted; None: stored as they are
    token_keys: tuple[str, ...] = ()
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

    # One secret per purpose, each falling back to the older single WEBHOOK_SECRET (`secret`):
    # the amoCRM hook's path and the key generic senders sign with (read them through the
    # properties below), and what signs forwarded events (`forward_key`).
    secret: str | None = None  # WEBHOOK_SECRET
    amocrm_path_secret: str | None = None  # AMOCRM_HOOK_PATH_SECRET
    hmac_secret: str | None = None  # WEBHOOK_HMAC_SECRET
    # PUBLIC_BASE_URL: where senders reach us; a QStash token's `sub` must be it plus the path
    public_base_url: str | None = None
    # FORWARD_SIGNING_SECRET, decoded (`whsec_<base64>`): keys the forwards' signatures
    forward_signing_secret: bytes | None = None
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

    @property
    def hook_path(self) -> str | None:
        """The `{secret}` of `POST /webhooks/amocrm/{secret}` (None: that endpoint is off)."""
        return self.amocrm_path_secret or self.secret

    @property
    def inbound_hmac(self) -> str | None:
        """The key generic senders sign their bodies with (`X-Relay-Signature` in)."""
        return self.hmac_secret or self.secret

    @property
    def forward_key(self) -> bytes | None:
        """What signs forwarded events: FORWARD_SIGNING_SECRET, else WEBHOOK_SECRET's bytes
        (None: forwards go unsigned)."""
        if self.forward_signing_secret is not None:
            return self.forward_signing_secret
        return self.secret.encode() if self.secret else None


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
class SpamSettings:
    """What every form's spam controls share: CAPTCHA secrets and endpoints, the client limit's
    memory and the proxies whose `X-Forwarded-For` is believed."""

    turnstile_secret: str | None = None
    recaptcha_secret: str | None = None
    smartcaptcha_secret: str | None = None
    turnstile_verify_url: str = TURNSTILE_VERIFY_URL
    recaptcha_verify_url: str = RECAPTCHA_VERIFY_URL
    smartcaptcha_verify_url: str = SMARTCAPTCHA_VERIFY_URL
    captcha_timeout_s: float = 3.0
    # CIDRs of our own reverse proxies / load balancers; nobody else's X-Forwarded-For counts
    trusted_proxies: tuple[str, ...] = ()
    client_rate_max_clients: int = 10_000  # addresses remembered (LRU), ~350 bytes each


@dataclass(frozen=True)
class RetentionSettings:
    """How long personal data is kept here; delivered work only, never what is still owed."""

    days: float = 0.0  # RETENTION_DAYS: 0 keeps everything
    spam_days: float = 30.0
    spam_max_rows: int = 100_000
    check_s: float = 3600.0


@dataclass(frozen=True)
class AdminSettings:
    """`ADMIN_TOKEN`: the admin API and dashboard exist only with one."""

    token: str | None = None
