"""One end of a channel connection: the request/reply peer that the controller, the agent, the streamer
and the test doubles all use.

A :class:`Peer` owns one byte stream and does four things on it:

* **sends** every frame through one ordered outgoing queue, written by one task, so frames never
  interleave and nothing overtakes what was queued before it;
* **requests**: :meth:`Peer.request` gives a request its id, sends it, and returns the reply's ``result``
  as the request's reply model, or raises :class:`RequestError` with the other side's error;
* **serves**: a request from the other side goes to the handler registered for its type, each in its own
  task; what the handler returns (an instance of the request's reply model) is the reply, and a
  :class:`RequestError` it raises is the error reply. The reply is queued before any other task runs once
  the handler returns, so output of work the handler started (a stream's first bytes) follows its reply;
* **delivers** events to ``on_event`` and stream bytes to ``on_stream``, in the order they were read,
  and the end of the connection to ``on_close`` (with the reason) as it happens.

Bounds, and what happens at each:

* Requests served at once: ``max_serving``. One more is answered ``busy`` at once; reading goes on, so a
  flood of slow requests never stalls replies, events or streams.
* Outgoing bytes: :meth:`Peer.send_stream` waits while more than ``high_water`` bytes are queued (a byte
  stream slows to what the other side reads). :meth:`Peer.send` (replies, events) never waits: what it
  queues is bounded by its producers (one reply per request served, exec output by its flow-control
  window). If the queue still passes ``max_buffered``, the other side has stopped reading altogether and
  the connection is closed; an agent's controller then reconnects and gets the state snapshot.
* A request waits ``timeout_s`` for its reply (``TimeoutError``); a late reply is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from pydantic import BaseModel

from browservm.protocol.framing import MessageFrame, ProtocolError, encode_message, encode_stream, read_frame
from browservm.protocol.messages import (
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    ErrorBody,
    Reply,
    Request,
    UnknownMessage,
    decode_message,
    peek,
)

log = logging.getLogger(__name__)

MAX_SERVING = 64
HIGH_WATER = 1024 * 1024
MAX_BUFFERED = 16 * 1024 * 1024
CLOSE_WAIT_S = 1.0

ResultT = TypeVar("ResultT", bound=BaseModel)
Handler = Callable[[Any], Awaitable[BaseModel]]
"""Takes one request type, returns an instance of its reply model."""


class RequestError(Exception):
    """A request refused: raised by a handler to answer with an error, and by :meth:`Peer.request` when
    the other side answered with one. ``message`` says what went wrong and what to do."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class PeerClosed(Exception):
    """The connection ended (the default of ``closed_error``)."""


class _Outbox:
    """Frames waiting for the writer, in order, and how many bytes are not yet handed to the kernel."""

    def __init__(self, high_water: int) -> None:
        self.high_water = high_water
        self.buffered = 0
        self._frames: deque[bytes] = deque()
        self._waiting = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()
        self.empty = asyncio.Event()
        self.empty.set()

    def put(self, frame: bytes) -> None:
        self._frames.append(frame)
        self.buffered += len(frame)
        self._waiting.set()
        self.empty.clear()
        if self.buffered > self.high_water:
            self.room.clear()

    async def take(self) -> list[bytes]:
        await self._waiting.wait()
        frames = list(self._frames)
        self._frames.clear()
        self._waiting.clear()
        return frames

    def written(self, size: int) -> None:
        self.buffered -= size
        if self.buffered <= self.high_water // 2:
            self.room.set()
        if self.buffered == 0:
            self.empty.set()


@dataclass
class _Pending:
    request: Request[Any]
    future: asyncio.Future[Any]
    on_reply: Callable[[Any], None] | None


