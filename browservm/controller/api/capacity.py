"""``GET /v1/capacity``: how much of this host is in use and who waits for a slot (the dashboard's bar)."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from browservm.controller.deps import PrincipalDep, ServicesDep
from browservm.store.models import Session
from browservm_client.models import CapacityOut, QueuedSession

router = APIRouter(prefix="/v1", tags=["operations"])


@router.get("/capacity", response_model=CapacityOut)
async def get_capacity(principal: PrincipalDep, services: ServicesDep) -> CapacityOut:
    capacity = services.capacity
    waiting = capacity.queue()
    own: set[str] = set()
    if waiting:
        async with services.db.session() as db:
            query = select(Session.id).where(Session.id.in_(waiting), Session.tenant == principal.tenant)
            own = set((await db.execute(query)).scalars())
    return CapacityOut(
        limit=capacity.limit,
        in_use=capacity.in_use,
        warm_idle=capacity.spare,
        queued=capacity.queued,
        max_queued=capacity.max_queued,
        queue=[
            QueuedSession(session_id=sid, position=place)
            for sid in waiting
            if sid in own and (place := capacity.position(sid)) is not None
        ],
    )
