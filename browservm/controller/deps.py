"""FastAPI dependencies: the services, the caller's identity, viewer claims, the admission of viewer WebSockets.

A viewer (the page, a WHEP player) proves itself with the session's viewer token, as ``?token=`` or
``Authorization: Bearer``; the operator's API key is not one. This module is the only place that reads it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Protocol

import structlog
from fastapi import Depends, Header, Query, Request, WebSocket
from fastapi.responses import JSONResponse

from browservm.controller.auth import Principal, ViewerClaims, verify_viewer_token
from browservm.controller.errors import ApiError, error_body
from browservm.controller.services import Services
from browservm.controller.viewers import SocketKind, TooManyViewers, ViewerRegistry
from browservm.sandbox.channel import Channel
from browservm.settings import Settings
from browservm.store import api_keys

log = structlog.get_logger(__name__)


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


async def require_api_key(
    services: ServicesDep, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    secret = _bearer(authorization)
    if secret is None:
        raise ApiError(
            401,
            "unauthorized",
            "send the operator API key as 'Authorization: Bearer <key>' (create one: browservm keys create)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    async with services.db.session() as db:
        key = await api_keys.authenticate(db, secret)
        if key is None:
            raise ApiError(
                401,
                "invalid_api_key",
                "API key is unknown or revoked",
                headers={"WWW-Authenticate": "Bearer"},
            )
        # Counted once the key is known, so one tenant's flood cannot spend another's allowance.
        services.quotas.rate.admit(key.id)
        if services.key_use.due(key.id):
            await api_keys.touch(db, key.id)
    return Principal(key_id=key.id, tenant=key.tenant)


PrincipalDep = Annotated[Principal, Depends(require_api_key)]


class _SessionChannels(Protocol):
    async def channel(self, session_id: str) -> Channel: ...


class ViewerRuntime(Protocol):
    """What the viewer routes need of the running controller (:class:`Services`, or a test bed's)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def secret(self) -> bytes: ...
    @property
    def sessions(self) -> _SessionChannels: ...
    @property
    def viewers(self) -> ViewerRegistry: ...


def viewer_runtime(app_state: Any) -> ViewerRuntime:
    runtime: ViewerRuntime = app_state.services
    return runtime


def verify_viewer(secret: bytes, token: str | None, session_id: str) -> ViewerClaims:
    """The claims of a viewer token for ``session_id``; 401 without one, 401/403 for a bad or foreign one."""
    if not token:
        raise ApiError(
            401,
            "unauthorized",
            "a viewer token is required (?token=… or Authorization: Bearer)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return verify_viewer_token(secret, token, session_id)


def viewer_claims(
    session_id: str,
    request: Request,
    token: Annotated[str | None, Query(description="viewer token (or Authorization: Bearer)")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> ViewerClaims:
    runtime = viewer_runtime(request.app.state)
    return verify_viewer(runtime.secret, token or _bearer(authorization), session_id)


ViewerDep = Annotated[ViewerClaims, Depends(viewer_claims)]


async def _deny_socket(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Refuse a WebSocket before accepting it: a real HTTP status where the server can send one."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(JSONResponse(error_body(code, message), status))
    else:
        # 4000 + HTTP status: the close code a page can read when the handshake itself cannot fail.
        await websocket.close(code=4000 + status, reason=f"{code}: {message}"[:120])


async def _authorize_socket(websocket: WebSocket, session_id: str) -> tuple[ViewerClaims, Channel] | None:
    """Check the viewer token and find the session's live channel; refuse the socket if either fails."""
    runtime = viewer_runtime(websocket.app.state)
    token = websocket.query_params.get("token") or _bearer(websocket.headers.get("authorization"))
    try:
        claims = verify_viewer(runtime.secret, token, session_id)
        channel = await runtime.sessions.channel(session_id)
    except ApiError as exc:
        log.info("viewer.socket_refused", session_id=session_id, status=exc.status, code=exc.code)
        await _deny_socket(websocket, exc.status, exc.code, exc.message)
        return None
    return claims, channel


_VIEWERS_NAMED: dict[SocketKind, str] = {"signal": "viewers", "vnc": "VNC viewers"}


async def serve_viewer_socket(
    websocket: WebSocket,
    session_id: str,
    kind: SocketKind,
    serve: Callable[[WebSocket, str, Channel], Awaitable[None]],
) -> None:
    """Admit a viewer's ``kind`` WebSocket, then ``serve`` it on the session's channel.

    The socket is refused before it is accepted when the viewer token or the session's channel is not
    there (the :class:`ApiError`'s status) and when the session's ``kind`` places are all taken (429);
    ``serve`` holds one of those places while it runs.
    """
    authorized = await _authorize_socket(websocket, session_id)
    if authorized is None:
        return
    _claims, channel = authorized
    try:
        with viewer_runtime(websocket.app.state).viewers.socket(kind, session_id):
            await serve(websocket, session_id, channel)
    except TooManyViewers as exc:
        await _deny_socket(
            websocket,
            429,
            "too_many_viewers",
            f"this session already has {exc.limit} {_VIEWERS_NAMED[kind]} connected; close one and retry",
        )