class Peer:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        name: str,
        handlers: Mapping[type[Request[Any]], Handler] | None = None,
        on_event: Callable[[BaseModel], None] | None = None,
        on_stream: Callable[[int, bytes], Awaitable[None]] | None = None,
        on_close: Callable[[str], None] | None = None,
        closed_error: Callable[[str], Exception] = PeerClosed,
        max_serving: int = MAX_SERVING,
        high_water: int = HIGH_WATER,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        self.name = name
        self._reader = reader
        self._writer = writer
        self._handlers = dict(handlers or {})
        self._on_event = on_event
        self._on_stream = on_stream
        self._on_close = on_close
        self._closed_error = closed_error
        self._max_serving = max_serving
        self._max_buffered = max_buffered
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._serving: set[asyncio.Task[None]] = set()
        self._outbox = _Outbox(high_water)
        self.closed = asyncio.Event()
        self.why_closed = ""
        self.last_heard = time.monotonic()
        """When the last frame arrived from the other side (``time.monotonic``)."""
        self._writer_task = asyncio.create_task(self._write_loop(), name=f"peer-{name}-writer")
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"peer-{name}-reader")

    # ------------------------------------------------------------------ sending

    async def request(
        self,
        message: Request[ResultT],
        *,
        timeout_s: float = 30.0,
        on_reply: Callable[[ResultT], None] | None = None,
    ) -> ResultT:
        """Send ``message`` and return its reply as the request's reply model.

        ``on_reply`` runs as the reply is read, before any frame behind it: for a reply that names
        something later frames refer to (a stream whose bytes follow at once). Raises
        :class:`RequestError`, ``TimeoutError``, :class:`ProtocolError` (a reply that is not the request's
        model) or ``closed_error``.
        """
        if self.closed.is_set():
            raise self._closed_error(self.why_closed)
        request_id = next(self._ids)
        message = message.model_copy(update={"id": request_id})
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Pending(message, future, cast(Callable[[Any], None] | None, on_reply))
        try:
            self._queue(encode_message(message))
            return cast(ResultT, await asyncio.wait_for(future, timeout_s))
        finally:
            self._pending.pop(request_id, None)

    def send(self, message: BaseModel) -> bool:
        """Queue an event (or any message that needs no reply); never waits. ``False`` if this peer is
        closed and the message was dropped (a reconnecting controller gets the state snapshot)."""
        if self.closed.is_set():
            return False
        self._queue(encode_message(message))
        return True

    async def send_stream(self, stream_id: int, data: bytes) -> None:
        """Queue stream bytes once the outgoing queue is below its high-water mark."""
        while not self._outbox.room.is_set() and not self.closed.is_set():
            await self._outbox.room.wait()
        if self.closed.is_set():
            raise self._closed_error(self.why_closed)
        self._queue(encode_stream(stream_id, data))

    def _queue(self, frame: bytes) -> None:
        self._outbox.put(frame)
        if self._outbox.buffered > self._max_buffered:
            log.error("peer.not_reading peer=%s buffered=%d", self.name, self._outbox.buffered)
            self._shutdown(f"{self.name} stopped reading ({self._outbox.buffered} bytes queued)", abort=True)

    async def _write_loop(self) -> None:
        try:
            while True:
                frames = await self._outbox.take()
                self._writer.writelines(frames)
                await self._writer.drain()
                self._outbox.written(sum(map(len, frames)))
        except (ConnectionError, OSError) as exc:
            self._shutdown(f"connection lost: {exc}")

    # ------------------------------------------------------------------ receiving

    async def _read_loop(self) -> None:
        why = f"{self.name} closed the connection"
        try:
            while (frame := await read_frame(self._reader)) is not None:
                self.last_heard = time.monotonic()
                try:
                    if isinstance(frame, MessageFrame):
                        self._receive(frame.payload)
                    elif self._on_stream is not None:
                        await self._on_stream(frame.stream_id, frame.data)
                except Exception:
                    # The owner's callback failed on one frame: that is its bug, not the connection's.
                    log.exception("peer.callback_failed peer=%s", self.name)
        except ProtocolError as exc:
            why = f"protocol error: {exc}"
            log.error("peer.protocol_error peer=%s error=%s", self.name, exc)
        except (ConnectionError, OSError) as exc:
            why = f"connection lost: {exc}"
        finally:
            self._shutdown(why)

    def _receive(self, payload: bytes) -> None:
        try:
            message = decode_message(payload)
        except UnknownMessage as exc:
            if exc.request_id is not None:
                self._refuse(
                    exc.request_id, "unknown_type", f"{exc}; this side speaks protocol {PROTOCOL_VERSION}"
                )
            return
        except ProtocolError as exc:
            self._undecodable(payload, exc)
            return
        if isinstance(message, Reply):
            self._settle(message)
        elif isinstance(message, Request):
            self._serve(message)
        elif self._on_event is not None:
            self._on_event(message)

    def _undecodable(self, payload: bytes, exc: ProtocolError) -> None:
        kind, request_id = peek(payload)
        if kind == "reply" and request_id in self._pending:
            pending = self._pending[request_id]
            if not pending.future.done():
                pending.future.set_exception(exc)
        elif kind in REQUEST_TYPES and request_id is not None:
            self._refuse(request_id, "bad_request", str(exc))
        else:
            # A newer peer's event of a changed shape must not end the connection.
            log.warning("peer.bad_message peer=%s error=%s", self.name, exc)

    def _settle(self, reply: Reply) -> None:
        pending = self._pending.get(reply.id)
        if pending is None or pending.future.done():
            return  # its requester timed out
        if not reply.ok:
            error = reply.error or ErrorBody(code="unknown", message="the reply carried no error body")
            pending.future.set_exception(RequestError(error.code, error.message))
            return
        try:
            result = pending.request.parse_reply(reply.result)
            if pending.on_reply is not None:
                pending.on_reply(result)
        except Exception as exc:
            pending.future.set_exception(exc)
        else:
            pending.future.set_result(result)

    # ------------------------------------------------------------------ serving

    def _serve(self, request: Request[Any]) -> None:
        handler = self._handlers.get(type(request))
        kind = type(request).model_fields["type"].default
        if handler is None:
            self._refuse(request.id, "unsupported", f"{self.name} does not handle {kind!r} requests")
        elif len(self._serving) >= self._max_serving:
            self._refuse(request.id, "busy", f"{self.name} is serving {self._max_serving} requests; retry")
        else:
            task = asyncio.create_task(self._answer(handler, request), name=f"peer-{self.name}-{kind}")
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _answer(self, handler: Handler, request: Request[Any]) -> None:
        try:
            result = await handler(request)
            if not isinstance(result, request.reply_model):
                raise TypeError(
                    f"the handler returned a {type(result).__name__}, not a {request.reply_model.__name__}"
                )
        except RequestError as exc:
            self._refuse(request.id, exc.code, exc.message)
        except Exception as exc:
            # A bug or an unexpected failure answers this request; it never ends the connection.
            log.exception("peer.request_failed peer=%s type=%s", self.name, type(request).__name__)
            self._refuse(request.id, "internal", f"{type(exc).__name__}: {exc}")
        else:
            self.send(Reply(id=request.id, ok=True, result=result.model_dump(mode="json")))

    def _refuse(self, request_id: int, code: str, message: str) -> None:
        self.send(Reply(id=request_id, ok=False, error=ErrorBody(code=code, message=message)))

    # ------------------------------------------------------------------ closing

    def _shutdown(self, why: str, *, abort: bool = False) -> None:
        """End the connection now; ``abort`` drops what the transport still holds (the other side does
        not read it: a close would wait to send it for ever)."""
        if self.closed.is_set():
            return
        self.why_closed = why
        self.closed.set()
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(self._closed_error(why))
        self._outbox.room.set()  # a stream sender waiting for room sees the end
        current = asyncio.current_task()
        for task in (self._reader_task, self._writer_task, *self._serving):
            if task is not current:
                task.cancel()
        if abort:
            self._writer.transport.abort()
        else:
            self._writer.close()
        if self._on_close is not None:
            self._on_close(why)

    async def close(self, flush_s: float = 0.0) -> None:
        """Send what is queued (waiting at most ``flush_s``), then end the connection and its requests."""
        if flush_s > 0 and not self.closed.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._outbox.empty.wait(), flush_s)
        self._shutdown("closed by this side", abort=not self._outbox.empty.is_set())
        current = asyncio.current_task()
        tasks = [t for t in (self._reader_task, self._writer_task, *self._serving) if t is not current]
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            # What the transport still holds goes out if the other side reads it, soon.
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_WAIT_S)
        except (TimeoutError, ConnectionError, OSError):
            self._writer.transport.abort()
