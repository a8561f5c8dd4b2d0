// Server-Sent Events over fetch(), so that the credential travels in an Authorization header and never
// in a URL (EventSource cannot set headers). Used by the viewer (viewer token) and the dashboard (API key).

export class StreamError extends Error {
  constructor(status, code, message) {
    super(message || `stream answered ${status}`);
    this.status = status;
    this.code = code;
  }
}

// Read one stream until the server ends it; call onEvent({event, data, id}) for each event. Resolves when
// the stream ends, rejects with StreamError for a refused request, or a TypeError when the network fails.
export async function readEvents(url, { headers = {}, lastEventId = null, signal, onEvent }) {
  const response = await fetch(url, {
    headers: { Accept: "text/event-stream", ...headers, ...(lastEventId ? { "Last-Event-ID": lastEventId } : {}) },
    cache: "no-store",
    signal,
  });
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    const error = body.error || {};
    throw new StreamError(response.status, error.code, error.message);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let pending = { event: "message", data: [], id: null };
  const line = (text) => {
    if (text === "") {
      if (pending.data.length) onEvent({ event: pending.event, data: pending.data.join("\n"), id: pending.id });
      pending = { event: "message", data: [], id: pending.id };
      return;
    }
    if (text.startsWith(":")) return; // a comment: sse-starlette's keep-alive ping
    const colon = text.indexOf(":");
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? "" : text.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") pending.event = value;
    else if (field === "data") pending.data.push(value);
    else if (field === "id") pending.id = value;
  };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // Lines end with \r\n, \n or \r; a trailing \r may be half of a \r\n still in transit.
    let match;
    while ((match = /\r\n|\n|\r(?=.)/s.exec(buffer)) !== null) {
      line(buffer.slice(0, match.index));
      buffer = buffer.slice(match.index + match[0].length);
    }
  }
}
