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
// "clipboard"|"ping", ...}; see browservm/guest/streamer.py for the receiving end.

const FIRST_FRAME_TIMEOUT_MS = 6000;
const GATHER_TIMEOUT_MS = 2000;
const DISCONNECTED_GRACE_MS = 2500;
const RESTART_TIMEOUT_MS = 5000;
const RECONNECT_DELAYS_MS = [500, 1000, 2000, 4000, 8000];
const MAX_ATTEMPTS = 12; // about a minute and a half of retrying: by then the session has most likely ended

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

    // What tests and embedding pages can read: window.browservmViewer.status.
    this.status = {
      state: "idle", mode: null, frames: 0, reconnects: 0, fallbackReason: null,
      remoteWidth: 0, remoteHeight: 0, stats: {}, log: [],
    };
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
  }

  start() {
    if (this.forceMode === "vnc") return this.startVnc("requested");
    return this.startWebRtc();
  }

  switchMode() {
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
    if (this.reconnectAttempt > MAX_ATTEMPTS) {
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
      if (this.reconnectAttempt >= MAX_ATTEMPTS) {
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
    this.stopWebRtc();
    this.stopVnc();
    this.setState("closed");
  }
}

// Boot from the viewer page: <main class="bvm-viewer" data-session=... data-token=...>.
export function boot(root = document.querySelector(".bvm-viewer")) {
  if (!root) return null;
  const params = new URLSearchParams(window.location.search);
  if (params.has("token")) {
    // Keep the token out of the address bar (and of anything that copies it) once the page has it.
    root.dataset.token = params.get("token");
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", window.location.pathname + (rest ? `?${rest}` : ""));
  }
  const viewer = new Viewer(root, {
    sessionId: root.dataset.session,
    token: root.dataset.token,
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
