"""Settings, read once from the environment in `main()` and passed down.

A wrong value stops start-up with one line that names the variable and what it expects
(`SettingsError`); nothing else in the service reads `os.environ`.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from service.errors import SettingsError

T = TypeVar("T")

CRM_KINDS = ("amocrm", "bitrix24", "simulator")
AMOCRM_DEDUP_MODES = ("index", "search", "trust")
DEFAULT_RATES = {"amocrm": 6.0, "bitrix24": 2.0, "simulator": 6.0}
BITRIX24_OAUTH_URL = "https://oauth.bitrix.info/oauth/token/"


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


GENERIC_VERIFY = ("any", "hmac", "qstash", "none")


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
class Settings:
    """Everything the service is told from outside."""

    database_url: str | None = None
    data_dir: Path = Path("./var")
    redis_url: str | None = None
    crm: str = "simulator"
    amocrm_base_url: str | None = None
    amocrm_access_token: str | None = None
    amocrm_client_id: str | None = None
    amocrm_client_secret: str | None = None
    amocrm_refresh_token: str | None = None
    amocrm_redirect_uri: str | None = None
    bitrix24_webhook_url: str | None = None
    bitrix24_app_token: str | None = None
    # OAuth app tokens instead of a webhook: all four, or none
    bitrix24_client_id: str | None = None
    bitrix24_client_secret: str | None = None
    bitrix24_refresh_token: str | None = None
    bitrix24_portal_url: str | None = None  # the portal's https://<portal>/rest/
    bitrix24_oauth_url: str = BITRIX24_OAUTH_URL
    crm_rate_limit: float = 6.0
    crm_timeout_s: float = 30.0
    idempotency_window_s: float = 300.0
    idempotency_window_size: int = 100_000
    admin_token: str | None = None
    webhook_secret: str | None = None
    telegram_bot_token: str | None = None
    telegram_chat_id: str | None = None
    alert_webhook_url: str | None = None
    telegram_api_url: str = "https://api.telegram.org"
    alert_check_s: float = 15.0  # how often alert conditions are evaluated
    alert_interval_s: float = 900.0  # at most one message per condition per this many seconds
    alert_lag_s: float = 600.0  # the oldest due job waiting longer than this is an alert
    log_level: str = "INFO"
    log_format: str = "text"
    default_phone_region: str | None = None
    host: str = "0.0.0.0"
    port: int = 8080
    webhook_forward_url: str | None = None
    webhook_forward_rate: float = 10.0
    forward_timeout_s: float = 10.0
    echo_window_s: float = 60.0
    # CRMs batch many events into one body: a limit of its own, so a big batch is not refused
    webhook_max_body_bytes: int = 1024 * 1024
    qstash_current_signing_key: str | None = None
    qstash_next_signing_key: str | None = None
    # source ("amocrm", "bitrix24", "generic/<name>") -> its extra destinations
    forward_rules: Mapping[str, tuple[ForwardRule, ...]] = field(default_factory=dict)
    generic_sources: Mapping[str, GenericSource] = field(default_factory=dict)
    max_body_bytes: int = 64 * 1024
    retry: RetryPolicy = RetryPolicy()
    worker_batch: int = 50
    worker_concurrency: int = 100  # people in flight
    lease_s: float = 30.0
    circuit_cooldown_s: float = 60.0
    # a 429 without Retry-After pauses every sender: base, doubling per 429 in a row, up to max
    pause_base_s: float = 1.0
    pause_max_s: float = 60.0
    db_write_timeout_s: float = 2.0
    # how the amoCRM adapter finds out whether a new person is already a contact: "index" (a
    # local index of the CRM's contacts, synced incrementally), "search" (one CRM search per
    # phone/email) or "trust" (no lookup: the account's own duplicate control merges contacts;
    # a crash between create and commit can then leave a second lead for the person)
    amocrm_dedup: str = "index"
    default_pipeline_id: int | None = None
    default_status_id: int | None = None
    forms: Mapping[str, FormRule] = field(default_factory=dict)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    def form_rule(self, form: str) -> FormRule:
        """The rule for `form`, falling back to the `*` rule and then to the defaults."""
        rule = self.forms.get(form) or self.forms.get("*") or FormRule()
        return replace(
            rule,
            pipeline_id=rule.pipeline_id or self.default_pipeline_id,
            status_id=rule.status_id or self.default_status_id,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from environment variables; raise SettingsError on a bad value."""
        r = _Reader(env)
        crm = r.choice("CRM", CRM_KINDS, default=None) or _guess_crm(env)
        rate_default = DEFAULT_RATES[crm]
        s = cls(
            database_url=r.url("DATABASE_URL", ("postgres", "postgresql")),
            data_dir=Path(r.text("CRM_RELAY_DATA_DIR") or "./var"),
            redis_url=r.url("REDIS_URL", ("redis", "rediss", "unix")),
            crm=crm,
            amocrm_base_url=r.url("AMOCRM_BASE_URL", ("http", "https")),
            amocrm_access_token=r.text("AMOCRM_ACCESS_TOKEN"),
            amocrm_client_id=r.text("AMOCRM_CLIENT_ID"),
            amocrm_client_secret=r.text("AMOCRM_CLIENT_SECRET"),
            amocrm_refresh_token=r.text("AMOCRM_REFRESH_TOKEN"),
            amocrm_redirect_uri=r.text("AMOCRM_REDIRECT_URI"),
            bitrix24_webhook_url=r.url("BITRIX24_WEBHOOK_URL", ("http", "https")),
            bitrix24_app_token=r.text("BITRIX24_APP_TOKEN"),
            bitrix24_client_id=r.text("BITRIX24_CLIENT_ID"),
            bitrix24_client_secret=r.text("BITRIX24_CLIENT_SECRET"),
            bitrix24_refresh_token=r.text("BITRIX24_REFRESH_TOKEN"),
            bitrix24_portal_url=r.url("BITRIX24_PORTAL_URL", ("http", "https")),
            bitrix24_oauth_url=r.url("BITRIX24_OAUTH_URL", ("http", "https")) or BITRIX24_OAUTH_URL,
            crm_rate_limit=r.number("CRM_RATE_LIMIT", float, rate_default, 0.1, 1000),
            crm_timeout_s=r.number("CRM_TIMEOUT_S", float, 30.0, 0.1, 600),
            idempotency_window_s=r.number("IDEMPOTENCY_WINDOW_S", float, 300.0, 0, 86400),
            admin_token=r.text("ADMIN_TOKEN"),
            webhook_secret=r.text("WEBHOOK_SECRET"),
            telegram_bot_token=r.text("TELEGRAM_BOT_TOKEN"),
            telegram_chat_id=r.text("TELEGRAM_CHAT_ID"),
            alert_webhook_url=r.url("ALERT_WEBHOOK_URL", ("http", "https")),
            telegram_api_url=r.url("TELEGRAM_API_URL", ("http", "https"))
            or "https://api.telegram.org",
            alert_check_s=r.number("ALERT_CHECK_S", float, 15.0, 0.05, 3600),
            alert_interval_s=r.number("ALERT_INTERVAL_S", float, 900.0, 0, 86400),
            alert_lag_s=r.number("ALERT_LAG_S", float, 600.0, 0, 86400),
            log_level=r.choice(
                "LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", upper=True
            )
            or "INFO",
            log_format=r.choice("LOG_FORMAT", ("json", "text"), "text") or "text",
            default_phone_region=r.region("DEFAULT_PHONE_REGION"),
            host=r.text("HOST") or "0.0.0.0",
            port=r.number("PORT", int, 8080, 0, 65535),
            webhook_forward_url=r.url("WEBHOOK_FORWARD_URL", ("http", "https")),
            webhook_forward_rate=r.number("WEBHOOK_FORWARD_RATE", float, 10.0, 0.01, 10000),
            forward_timeout_s=r.number("FORWARD_TIMEOUT_S", float, 10.0, 0.1, 600),
            echo_window_s=r.number("ECHO_WINDOW_S", float, 60.0, 0, 86400),
            webhook_max_body_bytes=r.number(
                "WEBHOOK_MAX_BODY_BYTES", int, 1024 * 1024, 1024, 64 * 1024 * 1024
            ),
            qstash_current_signing_key=r.text("QSTASH_CURRENT_SIGNING_KEY"),
            qstash_next_signing_key=r.text("QSTASH_NEXT_SIGNING_KEY"),
            max_body_bytes=r.number("MAX_BODY_BYTES", int, 64 * 1024, 1024, 64 * 1024 * 1024),
            retry=RetryPolicy(
                base_s=r.number("RETRY_BASE_S", float, 2.0, 0.001, 3600),
                max_s=r.number("RETRY_MAX_S", float, 900.0, 0.001, 86400),
                max_attempts=r.number("RETRY_MAX_ATTEMPTS", int, 12, 1, 1000),
            ),
            worker_batch=r.number("WORKER_BATCH", int, 50, 1, 1000),
            worker_concurrency=r.number("WORKER_CONCURRENCY", int, 100, 1, 10000),
            lease_s=r.number("LEASE_S", float, 30.0, 1, 3600),
            circuit_cooldown_s=r.number("CIRCUIT_COOLDOWN_S", float, 60.0, 0.1, 86400),
            pause_base_s=r.number("CRM_PAUSE_BASE_S", float, 1.0, 0.01, 3600),
            pause_max_s=r.number("CRM_PAUSE_MAX_S", float, 60.0, 0.01, 86400),
            amocrm_dedup=_amocrm_dedup(r),
            default_pipeline_id=r.number("AMOCRM_PIPELINE_ID", int, 0, 0, 2**62) or None,
            default_status_id=r.number("AMOCRM_STATUS_ID", int, 0, 0, 2**62) or None,
        )
        s = _check_crm(s)
        path = r.text("CRM_RELAY_CONFIG")
        return load_config(s, Path(path)) if path else s


