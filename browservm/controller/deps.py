"""FastAPI dependencies: the services, the caller's identity, viewer claims."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Query, Request

from browservm.controller.auth import Principal, ViewerClaims, verify_viewer_token
from browservm.controller.errors import ApiError
from browservm.controller.services import Services
from browservm.store import api_keys


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
        await api_keys.touch(db, key.id)
    return Principal(key_id=key.id, tenant=key.tenant)


PrincipalDep = Annotated[Principal, Depends(require_api_key)]


def viewer_claims(
    session_id: str,
    services: ServicesDep,
    token: Annotated[str | None, Query(description="viewer token (or Authorization: Bearer)")] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> ViewerClaims:
    value = token or _bearer(authorization)
    if not value:
        raise ApiError(
            401,
            "unauthorized",
            "a viewer token is required (?token=… or Authorization: Bearer)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return verify_viewer_token(services.secret, value, session_id)


ViewerDep = Annotated[ViewerClaims, Depends(viewer_claims)]
