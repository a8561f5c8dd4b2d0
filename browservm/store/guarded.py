"""The one way a state column changes: a guarded UPDATE that applies only from a legal source state."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

import structlog
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from browservm.store.models import Sandbox, Session
from browservm.store.states import IllegalTransition

log = structlog.get_logger(__name__)

Row = TypeVar("Row", Session, Sandbox)


async def guarded_update(
    db: AsyncSession,
    model: type[Row],
    row_id: str,
    state: InstrumentedAttribute[str],
    sources: Iterable[str],
    values: dict[str, Any],
) -> Row:
    """Apply ``values`` to the row only if its ``state`` is one of ``sources``; return the row as it is now.

    One statement, so racing writers (the flow, a cancel, the reconciler, another replica) cannot both
    win. A refused change raises :class:`IllegalTransition` and is logged: a bug or a lost race, never
    applied silently.
    """
    kind = model.__tablename__.removesuffix("s")
    result = await db.execute(
        update(model)
        .where(model.id == row_id, state.in_(list(sources)))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    row = await db.get(model, row_id, populate_existing=True)
    if row is None:
        raise LookupError(f"{kind} {row_id} does not exist")
    if result.rowcount != 1:  # type: ignore[attr-defined]
        current = getattr(row, state.key)
        target = values[state.key]
        log.warning(f"{kind}.illegal_transition", **{f"{kind}_id": row_id}, current=current, target=target)
        raise IllegalTransition(kind, row_id, current, target)
    return row