def _amocrm_dedup(r: _Reader) -> str:
    """`AMOCRM_DEDUP`; `AMOCRM_TRUST_DUPLICATE_CONTROL=true` is the older name for `trust`."""
    mode = r.choice("AMOCRM_DEDUP", AMOCRM_DEDUP_MODES, None)
    if not r.flag("AMOCRM_TRUST_DUPLICATE_CONTROL"):
        return mode or "index"
    if mode not in (None, "trust"):
        raise SettingsError(
            "AMOCRM_TRUST_DUPLICATE_CONTROL",
            f"unset or false with AMOCRM_DEDUP={mode} (true means AMOCRM_DEDUP=trust)",
        )
    return "trust"


def _guess_crm(env: Mapping[str, str]) -> str:
    if env.get("AMOCRM_BASE_URL"):
        return "amocrm"
    if env.get("BITRIX24_WEBHOOK_URL") or env.get("BITRIX24_PORTAL_URL"):
        return "bitrix24"
    return "simulator"


def _check_crm(s: Settings) -> Settings:
    if s.crm == "amocrm":
        if not s.amocrm_base_url:
            raise SettingsError(
                "AMOCRM_BASE_URL", "the account URL, e.g. https://example.amocrm.ru"
            )
        oauth = (s.amocrm_client_id, s.amocrm_client_secret, s.amocrm_refresh_token)
        if not s.amocrm_access_token and not all(oauth):
            raise SettingsError(
                "AMOCRM_ACCESS_TOKEN",
                "a long-lived token, or AMOCRM_CLIENT_ID/AMOCRM_CLIENT_SECRET/"
                "AMOCRM_REFRESH_TOKEN/AMOCRM_REDIRECT_URI for OAuth",
            )
    if s.crm == "bitrix24":
        _check_bitrix24(s)
    return s


