// The browservm viewer: shows one session's remote browser and sends the user's input to it.
//
// WebRTC first (ICE servers from the controller, signaling over a WebSocket or WHEP), noVNC through the
// controller's VNC bridge when WebRTC fails or shows no frame in time. Plain ES module, no build step.
//
// Page <-> controller signaling messages (JSON over WS /v1/sessions/{id}/signal):
//   page -> controller: {type:"offer", sdp} | {type:"candidate", candidate} | {type:"bye"}
//   controller -> page: {type:"hello", peer_id} | {type:"answer", sdp} | {type:"candidate", candidate}
//                       | {type:"connected"} | {type:"closed", reason} | {type:"error", code, message}
// Input travels on the data channel "input" as JSON {t: "move"|"down"|"up"|"wheel"|"key"|"text"|
// "clipboard"|"ping"|"resize", ...}; see browservm/guest/xinput.py for the receiving end.
//
// The page follows its session's state (GET /v1/sessions/{id}/viewer-events, with the viewer token) and
// shows it: the place in line while the session waits, "starting", the remote browser while the user
// signs in, and a screen for each ending. It connects the media only while the login page is up, and on
// every change of the session it dispatches a "browservm-session" CustomEvent on window and posts
// {source: "browservm", type: "session", session_id, status, reason[, queue_position]} to its parent frame.

import { readEvents, StreamError } from "./sse.js";

const FIRST_FRAME_TIMEOUT_MS = 6000;
const GATHER_TIMEOUT_MS = 2000;
const DISCONNECTED_GRACE_MS = 2500;
const RESTART_TIMEOUT_MS = 5000;
const RECONNECT_DELAYS_MS = [500, 1000, 2000, 4000, 8000];
// Without news of the session (its status stream is down too), stop retrying the media after about a
// minute and a half; while the session is known to be live, retry for as long as it lives.
const MAX_BLIND_ATTEMPTS = 12;
const STATUS_RETRY_MS = [1000, 2000, 4000, 8000];
const RESIZE_SETTLE_MS = 250;
const TOKEN_KEY = (sessionId) => `browservm.viewer.${sessionId}`;

// Session statuses in which the login page is on the remote screen.
const SHOWING = new Set(["awaiting_user", "capturing"]);
const TERMINAL = new Set(["completed", "failed", "expired", "cancelled"]);

// What the user reads at each status (the reason line under it comes from the controller).
const SCREENS = {
  pending: { title: "Waiting for a free browser", text: "This page continues by itself when it is your turn." },
  starting: { title: "Starting a secure browser for you", text: "This takes a few seconds." },
  completed: { title: "You are signed in", text: "You can close this page now." },
  cancelled: { title: "Sign-in cancelled", text: "" },
  failed: { title: "Sign-in failed", text: "" },
  expired: { title: "This sign-in has expired", text: "" },
  unauthorized: {
    title: "This link cannot open the sign-in",
    text: "It has expired or is not valid. Ask the service that sent you here for a new link.",
  },
};

function wsUrl(base, path) {
  const url = new URL(path, base);
  url.protocol = url.protocol === "https:" ? "wss:" : "ws:";
  return url.toString();
}

function waitForGathering(pc, timeoutMs) {
  // The streamer (aiortc) answers once with all its candidates and takes ours best in the offer
  // itself, so send a complete offer; trickle whatever still comes after the timeout.
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      pc.removeEventListener("icegatheringstatechange", check);
      clearTimeout(timer);
      resolve();
    };
    const check = () => {
      if (pc.iceGatheringState === "complete") done();
    };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener("icegatheringstatechange", check);
  });
}

// Map a point on the <video> element to remote screen pixels. The video is shown with
// object-fit: contain, so bars may sit left/right or top/bottom: points on a bar are clamped.
export function mapPointer(clientX, clientY, rect, remoteWidth, remoteHeight) {
  if (!remoteWidth || !remoteHeight || !rect.width || !rect.height) return null;
  const scale = Math.min(rect.width / remoteWidth, rect.height / remoteHeight);
  const offsetX = (rect.width - remoteWidth * scale) / 2;
  const offsetY = (rect.height - remoteHeight * scale) / 2;
  const x = (clientX - rect.left - offsetX) / scale;
  const y = (clientY - rect.top - offsetY) / scale;
  return {
    x: Math.max(0, Math.min(remoteWidth - 1, Math.round(x))),
    y: Math.max(0, Math.min(remoteHeight - 1, Math.round(y))),
    inside: x >= 0 && y >= 0 && x < remoteWidth && y < remoteHeight,
  };
}

// ------------------------------------------------------------------------------------------ signaling

class WebSocketSignaling {
  constructor(viewer) {
    this.viewer = viewer;
    this.ws = null;
    this.peerId = null;
    this.onAnswer = null;
    this.onCandidate = null;
    this.onClosed = null;
  }

