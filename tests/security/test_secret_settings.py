"""Secrets an operator chooses: a placeholder or a short one stops start-up (one line, exit 2,
the value never printed); the older single WEBHOOK_SECRET still serves each of the three
purposes it used to, and each purpose can have its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from service.errors import SettingsError
from service.settings import Settings

OURS = (
    "ADMIN_TOKEN",
    "WEBHOOK_SECRET",
    "AMOCRM_HOOK_PATH_SECRET",
    "WEBHOOK_HMAC_SECRET",
)
GOOD = "9f2c4e1a7b3d5f60a8c2e4f6b1d3a5c7"  # 32 characters


@pytest.mark.parametrize("variable", OURS)
@pytest.mark.parametrize(
    "value", ["change-me-long-random", "CHANGE-ME", "s3cret", "x" * 40, GOOD[:31]]
)
def test_guessable_admin_or_webhook_secret_stops_start_up(variable: str, value: str) -> None:
    """The manifests once applied ADMIN_TOKEN=change-me-long-random, and any non-empty token
    was accepted: an attacker's first guess opened the admin API."""
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({variable: value})
    assert caught.value.variable == variable and value not in str(caught.value)
    assert Settings.from_env({variable: GOOD}) is not None


def test_placeholder_admin_token_exits_2_with_one_line_and_no_value() -> None:
    env = {k: v for k, v in os.environ.items() if k not in OURS and not k.startswith("CRM")}
    env.update(
        ADMIN_TOKEN="change-me-long-random",
        # never reached: settings are refused before any database is opened
        DATABASE_URL="postgresql://nobody@127.0.0.1:1/none",
    )
    done = subprocess.run(
        [sys.executable, "-m", "service", "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "ADMIN_TOKEN" in lines[0], done.stderr
    assert "change-me-long-random" not in done.stderr


def test_one_leaked_webhook_secret_no_longer_opens_all_three_doors() -> None:
    """The amoCRM path secret travels in URLs (amoCRM's settings, proxies' logs); it was also
    the inbound HMAC key and the outbound signing key. The path and the inbound key now have
    variables of their own; the single WEBHOOK_SECRET is still read as the fallback of each."""
    path, hmac_key = "p" * 31 + "1", "h" * 31 + "2"
    s = Settings.from_env(
        {"AMOCRM_HOOK_PATH_SECRET": path, "WEBHOOK_HMAC_SECRET": hmac_key, "WEBHOOK_SECRET": GOOD}
    ).webhook
    assert (s.hook_path, s.inbound_hmac, s.secret) == (path, hmac_key, GOOD)
    legacy = Settings.from_env({"WEBHOOK_SECRET": GOOD}).webhook
    assert (legacy.hook_path, legacy.inbound_hmac, legacy.secret) == (GOOD,) * 3
