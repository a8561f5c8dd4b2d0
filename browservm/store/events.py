"""The append-only event log. Written in the same transaction as the change it records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
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


async def latest(db: AsyncSession, session_id: str, kind: str) -> Event | None:
    """The session's last event of ``kind``."""
    query = (
        select(Event)
        .where(Event.session_id == session_id, Event.kind == kind)
        .order_by(Event.id.desc())
        .limit(1)
    )
    return (await db.execute(query)).scalar_one_or_none()


async def for_tenant(db: AsyncSession, tenant: str, *, after: int = 0, limit: int = 500) -> Sequence[Event]:
    """A tenant's events after ``after``, oldest first (events of no tenant, e.g. warm sandboxes, never)."""
    query = select(Event).where(Event.tenant == tenant, Event.id > after).order_by(Event.id).limit(limit)
    return list((await db.execute(query)).scalars())


async def last_id(db: AsyncSession) -> int:
    """The id of the newest event of all, 0 when there is none: where a stream "from now" starts."""
    return int((await db.execute(select(func.max(Event.id)))).scalar_one() or 0)
