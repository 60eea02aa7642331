"""Spam controls over real HTTP: what a bot sends is kept as spam, answered like a real lead,
and never reaches the CRM (the amoCRM simulator); what a person sends still does."""

from __future__ import annotations

import time
import uuid
from typing import Any

import asyncpg
import pytest

from service.settings import FormRule, SpamRule
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import Service, ServiceFactory, wait_for
from tests.integration.test_metrics import scrape, value
from tests.security.captcha_vendor import SECRET, FakeVendor, vendor

__all__ = ["vendor"]  # the fixture, used by name


def forms(**spam: Any) -> dict[str, FormRule]:
    return {"course": FormRule(spam=SpamRule(**spam))}


def person(i: int, **extra: Any) -> dict[str, Any]:
    return {"name": f"Person {i}", "phone": f"+7701444{i:04d}", **extra}


async def spam_rows(db: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await db.fetch("SELECT reason, lead->>'phone' AS phone FROM spam ORDER BY received_at")
    return [(r["reason"], r["phone"]) for r in rows]


async def submissions(db: asyncpg.Connection) -> int:
    n: int = await db.fetchval("SELECT count(*) FROM submissions")
    return n


def same_shape(body: dict[str, Any]) -> None:
    """The answer a real lead gets: a bot cannot tell it was caught."""
    assert body.keys() == {"ok", "id", "duplicate"} and body["ok"] is True, body
    assert body["duplicate"] is False


async def delivered(sim: AmoCrmSimulator, n: int) -> None:
    async def done() -> bool:
        return len(sim.store.leads) >= n

    await wait_for(done)


async def test_bot_filling_the_honeypot_never_reaches_the_crm(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
) -> None:
    sim, _ = simulator
    svc = await service_factory(forms=forms(honeypot="website"))
    status, body = await svc.submit("course", person(1, website="http://spam.example"))
    assert status == 200
    same_shape(body)
    status, body = await svc.submit("course", person(2, website=""))
    assert status == 200 and body["ok"]
    await delivered(sim, 1)
    assert await spam_rows(db) == [("honeypot", "+77014440001")]
    assert await submissions(db) == 1
    # counted by reason for the dashboards (every reason there from the start, at 0)
    m = await scrape(svc)
    assert value(m, "crm_relay_spam_total", reason="honeypot") == 1
    assert value(m, "crm_relay_spam_total", reason="too_fast") == 0
    stored = await db.fetchval("SELECT lead FROM submissions")
    assert "website" not in stored, "the control field is not the person's data"
    assert [lead.name for lead in sim.store.leads.values()] != [] and len(sim.store.leads) == 1


async def test_bot_submitting_faster_than_a_person_is_kept_as_spam(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory(forms=forms(min_fill_s=3))
    now_ms = time.time() * 1000
    cases = [
        person(1, _rendered_at=now_ms),  # rendered and sent in the same instant
        person(2),  # no render time: the page's script never ran
        person(3, _rendered_at=now_ms - 60_000, _submitted_at=now_ms - 59_000),  # 1 s on its clock
        person(4, _rendered_at=now_ms - 10_000),  # 10 s: a person
        person(5, _rendered_at=now_ms + 3_600_000, _submitted_at=now_ms + 3_610_000),  # clock off
        person(6, _rendered_at=str(int(now_ms / 1000) - 30)),  # seconds, as text
    ]
    for data in cases:
        status, body = await svc.submit("course", data)
        assert status == 200
        same_shape(body)
    assert sorted(await spam_rows(db)) == [
        ("no_render_time", "+77014440002"),
        ("too_fast", "+77014440001"),
        ("too_fast", "+77014440003"),
    ]
    assert await submissions(db) == 3
    leads = await db.fetch("SELECT lead FROM submissions")
    assert not any("_rendered_at" in r["lead"] or "_submitted_at" in r["lead"] for r in leads)


@pytest.mark.parametrize(
    ("vendor_name", "field"),
    [
        ("turnstile", "cf-turnstile-response"),
        ("recaptcha", "g-recaptcha-response"),
        ("smartcaptcha", "smart-token"),
    ],
)
async def test_bot_without_a_valid_captcha_token_is_kept_as_spam(
    service_factory: ServiceFactory,
    db: asyncpg.Connection,
    vendor: FakeVendor,
    vendor_name: str,
    field: str,
) -> None:
    svc = await service_factory(
        forms=forms(captcha=vendor_name, captcha_secret=SECRET), **vendor.urls()
    )
    for data in (
        person(1, **{field: "good-token"}),
        person(2, **{field: "forged-token"}),
        person(3),
    ):
        status, body = await svc.submit("course", data)
        assert status == 200
        same_shape(body)
    assert sorted(await spam_rows(db)) == [
        ("captcha_failed", "+77014440002"),
        ("captcha_missing", "+77014440003"),
    ]
    assert await submissions(db) == 1
    token_name = "token" if vendor_name == "smartcaptcha" else "response"
    assert [s[token_name] for s in vendor.seen] == ["good-token", "forged-token"]
    assert all(s["secret"] == SECRET for s in vendor.seen)
    stored = await db.fetchval("SELECT lead FROM submissions")
    assert field not in stored


async def test_captcha_vendor_outage_neither_loses_a_lead_nor_lets_it_pass_unseen(
    service_factory: ServiceFactory, db: asyncpg.Connection, vendor: FakeVendor
) -> None:
    """Default `captcha_outage = "accept"`: accepted; `"spam"`: kept for review."""
    vendor.down = True
    token = {"cf-turnstile-response": "good-token"}
    accept = await service_factory(
        forms=forms(captcha="turnstile", captcha_secret=SECRET), **vendor.urls()
    )
    status, body = await accept.submit("course", person(1, **token))
    assert status == 200 and body["ok"]
    review = await service_factory(
        forms=forms(captcha="turnstile", captcha_secret=SECRET, captcha_outage="spam"),
        **vendor.urls(),
    )
    status, body = await review.submit("course", person(2, **token))
    assert status == 200
    same_shape(body)
    assert await spam_rows(db) == [("captcha_unavailable", "+77014440002")]
    assert await submissions(db) == 1


async def test_bot_with_a_low_recaptcha_score_is_kept_as_spam(
    service_factory: ServiceFactory, db: asyncpg.Connection, vendor: FakeVendor
) -> None:
    vendor.score = 0.1
    svc = await service_factory(
        forms=forms(captcha="recaptcha", captcha_secret=SECRET, captcha_min_score=0.5),
        **vendor.urls(),
    )
    await svc.submit("course", person(1, **{"g-recaptcha-response": "good-token"}))
    assert await spam_rows(db) == [("captcha_failed", "+77014440001")]


async def flood(svc: Service, n: int, forwarded: list[str] | None = None) -> None:
    for i in range(n):
        headers = {"X-Forwarded-For": forwarded[i]} if forwarded else None
        status, body = await svc.submit("course", person(i), headers=headers)
        assert status == 200
        same_shape(body)


async def test_one_client_flooding_a_form_is_rate_limited_and_spoofing_the_header_does_not_help(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory(forms=forms(client_rate=3))
    # a bot rotating X-Forwarded-For from outside: not a trusted proxy, so the peer counts
    await flood(svc, 5, forwarded=[f"203.0.113.{i}" for i in range(5)])
    assert await submissions(db) == 3
    assert [r for r, _ in await spam_rows(db)] == ["rate_limited"] * 2


async def test_clients_behind_a_trusted_proxy_are_counted_apart(
    service_factory: ServiceFactory, db: asyncpg.Connection
) -> None:
    svc = await service_factory(forms=forms(client_rate=2), trusted_proxies=("127.0.0.0/8",))
    # the proxy (our peer, 127.0.0.1) appends each client's address to what the client sent
    await flood(svc, 4, forwarded=[f"10.9.9.9, 198.51.100.{i % 2}" for i in range(4)])
    assert await submissions(db) == 4  # two clients, two each
    await flood(svc, 1, forwarded=["198.51.100.0"])
    assert await spam_rows(db) == [("rate_limited", "+77014440000")]
    client = await db.fetchval("SELECT client FROM spam")
    assert client == "198.51.100.0"


async def test_caught_submission_during_a_database_stall_is_spooled_not_lost_nor_late(
    service_factory: ServiceFactory, db: asyncpg.Connection, db_dsn: str
) -> None:
    """It may be a real person: kept like a lead is, in the spool while the database stalls
    (answered within the write timeout), in the spam table once it answers again."""
    svc = await service_factory(forms=forms(honeypot="website"), db_write_timeout_s=0.5)
    blocker = await asyncpg.connect(db_dsn)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE spam IN ACCESS EXCLUSIVE MODE")
        started = time.monotonic()
        status, body = await svc.submit("course", person(1, website="x"))
        assert time.monotonic() - started < 2.0
        assert status == 200 and body["ok"] and body.get("spooled") is True, body
        await tx.rollback()
    finally:
        await blocker.close()

    async def kept() -> bool:
        return await spam_rows(db) == [("honeypot", "+77014440001")]

    await wait_for(kept)
    assert await db.fetchval("SELECT id FROM spam") == uuid.UUID(body["id"])
