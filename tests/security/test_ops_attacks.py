"""The operator's side as an attacker reads it: the text log, the admin API's parsing, the
internal endpoints on the public port, OAuth tokens at rest. Each test is named for the attack."""

from __future__ import annotations

import asyncio
import io
import logging
import socket
from collections.abc import Iterator

import asyncpg
import pytest
from aiohttp import web
from yarl import URL

from service import logs
from service.db.database import create_pool
from service.db.store import Store, StoredTokens
from service.ops.runtime import RUNTIME
from tests.conftest import Service, ServiceFactory

TOKEN = "admin-token-0123456789abcdef0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
FERNET_KEY = "k0oH3Gv2wqkqS8dXb8Nq0d3M0lNv1pYp6lq2yJc2m7U="  # Fernet.generate_key()


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    """The service's own text log into a buffer (and the root logger restored after)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    buf = io.StringIO()
    logs.setup("INFO", "text", buf)
    yield buf
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


async def test_percent_encoded_crlf_in_the_path_cannot_forge_a_log_line(
    service_factory: ServiceFactory, text_log: io.StringIO
) -> None:
    """The text log wrote the decoded path as it came: `%0D%0A` in it started a line of the
    attacker's choosing (a fake "POST /admin … 200", a fake alert)."""
    svc = await service_factory()
    forged = "%0D%0A2026-12-06%2014:00:00,000%20INFO%20%20%20%20FORGED:%20POST%20/admin%20200"
    url = URL(f"{svc.url}/api/v1/forms/x{forged}%1B[2J", encoded=True)
    async with svc.http.post(url, json={"phone": "+77011234567"}) as r:
        assert r.status < 500
    logging.getLogger().handlers[0].flush()
    lines = text_log.getvalue().splitlines()
    marked = [line for line in lines if "FORGED" in line]
    assert marked, lines
    for line in marked:
        assert "POST /api/v1/forms/x\\r\\n2026" in line and "\x1b" not in line, line


async def _raw_get(svc: Service, path: str, headers: bytes) -> int:
    """One request written byte for byte (aiohttp's client will not send non-UTF-8 headers)."""
    url = URL(svc.url)
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(
            b"GET "
            + path.encode()
            + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + headers
            + b"\r\n"
        )
        await writer.drain()
        status_line = await reader.readline()
        return int(status_line.split()[1])
    finally:
        writer.close()


async def test_non_utf8_authorization_header_is_401_not_500(
    service_factory: ServiceFactory,
) -> None:
    """A bearer token that is not UTF-8 made the constant-time comparison raise: 500, and a
    traceback in the log per request."""
    svc = await service_factory(admin_token=TOKEN)
    for token in (b"\xff\xfe\xfd", b"\xc3\x28", TOKEN.encode() + b"\x80"):
        status = await _raw_get(svc, "/admin/api/jobs", b"Authorization: Bearer " + token + b"\r\n")
        assert status == 401


async def test_superscript_digits_in_admin_numbers_are_400_not_500(
    service_factory: ServiceFactory,
) -> None:
    """`str.isdigit` takes "²" (and "٣"), `int()` refuses it: 500 where a 400 names the field."""
    svc = await service_factory(admin_token=TOKEN)
    for method, path in (
        ("GET", "/admin/api/jobs?limit=%C2%B2"),
        ("GET", "/admin/api/dead-letters?limit=%D9%A3"),
        ("GET", "/admin/api/timeline?minutes=%C2%B2"),
        ("POST", "/admin/api/dead-letters/%C2%B2/replay"),
        ("POST", "/admin/api/dead-letters/%C2%B2/discard"),
    ):
        url = URL(f"{svc.url}{path}", encoded=True)
        async with svc.http.request(method, url, headers=ADMIN) as r:
            assert r.status == 400, (path, r.status, await r.text())
    url = URL(f"{svc.url}/admin/api/locks/people/%C2%B2", encoded=True)
    async with svc.http.delete(url, headers=ADMIN) as r:
        assert r.status < 500


