// viking ui: renders the model the server pushes (/events) into the page's sections. No
// framework: each section is rebuilt from the model with DOM calls (text, never HTML, so a
// name from etcd cannot inject markup). Open <details> and revealed env stay as they were.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const withToken = (path) =>
  token ? path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token) : path;

const open = new Set(); // job ids whose details are open
const revealed = new Map(); // job id -> env object, once revealed

function el(tag, attrs = {}, ...children) {
  const node = tag === "svg" || attrs.svg
    ? document.createElementNS("http://www.w3.org/2000/svg", tag)
    : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "svg") continue;
    if (k === "text") node.textContent = v;
    else if (k === "class") node.setAttribute("class", v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c != null) node.append(c);
  return node;
}
const svgEl = (tag, attrs = {}, ...children) => el(tag, { ...attrs, svg: true }, ...children);

// A state word with its colour class: colour is never the only signal.
function stateWord(word) {
  const cls = { running: "ok", exited: "ok", alive: "ok", serving: "ok", assigned: "warn",
    pending: "warn", starting: "warn", applied: "ok", draining: "warn", leaving: "warn", failed: "bad",
    lost: "bad", down: "bad", missing: "bad" }[word] || "";
  return el("span", { class: "state " + cls, text: word });
}

function bytes(n) {
  if (n == null) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : Math.round(n)) + " " + units[i];
}
const cores = (milli) => milli == null ? "?" : (milli / 1000).toFixed(milli % 1000 ? 2 : 0);
const rate = (x) => x >= 100 ? Math.round(x).toString() : x.toFixed(1);

function replaceBody(table, rows) {
  const body = document.querySelector(table + " tbody");
  body.replaceChildren(...rows);
}

function renderHosts(model) {
  replaceBody("#hosts", model.hosts.map((h) => {
    const agents = el("ul");
    for (const name of ["registrator", "ambassador", "launcher", "locknet"]) {
      const a = h.agents[name];
      const word = a ? "alive" : "missing";
      agents.append(el("li", {}, name + " ", stateWord(word),
        a && a.since ? el("span", { class: "note", text: " since " + a.since }) : null));
    }
    const state = h.lost ? "lost" : h.draining ? "draining" : h.member ? "serving" : "not a member";
    return el("tr", {},
      el("td", { text: h.name }), el("td", { class: "mono", text: h.addr }),
      el("td", { text: h.roles.join(", ") }),
      el("td", { class: "mono", text: Object.entries(h.labels).map(([k, v]) => k + "=" + v).join(" ") }),
      el("td", {}, agents),
      el("td", { class: "num", text: cores(h.cpus_reserved) + " / " + cores(h.cpus_milli) }),
      el("td", { class: "num", text: bytes(h.memory_reserved) + " / " + (h.memory == null ? "?" : bytes(h.memory)) }),
      el("td", {}, stateWord(state)));
  }));
}

async function reveal(job, button) {
  button.disabled = true;
  const r = await fetch(withToken("/api/env?job=" + encodeURIComponent(job)));
  if (r.ok) { revealed.set(job, await r.json()); render(current); }
  else button.replaceWith(el("span", { class: "state bad", text: "refused: " + r.status }));
}

function renderJob(job) {
  const details = el("details", { "data-job": job.id });
  if (open.has(job.id)) details.open = true;
  details.addEventListener("toggle", () => details.open ? open.add(job.id) : open.delete(job.id));
  const states = job.instances.map((i) => i.state);
  const runningCount = states.filter((s) => s === "running").length;
  details.append(el("summary", {},
    el("strong", { text: job.name }), " ", el("code", { text: job.image }),
    " · scale " + job.scale + " · " + runningCount + " running",
    job.domains.length ? " · " + job.domains.join(", ") : ""));
  const ports = job.ports.map((p) => p.port + "/" + p.proto + (p.ambassador ? " → ambassador " + p.ambassador : "")).join(", ");
  details.append(el("p", {}, "Ports: " + (ports || "none") + ". Links: " + (job.links.join(", ") || "none") + "."));
  const instances = el("table", { class: "instances" },
    el("thead", {}, el("tr", {}, ...["Instance", "Host", "State", "Restarts", "Reason"].map((t) => el("th", { text: t })))),
    el("tbody", {}, ...job.instances.map((i) => el("tr", {},
      el("td", { class: "num", text: i.instance }), el("td", { text: i.host }),
      el("td", {}, stateWord(i.leaving ? "leaving" : i.state)), el("td", { class: "num", text: i.restarts }),
      el("td", { text: i.reason })))));
  details.append(el("h3", { text: "Instances" }), el("div", { class: "scroll" }, instances));
  details.append(el("h3", { text: "Live endpoints" }), job.endpoints.length
    ? el("ul", { class: "endpoints" }, ...job.endpoints.map((e) => el("li", { class: "mono", text: e.addr + " on " + e.host + " (" + e.instance + ")" })))
    : el("p", { class: "note", text: "none registered" }));
  const env = revealed.get(job.id);
  const envRows = job.env_names.map((name) => el("tr", {},
    el("td", { class: "mono", text: name }),
    el("td", { class: "mono", text: env ? (env[name] ?? "") : "••••••" })));
  details.append(el("h3", {}, "Env ", env ? null : el("button", { type: "button", onclick: (e) => reveal(job.id, e.target), text: "reveal values" })),
    job.env_names.length ? el("div", { class: "scroll" }, el("table", { class: "env" }, el("tbody", {}, ...envRows))) : el("p", { class: "note", text: "no env" }));
  return details;
}

