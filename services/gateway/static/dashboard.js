// MAGI dashboard: one EventSource on /events (a snapshot, then live events), rendered with plain DOM calls.
// Everything shown comes from the cluster, model output included, so it is untrusted: it only ever goes
// into the page as text (textContent, text nodes, data-* attributes), never as markup.
"use strict";

const KEEP_MISSIONS = 30; // as the gateway keeps (services/gateway/cluster_view.py)
const LIVE_MISSIONS = 4; // cards shown in the missions panel; the rest are in the history table

const state = { nodes: [], models: [], report: null, missions: new Map(), problems: {} };
let source = null;

// ---- DOM helpers ----------------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name.startsWith("data-") || name === "title") node.setAttribute(name, String(value));
    else throw new Error("unexpected attribute " + name);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function bar(fraction, label) {
  const pct = Math.max(0, Math.min(100, Math.round((fraction || 0) * 100)));
  const fill = el("span", { class: "fill" + (pct >= 90 ? " hot" : pct >= 70 ? " warm" : "") });
  fill.style.width = pct + "%";
  return el("span", { class: "bar", title: label + " " + pct + "%" }, fill, el("span", { class: "bar-label" }, label));
}

const fmt = {
  gb: (v) => (v || 0).toFixed(1) + " GB",
  ms: (v) => (v >= 1000 ? (v / 1000).toFixed(1) + " s" : Math.round(v || 0) + " ms"),
  pct: (v) => Math.round((v || 0) * 100) + "%",
  time: (epoch) => (epoch ? new Date(epoch * 1000).toLocaleTimeString() : ""),
  short: (text, n) => (text && text.length > n ? text.slice(0, n - 1) + "…" : text || ""),
};

// ---- missions: folded from events as the gateway folds them -----------------------------------------

function applyMissionEvent(ev) {
  let m = state.missions.get(ev.mission_id);
  if (!m || ev.type === "started") {
    m = { mission_id: ev.mission_id, prompt: "", strategy: "", planned: [], clones: [], state: "running",
          at: ev.at, consensus: null, error: "" };
    state.missions.delete(ev.mission_id);
    state.missions.set(ev.mission_id, m);
    while (state.missions.size > KEEP_MISSIONS) state.missions.delete(state.missions.keys().next().value);
  }
  if (ev.type === "started") {
    m.prompt = ev.prompt; m.strategy = ev.strategy; m.planned = ev.clones || [];
  } else if (ev.type === "clone") {
    m.clones = m.clones.filter((c) => c.clone_id !== ev.clone_id).concat([ev]);
  } else if (ev.type === "decided") {
    m.state = "decided"; m.strategy = ev.strategy || m.strategy; m.consensus = ev;
  } else if (ev.type === "failed") {
    m.state = "failed"; m.error = ev.code + ": " + ev.error;
  }
}

// ---- rendering ----------------------------------------------------------------------------------------

function renderSummary() {
  const healthy = state.nodes.filter((n) => n.status === "HEALTHY").length;
  const replicas = state.models.flatMap((m) => m.replicas || []);
  const ready = replicas.filter((r) => r.state === "ready").length;
  const running = [...state.missions.values()].filter((m) => m.state === "running").length;
  document.getElementById("summary").replaceChildren(
    el("span", {}, healthy + "/" + state.nodes.length + " nodes healthy"),
    el("span", {}, ready + "/" + replicas.length + " replicas ready"),
    el("span", {}, running + " missions running"));
}

function renderProblems() {
  const lines = Object.values(state.problems || {});
  const box = document.getElementById("problems");
  box.hidden = lines.length === 0;
  box.replaceChildren(...lines.map((line) => el("span", {}, line)));
}

