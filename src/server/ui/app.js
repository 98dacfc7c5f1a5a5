// The tollgate budget dashboard. Plain script, no framework, nothing
// fetched but this server's own /v1 API. Every value from the server is
// put into the page as text, never as markup.
"use strict";

const REFRESH_MS = 5000;
const TOKEN_KEY = "tollgate.adminToken";
let data = null;
let lastOk = 0;
let lastError = "";

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function headers() {
  const t = token();
  return t ? { authorization: "Bearer " + t } : {};
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z").replace(/:00Z$/, "Z");
}

function amount(unit, v) {
  if (v === null || v === undefined) return "";
  return unit === "spend" ? "$" + v : v + " " + unitName(unit);
}

function unitName(unit) {
  return (unit || "").replace(/_/g, " ");
}

function rate(unit, r) {
  if (r === null || r === undefined) return "–";
  const n = r >= 100 ? r.toFixed(0) : r >= 1 ? r.toFixed(2) : r.toPrecision(2);
  return (unit === "spend" ? "$" + n : n + " " + unitName(unit)) + "/h";
}

function forecastText(f) {
  switch (f.state) {
    case "runs_out": return "runs out at " + when(f.at);
    case "not_this_window": return "not this window";
    case "exhausted": return "used up";
    case "idle": return "not used yet";
    default: return "no estimate";
  }
}

async function refresh() {
  try {
    const r = await fetch("/v1/dashboard", { headers: headers(), cache: "no-store" });
    if (r.status === 401) {
      lastError = "this dashboard needs the admin token";
      data = null;
    } else if (!r.ok) {
      lastError = "the server answered " + r.status;
    } else {
      data = await r.json();
      lastOk = Date.now();
      lastError = "";
    }
  } catch (e) {
    lastError = "server unreachable";
  }
  render();
}

function renderFreshness() {
  const fresh = $("freshness");
  const age = lastOk ? Math.round((Date.now() - lastOk) / 1000) : null;
  const stale = lastError || (age !== null && age * 1000 > 3 * REFRESH_MS);
  fresh.className = stale ? "stale" : "";
  fresh.dataset.stale = stale ? "true" : "false";
  fresh.textContent = stale
    ? "Stale: " + (lastError || "no answer") + (lastOk ? "; data from " + age + " s ago" : "")
    : "Updated " + (data ? when(data.generated_at) : "");
}

function render() {
  renderFreshness();
  const w = $("warnings");
  w.hidden = !(data && data.warnings && data.warnings.length);
  w.textContent = w.hidden ? "" : "Partial data: " + data.warnings.join("; ");
  renderToken();
  if (!data) return;
  renderPolicy();
  renderFilters();
  renderBudgets();
  renderHistory();
  renderDenials();
  renderAlerts();
  // A keyboard user on a button keeps it: those tables wait for the next refresh.
  const focus = document.activeElement;
  if (!focus || !focus.closest || !focus.closest("#pending, #grants")) renderApprovals();
}

function canApprove() {
  return !!token() && data && data.admin.api === "shared";
}

function renderToken() {
  const where = $("admin-where");
  const state = $("token-state");
  if (!data) {
    where.textContent = "";
  } else if (data.admin.api === "off") {
    where.textContent = "No admin API is configured on this server (no admin token): approvals are read-only here.";
  } else if (data.admin.api === "own") {
    where.textContent = "The admin API listens on its own address, " + data.admin.address +
      ": approve there (tollgate approve --server …), not from this page.";
  } else {
    where.textContent = "Approving and revoking need the admin token. It stays in this browser tab (sessionStorage) and is sent only as a bearer header.";
  }
  state.textContent = token() ? "A token is set for this tab." : "No token: read-only.";
}

function renderPolicy() {
  const p = data.policy;
  const dl = $("policy-status");
  dl.replaceChildren();
  const row = (k, v, cls) => dl.append(el("dt", { text: k }), el("dd", { text: v, class: cls }));
  row("Version", p.version);
  row("Loaded at", when(p.loaded_at));
  row("Rules", String(p.rules));
  row("Last reload error", p.last_error ? p.last_error + (p.error_since ? " (since " + when(p.error_since) + ")" : "") : "none", p.last_error ? "error" : null);
}

const FILTERS = [
  ["f-team", (b) => b.attributes.team ?? matchOf(b, "team")],
  ["f-environment", (b) => b.attributes.environment ?? matchOf(b, "environment")],
  ["f-family", (b) => b.attributes.model_family ?? matchOf(b, "model_family")],
  ["f-rule", (b) => [b.rule]],
];

