"""Sandbox records: what the controller believes runs, reconciled against what really runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import structlog
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from browservm.store import events
from browservm.store.guarded import guarded_update
from browservm.store.models import Sandbox, new_id, utcnow
from browservm.store.states import LIVE_SANDBOX, SandboxState, sandbox_sources

log = structlog.get_logger(__name__)


async def create(
    db: AsyncSession,
    *,
    backend: str,
    role: str,
    tenant: str | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    sandbox_id: str | None = None,
) -> Sandbox:
    sandbox = Sandbox(
        id=sandbox_id or new_id("sbx"),
        backend=backend,
        role=role,
        tenant=tenant,
        user_id=user_id,
        session_id=session_id,
        state=SandboxState.CREATING,
    )
    db.add(sandbox)
    await db.flush()
    await events.append(
        db,
        kind="sandbox.state",
        sandbox_id=sandbox.id,
        session_id=session_id,
        tenant=tenant,
        data={"state": SandboxState.CREATING.value},
    )
    return sandbox


async def get(db: AsyncSession, sandbox_id: str) -> Sandbox | None:
    return await db.get(Sandbox, sandbox_id, populate_existing=True)


async def transition(
    db: AsyncSession, sandbox_id: str, target: SandboxState, *, reason: str = "", **fields: Any
) -> Sandbox:
    sources = [s.value for s in sandbox_sources(target)]
    values = {"state": target.value, "reason": reason, "updated_at": utcnow(), **fields}
    sandbox = await guarded_update(db, Sandbox, sandbox_id, Sandbox.state, sources, values)
    await events.append(
        db,
        kind="sandbox.state",
        sandbox_id=sandbox_id,
        session_id=sandbox.session_id,
        tenant=sandbox.tenant,
        data={"state": target.value, "reason": reason},
    )
    return sandbox


async def set_runtime(db: AsyncSession, sandbox_id: str, runtime: dict[str, Any]) -> None:
    await db.execute(
        update(Sandbox).where(Sandbox.id == sandbox_id).values(runtime=runtime, updated_at=utcnow())
    )


async def live(db: AsyncSession) -> Sequence[Sandbox]:
    """Sandboxes that hold (or may hold) resources on this host."""
    states = [s.value for s in LIVE_SANDBOX | {SandboxState.HIBERNATED, SandboxState.FAILED}]
    return list((await db.execute(select(Sandbox).where(Sandbox.state.in_(states)))).scalars())


async def count_live(db: AsyncSession) -> int:
    query = (
        select(func.count()).select_from(Sandbox).where(Sandbox.state.in_([s.value for s in LIVE_SANDBOX]))
    )
    return int((await db.execute(query)).scalar_one())


async def count_by_state(db: AsyncSession) -> dict[str, int]:
    rows = await db.execute(select(Sandbox.state, func.count()).group_by(Sandbox.state))
    return {state: count for state, count in rows.all()}