def _check_bitrix24(s: Settings) -> None:
    """A webhook URL, or the whole OAuth set (which wins when both are given)."""
    oauth = {
        "BITRIX24_PORTAL_URL": s.bitrix24_portal_url,
        "BITRIX24_CLIENT_ID": s.bitrix24_client_id,
        "BITRIX24_CLIENT_SECRET": s.bitrix24_client_secret,
        "BITRIX24_REFRESH_TOKEN": s.bitrix24_refresh_token,
    }
    if not any(oauth.values()):
        if not s.bitrix24_webhook_url:
            raise SettingsError(
                "BITRIX24_WEBHOOK_URL",
                "https://<portal>/rest/<user>/<secret>/, or BITRIX24_PORTAL_URL/"
                "BITRIX24_CLIENT_ID/BITRIX24_CLIENT_SECRET/BITRIX24_REFRESH_TOKEN for OAuth",
            )
        return
    missing = [name for name, value in oauth.items() if not value]
    if missing:
        raise SettingsError(
            missing[0], f"a value: Bitrix24 OAuth needs {', '.join(oauth)} together"
        )
    # A webhook URL here would carry its secret to every call and hide the mix-up.
    portal = urlparse(s.bitrix24_portal_url or "")
    if not portal.netloc or portal.path.rstrip("/") != "/rest":
        raise SettingsError(
            "BITRIX24_PORTAL_URL", f"https://<portal>/rest/, got {s.bitrix24_portal_url!r}"
        )


