"""WebRTC signaling between a viewer's page and the streamer inside the session's sandbox.

Two front doors, one relay:

* ``WS /v1/sessions/{id}/signal``: one peer per WebSocket. The page sends ``{"type": "offer", "sdp"}``
  (again, for an ICE restart on the same peer), ``{"type": "candidate", "candidate"}`` and ``{"type":
  "bye"}``; it receives ``{"type": "hello", "peer_id"}``, ``{"type": "answer", "sdp"}``, ``{"type":
  "candidate", "candidate"}``, ``{"type": "connected"}``, ``{"type": "closed", "reason"}`` and ``{"type":
  "error", "code", "message"}``.
* WHEP (RFC 9725 semantics, ``application/sdp`` offer → ``201`` with the answer and a ``Location``):
  ``POST /v1/sessions/{id}/whep``, ``PATCH`` the resource with ``application/trickle-ice-sdpfrag`` to
  trickle candidates (``204``; ICE restarts are not supported and get ``422``), ``DELETE`` to end it.

Both authenticate with the session's viewer token and talk to the streamer only through the session's
channel (:class:`browservm.protocol.Signal` requests, :class:`browservm.protocol.SignalEvent` events);
the guest never becomes reachable from the page except by the media path ICE negotiates.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol

import structlog
from fastapi import APIRouter, Header, Request, Response, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from browservm import protocol
from browservm.aio import cancel_and_wait
from browservm.controller import turn
from browservm.controller.auth import ViewerClaims, verify_viewer_token
from browservm.controller.errors import ApiError, error_body
from browservm.sandbox.channel import AgentError, Channel, ChannelClosed
from browservm.settings import Settings

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/sessions", tags=["viewer"])

OFFER_TIMEOUT_S = 20.0
"""The streamer answers after gathering its candidates; a cold streamer needs up to about a second."""
SIGNAL_TIMEOUT_S = 5.0
MAX_SDP = 64 * 1024
MAX_WHEP_PEERS_PER_SESSION = 4
"""WHEP peers have no connection whose end we see; past this many, the oldest one is closed."""
MAX_SOCKETS_PER_SESSION = 4
"""Each signaling socket costs a peer connection and an encoder in the guest: a few tabs, not a crowd."""


class _SessionChannels(Protocol):
    async def channel(self, session_id: str) -> Channel: ...


class ViewerRuntime(Protocol):
    """What the viewer routes need of the running controller (``browservm.controller.services``)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def secret(self) -> bytes: ...
    @property
    def sessions(self) -> _SessionChannels: ...


def runtime_of(app_state: Any) -> ViewerRuntime:
    runtime: ViewerRuntime = app_state.services
    return runtime


# ---------------------------------------------------------------------------------------------- the relay


class PeerRelay:
    """One viewer peer connection at the streamer, reached through the session's channel."""

    def __init__(self, channel: Channel, peer_id: str) -> None:
        self.channel = channel
        self.peer_id = peer_id
        self.closed = False

    async def offer(self, sdp: str) -> str:
        """Hand the page's offer to the streamer; return its answer SDP (complete: aiortc gathers first)."""
        result = await self.channel.request(
            protocol.Signal(id=self.channel.next_id(), peer_id=self.peer_id, kind="offer", sdp=sdp),
            timeout_s=OFFER_TIMEOUT_S,
        )
        answer = result.get("sdp")
        if not isinstance(answer, str) or not answer:
            raise AgentError("bad_answer", "the streamer replied to the offer without an answer SDP")
        return answer

    async def candidate(self, candidate: Mapping[str, Any] | None) -> None:
        """Trickle one of the page's candidates (``None``: end of candidates) to the streamer."""
        await self.channel.request(
            protocol.Signal(
                id=self.channel.next_id(),
                peer_id=self.peer_id,
                kind="candidate",
                candidate=dict(candidate) if candidate is not None else None,
            ),
            timeout_s=SIGNAL_TIMEOUT_S,
        )

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        # Best effort: the streamer also drops peers whose ICE dies.
        with contextlib.suppress(AgentError, ChannelClosed, ConnectionError, TimeoutError):
            await self.channel.request(
                protocol.Signal(id=self.channel.next_id(), peer_id=self.peer_id, kind="close"),
                timeout_s=SIGNAL_TIMEOUT_S,
            )


