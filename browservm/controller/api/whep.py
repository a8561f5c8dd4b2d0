"""WHEP (RFC 9725): a standard player's way to the session's stream.

``POST /v1/sessions/{id}/whep`` with an ``application/sdp`` offer answers ``201`` with the answer, a
``Location`` naming the new resource and the ICE servers as ``Link`` headers; ``PATCH`` the resource
with ``application/trickle-ice-sdpfrag`` to trickle candidates (``204``; ICE restarts are not supported
and get ``422``); ``DELETE`` ends it. Every request carries the session's viewer token as a bearer token
(``?token=`` is taken too, for players that cannot set headers), and every answer the CORS headers a
player on another origin needs. The offer goes to the streamer through the session's channel
(:class:`browservm.controller.relay.PeerRelay`), as the signaling WebSocket's does.
"""

from __future__ import annotations

import secrets
from typing import Annotated

import structlog
from fastapi import APIRouter, Depends, Header, Query, Request, Response

from browservm.controller import turn
from browservm.controller.auth import ViewerClaims
from browservm.controller.deps import verify_viewer, viewer_runtime
from browservm.controller.errors import ApiError
from browservm.controller.relay import MAX_SDP, OFFER_REFUSAL_STATUS, PeerRelay, new_peer_id
from browservm.controller.sdp import ice_ufrag, parse_sdpfrag
from browservm.controller.viewers import WhepPeer
from browservm.sandbox.channel import AgentError, ChannelClosed
from browservm.settings import Settings

log = structlog.get_logger(__name__)

router = APIRouter(prefix="/v1/sessions", tags=["viewer"])

SDP = "application/sdp"
SDPFRAG = "application/trickle-ice-sdpfrag"
_CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Location, ETag, Link, Accept-Patch, Accept-Post",
}


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def whep_viewer(
    session_id: str,
    request: Request,
    token: Annotated[str | None, Query(include_in_schema=False)] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> ViewerClaims:
    """The viewer token's claims, its refusals carrying CORS headers (a player reads them cross-origin)."""
    scheme, _, value = (authorization or "").partition(" ")
    bearer = value.strip() if scheme.lower() == "bearer" else ""
    try:
        return verify_viewer(viewer_runtime(request.app.state).secret, bearer or token, session_id)
    except ApiError as exc:
        exc.headers = {**exc.headers, **_CORS}
        raise


WhepViewer = Annotated[ViewerClaims, Depends(whep_viewer)]


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
    claims: WhepViewer,
    content_type: Annotated[str | None, Header()] = None,
) -> Response:
    if _media_type(content_type) != SDP:
        raise ApiError(415, "unsupported_media_type", f"send the offer as Content-Type: {SDP}", headers=_CORS)
    offer = (await request.body()).decode("utf-8", errors="replace")
    if not offer.startswith("v=0") or len(offer) > MAX_SDP:
        raise ApiError(
            400, "bad_offer", "the body is not an SDP offer (it must start with v=0)", headers=_CORS
        )
    runtime = viewer_runtime(request.app.state)
    channel = await runtime.sessions.channel(session_id)
    relay = PeerRelay(channel, new_peer_id("whep"))
    try:
        answer = await relay.offer(offer)
    except AgentError as exc:
        raise ApiError(
            OFFER_REFUSAL_STATUS.get(exc.code, 502),
            exc.code,
            f"the streamer refused the offer: {exc.message}",
            headers=_CORS,
        ) from None
    except TimeoutError:
        raise ApiError(
            504, "streamer_timeout", "the streamer did not answer in time", headers=_CORS
        ) from None
    except ChannelClosed:
        raise ApiError(409, "no_sandbox", "the session's sandbox went away", headers=_CORS) from None
    peer = WhepPeer(session_id, relay, f'"{secrets.token_hex(8)}"', ice_ufrag(offer))
    for displaced in runtime.viewers.add_whep(peer):
        await displaced.relay.close()
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
    peer = viewer_runtime(request.app.state).viewers.whep(session_id, peer_id)
    if peer is None:
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


@router.patch("/{session_id}/whep/{peer_id}", status_code=204, response_class=Response)
async def whep_patch(
    session_id: str,
    peer_id: str,
    request: Request,
    _claims: WhepViewer,
    content_type: Annotated[str | None, Header()] = None,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
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
    _claims: WhepViewer,
) -> Response:
    peer = _resource(request, session_id, peer_id)
    viewer_runtime(request.app.state).viewers.remove_whep(peer_id)
    await peer.relay.close()
    log.info("whep.deleted", session_id=session_id, peer_id=peer_id)
    return Response(status_code=200, headers=_CORS)