async def test_metrics_health_and_admin_kept_off_the_public_port(
    service_factory: ServiceFactory,
) -> None:
    """/health and /metrics (queue sizes, error texts, CRM state) and the admin API were on the
    port the internet reaches, kept off it only by an Ingress's rules. With OPS_PORT they are
    served there alone; the public port serves forms, webhooks and the bare probes (`/readyz`
    without its reasons)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ops_port = s.getsockname()[1]
    svc = await service_factory(admin_token=TOKEN, ops_port=ops_port)
    await web.TCPSite(svc.runner, "127.0.0.1", ops_port).start()  # as `serve` listens on both
    ops = f"http://127.0.0.1:{ops_port}"
    internal = ("/health", "/metrics", "/admin/", "/admin/api/jobs", "/admin/openapi.json")
    for path in internal:
        async with svc.http.get(f"{svc.url}{path}", headers=ADMIN) as r:
            assert r.status == 404, path
        async with svc.http.get(f"{ops}{path}", headers=ADMIN) as r:
            assert r.status in (200, 503), path
    for base in (svc.url, ops):
        async with svc.http.get(f"{base}/healthz") as r:
            assert r.status == 200
    async with svc.http.post(f"{ops}/api/v1/forms/contact", json={"phone": "1"}) as r:
        assert r.status == 404
    status, _ = await svc.submit("contact", {"phone": "+77011234567"})
    assert status == 200
    # not ready: why (a database error, a host) is said on the internal port alone
    svc.app[RUNTIME].shutting_down = True
    async with svc.http.get(f"{svc.url}/readyz") as r:
        assert (r.status, await r.json()) == (503, {"ready": False})
    async with svc.http.get(f"{ops}/readyz") as r:
        assert (r.status, await r.json()) == (503, {"ready": False, "reasons": ["shutting down"]})
    svc.app[RUNTIME].shutting_down = False


async def test_oauth_tokens_not_readable_from_a_database_dump(
    db_dsn: str, db: asyncpg.Connection
) -> None:
    """The OAuth access and refresh tokens were stored in plain text: a backup or a read-only
    database login was the CRM account. With OAUTH_TOKEN_KEY they are stored encrypted; a pair
    stored before the key was set is rewritten at start-up."""
    from service.db.token_cipher import TokenCipher, TokenKeyError

    pool = await create_pool(db_dsn, min_size=1, max_size=2)
    try:
        await Store(pool).seed_tokens("amocrm", StoredTokens("", "refresh-plain-1", 0))
        sealed = Store(pool, token_cipher=TokenCipher([FERNET_KEY]))
        await sealed.seed_tokens("amocrm", StoredTokens("", "ignored: one is stored", 0))
        await sealed.seed_tokens("bitrix24", StoredTokens("access-b", "refresh-b", 0))

        async def exchange(refresh_token: str) -> StoredTokens:
            assert refresh_token == "refresh-plain-1"
            return StoredTokens("access-new-2", "refresh-new-2", 4_000_000_000)

        assert (await sealed.refresh_tokens("amocrm", "", exchange)).access_token == "access-new-2"
        rows = await db.fetch("SELECT access_token, refresh_token FROM oauth_tokens")
        dump = " ".join(v for r in rows for v in r.values())
        for plain in ("refresh-plain-1", "access-new-2", "refresh-new-2", "access-b", "refresh-b"):
            assert plain not in dump
        assert all(v.startswith("fernet:") for r in rows for v in r.values())
        assert await sealed.tokens("amocrm") == StoredTokens(
            "access-new-2", "refresh-new-2", 4_000_000_000
        )
        with pytest.raises(TokenKeyError, match="OAUTH_TOKEN_KEY"):
            await Store(pool).tokens("amocrm")  # the key is needed: no silent garbage
    finally:
        await pool.close()
