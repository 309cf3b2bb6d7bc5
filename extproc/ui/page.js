// extproc-doctor's live page. Plain JS, no library. Every string from the server goes in
// with textContent (never innerHTML): a cluster name or a Host is whatever the mesh sent.
"use strict";

const rows = new Map(); // "cluster\u0000reason" -> row from the server
const opened = new Set(); // keys of rows opened to their detail
let recoveredAfter = 60;
let traceUrl = ""; // serve --ui-trace-url: a template with {trace_id}, or none
let docsUrl = ""; // serve --ui-docs-url: the documentation site, ending in "/", or none
let skew = 0; // server clock minus ours, in seconds

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function keyOf(row) { return row.cluster + "\u0000" + row.reason; }
function now() { return Date.now() / 1000 + skew; }
function clock(seconds) { return new Date(seconds * 1000).toLocaleTimeString(); }
function recovered(row) { return now() - row.last_seen >= recoveredAfter; }
function namespaceOf(row) {
  if (row.destination_rule.includes("/")) return row.destination_rule.split("/")[0];
  const fqdn = row.cluster.split("|").pop(); // Istio: outbound|PORT|SUBSET|name.ns.svc...
  return fqdn.split(".")[1] || "";
}

function apply(message, whole) {
  if (whole) rows.clear();
  recoveredAfter = message.recovered_after;
  traceUrl = message.trace_url || "";
  docsUrl = message.docs_url || "";
  skew = message.now - Date.now() / 1000;
  for (const row of message.rows) rows.set(keyOf(row), row);
  render();
}

function sparkline(counts) {
  const box = el("span", null, "spark");
  const top = Math.max(1, ...counts);
  box.setAttribute("role", "img");
  const total = counts.reduce((a, b) => a + b, 0);
  box.setAttribute("aria-label", total + " failures in the last hour, " + counts[counts.length - 1] + " this minute");
  for (const n of counts) {
    const bar = el("span", null, n ? "" : "zero");
    if (n) bar.style.height = Math.max(2, Math.round((n / top) * 19)) + "px";
    box.append(bar);
  }
  return box;
}

function detail(row) {
  const tr = el("tr", null, "detail");
  const td = el("td");
  td.colSpan = 9;
  const list = el("dl");
  const add = (name, value) => { list.append(el("dt", name), el("dd", value)); };
  add("Hint", row.hint);
  list.append(el("dt", "Reason"), reasonEntry(row.reason));
  for (const [name, value] of Object.entries(row.shared)) add("Shared " + name, value);
  td.append(list);
  const samples = el("table", null, "samples");
  samples.append(el("caption", "The last requests of this row"));
  const head = el("tr");
  for (const name of ["Time", "Method", "Path", "Status", "Host", "Request id", "Trace"]) {
    const th = el("th", name);
    th.scope = "col";
    head.append(th);
  }
  samples.append(head);
  for (const s of row.samples.slice().reverse()) {
    const line = el("tr");
    for (const value of [clock(s.at), s.method, s.path, s.status, s.host, s.request_id]) {
      line.append(el("td", value));
    }
    line.append(traceCell(s.trace_id));
    samples.append(line);
  }
  td.append(samples);
  tr.append(td);
  return tr;
}

// The reason's entry in the catalogue: a link into the documentation site the server
// checked (--ui-docs-url), else where the entry is, as text.
function reasonEntry(reason) {
  const dd = el("dd");
  const anchor = "reason-" + reason;
  if (!docsUrl) {
    dd.textContent = reason + ": its entry is in docs/reasons.md, anchor " + anchor;
    return dd;
  }
  const link = el("a", reason + " in the reason catalogue");
  const target = new URL("reasons/", docsUrl);
  target.hash = encodeURIComponent(anchor);
  link.href = target.href;
  link.rel = "noopener noreferrer";
  dd.append(link);
  return dd;
}

// The server sends only hex trace ids (failures.trace_id_of) and a template it checked.
function traceCell(traceId) {
  const td = el("td");
  if (!traceId) return td;
  if (!traceUrl) {
    td.textContent = traceId;
    return td;
  }
  const link = el("a", traceId);
  link.href = traceUrl.replace("{trace_id}", encodeURIComponent(traceId));
  link.rel = "noopener noreferrer";
  td.append(link);
  return td;
}