def _new_peer_id(kind: str) -> str:
    return f"{kind}-{secrets.token_urlsafe(9)}"


# ---------------------------------------------------------------------------------------------- WebSocket


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


def _socket_token(websocket: WebSocket) -> str | None:
    token = websocket.query_params.get("token")
    if token:
        return token
    scheme, _, value = (websocket.headers.get("authorization") or "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


async def _deny(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse a WebSocket before accepting it: a real HTTP status where the server can send one."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse(error_body(code, message), status))
    else:
        # 4000 + HTTP status: the close code a page can read when the handshake itself cannot fail.
        await websocket.close(code=4000 + status, reason=f"{code}: {message}"[:120])


async def authorize_socket(websocket: WebSocket, session_id: str) -> tuple[ViewerClaims, Channel] | None:
    """Check the viewer token and find the session's live channel; refuse the socket if either fails."""
    runtime = runtime_of(websocket.app.state)
    token = _socket_token(websocket)
    try:
        if not token:
            raise ApiError(
                401, "unauthorized", "a viewer token is required (?token=… or Authorization: Bearer)"
            )
        claims = verify_viewer_token(runtime.secret, token, session_id)
        channel = await runtime.sessions.channel(session_id)
    except ApiError as exc:
        log.info("viewer.socket_refused", session_id=session_id, status=exc.status, code=exc.code)
        await _deny(websocket, exc.status, exc.code, exc.message)
        return None
    return claims, channel


@router.websocket("/{session_id}/signal")
async def signal_socket(websocket: WebSocket, session_id: str) -> None:
    authorized = await authorize_socket(websocket, session_id)
    if authorized is None:
        return
    _claims, channel = authorized
    sockets: dict[str, int] = _state_dict(websocket.app.state, "signal_sockets")
    if sockets.get(session_id, 0) >= MAX_SOCKETS_PER_SESSION:
        await _deny(
            websocket,
            429,
            "too_many_viewers",
            f"this session already has {MAX_SOCKETS_PER_SESSION} viewers connected; close one and retry",
        )
        return
    sockets[session_id] = sockets.get(session_id, 0) + 1
    try:
        await _relay_socket(websocket, session_id, channel)
    finally:
        sockets[session_id] -= 1
        if not sockets[session_id]:
            del sockets[session_id]


def _state_dict(app_state: Any, name: str) -> dict[str, int]:
    if not hasattr(app_state, name):
        setattr(app_state, name, {})
    value: dict[str, int] = getattr(app_state, name)
    return value


async def _relay_socket(websocket: WebSocket, session_id: str, channel: Channel) -> None:
    await websocket.accept()
    relay = PeerRelay(channel, _new_peer_id("ws"))
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
        raw = await websocket.receive_text()
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


# ---------------------------------------------------------------------------------------------- WHEP

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Location, ETag, Link, Accept-Patch, Accept-Post",
}


@dataclass
class WhepPeer:
    session_id: str
    relay: PeerRelay
    etag: str
    ice_ufrag: str | None


@dataclass
class WhepPeers:
    """The WHEP resources this controller holds (kept on ``app.state``)."""

    peers: dict[str, WhepPeer] = field(default_factory=dict)

    def of_session(self, session_id: str) -> list[WhepPeer]:
        return [peer for peer in self.peers.values() if peer.session_id == session_id]


def whep_peers(app_state: Any) -> WhepPeers:
    if not hasattr(app_state, "whep_peers"):
        app_state.whep_peers = WhepPeers()
    peers: WhepPeers = app_state.whep_peers
    return peers


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _viewer(request: Request, session_id: str, authorization: str | None) -> ViewerClaims:
    runtime = runtime_of(request.app.state)
    scheme, _, value = (authorization or "").partition(" ")
    token = value.strip() if scheme.lower() == "bearer" else ""
    token = token or request.query_params.get("token", "")
    if not token:
        raise ApiError(
            401,
            "unauthorized",
            "send the viewer token as 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer", **_CORS},
        )
    try:
        return verify_viewer_token(runtime.secret, token, session_id)
    except ApiError as exc:
        exc.headers = {**exc.headers, **_CORS}
        raise


