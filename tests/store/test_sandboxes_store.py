"""Sandbox records: the warm pool's path (created without an owner, ready, then assigned with one) and a
refused transition that changes nothing."""

from __future__ import annotations

import pytest

from browservm.store import sandboxes
from browservm.store.database import Database
from browservm.store.states import IllegalTransition, SandboxState


async def test_a_warm_sandbox_gets_its_owner_when_assigned(database: Database) -> None:
    async with database.session() as s:
        created = await sandboxes.create(s, backend="process", role="browser", sandbox_id="sbx_warm")
        await sandboxes.transition(s, created.id, SandboxState.READY)
    async with database.session() as s:
        assigned = await sandboxes.transition(
            s,
            "sbx_warm",
            SandboxState.ASSIGNED,
            reason="taken",
            tenant="t1",
            user_id="ada",
            session_id="ses_1",
        )
    assert (assigned.state, assigned.tenant, assigned.user_id, assigned.session_id) == (
        "assigned",
        "t1",
        "ada",
        "ses_1",
    )


async def test_a_refused_transition_changes_nothing(database: Database) -> None:
    async with database.session() as s:
        created = await sandboxes.create(s, backend="process", role="browser", tenant="t1", user_id="ada")
        await sandboxes.transition(s, created.id, SandboxState.ASSIGNED)
    with pytest.raises(IllegalTransition) as refused:
        async with database.session() as s:
            # A second session must not be able to claim a sandbox that is no longer ready.
            await sandboxes.transition(s, created.id, SandboxState.ASSIGNED, user_id="mallory")
    assert (refused.value.current, refused.value.target) == ("assigned", "assigned")
    async with database.session() as s:
        found = await sandboxes.get(s, created.id)
    assert found is not None and found.user_id == "ada"
    with pytest.raises(LookupError):
        async with database.session() as s:
            await sandboxes.transition(s, "sbx_missing", SandboxState.DESTROYING)
