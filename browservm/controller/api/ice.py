"""``GET /v1/sessions/{id}/ice-servers``: the RTCConfiguration a viewer needs, TURN credentials included.

The credentials are minted per request (TURN REST scheme, :mod:`browservm.controller.turn`) and never
outlive the viewer token, which itself expires with the session.
"""

from __future__ import annotations

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from browservm import protocol
from browservm.controller import turn
from browservm.controller.deps import ServicesDep, ViewerDep

router = APIRouter(prefix="/v1/sessions", tags=["viewer"])


class IceServersOut(BaseModel):
    ice_servers: list[protocol.IceServer] = Field(
        description="Pass as RTCConfiguration.iceServers; empty when neither STUN nor TURN is configured"
    )
    expires_at: int | None = Field(description="Unix time the TURN credential stops working, if any")


@router.get("/{session_id}/ice-servers", response_model=IceServersOut, response_model_exclude_none=True)
async def get_ice_servers(
    session_id: str, claims: ViewerDep, services: ServicesDep, response: Response
) -> IceServersOut:
    servers = turn.ice_servers(services.settings, session_id, session_expires_at=claims.expires_at)
    # A credential is personal and short-lived: no shared cache may keep it.
    response.headers["Cache-Control"] = "no-store"
    expiry = None
    for server in servers:
        if server.username:
            expiry = int(server.username.split(":", 1)[0])
    return IceServersOut(ice_servers=servers, expires_at=expiry)
