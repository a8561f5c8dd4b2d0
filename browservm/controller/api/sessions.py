"""The sessions API: create, read, list, cancel, and follow a session's events."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Header, Query
from sse_starlette import EventSourceResponse, ServerSentEvent

from browservm.controller.auth import issue_viewer_token
from browservm.controller.deps import PrincipalDep, ServicesDep
from browservm.controller.errors import ApiError, not_found
from browservm.controller.quotas import EventStream
from browservm.controller.services import Services
from browservm.store import events as event_store
from browservm.store import sessions as session_store
from browservm.store.models import Session
from browservm.store.states import SessionStatus
from browservm_client.models import SessionCreate, SessionOut, SessionPage, ViewerLink

router = APIRouter(prefix="/v1/sessions", tags=["sessions"])


def viewer_link(services: Services, session: Session) -> ViewerLink:
    """A fresh viewer token for the session: it lives ``viewer_token_ttl_s``, and never past the session."""
    expires = min(session.expires_at.timestamp(), time.time() + services.settings.viewer_token_ttl_s)
    token = issue_viewer_token(services.secret, session.id, expires)
    return ViewerLink(
        viewer_url=f"{services.settings.effective_public_url}/view/{session.id}?token={token}",
        token=token,
        expires_at=datetime.fromtimestamp(int(expires), UTC),
    )


def session_out(services: Services, session: Session) -> SessionOut:
    status = SessionStatus(session.status)
    return SessionOut(
        id=session.id,
        user_id=session.user_id,
        provider=session.provider,
        status=status,
        reason=session.reason,
        viewer_url=viewer_link(services, session).viewer_url,
        login_url=session.login_url,
        account=session.account or {},
        sandbox_id=session.sandbox_id,
        queue_position=services.capacity.position(session.id) if status is SessionStatus.PENDING else None,
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


@router.post("/{session_id}/viewer-token", response_model=ViewerLink)
async def new_viewer_token(session_id: str, principal: PrincipalDep, services: ServicesDep) -> ViewerLink:
    """A fresh viewer link for a live session, e.g. when the user's link expired or was lost. Earlier
    links keep working until their own expiry. A session that ended answers 409 ``session_ended``."""
    session = await _owned(services, session_id, principal.tenant)
    if SessionStatus(session.status).terminal:
        raise ApiError(
            409, "session_ended", f"session {session_id} already ended ({session.status}); start a new one"
        )
    return viewer_link(services, session)


EVENT_BATCH = 500
MAX_EVENT_ID = 2**63 - 1
"""Event ids are 64-bit integers in both databases."""


def resume_after(last_event_id: str | None) -> int:
    """The event id a stream resumes after: ``Last-Event-ID`` as the stream sent it, or 0."""
    if last_event_id is None or not last_event_id.strip():
        return 0
    value = last_event_id.strip()
    # isdigit() alone would pass "²" (and int() then fails); ids are ASCII digits of an int64.
    if not (value.isascii() and value.isdigit()) or int(value) > MAX_EVENT_ID:
        raise ApiError(
            400,
            "invalid_last_event_id",
            "Last-Event-ID must be the id of an event this stream sent (a decimal integer); "
            "omit it to start from the first event",
        )
    return int(value)


@router.get(
    "/{session_id}/events",
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
    },
    response_class=EventSourceResponse,
)
async def session_events(
    session_id: str,
    principal: PrincipalDep,
    services: ServicesDep,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> EventSourceResponse:
    """Every change of the session as Server-Sent Events, from the start (or after ``Last-Event-ID``).

    Each event has the id of the stored event, ``event:`` its kind (``session.status``, ``sandbox.state``,
    ``guest.service``, ``credentials.stored``…) and JSON data. The stream ends after the session ends.
    An API key holds at most ``BROWSERVM_MAX_EVENT_STREAMS_PER_KEY`` streams at once (429 past it).
    """
    after = resume_after(last_event_id)
    session = await _owned(services, session_id, principal.tenant)
    slot = services.quotas.streams.take(principal.key_id)
    terminal = SessionStatus(session.status).terminal
    return EventStream(_event_stream(services, session_id, after, terminal), slot)


async def _event_stream(
    services: Services, session_id: str, after: int, terminal: bool
) -> AsyncIterator[ServerSentEvent]:
    """Read the table when the notifier says the session changed; an idle stream does no work at all."""
    with services.notifier.subscribe(session_id) as changes:
        while True:
            changes.clear()
            async with services.db.session() as db:
                batch = await event_store.for_session(db, session_id, after=after, limit=EVENT_BATCH)
            for event in batch:
                after = event.id
                payload = {"kind": event.kind, "at": event.created_at.isoformat(), **event.data}
                yield ServerSentEvent(data=json.dumps(payload), event=event.kind, id=str(event.id))
                if event.kind == "session.status":
                    terminal = SessionStatus(event.data.get("status", "pending")).terminal
            if len(batch) == EVENT_BATCH:
                continue  # more are waiting
            if terminal:
                # Ended: its last events are out (or a resumed stream already had them).
                return
            await changes.changed_after(after)
