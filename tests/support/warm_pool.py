"""The warm pool as the store sees it: which browser sandboxes are in a state, and waiting for warm ones."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from browservm.store.database import Database
from browservm.store.models import Sandbox


async def sandboxes_in(database_url: str, state: str) -> list[str]:
    db = Database(database_url)
    try:
        async with db.session() as s:
            rows = await s.execute(
                select(Sandbox.id).where(Sandbox.state == state, Sandbox.role == "browser")
            )
            return list(rows.scalars())
    finally:
        await db.close()


async def wait_warm(database_url: str, count: int = 1, timeout_s: float = 60) -> list[str]:
    """The ids of the warm (``ready``) sandboxes, once there are ``count`` of them."""
    async with asyncio.timeout(timeout_s):
        while len(ready := await sandboxes_in(database_url, "ready")) != count:
            await asyncio.sleep(0.1)
    return ready
