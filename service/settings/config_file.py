"""The optional TOML file (`CRM_RELAY_CONFIG`): per-form rules, forward rules, generic sources.

`read_config` parses and checks it; `service.settings.load_config` merges what it found into the
slices that use it (`leads`, `webhook`). A wrong entry raises `SettingsError` naming
`CRM_RELAY_CONFIG` and where in the file.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from service.errors import SettingsError
from service.settings.slices import (
    CAPTCHA_VENDORS,
    FormRule,
    ForwardRule,
    GenericSource,
    SpamRule,
    SpamSettings,
)

GENERIC_VERIFY = ("any", "hmac", "qstash", "none")


@dataclass(frozen=True)
class ConfigFile:
    """What the TOML file says; None: the file leaves that setting as the environment has it."""

    forms: dict[str, FormRule] = field(default_factory=dict)
    forward_rules: dict[str, tuple[ForwardRule, ...]] = field(default_factory=dict)
    generic_sources: dict[str, GenericSource] = field(default_factory=dict)
    pipeline_id: int | None = None  # [amocrm] pipeline_id
    status_id: int | None = None  # [amocrm] status_id
    category_id: int | None = None  # [bitrix24] category_id
    stage_id: str | None = None  # [bitrix24] stage_id


def read_config(path: Path) -> ConfigFile:
    """Parse and check the TOML file at `path`."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError("CRM_RELAY_CONFIG", f"a readable TOML file ({exc})") from None
    amo, b24 = data.get("amocrm", {}), data.get("bitrix24", {})
    return ConfigFile(
        forms={name: _form_rule(name, raw) for name, raw in data.get("forms", {}).items()},
        forward_rules=_forward_rules(data.get("forward", {})),
        generic_sources=_generic_sources(data.get("generic", {})),
        pipeline_id=_int(amo.get("pipeline_id"), "amocrm.pipeline_id"),
        status_id=_int(amo.get("status_id"), "amocrm.status_id"),
        category_id=_int(b24.get("category_id"), "bitrix24.category_id"),
        stage_id=_stage(b24.get("stage_id"), "bitrix24.stage_id"),
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
        category_id=_int(raw.get("category_id"), f"{where}.category_id"),
        stage_id=_stage(raw.get("stage_id"), f"{where}.stage_id"),
        tags=tuple(tags),
        field_map={str(k): _int(v, f"{where}.fields.{k}") or 0 for k, v in fields.items()},
        lead_name=str(raw.get("lead_name", FormRule.lead_name)),
        spam=_spam_rule(where, raw),
    )


def _spam_rule(where: str, raw: dict[str, Any]) -> SpamRule:
    """The spam keys of `[forms.<name>]` (docs/configuration.md)."""
    d = SpamRule()
    captcha = raw.get("captcha")
    if captcha is not None and captcha not in CAPTCHA_VENDORS:
        raise SettingsError("CRM_RELAY_CONFIG", f"{where}.captcha to be one of {CAPTCHA_VENDORS}")
    outage = raw.get("captcha_outage", d.captcha_outage)
    if outage not in ("accept", "spam"):
        raise SettingsError("CRM_RELAY_CONFIG", f"{where}.captcha_outage to be accept or spam")
    return SpamRule(
        honeypot=_text(raw, "honeypot", where),
        min_fill_s=_number(raw, "min_fill_s", where, d.min_fill_s, 3600),
        rendered_at_field=_text(raw, "rendered_at_field", where) or d.rendered_at_field,
        submitted_at_field=_text(raw, "submitted_at_field", where) or d.submitted_at_field,
        captcha=captcha,
        captcha_field=_text(raw, "captcha_field", where),
        captcha_secret=_text(raw, "captcha_secret", where),
        captcha_min_score=_number(raw, "captcha_min_score", where, 0.0, 1),
        captcha_outage=outage,
        client_rate=int(_number(raw, "client_rate", where, 0, 1_000_000)),
    )


def _text(raw: dict[str, Any], key: str, where: str) -> str | None:
    value = raw.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise SettingsError("CRM_RELAY_CONFIG", f"{where}.{key} to be a non-empty string")
    return value.strip() if value else None


def _number(raw: dict[str, Any], key: str, where: str, default: float, hi: float) -> float:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= hi:
        raise SettingsError("CRM_RELAY_CONFIG", f"{where}.{key} to be a number from 0 to {hi:g}")
    return float(value)


def with_secret(name: str, rule: FormRule, spam: SpamSettings) -> FormRule:
    """A form that asks for a CAPTCHA gets its vendor's secret from the environment unless the
    file gives one; with neither, start-up stops (a check that cannot be made is no check)."""
    vendor = rule.spam.captcha
    if vendor is None or rule.spam.captcha_secret:
        return rule
    secret = getattr(spam, f"{vendor}_secret")
    if not secret:
        raise SettingsError(
            f"{vendor.upper()}_SECRET", f"the {vendor} secret key, which [forms.{name}] asks for"
        )
    return replace(rule, spam=replace(rule.spam, captcha_secret=secret))


def _int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SettingsError("CRM_RELAY_CONFIG", f"{where} to be an integer, got {value!r}")
    return value


def _stage(value: Any, where: str) -> str | None:
    """A Bitrix24 stage id: a string ("NEW", "C1:PREPARATION"); an integer is refused, since
    Bitrix24 would silently put the deal in the category's first stage instead."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise SettingsError(
            "CRM_RELAY_CONFIG", f'{where} to be a stage id string such as "C1:NEW", got {value!r}'
        )
    return value.strip()


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
