"""Which sandbox is each user's CLI VM: one row per (tenant, user), pointing at the sandbox it runs in."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from browservm.store.models import CliVm, Sandbox


async def of_tenant(db: AsyncSession, tenant: str) -> Sequence[CliVm]:
    return list((await db.execute(select(CliVm).where(CliVm.tenant == tenant))).scalars())


async def of_user(db: AsyncSession, *, tenant: str, user_id: str) -> CliVm | None:
    query = select(CliVm).where(CliVm.tenant == tenant, CliVm.user_id == user_id)
    return (await db.execute(query)).scalar_one_or_none()


async def sandbox_of(db: AsyncSession, row: CliVm) -> Sandbox | None:
    """The row's sandbox as the database has it now (not a cached copy)."""
    return await db.get(Sandbox, row.sandbox_id, populate_existing=True)


async def put(db: AsyncSession, *, tenant: str, user_id: str, sandbox_id: str) -> CliVm:
    """Make ``sandbox_id`` the user's CLI VM, in place of any earlier one."""
    existing = await of_user(db, tenant=tenant, user_id=user_id)
    if existing is not None:
        await db.delete(existing)
        await db.flush()
    row = CliVm(tenant=tenant, user_id=user_id, sandbox_id=sandbox_id)
    db.add(row)
    await db.flush()
    return row
