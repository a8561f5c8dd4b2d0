"""The sessions API: create, read, list, cancel, and follow a session's events."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from browservm.controller.auth import issue_viewer_token
from browservm.controller.deps import PrincipalDep, ServicesDep
from browservm.controller.errors import ApiError, not_found
from browservm.controller.services import Services
from browservm.store import events as event_store
from browservm.store import sessions as session_store
from browservm.store.models import Session
from browservm.store.states import SessionStatus

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])

Provider = Literal["claude_code", "codex", "gemini_cli", "demo"]
USER_ID = Field(
    min_length=1,
    max_length=200,
    pattern=r"^[A-Za-z0-9._:@+-]+$",
    description="The operator's id for the end user (letters, digits and ._:@+-)",
)


class SessionCreate(BaseModel):
    user_id: str = USER_ID
    provider: Provider
    options: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=2048)]] = Field(
        default_factory=dict, max_length=16, description="Provider options, e.g. a demo issuer"
    )


class SessionOut(BaseModel):
    id: str
    user_id: str
    provider: str
    status: SessionStatus
    reason: str
    viewer_url: str
    login_url: str | None
    account: dict[str, Any]
    sandbox_id: str | None = Field(
        description="The browser sandbox serving the session (in logs and events), once it has one"
    )
    created_at: datetime
    updated_at: datetime
    expires_at: datetime
    ended_at: datetime | None


class SessionPage(BaseModel):
    data: list[SessionOut]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page; null at the end")


def session_out(services: Services, session: Session) -> SessionOut:
    expires = min(session.expires_at.timestamp(), time.time() + services.settings.viewer_token_ttl_s)
    token = issue_viewer_token(services.secret, session.id, expires)
    viewer_url = f"{services.settings.effective_public_url}/view/{session.id}?token={token}"
    return SessionOut(
        id=session.id,
        user_id=session.user_id,
        provider=session.provider,
        status=SessionStatus(session.status),
        reason=session.reason,
        viewer_url=viewer_url,
        login_url=session.login_url,
        account=session.account or {},
        sandbox_id=session.sandbox_id,
        created_at=session.created_at,
        updated_at=session.updated_at,
        expires_at=session.expires_at,
        ended_at=session.ended_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=SessionOut,
)
async def create_session(body: SessionCreate, principal: PrincipalDep, services: ServicesDep) -> SessionOut:
    """Start a session. Answers at once (``pending``); the sandbox and login start in the background."""
    session = await services.sessions.create(
        tenant=principal.tenant, user_id=body.user_id, provider=body.provider, options=dict(body.options)
    )
    return session_out(services, session)


@router.get("", response_model=SessionPage)
async def list_sessions(
    principal: PrincipalDep,
    services: ServicesDep,
    user_id: Annotated[str | None, Query(max_length=200)] = None,
    status: SessionStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> SessionPage:
    """Newest first, paginated by an opaque cursor."""
    async with services.db.session() as db:
        try:
            rows, next_cursor = await session_store.page(
                db, tenant=principal.tenant, user_id=user_id, status=status, limit=limit, cursor=cursor
            )
        except session_store.BadCursor as exc:
            raise ApiError(400, "invalid_cursor", str(exc)) from None
    return SessionPage(data=[session_out(services, s) for s in rows], next_cursor=next_cursor)


async def _owned(services: Services, session_id: str, tenant: str) -> Session:
    async with services.db.session() as db:
        session = await session_store.get(db, session_id, tenant=tenant)
    if session is None:
        raise not_found("session", session_id)
    return session


@router.get("/{session_id}", response_model=SessionOut)
async def get_session(session_id: str, principal: PrincipalDep, services: ServicesDep) -> SessionOut:
    return session_out(services, await _owned(services, session_id, principal.tenant))


@router.post(
    "/{session_id}/cancel",
    response_model=SessionOut,
)
async def cancel_session(session_id: str, principal: PrincipalDep, services: ServicesDep) -> SessionOut:
    """End a session now; its browser sandbox is destroyed."""
    session = await services.sessions.cancel(session_id, principal.tenant)
    return session_out(services, session)


@router.get(
    "/{session_id}/events",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
    },
    response_class=EventSourceResponse,
)
async def session_events(
    session_id: str,
    request: Request,
    principal: PrincipalDep,
    services: ServicesDep,
    last_event_id: Annotated[str | None, Header(max_length=20)] = None,
) -> EventSourceResponse:
    """Every change of the session as Server-Sent Events, from the start (or after ``Last-Event-ID``).

    Each event has the id of the stored event, ``event:`` its kind (``session.status``, ``sandbox.state``,
    ``guest.service``, ``credentials.stored``…) and JSON data. The stream ends after the session ends.
    """
    await _owned(services, session_id, principal.tenant)
    after = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    return EventSourceResponse(_event_stream(services, request, session_id, after), ping=15)


async def _event_stream(
    services: Services, request: Request, session_id: str, after: int
) -> AsyncIterator[ServerSentEvent]:
    while True:
        async with services.db.session() as db:
            batch = await event_store.for_session(db, session_id, after=after)
            session = await session_store.get(db, session_id)
        ended = False
        for event in batch:
            after = event.id
            payload = {"kind": event.kind, "at": event.created_at.isoformat(), **event.data}
            yield ServerSentEvent(data=json.dumps(payload), event=event.kind, id=str(event.id))
            if event.kind == "session.status" and SessionStatus(event.data.get("status", "pending")).terminal:
                ended = True
        if ended or (session is not None and SessionStatus(session.status).terminal and not batch):
            return
        if await request.is_disconnected():
            return
        await services.notifier.wait(session_id, timeout_s=5.0)
        await asyncio.sleep(0)
