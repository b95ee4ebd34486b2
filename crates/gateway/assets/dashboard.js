// llm-gateway dashboard: renders the snapshots /ws pushes (once a second) and sends admin mutations.
// Vanilla JS, no dependency; every value is written with textContent (worker names are never parsed as HTML).
"use strict";

const TOKEN_KEY = "llm-gateway.admin-token";
const WINDOW_MS = 300 * 1000;
const $ = (id) => document.getElementById(id);
let last = null;            // the last snapshot, for redraws on resize
let strategyBusy = false;   // a strategy change is in flight: don't overwrite the select

// ---------------------------------------------------------------------------------------------
// Formatting

function set(el, text) { if (el.textContent !== text) el.textContent = text; }
function num(n) { return n == null ? "–" : Number(n).toLocaleString("en-US"); }
function fixed(n, d) { return n == null || !isFinite(n) ? "–" : Number(n).toFixed(d); }
function ms(n) {
  if (n == null || !isFinite(n)) return "–";
  if (n >= 10000) return (n / 1000).toFixed(1) + " s";
  return (n >= 100 ? n.toFixed(0) : n.toFixed(1)) + " ms";
}
function pct(x) { return x == null ? "–" : (x * 100).toFixed(x > 0 && x < 0.1 ? 1 : 0) + "%"; }
function duration(secs) {
  const d = Math.floor(secs / 86400), h = Math.floor(secs % 86400 / 3600), m = Math.floor(secs % 3600 / 60), s = secs % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s}s`;
  return `${s}s`;
}
function lastValue(arr) {
  for (let i = (arr || []).length - 1; i >= 0; i--) if (arr[i] != null) return arr[i];
  return null;
}
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

// ---------------------------------------------------------------------------------------------
// Notices and admin requests

let noticeTimer = null;
function notice(text, kind) {
  const n = $("notice");
  set($("notice-text"), text);
  n.className = kind === "info" ? "info" : "";
  n.hidden = false;
  clearTimeout(noticeTimer);
  if (kind === "info") noticeTimer = setTimeout(() => { n.hidden = true; }, 4000);
}
$("notice-close").onclick = () => { $("notice").hidden = true; };

const tokenInput = $("token");
tokenInput.value = localStorage.getItem(TOKEN_KEY) || "";
tokenInput.addEventListener("input", () => {
  const v = tokenInput.value.trim();
  if (v) localStorage.setItem(TOKEN_KEY, v); else localStorage.removeItem(TOKEN_KEY);
});

// Sends an admin mutation; answers the parsed body, or null after showing why it failed. The gateway
// takes mutations only as JSON (what another site's page cannot send without a CORS preflight), so the
// content type goes with every one, with or without a body.
async function admin(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  const token = tokenInput.value.trim();
  if (token) headers["Authorization"] = "Bearer " + token;
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch (e) {
    notice(`${method} ${path} failed: ${e.message}`);
    return null;
  }
  let data = null;
  try { data = await resp.json(); } catch (_) { /* not JSON */ }
  if (resp.status === 401) {
    notice(token
      ? "401 Unauthorized: the admin token is wrong. Fix it in the \u201cAdmin token\u201d field (top right)."
      : "401 Unauthorized: this gateway needs its admin token for changes. Enter it in the \u201cAdmin token\u201d field (top right); it is kept in this browser only.");
    tokenInput.focus();
    return null;
  }
  if (!resp.ok) {
    const why = data && data.error && data.error.message ? data.error.message : resp.statusText;
    notice(`${method} ${path}: ${resp.status} ${why}`);
    return null;
  }
  return data || {};
}

const strategySelect = $("strategy");
strategySelect.addEventListener("change", async () => {
  const strategy = strategySelect.value;
  strategyBusy = true;
  strategySelect.disabled = true;
  const ok = await admin("PATCH", "/api/config", { routing: { strategy } });
  strategySelect.disabled = false;
  strategyBusy = false;
  if (ok) notice(`Routing strategy is now ${strategy}.`, "info");
  if (last) render(last);
});

async function workerAction(name, action) {
  const path = action === "reset"
    ? `/api/circuit-breaker/${encodeURIComponent(name)}/reset`
    : `/api/workers/${encodeURIComponent(name)}/${action}`;
  const ok = await admin("POST", path);
  if (!ok) return;
  // Show the change at once; the next snapshot confirms it.
  if (last && action !== "reset") {
    const w = last.workers.find((x) => x.name === name);
    if (w) { w.draining = action === "drain"; renderWorkers(last); }
  }
  const done = { drain: "draining", undrain: "taking requests again", reset: "breaker reset" }[action];
  notice(`${name}: ${done}.`, "info");
}

// ---------------------------------------------------------------------------------------------
// Rendering

function render(s) {
  last = s;
  const st = s.status || {};
  set($("version"), st.version ? "v" + st.version : "");
  set($("stat-qps"), fixed(lastValue(s.series && s.series.qps) ?? st.qps, 1));
  set($("stat-active"), num(st.requests && st.requests.active));
  set($("stat-total"), num(st.requests && st.requests.total));
  const w = st.workers || {};
  set($("stat-workers"), `${num(w.healthy)} / ${num(w.total)}` + (w.draining ? ` (${w.draining} draining)` : ""));
  set($("stat-uptime"), st.uptime_secs == null ? "–" : duration(st.uptime_secs));
  renderStrategy(s);
  renderWorkers(s);
  renderQueue(s);
  renderRateLimit(s);
  renderCharts(s);
}

function renderStrategy(s) {
  const names = s.strategies || [];
  if (strategySelect.options.length !== names.length) {
    strategySelect.replaceChildren(...names.map((n) => { const o = el("option", null, n); o.value = n; return o; }));
  }
  const cur = s.status && s.status.strategy;
  if (!strategyBusy && document.activeElement !== strategySelect && cur && strategySelect.value !== cur) {
    strategySelect.value = cur;
  }
}

const COLUMNS = ["name", "health", "breaker", "draining", "in_flight", "running", "waiting", "kv", "share",
  "requests_total", "ttft", "errors", "actions"];
const NUMERIC = new Set(["in_flight", "running", "waiting", "share", "requests_total", "ttft", "errors"]);

function workerRow(name) {
  const tr = el("tr");
  tr.dataset.worker = name;
  for (const c of COLUMNS) {
    const td = el("td", NUMERIC.has(c) ? "n" : null);
    td.dataset.field = c;
    tr.appendChild(td);
  }
  const f = (c) => tr.querySelector(`[data-field="${c}"]`);
  f("name").append(el("div", "name", name), el("div", "url"));
  f("health").append(el("span", "dot"), el("span"));
  f("breaker").append(el("span", "badge"));
  f("draining").append(el("span", "badge"));
  const bar = el("span", "bar"); bar.appendChild(el("span"));
  f("kv").append(bar, el("span", "kv"));
  const actions = el("span", "actions");
  const drain = el("button", null, "Drain");
  drain.dataset.action = "drain";
  drain.onclick = () => workerAction(name, drain.dataset.action);
  const reset = el("button", null, "Reset breaker");
  reset.dataset.action = "reset";
  reset.onclick = () => workerAction(name, "reset");
  actions.append(drain, reset);
  f("actions").appendChild(actions);
  return tr;
}

function renderWorkers(s) {
  const tbody = document.querySelector("#workers tbody");
  const share = {};
  for (const r of (s.routing && s.routing.workers) || []) share[r.name] = r.share;
  const seen = new Set();
  for (const w of s.workers || []) {
    seen.add(w.name);
    let tr = tbody.querySelector(`tr[data-worker="${CSS.escape(w.name)}"]`);
    if (!tr) { tr = workerRow(w.name); tbody.appendChild(tr); }
    const f = (c) => tr.querySelector(`[data-field="${c}"]`);
    set(f("name").querySelector(".url"), w.url || "");
    const health = f("health");
    health.className = w.healthy ? "ok" : "bad";
    set(health.lastChild, w.healthy ? "healthy" : "down");
    const b = (w.breaker && w.breaker.state) || "unknown";
    const badge = f("breaker").firstChild;
    badge.className = "badge " + b;
    set(badge, b.replace("_", "-") + (w.breaker && w.breaker.enabled === false ? " (off)" : ""));
    const d = f("draining").firstChild;
    d.className = w.draining ? "badge draining" : "";
    set(d, w.draining ? "draining" : "no");
    tr.classList.toggle("draining", !!w.draining);
    set(f("in_flight"), num(w.in_flight));
    set(f("running"), num(w.running));
    set(f("waiting"), num(w.waiting));
    const kv = Math.max(0, Math.min(1, w.kv_usage || 0));
    const bar = f("kv").querySelector(".bar");
    bar.firstChild.style.width = (kv * 100).toFixed(1) + "%";
    bar.classList.toggle("hot", kv > 0.9);
    set(f("kv").querySelector(".kv"), pct(kv));
    set(f("share"), pct(share[w.name] ?? 0));
    set(f("requests_total"), num(w.requests_total));
    set(f("ttft"), w.ttft_ms ? ms(w.ttft_ms) : "–");
    set(f("errors"), pct(w.error_rate || 0));
    const drain = f("actions").querySelector("button");
    drain.dataset.action = w.draining ? "undrain" : "drain";
    set(drain, w.draining ? "Undrain" : "Drain");
  }
  for (const tr of [...tbody.children]) if (!seen.has(tr.dataset.worker)) tr.remove();
  $("workers-empty").hidden = seen.size > 0;
}

function renderQueue(s) {
  const q = s.queue || {};
  const tbody = document.querySelector("#queue tbody");
  const models = Object.entries(q.models || {});
  const rows = models.map(([model, m]) => {
    const by = m.by_class || {};
    const cells = [model, num(m.length), num(by.urgent), num(by.high), num(by.normal), num(by.low),
      ms(m.oldest_wait_ms), ms(m.avg_wait_ms_1h), fixed(m.dispatch_rate, 1)];
    const tr = el("tr");
    cells.forEach((c, i) => tr.appendChild(el("td", i ? "n" : null, c)));
    return tr;
  });
  syncRows(tbody, rows);
  $("queue-empty").hidden = models.length > 0;
  const chips = Object.entries(q.in_flight || {}).map(([name, n]) => {
    const c = el("span", "chip", name); c.appendChild(el("b", null, num(n))); return c;
  });
  syncRows($("processing"), chips);
}

function renderRateLimit(s) {
  const rejected = Object.entries((s.rate_limit && s.rate_limit.rejected) || {});
  const rows = rejected.map(([limit, n]) => {
    const tr = el("tr"); tr.append(el("td", null, limit), el("td", "n", num(n))); return tr;
  });
  syncRows(document.querySelector("#ratelimit tbody"), rows);
  $("ratelimit-empty").hidden = rejected.length > 0;
}

// Replaces children only when the content differs (keeps the DOM still when nothing moved).
function syncRows(parent, rows) {
  const html = rows.map((r) => r.outerHTML).join("");
  if (parent.dataset.last !== html) { parent.replaceChildren(...rows); parent.dataset.last = html; }
}

// ---------------------------------------------------------------------------------------------
// Charts (canvas, drawn by hand)

function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

// The top of a 4-line grid whose step is 1, 2, 2.5 or 5 times a power of ten.
function niceMax(v) {
  if (!(v > 0)) return 1;
  const step = v / 4, p = Math.pow(10, Math.floor(Math.log10(step)));
  for (const m of [1, 2, 2.5, 5, 10]) if (step <= m * p) return 4 * m * p;
  return 40 * p;
}

// The time span shown: the data's, at least a minute, at most WINDOW_MS.
function spanOf(t) {
  const have = t.length ? t[t.length - 1] - t[0] : 0;
  return Math.min(WINDOW_MS, Math.max(60 * 1000, Math.ceil(have / 60000) * 60000));
}

function legend(id, lines, fmt) {
  const span = $(id);
  const text = lines.map((l) => `${l.label} ${fmt(lastValue(l.values))}`).join("   ");
  if (span.dataset.text === text) return;
  span.dataset.text = text;
  span.replaceChildren(...lines.flatMap((l) => {
    const i = el("i"); i.style.background = css(l.color);
    return [i, document.createTextNode(`${l.label} ${fmt(lastValue(l.values))}`)];
  }));
}

function drawChart(canvas, t, lines, fmt) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  if (!w || !h) return;
  if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
    canvas.width = Math.round(w * dpr); canvas.height = Math.round(h * dpr);
  }
  const g = canvas.getContext("2d");
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const left = 48, right = 8, top = 8, bottom = 18;
  const pw = w - left - right, ph = h - top - bottom;
  const span = spanOf(t);
  const end = t.length ? t[t.length - 1] : Date.now(), start = end - span;
  let max = 0;
  for (const l of lines) for (const v of l.values) if (v != null && v > max) max = v;
  max = niceMax(max * 1.05);
  g.font = "11px system-ui, sans-serif";
  g.fillStyle = css("--muted");
  g.strokeStyle = css("--grid");
  g.lineWidth = 1;
  g.textAlign = "right"; g.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const y = top + ph - (ph * i) / 4;
    g.beginPath(); g.moveTo(left, Math.round(y) + 0.5); g.lineTo(left + pw, Math.round(y) + 0.5); g.stroke();
    g.fillText(i ? fmt((max * i) / 4) : "0", left - 6, y);
  }
  g.textAlign = "center"; g.textBaseline = "top";
  const every = span <= 60000 ? 10000 : span <= 180000 ? 30000 : 60000;
  for (let ago = span; ago >= 0; ago -= every) {
    const xi = left + pw - (pw * ago) / span;
    const label = ago === 0 ? "now" : ago % 60000 ? `-${ago / 1000}s` : `-${ago / 60000}m`;
    g.fillText(label, Math.max(left + 8, Math.min(xi, left + pw - 12)), top + ph + 4);
  }
  const x = (ti) => left + ((ti - start) / span) * pw;
  const y = (v) => top + ph - (v / max) * ph;
  for (const l of lines) {
    g.strokeStyle = css(l.color);
    g.lineWidth = 1.6;
    g.lineJoin = "round";
    g.beginPath();
    let pen = false;
    for (let i = 0; i < t.length; i++) {
      const v = l.values[i];
      if (v == null || t[i] < start) { pen = false; continue; }
      if (pen) g.lineTo(x(t[i]), y(v)); else { g.moveTo(x(t[i]), y(v)); pen = true; }
    }
    g.stroke();
    // A lone point between gaps would be invisible: mark the latest one.
    const lv = l.values.length ? l.values[l.values.length - 1] : null;
    if (lv != null) { g.fillStyle = css(l.color); g.beginPath(); g.arc(x(end), y(lv), 2.2, 0, 7); g.fill(); }
  }
}

function renderCharts(s) {
  const se = s.series || {};
  const t = se.t || [];
  const qps = [{ label: "qps", color: "--accent", values: se.qps || [] }];
  const lat = [{ label: "p50", color: "--accent", values: se.latency_p50_ms || [] },
    { label: "p99", color: "--accent2", values: se.latency_p99_ms || [] }];
  const ttft = [{ label: "p50", color: "--accent", values: se.ttft_p50_ms || [] },
    { label: "p99", color: "--accent2", values: se.ttft_p99_ms || [] }];
  const q = (v) => (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2));
  legend("legend-qps", qps, (v) => (v == null ? "–" : q(v) + "/s"));
  legend("legend-latency", lat, ms);
  legend("legend-ttft", ttft, ms);
  const axisMs = (v) => (v >= 1000 ? (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "s" : v.toFixed(v >= 10 ? 0 : 1) + "ms");
  drawChart($("chart-qps"), t, qps, q);
  drawChart($("chart-latency"), t, lat, axisMs);
  drawChart($("chart-ttft"), t, ttft, axisMs);
}
window.addEventListener("resize", () => { if (last) renderCharts(last); });
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => { if (last) renderCharts(last); });

// ---------------------------------------------------------------------------------------------
// Live connection, reconnecting with backoff

let backoff = 500;
function connect() {
  const conn = $("conn");
  const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws");
  ws.onopen = () => { backoff = 500; conn.className = "pill ok"; set(conn, "live"); };
  ws.onmessage = (ev) => {
    try { render(JSON.parse(ev.data)); } catch (e) { console.error("bad snapshot", e); }
  };
  ws.onclose = () => {
    conn.className = "pill bad";
    set(conn, "disconnected, retrying");
    setTimeout(connect, backoff);
    backoff = Math.min(backoff * 2, 5000);
  };
}
connect();

// ---------------------------------------------------------------------------------------------
// Batches: polled from GET /api/batches (the store is read off the request path, not in /ws)

function renderBatches(b) {
  set($("batch-pace"), `${fixed(b.lines_per_second, 1)} lines/s · ${num(b.lines_in_flight)} in flight · ${num(b.lines_pending)} pending`);
  const rows = (b.batches || []).map((x) => {
    const c = x.request_counts || {};
    const tr = el("tr");
    const bar = el("span", "bar"); const fill = el("span"); fill.style.width = `${Math.round((x.progress || 0) * 100)}%`;
    bar.appendChild(fill);
    const progress = el("td"); progress.append(bar, ` ${pct(x.progress)}`);
    tr.append(el("td", null, x.id), el("td", null, x.tenant || "–"), el("td", null, x.status), progress,
      el("td", "n", num(c.total)), el("td", "n", num(c.completed)), el("td", "n", num(c.failed)), el("td", null, x.endpoint));
    return tr;
  });
  syncRows(document.querySelector("#batches tbody"), rows);
  $("batches-empty").hidden = rows.length > 0;
}

async function pollBatches() {
  try {
    const resp = await fetch("/api/batches");
    if (resp.ok) renderBatches(await resp.json());
  } catch (e) { /* the live connection shows when the gateway is gone */ }
  setTimeout(pollBatches, 2000);
}
pollBatches();
