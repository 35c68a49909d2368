// Flywheel's live page: reads Flywheel's own JSON routes every few seconds and draws them.
// Every value from the store is put in the page as text (textContent), never as HTML.
"use strict";

const REFRESH_MS = 5000;
const KEY = "flywheel-admin-key";

function headers(extra) {
  const key = sessionStorage.getItem(KEY);
  return Object.assign({"Content-Type": "application/json"}, key ? {"Authorization": "Bearer " + key} : {}, extra);
}

class NeedsKey extends Error {}

async function getJson(path, options) {
  const response = await fetch(path, Object.assign({headers: headers()}, options));
  if (response.status === 401 || response.status === 403) throw new NeedsKey(path);
  const body = await response.json();
  return {ok: response.ok, status: response.status, body};
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

function show(id, ...nodes) {
  document.getElementById(id).replaceChildren(...nodes);
}

function table(result, columns, cell) {
  if (!result || !result.rows || result.rows.length === 0) return el("p", {class: "hint"}, "nothing yet");
  const names = columns || result.columns;
  const index = names.map((name) => result.columns.indexOf(name));
  const head = el("tr", {}, ...names.map((name) => el("th", {}, name)));
  const rows = result.rows.map((row) => el("tr", {}, ...index.map((i, k) =>
    cell ? cell(names[k], row[i], row, result.columns) : el("td", {}, String(row[i] ?? "")))));
  return el("table", {}, el("thead", {}, head), el("tbody", {}, ...rows));
}

function records(result) {
  return (result && result.rows || []).map((row) => Object.fromEntries(result.columns.map((c, i) => [c, row[i]])));
}

// Held-out and training reward per version, with 95% intervals, as an SVG of points and bars.
function rewardChart(heldout, train) {
  const ns = "http://www.w3.org/2000/svg";
  const series = [["held-out", records(heldout), "#1f6feb"], ["train", records(train), "#d9822b"]];
  const versions = [];
  for (const [, rows] of series) for (const r of rows) if (!versions.includes(r.served_by)) versions.push(r.served_by);
  if (versions.length === 0) return el("p", {class: "hint"}, "no rewarded episodes yet");
  const width = Math.max(480, 110 * versions.length), height = 260, left = 40, bottom = 80, top = 12;
  const x = (i) => left + (i + 0.5) * (width - left) / versions.length;
  const values = series.flatMap(([, rows]) => rows.flatMap((r) => [r.mean_reward - r.ci95, r.mean_reward + r.ci95]));
  const low = Math.min(0, ...values), high = Math.max(1, ...values);
  const y = (v) => top + (height - top - bottom) * (high - v) / (high - low);
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "reward per adapter version");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  for (const tick of [low, (low + high) / 2, high]) {
    add("line", {x1: left, x2: width, y1: y(tick), y2: y(tick), stroke: "#e4e6ea"});
    add("text", {x: 2, y: y(tick) + 4}, tick.toFixed(2));
  }
  series.forEach(([name, rows, colour], s) => {
    for (const r of rows) {
      const cx = x(versions.indexOf(r.served_by)) + (s ? 8 : -8);
      add("line", {x1: cx, x2: cx, y1: y(r.mean_reward - r.ci95), y2: y(r.mean_reward + r.ci95), stroke: colour,
                   "stroke-width": 2});
      add("circle", {cx, cy: y(r.mean_reward), r: 4, fill: colour}, undefined);
      svg.lastChild.append(Object.assign(document.createElementNS(ns, "title"),
        {textContent: `${name} ${r.served_by}: ${r.mean_reward} ± ${r.ci95} (n=${r.episodes})`}));
    }
    add("circle", {cx: left + 10 + 90 * s, cy: height - 10, r: 4, fill: colour});
    add("text", {x: left + 18 + 90 * s, y: height - 6}, name);
  });
  // labels slanted, so long version names ("planner-v3 + writer-v3") never run into each other
  versions.forEach((v, i) => add("text", {x: x(i), y: height - bottom + 12, "text-anchor": "end",
                                          transform: `rotate(-20 ${x(i)} ${height - bottom + 12})`},
                                 v.length > 28 ? v.slice(0, 27) + "…" : v));
  return svg;
}