function ruleOf(id) {
  return (data.rules || []).find((r) => r.id === id);
}

// A rule's own match on an attribute, as a list of patterns.
function matchOf(b, attr) {
  const r = ruleOf(b.rule);
  return r && r.match[attr] ? r.match[attr] : null;
}

function values(v) {
  if (v === null || v === undefined) return [];
  return Array.isArray(v) ? v : [v];
}

function renderFilters() {
  for (const [id, get] of FILTERS) {
    const select = $(id);
    const chosen = select.value;
    const seen = new Set();
    for (const b of data.budgets) values(get(b)).forEach((v) => seen.add(v));
    const want = ["", ...[...seen].sort()];
    const have = [...select.options].map((o) => o.value);
    if (want.join("\u0000") !== have.join("\u0000")) {
      select.replaceChildren(...want.map((v) => el("option", { value: v, text: v || "all" })));
      select.value = want.includes(chosen) ? chosen : "";
    }
  }
}

function shown(b) {
  for (const [id, get] of FILTERS) {
    const v = $(id).value;
    if (v && !values(get(b)).includes(v)) return false;
  }
  const q = $("f-search").value.trim().toLowerCase();
  if (!q) return true;
  return [b.rule, b.scope, b.owner, b.description, b.unit].some((s) => (s || "").toLowerCase().includes(q));
}

function level(b) {
  // 0 below every threshold, then 1..3 by how many of the top thresholds are reached.
  if (b.percent !== null && b.percent >= 100) return 3;
  if (!b.alert_level) return 0;
  const i = b.alerts.indexOf(b.alert_level);
  const fromTop = b.alerts.length - 1 - i;
  return fromTop === 0 ? 2 : 1;
}

function renderBudgets() {
  const groups = $("budget-groups");
  const rows = data.budgets.filter(shown);
  $("budget-count").textContent = rows.length + " of " + data.budgets.length + " budgets shown" +
    (data.scopes_listed >= data.scopes_max ? " (scope list full)" : "");
  const byRule = new Map();
  for (const b of rows) {
    if (!byRule.has(b.rule)) byRule.set(b.rule, []);
    byRule.get(b.rule).push(b);
  }
  const out = [];
  for (const [rule, list] of byRule) {
    const r = ruleOf(rule) || {};
    const first = list[0];
    const tagText = first.enforcement === "soft" ? "soft: never denies"
      : first.enforcement === "approval" ? "needs approval"
      : r.on_exceed === "approval" ? "hard: asks approval when reached"
      : r.on_exceed === "downgrade" ? "hard: downgrades when reached" : "hard";
    const tag = el("span", { class: "tag " + (r.on_exceed === "approval" ? "approval" : first.enforcement), text: tagText });
    const table = el("table", { class: "budget" },
      el("thead", {}, el("tr", {},
        el("th", { scope: "col", text: "Scope" }),
        el("th", { scope: "col", text: "Used / limit" }),
        el("th", { scope: "col", text: "%" }),
        el("th", { scope: "col", text: "Bar" }),
        el("th", { scope: "col", text: "Rate (window / last hour)" }),
        el("th", { scope: "col", text: "Forecast" }),
        el("th", { scope: "col", text: "Resets" }))),
      el("tbody", {}, ...list.map((b) => {
        const pct = b.percent === null ? "" : b.percent.toFixed(1) + "%";
        const width = b.percent === null ? 0 : Math.min(100, b.percent);
        const lv = level(b);
        return el("tr", { "data-rule": b.rule, "data-scope": b.scope },
          el("td", { class: "scope", "data-label": "Scope", text: b.scope }),
          el("td", { class: "num usedlimit", "data-label": "Used / limit" },
            el("span", { class: "used", text: amount(b.unit, b.used) }), " / ",
            el("span", { class: "limit", text: amount(b.unit, b.limit) }),
            // Held in replicas' leases (Redis): counted against the cap, not spent.
            b.leased ? el("span", { class: "leased muted", title: "held unspent in replicas' leases", text: " (+" + amount(b.unit, b.leased) + " leased)" }) : null),
          el("td", { class: "num percent", "data-label": "%", text: pct }),
          el("td", { "data-label": "Bar" }, el("div", {
            class: "bar l" + lv, role: "img",
            "aria-label": pct + " used" + (b.alert_level ? ", past the " + b.alert_level + "% alert" : ""),
          }, el("span", { style: null }))),
          el("td", { class: "num rate", "data-label": "Rate (window / last hour)", text: rate(b.unit, b.rate_window) + " / " + rate(b.unit, b.rate_last_hour) }),
          el("td", { class: "forecast forecast-" + b.forecast.state, "data-label": "Forecast", "data-state": b.forecast.state, text: forecastText(b.forecast) }),
          el("td", { class: "resets", "data-label": "Resets", text: b.resets_at ? when(b.resets_at) : "never" }));
      })));
    // Widths are set as properties: the page's policy allows no inline style attributes.
    table.querySelectorAll("tbody tr").forEach((tr, i) => {
      const b = list[i];
      tr.querySelector(".bar > span").style.width = (b.percent === null ? 0 : Math.min(100, b.percent)) + "%";
    });
    out.push(el("div", { class: "group", "data-rule": rule },
      el("h3", {}, rule, tag),
      el("p", {},
        (r.description || first.description || "") ,
        el("span", { class: "muted" },
          " · owner: " + (first.owner || "none") + " · " + unitName(first.unit) + ", " + first.window + " window" +
          (first.alerts.length ? " · alerts at " + first.alerts.join("%, ") + "%" : ""))),
      el("div", { class: "scroll" }, table)));
  }
  if (!out.length) out.push(el("p", { class: "muted", text: "No budget matches." }));
  groups.replaceChildren(...out);
}

