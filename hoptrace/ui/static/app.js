// hoptrace ui: plain JavaScript, no library, nothing fetched but this server's JSON API.
// Trace files are untrusted: every string from the API reaches the page through
// textContent or an attribute set by setAttribute, never through innerHTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const ROW_H = 22;
const LABEL_W = 340;
const MIN_BAR_W = 2;
const NEW_FOR_MS = 10000; // how long a request that arrived live stays highlighted
const state = { version: -1, serverVersion: -1, firstSeen: new Map(), liveUpdate: false, collapsed: new Set(), request: null, hop: null };

// ---- DOM helpers ---------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "on") for (const [ev, fn] of Object.entries(value)) el.addEventListener(ev, fn);
    else if (key === "text") el.textContent = String(value);
    else el.setAttribute(key, String(value));
  }
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

function show(...nodes) {
  const main = document.getElementById("main");
  main.replaceChildren(...nodes);
}

async function api(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

// ---- formatting ----------------------------------------------------------------------

const fmtMs = (ms) => (ms === null || ms === undefined ? "–" : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(ms < 10 ? 1 : 0)} ms`);
const fmtTime = (t) => (t === null || t === undefined ? "–" : new Date(t * 1000).toISOString().replace("T", " ").replace("Z", " UTC"));
const fmtRemaining = (r) => (r === null || r === undefined ? "–" : r <= 0 ? `${r.toFixed(2)} s (expired ${(-r).toFixed(2)} s before)` : `${r.toFixed(2)} s left`);
// outcome (2xx .. error) and ended ("401", "no response (timeout)") come from the server's presentation model.
const badge = (hop) => h("span", { class: `badge s${hop.outcome}`, text: hop.ended });

function dbPrefix(db) {
  return db ? `/db/${db}` : "";
}

// ---- routing -------------------------------------------------------------------------

function route() {
  const raw = location.hash.replace(/^#/, "") || "/";
  const [path, queryString] = raw.split("?");
  let parts = path.split("/").filter(Boolean);
  let db = 0;
  if (parts[0] === "db" && /^\d+$/.test(parts[1] || "")) {
    db = Number(parts[1]);
    parts = parts.slice(2);
  }
  const params = new URLSearchParams(queryString || "");
  for (const a of document.querySelectorAll("header nav a")) a.classList.toggle("active", a.dataset.view === (parts[0] || "requests"));
  const view = parts[0] || "requests";
  const run =
    view === "request" ? showRequest(db, Number(parts[1]), parts[2] === "hop" ? Number(parts[3]) : null)
    : view === "compare" ? showCompare(parts[1], parts[2])
    : view === "sessions" ? showSessions()
    : view === "session" ? showSession(db, Number(parts[1]))
    : view === "latency" ? showLatency()
    : view === "graph" ? showGraph()
    : showRequests(params);
  run.catch((err) => {
    // A first view that needs the analysis while only the SQL preview is loaded: the next data change reloads it.
    if (state.version === -1) state.version = -2;
    show(h("p", { class: "error-box", text: `Could not load this view: ${err.message}` }));
  });
}

// ---- request list --------------------------------------------------------------------

const FILTERS = ["q", "service", "endpoint", "status", "kind", "severity", "subject", "since", "until"];
let facets = null;

async function showRequests(params) {
  facets = facets || (await api("/api/facets"));
  const query = new URLSearchParams();
  for (const [k, v] of params) if (v) query.set(k, v);
  const page = await api(`/api/requests?${query}`);
  const form = filterForm(params);
  // The default: the presentation model's worst-first order, the same as `hoptrace analyze`.
  const sort = params.get("sort") || "worst";
  const defaultOrder = (key) => (key === "worst" ? "asc" : "desc");
  const order = params.get("order") || defaultOrder(sort);
  const header = (label, key, cls) => {
    if (!key) return h("th", { class: cls, text: label });
    const sorted = key === sort ? ` sorted-${order}` : "";
    return h("th", { class: `sortable${sorted} ${cls || ""}`, "data-sort": key, text: label, on: { click: () => {
      params.set("sort", key);
      params.set("order", key === sort ? (order === "desc" ? "asc" : "desc") : defaultOrder(key));
      params.delete("offset");
      location.hash = `#/?${params}`;
    } } });
  };
  // Rows first seen in a live update are new; rows first seen by paging or filtering are not.
  const now = Date.now();
  const live = state.liveUpdate;
  state.liveUpdate = false;
  for (const r of page.items) {
    const key = `${r.db}:${r.trace}`;
    if (!state.firstSeen.has(key)) state.firstSeen.set(key, live ? now : 0);
  }
  const rows = page.items.map((r) => {
    const seen = state.firstSeen.get(`${r.db}:${r.trace}`);
    const fresh = seen > 0 && now - seen < NEW_FOR_MS;
    return h("tr", { class: `clickable${fresh ? " new" : ""}`, "data-trace": r.trace, "data-db": r.db, on: { click: () => (location.hash = `#${dbPrefix(r.db)}/request/${r.trace}`) } },
      h("td", { class: "num", text: r.worst === null ? "–" : r.worst + 1 }),
      h("td", { class: "num", text: r.trace }),
      h("td", { text: fmtTime(r.started_at) }),
      h("td", { text: r.endpoint }),
      h("td", {}, badge({ outcome: r.status_class, ended: r.ended })),
      h("td", { class: "num", text: fmtMs(r.duration_ms) }),
      h("td", { class: "num", text: r.hops }),
      h("td", { class: "mono", text: r.subject || "" }),
      h("td", {}, r.severity ? h("span", { class: `sev-${r.severity}`, text: r.severity }) : ""),
      h("td", { text: r.kinds }));
  });
  state.version = page.version;
  if (state.serverVersion > page.version) setTimeout(route, 0); // the data changed while this page loaded
  const offset = page.offset;
  const limit = Number(params.get("limit") || 50);
  const go = (to) => { params.set("offset", String(to)); location.hash = `#/?${params}`; };
  show(
    h("h2", { text: "Requests" }),
    form,
    page.analysing ? h("p", { id: "analysing", class: "muted", text: "Analysing the trace: until it is done the list holds the newest requests only, without findings; the filters by service, endpoint, subject and finding and the waterfalls follow." }) : null,
    h("div", { class: "pager" },
      h("span", { id: "request-count", text: `${page.total} requests` + (page.total ? `, ${offset + 1}–${offset + page.items.length} shown` : "") }),
      h("button", { id: "prev-page", disabled: offset <= 0 ? "disabled" : null, text: "← newer", on: { click: () => go(Math.max(0, offset - limit)) } }),
      h("button", { id: "next-page", disabled: offset + limit >= page.total ? "disabled" : null, text: "older →", on: { click: () => go(offset + limit) } })),
    h("table", { id: "request-list" },
      h("thead", {}, h("tr", {}, header("worst", "worst", "num"), header("#", null, "num"), header("started", "started"), header("endpoint"), header("status", "status"),
        header("duration", "duration", "num"), header("hops", "hops", "num"), header("subject"), header("severity", "severity"), header("findings"))),
      h("tbody", {}, rows)));
}

