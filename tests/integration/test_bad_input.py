"""Bad input gets the documented answer, never a 5xx, and what was sent is kept."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from tests.conftest import Service, ServiceFactory, status_while_sending

JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SQL = "'; DROP TABLE submissions; --"

# (name, body, headers, expected status, expected ok (None: no JSON check))
CASES: list[tuple[str, bytes, dict[str, str], int, bool | None]] = [
    ("malformed json", b'{"phone": "+77011234567",', JSON, 200, False),
    ("json array", b'[{"phone": "+77011234567"}]', JSON, 200, False),
    ("wrong content type", b"phone=+77011234567", {"Content-Type": "text/csv"}, 200, False),
    ("invalid utf-8", b'{"phone": "+77011234567", "name": "\xff\xfe"}', JSON, 200, False),
    ("deeply nested", b'{"a":' * 5000 + b"1" + b"}" * 5000, JSON, 200, False),
    ("no contact field", b'{"name": "Nobody"}', JSON, 200, False),
    ("invalid phone", b'{"phone": "12345"}', JSON, 200, False),
    ("empty body", b"", JSON, 200, False),
    ("nul in a string", b'{"phone": "+77011234567", "name": "a\\u0000b"}', JSON, 200, None),
    ("a[][][] keys", b"a[][][]=x&a[b]]=y&phone=%2B77011234568", FORM, 200, True),
    (
        "sql-looking strings",
        f'{{"phone": "+77011234569", "name": "{SQL}"}}'.encode(),
        JSON,
        200,
        True,
    ),
    (
        "10 MB body",
        b'{"phone": "+77011234567", "x": "' + b"x" * 10_000_000 + b'"}',
        JSON,
        413,
        False,
    ),
    (
        "100 KB field",
        b'{"phone": "+77011234567", "x": "' + b"y" * 100_000 + b'"}',
        JSON,
        413,
        False,
    ),
]


async def post(svc: Service, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    if len(body) > 1_000_000:
        return await post_raw(svc, body, headers)
    async with svc.http.post(f"{svc.url}/api/v1/forms/landing", data=body, headers=headers) as r:
        try:
            return r.status, await r.json(content_type=None)
        except ValueError:
            return r.status, await r.text()


async def post_raw(svc: Service, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    """A body too large to send whole: the status line the server answers while it comes."""
    return await status_while_sending(svc.url, "/api/v1/forms/landing", body, headers), {
        "ok": False
    }


@pytest.mark.parametrize(
    ("name", "body", "headers", "status", "ok"), CASES, ids=[c[0] for c in CASES]
)
async def test_bad_input_gets_the_documented_answer(
    service_factory: ServiceFactory,
    db: asyncpg.Connection,
    name: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    ok: bool | None,
) -> None:
    svc = await service_factory()
    got_status, answer = await post(svc, body, headers)
    assert got_status == status, (name, answer)
    if ok is not None:
        assert answer["ok"] is ok, (name, answer)
    if answer.get("ok") is False and got_status == 200:
        assert answer["errors"] and all({"field", "message"} <= set(e) for e in answer["errors"])
        # what was sent is kept for inspection
        kept = await db.fetchval("SELECT body FROM rejected ORDER BY received_at DESC LIMIT 1")
        assert kept == body
    if answer.get("ok") is True:
        row = await db.fetchval(
            "SELECT lead::text FROM submissions WHERE id = $1::uuid", answer["id"]
        )
        assert row is not None
        if name == "sql-looking strings":
            assert SQL.replace('"', '\\"') in row or SQL in row
    # the process is healthy afterwards and still takes good submissions
    async with svc.http.get(f"{svc.url}/healthz") as r:
        assert r.status == 200
    s, good = await svc.submit("landing", {"phone": "+77019998877"})
    assert s == 200 and good["ok"] is True
