// <browservm-viewer> web component: embeds a session's viewer in any page.
//
//   <script type="module" src="https://controller.example/static/embed.js"></script>
//   <browservm-viewer session="SESSION_ID" token="VIEWER_TOKEN"></browservm-viewer>
//
// Attributes: session, token (required); base-url (default: where this script came from); transport
// ("ws" | "whep"); mode ("auto" | "webrtc" | "vnc"). The viewer runs in an iframe so that its keyboard
// capture and styles cannot leak into the host page. State changes are re-dispatched on the element as
// "browservm-state" events ({detail: {state}}), read from the frame when it is same-origin.

const SCRIPT_ORIGIN = new URL(import.meta.url).origin;

class BrowservmViewer extends HTMLElement {
  static observedAttributes = ["session", "token", "base-url", "transport", "mode"];

  connectedCallback() {
    if (!this.shadowRoot) {
      const root = this.attachShadow({ mode: "open" });
      const style = document.createElement("style");
      style.textContent = ":host{display:block;width:100%;height:480px}iframe{border:0;width:100%;height:100%}";
      this.frame = document.createElement("iframe");
      this.frame.allow = "clipboard-read; clipboard-write; autoplay; fullscreen";
      this.frame.referrerPolicy = "no-referrer";
      this.frame.title = "remote browser";
      root.append(style, this.frame);
    }
    this.render();
  }

  attributeChangedCallback() {
    if (this.frame) this.render();
  }

  render() {
    const session = this.getAttribute("session");
    const token = this.getAttribute("token");
    if (!session || !token) return;
    const url = new URL(`/view/${encodeURIComponent(session)}`, this.getAttribute("base-url") || SCRIPT_ORIGIN);
    url.searchParams.set("token", token);
    for (const name of ["transport", "mode"]) {
      const value = this.getAttribute(name);
      if (value) url.searchParams.set(name, value);
    }
    if (this.frame.src !== url.toString()) {
      this.frame.src = url.toString();
      this.frame.addEventListener("load", () => this.follow(), { once: true });
    }
  }

  follow() {
    let inner;
    try {
      inner = this.frame.contentDocument && this.frame.contentDocument.querySelector(".bvm-viewer");
    } catch (e) {
      return; // cross-origin: the host page cannot watch, which is fine
    }
    if (!inner) return;
    inner.addEventListener("browservm-state", (event) => {
      this.dispatchEvent(new CustomEvent("browservm-state", { detail: event.detail }));
    });
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
