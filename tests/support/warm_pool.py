"""The warm pool as the store sees it: which browser sandboxes are in a state, and waiting for warm ones."""

from __future__ import annotations

import asyncio

from sqlalchemy import select

from browservm.store.database import Database
from browservm.store.models import Sandbox


async def _browser_sandboxes(db: Database) -> dict[str, str]:
    """Every browser sandbox's state, by id, oldest first."""
    async with db.session() as s:
        rows = await s.execute(
            select(Sandbox.id, Sandbox.state).where(Sandbox.role == "browser").order_by(Sandbox.created_at)
        )
        return {sandbox_id: state for sandbox_id, state in rows.all()}


async def sandboxes_in(database_url: str, state: str) -> list[str]:
    db = Database(database_url)
    try:
        return [sandbox_id for sandbox_id, now in (await _browser_sandboxes(db)).items() if now == state]
    finally:
        await db.close()


async def wait_warm(database_url: str, count: int = 1, timeout_s: float = 60) -> list[str]:
    """The ids of the warm (``ready``) sandboxes, once there are ``count`` of them."""
    db = Database(database_url)
    seen: dict[str, str] = {}
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                seen = await _browser_sandboxes(db)
                ready = [sandbox_id for sandbox_id, state in seen.items() if state == "ready"]
                if len(ready) == count:
                    return ready
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise AssertionError(
            f"not {count} warm sandbox(es) within {timeout_s:.0f} s; the browser sandboxes were: {seen}"
        ) from None
    finally:
        await db.close()