function adapters(snapshot) {
  const agents = Object.entries(snapshot.agents || {});
  if (agents.length === 0) return el("p", {class: "hint"}, "no adapter versions yet: agents are served by the base model");
  return el("table", {},
    el("thead", {}, el("tr", {}, el("th", {}, "agent"), el("th", {}, "serving"), el("th", {}, "versions"),
                     el("th", {}, ""))),
    el("tbody", {}, ...agents.map(([agent, info]) => {
      const button = el("button", {type: "button"}, "roll back");
      button.disabled = !info.current;
      button.addEventListener("click", () => rollBack(agent, info.current));
      const versions = info.history.map((v) => `${v.served_name} (${v.status})`).join(", ");
      return el("tr", {}, el("td", {}, agent), el("td", {}, info.current || "base model"), el("td", {}, versions),
                el("td", {}, button));
    })));
}

async function rollBack(agent, current) {
  if (!confirm(`Roll ${agent} back from ${current} to its previous version?`)) return;
  const {ok, body} = await getJson(`/v1/adapters/${encodeURIComponent(agent)}/rollback`, {method: "POST", body: "{}"});
  if (!ok) alert(body.error ? body.error.message : "rollback failed");
  refresh();
}

function learner(status) {
  if (!status.ok) return el("p", {class: "hint"}, status.body.error ? status.body.error.message : "no learner");
  const s = status.body;
  const facts = [["learner", s.learner_error || (s.training ? "training" : "idle")],
                 ["updates", s.updates ?? 0], ["buffered episodes", s.buffered_episodes ?? 0],
                 ["waiting for their group", s.waiting_episodes ?? 0], ["episodes received", s.episodes_received ?? 0],
                 ["quarantined", (s.quarantined || []).length], ["last error", s.last_error || s.feed_error || "none"]];
  return el("table", {}, el("tbody", {}, ...facts.map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, String(v))))));
}

function episodes(result) {
  const rows = records(result);
  if (rows.length === 0) return el("p", {class: "hint"}, "no episodes yet");
  return el("div", {}, ...rows.map((e) => {
    const calls = (e.calls || []).map((c) => el("tr", {}, el("td", {}, c.shadow ? `${c.agent} (shadow)` : c.agent),
      el("td", {}, c.adapter || ""),
      el("td", {class: "text"}, c.prompt || ""), el("td", {class: "text"}, c.completion || ""),
      el("td", {}, c.credit === null ? "" : String(c.credit)), el("td", {}, `${c.status} · ${c.latency_ms} ms`)));
    const summary = `${e.started}  ${e.episode_id}  task ${e.task_id || "-"}  reward ${e.reward ?? "-"}  ` +
      `${(e.calls || []).filter((c) => !c.shadow).length} calls${e.eval ? "  (held-out)" : ""}`;
    return el("details", {}, el("summary", {}, summary), el("table", {},
      el("thead", {}, el("tr", {}, ...["agent", "adapter", "prompt", "completion", "credit", "status"].map(
        (h) => el("th", {}, h)))), el("tbody", {}, ...calls)));
  }));
}

async function refresh() {
  try {
    const [dashboard, snapshot, status, ready] = await Promise.all([
      getJson("/v1/dashboard"), getJson("/v1/adapters"), getJson("/v1/learner/status"), getJson("/readyz")]);
    document.getElementById("key-form").hidden = true;
    const d = dashboard.body;
    show("reward-chart", rewardChart(d.heldout, d.train));
    show("heldout-table", table(d.heldout));
    show("agents-table", table(d.agents));
    show("adapters", adapters(snapshot.body));
    show("learner", learner(status));
    const updates = d.updates && {columns: d.updates.columns, rows: d.updates.rows.slice(-20).reverse()};
    show("updates-table", table(updates));
    show("episodes", episodes(d.episodes));
    const line = document.getElementById("status");
    line.textContent = ready.ok ? "ready" : "not ready: " + Object.entries(ready.body.checks || {})
      .filter(([, c]) => !c.ok).map(([name]) => name).join(", ");
    line.className = ready.ok ? "" : "bad";
    document.getElementById("refreshed").textContent = "refreshed " + new Date().toLocaleTimeString();
  } catch (failure) {
    if (failure instanceof NeedsKey) {
      document.getElementById("key-form").hidden = false;
      document.getElementById("status").textContent = "an admin key is needed";
    } else {
      document.getElementById("status").textContent = "proxy unreachable: " + failure.message;
    }
  }
}

document.getElementById("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, document.getElementById("key").value);
  refresh();
});
refresh();
setInterval(refresh, REFRESH_MS);
