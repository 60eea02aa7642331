"""Settings: defaults, validation, and the one-line refusal at start-up."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from service.errors import SettingsError
from service.settings import CrmSettings, Settings
from tests.overrides import override


def test_defaults_use_embedded_database_and_simulator() -> None:
    s = Settings.from_env({})
    assert s.database.url is None and s.crm.kind == "simulator"
    assert s.http.port == 8080 and s.crm.timeout_s == 30 and s.intake.idempotency_window_s == 300


def test_the_slices_defaults_are_the_environments() -> None:
    """`Settings()` (what tests and tools start from) is what an empty environment gives."""
    assert Settings() == Settings.from_env({})


def test_each_part_gets_its_slice_from_the_variables_it_reads() -> None:
    s = Settings.from_env(
        {
            "WORKER_BATCH": "7",
            "RETRY_MAX_ATTEMPTS": "3",
            "WEBHOOK_SECRET": "w" * 31 + "x",
            "BITRIX24_APP_TOKEN": "b",
            "ALERT_LAG_S": "5",
            "ADMIN_TOKEN": "a" * 31 + "x",
            "MAX_BODY_BYTES": "2048",
            "WEBHOOK_MAX_BODY_BYTES": "4096",
            "LOG_LEVEL": "debug",
            "REDIS_URL": "redis://r",
            "AMOCRM_BASE_URL": "https://x.amocrm.ru",
            "AMOCRM_ACCESS_TOKEN": "t",
            "AMOCRM_DEDUP": "search",
        }
    )
    assert (s.delivery.worker_batch, s.delivery.retry.max_attempts) == (7, 3)
    assert (s.webhook.secret, s.webhook.bitrix24_app_token) == ("w" * 31 + "x", "b")
    assert (s.alert.lag_s, s.admin.token, s.log.level) == (5.0, "a" * 31 + "x", "DEBUG")
    assert (s.intake.max_body_bytes, s.webhook.max_body_bytes) == (2048, 4096)
    assert s.cluster.redis_url == "redis://r"
    assert (s.crm.amocrm.base_url, s.crm.amocrm.dedup) == ("https://x.amocrm.ru", "search")


def test_tests_override_settings_by_flat_name() -> None:
    """tests/overrides.py: a field by its own name or with its slice in front; a whole slice."""
    s = override(Settings(), lease_s=1.5, webhook_secret="s")
    s = override(s, amocrm_dedup="trust", crm_kind="amocrm")
    assert (s.delivery.lease_s, s.webhook.secret) == (1.5, "s")
    assert (s.crm.amocrm.dedup, s.crm.kind) == ("trust", "amocrm")
    assert override(s, crm=CrmSettings()).crm == CrmSettings()
    with pytest.raises(TypeError, match=r"intake\.max_body_bytes, webhook\.max_body_bytes"):
        override(s, max_body_bytes=1)
    with pytest.raises(TypeError, match="CrmSettings"):
        override(s, crm="bitrix24")
    with pytest.raises(TypeError, match="no setting"):
        override(s, lease=1)


def test_crm_defaults_follow_the_configured_crm() -> None:
    amo = Settings.from_env({"AMOCRM_BASE_URL": "https://x.amocrm.ru", "AMOCRM_ACCESS_TOKEN": "t"})
    assert amo.crm.kind == "amocrm" and amo.crm.rate_limit == 6
    b24 = Settings.from_env({"BITRIX24_WEBHOOK_URL": "https://p.bitrix24.kz/rest/1/s/"})
    assert b24.crm.kind == "bitrix24" and b24.crm.rate_limit == 2


B24_OAUTH = {
    "BITRIX24_PORTAL_URL": "https://p.bitrix24.kz/rest/",
    "BITRIX24_CLIENT_ID": "local.abc",
    "BITRIX24_CLIENT_SECRET": "secret",
    "BITRIX24_REFRESH_TOKEN": "refresh",
}


def test_bitrix24_oauth_set_is_enough_and_the_token_server_has_a_default() -> None:
    s = Settings.from_env(B24_OAUTH)
    assert s.crm.kind == "bitrix24" and s.crm.rate_limit == 2 and s.crm.bitrix24.webhook_url is None
    assert s.crm.bitrix24.oauth_url == "https://oauth.bitrix.info/oauth/token/"
    both = Settings.from_env(
        B24_OAUTH | {"BITRIX24_WEBHOOK_URL": "https://p.bitrix24.kz/rest/1/s/"}
    )
    assert both.crm.bitrix24.portal_url == "https://p.bitrix24.kz/rest/"  # OAuth is used (app.py)


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"CRM_RATE_LIMIT": "0"}, "CRM_RATE_LIMIT"),
        ({"CRM": "salesforce"}, "CRM"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL"),
        ({"DATABASE_DIRECT_URL": "postgresql://db:5432/relay"}, "DATABASE_DIRECT_URL"),
        (
            {"DATABASE_URL": "postgresql://p:6543/r", "DATABASE_DIRECT_URL": "http://db/relay"},
            "DATABASE_DIRECT_URL",
        ),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"DEFAULT_PHONE_REGION": "XX"}, "DEFAULT_PHONE_REGION"),
        ({"CRM": "amocrm"}, "AMOCRM_BASE_URL"),
        ({"CRM": "amocrm", "AMOCRM_BASE_URL": "https://x.amocrm.ru"}, "AMOCRM_ACCESS_TOKEN"),
        (  # the refresh sends the redirect URI: amoCRM refuses one without it
            {
                "AMOCRM_BASE_URL": "https://x.amocrm.ru",
                "AMOCRM_CLIENT_ID": "id",
                "AMOCRM_CLIENT_SECRET": "secret",
                "AMOCRM_REFRESH_TOKEN": "refresh",
            },
            "AMOCRM_REDIRECT_URI",
        ),
        ({"CRM_RELAY_CONFIG": "/nonexistent.toml"}, "CRM_RELAY_CONFIG"),
        ({"CRM": "bitrix24"}, "BITRIX24_WEBHOOK_URL"),
        ({"BITRIX24_PORTAL_URL": "https://p.bitrix24.kz/rest/"}, "BITRIX24_CLIENT_ID"),
        (B24_OAUTH | {"BITRIX24_REFRESH_TOKEN": ""}, "BITRIX24_REFRESH_TOKEN"),
        (
            B24_OAUTH | {"BITRIX24_PORTAL_URL": "https://p.bitrix24.kz/rest/1/s/"},
            "BITRIX24_PORTAL_URL",
        ),
        (B24_OAUTH | {"BITRIX24_PORTAL_URL": "p.bitrix24.kz"}, "BITRIX24_PORTAL_URL"),
        (B24_OAUTH | {"BITRIX24_OAUTH_URL": "ftp://oauth.bitrix.info/"}, "BITRIX24_OAUTH_URL"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as exc:
        Settings.from_env(env)
    assert exc.value.variable == variable
    assert str(exc.value).startswith(f"{variable}: expected ")


def test_config_file_sets_form_rules(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[amocrm]\npipeline_id = 1000\n\n[forms.course]\nstatus_id = 10001\ntags = ["course"]\n'
        "fields = { utm_source = 501 }\n"
    )
    s = Settings.from_env({"CRM_RELAY_CONFIG": str(path)})
    rule = s.leads.form_rule("course")
    assert (rule.pipeline_id, rule.status_id, rule.tags) == (1000, 10001, ("course",))
    assert rule.field_map == {"utm_source": 501}
    assert s.leads.form_rule("other").pipeline_id == 1000


def test_config_file_with_wrong_types_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[forms.course]\npipeline_id = "main"\n')
    with pytest.raises(SettingsError, match=r"forms\.course\.pipeline_id"):
        Settings.from_env({"CRM_RELAY_CONFIG": str(path)})


BITRIX24 = {"CRM": "bitrix24", "BITRIX24_WEBHOOK_URL": "https://p.example/rest/1/s/"}


def test_bitrix24_rules_take_a_category_and_a_string_stage(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        '[bitrix24]\nstage_id = "PREPARATION"\n\n'
        '[forms.course]\ncategory_id = 1\nstage_id = "C1:UC_PAID"\n'
    )
    env = {**BITRIX24, "CRM_RELAY_CONFIG": str(path), "BITRIX24_CATEGORY_ID": "0"}
    s = Settings.from_env(env)
    course, other = s.leads.form_rule("course"), s.leads.form_rule("other")
    assert (course.category_id, course.stage_id) == (1, "C1:UC_PAID")
    assert (other.category_id, other.stage_id) == (0, "PREPARATION")
    assert [where for where, _ in s.leads.configured()] == ["default", "forms.course"]


@pytest.mark.parametrize(
    ("env", "toml", "variable"),
    [
        (BITRIX24, "[forms.course]\nstage_id = 5\n", "CRM_RELAY_CONFIG"),  # not a string
        (BITRIX24, "[forms.course]\nstatus_id = 5\n", "CRM_RELAY_CONFIG forms.course.status_id"),
        ({**BITRIX24, "AMOCRM_PIPELINE_ID": "10"}, "", "AMOCRM_PIPELINE_ID"),
        ({}, '[forms.course]\nstage_id = "NEW"\n', "CRM_RELAY_CONFIG forms.course.stage_id"),
        ({"BITRIX24_CATEGORY_ID": "1"}, "", "BITRIX24_CATEGORY_ID"),
    ],
    ids=[
        "integer-stage",
        "amocrm-key-on-bitrix24",
        "amocrm-env-on-bitrix24",
        "stage-on-amocrm",
        "category-on-amocrm",
    ],
)
def test_each_crm_takes_its_own_lead_fields(
    tmp_path: Path, env: dict[str, str], toml: str, variable: str
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    with pytest.raises(SettingsError) as exc:
        Settings.from_env({**env, "CRM_RELAY_CONFIG": str(path)})
    assert exc.value.variable == variable, exc.value


def test_a_start_up_check_refusal_exits_like_a_bad_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A pipeline or stage the CRM does not have is found while the app starts (not while the
    environment is read): the same one line and exit code 2."""
    from service import cli

    def refused(*_: object) -> int:
        raise SettingsError("BITRIX24_STAGE_ID", "a stage of deal category 0 (NEW), got 'X'")

    monkeypatch.setattr(cli, "serve", refused)
    monkeypatch.setenv("DATABASE_URL", "postgresql://nowhere/x")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "crm-relay: bad setting BITRIX24_STAGE_ID: expected a stage of deal category"
        " 0 (NEW), got 'X'"
    ]


def test_start_up_refuses_a_bad_value_in_one_line_with_exit_code_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env={"PORT": "eighty", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    expected = "crm-relay: bad setting PORT: expected an integer from 0 to 65535, got 'eighty'"
    assert lines == [expected]


def test_forward_signing_secret_in_the_standard_webhooks_form() -> None:
    key = bytes(range(32))
    padded = "whsec_" + base64.b64encode(key).decode()
    for raw in (padded, padded.rstrip("=")):
        assert Settings.from_env({"FORWARD_SIGNING_SECRET": raw}).webhook.forward_key == key
    w = "w" + "0123456789abcdef" * 2  # a WEBHOOK_SECRET start-up accepts (32+ characters)
    plain = Settings.from_env({"FORWARD_SIGNING_SECRET": "not-base64", "WEBHOOK_SECRET": w})
    assert plain.webhook.forward_key == b"not-base64"
    assert Settings.from_env({"WEBHOOK_SECRET": w}).webhook.forward_key == w.encode()
    assert Settings.from_env({}).webhook.forward_key is None
    for bad in ("whsec_", "whsec_***"):
        with pytest.raises(SettingsError, match="FORWARD_SIGNING_SECRET"):
            Settings.from_env({"FORWARD_SIGNING_SECRET": bad})