function filterForm(params) {
  const select = (name, values, label, texts) => h("label", {}, label,
    h("select", { id: `filter-${name}`, name }, h("option", { value: "", text: "any" }),
      values.map((v, i) => h("option", { value: v, text: texts ? texts[i] : v, selected: params.get(name) === v ? "selected" : null }))));
  const input = (name, label, placeholder) => h("label", {}, label, h("input", { id: `filter-${name}`, name, value: params.get(name) || "", placeholder }));
  const form = h("form", { class: "filters", id: "filters" },
    input("q", "search", "path, subject, finding, id"),
    select("status", facets.status, "status"),
    select("service", facets.service, "service"),
    select("endpoint", facets.endpoint, "endpoint"),
    select("kind", facets.kind, "finding", facets.kinds.map((k) => `${k.kind} × ${k.count}`)),
    select("severity", facets.severity, "severity"),
    select("subject", facets.subject, "subject"),
    input("since", "since", "ISO time or UNIX s"),
    input("until", "until", "ISO time or UNIX s"),
    h("button", { type: "submit", id: "apply-filters", text: "Apply" }),
    h("button", { type: "button", text: "Errors only", id: "errors-only", on: { click: () => { location.hash = "#/?severity=error"; } } }),
    h("button", { type: "button", text: "Clear", on: { click: () => { location.hash = "#/"; } } }));
  const apply = (event) => {
    if (event) event.preventDefault();
    const next = new URLSearchParams();
    for (const name of FILTERS) {
      const value = form.elements[name].value.trim();
      if (value) next.set(name, value);
    }
    for (const keep of ["sort", "order"]) if (params.get(keep)) next.set(keep, params.get(keep));
    location.hash = `#/?${next}`;
  };
  form.addEventListener("submit", apply);
  for (const el of form.querySelectorAll("select")) el.addEventListener("change", apply);
  return form;
}

