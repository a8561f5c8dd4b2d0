"""``GET /v1/sessions/{id}/viewer-events``: the session's state as its viewer page follows it.

Authenticated by the session's viewer token (what the end user's page holds), so it tells only what the
user may see: the status, the place in line while waiting for a free browser, and, at the end, why, in
words for the user (:mod:`browservm.controller.viewer_status`). The operator follows the full record
with ``GET /v1/sessions/{id}/events`` and an API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from sse_starlette import EventSourceResponse, ServerSentEvent

from browservm.controller.deps import ServicesDep, ViewerDep
from browservm.controller.errors import ApiError, not_found
from browservm.controller.quotas import EventStream
from browservm.controller.services import Services
from browservm.controller.viewer_status import ViewerStatus, viewer_status
from browservm.store import sessions as session_store

router = APIRouter(prefix="/v1/sessions", tags=["viewer"])


def _data_schema() -> dict[str, Any]:
    """ViewerStatus's JSON schema for the document, its enum referring to the shared component."""
    schema = ViewerStatus.model_json_schema(ref_template="#/components/schemas/{model}")
    schema.pop("$defs", None)  # SessionStatus is already a component (SessionOut uses it)
    return schema


ENDING_GRACE_S = 60.0
"""A stream opened with a valid token follows the session this long past the token's expiry: the token
expires with the session, and the page must still hear how it ended (``expired``, written just after)."""


@router.get(
    "/{session_id}/viewer-events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "description": (
                "Server-Sent Events, each `event: session` with a ViewerStatus as JSON data: the current "
                "state at once, then every change; the stream ends after the session ends"
            ),
            "content": {"text/event-stream": {"schema": _data_schema()}},
        },
    },
)
async def viewer_events(session_id: str, claims: ViewerDep, services: ServicesDep) -> EventSourceResponse:
    """The session's state for its viewer (bearer viewer token). Ends when the session ends, or a minute
    after the token expired (reconnecting then answers 401 ``token_expired``)."""
    first = await _current(services, session_id)
    # A viewer holds no API key: its streams count against the session's own share, and the total.
    slot = services.quotas.streams.take(f"viewer:{session_id}")
    return EventStream(_stream(services, first, claims.expires_at), slot)


async def _current(services: Services, session_id: str) -> ViewerStatus:
    async with services.db.session() as db:
        session = await session_store.get(db, session_id)
    if session is None:
        raise not_found("session", session_id)
    return viewer_status(session, services.capacity.position(session_id))


async def _stream(
    services: Services, first: ViewerStatus, token_expires_at: int
) -> AsyncIterator[ServerSentEvent]:
    current: ViewerStatus | None = first
    sent: ViewerStatus | None = None
    with services.notifier.subscribe(first.session_id) as changes:
        while True:
            if current is not None and current != sent:
                yield ServerSentEvent(data=current.model_dump_json(), event="session")
                sent = current
            if sent is not None and sent.status.terminal:
                return
            remaining = token_expires_at + ENDING_GRACE_S - time.time()
            if remaining <= 0:
                return
            # Woken by any write for the session (a status, a new place in line), or the token's end.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changes.changed_after(-1), remaining)
            changes.clear()
            try:
                current = await _current(services, first.session_id)
            except ApiError:  # the session row is gone (it never should be): end the stream
                return
