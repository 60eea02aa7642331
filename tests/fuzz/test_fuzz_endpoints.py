"""Fuzzing every intake endpoint of the real app with hypothesis: bodies, headers, content types.

For each endpoint (the form handler and, where registered, the three webhook handlers) hypothesis
builds requests: leads that are almost right, nested urlencoded keys, multipart, arbitrary JSON,
raw bytes under random content types and encodings, wrong and right secrets and signatures. Each
one goes over real HTTP to the app on a real port (real PostgreSQL behind it). Every answer must:

- never be a 5xx, and no log record at ERROR or above may appear (an unhandled exception in a
  handler is logged by aiohttp at ERROR);
- if it accepted something (`ok: true` with an id): that id is in the database (`submissions`
  for forms, `webhook_events` for webhooks) — at once, or, when the write went to the spool
  (`spooled`, or a repeat answered from the window meanwhile), once the spool is drained;
- for a form, if it refused the input (`ok: false`, HTTP 200): what was sent was kept (`rejected`).

Bodies include floods of distinct field names (hundreds to ~1,800 names, up to the size limit) and
NUL in keys and values. After each endpoint's run the service must still answer `/readyz`.

~300 examples per endpoint in CI (derandomized: the same examples every run); `FUZZ_LONG=1` runs
10,000 per endpoint (40,000 bodies over the four routes) with fresh randomness; `FUZZ_EXAMPLES=N`
sets the number per endpoint.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.app import Roles
from service.webhooks.events import sign
from tests.conftest import Service, ServiceFactory, status_while_sending

FUZZ_LONG = os.environ.get("FUZZ_LONG") == "1"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES") or (10_000 if FUZZ_LONG else 300))
SECRET = "fuzz-secret"
B24_TOKEN = "fuzz-b24-token"
PREFIXES = ("701", "702", "705", "707", "747", "771", "775", "777", "778")
REQUEST_TIMEOUT_S = 30.0
SPOOL_DRAIN_WAIT_S = 15.0  # the spool is drained every second once the database answers


@dataclass(frozen=True)
class Sent:
    """One request: what hypothesis shows when it reports a failing example."""

    path: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


# ---- building blocks -------------------------------------------------------------------------

printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
header_value = st.text(printable, max_size=60).map(str.strip)
any_text = st.text(max_size=30)  # any code point but surrogates: NUL, RTL marks, emoji …
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | any_text
    | st.sampled_from(["", " ", "null", "0", "-1", "1e999", "'; DROP TABLE submissions; --"])
)


def _containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # a named function, not a lambda: Hypothesis reads a lambda's source to check that it uses
    # its argument, and misreads this one (a deprecation warning, an error under -W error)
    return st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4)


json_values = st.recursive(scalars, _containers, max_leaves=12)
valid_phone = st.builds(
    lambda p, n: f"+7{p}{n:07d}", st.sampled_from(PREFIXES), st.integers(0, 9_999_999)
)
phone_like = st.one_of(
    valid_phone,
    valid_phone.map(lambda p: f"8 {p[2:5]} {p[5:8]}-{p[8:10]}-{p[10:]}"),
    st.sampled_from(["+1 202 555 0143", "+70000000000", "12345", "+", "８７０１１２３４５６７"]),
    st.from_regex(r"[+]?[0-9 ()-]{0,18}", fullmatch=True),
    st.integers(),
    any_text,
    st.lists(valid_phone, max_size=2),
)
email_like = st.one_of(st.emails(), any_text, st.just(" A@Example.KZ "), st.just("a@b"))
lead_fields = st.fixed_dictionaries(
    {},
    optional={
        "phone": phone_like,
        "email": email_like,
        "name": any_text,
        "Phone": phone_like,
        "tel": phone_like,
        "contact": st.fixed_dictionaries({}, optional={"tel": phone_like, "email": email_like}),
        "utm_source": any_text,
        "utm": st.dictionaries(st.sampled_from(["source", "medium", "x"]), json_values, max_size=3),
        "comment": json_values,
    },
)
leads = st.builds(
    lambda fields, extra: {**extra, **fields},
    lead_fields,
    st.dictionaries(any_text, json_values, max_size=3),
)


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """{"a": {"b": [1]}} → [("a[b][0]", "1")]: how PHP-style forms nest keys."""
    if isinstance(value, dict):
        out: list[tuple[str, str]] = []
        for k, v in value.items():
            out += flatten(v, f"{prefix}[{k}]" if prefix else str(k))
        return out
    if isinstance(value, list):
        return [pair for i, v in enumerate(value) for pair in flatten(v, f"{prefix}[{i}]")]
    return [(prefix, "" if value is None else str(value))]


def urlencoded(pairs: list[tuple[str, str]]) -> bytes:
    return urllib.parse.urlencode(pairs).encode()


def multipart(pairs: list[tuple[str, str]], boundary: str, file_part: bool) -> bytes:
    parts = []
    for name, value in pairs:
        safe = name.replace('"', "").replace("\r", "").replace("\n", "")
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{safe}"\r\n\r\n{value}\r\n'
        )
    if file_part:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="photo"; filename="a.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n\xff\xd8\xff\r\n"
        )
    return ("".join(parts) + f"--{boundary}--\r\n").encode("utf-8", "surrogatepass")


JSON_TYPES = ["application/json", "application/json; charset=utf-8", "APPLICATION/JSON",
              "application/json; charset=latin-1", "text/plain",
              "application/vnd.api+json"]  # fmt: skip
FORM_TYPES = ["application/x-www-form-urlencoded",
              "application/x-www-form-urlencoded; charset=utf-8",
              "application/x-www-form-urlencoded; charset=windows-1251"]  # fmt: skip
ODD_TYPES = ["", "text/csv", "application/xml", "multipart/form-data", "image/png", ";;;",
             "application/json; charset=nonsense", "multipart/form-data; boundary="]  # fmt: skip


@st.composite
def bodies(draw: st.DrawFn, structured: st.SearchStrategy[Any]) -> tuple[bytes, str | None]:
    """(body, Content-Type): a structured value encoded some way, or bytes under any type."""
    value = draw(structured)
    kind = draw(
        st.sampled_from(["json", "json", "form", "form", "multipart", "raw", "big", "wide"])
    )
    if kind == "wide":  # a flood of field names no other body uses (memory: nothing may stay)
        seed, n = draw(st.integers(0, 2**32)), draw(st.integers(100, 1800))
        wide = {f"f{seed:x}_{i}_\x00": "v" for i in range(n)}
        if isinstance(value, dict):
            wide.update(value)
        return json.dumps(wide).encode("utf-8", "surrogatepass"), "application/json"
    if kind == "json":
        text = json.dumps(value, ensure_ascii=draw(st.booleans()))
        return text.encode("utf-8", "surrogatepass"), draw(st.sampled_from(JSON_TYPES))
    pairs = flatten(value) if isinstance(value, dict | list) else [("value", str(value))]
    if kind == "form":
        return urlencoded(pairs), draw(st.sampled_from(FORM_TYPES))
    if kind == "multipart":
        boundary = draw(st.from_regex(r"[A-Za-z0-9]{1,30}", fullmatch=True))
        body = multipart(pairs, boundary, draw(st.booleans()))
        return body, f"multipart/form-data; boundary={boundary}"
    if kind == "big":
        return b'{"phone": "+77011234567", "x": "' + b"y" * 70_000 + b'"}', "application/json"
    content_type = draw(
        st.one_of(st.sampled_from(JSON_TYPES + FORM_TYPES + ODD_TYPES), header_value)
    )
    return draw(st.binary(max_size=600)), content_type or None


@st.composite
def headers(draw: st.DrawFn, content_type: str | None, body: bytes) -> tuple[bytes, dict[str, str]]:
    """Content-Type plus some of: Idempotency-Key, Content-Encoding (identity, gzip with a real
    gzip body, or one the body is not encoded in)."""
    h: dict[str, str] = {}
    if content_type is not None and draw(st.integers(0, 9)) > 0:
        h["Content-Type"] = content_type
    if draw(st.booleans()):
        h["Idempotency-Key"] = draw(header_value)
    encoding = draw(st.sampled_from([None] * 6 + ["identity", "gzip-real", "gzip", "br", "xx"]))
    if encoding == "gzip-real":
        body, encoding = gzip.compress(body), "gzip"
    if encoding:
        h["Content-Encoding"] = encoding
    if draw(st.integers(0, 9)) == 0:
        h["X-Forwarded-For"] = draw(header_value)
    return body, h


def _quoted(segment: str) -> str:
    return urllib.parse.quote(segment, safe="")


def path_segment(good: str) -> st.SearchStrategy[str]:
    """Mostly the right value; sometimes anything, NUL included (URL-quoted so it stays one
    segment)."""
    other = st.text(max_size=20).map(_quoted)
    return st.one_of(st.just(good), st.just(good), st.just(good), other)


@st.composite
def form_requests(draw: st.DrawFn) -> Sent:
    form = draw(st.one_of(st.sampled_from(["course", "landing", "a.b-c_1"]), path_segment("fuzz")))
    body, ctype = draw(bodies(st.one_of(leads, leads, json_values)))
    body, h = draw(headers(ctype, body))
    return Sent(f"/api/v1/forms/{form}", body, h)


amo_leads = st.fixed_dictionaries(
    {"id": st.one_of(st.integers(0, 10**12), any_text)},
    optional={
        "status_id": st.one_of(st.integers(), any_text),
        "pipeline_id": st.integers(),
        "old_status_id": st.integers(),
        "name": any_text,
        "custom_fields": json_values,
    },
)
amo_bodies = st.one_of(
    st.builds(
        lambda kind, items, acc: {"leads": {kind: items}, "account": acc},
        st.sampled_from(["status", "add", "update", "delete", "note", "weird"]),
        st.lists(amo_leads, max_size=4),
        st.fixed_dictionaries({}, optional={"id": st.integers(), "subdomain": any_text}),
    ),
    json_values,
)


@st.composite
def amocrm_requests(draw: st.DrawFn) -> Sent:
    secret = draw(path_segment(SECRET))
    body, ctype = draw(bodies(amo_bodies))
    body, h = draw(headers(ctype, body))
    return Sent(f"/webhooks/amocrm/{secret}", body, h)


b24_bodies = st.builds(
    lambda event, data, ts, token, extra: {
        **extra,
        "event": event,
        "data": data,
        "ts": ts,
        "auth": {"application_token": token, "domain": "x.bitrix24.ru"},
    },
    st.one_of(st.sampled_from(["ONCRMDEALUPDATE", "ONCRMLEADADD", "ONCRMDEALDELETE"]), any_text),
    st.one_of(
        st.fixed_dictionaries({"FIELDS": st.fixed_dictionaries({"ID": scalars})}), json_values
    ),
    st.one_of(st.integers(0, 2**40), any_text),
    st.one_of(st.just(B24_TOKEN), st.just(B24_TOKEN), st.just(B24_TOKEN), any_text),
    st.dictionaries(any_text, json_values, max_size=2),
)


@st.composite
def bitrix24_requests(draw: st.DrawFn) -> Sent:
    body, ctype = draw(bodies(st.one_of(b24_bodies, b24_bodies, json_values)))
    body, h = draw(headers(ctype, body))
    return Sent("/webhooks/bitrix24", body, h)


@st.composite
def generic_requests(draw: st.DrawFn) -> Sent:
    source = draw(st.one_of(st.sampled_from(["site", "qstash", "stripe-like"]), path_segment("x")))
    body, ctype = draw(bodies(st.one_of(json_values, leads)))
    body, h = draw(headers(ctype, body))
    signature = draw(st.sampled_from(["valid", "valid", "valid", "bare", "wrong", "none"]))
    raw_for_signature = body  # the signature covers the bytes on the wire
    if signature in ("valid", "bare"):
        value = sign(SECRET, raw_for_signature)
        h["X-Relay-Signature"] = value if signature == "valid" else value[7:]
    elif signature == "wrong":
        h["X-Relay-Signature"] = draw(header_value)
    if draw(st.booleans()):
        h["Upstash-Message-Id"] = draw(header_value)
    return Sent(f"/webhooks/generic/{source}", body, h)


@dataclass(frozen=True)
class Endpoint:
    name: str
    route: str  # the route as registered, to skip endpoints that are not there
    requests: Callable[[], st.SearchStrategy[Sent]]
    table: str  # where an accepted id must be


ENDPOINTS = [
    Endpoint("forms", "/api/v1/forms/{form}", form_requests, "submissions"),
    Endpoint("amocrm", "/webhooks/amocrm/{secret}", amocrm_requests, "webhook_events"),
    Endpoint("bitrix24", "/webhooks/bitrix24", bitrix24_requests, "webhook_events"),
    Endpoint("generic", "/webhooks/generic/{source}", generic_requests, "webhook_events"),
]


# ---- one exchange ----------------------------------------------------------------------------


class Checker:
    """Sends one request and checks the answer, on the service's event loop."""

    def __init__(
        self, svc: Service, db: asyncpg.Connection, endpoint: Endpoint, caplog: Any
    ) -> None:
        self.svc, self.db, self.endpoint, self.caplog = svc, db, endpoint, caplog
        self.statuses: dict[int, int] = {}
        self.accepted = 0
        self.refused = 0  # a 4xx, or a form's 200 with `ok: false`

    async def _send(self, sent: Sent) -> tuple[int, bytes]:
        """The status and body of the server's answer. A body it refuses may be answered before
        it is all sent, and the connection then closed under the client: the status is the one
        on the server's status line (read as the body goes, if the client could not read it),
        never assumed — a dropped connection fails."""
        try:
            async with self.svc.http.post(
                self.svc.url + sent.path,
                data=sent.body,
                headers=sent.headers,
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                skip_auto_headers=["Content-Type"],
            ) as r:
                status = r.status
                try:
                    return status, await r.read()
                except aiohttp.ClientPayloadError:
                    assert status != 200, "an accepted request's answer was cut off"
                    return status, b""  # closed after the head of a refusal
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            # closed while the body was still going out: ask again, reading the status line
            status = await status_while_sending(self.svc.url, sent.path, sent.body, sent.headers)
            assert status != 200, "the connection of a request the server accepts was dropped"
            return status, b""

    async def exchange(self, sent: Sent) -> None:
        errors_before = self._errors()
        rejected_before = await self.db.fetchval("SELECT count(*) FROM rejected")
        status, raw = await self._send(sent)
        self.statuses[status] = self.statuses.get(status, 0) + 1
        assert status < 500, (status, raw[:500])
        new_errors = self._errors()[len(errors_before) :]
        assert not new_errors, [f"{r.name}: {r.getMessage()}" for r in new_errors]
        if status != 200:
            self.refused += 1
            return
        answer = json.loads(raw)
        self.refused += answer.get("ok") is False  # bad input is answered 200 and kept
        if answer.get("ok") is True and answer.get("id"):
            await self._eventually_stored(answer)
            self.accepted += 1
        if self.endpoint.name == "forms" and answer.get("ok") is False:
            kept = await self.db.fetchval("SELECT count(*) FROM rejected")
            assert kept == rejected_before + 1, answer

    async def _eventually_stored(self, answer: dict[str, Any]) -> None:
        """The id is in the database now, or once the spool is drained (a write slower than the
        intake's timeout goes to the spool, and a repeat of it is answered from the window)."""
        query = f"SELECT count(*) FROM {self.endpoint.table} WHERE id = $1::uuid"
        deadline = asyncio.get_running_loop().time() + SPOOL_DRAIN_WAIT_S
        while await self.db.fetchval(query, answer["id"]) != 1:
            assert asyncio.get_running_loop().time() < deadline, (answer, self.endpoint.table)
            await asyncio.sleep(0.1)

    def _errors(self) -> list[logging.LogRecord]:
        return [r for r in self.caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.timeout(7200 if FUZZ_LONG else 120)
@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[e.name for e in ENDPOINTS])
async def test_fuzz_endpoint_never_5xx_never_loses_what_it_accepted(
    endpoint: Endpoint,
    service_factory: ServiceFactory,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc = await service_factory(
        Roles(http=True, worker=False), webhook_secret=SECRET, bitrix24_app_token=B24_TOKEN
    )
    routes = {r.resource.canonical for r in svc.app.router.routes() if r.resource is not None}
    if endpoint.route not in routes:
        pytest.fail(f"{endpoint.route} is not registered: the endpoint under test is missing")
    caplog.set_level(logging.WARNING)
    checker = Checker(svc, db, endpoint, caplog)
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=not FUZZ_LONG,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(sent=endpoint.requests())
    def fuzz(sent: Sent) -> None:
        # hypothesis drives from this thread; the app and the client live on the test's loop
        asyncio.run_coroutine_threadsafe(checker.exchange(sent), loop).result(
            REQUEST_TIMEOUT_S + 10
        )

    await asyncio.to_thread(fuzz)
    print(f"\n{endpoint.name}: statuses {checker.statuses}, accepted {checker.accepted}")
    async with svc.http.get(f"{svc.url}/readyz") as r:
        assert r.status == 200, await r.text()  # still healthy after all of it
    # the strategies reach both sides: something was accepted, something was refused
    assert checker.accepted > 0, checker.statuses
    assert checker.refused > 0, checker.statuses


UNDECODABLE = [("gzip", b"{}"), ("deflate", b"not deflate"), ("br", b"{}")]


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=[e.name for e in ENDPOINTS])
async def test_undecodable_content_encoding(
    endpoint: Endpoint,
    service_factory: ServiceFactory,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    svc = await service_factory(
        Roles(http=True, worker=False), webhook_secret=SECRET, bitrix24_app_token=B24_TOKEN
    )
    caplog.set_level(logging.WARNING)
    checker = Checker(svc, db, endpoint, caplog)
    path = endpoint.route.replace("{form}", "fuzz").replace("{secret}", SECRET)
    path = path.replace("{source}", "site")
    for encoding, body in UNDECODABLE:
        headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
        headers["X-Relay-Signature"] = sign(SECRET, body)
        await checker.exchange(Sent(path, body, headers))


async def test_nul_in_the_form_name(
    service_factory: ServiceFactory, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    svc = await service_factory(Roles(http=True, worker=False))
    caplog.set_level(logging.WARNING)
    checker = Checker(svc, db, ENDPOINTS[0], caplog)
    await checker.exchange(Sent("/api/v1/forms/%00", b'{"phone": "+77011234567"}', {}))