function matches(row, filters) {
  if (filters.reason && row.reason !== filters.reason) return false;
  if (filters.cluster && !row.cluster.includes(filters.cluster)) return false;
  if (filters.namespace && namespaceOf(row) !== filters.namespace) return false;
  return true;
}

function render() {
  const filters = {
    reason: document.getElementById("f-reason").value,
    cluster: document.getElementById("f-cluster").value.trim(),
    namespace: document.getElementById("f-namespace").value.trim(),
  };
  const list = [...rows.values()];
  // What matters now: failing before recovered, then this minute's count, then the latest.
  list.sort((a, b) => (recovered(a) - recovered(b))
    || (b.per_minute[b.per_minute.length - 1] - a.per_minute[a.per_minute.length - 1])
    || (b.last_seen - a.last_seen));
  const body = document.getElementById("rows");
  body.replaceChildren();
  let shown = 0;
  for (const row of list) {
    if (!matches(row, filters)) continue;
    shown += 1;
    const key = keyOf(row);
    const done = recovered(row);
    const tr = el("tr", null, done ? "recovered" : "failing");
    tr.dataset.reason = row.reason;
    const state = el("td", null, "state");
    state.textContent = done ? "recovered, no failure since " + clock(row.last_seen) : "failing";
    tr.append(state);
    const reason = el("td");
    const open = el("button", row.reason, "open");
    open.type = "button";
    open.setAttribute("aria-expanded", opened.has(key) ? "true" : "false");
    open.addEventListener("click", () => {
      if (opened.has(key)) opened.delete(key); else opened.add(key);
      render();
    });
    reason.append(open);
    tr.append(reason, el("td", row.cluster, "cluster"), el("td", row.where),
      el("td", row.destination_rule), el("td", row.count));
    const spark = el("td");
    spark.append(sparkline(row.per_minute));
    tr.append(spark, el("td", clock(row.first_seen)), el("td", clock(row.last_seen)));
    body.append(tr);
    if (opened.has(key)) body.append(detail(row));
  }
  document.getElementById("empty").hidden = rows.size > 0;
  const reasons = document.getElementById("f-reason");
  const known = new Set([...reasons.options].map((o) => o.value));
  for (const row of list) {
    if (!known.has(row.reason)) {
      reasons.append(el("option", row.reason));
      known.add(row.reason);
    }
  }
  document.getElementById("status").textContent =
    "Live: " + shown + " of " + rows.size + " rows shown, updated " + clock(now());
}

function renderMesh(mesh) {
  const section = document.getElementById("mesh");
  section.hidden = false;
  const when = mesh.at ? "as of " + clock(mesh.at) : "no answer yet";
  document.getElementById("mesh-status").textContent = "Source: " + mesh.source + ", " + when
    + (mesh.error ? "; last poll failed: " + mesh.error : "");
  const body = document.getElementById("mesh-rows");
  body.replaceChildren();
  for (const row of mesh.rows) {
    const tr = el("tr");
    const hour = mesh.per_reason_hour[row.reason];
    tr.append(el("td", row.reason), el("td", row.cluster, "cluster"),
      el("td", row.per_minute.toFixed(2)), el("td", hour === undefined ? "-" : Math.round(hour)));
    body.append(tr);
  }
}

function connect() {
  // One EventSource per tab; it reconnects by itself with Last-Event-ID.
  const source = new EventSource("/api/events");
  source.addEventListener("resync", (e) => apply(JSON.parse(e.data), true));
  source.addEventListener("update", (e) => apply(JSON.parse(e.data), false));
  source.addEventListener("mesh", (e) => renderMesh(JSON.parse(e.data)));
  source.addEventListener("error", () => {
    document.getElementById("status").textContent = "Disconnected; reconnecting…";
  });
}

document.getElementById("filters").addEventListener("input", render);
document.getElementById("filters").addEventListener("submit", (e) => e.preventDefault());
// Rows turn recovered with time, not with an event: redraw when one does (a redraw
// every second would take the keyboard focus away), else only the status line.
let states = "";
setInterval(() => {
  const now = [...rows.values()].map(recovered).join();
  if (now !== states) { states = now; render(); }
}, 1000);
connect();
