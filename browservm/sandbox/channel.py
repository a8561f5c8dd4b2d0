"""The controller's end of the channel to a guest agent (see :mod:`browservm.protocol`).

A :class:`Channel` owns one byte stream. It sends requests and matches replies by id, hands events to
subscribers, and multiplexes byte streams (the VNC bridge). It does not reconnect: when the stream
ends, every pending request fails with :class:`ChannelClosed` and ``closed`` is set; the owner decides
whether to connect again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import structlog
from pydantic import BaseModel

from browservm import protocol
from browservm.aio import cancel_and_wait

log = structlog.get_logger(__name__)


class ChannelClosed(Exception):
    def __init__(self, sandbox_id: str, why: str = "channel closed") -> None:
        super().__init__(f"sandbox {sandbox_id}: {why}")
        self.sandbox_id = sandbox_id


class AgentError(Exception):
    """The agent answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


EventHandler = Callable[[BaseModel], None]


class ByteStream:
    """One multiplexed byte stream (e.g. RFB to the guest's VNC server)."""

    def __init__(self, channel: Channel, stream_id: int) -> None:
        self._channel = channel
        self.stream_id = stream_id
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=256)
        self.closed = False

    async def read(self) -> bytes | None:
        """The next chunk, or ``None`` once either side closed the stream."""
        if self.closed and self._queue.empty():
            return None
        return await self._queue.get()

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise ChannelClosed(self._channel.sandbox_id, f"stream {self.stream_id} closed")
        await self._channel._send_raw(protocol.encode_stream(self.stream_id, data))

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(None)
            with contextlib.suppress(ChannelClosed, ConnectionError):
                await self._channel._send(protocol.CloseStream(stream_id=self.stream_id))
            self._channel._streams.pop(self.stream_id, None)

    def _feed(self, data: bytes | None) -> None:
        if data is None:
            self.closed = True
        try:
            self._queue.put_nowait(data)
        except asyncio.QueueFull:
            # A reader that stopped reading loses its stream rather than stalling every other user
            # of the channel.
            self.closed = True
            log.warning("channel.stream_overflow", stream_id=self.stream_id)


class Channel:
    def __init__(
        self,
        sandbox_id: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        hello: protocol.Hello,
    ) -> None:
        self.sandbox_id = sandbox_id
        self.hello = hello
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[protocol.Reply]] = {}
        self._subscribers: list[asyncio.Queue[BaseModel | None]] = []
        self._streams: dict[int, ByteStream] = {}
        self._opening: dict[int, ByteStream | None] = {}
        """Requests opening a stream, by request id: the stream once its reply was read."""
        self._write_lock = asyncio.Lock()
        self.closed = asyncio.Event()
        self._reader_task = asyncio.create_task(self._read_loop(), name=f"channel-{sandbox_id}")

    @classmethod
    async def handshake(
        cls, sandbox_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Channel:
        """Read the agent's Hello and check its protocol version. The caller bounds the wait."""
        frame = await protocol.read_frame(reader)
        if frame is None:
            raise ChannelClosed(sandbox_id, "agent closed the channel before saying hello")
        kind, body = frame
        if kind != protocol.FRAME_MESSAGE or not isinstance(body, protocol.Hello):
            raise protocol.ProtocolError("first frame from the agent was not hello")
        if body.protocol not in protocol.SUPPORTED_VERSIONS:
            raise protocol.ProtocolError(
                f"agent speaks protocol {body.protocol}; this controller supports "
                f"{sorted(protocol.SUPPORTED_VERSIONS)}: rebuild the guest image"
            )
        if body.sandbox_id != sandbox_id:
            raise protocol.ProtocolError(
                f"agent says it is sandbox {body.sandbox_id!r}, expected {sandbox_id!r}"
            )
        return cls(sandbox_id, reader, writer, body)

    # ------------------------------------------------------------------ requests

    def next_id(self) -> int:
        return next(self._ids)

    async def request(self, message: protocol.RequestBase, *, timeout_s: float = 30.0) -> dict[str, Any]:
        """Send a request (its ``id`` must come from :meth:`next_id`) and return the reply's result."""
        if self.closed.is_set():
            raise ChannelClosed(self.sandbox_id)
        request_id = message.id
        future: asyncio.Future[protocol.Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await self._send(message)
            reply = await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(request_id, None)
        if not reply.ok:
            error = reply.error or protocol.ErrorBody(code="unknown", message="no error body")
            raise AgentError(error.code, error.message)
        return reply.result

    async def open_stream(self, target: Literal["vnc"], *, timeout_s: float = 10.0) -> ByteStream:
        request = protocol.OpenStream(id=self.next_id(), target=target)
        # The agent may send the stream's first bytes right behind its reply (an RFB server speaks
        # first): the reader registers the stream as it reads the reply, before anything else.
        self._opening[request.id] = None
        try:
            await self.request(request, timeout_s=timeout_s)
            stream = self._opening[request.id]
        finally:
            self._opening.pop(request.id, None)
        assert stream is not None
        return stream

    # ------------------------------------------------------------------ events

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[BaseModel | None]]:
        """Events from now on, in order; ``None`` when the channel closes."""
        queue: asyncio.Queue[BaseModel | None] = asyncio.Queue()
        self._subscribers.append(queue)
        if self.closed.is_set():
            queue.put_nowait(None)
        try:
            yield queue
        finally:
            self._subscribers.remove(queue)

    # ------------------------------------------------------------------ plumbing

    async def _send(self, message: BaseModel) -> None:
        await self._send_raw(protocol.encode_message(message))

    async def _send_raw(self, data: bytes) -> None:
        if self.closed.is_set():
            raise ChannelClosed(self.sandbox_id)
        async with self._write_lock:
            self._writer.write(data)
            await self._writer.drain()

    async def _read_loop(self) -> None:
        why = "agent closed the channel"
        try:
            while True:
                frame = await protocol.read_frame(self._reader)
                if frame is None:
                    break
                body = frame[1]
                if isinstance(body, tuple):
                    stream_id, data = body
                    stream = self._streams.get(stream_id)
                    if stream is not None:
                        stream._feed(data)
                    continue
                self._dispatch(body)
        except protocol.ProtocolError as exc:
            why = f"protocol error: {exc}"
            log.error("channel.protocol_error", sandbox_id=self.sandbox_id, error=str(exc))
        except (ConnectionError, OSError) as exc:
            why = f"connection lost: {exc}"
        finally:
            self._shutdown(why)

    def _dispatch(self, message: BaseModel) -> None:
        if isinstance(message, protocol.Reply):
            if message.id in self._opening and message.ok and message.result:
                opened = ByteStream(self, int(message.result["stream_id"]))
                self._streams[opened.stream_id] = opened
                self._opening[message.id] = opened
            future = self._pending.get(message.id)
            if future is not None and not future.done():
                future.set_result(message)
            return
        if isinstance(message, protocol.CloseStream):
            stream = self._streams.pop(message.stream_id, None)
            if stream is not None:
                stream._feed(None)
        for queue in self._subscribers:
            queue.put_nowait(message)

    def _shutdown(self, why: str) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ChannelClosed(self.sandbox_id, why))
        for stream in list(self._streams.values()):
            stream._feed(None)
        self._streams.clear()
        for queue in self._subscribers:
            queue.put_nowait(None)
        self._writer.close()

    async def close(self) -> None:
        await cancel_and_wait([self._reader_task])
        self._shutdown("closed by the controller")
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()