// ---- one request: the waterfall ------------------------------------------------------

async function showRequest(db, trace, hopId) {
  if (!state.request || state.request.trace !== trace || state.request.db !== db) {
    state.request = await api(`/api/request/${trace}?db=${db}`);
    state.collapsed = new Set();
  }
  const req = state.request;
  const findings = h("ul", { class: "findings", id: "findings" }, req.findings.map((f, n) =>
    h("li", { "data-finding": n, on: { click: () => flagFinding(n) } },
      h("span", { class: `sev-${f.severity}`, text: `${f.severity} ${f.kind}` }), " ", h("span", { text: f.message }))));
  const compare = req.peer !== null && req.peer !== undefined
    ? h("a", { id: "compare-peer", href: `#/compare/${db}:${trace}/${db}:${req.peer}`, text: `Compare with passing request #${req.peer}` })
    : h("span", { class: "muted", text: "no passing request of this endpoint to compare with" });
  show(
    h("h2", {}, `Request #${req.trace} `, h("span", { text: req.endpoint }), " ", badge({ outcome: req.status_class, ended: req.ended }),
      h("span", { class: "muted", text: ` ${fmtMs(req.duration_ms)} · ${req.hops.length} hops · ${fmtTime(req.started_at)}${req.subject ? ` · ${req.subject}` : ""}` })),
    h("div", { class: "toolbar" },
      h("a", { href: "#/", text: "← requests" }),
      h("button", { id: "expand-all", text: "Expand all", on: { click: () => { state.collapsed.clear(); drawWaterfall(); } } }),
      h("button", { id: "collapse-all", text: "Collapse all", on: { click: () => { req.hops.forEach((x) => x.depth > 0 && state.collapsed.add(x.id)); drawWaterfall(); } } }),
      compare),
    req.findings.length ? h("h3", { text: `Findings (${req.findings.length})` }) : null,
    findings,
    h("div", { class: "layout" }, h("div", { class: "chart", id: "waterfall" }), h("aside", { id: "hop-pane" }, h("p", { class: "muted", text: "Click a hop for its detail." }))));
  drawWaterfall();
  if (hopId !== null) await showHop(db, hopId);
}

function visibleHops(hops) {
  const hidden = new Set();
  const out = [];
  for (const hop of hops) {
    if (hop.parent !== null && (hidden.has(hop.parent) || state.collapsed.has(hop.parent))) {
      hidden.add(hop.id);
      continue;
    }
    out.push(hop);
  }
  return out;
}

function waterfallLayout(req, width) {
  const ends = req.hops.map((x) => x.start_ms + (x.duration_ms || 0));
  let max = Math.max(1, ...ends);
  // An expiry inside (or just past) the request is drawn; one far away is only named.
  const near = req.expiries.filter((e) => e.ms >= -0.1 * max && e.ms <= 1.5 * max);
  for (const e of near) max = Math.max(max, e.ms * 1.05);
  const scale = (ms) => (Math.max(0, ms) / max) * width;
  return { max, near, scale };
}