  open() {
    const v = this.viewer;
    const url = wsUrl(v.baseUrl, `/v1/sessions/${encodeURIComponent(v.sessionId)}/signal`);
    const ws = new WebSocket(`${url}?token=${encodeURIComponent(v.token)}`);
    this.ws = ws;
    return new Promise((resolve, reject) => {
      ws.onopen = () => resolve();
      ws.onerror = () => reject(new Error("signaling WebSocket failed to open"));
      ws.onclose = (event) => {
        reject(new Error(`signaling closed (${event.code} ${event.reason})`));
        if (this.ws === ws && this.onClosed) this.onClosed(`signaling closed: ${event.code} ${event.reason}`);
      };
      ws.onmessage = (event) => this.handle(JSON.parse(event.data));
    });
  }

  handle(msg) {
    if (msg.type === "hello") this.peerId = msg.peer_id;
    else if (msg.type === "answer" && this.onAnswer) this.onAnswer(msg.sdp);
    else if (msg.type === "candidate" && this.onCandidate) this.onCandidate(msg.candidate);
    else if (msg.type === "closed" && this.onClosed) this.onClosed(`peer closed: ${msg.reason || ""}`);
    else if (msg.type === "error") {
      this.viewer.log(`signaling error ${msg.code}: ${msg.message}`);
      if (this.onClosed) this.onClosed(`${msg.code}: ${msg.message}`);
    }
  }

  async exchange(sdp) {
    const answer = new Promise((resolve) => { this.onAnswer = resolve; });
    this.send({ type: "offer", sdp });
    return answer;
  }

  sendCandidate(candidate) {
    this.send({ type: "candidate", candidate });
  }

  send(msg) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(msg));
  }

  close() {
    const ws = this.ws;
    this.ws = null;
    if (ws) {
      try { ws.send(JSON.stringify({ type: "bye" })); } catch (e) { /* already closing */ }
      ws.close();
    }
  }
}

class WhepSignaling {
  // RFC 9725-style: POST the offer, PATCH trickled candidates, DELETE the resource when done.
  constructor(viewer) {
    this.viewer = viewer;
    this.resource = null;
    this.onCandidate = null;
    this.onClosed = null;
    this.pendingCandidates = [];
  }

  async open() {}

  async exchange(sdp) {
    const v = this.viewer;
    const response = await fetch(new URL(`/v1/sessions/${encodeURIComponent(v.sessionId)}/whep`, v.baseUrl), {
      method: "POST",
      headers: { "Content-Type": "application/sdp", Authorization: `Bearer ${v.token}` },
      body: sdp,
    });
    if (response.status !== 201) throw new Error(`WHEP POST answered ${response.status}`);
    this.resource = new URL(response.headers.get("Location"), v.baseUrl).toString();
    const answer = await response.text();
    for (const candidate of this.pendingCandidates.splice(0)) this.sendCandidate(candidate);
    return answer;
  }

  sendCandidate(candidate) {
    if (!this.resource) {
      this.pendingCandidates.push(candidate);
      return;
    }
    const lines = candidate && candidate.candidate
      ? [`a=mid:${candidate.sdpMid ?? "0"}`, `a=${candidate.candidate}`]
      : ["a=end-of-candidates"];
    fetch(this.resource, {
      method: "PATCH",
      headers: { "Content-Type": "application/trickle-ice-sdpfrag", Authorization: `Bearer ${this.viewer.token}` },
      body: lines.join("\r\n") + "\r\n",
    }).catch(() => { /* trickle is best effort: the offer already held our candidates */ });
  }

  close() {
    const resource = this.resource;
    this.resource = null;
    if (resource) {
      fetch(resource, { method: "DELETE", headers: { Authorization: `Bearer ${this.viewer.token}` } })
        .catch(() => {});
    }
  }
}

// ------------------------------------------------------------------------------------------ viewer

export class Viewer {
  constructor(root, options) {
    this.root = root;
    this.sessionId = options.sessionId;
    this.token = options.token;
    this.baseUrl = options.baseUrl || window.location.origin;
    this.transport = options.transport || "ws"; // "ws" | "whep"
    this.icePolicy = options.icePolicy || "all"; // "all" | "relay"
    this.forceMode = options.mode || "auto"; // "auto" | "webrtc" | "vnc"
    this.firstFrameTimeoutMs = options.firstFrameTimeoutMs || FIRST_FRAME_TIMEOUT_MS;

    this.video = root.querySelector("video");
    this.vncBox = root.querySelector(".bvm-vnc");
    this.stateEl = root.querySelector(".bvm-state");
    this.statsEl = root.querySelector(".bvm-stats");
    this.switchButton = root.querySelector(".bvm-switch");
    this.fullscreenButton = root.querySelector(".bvm-fullscreen");
    this.keyboardButton = root.querySelector(".bvm-keyboard");
    this.keysInput = root.querySelector(".bvm-keys");
    this.overlay = root.querySelector(".bvm-overlay");

    // What tests and embedding pages can read: window.browservmViewer.status.
    this.status = {
      state: "idle", mode: null, frames: 0, reconnects: 0, fallbackReason: null,
      remoteWidth: 0, remoteHeight: 0, stats: {}, log: [],
      session: null, // the last {session_id, status, reason, queue_position} the controller sent
    };
    this.mediaStarted = false;
    this.statusAbort = null;
    this.sentSize = null;
    this.pc = null;
    this.signaling = null;
    this.input = null;
    this.rfb = null;
    this.generation = 0;
    this.reconnectAttempt = 0;
    this.restartFrames = null; // frames shown when an ICE restart was answered; null when none runs
    this.statsTimer = null;
    this.lastBytes = null;
    this.pressed = new Set();

    this.bindInput();
    this.bindControls();
    this.watchSize();
    if (this.switchButton) this.switchButton.addEventListener("click", () => this.switchMode());
  }

  log(line) {
    this.status.log.push(`${new Date().toISOString()} ${line}`);
    if (this.status.log.length > 100) this.status.log.shift();
  }

  setState(state, detail) {
    this.status.state = state;
    this.root.dataset.state = state;
    if (this.stateEl) this.stateEl.textContent = detail ? `${state}: ${detail}` : state;
    this.log(`state ${state}${detail ? ` (${detail})` : ""}`);
    this.root.dispatchEvent(new CustomEvent("browservm-state", { detail: { state, detail } }));
    if (window.parent !== window) window.parent.postMessage({ source: "browservm", type: "state", state, detail }, "*");
  }

  start() {
    if (!this.token) {
      this.showScreen("unauthorized", "");
      this.setState("failed", "no viewer token");
      return;
    }
    this.followSession();
  }

  startMedia() {
    if (this.mediaStarted) return;
    this.mediaStarted = true;
    if (this.forceMode === "vnc") this.startVnc("requested");
    else this.startWebRtc();
  }

  stopMedia() {
    this.mediaStarted = false;
    this.stopWebRtc();
    this.stopVnc();
  }

  // ---------------------------------------------------------------------------------------- session

  async followSession() {
    // The session's state, from the controller, until it ends. The media connects once the login page
    // is up; a stream that cannot even start (an older controller, a network fault) does not hold the
    // media back, and is retried meanwhile.
    const url = new URL(`/v1/sessions/${encodeURIComponent(this.sessionId)}/viewer-events`, this.baseUrl);
    let attempt = 0;
    for (;;) {
      const abort = new AbortController();
      this.statusAbort = abort;
      try {
        await readEvents(url, {
          headers: { Authorization: `Bearer ${this.token}` },
          signal: abort.signal,
          onEvent: (event) => {
            attempt = 0;
            if (event.event === "session") this.onSession(JSON.parse(event.data));
          },
        });
      } catch (error) {
        if (abort.signal.aborted) return;
        if (error instanceof StreamError && (error.status === 401 || error.status === 403)) {
          this.log(`session stream refused: ${error.status} ${error.code}`);
          this.endWith("unauthorized", "");
          return;
        }
        this.log(`session stream failed: ${error.message || error}`);
        if (!this.status.session) this.startMedia();
      }
      const session = this.status.session;
      if (session && TERMINAL.has(session.status)) return;
      const delay = STATUS_RETRY_MS[Math.min(attempt, STATUS_RETRY_MS.length - 1)];
      attempt += 1;
      await new Promise((resolve) => setTimeout(resolve, delay));
      if (this.statusAbort !== abort) return; // closed meanwhile
    }
  }

  onSession(session) {
    const previous = this.status.session;
    this.status.session = session;
    this.root.dataset.sessionStatus = session.status;
    const changed = !previous || previous.status !== session.status || previous.reason !== session.reason
      || previous.queue_position !== session.queue_position;
    if (changed) this.announce(session);
    if (TERMINAL.has(session.status)) {
      this.endWith(session.status, session.reason);
    } else if (SHOWING.has(session.status)) {
      this.hideScreen();
      this.root.dataset.finishing = session.status === "capturing" ? "on" : "off";
      this.startMedia();
    } else {
      // Waiting for a slot or for the browser to start: nothing to show yet, nothing to connect to.
      if (this.mediaStarted) this.stopMedia();
      const place = session.queue_position;
      const screen = SCREENS[session.status] || SCREENS.starting;
      const detail = session.status === "pending" && place
        ? `You are number ${place} in line. ${screen.text}` : screen.text;
      this.showScreen(session.status, "", detail);
      this.setState("waiting", session.status === "pending" && place ? `queued, number ${place}` : session.status);
    }
  }

  announce(session) {
    // The contract with the operator's page: a DOM event here and a message to the parent frame.
    const detail = { session_id: session.session_id, status: session.status, reason: session.reason || "" };
    if (session.queue_position) detail.queue_position = session.queue_position;
    this.log(`session ${detail.status}${detail.reason ? ` (${detail.reason})` : ""}`);
    // Dispatched on the viewer element, it bubbles up to window.
    this.root.dispatchEvent(new CustomEvent("browservm-session", { detail, bubbles: true, composed: true }));
    if (window.parent !== window) {
      // The embedder's origin is unknown here (no Referer is sent); frame-ancestors limits who embeds.
      window.parent.postMessage({ source: "browservm", type: "session", ...detail }, "*");
    }
  }

  endWith(kind, reason) {
    // The session is over (or this link cannot follow it): no more reconnecting, say what happened.
    this.stopMedia();
    if (this.statusAbort) this.statusAbort.abort();
    this.statusAbort = null;
    this.root.dataset.finishing = "off";
    if (this.switchButton) this.switchButton.hidden = true;
    this.showScreen(kind, reason);
    this.setState("ended", kind);
  }

  showScreen(kind, reason, text) {
    if (!this.overlay) return;
    const screen = SCREENS[kind] || { title: kind, text: "" };
    this.overlay.dataset.kind = kind;
    this.overlay.querySelector(".bvm-title").textContent = screen.title;
    this.overlay.querySelector(".bvm-reason").textContent = reason || "";
    this.overlay.querySelector(".bvm-text").textContent = text ?? screen.text;
    this.overlay.hidden = false;
    this.root.dataset.screen = kind;
  }

  hideScreen() {
    if (this.overlay) this.overlay.hidden = true;
    this.root.dataset.screen = "";
  }

  // ---------------------------------------------------------------------------------------- controls

  // ---------------------------------------------------------------------------------------- screen size

  watchSize() {
    // The remote screen follows this viewer's size (in CSS pixels, so a phone gets a page laid out for
    // a phone); the guest clamps it to its configured bounds, and the video's own size shows the result.
    const screen = this.root.querySelector(".bvm-screen");
    if (!screen || !("ResizeObserver" in window)) return;
    let timer = null;
    new ResizeObserver(() => {
      clearTimeout(timer);
      timer = setTimeout(() => this.askForSize(), RESIZE_SETTLE_MS); // one request once a drag settles
    }).observe(screen);
  }

  askForSize() {
    const screen = this.root.querySelector(".bvm-screen");
    if (!screen) return;
    const width = Math.round(screen.clientWidth / 2) * 2;
    const height = Math.round(screen.clientHeight / 2) * 2;
    if (!width || !height) return;
    if (this.sentSize && this.sentSize.width === width && this.sentSize.height === height) return;
    if (this.send({ t: "resize", width, height })) {
      this.sentSize = { width, height };
      this.status.requestedSize = { width, height };
    }
  }

  bindControls() {
    const button = this.fullscreenButton;
    if (button) {
      if (!document.fullscreenEnabled) button.hidden = true; // e.g. an iframe without allow="fullscreen"
      button.addEventListener("click", () => this.toggleFullscreen());
      document.addEventListener("fullscreenchange", () => {
        const on = document.fullscreenElement === this.root;
        button.textContent = on ? "Exit full screen" : "Full screen";
        button.setAttribute("aria-pressed", on ? "true" : "false");
        this.root.dataset.fullscreen = on ? "on" : "off";
      });
    }
    if (this.keyboardButton && this.keysInput) {
      // A touch device has no keyboard until a text field has focus: this one stands in for the remote's.
      const touch = window.matchMedia("(pointer: coarse)").matches || navigator.maxTouchPoints > 0;
      this.keyboardButton.hidden = !touch;
      this.keyboardButton.addEventListener("click", () => this.openKeyboard());
      this.bindKeysInput(this.keysInput);
    }
  }

  async toggleFullscreen() {
    try {
      if (document.fullscreenElement) await document.exitFullscreen();
      else await this.root.requestFullscreen({ navigationUI: "hide" });
    } catch (error) {
      this.log(`full screen refused: ${error}`);
    }
  }

  openKeyboard() {
    this.keysInput.value = "";
    this.keysInput.focus({ preventScroll: true });
  }

  bindKeysInput(input) {
    const special = new Map([
      ["Enter", 0xff0d], ["Backspace", 0xff08], ["Tab", 0xff09], ["Escape", 0xff1b], ["Delete", 0xffff],
      ["ArrowLeft", 0xff51], ["ArrowUp", 0xff52], ["ArrowRight", 0xff53], ["ArrowDown", 0xff54],
    ]);
    input.addEventListener("keydown", (event) => {
      // Keys that edit or move: sent as keys. Characters arrive as input events (virtual keyboards send
      // keydown "Unidentified" for them).
      if (!special.has(event.key)) return;
      event.preventDefault();
      this.pressKey(event.key, special.get(event.key));
    });
    input.addEventListener("input", (event) => {
      if (event.isComposing) return;
      if (event.inputType === "deleteContentBackward") this.pressKey("Backspace", 0xff08);
      else if (event.inputType === "insertLineBreak") this.pressKey("Enter", 0xff0d);
      else if (event.data) this.typeText(event.data);
      input.value = "";
    });
    input.addEventListener("compositionend", (event) => {
      if (event.data) this.typeText(event.data);
      input.value = "";
    });
  }

  pressKey(key, keysym) {
    if (this.status.mode === "vnc" && this.rfb) {
      this.rfb.sendKey(keysym, key);
      return;
    }
    this.send({ t: "key", key, code: key, down: true });
    this.send({ t: "key", key, code: key, down: false });
  }

  typeText(text) {
    if (this.status.mode === "vnc" && this.rfb) {
      for (const char of text) {
        const point = char.codePointAt(0);
        this.rfb.sendKey(point < 0x100 ? point : 0x01000000 + point, null);
      }
      return;
    }
    this.send({ t: "text", text });
  }

  switchMode() {
    if (!this.mediaStarted) return; // nothing to switch before the sign-in page is up, or after the end
    if (this.status.mode === "vnc") {
      this.stopVnc();
      this.forceMode = "auto";
      this.reconnectAttempt = 0;
      this.startWebRtc();
    } else {
      this.stopWebRtc();
      this.startVnc("switched by the user");
    }
  }

  // ---------------------------------------------------------------------------------------- WebRTC

  async startWebRtc() {
    const generation = ++this.generation;
    this.status.mode = "webrtc";
    this.root.dataset.mode = "webrtc";
    this.video.hidden = false;
    if (this.vncBox) this.vncBox.hidden = true;
    if (this.switchButton) this.switchButton.textContent = "Use VNC";
    this.setState("connecting");
    this.status.frames = 0;
    try {
      const iceServers = await this.fetchIceServers();
      if (generation !== this.generation) return;
      const pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: this.icePolicy });
      this.pc = pc;
      pc.addTransceiver("video", { direction: "recvonly" });
      this.input = pc.createDataChannel("input", { ordered: true });
      this.input.onopen = () => {
        this.log("input channel open");
        this.send({ t: "ping", ts: performance.now() });
        this.sentSize = null;
        this.askForSize();
      };
      this.input.onmessage = (event) => this.onInputMessage(event.data);
      pc.ontrack = (event) => {
        if (this.video.srcObject !== event.streams[0]) {
          this.video.srcObject = event.streams[0] || new MediaStream([event.track]);
        }
        this.video.play().catch(() => {});
      };
      pc.onconnectionstatechange = () => this.onConnectionState(pc, generation);

      const signaling = this.transport === "whep" ? new WhepSignaling(this) : new WebSocketSignaling(this);
      this.signaling = signaling;
      signaling.onCandidate = (candidate) => {
        if (candidate) pc.addIceCandidate(candidate).catch((e) => this.log(`remote candidate: ${e}`));
      };
      signaling.onClosed = (why) => {
        if (generation === this.generation && this.status.mode === "webrtc") this.scheduleReconnect(why);
      };
      await signaling.open();

