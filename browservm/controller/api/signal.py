"""``WS /v1/sessions/{id}/signal``: WebRTC signaling for one viewer peer per WebSocket.

The page sends ``{"type": "offer", "sdp"}`` (again, for an ICE restart on the same peer), ``{"type":
"candidate", "candidate"}`` and ``{"type": "bye"}``; it receives ``{"type": "hello", "peer_id"}``,
``{"type": "answer", "sdp"}``, ``{"type": "candidate", "candidate"}``, ``{"type": "connected"}``,
``{"type": "closed", "reason"}`` and ``{"type": "error", "code", "message"}``. The socket authenticates
with the session's viewer token and reaches the streamer only through the session's channel
(:class:`browservm.controller.relay.PeerRelay`); the guest never becomes reachable from the page except
by the media path ICE negotiates. WHEP is the other front door (:mod:`browservm.controller.api.whep`).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from browservm import protocol
from browservm.aio import cancel_and_wait
from browservm.controller.deps import serve_viewer_socket
from browservm.controller.relay import MAX_SDP, PeerRelay, new_peer_id
from browservm.sandbox.channel import AgentError, Channel, ChannelClosed

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/sessions", tags=["viewer"])


class _PageOffer(BaseModel):
    type: Literal["offer"]
    sdp: str = Field(min_length=1, max_length=MAX_SDP)


class _PageCandidate(BaseModel):
    type: Literal["candidate"]
    candidate: dict[str, Any] | None = None


class _PageBye(BaseModel):
    type: Literal["bye"]


_PAGE_MESSAGE: TypeAdapter[_PageOffer | _PageCandidate | _PageBye] = TypeAdapter(
    Annotated[_PageOffer | _PageCandidate | _PageBye, Field(discriminator="type")]
)


@router.websocket("/{session_id}/signal")
async def signal_socket(websocket: WebSocket, session_id: str) -> None:
    await serve_viewer_socket(websocket, session_id, "signal", _relay_socket)


async def _relay_socket(websocket: WebSocket, session_id: str, channel: Channel) -> None:
    await websocket.accept()
    relay = PeerRelay(channel, new_peer_id("ws"))
    log.info("signal.open", session_id=session_id, peer_id=relay.peer_id)
    await websocket.send_json({"type": "hello", "peer_id": relay.peer_id})
    send_lock = asyncio.Lock()

    async def send(message: dict[str, Any]) -> None:
        async with send_lock:
            await websocket.send_json(message)

    async with channel.subscribe() as events:
        forward = asyncio.create_task(_forward_events(events, relay.peer_id, send))
        reason = "page closed"
        try:
            reason = await _serve_page(websocket, relay, send)
        except WebSocketDisconnect:
            reason = "page disconnected"
        finally:
            await cancel_and_wait([forward])
            await relay.close()
            log.info("signal.closed", session_id=session_id, peer_id=relay.peer_id, reason=reason)
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.close()


async def _serve_page(websocket: WebSocket, relay: PeerRelay, send: Any) -> str:
    while True:
        received = await websocket.receive()
        if received["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(received.get("code", 1000), received.get("reason"))
        raw = received.get("text")
        if raw is None:
            # 1003: the endpoint takes text only (RFC 6455 section 7.4.1).
            await websocket.close(code=1003, reason="signaling messages are JSON in text frames, not binary")
            return "page sent a binary frame"
        try:
            message = _PAGE_MESSAGE.validate_json(raw)
        except ValidationError as exc:
            await send(
                {
                    "type": "error",
                    "code": "bad_message",
                    "message": f"not a signaling message: {exc.errors()[0]['msg']}",
                }
            )
            continue
        try:
            if isinstance(message, _PageOffer):
                answer = await relay.offer(message.sdp)
                await send({"type": "answer", "sdp": answer})
            elif isinstance(message, _PageCandidate):
                await relay.candidate(message.candidate)
            else:
                return "page said bye"
        except AgentError as exc:
            await send({"type": "error", "code": exc.code, "message": exc.message})
        except TimeoutError:
            await send(
                {
                    "type": "error",
                    "code": "streamer_timeout",
                    "message": "the streamer did not answer in time",
                }
            )
        except ChannelClosed:
            await send({"type": "closed", "reason": "the session's sandbox went away"})
            return "channel closed"


async def _forward_events(events: asyncio.Queue[BaseModel | None], peer_id: str, send: Any) -> None:
    while True:
        event = await events.get()
        if event is None:
            with contextlib.suppress(Exception):
                await send({"type": "closed", "reason": "the session's sandbox went away"})
            return
        if not isinstance(event, protocol.SignalEvent) or event.peer_id != peer_id:
            continue
        if event.kind == "candidate":
            await send({"type": "candidate", "candidate": event.candidate})
        elif event.kind == "connected":
            await send({"type": "connected"})
        else:
            await send({"type": "closed", "reason": "the streamer closed this peer"})
