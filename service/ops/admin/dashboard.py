"""`GET /admin/`: the operators' page, server-rendered, no front-end build.

The page itself holds no data: it asks for the admin token, keeps it in sessionStorage (gone
when the tab closes) and calls the JSON admin API with it. Everything shown is put in the page
with `textContent`, never as HTML, because lead fields and CRM errors are other people's text;
the Content-Security-Policy only lets this response's own nonce-tagged script and style run.
"""

from __future__ import annotations

import secrets

from aiohttp import web

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>crm-relay admin</title>
<style nonce="{nonce}">
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2733; background: #f5f7fa; }}
header {{ background: #1d2733; color: #fff; padding: 10px 20px; display: flex; gap: 24px;
  align-items: baseline; }}
header h1 {{ font-size: 18px; margin: 0; }}
main {{ padding: 16px 20px; display: grid; gap: 16px; max-width: 1100px; }}
section {{ background: #fff; border-radius: 6px; padding: 12px 16px;
  box-shadow: 0 1px 2px #0002; }}
h2 {{ font-size: 15px; margin: 0 0 8px; }}
table {{ border-collapse: collapse; width: 100%; }}
td, th {{ text-align: left; padding: 4px 8px; border-bottom: 1px solid #e3e7ee;
  vertical-align: top; }}
.stats {{ display: flex; gap: 20px; flex-wrap: wrap; }}
.stat b {{ display: block; font-size: 20px; }}
.bad {{ color: #b3261e; }} .muted {{ color: #6b7785; }}
.hidden {{ display: none; }}
#chart {{ width: 100%; height: 180px; }}
button {{ cursor: pointer; }}
</style></head>
<body>
<header><h1>crm-relay</h1><span id="version" class="muted"></span>
<span id="message" role="status"></span></header>
<main>
<section id="login">
  <h2>Admin token</h2>
  <form id="login-form"><input id="token" type="password" autocomplete="off" size="40"
    placeholder="ADMIN_TOKEN"> <button id="signin" type="submit">Sign in</button></form>
</section>
<div id="app" class="hidden">
<section><h2>Now</h2><div class="stats">
  <div class="stat">pending<b id="stat-pending">–</b></div>
  <div class="stat">due<b id="stat-due">–</b></div>
  <div class="stat">running<b id="stat-running">–</b></div>
  <div class="stat">delivered<b id="stat-done">–</b></div>
  <div class="stat">dead letters<b id="stat-dead">–</b></div>
  <div class="stat">delivery<b id="stat-delivery">–</b></div>
  <div class="stat">CRM circuit<b id="stat-circuit">–</b></div>
</div>
<p><button id="pause">Pause delivery</button> <button id="resume">Resume delivery</button>
<button id="signout">Sign out</button></p></section>
<section><h2>Last hour: queue depth <span class="muted">(blue)</span> and deliveries per minute
<span class="muted">(green)</span> <span id="chart-max" class="muted"></span></h2>
<svg id="chart" viewBox="0 0 600 180" preserveAspectRatio="none" role="img"
aria-label="queue depth and delivery rate"></svg></section>
<section><h2>Dead letters</h2>
<table><thead><tr><th>job</th><th>form</th><th>died</th><th>attempts</th><th>last error</th>
<th></th></tr></thead><tbody id="dead-rows"></tbody></table>
<p id="dead-empty" class="muted">none</p></section>
<section><h2>Lead lookup</h2>
<form id="lookup-form"><input id="lookup-q" size="30" placeholder="phone or email">
<button id="lookup" type="submit">Find</button></form>
<table><thead><tr><th>received</th><th>form</th><th>name</th><th>state</th><th>job</th>
<th>attempts</th><th>CRM contact / lead</th><th>last error</th></tr></thead>
<tbody id="lookup-rows"></tbody></table></section>
</div></main>
<script nonce="{nonce}">
"use strict";
const KEY = "crm-relay-admin-token";
const $ = (id) => document.getElementById(id);
let timer = null;

function say(text, bad) {{
  $("message").textContent = text; $("message").className = bad ? "bad" : "";
}}
function showApp(on) {{
  $("login").classList.toggle("hidden", on); $("app").classList.toggle("hidden", !on);
}}
async function api(path, method) {{
  const r = await fetch("/admin/api/" + path, {{method: method || "GET",
    headers: {{"Authorization": "Bearer " + sessionStorage.getItem(KEY)}}}});
  if (r.status === 401) {{ signOut("wrong token"); throw new Error("unauthorized"); }}
  const body = await r.json();
  if (!body.ok) throw new Error(body.error || JSON.stringify(body.errors));
  return body;
}}
function cell(row, text) {{ const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text); row.appendChild(td); return td; }}
function when(iso) {{ return iso ? new Date(iso).toLocaleString() : ""; }}

async function refresh() {{
  try {{
    const [o, t, d] = await Promise.all([api("overview"), api("timeline?minutes=60"),
                                         api("dead-letters?limit=100")]);
    renderOverview(o); renderChart(t.points); renderDead(d.dead_letters);
  }} catch (e) {{ say(e.message, true); }}
}}
function renderOverview(o) {{
  $("version").textContent = "v" + o.version;
  const q = o.queue || {{}};
  for (const k of ["pending", "due", "running", "done"]) $("stat-" + k).textContent = q[k] ?? "–";
  $("stat-dead").textContent = o.dead_letters;
  $("stat-delivery").textContent = !o.delivery.worker ? "no worker" :
    o.delivery.paused ? "paused" : "running";
  $("stat-circuit").textContent = o.circuit && o.circuit.open ? "OPEN" : "closed";
}}
function line(points, key, color, top) {{
  const n = Math.max(points.length - 1, 1);
  const pts = points.map((p, i) => (i * 600 / n).toFixed(1) + "," +
    (170 - 160 * p[key] / top).toFixed(1)).join(" ");
  const el = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  el.setAttribute("points", pts); el.setAttribute("fill", "none");
  el.setAttribute("stroke", color); el.setAttribute("stroke-width", "2");
  el.setAttribute("class", "series-" + key); return el;
}}
function renderChart(points) {{
  const svg = $("chart"); svg.replaceChildren();
  const top = Math.max(1, ...points.map((p) => Math.max(p.queued, p.delivered)));
  svg.appendChild(line(points, "queued", "#2f6fdb", top));
  svg.appendChild(line(points, "delivered", "#2e9d4f", top));
  $("chart-max").textContent = "scale: 0–" + top;
}}
function renderDead(items) {{
  const body = $("dead-rows"); body.replaceChildren();
  $("dead-empty").classList.toggle("hidden", items.length > 0);
  for (const d of items) {{
    const tr = document.createElement("tr"); tr.dataset.jobId = d.id;
    cell(tr, d.id); cell(tr, d.form); cell(tr, when(d.died_at)); cell(tr, d.attempts);
    cell(tr, d.last_error);
    const b = document.createElement("button"); b.textContent = "Replay"; b.className = "replay";
    b.addEventListener("click", () => replay(d.id, b));
    cell(tr, "").appendChild(b); body.appendChild(tr);
  }}
}}
async function replay(id, button) {{
  button.disabled = true;
  try {{ await api("dead-letters/" + id + "/replay", "POST"); say("job " + id + " replayed");
  }} catch (e) {{ say(e.message, true); }}
  refresh();
}}
async function lookup(ev) {{
  ev.preventDefault();
  const q = $("lookup-q").value.trim(); if (!q) return;
  const param = q.includes("@") ? "email" : "phone";
  try {{
    const r = await api("submissions?" + param + "=" + encodeURIComponent(q));
    const body = $("lookup-rows"); body.replaceChildren();
    for (const s of r.submissions) {{
      const tr = document.createElement("tr"); tr.dataset.submissionId = s.id;
      cell(tr, when(s.received_at)); cell(tr, s.form); cell(tr, s.lead && s.lead.name);
      cell(tr, s.discarded ? "discarded" : s.state); cell(tr, s.job_state); cell(tr, s.attempts);
      cell(tr, (s.crm_contact_id ?? "–") + " / " + (s.crm_lead_id ?? "–"));
      cell(tr, s.last_error); body.appendChild(tr);
    }}
    say(r.submissions.length + " submission(s) found");
  }} catch (e) {{ say(e.message, true); }}
}}
async function setPaused(on) {{
  try {{ await api("delivery/" + (on ? "pause" : "resume"), "POST");
    say(on ? "delivery paused" : "delivery resumed"); }} catch (e) {{ say(e.message, true); }}
  refresh();
}}
function start() {{
  showApp(true); refresh(); clearInterval(timer); timer = setInterval(refresh, 10000);
}}
function signOut(why) {{
  sessionStorage.removeItem(KEY); clearInterval(timer); showApp(false); say(why || "", !!why);
}}
$("login-form").addEventListener("submit", (ev) => {{
  ev.preventDefault(); sessionStorage.setItem(KEY, $("token").value.trim());
  $("token").value = ""; start();
}});
$("lookup-form").addEventListener("submit", lookup);
$("pause").addEventListener("click", () => setPaused(true));
$("resume").addEventListener("click", () => setPaused(false));
$("signout").addEventListener("click", () => signOut(""));
if (sessionStorage.getItem(KEY)) start();
</script></body></html>
"""


async def dashboard(request: web.Request) -> web.Response:
    """The page; its script and style run only with this response's nonce."""
    nonce = secrets.token_urlsafe(16)
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    )
    return web.Response(
        text=PAGE.format(nonce=nonce),
        content_type="text/html",
        headers={
            "Content-Security-Policy": csp,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )
