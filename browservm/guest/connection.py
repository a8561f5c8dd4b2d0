"""One controller's connection to the agent: its peer, and the byte streams (VNC bridges) opened on it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel

from browservm import protocol
from browservm.guest.vnc import VncBridge

CLOSE_FLUSH_S = 0.2
"""How long a connection that is replaced or ends may take to send what it has queued."""


class ControllerConnection:
    """One controller connection: its peer and the byte streams (VNC bridges) opened on it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handlers: Callable[[ControllerConnection], Mapping[type[protocol.Request[Any]], protocol.Handler]],
        on_event: Callable[[BaseModel], None],
    ) -> None:
        self.streams: dict[int, VncBridge] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._on_other_event = on_event
        self.peer = protocol.Peer(
            reader,
            writer,
            name="controller",
            handlers=handlers(self),
            on_event=self._on_event,
            on_stream=self._on_stream,
        )

    def _on_event(self, message: BaseModel) -> None:
        if not isinstance(message, protocol.CloseStream):
            self._on_other_event(message)
            return
        bridge = self.streams.pop(message.stream_id, None)
        if bridge is not None:
            task = asyncio.create_task(bridge.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _on_stream(self, stream_id: int, data: bytes) -> None:
        bridge = self.streams.get(stream_id)
        if bridge is None:
            return
        try:
            await bridge.write(data)
        except ConnectionError:
            # x11vnc dropped this viewer: end that stream, not the whole channel.
            self.streams.pop(stream_id, None)
            await bridge.close()
            self.peer.send(protocol.CloseStream(stream_id=stream_id))

    async def close(self) -> None:
        """Flush what is queued (bounded), then drop the connection and its streams."""
        await self.peer.close(flush_s=CLOSE_FLUSH_S)
        for bridge in list(self.streams.values()):
            await bridge.close()
        self.streams.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)
