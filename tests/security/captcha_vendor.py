"""A stand-in for the three CAPTCHA vendors' verification endpoints, on a real port.

It answers as each vendor documents: Turnstile and reCAPTCHA `{"success": …}` (reCAPTCHA v3 with
a `score`), SmartCaptcha `{"status": "ok" | "failed"}`. A token is good when it is in `good`;
`down` makes every answer a 503 (a vendor outage). Every request's form is kept in `seen`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

SECRET = "vendor-secret-key-for-the-tests-0123456789"


@dataclass
class FakeVendor:
    url: str = ""
    good: set[str] = field(default_factory=lambda: {"good-token"})
    down: bool = False
    score: float | None = None  # reCAPTCHA v3 score to answer with
    seen: list[dict[str, str]] = field(default_factory=list)

    async def _form(self, request: web.Request) -> dict[str, str] | None:
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.seen.append(form)
        return None if self.down or form.get("secret") != SECRET else form

    async def siteverify(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        if form is None:
            return web.json_response({"success": False}, status=503 if self.down else 200)
        body: dict[str, Any] = {"success": form.get("response") in self.good}
        if self.score is not None:
            body["score"] = self.score
        return web.json_response(body)

    async def validate(self, request: web.Request) -> web.Response:
        form = await self._form(request)
        if form is None:
            return web.json_response({"status": "failed"}, status=503 if self.down else 200)
        ok = form.get("token") in self.good
        return web.json_response({"status": "ok" if ok else "failed", "message": ""})

    def urls(self) -> dict[str, str]:
        """The settings that point the service at this vendor."""
        return {
            "turnstile_verify_url": f"{self.url}/turnstile/v0/siteverify",
            "recaptcha_verify_url": f"{self.url}/recaptcha/api/siteverify",
            "smartcaptcha_verify_url": f"{self.url}/validate",
        }


@pytest.fixture
async def vendor() -> AsyncIterator[FakeVendor]:
    fake = FakeVendor()
    app = web.Application()
    app.router.add_post("/turnstile/v0/siteverify", fake.siteverify)
    app.router.add_post("/recaptcha/api/siteverify", fake.siteverify)
    app.router.add_post("/validate", fake.validate)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    fake.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield fake
    await runner.cleanup()