      await pc.setLocalDescription(await pc.createOffer());
      await waitForGathering(pc, GATHER_TIMEOUT_MS);
      pc.onicecandidate = (event) => signaling.sendCandidate(event.candidate ? event.candidate.toJSON() : null);
      const answer = await signaling.exchange(pc.localDescription.sdp);
      if (generation !== this.generation) return;
      await pc.setRemoteDescription({ type: "answer", sdp: answer });
      this.watchFirstFrame(generation);
      this.startStats(pc);
    } catch (error) {
      if (generation !== this.generation) return;
      this.log(`webrtc start failed: ${error}`);
      this.fallBack(`WebRTC could not start: ${error.message || error}`);
    }
  }

  async fetchIceServers() {
    const url = new URL(`/v1/sessions/${encodeURIComponent(this.sessionId)}/ice-servers`, this.baseUrl);
    const response = await fetch(url, { headers: { Authorization: `Bearer ${this.token}` } });
    if (!response.ok) throw new Error(`ice-servers answered ${response.status}`);
    const body = await response.json();
    return body.ice_servers || [];
  }

  watchFirstFrame(generation) {
    const video = this.video;
    let seen = false;
    const onFrame = () => {
      if (generation !== this.generation) return;
      this.status.frames += 1;
      this.status.remoteWidth = video.videoWidth;
      this.status.remoteHeight = video.videoHeight;
      if (!seen) {
        seen = true;
        this.reconnectAttempt = 0;
        this.setState("streaming", "WebRTC");
      } else if (this.restartFrames !== null && this.status.frames > this.restartFrames) {
        // The first frame after an ICE restart: the media path is back.
        this.restartFrames = null;
        this.setState("streaming", "WebRTC");
      }
      if ("requestVideoFrameCallback" in video) video.requestVideoFrameCallback(onFrame);
    };
    if ("requestVideoFrameCallback" in video) video.requestVideoFrameCallback(onFrame);
    else video.addEventListener("loadeddata", onFrame, { once: true });
    setTimeout(() => {
      if (generation === this.generation && !seen && this.status.mode === "webrtc") {
        this.fallBack(`no video frame within ${this.firstFrameTimeoutMs / 1000} s`);
      }
    }, this.firstFrameTimeoutMs);
  }

  onConnectionState(pc, generation) {
    if (generation !== this.generation) return;
    const state = pc.connectionState;
    this.log(`peer connection ${state}`);
    if (state === "failed") {
      if (this.status.frames === 0) this.fallBack("WebRTC connection failed");
      else this.restartIce(generation);
    } else if (state === "disconnected") {
      setTimeout(() => {
        if (generation === this.generation && pc.connectionState === "disconnected") this.restartIce(generation);
      }, DISCONNECTED_GRACE_MS);
    }
  }

  async restartIce(generation) {
    // First try an ICE restart on the same peer (a new offer for the same peer_id); if the media does
    // not come back soon, start over with a fresh peer connection and signaling.
    const pc = this.pc;
    if (!pc || this.transport === "whep" || !(this.signaling instanceof WebSocketSignaling)) {
      this.scheduleReconnect("connection lost");
      return;
    }
    this.setState("reconnecting", "ICE restart");
    const framesBefore = this.status.frames;
    try {
      await pc.setLocalDescription(await pc.createOffer({ iceRestart: true }));
      await waitForGathering(pc, GATHER_TIMEOUT_MS);
      const answer = await Promise.race([
        this.signaling.exchange(pc.localDescription.sdp),
        new Promise((_, reject) => setTimeout(() => reject(new Error("no answer")), RESTART_TIMEOUT_MS)),
      ]);
      if (generation !== this.generation) return;
      await pc.setRemoteDescription({ type: "answer", sdp: answer });
      this.restartFrames = this.status.frames; // the next frame ends the restart (see watchFirstFrame)
    } catch (error) {
      this.log(`ice restart failed: ${error}`);
      if (generation === this.generation) this.scheduleReconnect("ICE restart failed");
      return;
    }
    setTimeout(() => {
      if (generation === this.generation && this.status.frames === framesBefore) {
        this.restartFrames = null;
        this.scheduleReconnect("no media after ICE restart");
      }
    }, RESTART_TIMEOUT_MS);
  }

  scheduleReconnect(why) {
    const generation = ++this.generation;
    this.teardownPeer();
    const delay = RECONNECT_DELAYS_MS[Math.min(this.reconnectAttempt, RECONNECT_DELAYS_MS.length - 1)];
    this.reconnectAttempt += 1;
    this.status.reconnects += 1;
    if (this.givesUp()) {
      this.setState("failed", `${why}; reload to try again`);
      return;
    }
    this.setState("reconnecting", `${why}; retry in ${(delay / 1000).toFixed(1)} s`);
    if (this.reconnectAttempt > 3 && this.forceMode !== "webrtc") {
      this.fallBack(`WebRTC kept failing (${why})`);
      return;
    }
    setTimeout(() => {
      if (generation === this.generation) this.startWebRtc();
    }, delay);
  }

  givesUp() {
    // Blind retries stop after a while; a session known to be live keeps its viewer trying.
    const session = this.status.session;
    if (session && !TERMINAL.has(session.status) && this.statusAbort) return false;
    return this.reconnectAttempt > MAX_BLIND_ATTEMPTS;
  }

  teardownPeer() {
    if (this.statsTimer) clearInterval(this.statsTimer);
    this.statsTimer = null;
    this.restartFrames = null;
    this.lastBytes = null;
    if (this.signaling) this.signaling.close();
    this.signaling = null;
    if (this.input) this.input.close();
    this.input = null;
    if (this.pc) this.pc.close();
    this.pc = null;
  }

  stopWebRtc() {
    this.generation += 1;
    this.teardownPeer();
    this.video.srcObject = null;
  }

  fallBack(reason) {
    if (this.forceMode === "webrtc") {
      this.scheduleReconnect(reason);
      return;
    }
    this.status.fallbackReason = reason;
    this.stopWebRtc();
    this.startVnc(reason);
  }

  startStats(pc) {
    if (this.statsTimer) clearInterval(this.statsTimer);
    this.statsTimer = setInterval(async () => {
      if (this.pc !== pc) return;
      this.send({ t: "ping", ts: performance.now() });
      const report = await pc.getStats();
      const stats = {};
      let pairId = null;
      const byId = new Map();
      report.forEach((entry) => {
        byId.set(entry.id, entry);
        if (entry.type === "inbound-rtp" && entry.kind === "video") {
          stats.fps = entry.framesPerSecond || 0;
          const now = entry.timestamp;
          if (this.lastBytes) {
            stats.kbps = Math.round(((entry.bytesReceived - this.lastBytes.bytes) * 8) / (now - this.lastBytes.at));
          }
          this.lastBytes = { bytes: entry.bytesReceived, at: now };
        }
        if (entry.type === "transport" && entry.selectedCandidatePairId) pairId = entry.selectedCandidatePairId;
      });
      if (!pairId) {
        report.forEach((entry) => {
          if (entry.type === "candidate-pair" && entry.nominated && entry.state === "succeeded") pairId = entry.id;
        });
      }
      const pair = pairId ? byId.get(pairId) : null;
      if (pair) {
        stats.rttMs = pair.currentRoundTripTime !== undefined ? Math.round(pair.currentRoundTripTime * 1000) : null;
        const local = byId.get(pair.localCandidateId);
        const remote = byId.get(pair.remoteCandidateId);
        const relayed = (local && local.candidateType === "relay") || (remote && remote.candidateType === "relay");
        stats.path = relayed ? "relay" : "direct";
      }
      stats.inputRttMs = this.status.stats.inputRttMs;
      this.status.stats = stats;
      if (this.statsEl) {
        this.statsEl.textContent =
          `${stats.fps ?? "–"} fps · ${stats.rttMs ?? "–"} ms RTT · ${stats.kbps ?? "–"} kbit/s · ${stats.path ?? "–"}` +
          (stats.inputRttMs !== undefined ? ` · input ${stats.inputRttMs} ms` : "");
      }
    }, 1000);
  }

  onInputMessage(data) {
    let msg;
    try {
      msg = JSON.parse(data);
    } catch (e) {
      return;
    }
    if (msg.t === "pong" && typeof msg.ts === "number") {
      this.status.stats.inputRttMs = Math.round(performance.now() - msg.ts);
    } else if (msg.t === "clipboard" && typeof msg.text === "string") {
      // The remote copied something: offer it to the local clipboard (allowed only while focused).
      this.status.remoteClipboard = msg.text;
      if (navigator.clipboard && document.hasFocus()) navigator.clipboard.writeText(msg.text).catch(() => {});
    }
  }

  // ---------------------------------------------------------------------------------------- input

  send(message) {
    if (this.input && this.input.readyState === "open") {
      this.input.send(JSON.stringify(message));
      return true;
    }
    return false;
  }

  remotePoint(event) {
    const width = this.video.videoWidth || this.status.remoteWidth;
    const height = this.video.videoHeight || this.status.remoteHeight;
    return mapPointer(event.clientX, event.clientY, this.video.getBoundingClientRect(), width, height);
  }

  bindInput() {
    const video = this.video;
    video.tabIndex = 0;
    let lockedPoint = null;
    video.addEventListener("contextmenu", (event) => event.preventDefault());
    video.addEventListener("pointermove", (event) => {
      if (this.status.mode !== "webrtc") return;
      let point;
      if (document.pointerLockElement === video) {
        // Under pointer lock the cursor does not move: accumulate relative motion instead.
        lockedPoint = lockedPoint || this.remotePoint(event) || { x: 0, y: 0 };
        lockedPoint = {
          x: Math.max(0, Math.min(video.videoWidth - 1, lockedPoint.x + event.movementX)),
          y: Math.max(0, Math.min(video.videoHeight - 1, lockedPoint.y + event.movementY)),
        };
        point = lockedPoint;
      } else {
        lockedPoint = null;
        point = this.remotePoint(event);
      }
      if (point) this.send({ t: "move", x: point.x, y: point.y });
    });
    video.addEventListener("pointerdown", (event) => {
      if (this.status.mode !== "webrtc") return;
      video.focus();
      const point = this.remotePoint(event);
      if (!point || !point.inside) return;
      event.preventDefault();
      if (event.button > 2) return;
      video.setPointerCapture(event.pointerId);
      // X numbers buttons 1 left, 2 middle, 3 right; PointerEvent.button is 0, 1, 2.
      this.send({ t: "down", x: point.x, y: point.y, button: event.button + 1 });
    });
    video.addEventListener("pointerup", (event) => {
      if (this.status.mode !== "webrtc") return;
      const point = this.remotePoint(event);
      if (!point || event.button > 2) return;
      this.send({ t: "up", x: point.x, y: point.y, button: event.button + 1 });
    });
    video.addEventListener("wheel", (event) => {
      if (this.status.mode !== "webrtc") return;
      event.preventDefault();
      const point = this.remotePoint(event);
      // Normalise to pixels: lines are about 40 px, pages a screen height.
      const unit = event.deltaMode === 1 ? 40 : event.deltaMode === 2 ? video.videoHeight || 720 : 1;
      this.send({ t: "wheel", x: point ? point.x : 0, y: point ? point.y : 0,
                  dx: Math.round(event.deltaX * unit), dy: Math.round(event.deltaY * unit) });
    }, { passive: false });
    video.addEventListener("keydown", (event) => {
      if (this.status.mode !== "webrtc") return;
      // Leave the browser's own paste shortcut alone so that the paste event below carries the text.
      if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "v") return;
      event.preventDefault();
      this.pressed.add(event.code);
      this.send({ t: "key", key: event.key, code: event.code, down: true, repeat: event.repeat });
    });
    video.addEventListener("keyup", (event) => {
      if (this.status.mode !== "webrtc") return;
      if ((event.ctrlKey || event.metaKey) && event.key.toLowerCase() === "v") return;
      event.preventDefault();
      this.pressed.delete(event.code);
      this.send({ t: "key", key: event.key, code: event.code, down: false });
    });
    video.addEventListener("blur", () => {
      // Keys and buttons held while focus leaves would stay down remotely: release them.
      if (this.pressed.size) this.send({ t: "release" });
      this.pressed.clear();
    });
    video.addEventListener("dblclick", () => {
      if (this.root.dataset.pointerLock === "on" && video.requestPointerLock) video.requestPointerLock();
    });
    this.root.addEventListener("paste", (event) => {
      const text = event.clipboardData ? event.clipboardData.getData("text/plain") : "";
      if (!text) return;
      event.preventDefault();
      this.paste(text);
    });
  }

  paste(text) {
    if (this.status.mode === "vnc" && this.rfb) {
      this.rfb.clipboardPasteFrom(text);
      return true;
    }
    // Put the text on the remote clipboard, then type it so it lands where the remote caret is.
    this.send({ t: "clipboard", text });
    return this.send({ t: "text", text });
  }

  // ---------------------------------------------------------------------------------------- noVNC

  async startVnc(reason) {
    const generation = ++this.generation;
    this.status.mode = "vnc";
    this.root.dataset.mode = "vnc";
    this.video.hidden = true;
    if (this.vncBox) this.vncBox.hidden = false;
    if (this.switchButton) this.switchButton.textContent = "Use WebRTC";
    if (this.statsEl) this.statsEl.textContent = "VNC";
    this.setState("connecting", `VNC (${reason})`);
    let RFB;
    try {
      ({ default: RFB } = await import(new URL("vendor/novnc/core/rfb.js", import.meta.url).toString()));
    } catch (error) {
      this.setState("failed", "noVNC is not installed (browservm/web/static/vendor/novnc)");
      return;
    }
    if (generation !== this.generation) return;
    const url = wsUrl(this.baseUrl, `/v1/sessions/${encodeURIComponent(this.sessionId)}/vnc`);
    const rfb = new RFB(this.vncBox, `${url}?token=${encodeURIComponent(this.token)}`, { wsProtocols: ["binary"] });
    this.rfb = rfb;
    rfb.scaleViewport = true;
    rfb.focusOnClick = true;
    rfb.addEventListener("connect", () => {
      if (generation !== this.generation) return;
      this.reconnectAttempt = 0;
      this.setState("streaming", "VNC");
      rfb.focus();
    });
    rfb.addEventListener("disconnect", (event) => {
      if (generation !== this.generation) return;
      this.rfb = null;
      if (!this.mediaStarted) return; // stopped on purpose: the session ended
      if (this.givesUp()) {
        this.setState("failed", "cannot reach the session; it may have ended. Reload to try again");
        return;
      }
      const delay = RECONNECT_DELAYS_MS[Math.min(this.reconnectAttempt, RECONNECT_DELAYS_MS.length - 1)];
      this.reconnectAttempt += 1;
      this.status.reconnects += 1;
      const clean = event.detail && event.detail.clean;
      this.setState("reconnecting", `VNC ${clean ? "closed" : "dropped"}; retry in ${(delay / 1000).toFixed(1)} s`);
      setTimeout(() => {
        if (generation === this.generation) this.startVnc("reconnect");
      }, delay);
    });
  }

  stopVnc() {
    this.generation += 1;
    if (this.rfb) {
      try { this.rfb.disconnect(); } catch (e) { /* already gone */ }
    }
    this.rfb = null;
    if (this.vncBox) this.vncBox.replaceChildren();
  }

  close() {
    if (this.statusAbort) this.statusAbort.abort();
    this.statusAbort = null;
    this.stopMedia();
    this.setState("closed");
  }
}

