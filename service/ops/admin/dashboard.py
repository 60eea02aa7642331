"""`GET /admin/`: the operators' page, server-rendered, no front-end build.

The page itself holds no data: it asks for the admin token, keeps it in sessionStorage (gone
when the tab closes) and calls the JSON admin API with it. Everything shown is put in the page
with `textContent`, never as HTML, because lead fields and CRM errors are other people's text;
a CRM link becomes an `<a>` only when it is http(s). The Content-Security-Policy only lets this
response's own nonce-tagged script and style run (element styles set from the script, through
the CSSOM, are not inline styles and need no exception).

Panels, each from its own admin API route (a failing one does not blank the others): now
(queue, delivery, CRM calls per second against the limit, the 429 pause, the circuit), the last
hour, per-form counts for today, the latest submissions with their CRM links, dead letters,
spam (with "Release"), rejected input, webhook events in, forwards out, and a lead lookup.
"""

from __future__ import annotations

import secrets

from aiohttp import web

NONCE = "{nonce}"

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>crm-relay admin</title>
<style nonce="{nonce}">
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #1d2733; background: #f5f7fa; }
header { background: #1d2733; color: #fff; padding: 10px 20px; display: flex; gap: 24px;
  align-items: baseline; }
header h1 { font-size: 18px; margin: 0; }
main { padding: 16px 20px; max-width: 1240px; }
#app { display: grid; gap: 16px; grid-template-columns: 1fr 1fr; }
#app > .wide { grid-column: 1 / -1; }
section { background: #fff; border-radius: 6px; padding: 12px 16px;
  box-shadow: 0 1px 2px #0002; min-width: 0; overflow-x: auto; }
h2 { font-size: 15px; margin: 0 0 8px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
td, th { text-align: left; padding: 3px 6px; border-bottom: 1px solid #e3e7ee;
  vertical-align: top; }
td.num, th.num { text-align: right; }
.stats { display: flex; gap: 20px; flex-wrap: wrap; }
.stat b { display: block; font-size: 20px; }
.bad { color: #b3261e; } .muted { color: #6b7785; } .ok { color: #2e7d32; }
.hidden { display: none !important; }
.clip { max-width: 260px; overflow-wrap: anywhere; }
#chart { width: 100%; height: auto; display: block; }
#chart text { font-size: 11px; fill: #6b7785; }
#chart line { stroke: #e3e7ee; }
#chart line.axis { stroke: #6b7785; }
meter { width: 120px; }
button { cursor: pointer; }
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
<section class="wide"><h2>Now</h2><div class="stats">
  <div class="stat">pending<b id="stat-pending">–</b></div>
  <div class="stat">due<b id="stat-due">–</b></div>
  <div class="stat">running<b id="stat-running">–</b></div>
  <div class="stat">delivered<b id="stat-done">–</b></div>
  <div class="stat">dead letters<b id="stat-dead">–</b></div>
  <div class="stat">delivery<b id="stat-delivery">–</b></div>
  <div class="stat">CRM calls/s <span class="muted">(last 10 s, this process)</span>
    <b><span id="crm-rate">–</span> / <span id="crm-limit">–</span></b>
    <meter id="crm-meter" min="0" max="1" value="0"></meter></div>
  <div class="stat">CRM pause (429)<b id="crm-pause">–</b></div>
  <div class="stat">CRM circuit<b id="stat-circuit">–</b>
    <span id="crm-circuit-reason" class="muted"></span></div>
</div>
<p><button id="pause">Pause delivery</button> <button id="resume">Resume delivery</button>
<button id="signout">Sign out</button></p></section>
<section><h2>Last hour: queue depth <span class="muted">(blue)</span> and deliveries per minute
<span class="muted">(green)</span></h2>
<svg id="chart" viewBox="0 0 640 210" role="img"
aria-label="queue depth and deliveries per minute over the last hour"></svg></section>
<section><h2>Today by form <span id="forms-since" class="muted"></span></h2>
<table><thead><tr><th>form</th><th class="num">received</th><th class="num">delivered</th>
<th class="num">pending</th><th class="num">dead</th><th class="num">spam</th></tr></thead>
<tbody id="forms-rows"></tbody></table>
<p id="forms-empty" class="muted">no submissions today</p></section>
<section class="wide"><h2>Latest submissions</h2>
<table><thead><tr><th>received</th><th>form</th><th>name</th><th>state</th><th>job</th>
<th class="num">attempts</th><th>CRM lead</th><th>last error</th></tr></thead>
<tbody id="latest-rows"></tbody></table>
<p id="latest-empty" class="muted">none yet</p></section>
<section class="wide"><h2>Dead letters</h2>
<table><thead><tr><th>job</th><th>form</th><th>died</th><th>attempts</th><th>last error</th>
<th></th></tr></thead><tbody id="dead-rows"></tbody></table>
<p id="dead-empty" class="muted">none</p></section>
<section><h2>Spam caught</h2>
<table><thead><tr><th>received</th><th>form</th><th>reason</th><th>who</th><th></th></tr>
</thead><tbody id="spam-rows"></tbody></table>
<p id="spam-empty" class="muted">none</p></section>
<section><h2>Rejected input</h2>
<table><thead><tr><th>received</th><th>endpoint</th><th>why</th><th>body</th></tr></thead>
<tbody id="rejected-rows"></tbody></table>
<p id="rejected-empty" class="muted">none</p></section>
<section><h2>Webhook events in</h2>
<table><thead><tr><th>received</th><th>source</th><th>kind</th><th>entity</th><th>outcome</th>
<th>forwards</th></tr></thead><tbody id="events-rows"></tbody></table>
<p id="events-empty" class="muted">none</p></section>
<section><h2>Forwards out</h2>
<table><thead><tr><th>changed</th><th>event</th><th>destination</th><th>state</th>
<th class="num">attempts</th><th>last error</th></tr></thead>
<tbody id="forwards-rows"></tbody></table>
<p id="forwards-empty" class="muted">none</p></section>
<section class="wide"><h2>Lead lookup</h2>
<form id="lookup-form"><input id="lookup-q" size="30" placeholder="phone or email">
<button id="lookup" type="submit">Find</button></form>
<table><thead><tr><th>received</th><th>form</th><th>name</th><th>state</th><th>job</th>
<th>attempts</th><th>CRM contact / lead</th><th>last error</th></tr></thead>
<tbody id="lookup-rows"></tbody></table></section>
</div></main>
<script nonce="{nonce}">
"use strict";
const KEY = "crm-relay-admin-token";
const SVG = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);
let timer = null;

function say(text, bad) {
  $("message").textContent = text; $("message").className = bad ? "bad" : "";
}
function showApp(on) {
  $("login").classList.toggle("hidden", on); $("app").classList.toggle("hidden", !on);
}
async function api(path, method) {
  const r = await fetch("/admin/api/" + path, {method: method || "GET",
    headers: {"Authorization": "Bearer " + sessionStorage.getItem(KEY)}});
  if (r.status === 401) { signOut("wrong token"); throw new Error("unauthorized"); }
  const body = await r.json();
  if (!body.ok) throw new Error(body.error || JSON.stringify(body.errors));
  return body;
}
function cell(row, text, cls) { const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text); if (cls) td.className = cls;
  row.appendChild(td); return td; }
function when(iso) { return iso ? new Date(iso).toLocaleString() : ""; }
function clip(text, n) { text = text == null ? "" : String(text);
  return text.length > n ? text.slice(0, n) + "…" : text; }
function link(td, url, text) {
  if (typeof url === "string" && /^https?:\\/\\//.test(url)) {
    const a = document.createElement("a"); a.href = url; a.textContent = text;
    a.target = "_blank"; a.rel = "noopener noreferrer"; td.replaceChildren(a);
  } else { td.textContent = text; }
  return td;
}
function rows(id, items, fill) {
  const body = $(id + "-rows"); body.replaceChildren();
  $(id + "-empty").classList.toggle("hidden", items.length > 0);
  for (const item of items) { const tr = document.createElement("tr");
    fill(tr, item); body.appendChild(tr); }
}

// every panel from its own route: one failing says so and leaves the others as they are
const PANELS = [
  ["overview", renderOverview],
  ["timeline?minutes=60", (b) => renderChart(b.points)],
  ["forms/today?limit=50", renderForms],
  ["submissions?limit=20", (b) => rows("latest", b.submissions, latestRow)],
  ["dead-letters?limit=100", (b) => renderDead(b.dead_letters)],
  ["spam?limit=20", (b) => rows("spam", b.spam, spamRow)],
  ["rejected?limit=20", (b) => rows("rejected", b.rejected, rejectedRow)],
  ["webhook-events?limit=20", (b) => rows("events", b.events, eventRow)],
  ["forwards?limit=20", (b) => rows("forwards", b.forwards, forwardRow)],
];
async function refresh() {
  const failed = [];
  await Promise.all(PANELS.map(async ([path, render]) => {
    try { render(await api(path)); }
    catch (e) { failed.push(path.split("?")[0] + ": " + e.message); }
  }));
  if (failed.length) say(failed.join("; "), true);
}
function renderOverview(o) {
  $("version").textContent = "v" + o.version;
  const q = o.queue || {};
  for (const k of ["pending", "due", "running", "done"]) $("stat-" + k).textContent = q[k] ?? "–";
  $("stat-dead").textContent = o.dead_letters;
  $("stat-delivery").textContent = !o.delivery.worker ? "no worker" :
    o.delivery.paused ? "paused" : "running";
  const c = o.crm;
  $("stat-circuit").textContent = o.circuit && o.circuit.open ? "OPEN" : "closed";
  $("stat-circuit").className = o.circuit && o.circuit.open ? "bad" : "ok";
  $("crm-circuit-reason").textContent = c && c.circuit.open ?
    clip(c.circuit.reason, 80) +
    (c.circuit.probe_in_s ? ", probe in " + c.circuit.probe_in_s + " s" : "") : "";
  if (!c) return;
  $("crm-rate").textContent = c.rate.toFixed(1); $("crm-limit").textContent = c.limit;
  $("crm-meter").max = c.limit; $("crm-meter").high = c.limit * 0.9; $("crm-meter").value = c.rate;
  $("crm-pause").textContent = c.paused_for_s > 0 ? c.paused_for_s + " s" : "none";
  $("crm-pause").className = c.paused_for_s > 0 ? "bad" : "ok";
}
function svg(tag, attrs, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text != null) el.textContent = text; return el;
}
// the plot: x 50..630 (one point per minute), y 10..170 (0 at the bottom)
const X0 = 50, X1 = 630, Y0 = 170, Y1 = 10;
function line(points, key, color, top) {
  const n = Math.max(points.length - 1, 1);
  const pts = points.map((p, i) => (X0 + i * (X1 - X0) / n).toFixed(1) + "," +
    (Y0 - (Y0 - Y1) * p[key] / top).toFixed(1)).join(" ");
  return svg("polyline", {points: pts, fill: "none", stroke: color, "stroke-width": "2",
    class: "series-" + key});
}
function hhmm(iso) { const d = new Date(iso);
  return String(d.getHours()).padStart(2, "0") + ":" + String(d.getMinutes()).padStart(2, "0"); }
