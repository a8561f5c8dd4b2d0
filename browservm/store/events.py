"""The append-only event log. Written in the same transaction as the change it records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from browservm.store.models import Event


async def append(
    db: AsyncSession,
    *,
    kind: str,
    session_id: str | None = None,
    sandbox_id: str | None = None,
    tenant: str | None = None,
    data: dict[str, Any] | None = None,
) -> Event:
    event = Event(kind=kind, session_id=session_id, sandbox_id=sandbox_id, tenant=tenant, data=data or {})
    db.add(event)
    await db.flush()
    return event


async def for_session(
    db: AsyncSession, session_id: str, *, after: int = 0, limit: int = 500
) -> Sequence[Event]:
    query = (
        select(Event).where(Event.session_id == session_id, Event.id > after).order_by(Event.id).limit(limit)
    )
    return list((await db.execute(query)).scalars())