// Boot from the viewer page: <main class="bvm-viewer" data-session=... data-token=...>.
export function boot(root = document.querySelector(".bvm-viewer")) {
  if (!root) return null;
  const params = new URLSearchParams(window.location.search);
  const sessionId = root.dataset.session;
  let token = params.get("token");
  if (token) {
    // Keep the token out of the address bar (and of anything that copies it) once the page has it, but
    // in this tab's sessionStorage, so that a reload reopens the same session while the token lives.
    try { sessionStorage.setItem(TOKEN_KEY(sessionId), token); } catch (e) { /* storage disabled */ }
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", window.location.pathname + (rest ? `?${rest}` : ""));
  } else {
    try { token = sessionStorage.getItem(TOKEN_KEY(sessionId)); } catch (e) { token = null; }
  }
  const viewer = new Viewer(root, {
    sessionId,
    token,
    transport: params.get("transport") || "ws",
    icePolicy: params.get("ice_policy") === "relay" ? "relay" : "all",
    mode: params.get("mode") || "auto",
    firstFrameTimeoutMs: Number(params.get("first_frame_timeout_ms")) || undefined,
  });
  root.dataset.pointerLock = params.get("pointer_lock") === "1" ? "on" : "off";
  window.browservmViewer = viewer;
  window.addEventListener("pagehide", () => viewer.close());
  viewer.start();
  return viewer;
}

if (document.querySelector(".bvm-viewer[data-autoboot]")) boot();
