"""The agent's connection to its streamer: relays the controller's signaling, learns the streamer's readiness.

The streamer (``python -m browservm.guest.streamer``) serves :mod:`browservm.protocol` on a unix socket;
this is the agent's :class:`~browservm.protocol.Peer` to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog
from pydantic import BaseModel

from browservm import protocol

log = structlog.get_logger(__name__)

SIGNAL_TIMEOUT_S = 15.0
RequestError = protocol.RequestError


class StreamerLink:
    """The agent's connection to the streamer's unix socket: relays signaling, learns readiness."""

    def __init__(self, emit: Callable[[BaseModel], None], on_lost: Callable[[], None]) -> None:
        self.emit = emit
        self.on_lost = on_lost
        self.ready = asyncio.Event()
        self._peer: protocol.Peer | None = None
        self.peers: set[str] = set()
        """Viewers the streamer answered and has not closed: told ``closed`` if the streamer goes away."""

    async def connect(self, path: Path, timeout_s: float) -> None:
        """Connect, retrying until the streamer has created its socket (bounded by ``timeout_s``)."""
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    reader, writer = await asyncio.open_unix_connection(str(path))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    await asyncio.sleep(0.05)
        self._peer = protocol.Peer(
            reader,
            writer,
            name="streamer",
            on_event=self._on_event,
            on_close=self._lost,
            closed_error=lambda why: RequestError("streamer_unavailable", f"the streamer went away ({why})"),
        )

    def _on_event(self, message: BaseModel) -> None:
        if isinstance(message, protocol.ServiceState):
            if message.state == "ready":
                self.ready.set()
        elif isinstance(message, protocol.SignalEvent):
            if message.kind == "closed":
                self.peers.discard(message.peer_id)
            self.emit(message)

    def _lost(self, why: str) -> None:
        log.warning("streamer.link_broken", error=why)
        self.ready.clear()
        # Their peer connections died with the streamer. Without this notice a viewer learns it only from
        # ICE timing out (about 5 s), then tries an ICE restart that brings the video back from the
        # restarted streamer but not the data channel: input would be lost.
        for peer_id in sorted(self.peers):
            self.emit(protocol.SignalEvent(peer_id=peer_id, kind="closed"))
        self.peers.clear()
        self.on_lost()

    async def signal(self, request: protocol.Signal) -> protocol.Answer:
        if self._peer is None or not self.ready.is_set():
            raise RequestError("streamer_unavailable", "the streamer is not ready; retry or use VNC")
        try:
            answer = await self._peer.request(request, timeout_s=SIGNAL_TIMEOUT_S)
        except TimeoutError as exc:
            raise RequestError("streamer_timeout", f"no answer within {SIGNAL_TIMEOUT_S:.0f}s") from exc
        if request.kind == "offer":
            self.peers.add(request.peer_id)
        elif request.kind == "close":
            self.peers.discard(request.peer_id)
        return answer

    async def close(self) -> None:
        if self._peer is not None:
            await self._peer.close()