function drawWaterfall() {
  const req = state.request;
  const holder = document.getElementById("waterfall");
  if (!holder) return;
  const width = Math.max(360, holder.clientWidth - LABEL_W - 130);
  const { max, near, scale } = waterfallLayout(req, width);
  const hops = visibleHops(req.hops);
  const hasChildren = new Set(req.hops.map((x) => x.parent).filter((p) => p !== null));
  const top = 34;
  const height = top + hops.length * ROW_H + 8;
  const svg = s("svg", { id: "waterfall-svg", width: LABEL_W + width + 130, height, role: "img", "aria-label": `waterfall of request ${req.trace}` });
  const axis = s("g", { class: "axis" });
  for (let i = 0; i <= 5; i++) {
    const x = LABEL_W + (width * i) / 5;
    axis.append(s("line", { x1: x, x2: x, y1: top - 6, y2: height }), s("text", { x, y: 12, "text-anchor": "middle", text: fmtMs((max * i) / 5) }));
  }
  svg.append(axis);
  const expX = near.map((e) => LABEL_W + scale(e.ms));
  near.forEach((e, n) => svg.append(s("rect", { class: "expired", x: expX[n], y: top - 6, width: Math.max(0, LABEL_W + width - expX[n]), height: height - top + 6 })));
  hops.forEach((hop, i) => {
    const y = top + i * ROW_H;
    const flagged = hop.findings.length > 0;
    const row = s("g", { class: `row${state.hop === hop.id ? " selected" : ""}`, "data-hop": hop.id, on: { click: () => selectHop(hop.id) } });
    const label = `${hop.service} ${hop.method || ""} ${hop.path || ""}`;
    const x = LABEL_W + scale(hop.start_ms);
    const w = Math.max(MIN_BAR_W, scale(hop.start_ms + (hop.duration_ms || 0)) - scale(hop.start_ms));
    const note = `${hop.ended} · ${fmtMs(hop.duration_ms)}${hop.is_validation ? " · validation" : ""}`;
    row.append(
      s("rect", { class: "band", x: 0, y, width: LABEL_W + width + 130, height: ROW_H }),
      s("title", { text: `${label}\n${note}\nlink: ${hop.link}${hop.remaining_s !== null ? `\ntoken: ${fmtRemaining(hop.remaining_s)}` : ""}` }),
      flagged ? s("text", { class: "flag", x: 2, y: y + 15, text: "!" }) : null,
      hasChildren.has(hop.id)
        ? s("text", { class: "toggle", x: 10 + hop.depth * 14, y: y + 15, "data-toggle": hop.id, text: state.collapsed.has(hop.id) ? "▸" : "▾",
            on: { click: (ev) => { ev.stopPropagation(); toggle(hop.id); } } })
        : null,
      s("text", { x: 24 + hop.depth * 14, y: y + 15, class: "hop-label", text: clip(label, 44 - hop.depth * 2) }),
      s("rect", { class: `bar o${hop.outcome}${hop.on_critical_path ? " critical" : ""}`, x, y: y + 4, width: w, height: ROW_H - 8 }),
      // The note after the bar, or before it when it would run past the chart's edge.
      x + w + 4 + note.length * 7 > LABEL_W + width + 130
        ? s("text", { x: x - 4, y: y + 15, "text-anchor": "end", class: "bar-note", text: note })
        : s("text", { x: x + w + 4, y: y + 15, class: "bar-note", text: note }));
    svg.append(row);
  });
  // The expiry on top of the bars, so a bar never hides it.
  near.forEach((e, n) => svg.append(
    s("line", { class: "exp", id: n ? null : "exp-line", x1: expX[n], x2: expX[n], y1: top - 6, y2: height }, s("title", { text: `token exp ${fmtTime(e.at)}` })),
    s("text", { class: "exp-label", x: expX[n] + 4, y: top - 10, text: `token exp ${fmtTime(e.at).slice(11)}` })));
  holder.replaceChildren(svg, h("p", { class: "muted", text: legendText(req, near) }));
}

function legendText(req, near) {
  const far = req.expiries.filter((e) => !near.includes(e)).map((e) => `${(e.ms / 1000).toFixed(1)} s`);
  return "Outlined bars: the critical path. ! a hop in a finding. Colours: 2xx green, 3xx blue, 4xx orange, 5xx red, failed pink."
    + (far.length ? ` Token expiry off the chart at ${far.join(", ")} from the request's start.` : "");
}

function clip(text, n) {
  return text.length > n ? `${text.slice(0, Math.max(4, n - 1))}…` : text;
}

function toggle(id) {
  if (state.collapsed.has(id)) state.collapsed.delete(id);
  else state.collapsed.add(id);
  drawWaterfall();
}

function selectHop(id) {
  const req = state.request;
  location.hash = `#${dbPrefix(req.db)}/request/${req.trace}/hop/${id}`;
}

function flagFinding(n) {
  const ids = new Set(state.request.findings[n].hop_ids);
  for (const li of document.querySelectorAll("#findings li")) li.classList.toggle("selected", Number(li.dataset.finding) === n);
  for (const row of document.querySelectorAll("#waterfall-svg .row")) row.classList.toggle("flagged", ids.has(Number(row.dataset.hop)));
  if (ids.size) selectHop([...ids][ids.size - 1]);
}

// ---- the hop detail pane -------------------------------------------------------------

async function showHop(db, id) {
  state.hop = id;
  for (const row of document.querySelectorAll("#waterfall-svg .row")) row.classList.toggle("selected", Number(row.dataset.hop) === id);
  const hop = await api(`/api/hop/${id}?db=${db}`);
  const pane = document.getElementById("hop-pane");
  const facts = [
    ["hop", `#${hop.id} (parent ${hop.parent ?? "none: the request"})`],
    ["service", hop.service],
    ["request", `${hop.method} ${hop.path}`],
    ["query", hop.query || "–"],
    ["status", `${hop.ended} ${hop.reason || ""}${hop.error ? ` · ${hop.error}` : ""}`],
    ["duration", fmtMs(hop.duration_ms)],
    ["started", fmtTime(hop.started_at)],
    ["link", `${hop.link}${hop.link_candidates > 1 ? ` (chosen among ${hop.link_candidates})` : ""}`],
    ["token life left", fmtRemaining(hop.remaining_s)],
  ];
  pane.replaceChildren(
    h("h3", { id: "hop-title", text: `${hop.service} ${hop.method} ${hop.path}` }),
    kvTable(facts, "hop-facts"),
    h("h3", { text: `Tokens (${hop.tokens.length})` }),
    ...hop.tokens.map(tokenBlock),
    h("h3", { text: "Timings" }), timingBar(hop.timings),
    h("h3", { text: "Request headers (redacted)" }), kvTable(hop.request_headers, "request-headers"),
    h("h3", { text: "Response headers (redacted)" }), kvTable(hop.response_headers, "response-headers"),
    h("h3", { text: "curl (secrets as recorded: redacted)" }),
    h("pre", { id: "curl", text: hop.curl }),
    h("button", { text: "Copy curl", on: { click: () => navigator.clipboard && navigator.clipboard.writeText(hop.curl) } }));
}

function kvTable(pairs, id) {
  return h("table", { id }, h("tbody", {}, pairs.map(([k, v]) => h("tr", {}, h("td", { text: k }), h("td", { class: "mono", text: v ?? "–" })))));
}

function timingBar(t) {
  const parts = ["connect", "send", "wait", "receive"];
  const total = parts.reduce((sum, p) => sum + (t[p] || 0), 0) || 1;
  const svg = s("svg", { width: 400, height: 18, id: "timing-bar" });
  let x = 0;
  for (const p of parts) {
    const w = ((t[p] || 0) / total) * 400;
    svg.append(s("rect", { class: `t-${p}`, x, y: 2, width: w, height: 14 }, s("title", { text: `${p} ${fmtMs(t[p])}` })));
    x += w;
  }
  return h("div", {}, svg, kvTable(parts.map((p) => [p, t[p] === null ? "– (not recorded: connection reused or no response)" : fmtMs(t[p])]), "timings"));
}

function tokenBlock(tok) {
  const claims = Object.entries(tok.claims || {}).map(([k, v]) => {
    const text = typeof v === "object" ? JSON.stringify(v) : String(v);
    return [k, ["exp", "iat", "nbf", "auth_time"].includes(k) && typeof v === "number" ? `${text} (${fmtTime(v)})` : text];
  });
  return h("div", { class: "token" },
    kvTable([
      ["fingerprint", tok.fingerprint],
      ["role / where", `${tok.role} · ${tok.location}`],
      ["kind", tok.kind],
      ["remaining life", fmtRemaining(tok.remaining_s)],
      ...(tok.error ? [["error", tok.error]] : []),
    ], "token-facts"),
    h("div", { class: "muted", text: "decoded header" }), kvTable(Object.entries(tok.header), "token-header"),
    h("div", { class: "muted", text: "claims" }), kvTable(claims, "token-claims"));
}

// ---- compare two requests ------------------------------------------------------------

function ref(text) {
  const [a, b] = String(text || "").split(":");
  return b === undefined ? [0, Number(a)] : [Number(a), Number(b)];
}

async function showCompare(left, right) {
  const [adb, a] = ref(left);
  const [bdb, b] = ref(right);
  const cmp = await api(`/api/compare?adb=${adb}&a=${a}&bdb=${bdb}&b=${b}`);
  const side = (hop, differs) => hop
    ? [h("td", { class: differs.includes("status") || differs.includes("error_kind") ? "diff" : "" }, badge(hop)),
       h("td", { class: `num${differs.includes("duration") ? " diff" : ""}`, text: fmtMs(hop.duration_ms) }),
       h("td", { class: differs.includes("expired") ? "diff" : "", text: fmtRemaining(hop.remaining_s) }),
       h("td", { class: differs.includes("link") ? "diff" : "", text: hop.link })]
    : [h("td", { colspan: 4, text: "(no such hop)" })];
  const title = (r) => `#${r.trace} ${r.endpoint} → ${r.ended} in ${fmtMs(r.duration_ms)}${r.subject ? ` (${r.subject})` : ""}`;
  const differing = cmp.rows.filter((r) => r.differs.length).length;
  show(
    h("h2", { text: "Compare two requests" }),
    h("p", {}, h("a", { href: `#${dbPrefix(adb)}/request/${a}`, text: `A: ${title(cmp.a)}` }), h("br"), h("a", { href: `#${dbPrefix(bdb)}/request/${b}`, text: `B: ${title(cmp.b)}` })),
    h("p", { id: "compare-summary", text: `${differing} of ${cmp.rows.length} hops differ (highlighted).` }),
    h("table", { class: "compare", id: "compare" },
      h("thead", {}, h("tr", {}, h("th", { text: "hop" }), h("th", { text: "A status" }), h("th", { text: "A time" }), h("th", { text: "A token" }), h("th", { text: "A link" }),
        h("th", { text: "B status" }), h("th", { text: "B time" }), h("th", { text: "B token" }), h("th", { text: "B link" }), h("th", { text: "differs" }))),
      h("tbody", {}, cmp.rows.map((r) => h("tr", { class: r.differs.includes("missing") ? "missing" : r.differs.length ? "differs" : "" },
        h("td", { text: r.key }), side(r.a, r.differs), side(r.b, r.differs), h("td", { text: r.differs.join(", ") }))))));
}

// ---- sessions, latency, service graph ------------------------------------------------

