"""How the controller is served: uvicorn with limits on what one connection may hold, and for how long.

uvicorn bounds neither the time a client takes to send its request head or body nor (with httptools) the
size of the head: a client that trickles bytes, or sends an endless header, holds a connection and its
buffers for ever, without an API key. :class:`BoundedH11Protocol` is uvicorn's h11 protocol (whose parser
refuses a head larger than ``h11_max_incomplete_event_size``) plus one read deadline per phase of a
connection:

* ``head``: the request line and headers must arrive within ``http_header_timeout_s`` of connecting, or
  of the first byte of the next request on a kept-alive connection (408, then close);
* ``body``: the whole body within ``http_body_timeout_s`` of the head, whether or not the application
  reads it (408 if no answer has started, then close);
* ``idle``: a kept-alive connection waits ``http_keep_alive_s`` for its next request (closed quietly).

A connection that becomes a WebSocket leaves these phases for good (h11 still thinks it is in the
upgrade request's body): the signaling and VNC sockets of a viewer live as long as the viewer, bounded by
the WebSocket's own ping and the stream limits, not by the body deadline.

While the application handles a request or streams its answer there is no read deadline; a client that
takes none of its answer for ``http_send_timeout_s`` (the send buffer stays full) is disconnected.
At most ``http_max_connections`` connections are open; a newcomer past that closes the longest idle
kept-alive connection, or is answered 503 at once. Both ``browservm serve`` and the tests build their
server with :func:`uvicorn_config`, so the same limits apply everywhere.
"""

from __future__ import annotations

import asyncio
import http
import json
import math
import resource
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import h11
import structlog
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from browservm.controller.errors import error_body
from browservm.settings import Settings

log = structlog.get_logger(__name__)

Phase = Literal["head", "body", "idle"]

FD_RESERVE = 256
LINGER_S = 2.0
LINGER_BYTES = 64 * 1024
"""How long, and for how many more bytes, a refused connection stays half open so that its answer
reaches the client before the kernel's reset does."""
"""Open files kept free of client connections: the database, sandbox channels, subprocess pipes."""


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_s: float
    send_timeout_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        allowed = settings.http_max_connections
        if soft != resource.RLIM_INFINITY and soft - FD_RESERVE < allowed:
            allowed = max(16, soft - FD_RESERVE)
            log.warning(
                "http.connections_capped_by_open_file_limit",
                configured=settings.http_max_connections,
                effective=allowed,
                open_file_limit=soft,
            )
        return cls(
            max_connections=allowed,
            max_header_bytes=settings.http_max_header_bytes,
            header_timeout_s=settings.http_header_timeout_s,
            body_timeout_s=settings.http_body_timeout_s,
            keep_alive_s=settings.http_keep_alive_s,
            send_timeout_s=settings.http_send_timeout_s,
        )

    def timeout_of(self, phase: Phase) -> float:
        return {"head": self.header_timeout_s, "body": self.body_timeout_s, "idle": self.keep_alive_s}[phase]


