"""Each slice from its environment variables; a wrong value raises `SettingsError` naming it.

`Settings.from_env` calls these in turn and checks the CRM's account last, so a malformed
number is named before a missing credential, as it always was.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from collections.abc import Callable, Mapping
from typing import TypeVar
from urllib.parse import urlparse

from service.errors import SettingsError
from service.settings.slices import (
    BITRIX24_OAUTH_URL,
    RECAPTCHA_VERIFY_URL,
    SMARTCAPTCHA_VERIFY_URL,
    TELEGRAM_API_URL,
    TURNSTILE_VERIFY_URL,
    AdminSettings,
    AlertSettings,
    AmoCrmSettings,
    Bitrix24Settings,
    ClusterSettings,
    CrmSettings,
    DatabaseSettings,
    DeliverySettings,
    HttpSettings,
    IntakeSettings,
    LeadSettings,
    LogSettings,
    RetentionSettings,
    RetryPolicy,
    SpamSettings,
    StorageSettings,
    WebhookSettings,
    setting_name,
)

T = TypeVar("T")

CRM_KINDS = ("amocrm", "bitrix24", "simulator")
AMOCRM_DEDUP_MODES = ("index", "search", "trust")
DEFAULT_RATES = {"amocrm": 6.0, "bitrix24": 2.0, "simulator": 6.0}
HTTP = ("http", "https")
# Secrets we choose ourselves (the admin token, the webhook secrets) are refused shorter than
# this, or equal to a placeholder the docs or earlier manifests showed (docs/configuration.md).
MIN_SECRET_CHARS = 32
PLACEHOLDER_SECRETS = frozenset(
    {
        "change-me",
        "change-me-long-random",
        "changeme",
        "replace-me",
        "secret",
        "password",
        "0123456789abcdef0123456789abcdef",
    }
)


class EnvReader:
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

    def secret(self, name: str) -> str | None:
        """A secret of ours: unset, or at least MIN_SECRET_CHARS and no placeholder. The value
        itself is never part of the message (it would reach the log)."""
        value = self.text(name)
        if value is None:
            return None
        if len(value) < MIN_SECRET_CHARS:
            raise SettingsError(
                name,
                f"at least {MIN_SECRET_CHARS} random characters (e.g. `openssl rand -hex 32`),"
                f" got {len(value)}",
            )
        if value.lower() in PLACEHOLDER_SECRETS or len(set(value)) == 1:
            raise SettingsError(name, "a random value, not a placeholder")
        return value

    def fernet_keys(self, name: str) -> tuple[str, ...]:
        """Comma-separated Fernet keys (`Fernet.generate_key()`); never echoed."""
        raw = self.text(name)
        if raw is None:
            return ()
        keys = tuple(k.strip() for k in raw.split(",") if k.strip())
        from cryptography.fernet import Fernet  # only this setting needs it

        try:
            for key in keys:
                Fernet(key)
        except ValueError:
            raise SettingsError(
                name, "Fernet keys, comma-separated (32 url-safe base64-encoded bytes each)"
            ) from None
        return keys

    def url(self, name: str, schemes: tuple[str, ...]) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        parsed = urlparse(raw)
        if parsed.scheme not in schemes or not (parsed.netloc or parsed.path):
            raise SettingsError(name, f"a {'/'.join(schemes)} URL, got {raw!r}")
        return raw

    def networks(self, name: str) -> tuple[str, ...]:
        """A comma-separated list of CIDRs (or single addresses), each checked."""
        raw = self.text(name)
        if raw is None:
            return ()
        found = []
        for part in raw.split(","):
            try:
                found.append(str(ipaddress.ip_network(part.strip(), strict=False)))
            except ValueError:
                raise SettingsError(name, f"CIDRs such as 10.0.0.0/8,::1, got {part!r}") from None
        return tuple(found)

    def region(self, name: str) -> str | None:
        raw = self.text(name)
        if raw is None:
            return None
        import phonenumbers  # imported here: only this setting needs it

        if raw.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise SettingsError(name, f"a two-letter region code such as KZ or RU, got {raw!r}")
        return raw.upper()


# --- the slices -----------------------------------------------------------------------------


def database(r: EnvReader) -> DatabaseSettings:
    schemes = ("postgres", "postgresql")
    url, direct_url = r.url("DATABASE_URL", schemes), r.url("DATABASE_DIRECT_URL", schemes)
    if direct_url is not None and url is None:
        raise SettingsError(
            "DATABASE_DIRECT_URL", "DATABASE_URL as well (alone it has nothing to stand beside)"
        )
    return DatabaseSettings(url=url, direct_url=direct_url)


def cluster(r: EnvReader) -> ClusterSettings:
    return ClusterSettings(redis_url=r.url("REDIS_URL", ("redis", "rediss", "unix")))


def crm_kind(r: EnvReader) -> str:
    """`CRM`; unset, guessed from the account variables."""
    return r.choice("CRM", CRM_KINDS, default=None) or _guess_crm(r)


def crm(r: EnvReader, kind: str) -> CrmSettings:
    """The CRM `kind` with its account, rate (the kind's default) and timeout."""
    amocrm, bitrix24 = _amocrm(r), _bitrix24(r)
    return CrmSettings(
        kind=kind,
        rate_limit=r.number("CRM_RATE_LIMIT", float, DEFAULT_RATES[kind], 0.1, 1000),
        timeout_s=r.number("CRM_TIMEOUT_S", float, 30.0, 0.1, 600),
        token_keys=r.fernet_keys("OAUTH_TOKEN_KEY"),
        amocrm=amocrm,
        bitrix24=bitrix24,
    )


def _amocrm(r: EnvReader) -> AmoCrmSettings:
    return AmoCrmSettings(
        base_url=r.url("AMOCRM_BASE_URL", HTTP),
        access_token=r.text("AMOCRM_ACCESS_TOKEN"),
        client_id=r.text("AMOCRM_CLIENT_ID"),
        client_secret=r.text("AMOCRM_CLIENT_SECRET"),
        refresh_token=r.text("AMOCRM_REFRESH_TOKEN"),
        redirect_uri=r.text("AMOCRM_REDIRECT_URI"),
        dedup=_amocrm_dedup(r),
        index_share=r.number("AMOCRM_INDEX_SHARE", float, 0.33, 0.01, 1),
        index_refresh_s=r.number("AMOCRM_INDEX_REFRESH_S", float, 2.0, 0, 3600),
    )


def _bitrix24(r: EnvReader) -> Bitrix24Settings:
    return Bitrix24Settings(
        webhook_url=r.url("BITRIX24_WEBHOOK_URL", HTTP),
        client_id=r.text("BITRIX24_CLIENT_ID"),
        client_secret=r.text("BITRIX24_CLIENT_SECRET"),
        refresh_token=r.text("BITRIX24_REFRESH_TOKEN"),
        portal_url=r.url("BITRIX24_PORTAL_URL", HTTP),
        oauth_url=r.url("BITRIX24_OAUTH_URL", HTTP) or BITRIX24_OAUTH_URL,
    )


def intake(r: EnvReader) -> IntakeSettings:
    return IntakeSettings(
        idempotency_window_s=r.number("IDEMPOTENCY_WINDOW_S", float, 300.0, 0, 86400),
        default_phone_region=r.region("DEFAULT_PHONE_REGION"),
        max_body_bytes=r.number("MAX_BODY_BYTES", int, 64 * 1024, 1024, 64 * 1024 * 1024),
        idempotency_window_bytes=r.number(
            "IDEMPOTENCY_WINDOW_BYTES", int, 32 * 1024 * 1024, 1024 * 1024, 2**40
        ),
    )


def storage(r: EnvReader) -> StorageSettings:
    return StorageSettings(
        rejected_max_rows=r.number("REJECTED_MAX_ROWS", int, 100_000, 1, 2**40),
        rejected_max_bytes=r.number(
            "REJECTED_MAX_BYTES", int, 256 * 1024 * 1024, 1024 * 1024, 2**50
        ),
        spool_max_bytes=r.number("SPOOL_MAX_BYTES", int, 1024 * 1024 * 1024, 1024 * 1024, 2**50),
        min_free_bytes=r.number("DATA_MIN_FREE_BYTES", int, 512 * 1024 * 1024, 0, 2**50),
        quarantine_days=r.number("SPOOL_QUARANTINE_DAYS", float, 30.0, 0.01, 3650),
    )


def leads(r: EnvReader) -> LeadSettings:
    """The default pipeline and status (amoCRM) or category and stage (Bitrix24); the per-form
    rules come from the TOML file."""
    category = r.number("BITRIX24_CATEGORY_ID", int, -1, 0, 2**31)
    return LeadSettings(
        default_pipeline_id=r.number("AMOCRM_PIPELINE_ID", int, 0, 0, 2**62) or None,
        default_status_id=r.number("AMOCRM_STATUS_ID", int, 0, 0, 2**62) or None,
        default_category_id=None if category < 0 else category,
        default_stage_id=r.text("BITRIX24_STAGE_ID"),
    )


def check_lead_fields(kind: str, leads: LeadSettings) -> None:
    """Each CRM's own names for where a lead goes: amoCRM's pipeline/status are no Bitrix24
    category/stage (a Bitrix24 stage is a string; a number there would silently land every deal
    in the first stage), nor the other way round."""
    theirs = ("pipeline_id", "status_id") if kind == "bitrix24" else ("category_id", "stage_id")
    ours = ("category_id", "stage_id") if kind == "bitrix24" else ("pipeline_id", "status_id")
    for where, rule in leads.configured():
        for name in theirs:
            if getattr(rule, name) is not None:
                variable = setting_name(where, name)
                raise SettingsError(
                    variable, f"unset with CRM={kind}, which takes {' and '.join(ours)}"
                )


def delivery(r: EnvReader) -> DeliverySettings:
    return DeliverySettings(
        worker_batch=r.number("WORKER_BATCH", int, 50, 1, 1000),
        worker_concurrency=r.number("WORKER_CONCURRENCY", int, 100, 1, 10000),
        worker_round=r.number("WORKER_ROUND", int, 500, 1, 5000),
        lease_s=r.number("LEASE_S", float, 30.0, 1, 3600),
        retry=RetryPolicy(
            base_s=r.number("RETRY_BASE_S", float, 2.0, 0.001, 3600),
            max_s=r.number("RETRY_MAX_S", float, 900.0, 0.001, 86400),
            max_attempts=r.number("RETRY_MAX_ATTEMPTS", int, 12, 1, 1000),
        ),
        circuit_cooldown_s=r.number("CIRCUIT_COOLDOWN_S", float, 60.0, 0.1, 86400),
        pause_base_s=r.number("CRM_PAUSE_BASE_S", float, 1.0, 0.01, 3600),
        pause_max_s=r.number("CRM_PAUSE_MAX_S", float, 60.0, 0.01, 86400),
    )


WHSEC = "whsec_"


def signing_key(name: str, raw: str | None) -> bytes | None:
    """A Standard Webhooks secret, `whsec_<base64>`, as its decoded bytes (what both forward
    signatures are keyed with); a value without the prefix is taken as it is (its UTF-8 bytes)."""
    if raw is None:
        return None
    if not raw.startswith(WHSEC):
        return raw.encode()
    encoded = raw[len(WHSEC) :]
    try:  # padded or not, as the Standard Webhooks libraries take it
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        key = b""
    if not key:
        raise SettingsError(name, f"{WHSEC}<base64 of the key bytes>, got a bad base64 part")
    return key


def webhook(r: EnvReader) -> WebhookSettings:
    """The webhook variables; the generic sources and forward rules come from the TOML file."""
    return WebhookSettings(
        secret=r.secret("WEBHOOK_SECRET"),
        amocrm_path_secret=r.secret("AMOCRM_HOOK_PATH_SECRET"),
        hmac_secret=r.secret("WEBHOOK_HMAC_SECRET"),
        public_base_url=r.url("PUBLIC_BASE_URL", HTTP),
        forward_signing_secret=signing_key(
            "FORWARD_SIGNING_SECRET", r.text("FORWARD_SIGNING_SECRET")
        ),
        bitrix24_app_token=r.text("BITRIX24_APP_TOKEN"),
        forward_url=r.url("WEBHOOK_FORWARD_URL", HTTP),
        forward_rate=r.number("WEBHOOK_FORWARD_RATE", float, 10.0, 0.01, 10000),
        forward_timeout_s=r.number("FORWARD_TIMEOUT_S", float, 10.0, 0.1, 600),
        echo_window_s=r.number("ECHO_WINDOW_S", float, 60.0, 0, 86400),
        max_body_bytes=r.number("WEBHOOK_MAX_BODY_BYTES", int, 1024 * 1024, 1024, 64 * 1024 * 1024),
        qstash_current_signing_key=r.text("QSTASH_CURRENT_SIGNING_KEY"),
        qstash_next_signing_key=r.text("QSTASH_NEXT_SIGNING_KEY"),
    )


def alert(r: EnvReader) -> AlertSettings:
    return AlertSettings(
        telegram_bot_token=r.text("TELEGRAM_BOT_TOKEN"),
        telegram_chat_id=r.text("TELEGRAM_CHAT_ID"),
        webhook_url=r.url("ALERT_WEBHOOK_URL", HTTP),
        telegram_api_url=r.url("TELEGRAM_API_URL", HTTP) or TELEGRAM_API_URL,
        check_s=r.number("ALERT_CHECK_S", float, 15.0, 0.05, 3600),
        interval_s=r.number("ALERT_INTERVAL_S", float, 900.0, 0, 86400),
        lag_s=r.number("ALERT_LAG_S", float, 600.0, 0, 86400),
    )


def spam(r: EnvReader) -> SpamSettings:
    """The spam controls' shared settings; each form's rule comes from the TOML file."""
    return SpamSettings(
        turnstile_secret=r.text("TURNSTILE_SECRET"),
        recaptcha_secret=r.text("RECAPTCHA_SECRET"),
        smartcaptcha_secret=r.text("SMARTCAPTCHA_SECRET"),
        turnstile_verify_url=r.url("TURNSTILE_VERIFY_URL", HTTP) or TURNSTILE_VERIFY_URL,
        recaptcha_verify_url=r.url("RECAPTCHA_VERIFY_URL", HTTP) or RECAPTCHA_VERIFY_URL,
        smartcaptcha_verify_url=r.url("SMARTCAPTCHA_VERIFY_URL", HTTP) or SMARTCAPTCHA_VERIFY_URL,
        captcha_timeout_s=r.number("CAPTCHA_TIMEOUT_S", float, 3.0, 0.1, 60),
        trusted_proxies=r.networks("TRUSTED_PROXIES"),
        client_rate_max_clients=r.number("CLIENT_RATE_MAX_CLIENTS", int, 10_000, 1, 10_000_000),
    )


def retention(r: EnvReader) -> RetentionSettings:
    return RetentionSettings(
        days=r.number("RETENTION_DAYS", float, 0.0, 0, 36500),
        spam_days=r.number("SPAM_RETENTION_DAYS", float, 30.0, 0.01, 36500),
        spam_max_rows=r.number("SPAM_MAX_ROWS", int, 100_000, 1, 100_000_000),
        check_s=r.number("RETENTION_CHECK_S", float, 3600.0, 0.05, 86400),
    )


def admin(r: EnvReader) -> AdminSettings:
    return AdminSettings(token=r.secret("ADMIN_TOKEN"))


def log(r: EnvReader) -> LogSettings:
    level = r.choice("LOG_LEVEL", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO", upper=True)
    return LogSettings(
        level=level or "INFO", format=r.choice("LOG_FORMAT", ("json", "text"), "text") or "text"
    )


def http(r: EnvReader) -> HttpSettings:
    port = r.number("PORT", int, 8080, 0, 65535)
    ops_port = r.number("OPS_PORT", int, 0, 0, 65535) or None
    if ops_port is not None and ops_port == port:
        raise SettingsError("OPS_PORT", f"a port other than PORT ({port}), or unset")
    return HttpSettings(host=r.text("HOST") or "0.0.0.0", port=port, ops_port=ops_port)


# --- the CRM account ------------------------------------------------------------------------


def _amocrm_dedup(r: EnvReader) -> str:
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


def _guess_crm(r: EnvReader) -> str:
    if r.env.get("AMOCRM_BASE_URL"):
        return "amocrm"
    if r.env.get("BITRIX24_WEBHOOK_URL") or r.env.get("BITRIX24_PORTAL_URL"):
        return "bitrix24"
    return "simulator"


def check_crm(crm: CrmSettings) -> None:
    """The configured CRM's account is complete: a URL and a way to authenticate."""
    if crm.kind == "amocrm":
        amo = crm.amocrm
        if not amo.base_url:
            raise SettingsError(
                "AMOCRM_BASE_URL", "the account URL, e.g. https://example.amocrm.ru"
            )
        if not amo.access_token:
            _check_amocrm_oauth(amo)
    if crm.kind == "bitrix24":
        _check_bitrix24(crm.bitrix24)


def _check_amocrm_oauth(amo: AmoCrmSettings) -> None:
    """Without a long-lived token, the whole OAuth set: a refresh sends the redirect URI too,
    and amoCRM refuses one without the integration's."""
    oauth = {
        "AMOCRM_CLIENT_ID": amo.client_id,
        "AMOCRM_CLIENT_SECRET": amo.client_secret,
        "AMOCRM_REFRESH_TOKEN": amo.refresh_token,
        "AMOCRM_REDIRECT_URI": amo.redirect_uri,
    }
    if not any(oauth.values()):
        raise SettingsError(
            "AMOCRM_ACCESS_TOKEN",
            "a long-lived token, or AMOCRM_CLIENT_ID/AMOCRM_CLIENT_SECRET/"
            "AMOCRM_REFRESH_TOKEN/AMOCRM_REDIRECT_URI for OAuth",
        )
    _whole_set("amoCRM", oauth)


def _whole_set(crm: str, oauth: dict[str, str | None]) -> None:
    """Some of an OAuth set given means all of it: name the first one missing."""
    missing = [name for name, value in oauth.items() if not value]
    if missing:
        raise SettingsError(missing[0], f"a value: {crm} OAuth needs {', '.join(oauth)} together")


def _check_bitrix24(b24: Bitrix24Settings) -> None:
    """A webhook URL, or the whole OAuth set (which wins when both are given)."""
    oauth = {
        "BITRIX24_PORTAL_URL": b24.portal_url,
        "BITRIX24_CLIENT_ID": b24.client_id,
        "BITRIX24_CLIENT_SECRET": b24.client_secret,
        "BITRIX24_REFRESH_TOKEN": b24.refresh_token,
    }
    if not any(oauth.values()):
        if not b24.webhook_url:
            raise SettingsError(
                "BITRIX24_WEBHOOK_URL",
                "https://<portal>/rest/<user>/<secret>/, or BITRIX24_PORTAL_URL/"
                "BITRIX24_CLIENT_ID/BITRIX24_CLIENT_SECRET/BITRIX24_REFRESH_TOKEN for OAuth",
            )
        return
    _whole_set("Bitrix24", oauth)
    # A webhook URL here would carry its secret to every call and hide the mix-up.
    portal = urlparse(b24.portal_url or "")
    if not portal.netloc or portal.path.rstrip("/") != "/rest":
        raise SettingsError(
            "BITRIX24_PORTAL_URL", f"https://<portal>/rest/, got {b24.portal_url!r}"
        )