async function showSessions() {
  const rows = await api("/api/sessions");
  show(h("h2", { text: "Sessions (a user's workflow), expired and failing first" }),
    h("table", { id: "session-list" }, h("thead", {}, h("tr", {}, ["session", "subject", "requests", "failed", "token expired", "started"].map((t) => h("th", { text: t })))),
      h("tbody", {}, rows.map((r) => h("tr", { class: "clickable", on: { click: () => (location.hash = `#${dbPrefix(r.db)}/session/${r.session}`) } },
        h("td", { class: "num", text: r.session }), h("td", { class: "mono", text: r.subject || "–" }), h("td", { class: "num", text: r.requests }),
        h("td", { class: "num", text: r.failed }), h("td", { class: r.expired ? "sev-error" : "", text: r.expired ? "yes" : "no" }), h("td", { text: fmtTime(r.started_at) }))))));
}

async function showSession(db, id) {
  const ses = await api(`/api/session/${id}?db=${db}`);
  const times = [...ses.requests.flatMap((r) => [r.started_at, r.ended_at]), ...ses.tokens.flatMap((t) => [t.iat, t.exp])].filter((t) => t !== null);
  const t0 = Math.min(...times);
  const t1 = Math.max(...times);
  const width = 900;
  const x = (t) => 200 + ((t - t0) / Math.max(1e-3, t1 - t0)) * width;
  const rowsN = ses.tokens.length + ses.requests.length;
  const svg = s("svg", { id: "session-svg", width: width + 380, height: 30 + rowsN * ROW_H });
  let y = 24;
  svg.append(s("text", { x: 200, y: 14, class: "muted", text: `${fmtTime(t0)} → ${((t1 - t0)).toFixed(1)} s` }));
  for (const t of ses.tokens) {
    svg.append(s("text", { x: 4, y: y + 15, text: `token ${String(t.fingerprint).slice(0, 10)}` }));
    if (t.iat !== null && t.exp !== null) svg.append(s("rect", { class: "tokenlife", x: x(t.iat), y: y + 4, width: Math.max(MIN_BAR_W, x(t.exp) - x(t.iat)), height: ROW_H - 8 }, s("title", { text: `iat ${fmtTime(t.iat)} → exp ${fmtTime(t.exp)}` })));
    if (t.exp !== null) svg.append(s("line", { class: "exp", x1: x(t.exp), x2: x(t.exp), y1: 20, y2: 30 + rowsN * ROW_H }));
    y += ROW_H;
  }
  for (const r of ses.requests) {
    const g = s("g", { class: "row", on: { click: () => (location.hash = `#${dbPrefix(db)}/request/${r.trace}`) } });
    g.append(s("text", { x: 4, y: y + 15, text: clip(`#${r.trace} ${r.endpoint}`, 28) }),
      s("rect", { class: `bar o${r.outcome}`, x: x(r.started_at), y: y + 4, width: Math.max(MIN_BAR_W, x(r.ended_at) - x(r.started_at)), height: ROW_H - 8 }),
      s("text", { x: x(r.ended_at) + 4, y: y + 15, text: `${r.ended}${r.expired ? " · token expired" : ""}` }));
    svg.append(g);
    y += ROW_H;
  }
  show(h("h2", { text: `Session ${ses.session}${ses.subject ? ` · ${ses.subject}` : ""}` }), h("a", { href: "#/sessions", text: "← sessions" }),
    h("p", { class: "muted", text: "Token lifetimes (iat → exp, dashed: exp) above the workflow's requests on wall time." }), svg);
}

async function showLatency() {
  const lat = await api("/api/latency");
  const table = (rows, keys, id) => {
    const top = Math.max(1, ...rows.map((r) => r.p99_ms || 0));
    return h("table", { id }, h("thead", {}, h("tr", {}, [...keys, "count", "errors", "error rate", "p50", "p95", "p99", ""].map((t) => h("th", { text: t })))),
      h("tbody", {}, rows.map((r) => h("tr", {}, keys.map((k) => h("td", { text: r[k] })), h("td", { class: "num", text: r.count }), h("td", { class: "num", text: r.errors }),
        h("td", { class: "num", text: `${((r.error_rate || 0) * 100).toFixed(1)} %` }), ["p50_ms", "p95_ms", "p99_ms"].map((p) => h("td", { class: "num", text: fmtMs(r[p]) })),
        h("td", {}, s("svg", { width: 200, height: 12 }, ["p99", "p95", "p50"].map((p) => s("rect", { class: p, x: 0, y: 1, height: 10, width: Math.max(1, ((r[`${p}_ms`] || 0) / top) * 200) }))))))));
  };
  show(h("h2", { text: "Latency" }), h("h3", { text: "Per service" }), table(lat.services, ["service"], "latency-services"),
    h("h3", { text: "Per endpoint" }), table(lat.endpoints, ["service", "endpoint"], "latency-endpoints"));
}

