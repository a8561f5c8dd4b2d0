"""``GET /v1/events``: every event of the caller's tenant as it is written (the dashboard follows it).

The per-session stream (``GET /v1/sessions/{id}/events``) replays one session from its start and ends
with it; this one follows the whole tenant (sessions, their sandboxes, CLI VMs) from now, or from
``Last-Event-ID``, and stays open.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header
from sse_starlette import EventSourceResponse, ServerSentEvent

from browservm.controller.api.sessions import resume_after
from browservm.controller.deps import PrincipalDep, ServicesDep
from browservm.controller.notifier import ANY
from browservm.controller.quotas import EventStream
from browservm.controller.services import Services
from browservm.store import events as event_store

router = APIRouter(prefix="/v1", tags=["events"])


@router.get(
    "/events",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"}},
)
async def tenant_events(
    principal: PrincipalDep,
    services: ServicesDep,
    last_event_id: Annotated[str | None, Header(max_length=40)] = None,
) -> EventSourceResponse:
    """Events of this API key's tenant as Server-Sent Events, from now (or after ``Last-Event-ID``).

    Each has the stored event's id, ``event:`` its kind (``session.status``, ``session.queued``,
    ``sandbox.state``, ``credentials.stored``…) and JSON data with ``session_id`` and ``sandbox_id``.
    An API key holds at most ``BROWSERVM_MAX_EVENT_STREAMS_PER_KEY`` streams at once (429 past it).
    """
    after = resume_after(last_event_id)
    if not after:
        async with services.db.session() as db:
            after = await event_store.last_id(db)
    slot = services.quotas.streams.take(principal.key_id)
    return EventStream(_stream(services, principal.tenant, after), slot)


async def _stream(services: Services, tenant: str, after: int) -> AsyncIterator[ServerSentEvent]:
    """Read the table when the notifier says something changed; an idle stream does no work."""
    with services.notifier.subscribe(ANY) as changes:
        while True:
            changes.clear()
            async with services.db.session() as db:
                batch = await event_store.for_tenant(db, tenant, after=after)
            for event in batch:
                after = event.id
                payload = {
                    "kind": event.kind,
                    "at": event.created_at.isoformat(),
                    "session_id": event.session_id,
                    "sandbox_id": event.sandbox_id,
                    **event.data,
                }
                yield ServerSentEvent(data=json.dumps(payload), event=event.kind, id=str(event.id))
            if not batch:
                await changes.changed_after(after)
