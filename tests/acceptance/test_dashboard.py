"""The dashboard end to end in headless Chromium (Debian's `chromium` package), driven over the
Chrome DevTools Protocol: sign in with the token, see the queue chart and a dead letter, replay
it, look a lead up; the screenshot is saved beside the test's other files."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from service.settings import RetryPolicy
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import ServiceFactory, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "dash-token"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
    "--window-size=1280,1100",
]


class Cdp:
    """The least of a DevTools client: commands by id, events kept for inspection."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[dict[str, Any]] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = msg.json()
            if "id" in data and data["id"] in self.waiting:
                self.waiting.pop(data["id"]).set_result(data)
            else:
                self.events.append(data)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.waiting[self.next_id] = fut
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        reply = await asyncio.wait_for(fut, 15)
        assert "error" not in reply, reply
        result: dict[str, Any] = reply["result"]
        return result

    async def js(self, expression: str) -> Any:
        result = await self.send(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def until(self, expression: str, timeout: float = 15) -> None:
        async def true() -> bool:
            return bool(await self.js(expression))

        await wait_for(true, timeout=timeout, every=0.1)


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[Cdp]:
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: scripts/test installs it (apt-get install chromium)")
    profile = tmp_path / "chromium-profile"
    with open(tmp_path / "chromium.log", "wb") as errlog:
        proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=errlog,
        )
    try:
        port = await _devtools_port(profile, proc)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
                targets = await r.json()
            page = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                cdp = Cdp(ws)
                await cdp.send("Runtime.enable")
                await cdp.send("Page.enable")
                await cdp.send("Log.enable")
                yield cdp
                cdp.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await cdp.reader
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _devtools_port(profile: Path, proc: subprocess.Popen[bytes]) -> int:
    marker = profile / "DevToolsActivePort"
    for _ in range(300):
        assert proc.poll() is None, f"chromium exited with {proc.returncode}"
        if marker.exists() and (lines := marker.read_text().splitlines()):
            return int(lines[0])
        await asyncio.sleep(0.1)
    raise AssertionError("chromium did not open its DevTools port")


async def test_dashboard_sign_in_chart_replay_and_lookup(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
    browser: Cdp,
    tmp_path: Path,
) -> None:
    sim = simulator[0]
    svc = await service_factory(
        admin_token=TOKEN, retry=RetryPolicy(base_s=0.05, max_s=0.5, max_attempts=1)
    )
    await svc.submit("course", {"name": "Айгерим", "phone": "+7 701 123 45 67"})
    await wait_for(lambda: _is(db, "SELECT count(*) = 1 FROM jobs WHERE state = 'done'"))
    sim.config.error_rate = 1.0
    await svc.submit("webinar", {"name": "Dead", "phone": "+7 701 999 88 77"})
    await wait_for(lambda: _is(db, "SELECT count(*) = 1 FROM jobs WHERE state = 'dead'"))
    sim.config.error_rate = 0.0

    await browser.send("Page.navigate", url=f"{svc.url}/admin/")
    await browser.until("document.readyState === 'complete' && !!document.getElementById('token')")
    assert await browser.js("getComputedStyle(document.getElementById('app')).display") == "none"
    await browser.js(
        f"document.getElementById('token').value = '{TOKEN}';"
        "document.getElementById('signin').click(); true"
    )
    await browser.until("document.querySelectorAll('#dead-rows tr').length === 1")
    assert await browser.js("sessionStorage.getItem('crm-relay-admin-token')") == TOKEN
    assert await browser.js("document.getElementById('stat-dead').textContent") == "1"
    assert await browser.js("document.getElementById('stat-done').textContent") == "1"
    points = await browser.js(
        "document.querySelector('#chart polyline.series-queued').getAttribute('points')"
    )
    assert len(points.split()) == 60  # one point per minute of the last hour
    row = await browser.js("document.querySelector('#dead-rows tr').textContent")
    assert "webinar" in row and "CrmRetryable" in row

    await browser.js("document.querySelector('#dead-rows button.replay').click(); true")
    await browser.until("document.querySelectorAll('#dead-rows tr').length === 0")
    await wait_for(lambda: _is(db, "SELECT count(*) = 2 FROM jobs WHERE state = 'done'"))

    await browser.js(
        "document.getElementById('lookup-q').value = '8 701 123-45-67';"
        "document.getElementById('lookup-form').requestSubmit(); true"
    )
    await browser.until("document.querySelectorAll('#lookup-rows tr').length === 1")
    found = await browser.js("document.querySelector('#lookup-rows tr').textContent")
    assert "Айгерим" in found and "delivered" in found and "course" in found

    shot = await browser.send("Page.captureScreenshot", format="png")
    png = base64.b64decode(shot["data"])
    (tmp_path / "dashboard.png").write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    errors = [
        e
        for e in browser.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or "Content Security Policy" in str(e.get("params", {}).get("entry", {}).get("text"))
    ]
    assert errors == []  # no script error, no blocked inline script (CSP nonce works)


async def _is(db: asyncpg.Connection, sql: str) -> bool:
    return bool(await db.fetchval(sql))
