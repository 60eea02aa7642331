"""The dashboard end to end in headless Chromium (Debian's `chromium` package), driven over the
Chrome DevTools Protocol: sign in with the token, see every panel (the now figures with the CRM
rate gate, the chart with its axes, today by form, the latest submissions with CRM links, dead
letters, spam, rejected input, webhook events in and forwards out), replay a dead letter, release
spam, look a lead up; the screenshot is saved beside the test's other files (DASHBOARD_SHOT=path
saves it there too: docs/dashboard.png comes from this test)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import asyncpg
import pytest
from aiohttp import web

from service.ops.runtime import RUNTIME
from service.settings import FormRule, RetryPolicy, SpamRule
from service.simulators.amocrm.server import AmoCrmSimulator
from tests.conftest import ServiceFactory, wait_for

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "dash-token"
HOOK_SECRET = "dash-hook-secret"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
    "--window-size=1280,1600",
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


@pytest.fixture
async def downstream() -> AsyncIterator[str]:
    """Where forwarded webhook events go: answers 200 to everything."""

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", ok)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}/hook?token=downstream-secret"
    await runner.cleanup()


def _amo_status(lead_id: int) -> bytes:
    """An amoCRM "lead changed status" webhook body, as amoCRM sends it (form-encoded)."""
    p = "leads[status][0]"
    fields = {"id": lead_id, "status_id": 142, "old_status_id": 10001, "pipeline_id": 1000}
    fields |= {"updated_at": 1_700_000_100, "last_modified": 1_700_000_100}
    body = {f"{p}[{k}]": str(v) for k, v in fields.items()}
    body |= {"account[subdomain]": "example", "account[id]": "29085955"}
    return urlencode(body).encode()


async def test_dashboard_panels_replay_release_and_lookup(
    service_factory: ServiceFactory,
    simulator: tuple[AmoCrmSimulator, str],
    db: asyncpg.Connection,
    browser: Cdp,
    downstream: str,
    tmp_path: Path,
) -> None:
    sim, sim_url = simulator
    svc = await service_factory(
        admin_token=TOKEN,
        retry=RetryPolicy(base_s=0.05, max_s=0.5, max_attempts=1),
        forms={"promo": FormRule(spam=SpamRule(honeypot="website"))},
        webhook_secret=HOOK_SECRET,
        webhook_forward_url=downstream,
    )
    await svc.submit("course", {"name": "Айгерим", "phone": "+7 701 123 45 67"})
    await wait_for(lambda: _is(db, "SELECT count(*) = 1 FROM jobs WHERE state = 'done'"))
    sim.config.error_rate = 1.0
    await svc.submit("webinar", {"name": "Dead", "phone": "+7 701 999 88 77"})
    await wait_for(lambda: _is(db, "SELECT count(*) = 1 FROM jobs WHERE state = 'dead'"))
    sim.config.error_rate = 0.0
    # spam (a bot filled the honeypot), bad input, a webhook event in that is forwarded out
    await svc.submit("promo", {"name": "Bot", "phone": "+7 701 555 00 11", "website": "x"})
    _, answered = await svc.submit("course", {"name": "No contact"})
    assert answered["ok"] is False  # answered 200 (form senders show it), kept in `rejected`
    await wait_for(lambda: _is(db, "SELECT count(*) = 1 FROM rejected"))
    lead_id = await db.fetchval("SELECT crm_lead_id FROM submissions WHERE form = 'course'")
    async with svc.http.post(
        f"{svc.url}/webhooks/amocrm/{HOOK_SECRET}",
        data=_amo_status(lead_id),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    ) as r:
        assert r.status == 200, await r.text()
    await wait_for(
        lambda: _is(
            db, "SELECT count(*) = 1 FROM forward_jobs WHERE state = 'done' AND kind = 'forward'"
        )
    )

    await browser.send("Page.navigate", url=f"{svc.url}/admin/")
    await browser.until("document.readyState === 'complete' && !!document.getElementById('token')")
    assert await browser.js("getComputedStyle(document.getElementById('app')).display") == "none"
    await browser.js(
        f"document.getElementById('token').value = '{TOKEN}';"
        "document.getElementById('signin').click(); true"
    )
    # every panel read below has loaded (each fills on its own answer; a loaded machine lets
    # some come later than others)
    await browser.until(
        "document.querySelectorAll('#dead-rows tr').length === 1"
        " && document.querySelectorAll('#forwards-rows tr').length === 1"
        " && document.querySelectorAll('#rejected-rows tr').length === 1"
        " && document.querySelectorAll('#events-rows tr').length === 1"
        " && document.querySelectorAll('#spam-rows tr').length === 1"
        " && document.querySelectorAll('#latest-rows tr').length === 2"
        " && document.querySelectorAll('#forms-rows tr').length === 3"
        " && document.getElementById('crm-limit').textContent !== '–'"
    )
    assert await browser.js("sessionStorage.getItem('crm-relay-admin-token')") == TOKEN
    assert await browser.js("document.getElementById('stat-dead').textContent") == "1"
    assert await browser.js("document.getElementById('stat-done').textContent") == "1"

    # now: CRM calls per second against the limit, the 429 pause, the circuit
    text = await _texts(browser, "#crm-rate, #crm-limit, #crm-pause, #stat-circuit")
    assert text[1] == "150" and float(text[0]) >= 0 and text[2] == "none" and text[3] == "closed"

    # the chart: one point per minute, both axes labelled
    points = await browser.js(
        "document.querySelector('#chart polyline.series-queued').getAttribute('points')"
    )
    assert len(points.split()) == 60  # one point per minute of the last hour
    x_labels = await _texts(browser, "#chart .axis-x text")
    y_labels = await _texts(browser, "#chart .axis-y text")
    assert len(x_labels) >= 5 and "now" in x_labels and any(":" in t for t in x_labels)
    assert "0" in y_labels and "jobs" in y_labels

    # today by form: received, delivered, pending, dead, spam
    forms = {row[0]: row[1:] for row in await _rows(browser, "#forms-rows")}
    assert forms["course"] == ["1", "1", "0", "0", "0"]
    assert forms["webinar"] == ["1", "0", "0", "1", "0"]
    assert forms["promo"] == ["0", "0", "0", "0", "1"]

    # the latest submissions, the delivered one linked to its amoCRM lead
    latest = await _rows(browser, "#latest-rows")
    assert [r[1] for r in latest] == ["webinar", "course"]
    assert latest[1][3] == "delivered" and latest[0][3] == "dead"
    href = await browser.js(
        "document.querySelector('#latest-rows a.crm-lead, #latest-rows .crm-lead a').href"
    )
    assert href == f"{sim_url}/leads/detail/{lead_id}"

    # rejected input with the reason; webhook events in and forwards out with their state
    rejected = await _rows(browser, "#rejected-rows")
    assert len(rejected) == 1 and rejected[0][1] == "forms/course" and "phone" in rejected[0][2]
    events = await _rows(browser, "#events-rows")
    assert len(events) == 1 and events[0][1] == "amocrm" and events[0][3] == str(lead_id)
    assert events[0][5] == "done"
    href = await browser.js("document.querySelector('#events-rows a').href")
    assert href == f"{sim_url}/leads/detail/{lead_id}"
    forwards = await _rows(browser, "#forwards-rows")
    assert forwards[0][3] == "done" and "downstream-secret" not in forwards[0][2]

    await _screenshot(browser, tmp_path)  # every panel with data, before the actions

    row = await browser.js("document.querySelector('#dead-rows tr').textContent")
    assert "webinar" in row and "CrmRetryable" in row
    await browser.js("document.querySelector('#dead-rows button.replay').click(); true")
    await browser.until("document.querySelectorAll('#dead-rows tr').length === 0")
    await wait_for(lambda: _is(db, "SELECT count(*) = 2 FROM jobs WHERE state = 'done'"))

    # spam with its reason, released from the page: delivered once as a normal lead
    spam = await _rows(browser, "#spam-rows")
    assert len(spam) == 1 and spam[0][1:3] == ["promo", "honeypot"] and "Bot" in spam[0][3]
    await browser.js("document.querySelector('#spam-rows button.release').click(); true")
    await browser.until("document.querySelectorAll('#spam-rows button.release').length === 0")
    assert (await _rows(browser, "#spam-rows"))[0][4] == "released"
    await wait_for(lambda: _is(db, "SELECT count(*) = 3 FROM jobs WHERE state = 'done'"))
    await browser.until("document.querySelectorAll('#latest-rows tr').length === 3")

    await browser.js(
        "document.getElementById('lookup-q').value = '8 701 123-45-67';"
        "document.getElementById('lookup-form').requestSubmit(); true"
    )
    await browser.until("document.querySelectorAll('#lookup-rows tr').length === 1")
    found = await browser.js("document.querySelector('#lookup-rows tr').textContent")
    assert "Айгерим" in found and "delivered" in found and "course" in found

    # the CRM blocked us and answered 429: the now panel says so at its next refresh
    gate = svc.app[RUNTIME].gate
    assert gate is not None
    gate.pause(3.0)  # short: the worker's shutdown waits for it
    gate.open_circuit("account blocked (403)", 60.0)
    await browser.js("refresh().then(() => true)")
    circuit = [(await _texts(browser, f"#{i}"))[0] for i in ("stat-circuit", "crm-circuit-reason")]
    circuit += await _texts(browser, "#crm-pause")
    assert circuit[0] == "OPEN" and circuit[1].startswith("account blocked (403), probe in")
    assert circuit[2].endswith(" s") and float(circuit[2].split()[0]) > 0
    gate.close_circuit()

    errors = [
        e
        for e in browser.events
        if e.get("method") == "Runtime.exceptionThrown"
        or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] == "error")
        or "Content Security Policy" in str(e.get("params", {}).get("entry", {}).get("text"))
    ]
    assert errors == []  # no script error, no blocked inline script (CSP nonce works)


async def _screenshot(browser: Cdp, tmp_path: Path) -> None:
    """The whole page (the viewport grown to its height) into the test's directory, and to
    DASHBOARD_SHOT when set (docs/dashboard.png is made so)."""
    await browser.send(
        "Emulation.setDeviceMetricsOverride",
        width=1280,
        height=await browser.js("document.body.scrollHeight"),
        deviceScaleFactor=1,
        mobile=False,
    )
    shot = await browser.send("Page.captureScreenshot", format="png")
    png = base64.b64decode(shot["data"])
    (tmp_path / "dashboard.png").write_bytes(png)
    if target := os.environ.get("DASHBOARD_SHOT"):
        Path(target).write_bytes(png)
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


async def _texts(browser: Cdp, selector: str) -> list[str]:
    texts: list[str] = await browser.js(
        f"[...document.querySelectorAll({selector!r})].map((e) => e.textContent)"
    )
    return texts


async def _rows(browser: Cdp, body: str) -> list[list[str]]:
    rows: list[list[str]] = await browser.js(
        f"[...document.querySelectorAll('{body} tr')]"
        ".map((tr) => [...tr.cells].map((td) => td.textContent))"
    )
    return rows


async def _is(db: asyncpg.Connection, sql: str) -> bool:
    return bool(await db.fetchval(sql))