function renderNodes() {
  const allocated = new Map(((state.report && state.report.nodes) || []).map((n) => [n.name, n]));
  const cards = state.nodes.map((n) => {
    const alloc = allocated.get(n.name);
    const gpus = (n.gpus || []).map((g) =>
      bar(g.memory_total_gb ? g.memory_used_gb / g.memory_total_gb : 0,
          g.name + " " + fmt.gb(g.memory_used_gb) + " / " + fmt.gb(g.memory_total_gb)));
    const instances = (n.instances || []).map((i) =>
      el("li", { "data-instance": i.instance_id, class: "inst " + i.state },
         el("span", { class: "name" }, i.instance_id), el("span", { class: "state" }, i.state),
         i.restarts ? el("span", { class: "restarts" }, i.restarts + " restarts") : null));
    return el("article", { class: "card node " + String(n.status).toLowerCase(), "data-node": n.name },
      el("div", { class: "card-head" }, el("h3", {}, n.name),
         el("span", { class: "badge " + String(n.status).toLowerCase(), "data-status": n.status }, n.status)),
      el("div", { class: "meta" }, (n.host || "") + (n.cpu_count ? " · " + n.cpu_count + " CPUs" : "") +
         (n.heard_s !== null && n.heard_s !== undefined ? " · heard " + n.heard_s + " s ago" : "")),
      bar((n.cpu_percent || 0) / 100, "CPU " + Math.round(n.cpu_percent || 0) + "% · load " + (n.load_1m || 0).toFixed(2)),
      bar((n.ram_percent || 0) / 100, "RAM " + fmt.gb(n.ram_used_gb) + " / " + fmt.gb(n.ram_total_gb)),
      bar((n.disk_percent || 0) / 100, "disk " + Math.round(n.disk_percent || 0) + "% of " + fmt.gb(n.disk_total_gb)),
      gpus,
      alloc ? el("div", { class: "meta" }, "placed " + alloc.instances + "/" + alloc.max_instances +
         " instances · " + fmt.gb(alloc.ram_allocated_gb) + " RAM reserved") : null,
      instances.length ? el("ul", { class: "instances" }, instances) : el("div", { class: "meta" }, "no instances"));
  });
  document.getElementById("nodes").replaceChildren(...(cards.length ? cards : [el("p", { class: "empty" }, "no nodes heard yet")]));
}

function renderModels() {
  const blocks = state.models.map((m) => {
    const rows = (m.replicas || []).map((r) =>
      el("tr", { "data-replica": r.replica, "data-model": m.name, "data-state": r.state, "data-served": r.served },
         el("td", {}, r.replica), el("td", {}, r.node),
         el("td", {}, el("span", { class: "badge " + r.state }, r.state)),
         el("td", { class: "num" }, r.in_flight), el("td", { class: "num" }, r.served),
         el("td", { class: "num" }, (r.tokens_per_s || 0).toFixed(1)),
         el("td", {}, bar(r.utilisation, fmt.pct(r.utilisation)))));
    return el("div", { class: "model", "data-model": m.name },
      el("div", { class: "model-head" }, el("h3", {}, m.name),
         el("span", { class: "meta" }, m.backend + " · roles " + (m.roles || []).join(", ") + " · ctx " + m.n_ctx +
            (m.queued ? " · " + m.queued + " queued" : ""))),
      el("table", { class: "replicas" },
         el("thead", {}, el("tr", {}, ["replica", "node", "state", "in flight", "served", "tok/s", "busy"].map((h) => el("th", {}, h)))),
         el("tbody", {}, rows.length ? rows : [el("tr", {}, el("td", { class: "empty" }, "no replicas"))])));
  });
  document.getElementById("models").replaceChildren(...(blocks.length ? blocks : [el("p", { class: "empty" }, "no models")]));
}

function cloneBox(planned, done, cited) {
  if (!done) {
    return el("div", { class: "clone pending", "data-clone": planned.clone_id, "data-state": "pending" },
      el("div", { class: "clone-head" }, el("b", {}, planned.clone_id), el("span", { class: "meta" }, planned.role),
         el("span", { class: "spinner" }, "running")),
      planned.variation ? el("div", { class: "meta" }, planned.variation) : null);
  }
  return el("div", { class: "clone " + (done.ok ? "ok" : "failed") + (cited ? " cited" : ""), "data-clone": done.clone_id, "data-state": "done" },
    el("div", { class: "clone-head" }, el("b", {}, done.clone_id), el("span", { class: "meta" }, done.role),
       el("span", { class: "meta" }, (done.model || "?") + " @ " + (done.node || "?")),
       el("span", { class: "meta" }, fmt.ms(done.latency_ms)), cited ? el("span", { class: "badge cited" }, "cited") : null),
    done.variation ? el("div", { class: "meta" }, done.variation) : null,
    el("p", { class: "clone-text" }, done.ok ? fmt.short(done.text, 280) : done.error || "failed"));
}