function renderHistory() {
  const h = data.denials.history;
  const box = $("history");
  if (!h.series.length) {
    box.replaceChildren(el("p", { class: "muted", text: "No denials counted in the last 72 hours (counts are written once a minute)." }));
    return;
  }
  const totals = h.series[0].counts.map((_, i) => h.series.reduce((s, x) => s + x.counts[i], 0));
  const max = Math.max(1, ...totals);
  const chart = el("div", { class: "chart", role: "img", "aria-label": "Denials per hour since " + when(h.since) + ", peak " + max + " an hour" });
  totals.forEach((t, i) => {
    const bar = el("span", { title: when(new Date(h.since_ms + i * h.bucket_seconds * 1000).toISOString()) + ": " + t });
    bar.style.height = (100 * t / max) + "%";
    chart.append(bar);
  });
  const legend = el("ul", { class: "legend" }, ...h.series.map((s) =>
    el("li", { text: s.rule + " · " + s.reason + ": " + s.total })));
  box.replaceChildren(chart, legend);
}

function fill(tbody, rows, empty, cols) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: cols, class: "muted", text: empty }))]));
}

function renderDenials() {
  fill($("denials").tBodies[0], data.denials.recent.map((d) => el("tr", { "data-rule": d.rule, "data-scope": d.scope, "data-reason": d.reason },
    el("td", { text: when(d.at) }), el("td", { text: d.rule }), el("td", { text: d.scope }),
    el("td", { text: d.reason }), el("td", { class: "num", text: d.retry_after === null ? "" : d.retry_after + " s" }),
    el("td", { text: d.key || "" }))), "No recent denials.", 6);
}

function renderAlerts() {
  fill($("alerts").tBodies[0], data.alerts.map((a) => el("tr", { "data-rule": a.rule, "data-threshold": a.threshold },
    el("td", { text: when(a.at) }), el("td", { text: a.rule }), el("td", { text: a.scope }),
    el("td", { class: "num", text: a.threshold + "%" }), el("td", { class: "num", text: amount(a.unit, a.used) + " / " + amount(a.unit, a.limit) }),
    el("td", { text: a.owner || "" }))), "No alerts yet.", 6);
}

function renderApprovals() {
  const can = canApprove();
  fill($("pending").tBodies[0], data.approvals.pending.map((p) => el("tr", { "data-rule": p.rule, "data-scope": p.scope },
    el("td", { text: p.rule }), el("td", { text: p.scope }), el("td", { text: p.owner || "" }),
    el("td", { class: "num", text: p.denials }), el("td", { text: when(p.last_denied_at) }),
    el("td", {}, can ? el("button", { type: "button", class: "approve", "data-rule": p.rule, "data-scope": p.scope,
      "aria-label": "Approve " + p.rule + " for " + p.scope, onclick: () => openApprove(p) }, "Approve") : ""))),
    "No pending asks.", 6);
  fill($("grants").tBodies[0], data.approvals.grants.map((g) => el("tr", { "data-rule": g.rule, "data-scope": g.scope },
    el("td", { text: g.rule }), el("td", { text: g.scope }), el("td", { text: g.extra === undefined || g.extra === "" ? "" : String(g.extra) + (g.unit ? " " + unitName(g.unit) : "") }),
    el("td", { text: when(g.expires_at) }), el("td", { text: g.approver }), el("td", { text: g.reason }),
    el("td", {}, can ? el("button", { type: "button", class: "revoke secondary", "aria-label": "Revoke " + g.rule + " for " + g.scope,
      onclick: () => revoke(g) }, "Revoke") : ""))),
    "No grants in force.", 7);
}

