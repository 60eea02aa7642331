"""The spam keys of `[forms.<name>]` and the variables they share: read, checked, and a CAPTCHA
without a secret stops start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.errors import SettingsError
from service.settings import Settings, SpamRule


def load(tmp_path: Path, toml: str, **env: str) -> Settings:
    path = tmp_path / "relay.toml"
    path.write_text(toml, encoding="utf-8")
    return Settings.from_env({"CRM_RELAY_CONFIG": str(path), **env})


def test_spam_keys_are_read_per_form_and_the_star_rule_covers_the_rest(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        """
[forms.course]
honeypot = "website"
min_fill_s = 2.5
captcha = "smartcaptcha"
client_rate = 10
[forms."*"]
captcha = "turnstile"
captcha_secret = "from-the-file"
captcha_outage = "spam"
""",
        SMARTCAPTCHA_SECRET="from-the-env",
        TRUSTED_PROXIES="10.0.0.0/8, 127.0.0.1",
    )
    course = s.leads.spam_rule("course")
    assert course.honeypot == "website" and course.min_fill_s == 2.5
    assert course.captcha_secret == "from-the-env" and course.client_rate == 10
    other = s.leads.spam_rule("other")
    assert other.captcha == "turnstile" and other.captcha_secret == "from-the-file"
    assert other.captcha_outage == "spam"
    assert s.spam.trusted_proxies == ("10.0.0.0/8", "127.0.0.1/32")
    assert Settings().leads.spam_rule("any") == SpamRule() and not SpamRule().active


@pytest.mark.parametrize(
    ("toml", "env", "variable"),
    [
        ('[forms.a]\ncaptcha = "turnstile"', {}, "TURNSTILE_SECRET"),
        ('[forms.a]\ncaptcha = "hcaptcha"', {}, "CRM_RELAY_CONFIG"),
        ("[forms.a]\nmin_fill_s = -1", {}, "CRM_RELAY_CONFIG"),
        ('[forms.a]\nhoneypot = ""', {}, "CRM_RELAY_CONFIG"),
        ('[forms.a]\ncaptcha_outage = "maybe"', {}, "CRM_RELAY_CONFIG"),
        ("", {"TRUSTED_PROXIES": "10.0.0.0/8,not-a-net"}, "TRUSTED_PROXIES"),
        ("", {"RETENTION_DAYS": "-1"}, "RETENTION_DAYS"),
    ],
)
def test_a_spam_setting_that_cannot_work_stops_start_up(
    tmp_path: Path, toml: str, env: dict[str, str], variable: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load(tmp_path, toml, **env)
    assert caught.value.variable == variable
