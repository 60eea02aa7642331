"""Everything a full scenario logs, at DEBUG, through the service's own log setup: JSON lines with
request, submission and job ids and an action, and not one phone or email in the clear."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from typing import Any

import asyncpg
import orjson
import pytest

from service import logs
from service.settings import RetryPolicy
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import ServiceFactory, wait_for

# as people type them; the scenario and the scan both use these
PHONES = ["+7 701 234 56 78", "8 (701) 345-67-89", "+77014567890", "87015678901"]
EMAILS = ["Ivan.Petrov@Example.com", "aigerim_k@mail.kz", "dead.letter@example.org"]
BAD_EMAIL = "broken@@example.com"


def variants(phone: str) -> set[str]:
    """How a phone can show up: as typed, as digits, in E.164, URL-encoded."""
    digits = re.sub(r"\D", "", phone)
    e164 = "+7" + digits[1:]
    return {phone, digits, e164, e164[1:], "%2B" + e164[1:], "8" + digits[1:]}


def leaks(text: str) -> list[str]:
    found = [v for p in PHONES for v in variants(p) if v in text]
    lowered = text.lower()
    found += [e for e in [*EMAILS, BAD_EMAIL] if e.lower() in lowered]
    return found


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """The service's own handler (filters, formatter) writing into a buffer, at DEBUG."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    logs.setup("DEBUG", "json", stream=buf)
    yield buf
    root.handlers[:], level = saved
    root.setLevel(level)


async def count(db: asyncpg.Connection, sql: str) -> int:
    n: int = await db.fetchval(sql)
    return n


async def test_full_scenario_logs_no_phone_or_email_unmasked(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
    captured: io.StringIO,
) -> None:
    svc = await service_factory(
        admin_token="t", retry=RetryPolicy(base_s=0.05, max_s=0.2, max_attempts=2)
    )
    for i, phone in enumerate(PHONES[:3]):
        body = {"name": f"Lead {i}", "phone": phone, "email": EMAILS[i % 2]}
        status, answer = await svc.submit("course", body, headers={"X-Request-Id": f"rid-{i}"})
        assert status == 200 and answer["ok"], answer
    await wait_for(lambda: _is(db, "SELECT count(*) = 3 FROM jobs WHERE state = 'done'"))

    simulator[0].config.error_rate = 1.0  # retried, then a dead letter
    await svc.submit("course", {"phone": PHONES[3], "email": EMAILS[2]})
    await wait_for(lambda: _is(db, "SELECT count(*) = 1 FROM jobs WHERE state = 'dead'"))
    simulator[0].config.error_rate = 0.0

    status, answer = await svc.submit("course", {"phone": "+7 000", "email": BAD_EMAIL})
    assert answer["ok"] is False  # bad input, kept and logged
    async with svc.http.get(
        f"{svc.url}/admin/api/submissions",
        params={"phone": PHONES[0]},
        headers={"Authorization": "Bearer t"},
    ) as r:
        assert r.status == 200
    _log_pii_on_purpose()

    lines = [orjson.loads(line) for line in captured.getvalue().splitlines() if line]
    assert len(lines) > 10
    unmasked = [(line, leaks(orjson.dumps(line).decode())) for line in lines]
    assert [u for u in unmasked if u[1]] == []
    _check_structure(lines)


async def _is(db: asyncpg.Connection, sql: str) -> bool:
    return bool(await db.fetchval(sql))


def _log_pii_on_purpose() -> None:
    """Message, args, extras and an exception: all four ways PII reaches a log."""
    log = logging.getLogger("service.scenario")
    log.debug("lead from %s <%s>", PHONES[0], EMAILS[0], extra={"lead": {"phone": PHONES[1]}})
    try:
        raise ValueError(f"CRM refused contact {PHONES[2]} / {EMAILS[1]}")
    except ValueError:
        log.exception("delivery failed", extra={"action": "test_exception"})


def _check_structure(lines: list[dict[str, Any]]) -> None:
    requests = [x for x in lines if x.get("action") == "http_request"]
    assert {"rid-0", "rid-1", "rid-2"} <= {x.get("request_id") for x in requests}
    assert all(x.get("request_id") for x in requests)
    forms = [x for x in requests if x["route"] == "/api/v1/forms/{form}" and x["status"] == 200]
    assert sum("submission_id" in x for x in forms) >= 4
    delivered = [x for x in lines if x.get("action") == "job_success"]
    assert len(delivered) >= 3 and all("job_id" in x and "submission_id" in x for x in delivered)
    assert any(x.get("action") == "job_dead" for x in lines)
    [exc] = [x for x in lines if x.get("action") == "test_exception"]
    assert "ValueError" in exc["exception"] and "+7******7890" in exc["exception"], exc
    assert "i***@mail.kz" in exc["exception"] or "a***@mail.kz" in exc["exception"]
    [pii] = [x for x in lines if x["logger"] == "service.scenario" and x["level"] == "DEBUG"]
    assert pii["message"] == "lead from +7******5678 <I***@Example.com>"
    assert pii["lead"] == {"phone": "+7******6789"}


def test_text_format_masks_too() -> None:
    buf = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("DEBUG", "text", stream=buf)
        log = logging.getLogger("service.scenario")
        try:
            raise RuntimeError(f"no answer for {EMAILS[0]}")
        except RuntimeError:
            log.exception("call %s", PHONES[3], extra={"email": EMAILS[1], "action": "x"})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    text = buf.getvalue()
    assert leaks(text) == [], text
    assert (
        "call +7******8901" in text and "email=a***@mail.kz" in text and "I***@Example.com" in text
    )