function renderChart(points) {
  const chart = $("chart"); chart.replaceChildren();
  const top = Math.max(1, ...points.map((p) => Math.max(p.queued, p.delivered)));
  const yAxis = svg("g", {class: "axis-y"}), xAxis = svg("g", {class: "axis-x"});
  for (const v of [...new Set([0, Math.round(top / 2), top])]) {
    const y = (Y0 - (Y0 - Y1) * v / top).toFixed(1);
    yAxis.appendChild(svg("line", {x1: X0, x2: X1, y1: y, y2: y}));
    yAxis.appendChild(svg("text", {x: X0 - 6, y: Number(y) + 4, "text-anchor": "end"}, v));
  }
  yAxis.appendChild(svg("text", {x: 12, y: (Y0 + Y1) / 2, "text-anchor": "middle",
    transform: "rotate(-90 12 " + (Y0 + Y1) / 2 + ")"}, "jobs"));
  const n = Math.max(points.length - 1, 1);
  for (let i = 0; i < points.length; i += 15) {
    const x = (X0 + i * (X1 - X0) / n).toFixed(1);
    xAxis.appendChild(svg("line", {class: "axis", x1: x, x2: x, y1: Y0, y2: Y0 + 4}));
    xAxis.appendChild(svg("text", {x: x, y: Y0 + 16, "text-anchor": "middle"},
      hhmm(points[i].minute)));
  }
  if (points.length)
    xAxis.appendChild(svg("text", {x: X1, y: Y0 + 16, "text-anchor": "end"}, "now"));
  xAxis.appendChild(svg("line", {class: "axis", x1: X0, x2: X1, y1: Y0, y2: Y0}));
  xAxis.appendChild(svg("text", {x: (X0 + X1) / 2, y: Y0 + 34, "text-anchor": "middle"},
    "time (per minute, local clock)"));
  chart.append(yAxis, xAxis, line(points, "queued", "#2f6fdb", top),
    line(points, "delivered", "#2e9d4f", top));
}
function renderForms(b) {
  $("forms-since").textContent = "(since " + when(b.since) + ")";
  rows("forms", b.forms, (tr, f) => { tr.dataset.form = f.form; cell(tr, f.form);
    for (const k of ["received", "delivered", "pending", "dead", "spam"])
      cell(tr, f[k], "num" + (k === "dead" && f[k] > 0 ? " bad" : "")); });
}
function latestRow(tr, s) {
  tr.dataset.submissionId = s.id;
  cell(tr, when(s.received_at)); cell(tr, s.form); cell(tr, s.lead && s.lead.name);
  cell(tr, s.discarded ? "discarded" : s.state, s.state === "dead" ? "bad" : "");
  cell(tr, s.job_state); cell(tr, s.attempts, "num");
  link(cell(tr, ""), s.crm_lead_url, s.crm_lead_id ?? "–").classList.add("crm-lead");
  cell(tr, clip(s.last_error, 120), "clip");
}
function renderDead(items) {
  rows("dead", items, (tr, d) => { tr.dataset.jobId = d.id;
    cell(tr, d.id); cell(tr, d.form); cell(tr, when(d.died_at)); cell(tr, d.attempts);
    cell(tr, clip(d.last_error, 200), "clip");
    const b = document.createElement("button"); b.textContent = "Replay"; b.className = "replay";
    b.addEventListener("click", () => act("dead-letters/" + d.id + "/replay", b,
      "job " + d.id + " replayed"));
    cell(tr, "").appendChild(b); });
}
function spamRow(tr, s) {
  tr.dataset.spamId = s.id; const who = s.lead || {};
  cell(tr, when(s.received_at)); cell(tr, s.form); cell(tr, s.reason);
  cell(tr, clip([who.name, who.phone || who.email].filter(Boolean).join(", "), 60), "clip");
  if (s.released_at) { cell(tr, "released", "muted"); return; }
  const b = document.createElement("button"); b.textContent = "Release"; b.className = "release";
  b.addEventListener("click", () => act("spam/" + s.id + "/release", b,
    "released: delivered as a normal lead"));
  cell(tr, "").appendChild(b);
}
function rejectedRow(tr, r) {
  tr.dataset.rejectedId = r.id;
  cell(tr, when(r.received_at)); cell(tr, r.endpoint);
  const errors = Array.isArray(r.errors) ? r.errors : [];
  cell(tr, clip(errors.map((e) => e && e.field ? e.field + ": " + e.message :
    JSON.stringify(e)).join("; "), 160), "clip bad");
  cell(tr, r.body_bytes + " B: " + clip(r.body_start, 80), "clip muted");
}
function eventRow(tr, e) {
  tr.dataset.eventId = e.id;
  cell(tr, when(e.received_at)); cell(tr, e.source); cell(tr, e.kind);
  link(cell(tr, ""), e.crm_lead_url, e.entity_id ?? "");
  cell(tr, e.outcome || (e.process_state ? "processing: " + e.process_state : ""));
  cell(tr, e.forwards.map((f) => f.state + (f.attempts > 1 ? " ×" + f.attempts : "")).join(", ")
    || "–");
}
function forwardRow(tr, f) {
  tr.dataset.forwardId = f.id;
  cell(tr, when(f.updated_at)); cell(tr, f.source + " " + f.kind);
  cell(tr, clip(f.destination, 60), "clip"); cell(tr, f.state, f.state === "dead" ? "bad" : "");
  cell(tr, f.attempts, "num"); cell(tr, clip(f.last_error, 120), "clip");
}
async function act(path, button, done) {
  button.disabled = true;
  try { await api(path, "POST"); say(done); } catch (e) { say(e.message, true); }
  refresh();
}
async function lookup(ev) {
  ev.preventDefault();
  const q = $("lookup-q").value.trim(); if (!q) return;
  const param = q.includes("@") ? "email" : "phone";
  try {
    const r = await api("submissions?" + param + "=" + encodeURIComponent(q));
    const body = $("lookup-rows"); body.replaceChildren();
    for (const s of r.submissions) {
      const tr = document.createElement("tr"); tr.dataset.submissionId = s.id;
      cell(tr, when(s.received_at)); cell(tr, s.form); cell(tr, s.lead && s.lead.name);
      cell(tr, s.discarded ? "discarded" : s.state); cell(tr, s.job_state); cell(tr, s.attempts);
      link(cell(tr, ""), s.crm_lead_url,
        (s.crm_contact_id ?? "–") + " / " + (s.crm_lead_id ?? "–"));
      cell(tr, s.last_error); body.appendChild(tr);
    }
    say(r.submissions.length + " submission(s) found");
  } catch (e) { say(e.message, true); }
}
async function setPaused(on) {
  try { await api("delivery/" + (on ? "pause" : "resume"), "POST");
    say(on ? "delivery paused" : "delivery resumed"); } catch (e) { say(e.message, true); }
  refresh();
}
function start() {
  showApp(true); refresh(); clearInterval(timer); timer = setInterval(refresh, 10000);
}
function signOut(why) {
  sessionStorage.removeItem(KEY); clearInterval(timer); showApp(false); say(why || "", !!why);
}
$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault(); sessionStorage.setItem(KEY, $("token").value.trim());
  $("token").value = ""; start();
});
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
        text=PAGE.replace(NONCE, nonce),
        content_type="text/html",
        headers={
            "Content-Security-Policy": csp,
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
        },
    )