def raw_answer(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> bytes:
    """A complete ``Connection: close`` answer with the uniform error body, written without h11: these go
    out where h11 has no request to answer (a timed-out head, a refused connection)."""
    body = json.dumps(error_body(code, message)).encode()
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a read deadline per phase and a cap on open connections."""

    limits: ClassVar[ConnectionLimits]
    _warned_at: ClassVar[dict[str, float]]
    """When the cap was last reported, per bound class: once a minute, not once per refusal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: Phase | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._phase_started = 0.0
        self._requests = 0
        self._head_started = False
        self._send_stall: asyncio.TimerHandle | None = None
        self._lingering: asyncio.TimerHandle | None = None
        """Set while an error answer is out and the rest of the client's bytes are dropped."""
        self._linger_budget = 0
        self._upgraded = False

    # --- the connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections and not self._evict_an_idle_connection():
            self._warn_full()
            self._answer_and_close(
                503,
                "too_many_connections",
                f"the controller has {self.limits.max_connections} connections open; retry shortly",
                {"Retry-After": "1"},
            )
            return
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._set_phase(None)
        if self._lingering is not None:
            self._lingering.cancel()
        if self._send_stall is not None:
            self._send_stall.cancel()
            self._send_stall = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            # Dropped; a client that keeps sending is cut off (no endless read of an endless head).
            self._linger_budget -= len(data)
            if self._linger_budget <= 0:
                self._close()
            return
        if self.transport.is_closing():
            return  # refused or timed out: what else the client sends is of no interest
        if self.conn.their_state is h11.IDLE:
            self._head_started = True
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        self._requests += 1
        super().on_response_complete()
        self._follow()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._upgraded = True
        self._set_phase(None)
        super().handle_websocket_upgrade(event)

    # --- read deadlines

    def _follow(self) -> None:
        """Keep the deadline of the phase the connection is in (a phase's timer starts when it begins)."""
        if self._upgraded or self.transport.is_closing():
            self._set_phase(None)
            return
        state = self.conn.their_state
        if state is h11.IDLE:
            # A new connection waits for its first head; a kept-alive one idles until a byte arrives.
            self._set_phase("head" if self._head_started or not self._requests else "idle")
        elif state is h11.SEND_BODY:
            self._head_started = False
            self._set_phase("body")
        else:
            # The request is in (or the connection switches to WebSocket): the answer sets the pace.
            self._head_started = False
            self._set_phase(None)

    def _set_phase(self, phase: Phase | None) -> None:
        if phase == self._phase:
            return
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        self._phase_started = self.loop.time()
        if phase is not None:
            self._deadline = self.loop.call_later(self.limits.timeout_of(phase), self._expired, phase)

    def _expired(self, phase: Phase) -> None:
        self._deadline = None
        if phase == "idle" or (phase == "head" and not self._head_started):
            self._close()  # nothing was asked: no answer owed
            return
        # debug: under a slow-client attack these come by the hundred a second
        log.debug("http.read_timeout", phase=phase, client=self.client)
        if phase == "head":
            message = f"the request head did not arrive within {self.limits.header_timeout_s:g} s"
        else:
            message = f"the request body did not arrive within {self.limits.body_timeout_s:g} s"
        self._answer_and_close(408, "request_timeout", message)

    # --- a client that stops reading its answer

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_stall is None:
            self._send_stall = self.loop.call_later(self.limits.send_timeout_s, self._send_stalled)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_stall is not None:
            self._send_stall.cancel()
            self._send_stall = None

    def _send_stalled(self) -> None:
        self._send_stall = None
        log.debug("http.send_timeout", client=self.client, after_s=self.limits.send_timeout_s)
        # abort, not close: close would wait for the full buffer to drain, which is what never happens.
        self._set_phase(None)
        self.transport.abort()

    # --- answers that h11 cannot give

    def send_400_response(self, msg: str) -> None:
        """h11 refused the bytes: answer with the uniform error body, 431 when the head was too large."""
        pending, _closed = self.conn.trailing_data
        if len(pending) > self.limits.max_header_bytes:
            self._answer_and_close(
                431,
                "headers_too_large",
                f"the request line and headers exceed {self.limits.max_header_bytes} bytes",
            )
        else:
            self._answer_and_close(400, "malformed_request", "the request is not valid HTTP/1.1")

    def _answer_and_close(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        answered = self.cycle is None or not self.cycle.response_started
        if answered:
            self.transport.write(raw_answer(status, code, message, headers))
        if self.cycle is not None and not self.cycle.response_complete:
            # As connection_lost will: the application sees a disconnect and its answer goes nowhere.
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        if answered and self.transport.can_write_eof():
            # A lingering close: closing at once, with the rest of the client's request unread, makes the
            # kernel answer with a reset that can reach the client before our answer does. Send the
            # answer and our end (FIN), drop what still arrives, close when the client does or soon.
            self._set_phase(None)
            self.transport.write_eof()
            self._linger_budget = LINGER_BYTES
            self._lingering = self.loop.call_later(LINGER_S, self._close)
            return
        self._close()

    def _close(self) -> None:
        self._set_phase(None)
        if self._lingering is not None:
            self._lingering.cancel()
        if not self.transport.is_closing():
            self.transport.close()

    def _warn_full(self) -> None:
        now = self.loop.time()
        if now - self._warned_at.get("full", -60.0) >= 60.0:
            self._warned_at["full"] = now
            log.warning(
                "http.connections_full",
                open=len(self.connections),
                limit=self.limits.max_connections,
                hint="newcomers get 503 until some close (BROWSERVM_HTTP_MAX_CONNECTIONS)",
            )

    def _evict_an_idle_connection(self) -> bool:
        """Close the kept-alive connection idle the longest, to make room; False if none is idle."""
        idle = [
            c
            for c in self.connections
            if isinstance(c, BoundedH11Protocol) and c is not self and c._phase == "idle"
        ]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._phase_started)
        oldest._close()
        self.connections.discard(oldest)
        return True


def bounded_protocol(limits: ConnectionLimits) -> type[BoundedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, bound to these limits."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"limits": limits, "_warned_at": {}})


def uvicorn_config(app: ASGIApp, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration of a controller serving ``app`` on ``settings.host:port``."""
    limits = ConnectionLimits.from_settings(settings)
    values: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": bounded_protocol(limits),
        "h11_max_incomplete_event_size": limits.max_header_bytes,
        # uvicorn's own keep-alive timer; the protocol's idle deadline is the same and also covers the
        # cases uvicorn's misses (a body that ends after the answer).
        "timeout_keep_alive": max(1, math.ceil(limits.keep_alive_s)),
        "ws": "websockets-sansio",
        "ws_max_size": settings.ws_max_message_bytes,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 10,
    }
    values.update(overrides)
    return uvicorn.Config(app, **values)


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (often 1024 against 524288): each connection is a
    file. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("http.open_file_limit_unchanged", soft=soft, hard=hard, error=str(exc))
    return soft
