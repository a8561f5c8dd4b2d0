"""Users' egress assignments: which exit of which pool a user's sessions leave through (sticky until
rotated), and what the last check through it saw."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from browservm.store.models import EgressAssignment, utcnow


async def get(db: AsyncSession, *, tenant: str, user_id: str) -> EgressAssignment | None:
    query = select(EgressAssignment).where(
        EgressAssignment.tenant == tenant, EgressAssignment.user_id == user_id
    )
    return (await db.execute(query.execution_options(populate_existing=True))).scalar_one_or_none()


async def add(
    db: AsyncSession, *, tenant: str, user_id: str, pool: str, port: int, sticky: str
) -> EgressAssignment:
    """A new assignment. The (tenant, user) unique constraint makes a race between two writers fail
    (IntegrityError): the caller reads the winner's."""
    assignment = EgressAssignment(tenant=tenant, user_id=user_id, pool=pool, port=port, sticky=sticky)
    db.add(assignment)
    await db.flush()
    return assignment


async def move(
    db: AsyncSession, assignment: EgressAssignment, *, pool: str, port: int, sticky: str
) -> EgressAssignment:
    """Rotate: another exit; what was known about the old one goes with it."""
    assignment.pool, assignment.port, assignment.sticky = pool, port, sticky
    assignment.generation += 1
    assignment.status, assignment.exit_address, assignment.detail = "unchecked", None, ""
    assignment.checked_at = None
    assignment.rotated_at = utcnow()
    db.add(assignment)
    await db.flush()
    return assignment


async def record_check(
    db: AsyncSession,
    assignment_id: str,
    *,
    ok: bool,
    exit_address: str | None,
    detail: str,
    at: datetime,
    generation: int,
) -> EgressAssignment | None:
    """Store a check's outcome, unless the assignment was rotated while it ran (its result is for an exit
    the user no longer has)."""
    assignment = await db.get(EgressAssignment, assignment_id, populate_existing=True)
    if assignment is None or assignment.generation != generation:
        return None
    assignment.status = "ok" if ok else "bad"
    if ok:
        assignment.exit_address = exit_address
    assignment.detail = detail
    assignment.checked_at = at
    await db.flush()
    return assignment


async def all_assignments(db: AsyncSession) -> Sequence[EgressAssignment]:
    return list((await db.execute(select(EgressAssignment).order_by(EgressAssignment.id))).scalars())


async def ports_in_use(db: AsyncSession, pool: str) -> dict[int, int]:
    """How many users each port of a pool serves."""
    rows = await db.execute(
        select(EgressAssignment.port, func.count())
        .where(EgressAssignment.pool == pool)
        .group_by(EgressAssignment.port)
    )
    return {int(port): int(count) for port, count in rows.all()}


async def users_per_pool(db: AsyncSession) -> dict[str, int]:
    rows = await db.execute(select(EgressAssignment.pool, func.count()).group_by(EgressAssignment.pool))
    return {str(pool): int(count) for pool, count in rows.all()}