function renderStacks(model) {
  const list = document.getElementById("stack-list");
  list.replaceChildren(...(model.stacks.length ? model.stacks.map((s) => el("div", { class: "stack", "data-stack": s.name },
    el("h3", {}, s.name + " ", stateWord(s.running ? "running" : "stopped"),
      s.deployed_at ? el("span", { class: "note", text: " deployed " + s.deployed_at }) : null),
    ...s.jobs.map(renderJob))) : [el("p", { class: "note", text: "No stack deployed (viking deploy)." })]));
}

// Layered layout: a job that links to nothing is in the last column, every other one a column
// before the furthest of what it links to. Within a column, jobs are ordered by where what
// they link to sits (right to left), then by where what links to them sits (left to right):
// fewer crossings. Each edge leaves its job at a height of its own, its label beside it, and
// arrives at a height of its own: nothing is drawn over anything else, at 50 jobs too.
function renderLinks(model) {
  const nodes = model.links.nodes.map((n) => n.id);
  const targets = new Map(nodes.map((id) => [id, []]));
  for (const e of model.links.edges) {
    if (!targets.has(e.to)) { targets.set(e.to, []); nodes.push(e.to); }
    targets.get(e.from).push(e.to);
  }
  const depth = new Map();
  const depthOf = (id, seen = new Set()) => {
    if (depth.has(id)) return depth.get(id);
    if (seen.has(id)) return 0; // a cycle
    seen.add(id);
    const d = Math.max(-1, ...targets.get(id).map((t) => depthOf(t, seen))) + 1;
    depth.set(id, d);
    return d;
  };
  nodes.forEach((id) => depthOf(id));
  const maxDepth = Math.max(0, ...depth.values());
  const columns = [];
  for (const id of [...nodes].sort()) {
    const c = maxDepth - depth.get(id);
    (columns[c] = columns[c] || []).push(id);
  }
  for (let c = 0; c < columns.length; c++) columns[c] = columns[c] || [];
  const sources = new Map(nodes.map((id) => [id, []]));
  for (const e of model.links.edges) sources.get(e.to).push(e.from);
  const row = new Map();
  const place = (col) => col.forEach((id, r) => row.set(id, r / Math.max(1, col.length - 1)));
  const byMean = (col, of) => {
    const mean = (id) => { const rs = of(id).filter((t) => row.has(t)).map((t) => row.get(t));
      return rs.length ? rs.reduce((a, b) => a + b, 0) / rs.length : row.get(id) ?? 0.5; };
    const m = new Map(col.map((id) => [id, mean(id)]));
    col.sort((a, b) => m.get(a) - m.get(b) || (a < b ? -1 : 1));
    place(col);
  };
  place(columns[columns.length - 1] || []);
  for (let c = columns.length - 2; c >= 0; c--) byMean(columns[c], (id) => targets.get(id));
  for (let c = 1; c < columns.length; c++) byMean(columns[c], (id) => sources.get(id));
  const W = 190, H = 28, GX = 150, GY = 18, CHARS = 25;
  const pos = new Map();
  const rows = Math.max(1, ...columns.map((c) => c.length));
  // Shorter columns are centred on the tallest: edges run flatter.
  columns.forEach((col, c) => col.forEach((id, r) => pos.set(id,
    { x: 10 + c * (W + GX), y: 10 + (r + Math.floor((rows - col.length) / 2)) * (H + GY) })));
  const width = 20 + columns.length * (W + GX) - GX;
  const height = 20 + rows * (H + GY);
  // Where on its job's side each edge leaves and arrives: spread over the box's height.
  const slot = (list, id, y) => { const k = list.indexOf(id), n = list.length; return y + H * (k + 1) / (n + 1); };
  const outOf = new Map(nodes.map((id) => [id, model.links.edges.filter((e) => e.from === id).map((e) => e.to)]));
  const svg = svgEl("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": "link graph: " + nodes.length + " jobs, " + model.links.edges.length + " links" });
  svg.append(svgEl("defs", {}, svgEl("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto" }, svgEl("path", { d: "M0,0 L10,5 L0,10 z", fill: "#5b6570" }))));
  // Labels go on top of every edge, each on a halo of the background (style.css).
  const labels = [];
  for (const e of model.links.edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    const x1 = a.x + W, y1 = slot(outOf.get(e.from), e.to, a.y);
    const x2 = b.x, y2 = slot(sources.get(e.to), e.from, b.y);
    const mx = (x1 + x2) / 2;
    // The labels of a job's edges stand one under the other beside it, in the gap that is
    // its own; a job with more links than fit there (4) has them in the edges' titles only.
    const k = outOf.get(e.from).indexOf(e.to);
    const title = svgEl("title", { text: e.from + " → " + e.to + (e.label ? " (" + e.label + ")" : "") });
    const path = svgEl("path", { class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`, "marker-end": "url(#arrow)" });
    if (k < 4 && e.label) labels.push(svgEl("text", { class: "label", "data-from": e.from, "data-to": e.to, x: x1 + 6, y: a.y + 10 + 11 * k, text: e.label }));
    svg.append(svgEl("g", { class: "link", "data-from": e.from, "data-to": e.to }, title, path));
  }
  svg.append(svgEl("g", { class: "labels" }, ...labels));
  for (const id of nodes) {
    const p = pos.get(id);
    // Long names are shortened in the middle; the full one is the box's title.
    const shown = id.length > CHARS ? id.slice(0, 10) + "…" + id.slice(id.length - (CHARS - 11)) : id;
    svg.append(svgEl("g", { class: "node", "data-job": id },
      svgEl("title", { text: id }),
      svgEl("rect", { x: p.x, y: p.y, width: W, height: H, rx: 4 }),
      svgEl("text", { x: p.x + 8, y: p.y + 18, text: shown })));
  }
  document.getElementById("graph").replaceChildren(nodes.length ? svg : el("p", { class: "note", text: "No job deployed." }));
}

function sparkline(history) {
  const w = 120, h = 24;
  const svg = svgEl("svg", { class: "spark", width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: "img",
    "aria-label": "connections per second over the last 5 minutes" });
  if (history.length > 1) {
    const max = Math.max(1, ...history.map((p) => p.conns));
    const points = history.map((p, i) => `${(i / (history.length - 1)) * w},${h - 2 - (p.conns / max) * (h - 4)}`);
    svg.append(svgEl("polyline", { points: points.join(" ") }));
  }
  return svg;
}

function renderTraffic(model) {
  replaceBody("#traffic", model.traffic.length ? model.traffic.map((t) => el("tr", { "data-service": t.service_port },
    el("td", { class: "mono", text: t.service_port }), el("td", { class: "num", text: t.active }),
    el("td", { class: "num", text: t.connections }), el("td", { class: "num", text: rate(t.conns_per_s) }), el("td", { class: "num", text: bytes(t.up_per_s) }),
    el("td", { class: "num", text: bytes(t.down_per_s) }), el("td", { class: "num", text: t.failed }),
    el("td", {}, sparkline(t.history)))) : [el("tr", {}, el("td", { colspan: 8, class: "note", text: "No ambassador has published its counters yet (every 5 s)." }))]);
}

function renderGrid(model) {
  document.getElementById("grid-blocks").replaceChildren(el("div", { class: "blocks" },
    ...model.hosts.map((h) => el("div", { class: "block", "data-host": h.name },
      el("h3", { text: h.name }),
      h.instances.length ? el("ul", {}, ...h.instances.map((i) => el("li", {},
        i.job + "/" + i.instance + " ", stateWord(i.leaving ? "leaving" : i.state))))
        : el("p", { class: "note", text: "no instances" })))));
}

function renderFirewall(model) {
  replaceBody("#firewall", model.firewall.length ? model.firewall.map((f) => el("tr", { "data-host": f.host },
    el("td", { text: f.host }), el("td", {}, stateWord(f.table ? "applied" : "missing")),
    el("td", { class: "num", text: f.members }), el("td", { class: "num", text: f.dropped_packets }),
    el("td", { class: "num", text: bytes(f.dropped_bytes) }), el("td", { class: "note", text: f.at })))
    : [el("tr", {}, el("td", { colspan: 6, class: "note", text: "No locknet --watch has published its status (firewall/<host>, every 5 s)." }))]);
}

// The model as the server sent it: the whole of it first, then the sections that changed
// (each event names only those), merged here; only what changed is drawn again.
const current = {};
const renderers = {
  hosts: [renderHosts, renderGrid],
  stacks: [renderStacks],
  links: [renderLinks],
  traffic: [renderTraffic],
  firewall: [renderFirewall],
};
function render(part) {
  Object.assign(current, part);
  if (!current.hosts) return;
  for (const section of Object.keys(part)) {
    for (const draw of renderers[section] || []) draw(current);
  }
  document.getElementById("status").textContent = "live · updated " + new Date().toLocaleTimeString();
}

function connect() {
  const events = new EventSource(withToken("/events"));
  events.onmessage = (e) => render(JSON.parse(e.data));
  events.onerror = () => {
    document.getElementById("status").textContent = "reconnecting…";
  };
}

fetch(withToken("/api/model")).then((r) => r.ok ? r.json() : null).then((m) => { if (m && m.hosts) render(m); });
connect();
