"""``WS /v1/sessions/{id}/vnc``: the noVNC fallback, RFB bytes between the page and the guest's VNC server.

The bytes travel over the session's channel as a multiplexed stream (``OpenStream(target="vnc")``), so
the guest's VNC port is never reachable from outside: the viewer token is the only way in. noVNC asks
for the ``binary`` subprotocol and the bridge answers with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

import structlog
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.websockets import WebSocketState

from browservm.controller.deps import serve_viewer_socket
from browservm.sandbox.channel import AgentError, ByteStream, Channel, ChannelClosed

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/sessions", tags=["viewer"])

OPEN_TIMEOUT_S = 10.0


@router.websocket("/{session_id}/vnc")
async def vnc_socket(websocket: WebSocket, session_id: str) -> None:
    await serve_viewer_socket(websocket, session_id, "vnc", _bridge)


async def _bridge(websocket: WebSocket, session_id: str, channel: Channel) -> None:
    try:
        stream = await channel.open_stream("vnc", timeout_s=OPEN_TIMEOUT_S)
    except (AgentError, ChannelClosed, TimeoutError) as exc:
        log.warning("vnc.open_failed", session_id=session_id, error=str(exc))
        await websocket.close(code=1011, reason="the session's VNC server is not available")
        return
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol="binary" if "binary" in offered else None)
    log.info("vnc.open", session_id=session_id, stream_id=stream.stream_id)
    sent = received = 0

    async def page_to_guest() -> None:
        nonlocal received
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None and message.get("text") is not None:
                data = message["text"].encode()
            if data:
                received += len(data)
                await stream.write(data)

    async def guest_to_page() -> None:
        nonlocal sent
        while True:
            data = await stream.read()
            if data is None:
                return
            sent += len(data)
            await websocket.send_bytes(data)

    await _pump(page_to_guest(), guest_to_page(), stream)
    if websocket.client_state == WebSocketState.CONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close()
    log.info("vnc.closed", session_id=session_id, bytes_to_page=sent, bytes_to_guest=received)


async def _pump(a: Coroutine[Any, Any, None], b: Coroutine[Any, Any, None], stream: ByteStream) -> None:
    """Run both directions until either ends, then close the other and the stream."""
    tasks = [asyncio.ensure_future(a), asyncio.ensure_future(b)]
    try:
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(
                asyncio.CancelledError, WebSocketDisconnect, ChannelClosed, ConnectionError, RuntimeError
            ):
                await task
    finally:
        for task in tasks:
            task.cancel()
        await stream.close()
