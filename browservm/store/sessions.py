"""Session records and their state machine, applied atomically with the event that records it."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy import and_, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from browservm.store import events
from browservm.store.guarded import guarded_update
from browservm.store.models import Session, utcnow
from browservm.store.states import (
    TERMINAL_SESSION,
    SessionStatus,
    session_sources,
)

log = structlog.get_logger(__name__)


async def create(
    db: AsyncSession,
    *,
    tenant: str,
    user_id: str,
    provider: str,
    expires_at: datetime,
    options: dict[str, Any] | None = None,
) -> Session:
    session = Session(
        tenant=tenant,
        user_id=user_id,
        provider=provider,
        status=SessionStatus.PENDING,
        expires_at=expires_at,
        options=options or {},
    )
    db.add(session)
    await db.flush()
    await events.append(
        db,
        kind="session.status",
        session_id=session.id,
        tenant=tenant,
        data={"status": SessionStatus.PENDING.value, "reason": ""},
    )
    return session


async def get(db: AsyncSession, session_id: str, *, tenant: str | None = None) -> Session | None:
    query = select(Session).where(Session.id == session_id)
    if tenant is not None:
        query = query.where(Session.tenant == tenant)
    return (await db.execute(query)).scalar_one_or_none()


def encode_cursor(session: Session) -> str:
    raw = f"{session.created_at.isoformat()}|{session.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


class BadCursor(ValueError):
    pass


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, ident = raw.split("|", 1)
        at = datetime.fromisoformat(created)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadCursor("cursor is not one this API issued; start again without it") from exc
    if "\x00" in ident:
        raise BadCursor("cursor is not one this API issued (its id holds a NUL); start again without it")
    if at.tzinfo is None:
        # Ours carry their offset; a naive time cannot be compared with the stored ones.
        raise BadCursor("cursor is not one this API issued (its time has no offset); start again without it")
    try:
        return at.astimezone(UTC), ident
    except OverflowError:  # 0001-01-01T00:00+01:00 is before year 1 in UTC
        raise BadCursor("cursor is not one this API issued (its time is out of range)") from None


async def page(
    db: AsyncSession,
    *,
    tenant: str,
    user_id: str | None = None,
    status: SessionStatus | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[Sequence[Session], str | None]:
    """Newest first. Returns the page and the cursor of the next one (``None`` at the end)."""
    query = select(Session).where(Session.tenant == tenant)
    if user_id is not None:
        query = query.where(Session.user_id == user_id)
    if status is not None:
        query = query.where(Session.status == status.value)
    if cursor:
        created, ident = _decode_cursor(cursor)
        query = query.where(
            or_(Session.created_at < created, and_(Session.created_at == created, Session.id < ident))
        )
    query = query.order_by(Session.created_at.desc(), Session.id.desc()).limit(limit + 1)
    rows = list((await db.execute(query)).scalars())
    more = len(rows) > limit
    rows = rows[:limit]
    return rows, (encode_cursor(rows[-1]) if more and rows else None)


async def transition(
    db: AsyncSession,
    session_id: str,
    target: SessionStatus,
    *,
    reason: str = "",
    **fields: Any,
) -> Session:
    """Move a session to ``target`` if the state machine allows it from its current state.

    Refused transitions raise :class:`IllegalTransition` and are logged: they are bugs or lost races,
    never silently applied.
    """
    now = utcnow()
    values: dict[str, Any] = {"status": target.value, "updated_at": now, **fields}
    if reason or target.terminal:
        values["reason"] = reason
    if target.terminal:
        values["ended_at"] = now
    sources = [s.value for s in session_sources(target)]
    session = await guarded_update(db, Session, session_id, Session.status, sources, values)
    await events.append(
        db,
        kind="session.status",
        session_id=session_id,
        tenant=session.tenant,
        sandbox_id=session.sandbox_id,
        data={"status": target.value, "reason": reason},
    )
    log.info("session.status", session_id=session_id, status=target.value, reason=reason)
    return session


async def update_fields(db: AsyncSession, session_id: str, **fields: Any) -> None:
    await db.execute(
        update(Session)
        .where(Session.id == session_id)
        .values(updated_at=utcnow(), **fields)
        .execution_options(synchronize_session=False)
    )


async def unfinished(db: AsyncSession) -> Sequence[Session]:
    query = select(Session).where(Session.status.not_in([s.value for s in TERMINAL_SESSION]))
    return list((await db.execute(query.order_by(Session.created_at))).scalars())


async def count_by_status(db: AsyncSession) -> dict[str, int]:
    from sqlalchemy import func

    rows = await db.execute(select(Session.status, func.count()).group_by(Session.status))
    return {status: count for status, count in rows.all()}