let asking = null;

function openApprove(p) {
  asking = p;
  $("approve-legend").textContent = "Approve " + p.rule + " for " + p.scope;
  const extra = $("a-extra");
  extra.required = !!p.extra_required;
  $("a-extra-label").textContent = p.extra_required
    ? "Extra " + unitName(p.unit) + " (required: this cap asks for approval once reached)"
    : "Extra " + unitName(p.unit) + " (empty: the rule's own allowance)";
  $("approve-form").hidden = false;
  $("a-approver").focus();
}

async function admin(path, body) {
  const r = await fetch(path, {
    method: "POST",
    headers: { ...headers(), "content-type": "application/json" },
    body: JSON.stringify(body),
    credentials: "omit",
  });
  const text = await r.text();
  let json = null;
  try { json = JSON.parse(text); } catch (e) { /* not JSON */ }
  if (!r.ok) throw new Error((json && json.error && json.error.message) || ("status " + r.status));
  return json;
}

async function approve(ev) {
  ev.preventDefault();
  if (!asking) return;
  const body = { rule: asking.rule, scope: asking.scope, for: $("a-for").value.trim(),
    approver: $("a-approver").value.trim(), reason: $("a-reason").value.trim() };
  const extra = $("a-extra").value.trim();
  if (extra) body.extra = extra;
  try {
    const g = await admin("/v1/admin/approvals", body);
    $("approve-result").textContent = "Granted " + g.rule + " for " + g.scope + " until " + when(g.expires_at) + ".";
    $("approve-form").hidden = true;
    asking = null;
  } catch (e) {
    $("approve-result").textContent = "Not granted: " + e.message;
  }
  await refresh();
  loadAudit();
}

async function revoke(g) {
  const by = window.prompt("Revoke " + g.rule + " for " + g.scope + ": your name?");
  if (!by) return;
  try {
    await admin("/v1/admin/approvals/revoke", { rule: g.rule, scope: g.scope, revoked_by: by, reason: "revoked from the dashboard" });
    $("approve-result").textContent = "Revoked " + g.rule + " for " + g.scope + ".";
  } catch (e) {
    $("approve-result").textContent = "Not revoked: " + e.message;
  }
  await refresh();
  loadAudit();
}

async function loadAudit() {
  const box = $("audit");
  if (!canApprove()) {
    box.replaceChildren(el("p", { class: "muted", text: "Shown with the admin token." }));
    return;
  }
  try {
    const r = await fetch("/v1/admin/approvals?audit=20", { headers: headers(), cache: "no-store", credentials: "omit" });
    if (r.status === 401) {
      box.replaceChildren(el("p", { class: "error", text: "The admin API refused the token." }));
      return;
    }
    const j = await r.json();
    const rows = (j.audit || []).slice().reverse().map((a) => el("li", {},
      when(a.at) + " · " + a.action + " · " + (a.grant ? a.grant.rule + " for " + a.grant.scope : "") + " · by " + a.by + (a.reason ? " · " + a.reason : "")));
    box.replaceChildren(rows.length ? el("ul", {}, ...rows) : el("p", { class: "muted", text: "No entries." }));
  } catch (e) {
    box.replaceChildren(el("p", { class: "error", text: "Cannot read the audit trail." }));
  }
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = $("token").value.trim();
  if (t) sessionStorage.setItem(TOKEN_KEY, t);
  $("token").value = "";
  refresh().then(loadAudit);
});
$("token-forget").addEventListener("click", () => {
  sessionStorage.removeItem(TOKEN_KEY);
  refresh().then(loadAudit);
});
$("approve-form").addEventListener("submit", approve);
$("a-cancel").addEventListener("click", () => { $("approve-form").hidden = true; asking = null; });
for (const id of ["f-team", "f-environment", "f-family", "f-rule"]) $(id).addEventListener("change", () => data && renderBudgets());
$("f-search").addEventListener("input", () => data && renderBudgets());

refresh().then(loadAudit);
setInterval(refresh, REFRESH_MS);
setInterval(renderFreshness, 1000);
