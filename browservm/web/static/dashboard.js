// The operator's dashboard: capacity in use, the queue, every session's state, CLI VMs and their recent
// output; live through GET /v1/events. Start a demo session, open a viewer, cancel a session.
// The API key is pasted once and kept in sessionStorage only (gone when the tab closes); it is sent as a
// bearer header to the REST API (the event stream too: fetch, not EventSource) and never put in a URL.

import { readEvents, StreamError } from "./sse.js";

const KEY = "browservm.apiKey";
const LIVE_RETRY_MS = [1000, 2000, 5000, 10000];
const ENDED = new Set(["completed", "failed", "expired", "cancelled"]);
const $ = (id) => document.getElementById(id);

function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: { Authorization: `Bearer ${apiKey()}`, ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = data.error || {};
    throw new Error(`${response.status} ${error.code || ""}: ${error.message || response.statusText}`);
  }
  return data;
}

function say(text) {
  $("message").textContent = text;
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text ?? "";
  if (className) td.className = className;
  // A long value is cut to fit its column; the whole of it is in the tooltip.
  if (text) td.title = text;
  return td;
}

function button(label, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", onClick);
  return b;
}

function time(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

// ------------------------------------------------------------------------------------------ render

function sessionRow(s) {
  const tr = document.createElement("tr");
  tr.dataset.session = s.id;
  tr.dataset.status = s.status;
  tr.append(
    cell(s.id, "mono"), cell(s.provider), cell(s.user_id),
    cell(s.status, `state state-${s.status}`),
    cell(s.queue_position ? String(s.queue_position) : "", "place"),
    cell(s.reason, "reason"), cell(time(s.created_at)),
  );
  const actions = document.createElement("td");
  actions.className = "actions";
  if (!ENDED.has(s.status)) {
    const a = document.createElement("a");
    a.href = s.viewer_url;
    a.target = "_blank";
    a.rel = "noopener";
    a.textContent = "view";
    actions.append(a, " ");
    if (s.status !== "capturing") actions.append(button("cancel", () => cancel(s.id)));
  }
  tr.append(actions);
  return tr;
}

function cliVmRow(vm) {
  const tr = document.createElement("tr");
  tr.dataset.user = vm.user_id;
  tr.append(cell(vm.user_id), cell(vm.state, `state state-${vm.state}`), cell(vm.sandbox_id, "mono"),
    cell(time(vm.created_at)));
  const actions = document.createElement("td");
  actions.className = "actions";
  actions.append(button("output", () => showOutput(vm.user_id)));
  tr.append(actions);
  return tr;
}

function renderCapacity(c) {
  const meter = $("capacity-meter");
  meter.max = c.limit;
  meter.value = c.in_use;
  const warm = c.warm_idle ? ` (${c.warm_idle} idle warm)` : "";
  const waiting = c.queued ? ` · ${c.queued} waiting for a slot (at most ${c.max_queued})` : " · nobody waiting";
  $("capacity-text").textContent = `${c.in_use} of ${c.limit} sandboxes in use${warm}${waiting}`;
  $("capacity").dataset.full = c.in_use >= c.limit ? "yes" : "no";
}

async function refresh() {
  try {
    const [page, capacity, cliVms] = await Promise.all([
      api("GET", "/v1/sessions?limit=100"), api("GET", "/v1/capacity"), api("GET", "/v1/cli-vms"),
    ]);
    $("sessions").replaceChildren(...page.data.map(sessionRow));
    $("cli-vms").replaceChildren(...cliVms.map(cliVmRow));
    renderCapacity(capacity);
    $("key-state").textContent = "key accepted";
    $("panel").hidden = false;
    return true;
  } catch (error) {
    $("key-state").textContent = `${error.message}`;
    return false;
  }
}

// Many events come in bursts (a session's status, its sandbox's state...): one refresh per burst.
let refreshTimer = null;
function refreshSoon() {
  if (refreshTimer) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    refresh();
  }, 100);
}

// ------------------------------------------------------------------------------------------ live

let liveAbort = null;

async function followEvents() {
  if (liveAbort) liveAbort.abort();
  const abort = new AbortController();
  liveAbort = abort;
  let lastId = null;
  let attempt = 0;
  while (!abort.signal.aborted) {
    try {
      await readEvents("/v1/events", {
        headers: { Authorization: `Bearer ${apiKey()}` },
        lastEventId: lastId,
        signal: abort.signal,
        onEvent: (event) => {
          attempt = 0;
          if (event.id) lastId = event.id;
          refreshSoon();
        },
      });
    } catch (error) {
      if (abort.signal.aborted) return;
      if (error instanceof StreamError && error.status === 401) {
        setLive(false, "key refused");
        return;
      }
    }
    if (abort.signal.aborted) return;
    setLive(false, "reconnecting");
    await new Promise((resolve) => setTimeout(resolve, LIVE_RETRY_MS[Math.min(attempt++, LIVE_RETRY_MS.length - 1)]));
    refreshSoon(); // what happened while the stream was down
  }
}

function setLive(on, text) {
  $("live").dataset.live = on ? "on" : "off";
  $("live").textContent = text;
}

async function start() {
  if (!(await refresh())) return;
  setLive(true, "live");
  followEvents();
}

// ------------------------------------------------------------------------------------------ actions

async function cancel(sessionId) {
  say(`cancelling ${sessionId}…`);
  try {
    await api("POST", `/v1/sessions/${encodeURIComponent(sessionId)}/cancel`);
    say(`cancelled ${sessionId}`);
  } catch (error) {
    say(`could not cancel: ${error.message}`);
  }
  refreshSoon();
}

async function showOutput(userId) {
  $("output-user").textContent = userId;
  $("output").hidden = false;
  try {
    const data = await api("GET", `/v1/users/${encodeURIComponent(userId)}/cli-vm/output`);
    const runs = data.runs.map((run) => {
      const box = document.createElement("div");
      box.className = "run";
      const head = document.createElement("p");
      const ending = run.ended_at ? `exit ${run.exit_code}${run.timed_out ? " (timed out)" : ""}` : "running";
      head.textContent = `$ ${run.argv.join(" ")}  ·  ${time(run.started_at)}  ·  ${ending}`;
      const pre = document.createElement("pre");
      pre.textContent = (run.truncated ? "[earlier output cut]\n" : "") + run.output;
      box.append(head, pre);
      return box;
    });
    if (!runs.length) {
      const none = document.createElement("p");
      none.textContent = "No command has run in this CLI VM since the controller started.";
      runs.push(none);
    }
    $("output-runs").replaceChildren(...runs);
  } catch (error) {
    $("output-runs").textContent = `could not read the output: ${error.message}`;
  }
}

async function startDemo() {
  say("starting…");
  try {
    const session = await api("POST", "/v1/sessions", { user_id: "dashboard", provider: "demo" });
    say(`session ${session.id} ${session.status}`);
    refreshSoon();
    window.open(session.viewer_url, "_blank", "noopener");
  } catch (error) {
    say(`could not start: ${error.message}`);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  $("api-key").value = "";
  start();
});
$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  if (liveAbort) liveAbort.abort();
  liveAbort = null;
  setLive(false, "not live");
  $("panel").hidden = true;
  $("sessions").replaceChildren();
  $("cli-vms").replaceChildren();
  $("key-state").textContent = "key forgotten";
});
$("start-demo").addEventListener("click", startDemo);
$("refresh").addEventListener("click", refresh);
$("output-close").addEventListener("click", () => { $("output").hidden = true; });
if (apiKey()) start();
