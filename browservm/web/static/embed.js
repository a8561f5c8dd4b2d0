// <browservm-viewer> web component: embeds a session's viewer in any page.
//
//   <script type="module" src="https://controller.example/static/embed.js"></script>
//   <browservm-viewer session="SESSION_ID" token="VIEWER_TOKEN"></browservm-viewer>
//
// Attributes: session, token (required); base-url (default: where this script came from); transport
// ("ws" | "whep"); mode ("auto" | "webrtc" | "vnc"). The viewer runs in an iframe so that its keyboard
// capture and styles cannot leak into the host page.
//
// Events on the element (they bubble and cross shadow roots):
//   "browservm-session" {detail: {session_id, status, reason, queue_position?}} on every change of the
//       session: status is the API's (pending, starting, awaiting_user, capturing, completed, failed,
//       expired, cancelled); "completed" means the user is signed in. `element.session` holds the last.
//   "browservm-state" {detail: {state, detail}}: the viewer's connection (connecting, streaming, ...).
// They come from the frame's postMessage, so they work whatever origin the controller has.

const SCRIPT_ORIGIN = new URL(import.meta.url).origin;

class BrowservmViewer extends HTMLElement {
  static observedAttributes = ["session", "token", "base-url", "transport", "mode"];

  constructor() {
    super();
    this.session = null;
    this.onMessage = (event) => this.relay(event);
  }

  connectedCallback() {
    if (!this.shadowRoot) {
      const root = this.attachShadow({ mode: "open" });
      const style = document.createElement("style");
      style.textContent = ":host{display:block;width:100%;height:480px}iframe{border:0;width:100%;height:100%}";
      this.frame = document.createElement("iframe");
      this.frame.allow = "clipboard-read; clipboard-write; autoplay; fullscreen";
      this.frame.allowFullscreen = true;
      this.frame.referrerPolicy = "no-referrer";
      this.frame.title = "remote browser";
      root.append(style, this.frame);
    }
    window.addEventListener("message", this.onMessage);
    this.render();
  }

  disconnectedCallback() {
    window.removeEventListener("message", this.onMessage);
  }

  attributeChangedCallback() {
    if (this.frame) this.render();
  }

  viewerUrl() {
    const session = this.getAttribute("session");
    const token = this.getAttribute("token");
    if (!session || !token) return null;
    const url = new URL(`/view/${encodeURIComponent(session)}`, this.getAttribute("base-url") || SCRIPT_ORIGIN);
    url.searchParams.set("token", token);
    for (const name of ["transport", "mode"]) {
      const value = this.getAttribute(name);
      if (value) url.searchParams.set(name, value);
    }
    return url;
  }

  render() {
    const url = this.viewerUrl();
    if (url && this.frame.src !== url.toString()) this.frame.src = url.toString();
  }

  relay(event) {
    // Only our own frame, from the controller's origin, speaks for this element.
    if (!this.frame || event.source !== this.frame.contentWindow) return;
    const url = this.viewerUrl();
    if (!url || event.origin !== url.origin) return;
    const data = event.data;
    if (!data || data.source !== "browservm") return;
    if (data.type === "session") {
      const detail = { session_id: data.session_id, status: data.status, reason: data.reason || "" };
      if (data.queue_position) detail.queue_position = data.queue_position;
      this.session = detail;
      this.dispatchEvent(new CustomEvent("browservm-session", { detail, bubbles: true, composed: true }));
    } else if (data.type === "state") {
      this.dispatchEvent(new CustomEvent("browservm-state", { detail: { state: data.state, detail: data.detail } }));
    }
  }

  get status() {
    try {
      return this.frame.contentWindow.browservmViewer.status;
    } catch (e) {
      return null;
    }
  }
}

if (!customElements.get("browservm-viewer")) customElements.define("browservm-viewer", BrowservmViewer);