function renderMissions() {
  const recent = [...state.missions.values()].reverse().slice(0, LIVE_MISSIONS);
  const cards = recent.map((m) => {
    const done = new Map(m.clones.map((c) => [c.clone_id, c]));
    const cited = new Set((m.consensus && m.consensus.cited) || []);
    const planned = m.planned.length ? m.planned : m.clones;
    const extra = m.clones.filter((c) => !planned.some((p) => p.clone_id === c.clone_id));
    const c = m.consensus;
    return el("article", { class: "mission " + m.state, "data-mission": m.mission_id, "data-state": m.state },
      el("div", { class: "card-head" }, el("h3", {}, fmt.short(m.prompt, 140) || "mission " + m.mission_id),
         el("span", { class: "badge " + m.state }, m.state)),
      el("div", { class: "meta" }, m.mission_id + " · " + (m.strategy || "?") + " · " + fmt.time(m.at) + " · " +
         done.size + "/" + planned.length + " clones"),
      el("div", { class: "clones" }, planned.map((p) => cloneBox(p, done.get(p.clone_id), cited.has(p.clone_id))),
         extra.map((x) => cloneBox(x, x, cited.has(x.clone_id)))),
      c ? el("div", { class: "consensus", "data-consensus": c.consensus_id || "" },
            el("div", { class: "meta" }, "consensus · " + c.strategy + " · agreement " + fmt.pct(c.agreement) + " · " +
               c.votes + " votes" + (c.winner ? " · winner " + c.winner : "") + (c.total_ms ? " · " + fmt.ms(c.total_ms) : "")),
            el("p", { class: "answer" }, c.answer)) : null,
      m.error ? el("p", { class: "error" }, m.error) : null);
  });
  document.getElementById("missions").replaceChildren(...(cards.length ? cards : [el("p", { class: "empty" }, "no missions yet: run one with `magi mission` or the magi-mission model")]));
}

function renderHistory() {
  const rows = [...state.missions.values()].filter((m) => m.state !== "running").reverse().map((m) => {
    const c = m.consensus;
    return el("tr", { "data-history": m.mission_id },
      el("td", {}, fmt.time(m.at)), el("td", { title: m.prompt }, fmt.short(m.prompt, 60) || m.mission_id),
      el("td", {}, m.strategy), el("td", { class: "num" }, c ? fmt.pct(c.agreement) : "—"),
      el("td", { class: "num" }, m.clones.filter((x) => x.ok).length + "/" + m.clones.length),
      el("td", { class: m.state === "failed" ? "error" : "" }, c ? fmt.short(c.answer, 160) : m.error));
  });
  document.querySelector("#history tbody").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "empty" }, "none yet"))]));
}

function renderAll() {
  renderSummary(); renderProblems(); renderNodes(); renderModels(); renderMissions(); renderHistory();
}

// ---- the feed -----------------------------------------------------------------------------------------

function onMessage(message) {
  const data = JSON.parse(message.data);
  if (data.type === "snapshot") {
    state.nodes = data.nodes; state.models = data.models; state.report = data.report; state.problems = data.problems;
    state.missions = new Map(data.missions.map((m) => [m.mission_id, m]));
    renderAll();
  } else if (data.type === "nodes") {
    state.nodes = data.nodes; renderNodes(); renderSummary();
  } else if (data.type === "models") {
    state.models = data.models; state.problems = data.problems; renderModels(); renderSummary(); renderProblems();
  } else if (data.type === "report") {
    state.report = data.report; state.problems = data.problems; renderNodes(); renderProblems();
  } else if (data.type === "mission") {
    applyMissionEvent(data.event); renderMissions(); renderHistory(); renderSummary();
  }
}

function setLink(live) {
  const pill = document.getElementById("link");
  pill.textContent = live ? "live" : "reconnecting";
  pill.className = "pill " + (live ? "on" : "off");
}

function connect() {
  if (source) source.close();
  source = new EventSource("/events");
  source.onopen = () => setLink(true);
  source.onmessage = onMessage;
  source.onerror = () => {
    setLink(false);
    if (source.readyState === EventSource.CLOSED) checkSession(); // refused (logged out, key revoked): ask again
  };
}

function showLogin(message) {
  if (source) { source.close(); source = null; }
  document.getElementById("board").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("login").hidden = false;
  const error = document.getElementById("login-error");
  error.hidden = !message; error.textContent = message || "";
  document.getElementById("key").focus();
}

function showBoard() {
  document.getElementById("login").hidden = true;
  document.getElementById("board").hidden = false;
  document.getElementById("logout").hidden = false;
  connect();
}

async function checkSession() {
  try {
    const response = await fetch("/api/session", { credentials: "same-origin" });
    if (response.ok) showBoard(); else showLogin("");
  } catch (err) {
    setLink(false);
    setTimeout(checkSession, 3000);
  }
}

async function login(event) {
  event.preventDefault();
  const input = document.getElementById("key");
  const response = await fetch("/login", {
    method: "POST", credentials: "same-origin", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ key: input.value }),
  });
  input.value = "";
  if (response.ok) showBoard(); else showLogin("That key was refused.");
}

async function logout() {
  await fetch("/logout", { method: "POST", credentials: "same-origin" });
  showLogin("");
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", login);
  document.getElementById("logout").addEventListener("click", logout);
  checkSession();
});