async function showGraph() {
  const g = await api("/api/graph");
  const boxW = 150, boxH = 36, colGap = 120, rowGap = 40;
  const pos = new Map(g.nodes.map((n) => [n.name, { x: 20 + n.column * (boxW + colGap), y: 20 + n.row * (boxH + rowGap) }]));
  const svg = s("svg", { id: "graph-svg", width: 40 + g.columns * (boxW + colGap), height: 40 + g.rows * (boxH + rowGap) });
  for (const e of g.edges) {
    const a = pos.get(e.caller), b = pos.get(e.callee);
    if (!a || !b) continue;
    const x1 = a.x + boxW, y1 = a.y + boxH / 2, x2 = b.x, y2 = b.y + boxH / 2;
    const bend = Math.max(40, Math.abs(x2 - x1) / 2);
    svg.append(s("path", { class: `edge${e.worst ? " failing" : ""}`, d: `M${x1},${y1} C${x1 + bend},${y1} ${x2 - bend},${y2} ${x2},${y2}` }),
      s("text", { class: "edge-label", x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 4, "text-anchor": "middle",
        text: `${e.calls} calls · ${e.errors} 5xx/failed · ${e.client_errors} 4xx · p95 ${fmtMs(e.p95_ms)}` }));
  }
  for (const n of g.nodes) {
    const p = pos.get(n.name);
    svg.append(s("g", { class: `node${n.worst ? ` o${n.worst}` : ""}` }, s("rect", { x: p.x, y: p.y, width: boxW, height: boxH }), s("text", { x: p.x + boxW / 2, y: p.y + 22, "text-anchor": "middle", text: clip(n.name, 20) })));
  }
  show(h("h2", { text: "Service graph" }), h("p", { class: "muted", text: "Columns by call depth from the client; red edges carried 4xx, 5xx or failed calls." }), svg);
}

// ---- live ----------------------------------------------------------------------------

function live() {
  const label = document.getElementById("live-status");
  const events = new EventSource("/api/events");
  events.onmessage = (message) => {
    const status = JSON.parse(message.data);
    const hops = status.dbs.reduce((n, d) => n + d.hops, 0);
    const requests = status.dbs.reduce((n, d) => n + d.requests, 0);
    const findings = status.dbs.reduce((n, d) => n + d.findings, 0);
    const analysing = status.dbs.some((d) => d.analysing);
    label.textContent = analysing ? `${requests} requests · analysing…` : `${requests} requests · ${hops} hops · ${findings} findings · updated ${new Date().toLocaleTimeString()}`;
    if (status.last_error) label.textContent += ` · analysis failed: ${status.last_error}`;
    label.classList.add("live");
    state.serverVersion = status.version;
    if (state.version === -1) return; // the first render is under way and shows this data or asks again
    const onList = location.hash.replace(/^#\/?/, "") === "" || location.hash.startsWith("#/?");
    // A list older than the data, or a view that could not load while the analysis ran: load it again.
    if (status.version !== state.version && (onList || document.querySelector("#main .error-box"))) {
      facets = null;
      state.liveUpdate = true;
      route();
    }
  };
  events.onerror = () => label.classList.remove("live");
}

window.addEventListener("hashchange", route);
window.addEventListener("resize", () => state.request && document.getElementById("waterfall") && drawWaterfall());
document.addEventListener("DOMContentLoaded", () => { route(); live(); });