def _ice_ufrag(sdp: str) -> str | None:
    for line in sdp.splitlines():
        if line.startswith("a=ice-ufrag:"):
            return line.split(":", 1)[1].strip()
    return None


def _ice_link_headers(settings: Settings, session_id: str, expires_at: float) -> list[str]:
    """RFC 9725 section 4.6: offer the ICE servers as Link headers along with the answer."""
    links = []
    for server in turn.ice_servers(settings, session_id, session_expires_at=expires_at):
        for url in server.urls:
            link = f'<{url}>; rel="ice-server"'
            if server.username is not None and server.credential is not None:
                link += f'; username="{server.username}"; credential="{server.credential}"'
                link += '; credential-type="password"'
            links.append(link)
    return links


@router.options("/{session_id}/whep", include_in_schema=False)
async def whep_options(session_id: str) -> Response:
    return Response(
        status_code=204,
        headers={
            **_CORS,
            "Accept-Post": SDP,
            "Allow": "POST, OPTIONS",
            "Access-Control-Allow-Methods": "POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
        },
    )


@router.post(
    "/{session_id}/whep",
    status_code=201,
    response_class=Response,
    responses={201: {"content": {SDP: {}}, "description": "the answer; Location names the new resource"}},
)
async def whep_post(
    session_id: str,
    request: Request,
    content_type: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    claims = _viewer(request, session_id, authorization)
    if _media_type(content_type) != SDP:
        raise ApiError(415, "unsupported_media_type", f"send the offer as Content-Type: {SDP}", headers=_CORS)
    offer = (await request.body()).decode("utf-8", errors="replace")
    if not offer.startswith("v=0") or len(offer) > MAX_SDP:
        raise ApiError(
            400, "bad_offer", "the body is not an SDP offer (it must start with v=0)", headers=_CORS
        )
    runtime = runtime_of(request.app.state)
    channel = await runtime.sessions.channel(session_id)
    registry = whep_peers(request.app.state)
    relay = PeerRelay(channel, _new_peer_id("whep"))
    try:
        answer = await relay.offer(offer)
    except AgentError as exc:
        raise ApiError(
            502, exc.code, f"the streamer refused the offer: {exc.message}", headers=_CORS
        ) from None
    except TimeoutError:
        raise ApiError(
            504, "streamer_timeout", "the streamer did not answer in time", headers=_CORS
        ) from None
    except ChannelClosed:
        raise ApiError(409, "no_sandbox", "the session's sandbox went away", headers=_CORS) from None
    # Resources of sandboxes that went away are of no use to anyone: forget them.
    for gone in [p for p in registry.peers.values() if p.relay.channel.closed.is_set()]:
        registry.peers.pop(gone.relay.peer_id, None)
    existing = registry.of_session(session_id)
    for stale in existing[: max(0, len(existing) - MAX_WHEP_PEERS_PER_SESSION + 1)]:
        registry.peers.pop(stale.relay.peer_id, None)
        await stale.relay.close()
    peer = WhepPeer(session_id, relay, f'"{secrets.token_hex(8)}"', _ice_ufrag(offer))
    registry.peers[relay.peer_id] = peer
    log.info("whep.created", session_id=session_id, peer_id=relay.peer_id)
    headers = {
        **_CORS,
        "Location": f"/v1/sessions/{session_id}/whep/{relay.peer_id}",
        "ETag": peer.etag,
        "Accept-Patch": SDPFRAG,
    }
    response = Response(answer, status_code=201, media_type=SDP, headers=headers)
    for link in _ice_link_headers(runtime.settings, session_id, claims.expires_at):
        response.headers.append("Link", link)
    return response


def _resource(request: Request, session_id: str, peer_id: str) -> WhepPeer:
    peer = whep_peers(request.app.state).peers.get(peer_id)
    if peer is None or peer.session_id != session_id:
        raise ApiError(404, "whep_resource_not_found", f"no WHEP resource {peer_id!r}", headers=_CORS)
    return peer


@router.options("/{session_id}/whep/{peer_id}", include_in_schema=False)
async def whep_resource_options(session_id: str, peer_id: str) -> Response:
    return Response(
        status_code=204,
        headers={
            **_CORS,
            "Accept-Patch": SDPFRAG,
            "Allow": "PATCH, DELETE, OPTIONS",
            "Access-Control-Allow-Methods": "PATCH, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
        },
    )


def parse_sdpfrag(body: str) -> tuple[str | None, list[dict[str, Any] | None]]:
    """The ``ice-ufrag`` and candidates of a trickle-ice-sdpfrag (RFC 8840); ``None`` ends candidates."""
    ufrag: str | None = None
    mid: str | None = None
    index = -1
    candidates: list[dict[str, Any] | None] = []
    for raw in body.splitlines():
        line = raw.strip()
        if line.startswith("a=ice-ufrag:"):
            ufrag = line.split(":", 1)[1].strip()
        elif line.startswith("m="):
            index += 1
        elif line.startswith("a=mid:"):
            mid = line.split(":", 1)[1].strip()
        elif line.startswith("a=candidate:"):
            candidates.append(
                {
                    "candidate": line[2:],
                    "sdpMid": mid or "0",
                    "sdpMLineIndex": max(index, 0),
                    "usernameFragment": ufrag,
                }
            )
        elif line == "a=end-of-candidates":
            candidates.append(None)
    return ufrag, candidates


@router.patch("/{session_id}/whep/{peer_id}", status_code=204, response_class=Response)
async def whep_patch(
    session_id: str,
    peer_id: str,
    request: Request,
    content_type: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    _viewer(request, session_id, authorization)
    peer = _resource(request, session_id, peer_id)
    if _media_type(content_type) != SDPFRAG:
        raise ApiError(
            415, "unsupported_media_type", f"send candidates as Content-Type: {SDPFRAG}", headers=_CORS
        )
    if if_match is not None and if_match not in ("*", peer.etag):
        raise ApiError(412, "etag_mismatch", "If-Match does not name this ICE session", headers=_CORS)
    ufrag, candidates = parse_sdpfrag((await request.body()).decode("utf-8", errors="replace"))
    if if_match == "*" or (ufrag is not None and peer.ice_ufrag is not None and ufrag != peer.ice_ufrag):
        # RFC 9725 section 4.4: a resource that trickles but cannot restart ICE answers 422.
        raise ApiError(
            422,
            "ice_restart_unsupported",
            "ICE restarts are not supported over WHEP: DELETE this resource and POST a new offer",
            headers=_CORS,
        )
    try:
        for candidate in candidates:
            await peer.relay.candidate(candidate)
    except AgentError as exc:
        raise ApiError(
            422, exc.code, f"the streamer refused the candidate: {exc.message}", headers=_CORS
        ) from None
    except (TimeoutError, ChannelClosed):
        raise ApiError(409, "no_sandbox", "the session's streamer is not reachable", headers=_CORS) from None
    return Response(status_code=204, headers=_CORS)


@router.delete("/{session_id}/whep/{peer_id}", status_code=200, response_class=Response)
async def whep_delete(
    session_id: str,
    peer_id: str,
    request: Request,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    _viewer(request, session_id, authorization)
    peer = _resource(request, session_id, peer_id)
    whep_peers(request.app.state).peers.pop(peer_id, None)
    await peer.relay.close()
    log.info("whep.deleted", session_id=session_id, peer_id=peer_id)
    return Response(status_code=200, headers=_CORS)


__all__ = ["PeerRelay", "ViewerRuntime", "authorize_socket", "parse_sdpfrag", "router"]
