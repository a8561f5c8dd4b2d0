// The operator's dashboard: list sessions, start a demo session, open a viewer.
// The API key is pasted once and kept in sessionStorage only (gone when the tab closes); it is sent as a
// bearer header to the REST API and never put in a URL.

const KEY = "browservm.apiKey";
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

function viewerLink(session) {
  return session.viewer_url || (session.viewer_token ? `/view/${session.id}?token=${session.viewer_token}` : null);
}

async function refresh() {
  try {
    const data = await api("GET", "/v1/sessions");
    const sessions = Array.isArray(data) ? data : data.data || data.sessions || [];
    const rows = sessions.map((s) => {
      const tr = document.createElement("tr");
      tr.dataset.session = s.id;
      for (const value of [s.id, s.provider, s.user_id, (s.status || s.state) + (s.reason ? ` (${s.reason})` : ""), s.created_at]) {
        const td = document.createElement("td");
        td.textContent = value ?? "";
        tr.append(td);
      }
      const td = document.createElement("td");
      const link = viewerLink(s);
      if (link) {
        const a = document.createElement("a");
        a.href = link;
        a.target = "_blank";
        a.rel = "noopener";
        a.textContent = "view";
        td.append(a);
      }
      tr.append(td);
      return tr;
    });
    $("sessions").replaceChildren(...rows);
    $("key-state").textContent = "key accepted";
    $("panel").hidden = false;
  } catch (error) {
    $("key-state").textContent = `${error.message}`;
  }
}

async function startDemo() {
  say("starting…");
  try {
    const session = await api("POST", "/v1/sessions", { user_id: "dashboard", provider: "demo" });
    say(`session ${session.id} ${session.status || session.state}`);
    await refresh();
    const link = viewerLink(session);
    if (link) window.open(link, "_blank", "noopener");
  } catch (error) {
    say(`could not start: ${error.message}`);
  }
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("api-key").value.trim());
  $("api-key").value = "";
  refresh();
});
$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  $("panel").hidden = true;
  $("sessions").replaceChildren();
  $("key-state").textContent = "key forgotten";
});
$("start-demo").addEventListener("click", startDemo);
$("refresh").addEventListener("click", refresh);
if (apiKey()) refresh();
