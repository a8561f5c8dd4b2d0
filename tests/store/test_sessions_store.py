from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from browservm.store import events, sessions
from browservm.store.database import Database
from browservm.store.states import IllegalTransition, SessionStatus


async def _new(db: Database, user: str = "u1", tenant: str = "t1") -> str:
    async with db.session() as s:
        created = await sessions.create(
            s,
            tenant=tenant,
            user_id=user,
            provider="demo",
            expires_at=datetime.now(UTC) + timedelta(minutes=5),
        )
        return created.id


async def test_migrations_are_idempotent(database: Database) -> None:
    await database.migrate()
    await database.ping()


async def test_legal_path_records_every_step_as_an_event(database: Database) -> None:
    session_id = await _new(database)
    for status in (
        SessionStatus.STARTING,
        SessionStatus.AWAITING_USER,
        SessionStatus.CAPTURING,
        SessionStatus.COMPLETED,
    ):
        async with database.session() as s:
            await sessions.transition(s, session_id, status)
    async with database.session() as s:
        found = await sessions.get(s, session_id)
        log = await events.for_session(s, session_id)
    assert found is not None and found.status == "completed" and found.ended_at is not None
    assert [e.data["status"] for e in log] == [
        "pending",
        "starting",
        "awaiting_user",
        "capturing",
        "completed",
    ]
    assert [e.id for e in log] == sorted(e.id for e in log)


async def test_illegal_transition_is_refused_and_changes_nothing(database: Database) -> None:
    session_id = await _new(database)
    with pytest.raises(IllegalTransition) as refused:
        async with database.session() as s:
            await sessions.transition(s, session_id, SessionStatus.COMPLETED)
    assert refused.value.current == "pending"
    async with database.session() as s:
        await sessions.transition(s, session_id, SessionStatus.CANCELLED, reason="test")
    with pytest.raises(IllegalTransition):
        async with database.session() as s:
            await sessions.transition(s, session_id, SessionStatus.STARTING)
    async with database.session() as s:
        found = await sessions.get(s, session_id)
        log = await events.for_session(s, session_id)
    assert found is not None and found.status == "cancelled" and found.reason == "test"
    assert [e.data["status"] for e in log] == ["pending", "cancelled"]


async def test_pages_are_newest_first_scoped_and_complete(database: Database) -> None:
    ids = [await _new(database, user="alice") for _ in range(7)]
    await _new(database, user="bob")
    await _new(database, user="alice", tenant="other")
    seen: list[str] = []
    cursor = None
    while True:
        async with database.session() as s:
            rows, cursor = await sessions.page(s, tenant="t1", user_id="alice", limit=3, cursor=cursor)
        seen += [r.id for r in rows]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    assert len(seen) == len(set(seen)) == 7
    with pytest.raises(sessions.BadCursor):
        async with database.session() as s:
            await sessions.page(s, tenant="t1", cursor="not-a-cursor!")