class _Reader:
    """Reads one variable at a time and says exactly what was wrong with it."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def number(self, name: str, kind: Callable[[str], T], default: T, lo: float, hi: float) -> T:
        raw = self.text(name)
        if raw is None:
            return default
        what = "an integer" if kind is int else "a number"
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(name, f"{what} from {lo:g} to {hi:g}, got {raw!r}") from None
        if not lo <= value <= hi:  # type: ignore[operator]
            raise SettingsError(name, f"{what} from {lo:g} to {hi:g}, got {raw!r}")
        return value

    def choice(
        self, name: str, options: tuple[str, ...], default: str | None, *, upper: bool = False
    ) -> str | None:
        raw = self.text(name)
        if raw is None:
            return default
        value = raw.upper() if upper else raw.lower()
        if value not in options:
            raise SettingsError(name, f"one of {', '.join(options)}, got {raw!r}")
        return value

    def flag(self, name: str) -> bool:
        raw = (self.text(name) or "false").lower()
        if raw not in ("1", "0", "true", "false", "yes", "no"):
            raise SettingsError(name, f"true or false, got {raw!r}")
        return raw in ("1", "true", "yes")

    def url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        parsed = urlparse(raw)
        if parsed.scheme not in schemes or not (parsed.netloc or parsed.path):
            raise SettingsError(name, f"a {'/'.join(schemes)} URL, got {raw!r}")
        return raw

    def region(self, name: str) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        import phonenumbers  # imported here: only this setting needs it

        if raw.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise SettingsError(name, f"a two-letter region code such as KZ or RU, got {raw!r}")
        return raw.upper()


def load_config(s: Settings, path: Path) -> Settings:
    """Merge the optional TOML file (per-form rules) into the settings."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError("CRM_RELAY_CONFIG", f"a readable TOML file ({exc})") from None
    amo = data.get("amocrm", {})
    forms = {name: _form_rule(name, raw) for name, raw in data.get("forms", {}).items()}
    return replace(
        s,
        forms=forms,
        forward_rules=_forward_rules(data.get("forward", {})),
        generic_sources=_generic_sources(data.get("generic", {})),
        default_pipeline_id=_int(amo.get("pipeline_id"), "amocrm.pipeline_id")
        or s.default_pipeline_id,
        default_status_id=_int(amo.get("status_id"), "amocrm.status_id") or s.default_status_id,
    )


def _form_rule(name: str, raw: Any) -> FormRule:
    where = f"forms.{name}"
    if not isinstance(raw, dict):
        raise SettingsError("CRM_RELAY_CONFIG", f"[{where}] to be a table")
    fields = raw.get("fields", {})
    if not isinstance(fields, dict):
        raise SettingsError("CRM_RELAY_CONFIG", f"{where}.fields to map names to field ids")
    tags = raw.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise SettingsError("CRM_RELAY_CONFIG", f"{where}.tags to be a list of strings")
    return FormRule(
        pipeline_id=_int(raw.get("pipeline_id"), f"{where}.pipeline_id"),
        status_id=_int(raw.get("status_id"), f"{where}.status_id"),
        tags=tuple(tags),
        field_map={str(k): _int(v, f"{where}.fields.{k}") or 0 for k, v in fields.items()},
        lead_name=str(raw.get("lead_name", FormRule.lead_name)),
    )


def _int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError("CRM_RELAY_CONFIG", f"{where} to be an integer, got {value!r}")
    return value


def _forward_rules(raw: Any) -> dict[str, tuple[ForwardRule, ...]]:
    """`[forward.amocrm]`, `[forward.bitrix24]`, `[forward.generic.<name>]`: url (or urls), rate."""
    if not isinstance(raw, dict):
        raise SettingsError("CRM_RELAY_CONFIG", "[forward] to be a table")
    tables = {k: v for k, v in raw.items() if k != "generic"}
    generic = raw.get("generic", {})
    if not isinstance(generic, dict):
        raise SettingsError("CRM_RELAY_CONFIG", "[forward.generic] to be a table")
    tables.update({f"generic/{name}": v for name, v in generic.items()})
    return {source: _forward_rule(source, v) for source, v in tables.items()}


def _forward_rule(source: str, raw: Any) -> tuple[ForwardRule, ...]:
    where = f"forward.{source.replace('/', '.')}"
    if not isinstance(raw, dict):
        raise SettingsError("CRM_RELAY_CONFIG", f"[{where}] to be a table")
    urls = raw.get("urls", [raw["url"]] if "url" in raw else [])
    rate = raw.get("rate")
    if isinstance(rate, bool) or not isinstance(rate, int | float | None) or (rate or 1) <= 0:
        raise SettingsError("CRM_RELAY_CONFIG", f"{where}.rate to be a positive number")
    if not isinstance(urls, list) or not urls:
        raise SettingsError("CRM_RELAY_CONFIG", f"{where}.url to be an http(s) URL")
    for url in urls:
        parsed = urlparse(url) if isinstance(url, str) else None
        if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise SettingsError("CRM_RELAY_CONFIG", f"{where}.url to be an http(s) URL")
    return tuple(ForwardRule(u, None if rate is None else float(rate)) for u in urls)


def _generic_sources(raw: Any) -> dict[str, GenericSource]:
    """`[generic.<name>]`: key_field (dotted path into the body), verify."""
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise SettingsError("CRM_RELAY_CONFIG", "[generic.<name>] to be tables")
    sources = {}
    for name, table in raw.items():
        verify = table.get("verify", "any")
        if verify not in GENERIC_VERIFY:
            choices = ", ".join(GENERIC_VERIFY)
            raise SettingsError("CRM_RELAY_CONFIG", f"generic.{name}.verify to be one of {choices}")
        key_field = table.get("key_field")
        if key_field is not None and not isinstance(key_field, str):
            raise SettingsError("CRM_RELAY_CONFIG", f"generic.{name}.key_field to be a string")
        sources[str(name)] = GenericSource(key_field or None, verify)
    return sources
