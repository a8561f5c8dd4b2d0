"""The controller's end of the channel to a guest agent (see :mod:`browservm.protocol`).

A :class:`Channel` is a :class:`~browservm.protocol.Peer` on one byte stream, plus what the controller
keeps per agent: event subscribers, multiplexed byte streams (the VNC bridge), running commands with
their flow control, and a heartbeat that keeps the agent from ending itself. It does not reconnect: when the stream ends, every pending request fails with
:class:`ChannelClosed` and ``closed`` is set; the owner decides whether to connect again.

Queues, and what happens when one fills:

* an event subscriber holds at most :data:`SUBSCRIBER_QUEUE` events; one that falls that far behind is cut
  off (its queue ends with ``None``, as at a close) so that it never stalls the channel or grows without
  bound. Events are state changes and signaling, a few a second at most: only a stuck consumer gets there;
* a byte stream holds at most :data:`STREAM_QUEUE` chunks; a reader that stops reading loses its stream;
* a command's output is held up to its flow-control window (:class:`RemoteCommand`): the agent stops
  reading the command's pipes until the consumer takes what it was sent, so a client that does not read
  its exec output slows only that command (the channel, other commands and signaling keep flowing);
* the peer's outgoing queue: see :mod:`browservm.protocol.peer` (streams wait, a peer that stops reading
  altogether is disconnected).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Literal, TypeVar

import structlog
from pydantic import BaseModel

from browservm import protocol

log = structlog.get_logger(__name__)

SUBSCRIBER_QUEUE = 4096
STREAM_QUEUE = 256
HEARTBEATS_PER_IDLE_TIMEOUT = 4
"""The channel pings an agent this many times within the agent's idle timeout: a few lost to a busy host
do not end it."""

ResultT = TypeVar("ResultT", bound=BaseModel)


class ChannelClosed(Exception):
    def __init__(self, sandbox_id: str, why: str = "channel closed") -> None:
        super().__init__(f"sandbox {sandbox_id}: {why}")
        self.sandbox_id = sandbox_id


AgentError = protocol.RequestError
"""The agent answered a request with an error (``code``, ``message``)."""


class IncompatibleAgent(protocol.ProtocolError):
    """The agent speaks a protocol version or lacks a capability this controller needs."""


class NotHello(protocol.ProtocolError):
    """The agent's first frame on a new connection was something else: it takes the connection for one it
    already had (a serial line, whose hang-ups a guest can miss, has no connections of its own)."""


class ByteStream:
    """One multiplexed byte stream (e.g. RFB to the guest's VNC server)."""

    def __init__(self, channel: Channel, stream_id: int) -> None:
        self._channel = channel
        self.stream_id = stream_id
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=STREAM_QUEUE)
        self.closed = False

    async def read(self) -> bytes | None:
        """The next chunk, or ``None`` once either side closed the stream."""
        if self.closed and self._queue.empty():
            return None
        return await self._queue.get()

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise ChannelClosed(self._channel.sandbox_id, f"stream {self.stream_id} closed")
        await self._channel.peer.send_stream(self.stream_id, data)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(None)
            self._channel.peer.send(protocol.CloseStream(stream_id=self.stream_id))
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


class RemoteCommand:
    """A command running in the guest (:class:`~browservm.protocol.Exec`): its output events as the
    consumer takes them, then its exit.

    Flow control: the agent may send ``window`` bytes of output ahead of what was taken here; taking
    output gives that much credit back (in batches of half a window). Iterating ends after
    :class:`~browservm.protocol.ExecExit`; it raises :class:`ChannelClosed` if the channel ends first, and
    :class:`~browservm.protocol.ProtocolError` if the agent sends more than its window.
    """

    def __init__(self, channel: Channel, exec_id: str, window: int) -> None:
        self._channel = channel
        self.exec_id = exec_id
        self.window = window
        self._queue: asyncio.Queue[protocol.ExecOutput | protocol.ExecExit | None] = asyncio.Queue()
        self._held = 0
        """Output bytes received and not yet taken: never above ``window`` from an agent that keeps to it."""
        self._taken = 0
        """Output bytes taken and not yet credited back."""
        self._failure: Exception | None = None
        self.exited = False

    async def __aiter__(self) -> AsyncIterator[protocol.ExecOutput | protocol.ExecExit]:
        while not self.exited:
            message = await self._queue.get()
            if message is None:
                raise self._failure or ChannelClosed(self._channel.sandbox_id, self._channel.peer.why_closed)
            if isinstance(message, protocol.ExecExit):
                self.exited = True
            else:
                self._took(message.size)
            yield message

    def _took(self, size: int) -> None:
        self._held -= size
        self._taken += size
        if self._taken >= self.window // 2:
            self._channel.peer.send(protocol.ExecCredit(exec_id=self.exec_id, bytes=self._taken))
            self._taken = 0

    def _feed(self, message: protocol.ExecOutput | protocol.ExecExit | None) -> None:
        if isinstance(message, protocol.ExecOutput):
            self._held += message.size
            if self._held > self.window:
                # An agent that ignores its window would grow this queue without bound: stop it here.
                log.error("channel.exec_over_window", exec_id=self.exec_id, held=self._held)
                self._failure = protocol.ProtocolError(
                    f"the agent sent {self._held} bytes of output of {self.exec_id} beyond what was taken, "
                    f"more than its window of {self.window}"
                )
                self._queue.put_nowait(None)
                self._channel.peer.send(protocol.ExecClose(exec_id=self.exec_id))
                self._channel._commands.pop(self.exec_id, None)
                return
        self._queue.put_nowait(message)

    async def close(self) -> None:
        """Stop following the command. If it still runs, the agent closes its output pipes."""
        if self._channel._commands.pop(self.exec_id, None) is not None and not self.exited:
            self._channel.peer.send(protocol.ExecClose(exec_id=self.exec_id))


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
        self.capabilities = frozenset(hello.capabilities) & protocol.CAPABILITIES
        """What this controller may ask of the agent: offered by it and known here."""
        self._subscribers: list[asyncio.Queue[BaseModel | None]] = []
        self._streams: dict[int, ByteStream] = {}
        self._commands: dict[str, RemoteCommand] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        self.peer = protocol.Peer(
            reader,
            writer,
            name=f"agent of {sandbox_id}",
            on_event=self._on_event,
            on_stream=self._on_stream,
            on_close=self._on_close,
            closed_error=lambda why: ChannelClosed(sandbox_id, why),
        )
        self.closed = self.peer.closed
        if hello.idle_timeout_s:
            interval = hello.idle_timeout_s / HEARTBEATS_PER_IDLE_TIMEOUT
            self._heartbeat = asyncio.create_task(self._beat(interval), name=f"heartbeat-{sandbox_id}")

    @classmethod
    async def handshake(
        cls, sandbox_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Channel:
        """Read the agent's Hello and check that this controller can speak to it. The caller bounds the
        wait. Raises :class:`IncompatibleAgent` with the reason and the fix."""
        frame = await protocol.read_frame(reader)
        if frame is None:
            raise ChannelClosed(sandbox_id, "agent closed the channel before saying hello")
        body = protocol.decode_message(frame.payload) if isinstance(frame, protocol.MessageFrame) else None
        if not isinstance(body, protocol.Hello):
            raise NotHello("first frame from the agent was not hello")
        if body.protocol not in protocol.SUPPORTED_VERSIONS:
            raise IncompatibleAgent(
                f"agent {body.agent_version} speaks protocol {body.protocol}; this controller supports "
                f"{sorted(protocol.SUPPORTED_VERSIONS)}: rebuild the guest image"
            )
        missing = protocol.REQUIRED_CAPABILITIES[body.role] - set(body.capabilities)
        if missing:
            raise IncompatibleAgent(
                f"agent {body.agent_version} lacks {', '.join(sorted(missing))}, which a {body.role} "
                "sandbox needs: rebuild the guest image with those parts"
            )
        if body.sandbox_id != sandbox_id:
            raise protocol.ProtocolError(
                f"agent says it is sandbox {body.sandbox_id!r}, expected {sandbox_id!r}"
            )
        return cls(sandbox_id, reader, writer, body)

    # ------------------------------------------------------------------ requests

    async def request(self, message: protocol.Request[ResultT], *, timeout_s: float = 30.0) -> ResultT:
        """Send a request and return its reply model. Raises :class:`AgentError`, :class:`ChannelClosed`
        or ``TimeoutError``."""
        return await self.peer.request(message, timeout_s=timeout_s)

    async def open_stream(self, target: Literal["vnc"], *, timeout_s: float = 10.0) -> ByteStream:
        streams: list[ByteStream] = []

        def register(opened: protocol.StreamOpened) -> None:
            # The agent may send the stream's first bytes right behind its reply (an RFB server speaks
            # first): the stream must be known before the next frame is read.
            stream = ByteStream(self, opened.stream_id)
            self._streams[stream.stream_id] = stream
            streams.append(stream)

        await self.peer.request(protocol.OpenStream(target=target), timeout_s=timeout_s, on_reply=register)
        return streams[0]

    async def exec(self, request: protocol.Exec, *, timeout_s: float = 30.0) -> RemoteCommand:
        """Start a command; its output follows through the returned :class:`RemoteCommand`, which the
        caller must close."""
        commands: list[RemoteCommand] = []

        def register(started: protocol.ExecStarted) -> None:
            command = RemoteCommand(self, started.exec_id, request.window_bytes)
            self._commands[command.exec_id] = command  # before its first output is read
            commands.append(command)

        await self.peer.request(request, timeout_s=timeout_s, on_reply=register)
        return commands[0]

    # ------------------------------------------------------------------ events

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[BaseModel | None]]:
        """Events from now on, in order; ``None`` when the channel closes (or this subscriber fell
        :data:`SUBSCRIBER_QUEUE` events behind). Exec output goes to its :class:`RemoteCommand` only."""
        queue: asyncio.Queue[BaseModel | None] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE + 1)
        self._subscribers.append(queue)
        if self.closed.is_set():
            queue.put_nowait(None)
        try:
            yield queue
        finally:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(queue)

    def _on_event(self, message: BaseModel) -> None:
        if isinstance(message, protocol.ExecOutput | protocol.ExecExit):
            command = self._commands.get(message.exec_id)
            if command is not None:
                command._feed(message)
            return
        if isinstance(message, protocol.CloseStream):
            stream = self._streams.pop(message.stream_id, None)
            if stream is not None:
                stream._feed(None)
        for queue in list(self._subscribers):
            if queue.qsize() < SUBSCRIBER_QUEUE:
                queue.put_nowait(message)
            else:
                log.warning("channel.subscriber_overflow", sandbox_id=self.sandbox_id)
                self._subscribers.remove(queue)
                queue.put_nowait(None)  # the one slot kept free for this

    async def _on_stream(self, stream_id: int, data: bytes) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None:
            stream._feed(data)

    async def _beat(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.peer.request(protocol.Ping(), timeout_s=interval_s)
            except TimeoutError:
                log.warning("channel.heartbeat_unanswered", sandbox_id=self.sandbox_id, after_s=interval_s)
            except (ChannelClosed, AgentError):
                return

    def _on_close(self, why: str) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for stream in list(self._streams.values()):
            stream._feed(None)
        self._streams.clear()
        for command in list(self._commands.values()):
            command._feed(None)
        self._commands.clear()
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    async def close(self) -> None:
        await self.peer.close()
        if self._heartbeat is not None:
            await asyncio.gather(self._heartbeat, return_exceptions=True)
